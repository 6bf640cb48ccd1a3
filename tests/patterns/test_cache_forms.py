"""Caches that are not plain graph inputs, and engines' own store ops: fused on every layer and equal to eager.

Blocks from ``tests/cache_blocks.py``, compiled with ``on_unfusable="raise"`` (an unsafe site fails the compile),
run for a prefill and decode steps against an eager copy: outputs and whole caches (the whole stacked buffer,
untouched rows included; buffers start random) must agree, and every layer of every graph must be fused.

``EngineStoreBlock`` stores through ``torch.ops.sglang.store_cache``. SGLang's own op needs its compiled CUDA
kernels, so ``tests/cache_blocks.store_cache_op`` registers a plain-torch op under the same name with SGLang's schema
(sglang 0.5.23: ``store_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor indices, *,
SymInt row_bytes=0, SymInt v_row_bytes=0, SymInt num_split=0, SymInt size_limit=0, SymInt reserved_skip_index=0)``)
and its semantics (an index equal to ``reserved_skip_index`` not written, one outside ``[0, size_limit)`` an error),
and the older ``row_bytes``-only schema as the overload ``store_cache.v0``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from fx_fusion import FusionConfig
from fx_fusion.kernels import ops
from tests.cache_blocks import (HIDDEN, PADDING_ROW, EngineStoreBlock, StackedBlock, WindowBlock,
                                padded_pool_steps, pool_steps)
from tests.patterns.test_rope_kv_store import (FUSED_CALL, RAISE, assert_close, compile_with, fused_call_args,  # noqa: F401
                                               inference, records, run_steps)


def check_every_layer_fused(records, codes, layers: int, buffers: list[torch.Tensor]) -> None:
    """Every graph: one fused site per layer, nothing unfused, the op's caches are views of the caller's buffers
    (``reinterpret_tensor`` of a graph input: no copy of a buffer, no scatter back), no buffer-sized temporary."""
    assert records and len(codes) == len(records)
    numels = {b.numel() for b in buffers}
    for i, (rec, code) in enumerate(zip(records, codes)):
        assert len(rec.fused) == layers and not rec.unfused, f"graph {i}: {[s.reason for s in rec.unfused]}"
        assert code.count(FUSED_CALL) == layers, f"graph {i}: {code.count(FUSED_CALL)} fused calls"
        assert rec.rerun_sites == [] and not rec.rerun_changed
        inputs = set(re.search(r"^\s*(\w+(?:, \w+)*),? = args$", code, re.M).group(1).split(", "))
        for args in fused_call_args(code):
            for arg in args[3:5]:
                name = re.fullmatch(r"(?:reinterpret_tensor\()?(\w+).*", arg).group(1)
                assert name in inputs, f"graph {i}: the op writes {arg}, not a graph input's memory"
        body = code[code.index("def call("):]
        for shape in re.findall(r"empty_strided\w*\(\(([^)]*)\)", body):
            dims = [int(d) for d in shape.split(",") if d.strip().isdigit()]
            assert not dims or torch.Size(dims).numel() not in numels, f"graph {i}: a buffer-sized ({shape}) copy"


@pytest.mark.parametrize("layout", ["paged", "token", "split"])
def test_stacked_buffer_fuses_every_layer_in_place(layout, records, codes, inference):
    torch.manual_seed(0)
    model = StackedBlock(layout, layers=2).eval()
    eager = copy.deepcopy(model)
    run_steps(model, eager, compile_with(model), pool_steps())
    bufs = [model.kv_cache] if layout != "split" else [model.k_cache, model.v_cache]
    check_every_layer_fused(records, codes, model.layers, bufs)
    assert {s.layout for r in records for s in r.fused} == {"paged" if layout == "paged" else "token"}


@pytest.mark.parametrize("layout", ["paged", "split"])
def test_stacked_buffer_read_between_k_and_v_store_is_not_fused(layout, records, inference):
    """Reading the buffer after the k store and before the v store must see k's rows only: the pass leaves the
    stores alone and reports why (results still equal to eager)."""
    torch.manual_seed(0)
    model = StackedBlock(layout, layers=2, read_between=True).eval()
    eager = copy.deepcopy(model)
    run_steps(model, eager, compile_with(model, FusionConfig()), pool_steps()[:1])
    if layout == "paged":
        reasons = {s.reason for s in records[0].unfused}
        assert not records[0].fused and any("between the k and the v store" in r for r in reasons), reasons
    else:  # separate k and v buffers: reading the k buffer between the stores sees the same either way
        assert len(records[0].fused) == model.layers


def _engine_steps(dtype, short: bool = True, **kw) -> list[tuple]:
    """``padded_pool_steps`` in ``dtype``; ``short``: the prefill and the padded decode step only (two graphs)."""
    steps = padded_pool_steps(**kw)
    steps = [steps[0], steps[-1]] if short else steps
    return [(positions, hidden.to(dtype), loc, kv_loc) for positions, hidden, loc, kv_loc in steps]


def _run_engine_steps(model, config, steps, dtype) -> tuple:
    """Run ``steps`` compiled with ``config`` and eagerly: outputs and every pool equal after each step.
    Returns (the compiled model, the eager copy)."""
    eager, compiled = copy.deepcopy(model), compile_with(model, config)
    run_steps(model, eager, compiled, steps, bf16_anywhere=dtype == torch.bfloat16)
    return compiled, eager


def _slot_untouched(model, slot: int, value) -> bool:
    pools = [getattr(model, f"{kv}_buffer{i}") for i in range(model.layers) for kv in "kv"]
    return all(bool((pool[slot] == value).all()) for pool in pools)


@pytest.mark.parametrize("schema, dtype", [("current", torch.float32), ("current", torch.bfloat16),
                                           ("v0", torch.float32)])
def test_sglang_store_cache_op_is_matched(schema, dtype, records, codes, inference):
    """SGLang's call (``row_bytes``, ``v_row_bytes``, ``size_limit`` = the pools' rows; ``reserved_skip_index`` 0)
    fuses on every layer, and a decode step padded with tokens at slot 0 leaves slot 0 as it was, as the op skips
    it: the poisoned row stays, pools equal to eager's. The older schema writes slot 0 (as its op did) and fuses
    too."""
    torch.manual_seed(0)
    model = EngineStoreBlock(dtype=dtype, schema=schema).eval()
    _, eager = _run_engine_steps(model, RAISE, _engine_steps(dtype, short=False), dtype)
    check_every_layer_fused(records, codes, model.layers, [model.k_buffer0])
    assert all(s.layout == "token" for r in records for s in r.fused)
    assert "sglang.store_cache" not in "".join(codes)
    skipped = schema == "current"
    assert _slot_untouched(eager, 0, PADDING_ROW) is skipped and _slot_untouched(model, 0, PADDING_ROW) is skipped


@pytest.mark.parametrize("dtype, skip", [(torch.float32, 60), (torch.bfloat16, 60), (torch.float32, -1)])
def test_store_cache_with_another_reserved_skip_index(skip, dtype, records, codes, inference):
    """``reserved_skip_index=60`` (the row of position 1): that token's k and v are not written, slot 0 is; -1 skips
    nothing. Fused on every layer, pools equal to eager's."""
    torch.manual_seed(0)
    model = EngineStoreBlock(dtype=dtype, store_kw=dict(reserved_skip_index=skip)).eval()
    untouched = model.k_buffer0[60].clone()
    _, eager = _run_engine_steps(model, RAISE, _engine_steps(dtype), dtype)
    check_every_layer_fused(records, codes, model.layers, [model.k_buffer0])
    assert not _slot_untouched(eager, 0, PADDING_ROW)
    assert torch.equal(eager.k_buffer0[60], untouched) is (skip == 60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_cache_size_limit_below_the_pool(dtype, records, codes, inference):
    """``size_limit=48`` of a 64-row pool (``reserved_skip_index=-1``: the bound alone): indices below 48 fuse and
    equal eager; an index at or past 48 (but in the pool), past the pool or negative fails in eager's op, and the
    fused graph fails too (its assert) instead of writing the row."""
    torch.manual_seed(0)
    model = EngineStoreBlock(dtype=dtype, store_kw=dict(size_limit=48, reserved_skip_index=-1)).eval()
    steps = _engine_steps(dtype, num_slots=48)  # rows 47, 44, ... of the 64
    compiled, eager = _run_engine_steps(model, RAISE, steps, dtype)
    check_every_layer_fused(records, codes, model.layers, [model.k_buffer0])
    positions, hidden, loc, kv_loc = steps[-1]
    for bad in (48, 63, 64, -1):
        before = {name: b.clone() for name, b in model.named_buffers() if "buffer" in name}
        wrong = loc.clone()
        wrong[0] = bad
        with pytest.raises(RuntimeError, match=r"outside \[0, 48\)"):
            eager(positions, hidden, wrong, kv_loc)
        with pytest.raises(RuntimeError, match=r"outside \[0, 48\)"):
            compiled(positions, hidden, wrong, kv_loc)
        for name, b in model.named_buffers():
            if "buffer" in name:
                assert torch.equal(b, before[name]), f"index {bad}: {name} written"


ASYMMETRIC = "v rows (2 x 8, v_row_bytes): the fused op stores k and v with one head count and head_dim"


@pytest.mark.parametrize("store_kw, v_head_dim, dtype, reason", [
    (dict(size_limit=72, reserved_skip_index=-1), 16, torch.float32, "size_limit=72 is above the pools' 64 rows"),
    ({}, 8, torch.float32, ASYMMETRIC),
    ({}, 8, torch.bfloat16, ASYMMETRIC),
    (dict(num_split=3), 16, torch.float32, "num_split=3 is not 1, or 2 or 4"),
], ids=["size_limit-above-the-pool", "asymmetric-v-fp32", "asymmetric-v-bf16", "num_split"])
def test_store_cache_call_the_fused_op_cannot_reproduce_is_reported(store_kw, v_head_dim, reason, dtype, records,
                                                                    inference):
    """Calls whose result the fused op cannot reproduce, or that SGLang's op rejects: not fused, one site per layer
    reported with the reason; results equal to eager (or both fail)."""
    torch.manual_seed(0)
    model = EngineStoreBlock(dtype=dtype, store_kw=store_kw, v_head_dim=v_head_dim).eval()
    steps = _engine_steps(dtype)
    if "num_split" in store_kw:  # SGLang's kernel rejects the call: eager and compiled both fail
        with pytest.raises(RuntimeError, match="num_split"):
            copy.deepcopy(model)(*steps[0])
        with pytest.raises(RuntimeError, match="num_split"):
            compile_with(model, FusionConfig())(*steps[0])
    else:
        _run_engine_steps(model, FusionConfig(), steps, dtype)
    assert records and all(not r.fused for r in records)
    reasons = [s.reason for s in records[0].unfused]
    assert len(reasons) == model.layers and all(reason in r for r in reasons), reasons


def test_store_cache_skip_with_validate_is_reported(records, codes, inference):
    """``validate=True`` rejects the slot the fused op gets for a skipped index (past the pool), so a site whose op
    skips one is left to the op and reported; results equal to eager, slot 0 untouched."""
    torch.manual_seed(0)
    model = EngineStoreBlock().eval()
    _, eager = _run_engine_steps(model, FusionConfig(validate=True), _engine_steps(torch.float32), torch.float32)
    assert records and all(not r.fused for r in records)
    reasons = [s.reason for r in records for s in r.unfused]
    assert reasons and all("reserved_skip_index=0" in r for r in reasons), reasons
    assert _slot_untouched(model, 0, PADDING_ROW) and _slot_untouched(eager, 0, PADDING_ROW)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_allocated_in_graph_and_rolled_window_fuse(dtype, records, codes, inference):
    """The first call allocates the cache inside the compiled graph (``torch.zeros``); decode writes with
    ``index_copy_`` until the window (6) is full, then into the rolled window: every graph fused, equal to eager."""
    torch.manual_seed(0)
    model = WindowBlock(window=6, dtype=dtype).eval()
    eager = copy.deepcopy(model)
    compiled = compile_with(model)
    run_window_steps(model, eager, compiled, (4, 1, 1, 1, 1), dtype)
    kinds = [rec.fused[0].source for rec in records]
    assert len(records) >= 3 and all(len(rec.fused) == 1 and not rec.unfused for rec in records), \
        [[s.reason for s in rec.unfused] for rec in records]
    assert any("index_copy_" in k for k in kinds) and any("new_keys[:, :, index] = k" in k for k in kinds)
    assert all(code.count(FUSED_CALL) == 1 for code in codes)


def run_window_steps(model, eager, compiled, sizes, dtype) -> None:
    """Steps of ``sizes`` new tokens through a ``WindowBlock``, compiled and eagerly: outputs and both caches equal
    after every step."""
    g = torch.Generator().manual_seed(1)
    past = 0
    for n in sizes:
        hidden = torch.randn(1, n, HIDDEN, generator=g).to(dtype)
        position_ids = torch.arange(past, past + n)[None]
        past += n
        assert_close(compiled(hidden, position_ids), eager(hidden, position_ids), _tol(dtype), f"at {past} tokens")
        for name in ("keys", "values"):
            assert_close(getattr(model, name), getattr(eager, name), _tol(dtype), f"{name} at {past} tokens")


def _tol(dtype) -> dict:
    """Tolerances for a model computing in ``dtype``, for tensors of any float dtype it holds: fp32, the same
    maths; bf16, the kernel rounds once where eager rounds after every op."""
    tol = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (6e-2, 5e-2)}[dtype]
    return {torch.float32: tol, torch.bfloat16: tol}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("allocate", ["in the graph", "input"])
