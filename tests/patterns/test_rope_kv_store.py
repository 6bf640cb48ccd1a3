"""The RoPE -> KV-cache store fusion end to end: real blocks compiled with the fx_fusion backend.

Every positive test compiles a block from ``tests/attention_blocks.py`` with
``make_backend(FusionConfig(on_unfusable="raise"))`` (an unsafe site fails the compile), runs prefill and
two decode steps, and checks against an eager copy of the block:

* outputs and every cache buffer, untouched rows included (caches start random), within the dtype's tolerance;
* per compiled graph: exactly one fused site in the pass's report, one ``auto_functionalized(fx_fusion.
  rope_kv_store)`` node in the post-grad graph, and one ``torch.ops.fx_fusion.rope_kv_store.default(`` call
  in Inductor's output code, whose cache arguments are the caller's cache tensors (no full-cache copy);
* running the pass again on the fused graph finds nothing and changes nothing (RoPE is never applied twice).

Negative tests build small token-pool models that break one safety rule each and check that the site is
left alone (eager-equal results, no fused op) with the reason in the report.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

import fx_fusion
import fx_fusion.backend as fx_backend
from fx_fusion import FusionConfig, RopeKVFusionPass, UnfusableSiteError
from fx_fusion.kernels.ops import rope_kv_store
from fx_fusion.patterns import FUSED_OP
from tests.attention_blocks import cos_sin_table, decode_inputs, make_block, prefill_inputs, token_pool_rotary

RAISE = FusionConfig(on_unfusable="raise")
FALLBACK = FusionConfig()

# (atol, rtol). fp32: the kernel and eager do the same fp32 maths, attention may sum in another order.
# bf16: the fused kernel rounds an fp32 result once; the rest of the block runs Inductor's bf16 kernels,
# which keep fp32 intermediates where eager rounds after every op.
OUTPUT_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (6e-2, 5e-2)}
CACHE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1.6e-2)}

FUSED_CALL = "torch.ops.fx_fusion.rope_kv_store.default("


# ------------------------------------------------------------------------------------------------
# Recording what the pass saw, and comparing against eager
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GraphRecord:
    """One compiled graph as the fusion pass left it."""

    sites: list
    fused_nodes: int  # auto_functionalized(fx_fusion.rope_kv_store) nodes after the pass
    rerun_sites: list  # sites found by a second application of the pass to the fused graph
    rerun_changed: bool  # whether the second application changed the graph

    @property
    def fused(self) -> list:
        return [s for s in self.sites if s.fused]

    @property
    def unfused(self) -> list:
        return [s for s in self.sites if not s.fused]


def fused_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (
        auto_functionalized, auto_functionalized_v2) and n.args and n.args[0] is FUSED_OP]


@pytest.fixture
def records(monkeypatch) -> list[GraphRecord]:
    """Make the fx_fusion backend record, for every graph it compiles, the sites and the fused graph."""
    out: list[GraphRecord] = []

    class RecordingPass(RopeKVFusionPass):
        def __call__(self, graph):
            super().__call__(graph)
            before = graph.python_code("self").src
            again = RopeKVFusionPass(self.config)
            again(graph)
            out.append(GraphRecord(self.last_sites, len(fused_nodes(graph)), again.last_sites,
                                   graph.python_code("self").src != before))

    monkeypatch.setattr(fx_backend, "RopeKVFusionPass", RecordingPass)
    return out


@pytest.fixture
def inference():
    """No autograd, no FX graph cache (a hit would skip the pass), a fresh Dynamo."""
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def compile_with(model, config: FusionConfig = RAISE, **kwargs):
    return torch.compile(model, backend=fx_fusion.make_backend(config), **kwargs)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "cache" in n or "buffer" in n}


def assert_close(actual, expected, tol, what: str) -> None:
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        atol, rtol = tol[e.dtype] if e.is_floating_point() else (0, 0)
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


def assert_same_state(model: nn.Module, eager: nn.Module, what: str, tol=CACHE_TOL) -> None:
    mine, ref = buffers(model), buffers(eager)
    assert mine.keys() == ref.keys()
    for name in ref:
        assert_close(mine[name], ref[name], tol, f"{what}: buffer {name}")


def run_steps(model: nn.Module, eager: nn.Module, compiled, steps, bf16_anywhere: bool = False) -> None:
    """Run every step compiled and eagerly; compare outputs and every cache after each step.

    ``bf16_anywhere``: the model computes in bf16 somewhere, so fp32 tensors get bf16 tolerances too.
    """
    out_tol, cache_tol = OUTPUT_TOL, CACHE_TOL
    if bf16_anywhere:
        out_tol = {dtype: OUTPUT_TOL[torch.bfloat16] for dtype in OUTPUT_TOL}
        cache_tol = {dtype: CACHE_TOL[torch.bfloat16] for dtype in CACHE_TOL}
    for i, inputs in enumerate(steps):
        out = compiled(*inputs)
        expected = eager(*inputs)
        assert_close(out, expected, out_tol, f"step {i} output")
        assert_same_state(model, eager, f"step {i}", cache_tol)


def block_steps(block) -> list[tuple]:
    """Prefill of 5 tokens, then two decode steps."""
    return [prefill_inputs(block), decode_inputs(block, past=5), decode_inputs(block, past=6)]


def fused_call_args(code: str) -> list[list[str]]:
    """The argument expressions of every fused op call in Inductor's output code."""
    calls = []
    for m in re.finditer(re.escape(FUSED_CALL), code):
        depth, args, cur = 1, [], ""
        for ch in code[m.end():]:
            if ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
                if depth == 0:
                    break
            if ch == "," and depth == 1:
                args.append(cur.strip())
                cur = ""
            else:
                cur += ch
        calls.append(args + [cur.strip()])
    return calls


