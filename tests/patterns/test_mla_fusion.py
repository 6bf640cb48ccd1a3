"""The MLA latent-pool fusion end to end: SGLang-style ``MLABlock``s (``tests/mla_models.py``) compiled with the
fx_fusion backend, a prefill then two decode steps, against an eager copy of the block.

Positive cases: every compiled graph holds one ``auto_functionalized(fx_fusion.mla_rope_store)`` per layer and no
RoPE left of q_pe or k_pe (GPT-J's rotate is the only ``neg`` of the block), nor the row cat (nor the absorbed q
cat, where it is the rotated q_pe's only user); the report says fused; the outputs match eager (the dtype's
tolerance); the pools, whole, match eager's: the rotated k_pe features bit for bit (the op rounds as eager does at
each step the graph rounds: one fp32 -> bf16 rounding of the RoPE, the bf16 quotient before an fp8 cast; not for the
all-bf16 base rotary, which Inductor computes in fp32 too), the latent features within the cache tolerance of the
existing pass tests (they come from the graph's RMSNorm, which plain Inductor also reduces in another order than
eager); the rows written match the float64 reference; the rows never written keep their random start values.

Negative cases: two-half stores that are not one row store (other rows, a gap, the pool read in between, two
scales), the in-place latent buffer and a RoPE whose products are rounded to bf16 before the sum (explicit casts
the op would not reproduce) are reported with their reason and left as they were.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

import fx_fusion
import fx_fusion.backend as fx_backend
from fx_fusion import FusionConfig, RopeKVFusionPass
from fx_fusion.kernels.functional import MLA_OP
from tests.mla_models import FP8, MLABlock, make_mla_block, mla_steps, reference_rows, rotate_gptj
from tests.patterns.test_rope_kv_store import inference  # noqa: F401  (the fixture)

aten = torch.ops.aten
BF16 = torch.bfloat16
FULL = pytest.mark.full
RAISE = FusionConfig(on_unfusable="raise")
OUTPUT_TOL = {torch.float32: (1e-5, 1e-4), BF16: (6e-2, 5e-2)}
CACHE_TOL = {torch.float32: (1e-5, 1e-5), BF16: (1e-2, 1.6e-2)}  # tests/patterns/test_rope_kv_store.py's
REFERENCE_TOL = {torch.float32: (2e-5, 1e-5), BF16: (3e-2, 2e-2)}  # the pool's rows against float64
LATENT = 32 + 8  # SMALL: L + R


@dataclasses.dataclass
class Record:
    sites: list
    mla_nodes: int
    negs: int  # aten.neg of a tensor left (GPT-J's rotate: one per RoPE; not the 0-d -inf of a dynamic softmax)
    row_cats: int  # last-dim cats L + R wide (the pool row, the absorbed q)


@pytest.fixture
def records(monkeypatch) -> list[Record]:
    out: list[Record] = []

    class RecordingPass(RopeKVFusionPass):
        def __call__(self, graph):
            super().__call__(graph)
            calls = [n for n in graph.nodes if n.op == "call_function"]
            out.append(Record(
                self.last_sites,
                sum(n.target in (auto_functionalized, auto_functionalized_v2) and n.args[0] is MLA_OP for n in calls),
                sum(n.target is aten.neg.default and n.args[0].meta["val"].dim() > 0 for n in calls),
                sum(n.target is aten.cat.default and n.meta["val"].shape[-1] == LATENT for n in calls)))

    monkeypatch.setattr(fx_backend, "RopeKVFusionPass", RecordingPass)
    return out


class TwoLayers(nn.Module):
    """Two MLA blocks, each with its own pool, both on the step's hidden states (so that each pool is bitwise
    eager's: a second layer fed the first's output would see its last-bit differences)."""

    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleList([make_mla_block(seed=i, **kw) for i in range(2)])

    def forward(self, positions, hidden, loc, kv_loc):
        out, q = self.layers[0](positions, hidden, loc, kv_loc)
        out2, q2 = self.layers[1](positions, hidden, loc, kv_loc)
        return out + out2, q, q2


def _pools(model: nn.Module) -> list[torch.Tensor]:
    return [b for n, b in model.named_buffers() if n.endswith("kv_pool")]


def _blocks(model: nn.Module) -> list[MLABlock]:
    return [m for m in model.modules() if isinstance(m, MLABlock)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (FP8,) else t


def _compare_pools(pool: torch.Tensor, eager: torch.Tensor, block, rope_exact: bool, what: str) -> None:
    """The whole pool against eager's: the rotated k_pe features (the op's arithmetic) bitwise where ``rope_exact``,
    the latent features (the graph's RMSNorm, which Inductor reduces in another order than eager: plain Inductor's
    pools differ from eager's there too) within the dtype's cache tolerance, as the existing pass tests compare."""
    latent = block.shape.kv_lora_rank
    a, e = pool, eager
    if block.fp8 is not None:
        a, e = (x.view(FP8).to(torch.float32) for x in (a, e))  # fp8 grid steps are exact in fp32
    if rope_exact:
        assert torch.equal(_bits(pool[..., latent:]), _bits(eager[..., latent:])), f"{what}: k_pe part differs"
    atol, rtol = CACHE_TOL[block.dtype] if block.fp8 is None else (2.0 ** -9, 0.125)  # fp8: one grid step at most
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{what}: pool against eager's: {m}")


def run_and_compare(model: nn.Module, config: FusionConfig = RAISE, steps=None, rope_exact: bool = True,
                    **compile_kw) -> list:
    """Run the steps compiled and eagerly; compare outputs, the whole pools, the written rows against float64, the
    untouched rows against their start. Returns the steps run."""
    block = _blocks(model)[0]
    eager = copy.deepcopy(model)
    start = [p.clone() for p in _pools(model)]
    compiled = torch.compile(model, backend=fx_fusion.make_backend(config), **compile_kw)
    steps = steps if steps is not None else mla_steps(block)
    written = set()
    for i, args in enumerate(steps):
        out, expected = compiled(*args), eager(*args)
        for a, e in zip(out, expected):
            atol, rtol = OUTPUT_TOL[e.dtype]
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"step {i} output: {m}")
        for p, pe in zip(_pools(model), _pools(eager)):
            _compare_pools(p, pe, block, rope_exact, f"step {i}")
        written |= set(args[2].tolist())
        for b in _blocks(model) if block.fp8 is None else ():  # the rows just written, against float64
            atol, rtol = REFERENCE_TOL[block.dtype]
            torch.testing.assert_close(b.kv_pool[args[2], 0].double(), reference_rows(b, args[0], args[1]),
                                       atol=atol, rtol=rtol, msg=lambda m: f"step {i} rows against float64: {m}")
    untouched = [r for r in range(start[0].shape[0]) if r not in written]
    assert untouched, "every row was written: nothing shows a store to a wrong row"
    for p, s in zip(_pools(model), start):
        assert torch.equal(_bits(p[untouched]), _bits(s[untouched])), "a row never written changed"
    return steps


def check_fused(records: list[Record], layers: int = 1, q_cat: bool = True) -> None:
    assert records, "the fusion pass never ran"
    for i, rec in enumerate(records):
        assert len(rec.sites) == layers and all(s.fused for s in rec.sites), (
            f"graph {i}: {[(s.store, s.reason) for s in rec.sites]}")
        assert rec.mla_nodes == layers, f"graph {i}: {rec.mla_nodes} mla_rope_store calls"
        assert rec.negs == 0, f"graph {i}: {rec.negs} RoPE rotations left"
        assert rec.row_cats == 0 if q_cat else rec.row_cats == layers, f"graph {i}: {rec.row_cats} row/q cats left"


# ------------------------------------------------------------------------------------------------
# Fused forms
# ------------------------------------------------------------------------------------------------

ABSORB_CASES = [
    pytest.param(dict(store="cat_view"), id="A-cat_view-fp32"),
    pytest.param(dict(store="cat_view", dtype=BF16), id="A-cat_view-bf16", marks=FULL),
    pytest.param(dict(store="cat_view", k_pe_layout="2d"), id="B-kpe2d-fp32", marks=FULL),
    pytest.param(dict(store="cat_view", k_pe_layout="2d", dtype=BF16), id="B-kpe2d-bf16", marks=FULL),
    pytest.param(dict(store="view_cat", dtype=BF16), id="C-view_cat-bf16"),
    pytest.param(dict(store="view_cat"), id="C-view_cat-fp32", marks=FULL),
    pytest.param(dict(store="cat_view", rotary="base", k_pe_layout="2d"), id="F-base-fp32", marks=FULL),
    pytest.param(dict(store="view_cat", rotary="base"), id="G-base-fp32", marks=FULL),
    # every op of this RoPE is bf16: Inductor computes the chain in fp32 and rounds once, as the op does (eager
    # rounds after each op: the k_pe part is compared with the bf16 tolerance, as plain Inductor's would be)
    pytest.param(dict(store="view_cat", rotary="base", dtype=BF16), id="G-base-bf16", marks=FULL),
    # SGLang's forward_absorb as written: q assembled in a new buffer, the latent row in the projection's output,
    # each in two slice writes (patterns/slice_writes.py makes them cats)
    pytest.param(dict(store="latent", absorb_q="buffer", dtype=BF16), id="E-sglang-buffers-bf16"),
    pytest.param(dict(store="latent"), id="E-latent-fp32", marks=FULL),
    pytest.param(dict(store="view_cat", absorb_q="buffer"), id="E-q-buffer-fp32", marks=FULL),
]


@pytest.mark.parametrize("kw", ABSORB_CASES)
def test_absorbed_decode_forms_fuse_and_match_eager(kw, records, inference):
    run_and_compare(make_mla_block(**kw), rope_exact=not (kw.get("rotary") == "base" and kw.get("dtype") == BF16))
    check_fused(records)
    notes = records[0].sites[0].notes
    assert not any("q's cat" in n for n in notes), notes  # the absorbed q cat is the op's q_out


@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(torch.float32, id="fp32", marks=FULL)])
def test_one_token_decode_fuses(dtype, records, inference):
    """Decode of one token per step (the common case): Dynamo specialises the size-1 token dim, so q_pe's RoPE
    follows its output's dims but the tokens' (x_dims None there); it was refused as "not [T, Hq, R]"."""
    block = make_mla_block(store="view_cat", dtype=dtype)
    run_and_compare(block, steps=mla_steps(block, prefill=5, decode=(1, 1)))
    check_fused(records)


def test_two_layers_fuse_one_call_each(records, inference):
    run_and_compare(TwoLayers(store="view_cat"))
    check_fused(records, layers=2)


def test_the_pass_leaves_mla_graphs_in_order_without_a_sort(records, monkeypatch, inference):
    """Each MLA rewrite keeps the graph in topological order (``splice.keep_in_order``), SGLang's buffers too."""
    from fx_fusion.patterns import rope_kv_store

    found, real = [], rope_kv_store.in_topological_order
    monkeypatch.setattr(rope_kv_store, "in_topological_order", lambda g: found.append(real(g)) or found[-1])
    run_and_compare(TwoLayers(store="latent", absorb_q="buffer"))
    check_fused(records, layers=2)
    assert found and all(found), found


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(BF16, id="bf16", marks=FULL)])
def test_prefill_form_fuses_with_the_rotated_k_pe_returned(dtype, records, inference):
    """Form K: the rotated k_pe also feeds the per-head k (expand + cat), so the op returns it; q's cat per head is
    the op's q_out (q_nope: the split's first part)."""
    block = make_mla_block(path="prefill", store="view_cat", dtype=dtype)
    steps = [mla_steps(block, prefill=n, decode=())[0] for n in (5, 3, 3)]  # fresh prompts, as the fixture's
    for i, s in enumerate(steps):  # ... each at other rows
        steps[i] = (s[0], s[1], (s[2] + 7 * i) % block.kv_pool.shape[0], s[3])
    run_and_compare(block, steps=steps)
    assert records
    for rec in records:
        assert [s.fused for s in rec.sites] == [True] and rec.mla_nodes == 1 and rec.negs == 0, rec.sites
        assert "k_rope" in rec.sites[0].nodes


