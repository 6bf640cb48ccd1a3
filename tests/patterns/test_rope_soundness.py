"""Regressions: graphs the RoPE recogniser once took for something they are not.

* Casts that round were looked through as the identity, so ``kc[loc] = rope(k).to(int32).float()``
  (or a fp8 / fp16 round trip, on k, q, cos/sin or k before the RoPE) fused into a wrong cache; and
  Gemma 3's bf16 q/k norm (fp32 maths cast back with ``type_as``) was refused because the fp32 tensor
  before the cast was taken as the one rotated.
* Reshapes compared a symbolic size with any other size as "maybe equal".
* A node first reached at the depth limit stayed a leaf for every later root.
* Symbolic sizes, bounds and split sizes raised exceptions other than ``NotRope`` in the evaluator.

End-to-end cases compile a tiny function with ``backend="fx_fusion"`` under ``torch.no_grad()`` and
compare its output and whole caches (random, never zeros, untouched rows included) with eager.
Inductor's ``emulate_precision_casts`` makes the unfused graph round where eager rounds, so a site
left alone compares exactly too.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import fx_fusion  # noqa: F401  (registers the backend)
from fx_fusion.patterns.evaluator import Evaluator
from fx_fusion.patterns.polynomial import NotRope
from fx_fusion.patterns.rope import match_rope
from tests.attention_blocks import rotate_half

T, HQ, HKV, D, SLOTS = 5, 4, 2, 16, 32
F32, BF16, FP8 = torch.float32, torch.bfloat16, torch.float8_e4m3fn


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------------
# Compiling against eager
# ------------------------------------------------------------------------------------------------


def compile_and_compare(fn, args, *, mutated, tol=(1e-5, 1e-5), dynamic=None) -> int:
    """Run ``fn`` compiled and eagerly on copies of ``args``; compare outputs and the ``mutated`` args.

    Returns the number of fused sites."""
    eager_args = [a.clone() for a in args]
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, emulate_precision_casts=True):
            out = torch.compile(fn, backend="fx_fusion", dynamic=dynamic)(*args)
            expected = fn(*eager_args)
    finally:
        torch._dynamo.reset()
    atol, rtol = tol
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    for i in mutated:
        torch.testing.assert_close(args[i], eager_args[i], atol=atol, rtol=rtol, msg=lambda m: f"argument {i}: {m}")
    return counters["fx_fusion"]["rope_kv_store_fused"]


def token_pool_args(dtype=F32):
    """q [T, Hq, D], k, v [T, Hkv, D], cos/sin [T, D] (HF-style duplicated halves), caches, slots."""
    half = torch.randn(T, D // 2)
    cos, sin = torch.cat([half.cos()] * 2, -1), torch.cat([half.sin()] * 2, -1)
    return [torch.randn(T, HQ, D, dtype=dtype), torch.randn(T, HKV, D, dtype=dtype), torch.randn(T, HKV, D, dtype=dtype),
            cos, sin, torch.randn(SLOTS, HKV, D, dtype=dtype) * 3 + 1, torch.randn(SLOTS, HKV, D, dtype=dtype) * 3 + 1,
            torch.randperm(SLOTS)[:T]]


CACHES = (5, 6)


def token_pool(*, k_before=None, k_after=None, q_after=None, table=None):
    """``k_cache[loc] = rope(k); v_cache[loc] = v; return rope(q)``, each piece optionally transformed."""
    same = lambda t: t  # noqa: E731
    k_before, k_after, q_after, table = (f or same for f in (k_before, k_after, q_after, table))

    def fn(q, k, v, cos, sin, k_cache, v_cache, loc):
        cos, sin = table(cos)[:, None], table(sin)[:, None]
        q_out = q_after(rope(q, cos, sin))  # before k: the casts after q's RoPE lie nearest to k's
        k_cache[loc] = k_after(rope(k_before(k), cos, sin))
        v_cache[loc] = v
        return q_out

    return fn


def round_trip(dtype):
    return lambda t: t.to(dtype).to(t.dtype)


# ------------------------------------------------------------------------------------------------
# a. Casts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, FP8, torch.float16], ids=str)
def test_rotated_k_cast_before_the_store_is_not_fused(dtype):
    """The cache holds the rounded RoPE; the fused op would store it unrounded."""
    assert compile_and_compare(token_pool(k_after=round_trip(dtype)), token_pool_args(), mutated=CACHES) == 0


@pytest.mark.parametrize("dtype", [torch.int32, FP8, torch.float16], ids=str)
def test_rotated_q_cast_after_the_rope_keeps_the_cast(dtype):
    """The q RoPE is the node before the casts: fused, the casts stay after the fused op."""
    assert compile_and_compare(token_pool(q_after=round_trip(dtype)), token_pool_args(), mutated=CACHES) == 1


@pytest.mark.parametrize("dtype", [torch.int32, FP8, BF16], ids=str)
def test_rounded_tables_are_the_tables(dtype):
    """cos/sin rounded before the RoPE: the rounded values are what the fused op reads."""
    assert compile_and_compare(token_pool(table=round_trip(dtype)), token_pool_args(), mutated=CACHES) == 1


@pytest.mark.parametrize("dtype", [torch.int32, FP8], ids=str)
def test_k_truncated_before_the_rope_is_the_rotated_tensor(dtype):
    """``rope(k.to(int32).float())``: the fp32 tensor after the round trip is rotated (exactly)."""
    assert compile_and_compare(token_pool(k_before=round_trip(dtype)), token_pool_args(), mutated=CACHES) == 1


def test_k_rounded_to_half_before_an_fp32_rope_is_not_fused():
    """``rope(k.half().float())`` in an fp32 model: the rotated tensor is fp16, the cache fp32."""
    assert compile_and_compare(token_pool(k_before=round_trip(torch.float16)), token_pool_args(),
                               mutated=CACHES) == 0


def gemma3_attention_prologue(q_in, k_in, v, q_weight, k_weight, cos, sin, k_cache, v_cache, cache_position):
    """Hugging Face Gemma 3 in bf16, up to the StaticCache update: q/k RMSNorm in fp32 cast back with
    ``type_as``, fp32 cos/sin cast to bf16 by the rotary embedding, a bf16 RoPE, ``index_copy_``."""

    def rms_norm(x, weight):
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (out * (1.0 + weight.float())).type_as(x)

    q = rms_norm(q_in.transpose(1, 2), q_weight)  # [B, H, S, D], normed after the transpose as in HF
    k = rms_norm(k_in.transpose(1, 2), k_weight)
    cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k_cache.index_copy_(2, cache_position, k)
    v_cache.index_copy_(2, cache_position, v.transpose(1, 2))
    return q


def test_gemma3_bf16_qk_norm_then_rope_fuses():
    b, s, max_seq = 1, T, 12
    angles = torch.randn(b, s, D // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    args = [torch.randn(b, s, HQ, D, dtype=BF16), torch.randn(b, s, HKV, D, dtype=BF16),
            torch.randn(b, s, HKV, D, dtype=BF16), torch.randn(D, dtype=BF16) * 0.1, torch.randn(D, dtype=BF16) * 0.1,
            cos, sin, torch.randn(b, HKV, max_seq, D, dtype=BF16), torch.randn(b, HKV, max_seq, D, dtype=BF16),
            torch.tensor([4, 5, 6, 7, 8])]
    fused = compile_and_compare(gemma3_attention_prologue, args, mutated=(7, 8), tol=(2e-2, 2e-2))
    assert fused == 1


def trace(fn, *args):
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


def output_node(gm):
    (out,) = gm.graph.find_nodes(op="output")
    return out.args[0]


@pytest.mark.parametrize("after, casts", [
    (round_trip(torch.int32), "cast torch.float32 -> torch.int32 -> torch.float32 before it is stored"),
    (round_trip(FP8), "cast torch.float32 -> torch.float8_e4m3fn -> torch.float32 before it is stored"),
    (round_trip(torch.float16), "cast torch.float32 -> torch.float16 before it is stored as torch.float32"),
], ids=["int32", "fp8", "fp16"])
def test_rounding_the_result_is_refused_naming_the_casts(after, casts):
    gm = trace(lambda x, c, s: after(rope(x, c, s)), torch.randn(T, HKV, D), torch.randn(T, 1, D),
               torch.randn(T, 1, D))
    with pytest.raises(NotRope, match=casts):
        match_rope(output_node(gm))


def test_one_rounding_to_the_stored_dtype_is_a_match():
    """The fused op's own rounding; whether x has the stored dtype (exact) is the caller's check."""
    for x_dtype in (BF16, F32):
        gm = trace(lambda x, c, s: rope(x.float(), c, s).to(BF16), torch.randn(T, HKV, D, dtype=x_dtype),
                   torch.randn(T, 1, D), torch.randn(T, 1, D))
        m = match_rope(output_node(gm))
        assert m.x.meta["val"].dtype == x_dtype and m.root.meta["val"].dtype == BF16


@pytest.mark.parametrize("x_dtype", [torch.float32, BF16], ids=str)
def test_a_rope_computed_in_fp64_is_refused(x_dtype):
    """fp64 arithmetic rounded once to the stored dtype is not the op's fp32 arithmetic rounded once."""
    gm = trace(lambda x, c, s: rope(x.double(), c.double(), s.double()).to(x_dtype),
               torch.randn(T, HKV, D, dtype=x_dtype), torch.randn(T, 1, D), torch.randn(T, 1, D))
    with pytest.raises(NotRope, match="computed in float64"):
        match_rope(output_node(gm))