@pytest.mark.parametrize("keep", [slice(-4, None), slice(3, 7), slice(0, 4)], ids=["last", "middle", "first"])
def test_prefill_longer_than_the_window_fuses(keep, allocate, dtype, records, codes, inference, monkeypatch):
    """A 10-token first step into a window of 4 keeps 4 of its tokens, ``keys.copy_(k[:, :, keep])`` (HF keeps the
    last 4), and attends over all 10: fused as a store of those 4 tokens only, then decode rolls the full window.
    Outputs and whole caches (random where the cache is an input) equal to eager.

    The CPU path writes tokens in order, so a later token would hide an earlier one written to the same row (on a
    GPU the two race): the slots the op receives are checked too, each kept token at its own row and every other
    token at none, as the op resolves slots (a negative one counts from the end)."""
    seen = []
    for name in ("launch", "reference"):  # the kernel (through the interpreter), or the plain-torch path
        run = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda p, *a, run=run, **kw: seen.append(p) or run(p, *a, **kw))
    torch.manual_seed(0)
    model = WindowBlock(window=4, dtype=dtype, keep=keep, allocate_batch=1 if allocate == "input" else None).eval()
    eager = copy.deepcopy(model)
    compiled = compile_with(model)
    run_window_steps(model, eager, compiled, (10, 1, 1), dtype)
    assert len(records) >= 2 and all(len(rec.fused) == 1 and not rec.unfused for rec in records), \
        [[s.reason for s in rec.unfused] for rec in records]
    assert "self.keys.copy_(full_keys[:, :, keep])" in records[0].fused[0].source
    assert all(code.count(FUSED_CALL) == 1 for code in codes)
    prefill = next(p for p in seen if p.q.shape[1] == 10)
    slots = prefill.slot_mapping.flatten()
    rows = torch.where(slots < 0, slots + 4, slots) if prefill.options.negative_wraps else slots
    stored = (rows >= 0) & (rows < 4)
    kept = torch.arange(10)[keep]
    assert stored.nonzero().flatten().tolist() == kept.tolist(), slots
    assert rows[kept].tolist() == list(range(4)), slots