def test_sglang_prefill_written_in_slices_fuses(records, inference):
    """SGLang's forward_normal_prepare: the rotated q_pe written into q's tail in place, k assembled in a new buffer
    (the rotated k_pe broadcast over the heads), the latent row in the projection's output: the k buffer and the
    latent become cats (``patterns/slice_writes.py``); q's partial write stays, the op returns its rotated q_pe."""
    block = make_mla_block(path="prefill", prefill_qk="slice_assign", store="latent")
    run_and_compare(block, steps=[mla_steps(block, prefill=5, decode=())[0]])
    assert records
    for rec in records:
        assert [s.fused for s in rec.sites] == [True] and rec.mla_nodes == 1 and rec.negs == 0, rec.sites


@pytest.mark.parametrize("kw", [
    pytest.param(dict(fp8="float8"), id="H-float8-python-scale-fp32"),
    pytest.param(dict(fp8="float8", dtype=BF16), id="H-float8-python-scale-bf16", marks=FULL),
    pytest.param(dict(fp8="uint8", scale_tensor=True, dtype=BF16), id="I-uint8-0d-scale-bf16"),
    pytest.param(dict(fp8="uint8", scale_tensor=True), id="I-uint8-0d-scale-fp32", marks=FULL),
    # SGLang's MLA pool casts the row without a scale; the row and q assembled in slices, as its model writes them
    pytest.param(dict(store="latent", absorb_q="buffer", fp8="uint8", k_scale=None, dtype=BF16),
                 id="I-sglang-buffers-uint8-bf16", marks=FULL),
])
def test_fp8_pools_fuse_byte_exact(kw, records, inference):
    run_and_compare(make_mla_block(**{"store": "view_cat", **kw}))
    check_fused(records)