def test_fp64_tables_are_refused():
    """An fp64 RoPE cast back to fp32 with fp64 cos/sin: the fused op reads fp16/bf16/fp32 tables."""
    gm = trace(lambda x, c, s: rope(x.double(), c, s).float(), torch.randn(T, HKV, D),
               torch.randn(T, 1, D, dtype=torch.float64), torch.randn(T, 1, D, dtype=torch.float64))
    with pytest.raises(NotRope, match="cos is torch.float64"):
        match_rope(output_node(gm))


# ------------------------------------------------------------------------------------------------
# b. Reshapes compare sizes strictly
# ------------------------------------------------------------------------------------------------


def test_reshape_swapping_tokens_and_heads_is_not_a_view():
    """``rope(k).reshape(H, T, D)`` with T symbolic: the tokens and heads trade places, so the result is
    not a RoPE of anything the cache could be fed token by token."""
    found = []

    class Capture(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            (out,) = graph.find_nodes(op="output")
            root = out.args[0][0]
            assert root.target is torch.ops.aten.reshape.default or root.target is torch.ops.aten.view.default
            try:
                found.append(match_rope(root))
            except NotRope as e:
                found.append(e)

        def uuid(self):
            return "test_rope_soundness.Capture"

    def fn(k, cos, sin):
        return (rope(k, cos, sin).reshape(k.shape[1], k.shape[0], k.shape[2]),)

    k, cos, sin = torch.randn(T, 8, D), torch.randn(T, 1, D), torch.randn(T, 1, D)
    torch._dynamo.mark_dynamic(k, 0)
    torch._dynamo.mark_dynamic(cos, 0)
    torch._dynamo.mark_dynamic(sin, 0)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=Capture()):
            torch.compile(fn)(k, cos, sin)
    finally:
        torch._dynamo.reset()
    assert len(found) == 1 and isinstance(found[0], NotRope), found