def assert_caches_updated_in_place(code: str, caches: list[torch.Tensor]) -> None:
    """The fused op writes into the caller's cache tensors: no clone of a cache, no copy back."""
    inputs = set(re.search(r"^\s*(\w+(?:, \w+)*),? = args$", code, re.M).group(1).split(", "))
    for args in fused_call_args(code):
        for name in args[3:5]:  # k_cache, v_cache
            assert name in inputs, f"the fused op writes into {name}, not into a graph input (a cache copy)"
    numels = {c.numel() for c in caches}
    body = code[code.index("def call("):]
    for shape in re.findall(r"empty_strided\w*\(\(([^)]*)\)", body):
        dims = [d.strip() for d in shape.split(",") if d.strip()]
        if dims and all(d.isdigit() for d in dims):
            numel = 1
            for d in dims:
                numel *= int(d)
            assert numel not in numels, f"a buffer of shape ({shape}) as large as a cache is allocated"


def check_fused(records: list[GraphRecord], codes: list[str], caches, sites_per_graph: int = 1) -> None:
    assert records, "the fusion pass never ran"
    assert len(codes) == len(records), (len(codes), len(records))
    for i, (rec, code) in enumerate(zip(records, codes)):
        reasons = [s.reason for s in rec.unfused]
        assert len(rec.fused) == sites_per_graph and not rec.unfused, f"graph {i}: {reasons}"
        assert rec.fused_nodes == sites_per_graph, f"graph {i}: {rec.fused_nodes} fused nodes"
        assert code.count(FUSED_CALL) == sites_per_graph, f"graph {i}: {code.count(FUSED_CALL)} fused calls"
        assert rec.rerun_sites == [] and not rec.rerun_changed, f"graph {i}: the pass fused a fused graph"
        assert_caches_updated_in_place(code, caches)


# ------------------------------------------------------------------------------------------------
# Positive: every surface form, style and dtype
# ------------------------------------------------------------------------------------------------

