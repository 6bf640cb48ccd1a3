"""``check_slots`` / ``check_positions`` (``check_bounds=True`` in ``rope_kv_store``): an index outside the cache or
the rotary table fails the call, as eager indexing does, instead of being skipped or clamped.

On CPU the op checks on the host before anything is written (``IndexError``); on CUDA the kernel asserts on the
device. The kernel's assertions run here too: the interpreter evaluates ``tl.device_assert`` when its builder has
``debug`` on, as a CUDA compile with assertions does, and every case must fail there exactly when the host check
fails (the host check is ``check_index_ranges``, also what ``validate=True`` runs).
"""

from __future__ import annotations

import pytest
import torch
import triton.runtime.interpreter as interpreter

from fx_fusion.kernels.launch import launch
from fx_fusion.kernels.ops import rope_kv_store
from fx_fusion.kernels.problem import check_index_ranges, prepare
from tests.kernels.test_rope_kv_cache import INTERPRETED

T, H, D, SLOTS, POSITIONS = 4, 2, 16, 8, 32

# (slots, positions, negative_wraps, swa_table); the first token's entries vary, the others are in range
CASES = [
    ([0, 1, 2, 3], [0, 1, 2, 3], False, None),
    ([SLOTS, 1, 2, 3], [0, 1, 2, 3], False, None),  # just past the cache
    ([2**40, 1, 2, 3], [0, 1, 2, 3], False, None),
    ([-1, 1, 2, 3], [0, 1, 2, 3], False, None),  # negative without wraps: padding, skipped
    ([-1, 1, 2, 3], [0, 1, 2, 3], True, None),  # the last row
    ([-SLOTS, 1, 2, 3], [0, 1, 2, 3], True, None),
    ([-SLOTS - 1, 1, 2, 3], [0, 1, 2, 3], True, None),
    ([0, 1, 2, 3], [POSITIONS, 1, 2, 3], False, None),
    ([0, 1, 2, 3], [-1, 1, 2, 3], False, None),  # a negative position without wraps is out of range
    ([0, 1, 2, 3], [-1, 1, 2, 3], True, None),
    ([0, 1, 2, 3], [-POSITIONS - 1, 1, 2, 3], True, None),
    ([5, 1, 2, 3], [0, 1, 2, 3], False, [0, 1, 2, 3, 4]),  # past swa_table
    ([-1, 1, 2, 3], [0, 1, 2, 3], False, [0, 1, 2, 3, 4]),
    ([0, 1, 2, 3], [0, 1, 2, 3], False, [SLOTS, 1, 2, 3, 4]),  # swa_table maps past the cache
    ([0, 1, 2, 3], [0, 1, 2, 3], True, [-1, 1, 2, 3, 4]),
]


def _args(slots, positions, wraps, swa):
    g = torch.Generator().manual_seed(len(str(slots)) + 7 * len(str(positions)))
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in "qkv")
    k_cache, v_cache = (torch.randn(SLOTS, H, D, generator=g) for _ in "kv")
    table = torch.randn(POSITIONS, D, generator=g)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=torch.tensor(slots),
                cos=table[:, : D // 2], sin=table[:, D // 2:], positions=torch.tensor(positions),
                swa_table=None if swa is None else torch.tensor(swa), negative_wraps=wraps, rotary_dim=D)


def _host_verdict(args) -> bool:
    try:
        check_index_ranges(prepare(**args))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("slots, positions, wraps, swa", CASES)
def test_op_fails_before_writing_anything(slots, positions, wraps, swa):
    """The op (interpreter or fp32 reference) with ``check_bounds``: ``IndexError`` and untouched caches, or the same
    result as without the check."""
    args = _args(slots, positions, wraps, swa)
    kw = {k: args.pop(k) for k in ("cos", "sin", "positions", "swa_table", "negative_wraps", "rotary_dim")}
    before = [args["k_cache"].clone(), args["v_cache"].clone()]
    if not _host_verdict(dict(args, **kw)):
        with pytest.raises(IndexError, match="outside|must lie in"):
            rope_kv_store(**args, **kw, check_bounds=True)
        assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])
        return
    q_checked, _ = rope_kv_store(**args, **kw, check_bounds=True)
    checked = [args["k_cache"].clone(), args["v_cache"].clone()]
    args["k_cache"], args["v_cache"] = before
    q_plain, _ = rope_kv_store(**args, **kw)
    assert torch.equal(q_checked, q_plain)
    assert torch.equal(checked[0], args["k_cache"]) and torch.equal(checked[1], args["v_cache"])


@pytest.mark.skipif(not INTERPRETED, reason="runs the kernel in the Triton interpreter (CPU)")
@pytest.mark.parametrize("slots, positions, wraps, swa", CASES)
def test_kernel_assertions_agree_with_the_host_check(slots, positions, wraps, swa, monkeypatch):
    """With assertions compiled in, the kernel fails exactly on the cases ``check_index_ranges`` rejects; without
    ``check_slots``/``check_positions`` it never fails (it skips and clamps)."""
    args = _args(slots, positions, wraps, swa)
    ok = _host_verdict(args)
    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        interpreter.InterpreterOptions(debug=True, sanitize_overflow=False))
    for check in (False, True):
        p = prepare(**args, check_slots=check, check_positions=check)
        q_out = torch.empty_like(p.q).view(args["q"].shape)
        if ok or not check:
            launch(p, q_out, None)
            continue
        with pytest.raises(Exception, match="out of range") as info:
            launch(p, q_out, None)
        assert "AssertionError" in repr(info.value) or isinstance(info.value, AssertionError)


def test_slots_and_positions_are_checked_separately():
    """``check_slots`` alone leaves an out-of-range position clamped; ``check_positions`` alone, a slot skipped."""
    args = _args([SLOTS, 1, 2, 3], [0, 1, 2, 3], False, None)
    op = torch.ops.fx_fusion.rope_kv_store
    positional = [args[n] for n in ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "cos", "sin", "positions",
                                    "swa_table")]
    op(*positional, None, None, True, D, "token", False, False, check_positions=True)  # the slot: skipped
    with pytest.raises(IndexError, match="slot_mapping has slots outside"):
        op(*positional, None, None, True, D, "token", False, False, check_slots=True)
    args = _args([0, 1, 2, 3], [POSITIONS, 1, 2, 3], False, None)
    positional[5], positional[8] = args["slot_mapping"], args["positions"]
    op(*positional, None, None, True, D, "token", False, False, check_slots=True)  # the position: clamped
    with pytest.raises(IndexError, match="positions must lie in"):
        op(*positional, None, None, True, D, "token", False, False, check_positions=True)
