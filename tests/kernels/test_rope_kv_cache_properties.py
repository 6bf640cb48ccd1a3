"""Property tests: the fused RoPE + KV-cache store kernel on random problems, against the float64 reference.

Hypothesis draws the shapes (T up to 40, 1-4 kv heads, 1-4 q heads per kv head, head_dim from
{16, 24, 32, 48, 64, 80}, any even rotary_dim), RoPE style, cache layout and block size, dtypes
(fp8 caches with or without scales), strides (slices of a fused projection, contiguous, or
transposed views), rotary tables (with positions at the table's edges), sliding-window tables and
slot mappings with duplicates, negative and out-of-range entries. Then:

* ``q_out`` and ``k_out`` equal the reference within the dtype's tolerance;
* every cache row no token addresses is byte-identical to before;
* every addressed row equals the reference row of ONE of the tokens that map to it (which one
  survives is unspecified). Under the interpreter programs run one after another, so a whole row
  comes from one token; on a GPU two programs may interleave their stores, so there each element
  is checked on its own.

Profiles: "ci" (25 examples per test, derandomized so CI is reproducible) by default; set
``FX_FUSION_HYPOTHESIS_PROFILE=large`` for 500 random examples per test.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fx_fusion.kernels.rope_kv_cache import FP8_DTYPES, CacheLayout, launch, prepare, reference
from tests.kernels.test_rope_kv_cache import (
    TOLERANCES,
    as_bytes,
    as_float,
    cache_rows,
    exact_fp8_casts_in_interpreter,  # noqa: F401  (autouse fixture, applies to this module too)
    make_qkv,
    poison,
    resolved_slots,
)

_COMMON = dict(deadline=None, print_blob=True,
               # the autouse seed fixture is function-scoped; each example seeds torch from a drawn seed
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("large", max_examples=500, **_COMMON)
# applied per test (not loaded globally): other test modules keep their own settings
PROFILE = settings.get_profile(os.environ.get("FX_FUSION_HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ELEMENTWISE = DEVICE.type == "cuda"  # see the module docstring
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Problem:
    layout: str
    batch: int
    seq: int
    Hq: int
    Hkv: int
    D: int
    rot: int
    is_neox: bool
    dtype: torch.dtype
    cache_dtype: torch.dtype
    scales: str
    qkv: str
    table: str
    max_pos: int
    positions: list
    block_size: int
    n_rows: int
    slots: list
    swa: list | None
    negative_wraps: bool
    return_k: bool
    seed: int


@st.composite
def problems(draw, *, max_slot_span: int | None = None) -> Problem:
    layout = draw(st.sampled_from(["token", "paged", "sequence"]))
    batch = draw(st.integers(1, 3)) if layout == "sequence" else 1
    seq = draw(st.integers(0, 40 // batch))
    Hkv = draw(st.integers(1, 4))
    Hq = Hkv * draw(st.integers(1, 4))
    D = draw(st.sampled_from([16, 24, 32, 48, 64, 80]))
    rot = 2 * draw(st.integers(1, D // 2))
    dtype = draw(st.sampled_from(MODEL_DTYPES))
    cache_dtype = draw(st.sampled_from([dtype, dtype, torch.float8_e4m3fn, torch.float8_e5m2]))
    scales = draw(st.sampled_from(["none", "k", "v", "both"])) if cache_dtype in FP8_DTYPES else "none"
    qkv = draw(st.sampled_from(["4d", "transposed"] if layout == "sequence" else ["fused2d", "3d"]))
    table = draw(st.sampled_from(["packed", "pairs", "per_token"]))
    negative_wraps = draw(st.booleans())

    max_pos = draw(st.integers(1, 64))
    edge = st.one_of(st.just(0), st.just(max_pos - 1), st.integers(0, max_pos - 1))
    if negative_wraps:  # counts from the end of the table
        edge = st.one_of(edge, st.just(-1), st.just(-max_pos), st.integers(-max_pos, -1))
    n_pos = seq * (batch if layout == "sequence" else 1)
    positions = draw(st.lists(edge, min_size=n_pos, max_size=n_pos))

    block_size = draw(st.sampled_from([1, 2, 16])) if layout == "paged" else 1
    n_rows = block_size * draw(st.integers(1, max(1, (seq + 4) // block_size + 1)))
    # a small span of slot values forces duplicates; -3.. and ..span + 2 reach outside the cache
    span = draw(st.integers(1, max_slot_span or max(1, n_rows)))
    swa = None
    if draw(st.booleans()):
        n_swa = draw(st.integers(1, 12))
        swa = draw(st.lists(st.integers(-2, n_rows + 1), min_size=n_swa, max_size=n_swa))
        span = min(span, n_swa)
    slots = draw(st.lists(st.integers(-3, span + 1), min_size=seq, max_size=seq))
    return Problem(layout, batch, seq, Hq, Hkv, D, rot, draw(st.booleans()), dtype, cache_dtype, scales, qkv, table,
                   max_pos, positions, block_size, n_rows, slots, swa, negative_wraps, draw(st.booleans()),
                   draw(st.integers(0, 2**31 - 1)))


def build(pr: Problem) -> dict:
    """Keyword arguments for ``prepare``: random data from the problem's seed, poisoned caches."""
    torch.manual_seed(pr.seed)
    sequence = pr.layout == "sequence"
    q, k, v = make_qkv(pr.qkv, batch=pr.batch, T=pr.seq, Hq=pr.Hq, Hkv=pr.Hkv, D=pr.D, sequence=sequence,
                       dtype=pr.dtype, device=DEVICE)
    if pr.layout == "token":
        shape = (pr.n_rows, pr.Hkv, pr.D)
    elif pr.layout == "paged":
        shape = (pr.n_rows // pr.block_size, pr.block_size, pr.Hkv, pr.D)
    else:
        shape = (pr.batch, pr.Hkv, pr.n_rows, pr.D)
    k_cache, v_cache = (torch.empty(shape, dtype=pr.cache_dtype, device=DEVICE) for _ in range(2))
    poison(k_cache)
    poison(v_cache)

    half = pr.rot // 2
    lead = (pr.batch, pr.seq) if sequence else (pr.seq,)
    positions = torch.tensor(pr.positions, dtype=torch.int64, device=DEVICE).reshape(lead)
    if pr.table == "packed":  # cos_sin_cache [P, rot] split into halves
        csc = torch.rand(pr.max_pos, pr.rot, device=DEVICE) * 2 - 1
        cos, sin = csc[:, :half], csc[:, half:]
    elif pr.table == "pairs":  # freqs_cis [P, rot/2, 2] strided views
        fc = torch.rand(pr.max_pos, half, 2, device=DEVICE) * 2 - 1
        cos, sin = fc[..., 0], fc[..., 1]
    else:  # arbitrary per-token, per-element values [T, rot] / [B, S, rot]
        cos, sin = ((torch.rand(*lead, pr.rot, device=DEVICE) * 2 - 1).to(pr.dtype) for _ in range(2))
        positions = None
    scale = {"k": (0.5, None), "v": (None, 3.0), "both": (0.25, 2.0), "none": (None, None)}[pr.scales]
    k_scale, v_scale = (None if s is None else torch.tensor([s], device=DEVICE) for s in scale)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                slot_mapping=torch.tensor(pr.slots, dtype=torch.int64, device=DEVICE),
                cos=cos, sin=sin, positions=positions,
                swa_table=None if pr.swa is None else torch.tensor(pr.swa, dtype=torch.int32, device=DEVICE),
                k_scale=k_scale, v_scale=v_scale, is_neox=pr.is_neox, rotary_dim=pr.rot, layout=pr.layout,
                negative_wraps=pr.negative_wraps)