BF16 = torch.bfloat16
FULL = pytest.mark.full  # the quick tier keeps one case per form and the QK-norm one
FORM_CASES = [
    pytest.param("sglang", dict(style="neox"), id="sglang-neox"),
    pytest.param("sglang", dict(style="gptj", use_reshape=True), id="sglang-gptj", marks=FULL),
    pytest.param("sglang", dict(rot_dim=8), id="sglang-partial", marks=FULL),
    pytest.param("sglang", dict(dtype=BF16, upcast=True), id="sglang-bf16-upcast", marks=FULL),
    pytest.param("vllm", dict(style="neox"), id="vllm-neox", marks=FULL),
    pytest.param("vllm", dict(style="gptj", rot_dim=8), id="vllm-gptj-partial", marks=FULL),
    pytest.param("vllm", dict(flat_store=True), id="vllm-flat-store"),
    pytest.param("vllm", dict(flat_store=True, style="gptj", dtype=BF16, upcast=True), id="vllm-flat-gptj-bf16",
                 marks=FULL),
    pytest.param("hf", dict(cache_update="index_copy", style="neox"), id="hf-index_copy-neox"),
    pytest.param("hf", dict(cache_update="index_copy", style="gptj"), id="hf-index_copy-gptj", marks=FULL),
    pytest.param("hf", dict(cache_update="setitem", style="neox"), id="hf-setitem-neox", marks=FULL),
    pytest.param("hf", dict(cache_update="setitem", style="gptj", freqs_via_matmul=True), id="hf-setitem-gptj",
                 marks=FULL),
    pytest.param("hf", dict(qk_norm=True), id="hf-qk_norm"),
    pytest.param("hf", dict(rot_dim=8), id="hf-partial", marks=FULL),
    pytest.param("hf", dict(dtype=BF16, upcast=True, cache_update="setitem"), id="hf-bf16-upcast", marks=FULL),
    pytest.param("hf", dict(cache_index="counter"), id="hf-cache_position-counter", marks=FULL),
    pytest.param("gptfast", {}, id="gptfast", marks=FULL),
    pytest.param("gptfast", dict(dtype=BF16), id="gptfast-bf16"),
]


@pytest.mark.parametrize("form, kw", FORM_CASES)
def test_block_fuses_and_matches_eager(form, kw, records, codes, inference):
    block = make_block(form, **kw)
    eager = copy.deepcopy(block)
    run_steps(block, eager, compile_with(block), block_steps(block))
    check_fused(records, codes, [block.k_cache if hasattr(block, "k_cache") else block.k_buffer])
    site = records[0].fused[0]
    assert site.style == kw.get("style", "gptj" if form == "gptfast" else "neox")
    assert site.rotary_dim == kw.get("rot_dim", 16) and site.head_dim == 16
    assert site.layout == {"sglang": "token", "vllm": "paged"}.get(form, "sequence")
    assert site.num_tokens == "5"


class TwoLayers(nn.Module):
    """Two blocks of one form, each with its own caches, sharing the rotary tables."""

    def __init__(self, form: str, **kw):
        super().__init__()
        self.form = form
        self.layers = nn.ModuleList([make_block(form, seed=0, **kw), make_block(form, seed=1, **kw)])
        first, second = self.layers
        if form in ("sglang", "vllm"):
            second.cos_sin_cache = first.cos_sin_cache
        elif form == "hf":
            second.rotary_emb = first.rotary_emb
        else:
            second.freqs_cis = first.freqs_cis

    def forward(self, *args):
        h = 1 if self.form in ("sglang", "vllm") else 0
        for layer in self.layers:
            out = layer(*args)
            args = (*args[:h], out, *args[h + 1:])
        return out


@pytest.mark.parametrize("form", ["sglang", pytest.param("hf", marks=FULL)])
def test_the_pass_leaves_the_graph_in_order_without_a_sort(form, monkeypatch, inference):
    """Each rewrite keeps the graph in topological order (``splice.keep_in_order``: the rotated q's views come before
    the v projection the fused op reads): the pass's closing check finds every graph in order, so it sorts none."""
    from fx_fusion.patterns import rope_kv_store

    found, real = [], rope_kv_store.in_topological_order
    monkeypatch.setattr(rope_kv_store, "in_topological_order", lambda g: found.append(real(g)) or found[-1])
    model = TwoLayers(form)
    run_steps(model, copy.deepcopy(model), compile_with(model), block_steps(model.layers[0]))
    assert found and all(found), found


