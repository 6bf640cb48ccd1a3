"""The pass never crashes a compile and never changes a result: tiny CPU functions, compiled vs eager.

Each case once crashed the compile (an ``InductorError`` from inside the pass) or would have fused a
site the op cannot compute. Every test compares outputs and whole caches (random, never zeros) with
eager, and checks the site's report.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fx_fusion
import fx_fusion.backend as fx_backend
import fx_fusion.patterns.rewrite as rewrite
import fx_fusion.patterns.rope_kv_store as rope_kv_store
from fx_fusion import FusionConfig, RopeKVFusionPass, UnfusableSiteError
from fx_fusion.patterns import FUSED_OP
from fx_fusion.patterns.fx_utils import RESHAPES, Role
from fx_fusion.patterns.kv_store import walk_views
from tests.attention_blocks import cos_sin_table

RAISE = FusionConfig(on_unfusable="raise")
FALLBACK = FusionConfig()


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():
        yield
    torch._dynamo.reset()


@dataclasses.dataclass
class PassRun:
    sites: list
    before: str  # the graph's code before the pass
    after: str  # and after it
    without_val: list  # names of call_function nodes without meta["val"] after the pass
    op_traces: list  # the stack trace of every fused op node after the pass


@pytest.fixture
def passes(monkeypatch) -> list[PassRun]:
    """What the pass saw and did for every graph the fx_fusion backend compiles."""
    out = []

    class Recording(RopeKVFusionPass):
        def __call__(self, graph):
            before = graph.python_code("self").src
            try:
                super().__call__(graph)
            finally:
                calls = [n for n in graph.nodes if n.op == "call_function"]
                out.append(PassRun(self.last_sites, before, graph.python_code("self").src,
                                   [n.name for n in calls if "val" not in n.meta],
                                   [n.meta.get("stack_trace") for n in calls if n.args and n.args[0] is FUSED_OP]))

    monkeypatch.setattr(fx_backend, "RopeKVFusionPass", Recording)
    return out


def neox(x, cos, sin):
    """NeoX RoPE on x [T, H, D] with cos/sin [T or 1, D/2]."""
    x1, x2 = x.chunk(2, -1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


class Store(nn.Module):
    """``k_buffer[loc] = rope(k); v_buffer[loc] = v`` on a [32, 2, 16] pool; q, k, v are graph inputs.

    tables:  "gather"  ``cos_sin_cache[positions]`` (one row per token)
             "row"     ``cos_sin_cache[5:6]`` (one row for every token)
             "pos1"    ``cos_sin_cache[positions[:1]]`` (the first token's row for every token)
    q is rotated in its own dtype and cast to k's afterwards (a no-op unless the caller passes another dtype)
    """

    def __init__(self, tables="gather", dtype=torch.float32):
        super().__init__()
        self.tables = tables
        self.register_buffer("cos_sin_cache", cos_sin_table(64, 16).to(dtype))
        self.register_buffer("k_buffer", torch.randn(32, 2, 16, dtype=dtype))
        self.register_buffer("v_buffer", torch.randn(32, 2, 16, dtype=dtype))

    def forward(self, q, k, v, positions, loc):
        rows = {"gather": lambda: self.cos_sin_cache[positions], "row": lambda: self.cos_sin_cache[5:6],
                "pos1": lambda: self.cos_sin_cache[positions[:1]]}[self.tables]()
        cos, sin = rows.chunk(2, -1)
        q_rot = neox(q, cos.to(q.dtype), sin.to(q.dtype)).to(k.dtype)
        k_rot = neox(k, cos, sin)
        self.k_buffer[loc] = k_rot
        self.v_buffer[loc] = v
        return q_rot * 2


def store_inputs(num_tokens=3, dtype=torch.float32, q_dtype=None):
    return (torch.randn(num_tokens, 4, 16, dtype=q_dtype or dtype), torch.randn(num_tokens, 2, 16, dtype=dtype),
            torch.randn(num_tokens, 2, 16, dtype=dtype), torch.tensor([7, 2, 40, 11, 0, 63])[:num_tokens],
            torch.tensor([3, 9, 30, 17, 1, 22])[:num_tokens])


def compare(model: Store, config: FusionConfig, steps, tol=1e-5, **compile_kw):
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=fx_fusion.make_backend(config), **compile_kw)
    for inputs in steps:
        torch.testing.assert_close(compiled(*inputs), eager(*inputs), atol=tol, rtol=tol)
        for name in ("k_buffer", "v_buffer"):
            torch.testing.assert_close(getattr(model, name), getattr(eager, name), atol=tol, rtol=tol, msg=name)


def fused_nodes(code: str) -> int:
    return code.count("torch.ops.higher_order.auto_functionalized(torch.ops.fx_fusion.rope_kv_store.default")


def test_dynamic_true_with_q_k_as_graph_inputs_is_reported_not_a_crash(passes):
    """``dynamic=True`` makes head_dim symbolic (q/k are inputs): this once crashed with "unhashable SymInt"."""
    compare(Store(), FALLBACK, [store_inputs(3), store_inputs(5)], dynamic=True)
    assert passes
    for run in passes:
        assert [(s.fused, s.disabled) for s in run.sites] == [(False, False)]
        assert "symbolic" in run.sites[0].reason, run.sites[0].reason


@pytest.mark.parametrize("tables", ["row", "pos1"])
def test_one_cos_row_broadcast_over_tokens_fuses_exactly(tables, passes):
    """One cos/sin row for T = 3 tokens once crashed the compile in the op's fake ``prepare``."""
    compare(Store(tables), RAISE, [store_inputs(3), store_inputs(1)])
    for run in passes:
        assert [s.fused for s in run.sites] == [True], [s.reason for s in run.sites]
        assert fused_nodes(run.after) == 1


def test_q_dtype_other_than_k_is_not_fused(passes):
    """q rotated in fp32 and cast to bf16 afterwards, k rotated in bf16: the op needs one dtype."""
    model = Store(dtype=torch.bfloat16)
    compare(model, FALLBACK, [store_inputs(3, torch.bfloat16, q_dtype=torch.float32)], tol=2e-2)
    ((run,),) = [passes]
    assert [(s.fused, s.disabled) for s in run.sites] == [(False, False)]
    assert "float32 but k is torch.bfloat16" in run.sites[0].reason, run.sites[0].reason
    assert fused_nodes(run.after) == 0


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["replacement", "can_fuse"])
def test_an_exception_inside_the_pass_leaves_the_graph_untouched(where, passes, monkeypatch):
    """Untouched but for the canonicalisation that runs first (value-equal nodes merged; same values)."""
    monkeypatch.setattr(rewrite if where == "replacement" else rope_kv_store, where, _boom)
    canonical = []
    canonicalize = rope_kv_store.canonicalize
    monkeypatch.setattr(rope_kv_store, "canonicalize",
                        lambda graph: (canonicalize(graph), canonical.append(graph.python_code("self").src)))
    compare(Store(), FALLBACK, [store_inputs(3)])
    ((run,),) = [passes]
    assert [(s.fused, s.disabled, s.reason) for s in run.sites] == [
        (False, False, "internal error: RuntimeError: boom")]
    assert canonical == [run.after]