def test_q_with_another_user_keeps_its_cat(records, inference):
    """The rotated q_pe read by more than the q cat: q_out is rope(q_pe) alone and the cat stays."""

    class QTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = make_mla_block(store="view_cat")

        def forward(self, positions, hidden, loc, kv_loc):
            b, s = self.block, self.block.shape
            t = hidden.shape[0]
            q = b.q_proj(hidden).view(t, s.heads, s.qk_head_dim)
            q_nope, q_pe = q.split([s.qk_nope_dim, s.rope_dim], dim=-1)
            kv_c, k_pe = b.kv_a_proj(hidden).split([s.kv_lora_rank, s.rope_dim], dim=-1)
            kv_c = b.kv_a_layernorm(kv_c)
            q_pe, k_pe = b._rotary(positions, q_pe, k_pe.unsqueeze(1))
            b._store(loc, None, kv_c, k_pe)
            out, q_att = b._absorbed_attention(q_nope, q_pe, kv_loc)
            return out, q_att, q_pe * 2

    model = QTwice()
    run_and_compare(model, steps=mla_steps(model.block))
    check_fused(records, q_cat=False)
    assert any("q's cat" in n for n in records[0].sites[0].notes), records[0].sites[0].notes


# ------------------------------------------------------------------------------------------------
# Reported, not fused
# ------------------------------------------------------------------------------------------------