@pytest.mark.parametrize("form", ["sglang", pytest.param("hf", marks=FULL)])
def test_two_layers_fuse_two_sites(form, records, codes, inference):
    model = TwoLayers(form)
    eager = copy.deepcopy(model)
    counters["fx_fusion"].clear()
    run_steps(model, eager, compile_with(model), block_steps(model.layers[0]))
    check_fused(records, codes, [b.k_cache if form == "hf" else b.k_buffer for b in model.layers],
                sites_per_graph=2)
    # each layer's store was fused with its own cache
    for rec in records:
        assert len({s.nodes["k_store"] for s in rec.fused}) == 2
    # the layers have the same shapes: one traced replacement per graph, the second layer's a copy of it
    stats = counters["fx_fusion"]
    assert (stats["replacement_traces"], stats["replacement_traces_shared"]) == (len(records), len(records))


def _mark_tokens_dynamic(form: str, inputs: tuple) -> tuple:
    dims = {"sglang": (0, 0, 0, 0), "hf": (1, 1, 0)}[form]  # the token dim of each argument
    for x, d in zip(inputs, dims):
        torch._dynamo.mark_dynamic(x, d)
    return inputs


def test_two_layers_with_a_dynamic_token_count_share_one_trace(records, codes, inference):
    """Each input's token dim its own symbol: the first layer's trace proves the symbols of k and of the slots equal
    (until then two symbols, later layers one); the second layer shares the trace."""
    model = TwoLayers("sglang")
    eager = copy.deepcopy(model)
    counters["fx_fusion"].clear()
    steps = [_mark_tokens_dynamic("sglang", prefill_inputs(model.layers[0], num_tokens=t, seed=t)) for t in (3, 5)]
    run_steps(model, eager, compile_with(model), steps)
    check_fused(records, codes, [b.k_buffer for b in model.layers], sites_per_graph=2)
    assert len(records) == 1 and records[0].fused[0].num_tokens == "dynamic"
    stats = counters["fx_fusion"]
    assert (stats["replacement_traces"], stats["replacement_traces_shared"]) == (1, 1)


@pytest.mark.parametrize("form, how", [("sglang", "mark_dynamic"), pytest.param("hf", "mark_dynamic", marks=FULL),
                                       ("hf", "dynamic=True")])
def test_dynamic_token_count_compiles_once_and_fuses(form, how, records, codes, inference):
    """T = 3, 5, 7 with a symbolic token count: one graph, fused, eager-equal every time."""
    block = make_block(form)
    eager = copy.deepcopy(block)
    compiled = compile_with(block, dynamic=True) if how == "dynamic=True" else compile_with(block)
    counters["stats"].clear()
    steps = [prefill_inputs(block, num_tokens=t, seed=t) for t in (3, 5, 7)]
    if how == "mark_dynamic":
        steps = [_mark_tokens_dynamic(form, inputs) for inputs in steps]
    run_steps(block, eager, compiled, steps)
    assert counters["stats"]["unique_graphs"] == 1
    check_fused(records, codes, [block.k_cache if form == "hf" else block.k_buffer])
    assert records[0].fused[0].num_tokens == "dynamic"


def test_fused_qkv_split_views_give_the_right_k_cache(records, codes, inference):
    """Regression: an op mutating q/k in place, fed views of one qkv matmul, got a wrong k cache.

    The op must mutate only the caches (its schema says so), and the SGLang form, whose q/k/v are
    split slices of one projection, must write exactly eager's k rows and leave the others alone.
    """
    schema = FUSED_OP._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    aliased = [a.name for a in schema.arguments if a.alias_info is not None]
    assert written == aliased == ["k_cache", "v_cache"]
    assert all(r.alias_info is None for r in schema.returns)

    block = make_block("sglang", num_slots=32)
    eager = copy.deepcopy(block)
    before = block.k_buffer.clone()
    run_steps(block, eager, compile_with(block), block_steps(block))
    check_fused(records, codes, [block.k_buffer])
    written_rows = torch.zeros(block.k_buffer.shape[0], dtype=torch.bool)
    for inputs in block_steps(block):
        written_rows[inputs[2]] = True
    torch.testing.assert_close(block.k_buffer, eager.k_buffer, atol=1e-6, rtol=1e-6)
    assert torch.equal(block.k_buffer[~written_rows], before[~written_rows])
    assert not torch.equal(block.k_buffer[written_rows], before[written_rows])