def test_an_exception_inside_the_pass_raises_when_asked(monkeypatch):
    monkeypatch.setattr(rewrite, "replacement", _boom)
    model = Store()
    with pytest.raises(Exception) as info:
        torch.compile(model, backend=fx_fusion.make_backend(RAISE))(*store_inputs(3))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    errors = [e for e in chain if isinstance(e, UnfusableSiteError)]
    assert errors and "internal error: RuntimeError: boom" in str(errors[0])


def test_the_plain_store_fuses_with_one_functional_op_and_no_extra_copy(passes):
    """The baseline of this file: the fused graph has one auto_functionalized op and two copy_ (the epilogue),
    and every node carries a fake value; the inserted ones carry the store's stack trace."""
    compare(Store(), RAISE, [store_inputs(3)])
    ((run,),) = [passes]
    assert [s.fused for s in run.sites] == [True]
    assert fused_nodes(run.after) == 1
    assert run.after.count("torch.ops.aten.copy_.default(") == run.before.count("torch.ops.aten.copy_.default(") == 2
    assert "index_put" not in run.after
    assert run.without_val == []
    (trace,) = run.op_traces
    assert "self.k_buffer[loc] = k_rot" in trace


def test_reshape_that_swaps_a_symbolic_dim_is_not_a_view_of_the_same_dims():
    """``[s0, 8, 16] -> [8, s0, 16]`` regroups elements: walk_views must stop there (it once read it as the
    identity, since a symbolic size "may equal" 8)."""
    gm = make_fx(lambda x: x.reshape(8, x.shape[0], 16) * 1, tracing_mode="symbolic")(torch.randn(5, 8, 16))
    (reshape,) = [n for n in gm.graph.nodes if n.target in RESHAPES]
    root, roles, chain = walk_views(reshape, (Role.HEAD, Role.TOKEN, Role.FEATURE))
    assert root is reshape and chain == [] and roles == (Role.HEAD, Role.TOKEN, Role.FEATURE)