def per_token_rows(p) -> tuple[torch.Tensor, torch.Tensor]:
    """What each token (b, s) stores, [B, S, Hkv, D] in the cache dtype: the reference run with distinct slots."""
    batch, seq = p.q.shape[:2]
    hkv, d = p.k.shape[2:]
    if p.options.layout is CacheLayout.SEQUENCE:
        scratch = [torch.zeros(batch, hkv, seq, d, dtype=p.k_cache.dtype, device=DEVICE) for _ in range(2)]
        layout = CacheLayout.SEQUENCE
    else:
        scratch = [torch.zeros(seq, hkv, d, dtype=p.k_cache.dtype, device=DEVICE) for _ in range(2)]
        layout = CacheLayout.TOKEN
    distinct = torch.arange(seq, device=DEVICE)[None]
    reference(dataclasses.replace(p, k_cache=scratch[0], v_cache=scratch[1], slot_mapping=distinct, swa_table=None,
                                  options=dataclasses.replace(p.options, layout=layout)), False)
    if layout is CacheLayout.SEQUENCE:
        return tuple(c.transpose(1, 2) for c in scratch)
    return tuple(c[None] for c in scratch)


def close(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    atol, rtol = TOLERANCES[got.dtype]
    g, w = as_float(got), as_float(want)
    return (g - w).abs() <= atol + rtol * w.abs()


def check(args: dict, return_k: bool) -> None:
    p = prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    q_ref, k_ref = reference(dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone()), return_k)
    q_out = torch.full(p.q_shape, float("nan"), dtype=p.q.dtype, device=DEVICE)
    k_out = torch.full(p.k_shape, float("nan"), dtype=p.k.dtype, device=DEVICE) if return_k else None
    launch(p, q_out, k_out)

    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol, msg=lambda m: f"q_out: {m}")
    if return_k:
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol, msg=lambda m: f"k_out: {m}")

    # which tokens write which cache row (row = b * n_slots + slot in cache_rows order)
    c = p.k_cache
    n_slots = c.shape[0] * c.shape[1] if p.options.layout is CacheLayout.PAGED else (
        c.shape[2] if p.options.layout is CacheLayout.SEQUENCE else c.shape[0])
    batch, seq = p.q.shape[:2]
    slots = resolved_slots(p.slot_mapping, p.swa_table, n_slots, p.options.negative_wraps).tolist()
    writers: dict[int, list[tuple[int, int]]] = {}
    for b in range(batch):
        for s, slot in enumerate(slots):
            if slot >= 0:
                writers.setdefault(b * n_slots + slot, []).append((b, s))
    n_rows = (batch if p.options.layout is CacheLayout.SEQUENCE else 1) * n_slots
    addressed = torch.zeros(n_rows, dtype=torch.bool, device=DEVICE)
    addressed[list(writers)] = True

    expected = per_token_rows(p) if writers else (None, None)
    for name, cache, old, want in (("k_cache", p.k_cache, before[0], expected[0]),
                                   ("v_cache", p.v_cache, before[1], expected[1])):
        got_rows, old_rows = cache_rows(cache, p.options.layout), cache_rows(old, p.options.layout)
        untouched = ~addressed
        assert torch.equal(as_bytes(got_rows)[untouched], as_bytes(old_rows)[untouched]), \
            f"{name}: a row no token addresses changed"
        for row, tokens in writers.items():
            candidates = torch.stack([want[b, s] for b, s in tokens])  # [C, Hkv, D]
            ok = close(got_rows[row].expand_as(candidates), candidates)
            ok = ok.any(0).all() if ELEMENTWISE else ok.flatten(1).all(1).any()
            assert ok, f"{name} row {row} matches none of the tokens {tokens} that map to it"


@PROFILE
@given(problems())
def test_kernel_matches_reference(pr):
    check(build(pr), pr.return_k)


@PROFILE
@given(problems(max_slot_span=3))
def test_duplicate_slots_keep_one_token(pr):
    """Many tokens on very few slots: each written row is one of its writers' rows."""
    check(build(pr), pr.return_k)