# ------------------------------------------------------------------------------------------------
# Negative: one broken safety rule per model
# ------------------------------------------------------------------------------------------------


class TokenPoolStore(nn.Module):
    """``k_buffer[loc] = rope(k); v_buffer[loc] = v`` on a [slots, Hkv, D] pool, with one rule broken.

    variant:
      "plain"          the fusable form
      "q_positions"    q rotated at other positions than k
      "q_table"        q rotated with another cos/sin table than k
      "read_before"    the k cache is read before the store, in the same graph
      "unrotated"      k is stored unrotated while the rotated k is returned
      "local_cache"    the store goes into tensors created inside the graph, not cache inputs
      "cast"           the stored k and v are cast to the cache dtype at the store
      "k_user_3d"      the rotated k [T, Hkv, D] that is stored is also returned
      "k_user_2d"      the rotated k [T, Hkv*D] (the form SGLang's attention receives) is also returned
      "no_head_dim"    the first kv head of the rotated k is stored into a [1, slots, D] cache along dim 1 (a
                       one-head key cache, as DeepSeek-V3.2's indexer keeps its keys), v as usual
    """

    def __init__(self, variant="plain", heads=4, kv_heads=2, head_dim=16, slots=32, dtype=torch.float32,
                 cache_dtype=None):
        super().__init__()
        self.variant, self.heads, self.kv_heads, self.head_dim, self.dtype = variant, heads, kv_heads, head_dim, dtype
        self.proj = nn.Linear(32, (heads + 2 * kv_heads) * head_dim, bias=False, dtype=dtype)
        self.register_buffer("cos_sin_cache", cos_sin_table(64, head_dim))
        self.register_buffer("other_cos_sin_cache", cos_sin_table(64, head_dim, ) * 0.5)
        cache_dtype = cache_dtype or dtype
        self.register_buffer("k_buffer", torch.randn(slots, kv_heads, head_dim, dtype=cache_dtype))
        self.register_buffer("v_buffer", torch.randn(slots, kv_heads, head_dim, dtype=cache_dtype))
        self.register_buffer("k_seq", torch.randn(1, slots, head_dim, dtype=cache_dtype))

    def rope(self, positions, q, k, table=None):
        table = self.cos_sin_cache if table is None else table
        return token_pool_rotary(positions, q, k, table, self.head_dim, self.head_dim, "neox", False, False)

    def forward(self, positions, hidden, loc):
        var, kv = self.variant, self.kv_heads * self.head_dim
        q, k, v = self.proj(hidden).split([self.heads * self.head_dim, kv, kv], dim=-1)
        if var == "q_positions":
            q, _ = self.rope(positions + 1, q, q)
            _, k_rot = self.rope(positions, k, k)
        elif var == "q_table":
            q, _ = self.rope(positions, q, q, self.other_cos_sin_cache)
            _, k_rot = self.rope(positions, k, k)
        else:
            q, k_rot = self.rope(positions, q, k)
        extra = ()
        k_buffer, v_buffer = self.k_buffer, self.v_buffer
        if var == "read_before":
            extra = (k_buffer[loc] * 2,)
        if var == "local_cache":
            k_buffer, v_buffer = torch.zeros_like(k_buffer), torch.zeros_like(v_buffer)
        k_store = (k if var == "unrotated" else k_rot).view(-1, self.kv_heads, self.head_dim)
        v_store = v.view(-1, self.kv_heads, self.head_dim)
        if var == "cast":
            k_store, v_store = k_store.to(k_buffer.dtype), v_store.to(v_buffer.dtype)
        if var == "no_head_dim":
            self.k_seq[:, loc] = k_store[:, 0].unsqueeze(0)
        else:
            k_buffer[loc] = k_store
        v_buffer[loc] = v_store
        if var == "unrotated" or var == "k_user_2d":
            extra = (k_rot * 3,)
        if var == "k_user_3d":
            extra = (k_store * 3,)
        read = (k_buffer[loc].flatten(1) + v_buffer[loc].flatten(1).to(k_buffer.dtype)).sum(-1, keepdim=True)
        return (q * read.to(q.dtype), *extra)