def test_multi_token_step_into_a_filled_window_is_reported(records, inference):
    """A 3-token step after 3 cached tokens of a window of 4 keeps the last 4 rows of ``cat(cached, k)``: cached rows
    move, which the fused op does not do. Not fused, reported with the reason; results equal to eager."""
    torch.manual_seed(0)
    model = WindowBlock(window=4).eval()
    eager = copy.deepcopy(model)
    compiled = compile_with(model, FusionConfig())
    run_window_steps(model, eager, compiled, (3, 3), torch.float32)
    assert len(records) == 2 and not records[1].fused
    reasons = [s.reason for s in records[1].unfused]
    assert len(reasons) == 1 and "concatenation" in reasons[0] and "moves cached rows" in reasons[0], reasons


def test_copy_of_every_other_token_is_reported(records, inference):
    """``keys.copy_(k[:, :, 0:8:2])`` (not a run of tokens) must not fuse as a window copy: reported with the reason,
    outputs and caches equal to eager."""
    torch.manual_seed(0)
    model = WindowBlock(window=4, keep=slice(0, 8, 2)).eval()
    eager = copy.deepcopy(model)
    compiled = compile_with(model, FusionConfig())
    run_window_steps(model, eager, compiled, (10,), torch.float32)
    assert not records[0].fused
    reasons = [s.reason for s in records[0].unfused]
    assert len(reasons) == 1 and "step 2" in reasons[0] and "not a run of tokens" in reasons[0], reasons


