"""Model code written as Meta's Llama reference writes it: RoPE through complex numbers, caches written through slices
with a Python ``start_pos``. Fused on every layer of every step and equal to eager.

The decoder is ``tests/reference_blocks.py``; its caches start random, so a write to a row no step stores shows when
the whole caches are compared with eager's. The complex rotation's exactness is checked on small functions that take
q, k and v as inputs (nothing else in the graph rounds differently from eager there): fp32 results equal to the bit.

Eager's complex multiply on a CPU computes ``(ac - bd) + (ad + bc)i`` with every product rounded (its vectorised
loop), but the scalar loop that finishes a row shorter than two vectors contracts to FMAs. The fused op computes the
former; ``vectorised_complex_mul`` says whether eager does on the shapes used, and the bit-exact checks run only then.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fx_fusion import FusionConfig, RopeKVFusionPass
from fx_fusion.patterns.complex_rope import canonicalize_complex_rope
from tests.patterns.test_cache_forms import check_every_layer_fused
from tests.patterns.test_rope_kv_store import (FUSED_CALL, RAISE, assert_close, compile_with, inference,  # noqa: F401
                                               records, run_steps)
from tests.reference_blocks import (HEAD_DIM, KV_HEADS, HEADS, LAYERS, VOCAB, Transformer,
                                    apply_rotary_emb, precompute_freqs_cis, reference_steps)

OUTPUT_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (6e-2, 5e-2)}
CACHE_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1.6e-2)}


def vectorised_complex_mul(x_shape, table_shape) -> bool:
    """Whether eager's complex64 multiply of these broadcast shapes equals the product with every term rounded."""
    g = torch.Generator().manual_seed(0)
    x = torch.view_as_complex(torch.randn(*x_shape, 2, generator=g))
    t = torch.view_as_complex(torch.randn(*table_shape, 2, generator=g))
    a, b, c, d = x.real, x.imag, t.real, t.imag
    return torch.equal(torch.view_as_real(x * t), torch.stack((a * c - b * d, a * d + b * c), -1))


# ---- the decoder -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("max_batch", [2, 3], ids=["full batch", "batch slice"])
def test_reference_decoder_fuses_every_layer(max_batch, cache_layout, dtype, records, codes, inference):
    """Prefill at ``start_pos = 0``, then two decode steps (one graph with a symbolic ``start_pos``): every layer of
    every graph fused, the op writing the caches' own memory; logits and whole caches equal to eager, and the rows no
    step wrote (later positions, batch rows past ``bsz``) still hold their random values."""
    torch.manual_seed(0)
    model = Transformer(max_batch=max_batch, cache_layout=cache_layout, dtype=dtype).eval()
    eager = copy.deepcopy(model)
    poison = {n: b.clone() for n, b in model.caches().items()}
    steps = reference_steps(batch=2, prefill=5, decode=2)
    run_steps(model, eager, compile_with(model), steps, bf16_anywhere=dtype is torch.bfloat16)
    assert len(records) == 2, "prefill and one decode graph for both decode steps"
    check_every_layer_fused(records, codes, LAYERS, list(model.caches().values()))
    assert {s.layout for r in records for s in r.fused} == {"sequence"}
    assert {s.style for r in records for s in r.fused} == {"gptj"}
    written, seq_dim = 5 + 2, 1 if cache_layout == "bshd" else 2
    for name, cache in model.caches().items():
        rest = cache.shape[seq_dim] - written
        assert torch.equal(cache.narrow(seq_dim, written, rest), poison[name].narrow(seq_dim, written, rest)), \
            f"{name}: a position past the last step was written"
        assert torch.equal(cache[2:], poison[name][2:]), f"{name}: a batch row past bsz was written"


def test_prompts_of_several_lengths_fuse(records, inference):
    """A second request with a longer prompt recompiles the prefill with a symbolic token count (and decode keeps
    its symbolic ``start_pos``): every graph fused, logits and whole caches equal to eager."""
    torch.manual_seed(0)
    model = Transformer().eval()
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    steps = [(torch.randint(0, VOCAB, (2, n), generator=g), start) for n, start in ((5, 0), (1, 5), (7, 0), (1, 7),
                                                                                     (4, 0), (1, 4))]
    run_steps(model, eager, compile_with(model), steps)
    assert len(records) == 3 and all(len(r.fused) == LAYERS and not r.unfused for r in records), \
        [[s.reason for s in r.unfused] for r in records]


# ---- the rotation alone: exact --------------------------------------------------------------


def _complex_rope_sequence_store(xq, xk, xv, freqs_cis, k_cache, v_cache, pos):
    """gpt-fast's store ``cache[:, :, pos] = k`` of a complex RoPE (a form whose store fused before)."""
    q, k = apply_rotary_emb(xq, xk, freqs_cis[pos])
    k_cache[:, :, pos] = k.transpose(1, 2)
    v_cache[:, :, pos] = xv.transpose(1, 2)
    return q