def token_pool_inputs(model: TokenPoolStore, num_tokens: int = 5) -> tuple:
    positions = torch.arange(num_tokens)
    hidden = torch.randn(num_tokens, 32).to(model.dtype)
    loc = torch.tensor([3, 9, 1, 30, 17, 22, 5])[:num_tokens]
    return positions, hidden, loc


def run_variant(variant: str, config: FusionConfig = FALLBACK, **kw):
    model = TokenPoolStore(variant, **kw)
    eager = copy.deepcopy(model)
    bf16_anywhere = torch.bfloat16 in (model.dtype, model.k_buffer.dtype)
    run_steps(model, eager, compile_with(model, config), [token_pool_inputs(model)], bf16_anywhere)


def test_plain_token_pool_store_fuses(records, codes, inference):
    """The negative models' baseline: with no rule broken the site fuses."""
    run_variant("plain", RAISE)
    check_fused(records, codes, [torch.empty(32, 2, 16)])


@pytest.mark.parametrize("variant, reason", [
    ("q_positions", "no RoPE of q with the same cos/sin"),
    ("q_table", "no RoPE of q with the same cos/sin"),
])
def test_q_and_k_rotated_differently_is_not_fused(variant, reason, records, codes, inference):
    run_variant(variant)
    (rec,) = records
    assert [s.fused for s in rec.sites] == [False] and reason in rec.sites[0].reason
    assert not rec.sites[0].disabled
    assert rec.fused_nodes == 0 and FUSED_CALL not in codes[0]


def test_store_into_a_tensor_made_in_the_graph_fuses(records, codes, inference):
    """A cache the graph allocates (``zeros_like``) is written by the op as eager writes it (nothing else holds it)."""
    run_variant("local_cache", RAISE)
    (rec,) = records
    assert [s.fused for s in rec.sites] == [True] and FUSED_CALL in codes[0]


@pytest.mark.parametrize("variant, reason", [
    ("read_before", "the cache is also read before the store"),
    ("no_head_dim", "with no head dim (a one-head key cache [B, S, D]"),
])
def test_store_that_is_not_an_in_place_cache_write_is_not_fused(variant, reason, records, codes, inference):
    """The cache read before the store: the RoPE output's store stays."""
    run_variant(variant)
    (rec,) = records
    assert [(s.fused, s.disabled) for s in rec.sites] == [(False, False)]
    assert "store not supported" in rec.sites[0].reason and reason in rec.sites[0].reason
    assert rec.fused_nodes == 0 and FUSED_CALL not in codes[0]


def test_unrotated_store_is_not_fused(records, codes, inference):
    """k stored unrotated while the rotated k is used elsewhere: no RoPE output is stored, no candidate."""
    run_variant("unrotated")
    (rec,) = records
    assert rec.sites == [] and rec.fused_nodes == 0 and FUSED_CALL not in codes[0]


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_store_cast_to_another_cache_dtype_is_not_fused(dtype, cache_dtype, records, codes, inference):
    run_variant("cast", dtype=dtype, cache_dtype=cache_dtype)
    (rec,) = records
    assert [s.fused for s in rec.sites] == [False] and "dtype" in rec.sites[0].reason
    assert rec.fused_nodes == 0 and FUSED_CALL not in codes[0]


def test_rotated_k_with_another_user_fuses_with_return_k(records, codes, inference):
    run_variant("k_user_3d", RAISE)
    check_fused(records, codes, [torch.empty(32, 2, 16)])
    (args,) = fused_call_args(codes[0])
    assert args[15] == "True", f"return_k is {args[15]}"


def test_rotated_2d_k_with_another_user_fuses_with_return_k(records, codes, inference):
    run_variant("k_user_2d", RAISE)
    check_fused(records, codes, [torch.empty(32, 2, 16)])