def test_window_copy_with_a_symbolic_token_count_is_reported(records, inference):
    """Compiled with ``dynamic=True``, a prefill longer than the window copies ``k[:, :, -4:]`` out of a symbolic
    number of tokens: where the kept run starts is not a constant, so the copy is reported, not fused."""
    torch.manual_seed(0)
    model = WindowBlock(window=4).eval()
    eager = copy.deepcopy(model)
    run_window_steps(model, eager, compile_with(model, FusionConfig(), dynamic=True), (10,), torch.float32)
    assert not records[0].fused
    reasons = [s.reason for s in records[0].unfused]
    assert len(reasons) == 1 and "static S" in reasons[0], reasons


def test_window_copy_that_casts_is_reported(records, inference):
    """A bf16 model whose window caches are fp32: ``keys.copy_(k[:, :, -4:])`` casts as it copies, which the fused
    op's store does not. Reported, not fused; outputs and caches equal to eager."""
    torch.manual_seed(0)
    model = WindowBlock(window=4, dtype=torch.bfloat16, allocate_batch=1).eval()
    model.keys, model.values = model.keys.float(), model.values.float()
    eager = copy.deepcopy(model)
    run_window_steps(model, eager, compile_with(model, FusionConfig()), (10,), torch.bfloat16)
    assert not records[0].fused
    reasons = [s.reason for s in records[0].unfused]
    assert len(reasons) == 1 and "casts" in reasons[0], reasons