NOT_FUSED = [
    # the latent buffer written in part (its first L features are the projection's own): not one cat
    pytest.param(dict(store="latent_tail", absorb_q="buffer"), "MLA latent row assembled in place in a buffer",
                 id="E-latent-written-in-part"),
    pytest.param(None, "not a RoPE the fused op computes", id="bf16-products-rounded-before-the-sum"),
    pytest.param("scaled-sin", "not a RoPE the fused op computes", id="sin-scaled-by-2"),
]


class ProductsRoundedBlock(MLABlock):
    """The scaling rotary with each product rounded to bf16 before the sum (``(x * cos).to(bf16) + ...``): explicit
    casts, which Inductor keeps; the op rounds the fp32 sum once, so fusing would change the rows."""

    def _rotary(self, positions, q_pe, k_pe):
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
        sin = sin.repeat_interleave(2, dim=-1).unsqueeze(-2)
        return [(x * cos).to(x.dtype) + (rotate_gptj(x) * sin).to(x.dtype) for x in (q_pe, k_pe)]


class ScaledSinBlock(MLABlock):
    """The scaling rotary with its sin table doubled (a scale on one table): RoPE-like, not a rotation."""

    def _rotary(self, positions, q_pe, k_pe):
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
        cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
        sin = 2 * sin.repeat_interleave(2, dim=-1).unsqueeze(-2)
        return [(x * cos + rotate_gptj(x) * sin).to(x.dtype) for x in (q_pe, k_pe)]


def _products_rounded_block(cls=ProductsRoundedBlock, dtype=BF16) -> MLABlock:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(store="view_cat", dtype=dtype).eval()


@pytest.mark.parametrize("kw, reason", NOT_FUSED)
def test_unmatched_forms_are_reported_not_fused(kw, reason, records, inference):
    block = (_products_rounded_block() if kw is None else _products_rounded_block(ScaledSinBlock, torch.float32)
             if kw == "scaled-sin" else make_mla_block(**kw))
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend=fx_fusion.make_backend(FusionConfig()))
    args = mla_steps(block, decode=())[0]
    for a, e in zip(compiled(*args), eager(*args)):
        torch.testing.assert_close(a, e, atol=OUTPUT_TOL[e.dtype][0], rtol=OUTPUT_TOL[e.dtype][1])
    assert len(records) == 1
    rec = records[0]
    assert rec.mla_nodes == 0
    assert len(rec.sites) == 1 and not rec.sites[0].fused and not rec.sites[0].disabled, rec.sites
    assert reason in rec.sites[0].reason, rec.sites[0].reason