class CastTableStore(nn.Module):
    """SGLang's ``forward_native`` in bf16 or fp16: the fp32 ``cos_sin_cache`` is gathered once, and each
    RoPE call casts its cos/sin to the model dtype (one cast for q, one for k) before the multiply."""

    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("csc", cos_sin_table(64, 16))
        self.register_buffer("k_buffer", torch.randn(32, 2, 16, dtype=dtype))
        self.register_buffer("v_buffer", torch.randn(32, 2, 16, dtype=dtype))

    def rope(self, x, cos, sin):
        return neox(x, cos.to(x.dtype), sin.to(x.dtype))

    def forward(self, q, k, v, positions, loc):
        cos, sin = self.csc.index_select(0, positions).chunk(2, -1)
        self.k_buffer[loc] = self.rope(k, cos, sin)
        self.v_buffer[loc] = v
        return self.rope(q, cos, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_table_cast_per_rope_call_is_read_rounded(passes, dtype):
    """The two casts of one fp32 table are one table read rounded: fused, with the op rounding cos/sin as
    the casts do (``table_dtype``), equal to stock Inductor (which also rounds at the casts and computes
    the products in fp32) to one bf16 rounding."""
    block = CastTableStore(dtype)
    stock = copy.deepcopy(block)
    args = (torch.randn(5, 4, 16, dtype=dtype), torch.randn(5, 2, 16, dtype=dtype),
            torch.randn(5, 2, 16, dtype=dtype), torch.randint(0, 64, (5,)), torch.randperm(32)[:5])
    out = torch.compile(block, backend="fx_fusion")(*args)
    expected = torch.compile(stock)(*args)
    (run,) = passes
    assert [s.fused for s in run.sites] == [True], run.sites
    assert f"table_dtype = {dtype}" in run.after, run.after
    for got, want in ((out, expected), (block.k_buffer, stock.k_buffer), (block.v_buffer, stock.v_buffer)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=8e-3)


class HalfCastTableStore(CastTableStore):
    """Only cos is cast to the model dtype: sin stays fp32 (the products with sin are then fp32)."""

    def rope(self, x, cos, sin):
        return neox(x, cos.to(x.dtype), sin).to(x.dtype)


def test_table_cast_on_cos_only_is_reported_not_fused(passes):
    """cos read rounded, sin not: no one table rounding describes it, so the site is not fused, the
    report says why, and outputs and caches are eager's."""
    block = HalfCastTableStore(torch.bfloat16)
    eager = copy.deepcopy(block)
    args = (torch.randn(5, 4, 16, dtype=torch.bfloat16), torch.randn(5, 2, 16, dtype=torch.bfloat16),
            torch.randn(5, 2, 16, dtype=torch.bfloat16), torch.randint(0, 64, (5,)), torch.randperm(32)[:5])
    out = torch.compile(block, backend="fx_fusion")(*args)
    expected = eager(*args)
    (run,) = passes
    assert [s.fused for s in run.sites] == [False] and "rounded" in run.sites[0].reason, run.sites
    for got, want in ((out, expected), (block.k_buffer, eager.k_buffer), (block.v_buffer, eager.v_buffer)):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=8e-3)


class Fp64Store(Store):
    """An fp32 model whose RoPE is computed in float64 and rounded back: ``rope(k.double(), cos.double(),
    sin.double()).float()``. Eager rounds once from fp64; the fused op would compute in fp32."""

    def forward(self, q, k, v, positions, loc):
        cos, sin = self.cos_sin_cache[positions].double().chunk(2, -1)
        q_rot = neox(q.double(), cos, sin).float()
        self.k_buffer[loc] = neox(k.double(), cos, sin).float()
        self.v_buffer[loc] = v
        return q_rot * 2


def test_rope_computed_in_float64_is_reported_and_bit_exact(passes):
    """Fused, 305 of 1024 cache elements were 1 ulp off eager (stock torch.compile is bit-exact): now reported."""
    compare(Fp64Store(), FALLBACK, [store_inputs(6), store_inputs(3)], tol=0)
    for run in passes:
        assert [(s.fused, s.disabled) for s in run.sites] == [(False, False)]
        assert "computed in float64" in run.sites[0].reason, run.sites[0].reason
        assert fused_nodes(run.after) == 0


class PerHeadTables(nn.Module):
    """``k_buffer[loc] = rope(k)`` with cos and sin sliced from ``[T, 2, 16]`` inputs that vary per head: the RoPE
    recogniser reads them as the tables (only k is read at two features of an output feature), which the op cannot
    take (its tables are per token or position); with one kv head they are per-token tables, which it can."""

    def __init__(self, heads: int):
        super().__init__()
        self.register_buffer("k_buffer", torch.randn(32, heads, 16))
        self.register_buffer("v_buffer", torch.randn(32, heads, 16))

    def forward(self, q, k, v, y, z, loc):
        cos, sin = y[..., :8], z[..., :8]

        def rope(x):
            x1, x2 = x.chunk(2, -1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
        self.k_buffer[loc] = rope(k)
        self.v_buffer[loc] = v
        return rope(q) * 2


@pytest.mark.parametrize("heads", [2, 1])
def test_tables_that_vary_per_head_are_reported_and_per_token_ones_fuse(heads, passes):
    inputs = [torch.randn(3, heads, 16) for _ in range(5)] + [torch.tensor([3, 9, 30])]
    compare(PerHeadTables(heads), FALLBACK, [inputs])
    (run,) = passes
    (site,) = run.sites
    if heads == 2:
        assert not site.fused and "cos varies per head" in site.reason, site.reason
    else:
        assert site.fused, site.reason