def test_graph_already_calling_the_fused_op_is_left_alone(records, codes, inference):
    """A model that calls the fused op itself: no new site, the op is called once."""

    class Manual(TokenPoolStore):
        def forward(self, positions, hidden, loc):
            kv = self.kv_heads * self.head_dim
            q, k, v = self.proj(hidden).split([self.heads * self.head_dim, kv, kv], dim=-1)
            t = q.shape[0]
            q_out, _ = rope_kv_store(q.view(t, -1, self.head_dim), k.view(t, -1, self.head_dim),
                                     v.view(t, -1, self.head_dim), self.k_buffer, self.v_buffer, loc,
                                     cos_sin_cache=self.cos_sin_cache, positions=positions, layout="token")
            return q_out * self.k_buffer[loc].sum()

    model = Manual()
    eager = copy.deepcopy(model)
    run_steps(model, eager, compile_with(model, RAISE), [token_pool_inputs(model)])
    (rec,) = records
    assert rec.sites == [] and rec.rerun_sites == [] and not rec.rerun_changed
    assert rec.fused_nodes == 1 and codes[0].count(FUSED_CALL) == 1


# ------------------------------------------------------------------------------------------------
# Config: disabled layouts/styles, token thresholds, raising
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, kw, reason", [
    pytest.param(FusionConfig(layouts={"paged", "sequence"}, on_unfusable="raise"), {},
                 "layout 'token' disabled by config", marks=FULL),
    (FusionConfig(styles={"neox"}, on_unfusable="raise"), dict(style="gptj"), "style 'gptj' disabled by config"),
], ids=["layout", "style"])
def test_disabled_by_config_is_not_fused_and_does_not_raise(config, kw, reason, records, codes, inference):
    block = make_block("sglang", **kw)
    eager = copy.deepcopy(block)
    run_steps(block, eager, compile_with(block, config), block_steps(block)[:2])
    assert len(records) == len(codes) == 2
    for rec, code in zip(records, codes):
        assert [(s.fused, s.disabled) for s in rec.sites] == [(False, True)]
        assert reason in rec.sites[0].reason
        assert rec.fused_nodes == 0 and FUSED_CALL not in code


def test_min_tokens_fuses_prefill_not_decode(records, codes, inference):
    block = make_block("sglang")
    eager = copy.deepcopy(block)
    config = FusionConfig(min_tokens=4, on_unfusable="raise")
    run_steps(block, eager, compile_with(block, config), block_steps(block))
    prefill, *decodes = records
    assert [s.fused for s in prefill.sites] == [True] and codes[0].count(FUSED_CALL) == 1
    assert decodes
    for rec, code in zip(decodes, codes[1:]):
        assert [(s.fused, s.disabled) for s in rec.sites] == [(False, True)]
        assert "1 tokens is outside [4, None]" in rec.sites[0].reason
        assert FUSED_CALL not in code


def test_max_tokens_leaves_prefill_alone(records, codes, inference):
    block = make_block("hf")
    eager = copy.deepcopy(block)
    config = FusionConfig(max_tokens=2, on_unfusable="raise")
    run_steps(block, eager, compile_with(block, config), block_steps(block)[:2])
    prefill, decode = records
    assert [(s.fused, s.disabled) for s in prefill.sites] == [(False, True)]
    assert "5 tokens is outside [1, 2]" in prefill.sites[0].reason and FUSED_CALL not in codes[0]
    assert [s.fused for s in decode.sites] == [True] and codes[1].count(FUSED_CALL) == 1


def _causes(exc: BaseException):
    while exc is not None:
        yield exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__


def test_on_unfusable_raise_raises_for_an_unsafe_site(records, codes, inference):
    model = TokenPoolStore("q_positions")
    with pytest.raises(Exception) as info:
        compile_with(model, RAISE)(*token_pool_inputs(model))
    errors = [e for e in _causes(info.value) if isinstance(e, UnfusableSiteError)]
    assert errors, f"no UnfusableSiteError in {info.value!r}"
    assert "no RoPE of q with the same cos/sin" in str(errors[0])
    assert "test_rope_kv_store.py" in str(errors[0])  # names the model's source line