@pytest.mark.parametrize("kw", [pytest.param(dict(store="view_cat"), id="view_cat"),
                                pytest.param(dict(store="latent", absorb_q="buffer"), id="sglang-buffers", marks=FULL)])
def test_dynamic_true_fuses_exactly(kw, records, inference):
    """``dynamic=True`` (every size symbolic, the head and feature dims too): every graph fused (one op, no rotation
    left), the outputs and the pools equal to eager's. (These graphs keep one ``neg``: the softmax's 0-d ``-inf``,
    which Inductor's decomposition negates when the sizes are symbolic; no RoPE's.)"""
    run_and_compare(make_mla_block(**kw), dynamic=True)
    assert records
    for i, rec in enumerate(records):
        assert [s.fused for s in rec.sites] == [True] and rec.mla_nodes == 1 and rec.negs == 0, (i, rec.sites)


def test_unfused_mla_site_raises_with_on_unfusable_raise(inference):
    block = _products_rounded_block()
    compiled = torch.compile(block, backend=fx_fusion.make_backend(RAISE))
    with pytest.raises(Exception, match="not a RoPE the fused op computes"):
        compiled(*mla_steps(block, decode=())[0])


# ------------------------------------------------------------------------------------------------
# The row written in two halves (SGLang's set_mla_kv_buffer): one store of the row where it is one
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    pytest.param(dict(), id="D-halves-fp32"),
    pytest.param(dict(dtype=BF16), id="D-halves-bf16", marks=FULL),
    pytest.param(dict(fp8="uint8", k_scale=None), id="J-uint8-no-scale-fp32"),
    pytest.param(dict(fp8="uint8", scale_tensor=True, dtype=BF16), id="J-uint8-0d-scale-bf16", marks=FULL),
    pytest.param(dict(fp8="float8", dtype=BF16), id="J-float8-python-scale-bf16", marks=FULL),
])
def test_two_half_store_fuses(kw, records, inference):
    """``kv_pool[loc, :, :L] = quant(kv_c); kv_pool[loc, :, L:] = quant(k_pe)``: one op per graph, the pool equal
    to eager's byte for byte (fp8: each half quantised alike, the quantisation applied once to the row)."""
    run_and_compare(make_mla_block(store="halves", **kw))
    check_fused(records)


@FULL
def test_two_half_store_fuses_with_dynamic_true(records, inference):
    """``dynamic=True`` (every size symbolic): the halves still make one row store, fused in every graph."""
    run_and_compare(make_mla_block(store="halves"), dynamic=True)
    assert records
    for i, rec in enumerate(records):
        assert [s.fused for s in rec.sites] == [True] and rec.mla_nodes == 1 and rec.negs == 0, (i, rec.sites)


class HalvesNearMiss(MLABlock):
    """Two-half stores that are not one store of the row (each must stay two stores, reported)."""

    def __init__(self, variant: str, **kw):
        super().__init__(store="halves", **kw)
        self.variant = variant
        self.register_buffer("seen", torch.zeros(()))

    def _store(self, loc, latent, kv_c, k_pe):
        pool, lat = self.kv_pool, self.shape.kv_lora_rank
        lo, hi = kv_c.unsqueeze(1), k_pe
        if self.variant == "two-scales":  # each half by its own scale
            lo, hi = ((x / scale).to(FP8).view(torch.uint8) for x, scale in ((lo, 0.05), (hi, 0.07)))
        if self.variant == "gap":  # the last latent feature left as it was
            pool[loc, :, :lat - 1] = lo[..., :lat - 1]
        elif self.variant == "broadcast-row":  # the first token's latent broadcast to every row
            pool[loc, :, :lat] = lo[:1]
        else:
            pool[loc, :, :lat] = lo
        if self.variant == "read-between":  # the half-written pool read before the second half
            self.seen.copy_(pool[loc].float().sum())
        pool[loc.roll(1) if self.variant == "other-rows" else loc, :, lat:] = hi


@pytest.mark.parametrize("variant", ["other-rows", *(pytest.param(v, marks=FULL)
                                                    for v in ("read-between", "gap", "two-scales",
                                                              "broadcast-row"))])