# ------------------------------------------------------------------------------------------------
# c. The depth limit is per root
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negations", [62, 64], ids=["cut-inside-the-rope", "cut-at-the-rope"])
def test_node_first_reached_at_the_depth_limit_is_evaluated_from_a_nearer_root(negations):
    """A long chain of negations on top of a RoPE: evaluated first, it reaches the RoPE (or a node inside
    it) at the depth limit; the RoPE itself, matched next with the same evaluator, must still match."""

    def fn(x, cos, sin):
        out = rope(x, cos, sin)
        far = out
        for _ in range(negations):
            far = -far
        return out, far

    gm = trace(fn, torch.randn(T, HKV, D), torch.randn(T, 1, D), torch.randn(T, 1, D))
    near, far = output_node(gm)
    ev = Evaluator()
    assert ev.max_depth == 64
    with pytest.raises(NotRope):
        match_rope(far, ev)
    m = match_rope(near, ev)
    assert m.rotary_dim == D and m.x.name == "x_1"


# ------------------------------------------------------------------------------------------------
# d. Symbolic sizes never raise anything but NotRope
# ------------------------------------------------------------------------------------------------


def dynamic_head_dim_fn(q, k, v, cos, sin, k_cache, v_cache, loc):
    half = q.shape[-1] // 2  # symbolic under dynamic=True: a symbolic slice bound and split size
    cos, sin = cos[:, None, :half], sin[:, None, :half]
    out = []
    for x in (q, k):
        x1, x2 = x.split(half, dim=-1)
        out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    k_cache[loc] = out[1]
    v_cache[loc] = v
    return out[0]