def _complex_rope_slice_store(xq, xk, xv, freqs_cis, k_cache, v_cache, start: int):
    """Meta's store ``cache[:bsz, start:start + T] = k`` of a complex RoPE, ``freqs_cis[start:start + T]``."""
    bsz, seqlen = xq.shape[:2]
    q, k = apply_rotary_emb(xq, xk, freqs_cis[start:start + seqlen])
    k_cache[:bsz, start:start + seqlen] = k
    v_cache[:bsz, start:start + seqlen] = xv
    return q


def _run_exact(fn, dtype, table, records, *, cache_shape, index, tokens=5, batch=2):
    """Run ``fn`` compiled and eagerly at ``index`` (positions or a start): q and both caches compared exactly in
    fp32 when eager's complex multiply is vectorised on these shapes, else within the dtype's tolerance."""
    g = torch.Generator().manual_seed(1)
    xq = torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=g).to(dtype)
    xk = torch.randn(batch, tokens, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    xv = torch.randn(batch, tokens, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    caches = [torch.randn(cache_shape, generator=g).to(dtype) for _ in range(2)]
    mine = [c.clone() for c in caches]
    out = compile_with(fn)(xq, xk, xv, table, *mine, index)
    ref = fn(xq, xk, xv, table, *caches, index)
    exact = dtype is torch.float32 and vectorised_complex_mul(
        xq.shape[:-1] + (HEAD_DIM // 2,), (1, tokens, 1, HEAD_DIM // 2)) and vectorised_complex_mul(
        xk.shape[:-1] + (HEAD_DIM // 2,), (1, tokens, 1, HEAD_DIM // 2))
    for what, a, e in (("q", out, ref), ("k_cache", mine[0], caches[0]), ("v_cache", mine[1], caches[1])):
        if exact:
            assert torch.equal(a, e), f"{what}: max diff {(a - e).abs().max()}"
        else:
            assert_close(a, e, CACHE_TOL, what)
    assert len(records) == 1 and len(records[0].fused) == 1 and not records[0].unfused, \
        [s.reason for r in records for s in r.sites]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_into_a_sequence_cache_is_exact(dtype, records, inference):
    table = precompute_freqs_cis(HEAD_DIM, 64)
    _run_exact(_complex_rope_sequence_store, dtype, table, records, cache_shape=(2, KV_HEADS, 32, HEAD_DIM),
               index=torch.arange(7, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_into_a_slice_of_the_cache_is_exact(dtype, records, inference):
    table = precompute_freqs_cis(HEAD_DIM, 64)
    _run_exact(_complex_rope_slice_store, dtype, table, records, cache_shape=(3, 32, KV_HEADS, HEAD_DIM), index=9)


def test_table_that_is_not_unit_modulus_is_fused_exactly(records, inference):
    """A complex multiply by any per-position table (not a rotation: random moduli) is the same arithmetic: fused,
    and equal to eager."""
    table = torch.view_as_complex(torch.randn(64, HEAD_DIM // 2, 2) * 3)
    _run_exact(_complex_rope_sequence_store, torch.float32, table, records, cache_shape=(2, KV_HEADS, 32, HEAD_DIM),
               index=torch.arange(3, 8))


def test_table_per_head_is_reported_not_fused(records, inference):
    """A complex multiply by a table that varies per head is not a RoPE the op computes: the site is reported with
    the reason, and the graph keeps eager's complex multiply (results equal to the bit)."""

    def fn(xq, xk, xv, table, k_cache, v_cache, pos):
        rows = table[pos][None]  # [1, S, Hkv, D/2]: per head (q has Hkv heads too)
        q, k = (torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rows).flatten(3)
                for x in (xq, xk))
        k_cache[:, :, pos] = k.transpose(1, 2)
        v_cache[:, :, pos] = xv.transpose(1, 2)
        return q

    g = torch.Generator().manual_seed(2)
    xq, xk, xv = (torch.randn(2, 5, KV_HEADS, HEAD_DIM, generator=g) for _ in range(3))
    table = torch.view_as_complex(torch.randn(64, KV_HEADS, HEAD_DIM // 2, 2, generator=g))
    caches = [torch.randn(2, KV_HEADS, 32, HEAD_DIM, generator=g) for _ in range(2)]
    mine = [c.clone() for c in caches]
    pos = torch.arange(4, 9)
    out = compile_with(fn, FusionConfig())(xq, xk, xv, table, *mine, pos)
    ref = fn(xq, xk, xv, table, *caches, pos)
    assert torch.equal(out, ref) and all(torch.equal(a, e) for a, e in zip(mine, caches))
    sites = [s for r in records for s in r.sites]
    assert len(sites) == 1 and not sites[0].fused and "per head" in sites[0].reason, [s.reason for s in sites]


def test_unfused_complex_rope_leaves_the_graph_as_it_was(inference):
    """Where nothing fuses, the rewrite into real pairs is undone: the pass leaves the graph's code unchanged (the
    complex multiply stays eager's, which Inductor runs through ATen)."""
    graphs = []

    def capture(graph):
        graphs.append(graph.python_code("self").src)
        RopeKVFusionPass(FusionConfig())(graph)
        graphs.append(graph.python_code("self").src)

    def fn(xk, table):  # a complex RoPE stored nowhere: no site
        xk_ = torch.view_as_complex(xk.reshape(*xk.shape[:-1], -1, 2))
        return torch.view_as_real(xk_ * table).flatten(3) * 2

    with torch._inductor.config.patch(post_grad_custom_post_pass=capture):
        torch.compile(fn)(torch.randn(2, 5, KV_HEADS, HEAD_DIM), precompute_freqs_cis(HEAD_DIM, 5)[None, :, None])
    assert len(graphs) == 2 and "view_as_real" in graphs[0] and graphs[1] == graphs[0]


def test_canonicalize_complex_rope_rewrites_and_restores():
    """The rule on its own: the complex multiply's users read the real form; ``restore`` puts the graph back."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(x, t):
        return torch.view_as_real(torch.view_as_complex(x) * t).flatten(-2)

    with FakeTensorMode() as mode:
        x = torch.empty(5, 2, 8, 2)
        t = torch.empty(5, 1, 8, dtype=torch.complex64)
        gm = make_fx(fn)(x, t)
    del mode
    before = gm.graph.python_code("self").src
    rewrites = canonicalize_complex_rope(gm.graph)
    assert len(rewrites.rewrites) == 1
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.sub.Tensor in targets and torch.ops.aten.cat.default in targets
    rewrites.restore()
    assert gm.graph.python_code("self").src == before


def test_store_through_a_symbolic_slice_is_named_as_one(records, inference):
    """``cache[:, s:s + 8][:, pos] = k`` with a symbolic ``s`` is not a form the op writes (an index into a window of
    the cache); the reason names it as the slice it is, not as 'a view that is not a select/slice'."""

    def fn(xq, xk, xv, table, k_cache, v_cache, start: int, pos):
        q, k = apply_rotary_emb(xq, xk, table[pos + start])
        k_cache[:, start:start + 8][:, pos] = k
        v_cache[:, start:start + 8][:, pos] = xv
        return q

    g = torch.Generator().manual_seed(4)
    table = precompute_freqs_cis(HEAD_DIM, 64)
    compiled = compile_with(fn, FusionConfig())
    for start in (0, 3):
        xq = torch.randn(2, 5, HEADS, HEAD_DIM, generator=g)
        xk, xv = (torch.randn(2, 5, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2))
        caches = [torch.randn(2, 32, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2)]
        mine = [c.clone() for c in caches]
        pos = torch.arange(5)
        assert torch.equal(compiled(xq, xk, xv, table, *mine, start, pos), fn(xq, xk, xv, table, *caches, start, pos))
        assert all(torch.equal(a, e) for a, e in zip(mine, caches))
    assert len(records) == 2
    reasons = [s.reason for s in records[1].sites]
    assert reasons and all("slice of the graph input" in r and "symbolic bounds" in r for r in reasons), reasons


def test_complex_table_built_in_the_graph_and_reshaped_per_call_fuses(records, inference):
    """``freqs_cis = polar(ones, outer(t, inv_freq))`` computed in the graph, reshaped once for q and once for k: one
    table (the two reshapes are the same view of it), fused; q and the caches equal to eager's to the bit."""

    def rope(x, f):
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * f.view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)

    def step(xq, xk, xv, k_cache, v_cache, start: int):
        seqlen = xq.shape[1]
        t = torch.arange(start, start + seqlen, dtype=torch.float32)
        freqs = torch.outer(t, 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)))
        table = torch.polar(torch.ones_like(freqs), freqs)
        q, k = rope(xq, table), rope(xk, table)
        k_cache[:2, start:start + seqlen] = k
        v_cache[:2, start:start + seqlen] = xv
        return q

    g = torch.Generator().manual_seed(5)
    caches = [torch.randn(3, 32, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2)]
    mine = [c.clone() for c in caches]
    compiled = compile_with(step)
    for tokens, start in ((5, 0), (1, 5), (1, 6)):
        xq = torch.randn(2, tokens, HEADS, HEAD_DIM, generator=g)
        xk, xv = (torch.randn(2, tokens, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2))
        assert torch.equal(compiled(xq, xk, xv, *mine, start), step(xq, xk, xv, *caches, start))
        assert all(torch.equal(a, e) for a, e in zip(mine, caches)), f"caches at start {start}"
    assert len(records) == 2 and all(len(r.fused) == 1 and not r.unfused for r in records)