def test_two_halves_that_are_not_one_row_are_reported(variant, records, inference):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        block = HalvesNearMiss(variant, **(dict(fp8="uint8") if variant == "two-scales" else {})).eval()
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend=fx_fusion.make_backend(FusionConfig()))
    args = mla_steps(block, decode=())[0]
    for a, e in zip(compiled(*args), eager(*args)):
        torch.testing.assert_close(a, e, atol=OUTPUT_TOL[e.dtype][0], rtol=OUTPUT_TOL[e.dtype][1])
    assert torch.equal(block.kv_pool.view(torch.uint8), eager.kv_pool.view(torch.uint8))
    torch.testing.assert_close(block.seen, eager.seen)  # a sum: Inductor adds in another order
    (rec,) = records
    assert rec.mla_nodes == 0
    assert len(rec.sites) == 1 and not rec.sites[0].fused and not rec.sites[0].disabled, rec.sites
    assert "written in two halves" in rec.sites[0].reason, rec.sites[0].reason


# ------------------------------------------------------------------------------------------------
# transformers DeepseekV3: the latent and the rotated k_pe in two caches
# ------------------------------------------------------------------------------------------------

HF_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), BF16: dict(atol=2e-2, rtol=2e-2)}  # test_hf_models.py's


@pytest.mark.parametrize("interleave, dtype, version", [
    pytest.param(True, torch.float32, 3, id="interleave-fp32"),
    pytest.param(False, BF16, 3, id="rotate_half-bf16"),
    pytest.param(False, torch.float32, 3, id="rotate_half-fp32", marks=FULL),
    pytest.param(True, BF16, 3, id="interleave-bf16", marks=FULL),
    pytest.param(None, torch.float32, 2, id="v2-complex-fp32"),
    pytest.param(None, BF16, 2, id="v2-complex-bf16", marks=FULL),
])
def test_hf_deepseek_v3_two_caches_fuse_every_layer(interleave, dtype, version, records, inference):
    """A prefill and two decode steps of a 2-layer DeepseekV3ForCausalLM (and DeepseekV2ForCausalLM, whose RoPE is a
    complex multiply: k_pe's one head and its per-token table index the same dims, told apart by which operand is
    the complex table): every graph holds one mla_rope_store per layer (both caches, q's cat), the logits and both
    caches of every layer equal eager's (the HF tests' tolerances), the cache rows never written keep their random
    start values."""
    from tests.mla_models import build_deepseek_v3, hf_steps, new_latent_cache, run_hf_steps

    model, config = build_deepseek_v3(interleave, dtype, version=version)
    steps = hf_steps(config)
    ref, cache = new_latent_cache(config, dtype=dtype), new_latent_cache(config, dtype=dtype)
    start = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    expected = run_hf_steps(model, ref, steps)
    compiled = torch.compile(model.forward, backend=fx_fusion.make_backend(RAISE))
    actual = run_hf_steps(compiled, cache, steps)
    tol = HF_TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"step {i} logits: {m}")
    written = sum(s.shape[1] for s in steps)
    for i, (layer, ref_layer, (keys0, values0)) in enumerate(zip(cache.layers, ref.layers, start)):
        torch.testing.assert_close(layer.keys, ref_layer.keys, **tol, msg=lambda m: f"layer {i} latents: {m}")
        torch.testing.assert_close(layer.values, ref_layer.values, **tol, msg=lambda m: f"layer {i} k_pe: {m}")
        assert torch.equal(layer.keys[:, :, written:], keys0[:, :, written:]), f"layer {i}: a latent row changed"
        assert torch.equal(layer.values[:, :, written:], values0[:, :, written:]), f"layer {i}: a k_pe row changed"
        assert not torch.equal(layer.values[:, :, :written], values0[:, :, :written])
    layers = config.num_hidden_layers
    assert len(records) == 2, f"expected a prefill and a decode graph, got {len(records)}"
    for i, rec in enumerate(records):
        assert len(rec.sites) == layers and all(s.fused for s in rec.sites), (
            f"graph {i}: {[(s.store, s.reason) for s in rec.sites]}")
        assert rec.mla_nodes == layers, f"graph {i}: {rec.mla_nodes} mla_rope_store calls"
        assert all("k_pe_store" in s.nodes for s in rec.sites), [s.nodes for s in rec.sites]
