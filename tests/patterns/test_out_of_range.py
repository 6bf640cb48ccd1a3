"""Slots and positions outside the cache or the table, in graphs the pass rewrote: the call fails, as eager's does.

Eager raises ``IndexError`` for ``cache[slot] = k`` with a slot outside ``[-N, N)`` and for ``table[positions]`` with
a position outside the table; stock torch.compile fails too (a ``RuntimeError`` from its bounds check on CPU, a
device-side assertion on CUDA). The fused op, called directly, keeps the engines' convention (an out-of-range slot
skips the store, a position is clamped to the table); the pass emits it with ``check_slots``/``check_positions``,
so a fused site fails instead (``IndexError`` on CPU; the device-side assertion on CUDA: tests/e2e/test_gpu.py).
Slots the pass makes itself (a window copy's tokens before the window, SGLang ``store_cache``'s skipped index) are
past the cache on purpose: those stores check positions only, and still fuse and equal eager.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.attention_blocks import make_block, make_inputs
from tests.patterns.test_rope_kv_store import compile_with, inference, records  # noqa: F401


def _bad_slot_inputs(block, inputs: list, value: int) -> list:
    """The inputs with one token's slot (token pools) or cache position (sequence caches) set to ``value``."""
    bad = list(inputs)
    at = 2 if block.form in ("sglang", "vllm") else len(inputs) - 1
    bad[at] = bad[at].clone()
    bad[at][1] = value
    return bad


def _num_rows(block) -> int:
    if block.form == "sglang":
        return block.k_buffer.shape[0]
    if block.form == "vllm":
        return block.k_cache.shape[0] * block.k_cache.shape[1]
    return block.k_cache.shape[2]


@pytest.mark.parametrize("form", ["sglang", "vllm", "hf"])
@pytest.mark.parametrize("where", ["past-end", "below-minus-n"])
def test_out_of_range_slot_fails_as_eager(form, where, records, inference):
    block = make_block(form)
    eager = copy.deepcopy(block)
    compiled = compile_with(block)
    inputs = list(make_inputs(block, 3, past=2))
    torch.testing.assert_close(compiled(*inputs), eager(*inputs), rtol=1e-5, atol=1e-5)
    assert records and all(len(r.fused) == 1 for r in records)
    n = _num_rows(block)
    bad = _bad_slot_inputs(block, inputs, n if where == "past-end" else -n - 1)
    with pytest.raises(IndexError):
        eager(*bad)
    with pytest.raises(IndexError, match="outside|must lie in"):
        compiled(*bad)


@pytest.mark.parametrize("form, kw", [("sglang", {}), ("hf", dict(cache_update="setitem"))])
def test_negative_slot_in_range_wraps_as_eager(form, kw, records, inference):
    """``-1`` addresses the last row in eager (``cache[slot] = k``): still fused, still equal (not an error).
    (``index_copy_`` rejects it in eager, but its decomposition is the same ``index_put``: stock torch.compile
    writes the last row too, and so does the fused op.)"""
    block = make_block(form, **kw)
    eager = copy.deepcopy(block)
    compiled = compile_with(block)
    bad = _bad_slot_inputs(block, list(make_inputs(block, 3, past=2)), -1)
    torch.testing.assert_close(compiled(*bad), eager(*bad), rtol=1e-5, atol=1e-5)
    for name, buf in block.named_buffers():
        torch.testing.assert_close(buf, dict(eager.named_buffers())[name], rtol=1e-5, atol=1e-5, msg=name)
    assert records and all(len(r.fused) == 1 for r in records)


@pytest.mark.parametrize("value", [64, 10_000, -65])
def test_out_of_range_position_fails_as_eager(value, records, inference):
    """SGLang's ``cos_sin_cache.index_select(0, positions)`` (the gather is inside the fused op)."""
    block = make_block("sglang")
    eager = copy.deepcopy(block)
    compiled = compile_with(block)
    inputs = list(make_inputs(block, 3, past=2))
    compiled(*inputs)
    assert records and all(len(r.fused) == 1 for r in records)
    rows = block.cos_sin_cache.shape[0]
    positions = inputs[0].clone()
    positions[2] = value if value != 64 else rows
    bad = [positions, *inputs[1:]]
    with pytest.raises(IndexError):
        eager(*bad)
    with pytest.raises(IndexError, match="outside|must lie in"):
        compiled(*bad)