def test_dynamic_head_dim_graph_evaluates_to_leaves_or_not_rope():
    """dynamic=True with q/k as graph inputs: head_dim is symbolic. ``match_rope`` on every node of the
    post-grad graph either matches or raises ``NotRope`` (nothing can match: no static features)."""
    outcomes = []

    class Capture(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            for n in graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default):
                try:
                    outcomes.append(match_rope(n))
                except NotRope as e:
                    outcomes.append(e)

        def uuid(self):
            return "test_rope_soundness.Capture"

    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=Capture()):
            torch.compile(dynamic_head_dim_fn, dynamic=True)(*token_pool_args())
    finally:
        torch._dynamo.reset()
    assert len(outcomes) == 2 and all(isinstance(o, NotRope) for o in outcomes), outcomes


def test_dynamic_head_dim_of_graph_inputs_is_left_alone():
    """End to end: the site cannot be fused, and the pass must neither fail nor change the result."""
    assert compile_and_compare(dynamic_head_dim_fn, token_pool_args(), mutated=CACHES, dynamic=True) == 0


def test_symbolic_sizes_bounds_and_indices_raise_only_not_rope():
    """Static feature dims with a symbolic split size, slice bound or select index (from the token
    count): evaluation gives a leaf or ``NotRope`` and installs no guard."""
    g = Graph()
    w = g.input("w", 5, 8, 8, dynamic=(0,))
    s = w.meta["val"].shape[0]
    nodes = [g.op(operator.getitem, g.op(torch.ops.aten.split.Tensor, w, s, -1), 0),
             g.op(operator.getitem, g.op(torch.ops.aten.split_with_sizes.default, w, [s, 8 - s], -1), 0),
             g.op(torch.ops.aten.slice.Tensor, w, -1, 0, s),
             g.op(torch.ops.aten.slice.Tensor, w, 0, 0, s),
             g.op(torch.ops.aten.select.int, w, -1, s)]
    guards = g.guards()
    for node in nodes:
        try:
            Evaluator().evaluate(node, 1)
        except NotRope:
            pass
    assert g.guards() == guards


class Graph:
    """A hand-built FX graph whose nodes carry fake values (as post-grad graphs do); sizes listed in
    ``dynamic`` are symbols of one ``ShapeEnv``."""

    def __init__(self):
        self.graph = torch.fx.Graph()
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env)

    def input(self, name: str, *sizes, dynamic=(), dtype=F32) -> torch.fx.Node:
        ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC if i in dynamic else DimDynamic.STATIC
                                                      for i in range(len(sizes))])
        n = self.graph.placeholder(name)
        n.meta["val"] = self.mode.from_tensor(torch.empty(*sizes, dtype=dtype), symbolic_context=ctx)
        return n

    def op(self, target, *args, **kwargs) -> torch.fx.Node:
        n = self.graph.call_function(target, args, kwargs)
        args, kwargs = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with self.mode:
            n.meta["val"] = target(*args, **kwargs)
        return n

    def guards(self) -> int:
        return len(self.shape_env.guards)
