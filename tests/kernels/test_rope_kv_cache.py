"""The fused RoPE + KV-cache store kernel against its float64 reference, whole caches compared.

Every test runs the real Triton kernel (``prepare`` then ``launch``; through the interpreter on CPU)
and the plain-torch ``reference`` on copies of the same caches, then checks:

* ``q_out`` / ``k_out`` (filled with NaN before the launch) against the reference, within the
  tolerance of the output dtype;
* every cache row the slot mapping addresses (worked out here, independently of the reference)
  against the reference's row, within the tolerance of the cache dtype;
* every other cache row byte-identical to before the launch. Caches start poisoned: NaN for float
  caches, random bytes for fp8 ones, so a missed or stray write shows up;
* when a cache is a view of a larger buffer, every byte of the buffer outside the two cache views.

Cost: the interpreter runs one Python iteration per program (a few ms each), so the full cross
product of the odd shapes is out of reach. ``test_shapes_styles_layouts`` stacks head counts x
head_dim x RoPE style x layout for T in {0, 1, 5}; ``test_many_tokens`` covers T = 333 with a
handful of hand-picked cases that together visit every head count, head_dim, style and layout once;
the other tests each vary one axis (dtypes, fp8, tables, partial rotary, sliding-window tables,
negative slots, strides, launch configuration) on small problems.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
import triton

from fx_fusion.kernels import launch as kernel_launch
from fx_fusion.kernels import rope_kv_cache as rkc
from fx_fusion.kernels import rope_kv_kernel
from fx_fusion.kernels.rope_kv_cache import FP8_DTYPES, CacheLayout, launch, launch_config, prepare, reference

# (atol, rtol) per dtype: the kernel rounds an fp32 result once, the reference a float64 one, so
# they may differ by one unit in the last place of the storage dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
    # fp8: one unit in the last place (3 mantissa bits for e4m3, 2 for e5m2), plus the subnormal step
    torch.float8_e4m3fn: (2.0**-8, 0.13),
    torch.float8_e5m2: (2.0**-15, 0.26),
}
MAX_POSITION = 4096
BLOCK_SIZE = 16  # paged layout
LAYOUTS = ("token", "paged", "sequence")


INTERPRETED = type(rope_kv_kernel._rope_kv_store_kernel).__name__ == "InterpretedFunction"


@pytest.fixture(autouse=True)
def exact_fp8_casts_in_interpreter(monkeypatch):
    """Round fp32 -> fp8 casts to nearest even in the Triton interpreter, as the hardware does.

    The interpreter's software cast ORs the rounding carry into the exponent instead of adding it,
    so a value that rounds up to the next power of two loses it whenever the exponent is odd
    (1.97 -> 1.0 and 126.2 -> 64 in e4m3, 7.9 -> 4.0 in e5m2; triton-lang/triton#8322). That is a
    bug of the CPU emulation, not of the kernel: on CPU the fp8 tests cast through torch instead.
    """
    interpreter = sys.modules.get("triton.runtime.interpreter")
    if not INTERPRETED or not hasattr(interpreter, "_convert_float"):
        yield
        return
    import triton.language as tl

    original = interpreter._convert_float
    to_torch = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in to_torch:
            x = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32))
            return x.to(to_torch[output_dtype]).view(torch.uint8).numpy().reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)
    yield


# --------------------------------------------------------------------------------------------------
# Building problems
# --------------------------------------------------------------------------------------------------


def rope_angles(positions: torch.Tensor, half: int) -> torch.Tensor:
    """[..., half] float64 angles ``position * base^(-2i/rot)``, as every model computes them."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    return positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)


def make_qkv(form: str, *, batch: int, T: int, Hq: int, Hkv: int, D: int, sequence: bool, dtype, device):
    """q, k, v in one of the forms the kernel takes.

    flat layouts:   "fused2d"   [T, H*D] slices of one [T, (Hq + 2 Hkv) * D] projection (non-contiguous)
                    "3d"        contiguous [T, H, D]
                    "fused3d"   [T, H, D] slices of one [T, Hq + 2 Hkv, D] tensor
                    "strided3d" [T, H, D] with feature stride 2
    sequence:       "4d"        contiguous [B, S, H, D]
                    "transposed" [B, H, S, D] tensors seen as [B, S, H, D]
                    "fused4d"   [B, S, H, D] views of slices of one [B, S, (Hq + 2 Hkv) * D] projection
    """
    heads = (Hq, Hkv, Hkv)
    lead = (batch, T) if sequence else (T,)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    if form in ("fused2d", "fused4d"):
        parts = randn(*lead, sum(heads) * D).split([h * D for h in heads], dim=-1)
        return parts if form == "fused2d" else tuple(x.unflatten(-1, (h, D)) for x, h in zip(parts, heads))
    if form in ("3d", "4d"):
        return tuple(randn(*lead, h, D) for h in heads)
    if form == "fused3d":
        return randn(*lead, sum(heads), D).split(list(heads), dim=-2)
    if form == "strided3d":
        return tuple(randn(*lead, h, 2 * D)[..., 1::2] for h in heads)
    if form == "transposed":
        return tuple(randn(batch, h, T, D).transpose(1, 2) for h in heads)
    raise AssertionError(form)


def cache_shape(layout: str, *, n_rows: int, Hkv: int, D: int, batch: int) -> tuple[int, ...]:
    if layout == "token":
        return (n_rows, Hkv, D)
    if layout == "paged":
        return (n_rows // BLOCK_SIZE, BLOCK_SIZE, Hkv, D)
    return (batch, Hkv, n_rows, D)


def make_caches(form: str, layout: str, *, n_rows: int, Hkv: int, D: int, batch: int, dtype, device):
    """k_cache, v_cache poisoned (NaN, or random bytes for fp8), in one of these memory forms.

    "contiguous"   two tensors
    "fused"        two views of one buffer with a k/v axis before the last two (one kv allocation)
    "head_major"   heads outside the rows: [Hkv, N, D] seen as [N, Hkv, D], paged HND, sequence BSHD
    "padded"       rows padded to D + 8 features (views with a longer row stride)
    """
    shape = cache_shape(layout, n_rows=n_rows, Hkv=Hkv, D=D, batch=batch)
    head_axis = len(shape) - 2 if layout != "sequence" else 1
    row_axis = 0 if layout == "token" else (1 if layout == "paged" else 2)
    if form == "contiguous":
        buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
        caches = buffers
    elif form == "fused":
        buf = torch.empty((*shape[:-2], 2, *shape[-2:]), dtype=dtype, device=device)
        buffers, caches = [buf], list(buf.unbind(-3))
    elif form == "head_major":
        perm = list(range(len(shape)))
        perm[head_axis], perm[row_axis] = perm[row_axis], perm[head_axis]
        stored = [shape[i] for i in perm]
        buffers = [torch.empty(stored, dtype=dtype, device=device) for _ in range(2)]
        caches = [b.permute(perm) for b in buffers]  # the permutation is its own inverse
    elif form == "padded":
        buffers = [torch.empty((*shape[:-1], shape[-1] + 8), dtype=dtype, device=device) for _ in range(2)]
        caches = [b[..., :D] for b in buffers]
    else:
        raise AssertionError(form)
    for b in buffers:
        poison(b)
    return caches[0], caches[1]


def poison(t: torch.Tensor) -> None:
    """NaN for float tensors, random bytes for fp8 (NaN encodings included)."""
    if t.dtype in FP8_DTYPES:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=t.device))
    else:
        t.fill_(float("nan"))


def make_rotary(kind: str, *, T: int, batch: int, sequence: bool, rot: int, is_neox: bool, dtype,
                table_dtype, pos_dtype, device):
    """(cos, sin, positions) in one of the forms the kernel takes.

    With positions (tables [P, R'] indexed by the token's position):
        "packed"        SGLang/vLLM cos_sin_cache [P, rot] split into its cos and sin halves [P, rot/2]
        "pairs"         gpt-fast freqs_cis [P, rot/2, 2]: cos = [..., 0], sin = [..., 1] (stride 2)
        "packed_pos_b1" (sequence) packed, positions [1, S] shared by the batch
        "packed_pos_s"  (sequence) packed, positions [S]
    Per token (no positions):
        "hf"            HF cos, sin [T, rot] or [B, S, rot]: halves (NeoX) or pairs (GPT-J) duplicated
        "hf_b1"         HF [1, S, rot] (shared by the batch); [1, T, rot] for flat layouts
        "hf_2d"         (sequence) HF [S, rot]
        "pairs_per_token" one value per pair, [T, rot/2] or [B, S, rot/2]
        "random"        arbitrary per-element values [T, rot] or [B, S, rot] (catches swapped halves)
    """
    half = rot // 2
    lead = (batch, T) if sequence else (T,)
    positions = torch.randint(0, MAX_POSITION, lead, dtype=pos_dtype, device=device)
    if kind.startswith("packed"):
        ang = rope_angles(torch.arange(MAX_POSITION, device=device), half)
        csc = torch.cat([ang.cos(), ang.sin()], dim=-1).to(table_dtype)
        if kind == "packed_pos_b1":
            positions = positions[:1]
        elif kind == "packed_pos_s":
            positions = positions[0]
        return csc[:, :half], csc[:, half:], positions
    if kind == "pairs":
        ang = rope_angles(torch.arange(MAX_POSITION, device=device), half)
        freqs_cis = torch.stack([ang.cos(), ang.sin()], dim=-1).to(table_dtype)
        return freqs_cis[..., 0], freqs_cis[..., 1], positions
    if kind in ("hf", "hf_b1", "hf_2d"):
        if kind != "hf":
            positions = positions[:1] if sequence else positions[None]
        ang = rope_angles(positions, half)
        full = torch.cat([ang, ang], dim=-1) if is_neox else ang.repeat_interleave(2, dim=-1)
        cos, sin = full.cos().to(dtype), full.sin().to(dtype)
        if kind == "hf_2d":
            cos, sin = cos[0], sin[0]
        return cos, sin, None
    if kind == "pairs_per_token":
        ang = rope_angles(positions, half)
        return ang.cos().to(table_dtype), ang.sin().to(table_dtype), None
    if kind == "random":
        cos, sin = (torch.rand(*lead, rot, device=device) * 2 - 1 for _ in range(2))
        return cos.to(table_dtype), sin.to(table_dtype), None
    raise AssertionError(kind)


def make_args(device, *, T=9, Hq=4, Hkv=2, D=64, rot=None, layout="token", batch=1, dtype=torch.float16,
              cache_dtype=None, qkv=None, cache_form="contiguous", table="packed", table_dtype=torch.float32,
              pos_dtype=torch.int64, slot_dtype=torch.int64, is_neox=True, spare_rows=7) -> dict:
    """Keyword arguments for ``prepare``: fresh random q/k/v, poisoned caches, distinct slots.

    ``T`` is the number of tokens for flat layouts and the sequence length S for the sequence layout
    (``batch`` sequences). The caches have ``spare_rows`` (or more) rows no token addresses.
    """
    sequence = layout == "sequence"
    rot = D if rot is None else rot
    qkv = qkv or ("4d" if sequence else "fused2d")
    q, k, v = make_qkv(qkv, batch=batch, T=T, Hq=Hq, Hkv=Hkv, D=D, sequence=sequence, dtype=dtype,
                       device=device)
    n_rows = T + spare_rows
    if layout == "paged":
        n_rows = math.ceil(n_rows / BLOCK_SIZE) * BLOCK_SIZE
    k_cache, v_cache = make_caches(cache_form, layout, n_rows=n_rows, Hkv=Hkv, D=D, batch=batch,
                                   dtype=cache_dtype or dtype, device=device)
    slot_mapping = torch.randperm(n_rows, device=device)[:T].to(slot_dtype)
    cos, sin, positions = make_rotary(table, T=T, batch=batch, sequence=sequence, rot=rot, is_neox=is_neox,
                                      dtype=dtype, table_dtype=table_dtype, pos_dtype=pos_dtype, device=device)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping, cos=cos, sin=sin,
                positions=positions, swa_table=None, k_scale=None, v_scale=None, q_scale=None, is_neox=is_neox,
                rotary_dim=rot, layout=layout)


# --------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------


def cache_rows(cache: torch.Tensor, layout: CacheLayout) -> torch.Tensor:
    """A contiguous copy of a cache as [rows, Hkv, D]; row = slot (flat layouts), b * max_seq + slot."""
    if layout is CacheLayout.TOKEN:
        return cache.contiguous()
    if layout is CacheLayout.PAGED:
        return cache.reshape(-1, *cache.shape[2:]).contiguous()
    return cache.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3]).contiguous()


def resolved_slots(slot_mapping: torch.Tensor, swa_table: torch.Tensor | None, n_slots: int,
                   negative_wraps: bool = False) -> torch.Tensor:
    """[S] int64 cache slot of every token (position s), -1 where nothing is stored.

    Negative entries, at either level, skip the store; with ``negative_wraps`` they count from the
    end of their table instead, as eager ``k_cache[swa_table[loc]] = k`` does. Entries outside
    their table are skipped either way.
    """
    def wrap(x: torch.Tensor, n: int) -> torch.Tensor:
        return torch.where(x < 0, x + n, x) if negative_wraps else x

    slots = slot_mapping.reshape(-1).long()
    if swa_table is not None:
        n_swa = swa_table.shape[0]
        slots = wrap(slots, n_swa)
        inside = (slots >= 0) & (slots < n_swa)
        slots = torch.where(inside, swa_table[slots.clamp(0, max(n_swa - 1, 0))].long(), -(2**62))
    slots = wrap(slots, n_slots)
    return torch.where((slots >= 0) & (slots < n_slots), slots, -1)


def slots_per_row(p: rkc.RopeKVProblem) -> int:
    c, layout = p.k_cache, p.options.layout
    return c.shape[0] * c.shape[1] if layout is CacheLayout.PAGED else (
        c.shape[2] if layout is CacheLayout.SEQUENCE else c.shape[0])


def addressed_rows(p: rkc.RopeKVProblem) -> torch.Tensor:
    """Bool [rows] over ``cache_rows``: the rows some token writes."""
    n_slots = slots_per_row(p)
    slots = resolved_slots(p.slot_mapping, p.swa_table, n_slots, p.options.negative_wraps)
    slots = slots[slots >= 0]
    n_batches = p.k_cache.shape[0] if p.options.layout is CacheLayout.SEQUENCE else 1
    mask = torch.zeros(n_batches, n_slots, dtype=torch.bool, device=slots.device)
    mask[:, slots] = True
    return mask.reshape(-1)


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in FP8_DTYPES else x.double()


def assert_cache(name: str, got: torch.Tensor, before: torch.Tensor, want: torch.Tensor, addressed: torch.Tensor,
                 layout: CacheLayout) -> None:
    """Rows not addressed byte-identical to ``before``; addressed rows close to ``want``."""
    got_rows, before_rows, want_rows = (cache_rows(c, layout) for c in (got, before, want))
    untouched = ~addressed
    changed = (as_bytes(got_rows)[untouched] != as_bytes(before_rows)[untouched]).flatten(1).any(1)
    assert not changed.any(), (f"{name}: {int(changed.sum())} rows no token addresses were written, e.g. row "
                               f"{int(untouched.nonzero()[changed][0])}")
    atol, rtol = TOLERANCES[got.dtype]
    torch.testing.assert_close(as_float(got_rows[addressed]), as_float(want_rows[addressed]), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}, addressed rows: {m}")


def base_of(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def assert_outside_views_unchanged(views: list[torch.Tensor], snapshots: dict[int, torch.Tensor]) -> None:
    """Bytes of the caches' buffers that belong to neither cache view must not change."""
    for key, before in snapshots.items():
        base = next(base_of(v) for v in views if id(base_of(v)) == key)
        covered = torch.zeros(base.numel(), dtype=torch.bool, device=base.device)
        for v in views:
            if base_of(v) is base:
                covered.as_strided(v.shape, v.stride(), v.storage_offset() - base.storage_offset()).fill_(True)
        got = as_bytes(base).reshape(base.numel(), -1)[~covered]
        assert torch.equal(got, as_bytes(before).reshape(base.numel(), -1)[~covered]), \
            "bytes of the cache buffers outside the cache views changed"


def run_and_check(args: dict, *, return_k: bool = True, out_form: str = "contiguous", **config):
    """Prepare, launch the kernel on poisoned outputs, compare everything with the float64 reference.

    Returns (problem, q_out, k_out, caches before the launch) for extra checks.
    """
    p = prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    snapshots = {id(base_of(c)): base_of(c).clone() for c in (p.k_cache, p.v_cache) if c._base is not None}
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, k_ref = reference(ref, return_k, compute_dtype=torch.float64)

    def poisoned(shape):
        if out_form == "contiguous":
            return torch.full(shape, float("nan"), dtype=p.q.dtype, device=p.q.device)
        # a view with a longer last-but-one stride, as when outputs are slices of a larger buffer
        wide = torch.full((*shape[:-1], shape[-1] + 3), float("nan"), dtype=p.q.dtype, device=p.q.device)
        return wide[..., :shape[-1]]

    q_out = poisoned(p.q_shape)
    k_out = poisoned(p.k_shape) if return_k else None
    launch(p, q_out, k_out, **config)

    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol, msg=lambda m: f"q_out: {m}")
    if return_k:
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol, msg=lambda m: f"k_out: {m}")
    else:
        assert k_ref is None
    addressed = addressed_rows(p)
    assert_cache("k_cache", p.k_cache, before[0], ref.k_cache, addressed, p.options.layout)
    assert_cache("v_cache", p.v_cache, before[1], ref.v_cache, addressed, p.options.layout)
    assert_outside_views_unchanged([p.k_cache, p.v_cache], snapshots)
    return p, q_out, k_out, before


# --------------------------------------------------------------------------------------------------
# Shapes x RoPE style x layout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("Hq,Hkv", [(7, 1), (8, 8), (64, 8)], ids=["7-1", "8-8", "64-8"])
@pytest.mark.parametrize("T", [0, 1, 5])
def test_shapes_styles_layouts(device, T, Hq, Hkv, head_dim, is_neox, layout):
    """Odd head counts and head_dim 80 (not a power of two) in every layout and RoPE style, fp16.

    Flat layouts take q/k/v as 2-D slices of one fused projection; the sequence layout runs two
    sequences of T tokens each with per-sequence positions.
    """
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=T, Hq=Hq, Hkv=Hkv, D=head_dim, layout=layout, batch=batch, is_neox=is_neox)
    run_and_check(args)


MANY_TOKENS = {
    # id: (layout, batch, Hq, Hkv, head_dim, is_neox, qkv form)
    "token-64-8-d128-neox-fused2d": ("token", 1, 64, 8, 128, True, "fused2d"),
    "paged-64-8-d80-gptj-3d": ("paged", 1, 64, 8, 80, False, "3d"),
    "token-8-8-d64-gptj-fused3d": ("token", 1, 8, 8, 64, False, "fused3d"),
    "sequence-b1-7-1-d80-neox": ("sequence", 1, 7, 1, 80, True, "4d"),
    "sequence-b2-7-1-d128-gptj-transposed": ("sequence", 2, 7, 1, 128, False, "transposed"),
}


QUICK_MANY = "token-8-8-d64-gptj-fused3d"  # the quick tier keeps the smallest


@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=() if i == QUICK_MANY else pytest.mark.full)
                                  for i, c in MANY_TOKENS.items()])
def test_many_tokens(device, case):
    """T = 333 (many programs, partial last block) with the default launch configuration.

    Five cases instead of the cross product: together they cover every head count, head_dim,
    RoPE style and layout once (each costs seconds in the interpreter).
    """
    layout, batch, Hq, Hkv, head_dim, is_neox, qkv = case
    args = make_args(device, T=333, Hq=Hq, Hkv=Hkv, D=head_dim, layout=layout, batch=batch, is_neox=is_neox,
                     qkv=qkv, spare_rows=40)
    run_and_check(args)


# --------------------------------------------------------------------------------------------------
# Dtypes and fp8 caches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(device, dtype, is_neox, layout):
    """q/k/v, outputs and caches in each model dtype (tolerances in ``TOLERANCES``)."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=11, Hq=6, Hkv=2, D=80, layout=layout, batch=batch, dtype=dtype, is_neox=is_neox)
    run_and_check(args)


def fp8_scale(which: str, name: str, device) -> torch.Tensor | None:
    if which == "none" or (which != "both" and which != name):
        return None
    return torch.tensor([0.05 if name == "k_scale" else 4.0], dtype=torch.float32, device=device)


@pytest.mark.parametrize("scales", ["none", "both", "k_scale", "v_scale"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_caches(device, cache_dtype, dtype, scales):
    """fp8 caches hold quant(x) = x / scale (no scale: x), compared as floats within one fp8 ulp."""
    args = make_args(device, T=13, Hq=4, Hkv=2, D=80, dtype=dtype, cache_dtype=cache_dtype)
    args.update(k_scale=fp8_scale(scales, "k_scale", device), v_scale=fp8_scale(scales, "v_scale", device))
    run_and_check(args)


@pytest.mark.parametrize("layout", ["paged", "sequence"])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_caches_other_layouts(device, cache_dtype, layout):
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=7, Hq=8, Hkv=4, D=64, layout=layout, batch=batch, dtype=torch.bfloat16,
                     cache_dtype=cache_dtype, is_neox=False)
    args.update(k_scale=fp8_scale("both", "k_scale", device), v_scale=fp8_scale("both", "v_scale", device))
    run_and_check(args)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_saturates(device, cache_dtype):
    """Values beyond the format's max are stored as +-max (never inf or NaN), with and without scale."""
    fmax = torch.finfo(cache_dtype).max
    args = make_args(device, T=6, Hq=2, Hkv=1, D=32, dtype=torch.float32, cache_dtype=cache_dtype, qkv="3d")
    v_scale = torch.tensor([0.5], device=device)
    args["v_scale"] = v_scale
    big = torch.tensor([4.0, -4.0, 1.5, -1.5, 1e4, -1e4], device=device) * fmax * 0.5  # v / scale: 4 fmax ...
    args["v"][:, 0, :] = big[:, None]
    # k: huge values everywhere in token 0 (rotated values stay huge), no k scale
    args["k"][0] = 3 * fmax
    p, *_ = run_and_check(args)
    rows = p.v_cache[p.slot_mapping.reshape(-1)].float()[:, 0]  # [T, D]
    want = torch.tensor([fmax, -fmax, fmax, -fmax, fmax, -fmax], device=device)
    assert torch.equal(rows, want[:, None].expand_as(rows))
    k_row = p.k_cache[p.slot_mapping[0, 0]].float()
    assert torch.isfinite(k_row).all() and (k_row.abs().amax() == fmax)


# --------------------------------------------------------------------------------------------------
# Rotary tables, partial rotary, textbook formulas
# --------------------------------------------------------------------------------------------------

TABLES = {
    # id: (table kind, layout, model dtype, table dtype, positions dtype)
    "packed-fp32-int64": ("packed", "token", torch.float16, torch.float32, torch.int64),
    "packed-fp32-int32": ("packed", "paged", torch.float16, torch.float32, torch.int32),
    "packed-bf16-int32": ("packed", "token", torch.bfloat16, torch.bfloat16, torch.int32),
    "packed-fp16-int64": ("packed", "paged", torch.float16, torch.float16, torch.int64),
    "packed-sequence-pos-bs": ("packed", "sequence", torch.float32, torch.float32, torch.int64),
    "packed-sequence-pos-1s": ("packed_pos_b1", "sequence", torch.float16, torch.float32, torch.int32),
    "packed-sequence-pos-s": ("packed_pos_s", "sequence", torch.float16, torch.float32, torch.int64),
    "pairs-freqs-cis-fp32": ("pairs", "token", torch.float32, torch.float32, torch.int64),
    "pairs-freqs-cis-sequence": ("pairs", "sequence", torch.bfloat16, torch.float32, torch.int32),
    "hf-t-rot": ("hf", "token", torch.float16, None, torch.int64),
    "hf-t-rot-paged-bf16": ("hf", "paged", torch.bfloat16, None, torch.int64),
    "hf-1-t-rot": ("hf_b1", "token", torch.float32, None, torch.int64),
    "hf-b-s-rot": ("hf", "sequence", torch.float16, None, torch.int64),
    "hf-1-s-rot": ("hf_b1", "sequence", torch.float16, None, torch.int64),
    "hf-s-rot": ("hf_2d", "sequence", torch.bfloat16, None, torch.int64),
    "pairs-per-token": ("pairs_per_token", "token", torch.float32, torch.float32, torch.int64),
    "pairs-per-token-sequence": ("pairs_per_token", "sequence", torch.float16, torch.bfloat16, torch.int64),
    "random-per-element": ("random", "token", torch.float32, torch.float32, torch.int64),
    "random-per-element-sequence": ("random", "sequence", torch.float32, torch.float16, torch.int64),
}


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
def test_rotary_tables(device, table, is_neox):
    """Every rotary-table form: position-indexed tables and per-token values, per feature or per pair."""
    kind, layout, dtype, table_dtype, pos_dtype = table
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=9, Hq=6, Hkv=3, D=48, layout=layout, batch=batch, dtype=dtype, table=kind,
                     table_dtype=table_dtype or dtype, pos_dtype=pos_dtype, is_neox=is_neox)
    run_and_check(args)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("table,layout", [("packed", "token"), ("hf", "sequence")])
def test_tables_rounded_before_the_multiply(device, table_dtype, table, layout):
    """``table_dtype``: cos/sin read from an fp32 table and rounded to it first, as ``cos.to(x.dtype)`` does.

    fp32 q/k make the rounding visible: the result matches the reference that rounds the table (to fp32
    accuracy) and differs from the one that does not by far more than that."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=9, Hq=4, Hkv=2, D=32, layout=layout, batch=batch, dtype=torch.float32,
                     table=table, table_dtype=torch.float32)
    p, q_out, *_ = run_and_check(dict(args, table_dtype=table_dtype))
    unrounded = dataclasses.replace(p, options=dataclasses.replace(p.options, table_dtype=None),
                                    k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_unrounded, _ = reference(unrounded, False, compute_dtype=torch.float64)
    assert (q_out.double() - q_unrounded).abs().max() > 1e-4, "the table was not rounded"


def test_table_dtype_must_be_bf16_or_fp16(device):
    args = make_args(device, T=3, Hq=2, Hkv=1, D=16, dtype=torch.float32)
    before = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(ValueError, match="table_dtype must be one of"):
        prepare(**args, table_dtype=torch.float8_e4m3fn)
    for cache, old in zip((args["k_cache"], args["v_cache"]), before):  # poisoned with NaN: compare bytes
        assert torch.equal(cache.contiguous().view(torch.uint8), old.contiguous().view(torch.uint8))


@pytest.mark.parametrize("table", ["packed", "pairs", "hf"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot,head_dim", [(32, 80), (64, 128), (16, 64)], ids=["32of80", "64of128", "16of64"])
def test_partial_rotary(device, rot, head_dim, is_neox, table):
    """rotary_dim < head_dim: features [rot, D) of q, k_out and the k cache are the inputs, bit for bit."""
    args = make_args(device, T=7, Hq=4, Hkv=2, D=head_dim, rot=rot, table=table, is_neox=is_neox)
    p, q_out, k_out, _ = run_and_check(args)
    q, k = p.q[0], p.k[0]  # [T, H, D]
    assert torch.equal(q_out.view(q.shape)[..., rot:], q[..., rot:])
    assert torch.equal(k_out.view(k.shape)[..., rot:], k[..., rot:])
    assert torch.equal(p.k_cache[p.slot_mapping[0]][..., rot:], k[..., rot:])
    assert torch.equal(p.v_cache[p.slot_mapping[0]], p.v[0])


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_partial_rotary_fp8_tail(device, cache_dtype):
    """The unrotated tail of k goes through the same quantisation as the rotated part."""
    args = make_args(device, T=5, Hq=4, Hkv=2, D=80, rot=32, dtype=torch.bfloat16, cache_dtype=cache_dtype,
                     is_neox=False)
    args["k_scale"] = torch.tensor([0.25], device=device)
    p, *_ = run_and_check(args)
    tail = (p.k[0][..., 32:].float() / 0.25).to(cache_dtype)
    assert torch.equal(p.k_cache[p.slot_mapping[0]][..., 32:].view(torch.uint8), tail.view(torch.uint8))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


@pytest.mark.parametrize("layout", ["token", "sequence"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_matches_textbook_rope(device, is_neox, layout):
    """Kernel outputs against the formulas model code uses, not against ``reference``.

    NeoX: ``x * cos + rotate_half(x) * sin`` (HF); GPT-J: the same with ``rotate_every_two`` and
    interleaved cos/sin, which equals gpt-fast's complex multiply by ``freqs_cis``.
    """
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=6, Hq=4, Hkv=2, D=32, layout=layout, batch=batch, dtype=torch.float32, table="hf",
                     is_neox=is_neox)
    p, q_out, k_out, _ = run_and_check(args)
    cos, sin = args["cos"].double(), args["sin"].double()
    cos, sin = (c.reshape(*c.shape[:-1], 1, c.shape[-1]) for c in (cos, sin))  # broadcast over heads
    rotate = rotate_half if is_neox else rotate_every_two
    for name, x, out in (("q", args["q"], q_out), ("k", args["k"], k_out)):
        x = x.double().reshape(*out.shape[:-1], -1, 32) if layout != "sequence" else x.double()
        want = x * cos + rotate(x) * sin
        torch.testing.assert_close(out.double().reshape(want.shape), want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
        if not is_neox:  # gpt-fast: pairs as complex numbers times freqs_cis = cos + i sin
            xc = torch.view_as_complex(x.reshape(*x.shape[:-1], 16, 2).contiguous())
            want = torch.view_as_real(xc * torch.complex(cos[..., ::2], sin[..., ::2])).flatten(-2)
            torch.testing.assert_close(out.double().reshape(want.shape), want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name} (complex form): {m}")


# --------------------------------------------------------------------------------------------------
# Slot mapping: sliding-window tables, negative and out-of-range slots, return_k
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("layout", ["token", "paged"])
def test_swa_table(device, layout, index_dtype):
    """slot = swa_table[slot_mapping]; negative at either level, or outside the table or cache: no store."""
    T = 24
    args = make_args(device, T=T, Hq=4, Hkv=2, D=64, layout=layout, slot_dtype=index_dtype, spare_rows=24)
    n_slots = slots_per_row(prepare(**args))
    n_swa = 40
    swa = torch.randperm(n_slots, device=device)[:n_swa]  # distinct cache slots
    entry = torch.randperm(n_swa, device=device)
    bad_entries = entry[:6]  # second level: negative or outside the cache
    swa[bad_entries] = torch.tensor([-1, -7, -1, n_slots, n_slots + 5, 10**6], device=device)
    bad_locs = torch.tensor([-1, -2, n_swa, n_swa + 100], device=device)  # first level
    loc = torch.cat([bad_entries, bad_locs, entry[6:6 + T - 10]])
    loc = loc[torch.randperm(T, device=device)]
    args.update(slot_mapping=loc.to(index_dtype), swa_table=swa.to(index_dtype))
    p, *_ = run_and_check(args)
    assert int(addressed_rows(p).sum()) == T - 10


@pytest.mark.parametrize("return_k", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_negative_and_out_of_range_slots(device, layout, return_k):
    """Negative or too large slots: no store (and no write out of bounds); q and k are still rotated."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=12, Hq=4, Hkv=2, D=64, layout=layout, batch=batch)
    n_slots = slots_per_row(prepare(**args))
    slots = args["slot_mapping"].clone()
    slots[[0, 3, 4, 7, 9, 11]] = torch.tensor([-1, -5, -(2**40), n_slots, n_slots + 3, 2**40], device=device)
    args["slot_mapping"] = slots
    p, *_ = run_and_check(args, return_k=return_k)
    assert int(addressed_rows(p).sum()) == 6 * batch


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_slot_addressed(device, layout):
    """All slots negative: the caches stay byte-identical, q/k outputs are still written."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=5, Hq=4, Hkv=4, D=64, layout=layout, batch=batch)
    args["slot_mapping"] = torch.full_like(args["slot_mapping"], -1)
    p, _, _, before = run_and_check(args)
    assert torch.equal(as_bytes(p.k_cache), as_bytes(before[0]))
    assert torch.equal(as_bytes(p.v_cache), as_bytes(before[1]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_negative_wraps(device, layout):
    """negative_wraps: negative slots and positions count from the end, as ``cache[slot] = k`` does."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=8, Hq=4, Hkv=2, D=32, layout=layout, batch=batch, dtype=torch.float32)
    p = prepare(**args)
    n_slots = slots_per_row(p)
    slots = torch.randperm(n_slots, device=device)[:8] - n_slots  # distinct, all negative, in [-n, 0)
    positions = args["positions"]
    positions[..., :3] = torch.tensor([-1, -MAX_POSITION, 5 - MAX_POSITION], device=device)
    args.update(slot_mapping=slots, positions=positions, negative_wraps=True)
    p, q_out, _, _ = run_and_check(args)
    assert int(addressed_rows(p).sum()) == 8 * batch
    # the same problem with the equivalent non-negative indices
    wrapped = dict(args, slot_mapping=slots + n_slots, positions=positions % MAX_POSITION, negative_wraps=False,
                   k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    _, q_out_wrapped, _, _ = run_and_check(wrapped)
    assert torch.equal(q_out, q_out_wrapped)


def test_negative_wraps_with_swa_table_follows_torch_indexing(device):
    """negative_wraps keeps eager semantics: ``k_cache[swa_table[loc]] = rope(k)``, wrapping at both levels."""
    T, n_swa = 6, 10
    args = make_args(device, T=T, Hq=2, Hkv=1, D=16, dtype=torch.float32, spare_rows=10)
    n_slots = slots_per_row(prepare(**args))
    swa = torch.randperm(n_slots, device=device)[:n_swa]
    swa[::3] -= n_slots  # the same slots, written as negative indices (second level)
    loc = torch.randperm(n_swa, device=device)[:T]
    loc[::2] -= n_swa  # the same entries, written as negative indices (first level)
    args.update(slot_mapping=loc, swa_table=swa, negative_wraps=True)
    p = prepare(**args)
    before = p.k_cache.clone()
    q_out, k_out = (torch.empty(shape, device=device) for shape in (p.q_shape, p.k_shape))
    launch(p, q_out, k_out)
    want = before.clone()
    want[swa[loc]] = k_out.view(T, 1, 16)  # eager torch indexing: negative indices wrap at both levels
    addressed = torch.zeros(n_slots, dtype=torch.bool, device=device)
    addressed[swa[loc]] = True
    assert_cache("k_cache", p.k_cache, before, want, addressed, p.options.layout)


def test_negative_wraps_skips_entries_outside_swa_table(device):
    """Entries outside swa_table are skipped (never dereferenced), negative_wraps or not."""
    args = make_args(device, T=4, Hq=2, Hkv=1, D=16, dtype=torch.float32)
    swa = torch.arange(3, device=device)
    args.update(slot_mapping=torch.tensor([3, 4, 100, 2**40], device=device), swa_table=swa, negative_wraps=True)
    p, *_ = run_and_check(args)
    assert not addressed_rows(p).any()
    assert torch.isnan(p.k_cache).all() and torch.isnan(p.v_cache).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_return_k_false(device, layout):
    """Without k_out the kernel must still store k and must not touch q_out beyond q's values."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=7, Hq=8, Hkv=2, D=64, layout=layout, batch=batch, is_neox=False)
    run_and_check(args, return_k=False)


# --------------------------------------------------------------------------------------------------
# Strides: q/k/v views, cache views, output views
# --------------------------------------------------------------------------------------------------

STRIDES = {
    # id: (layout, qkv form, cache form, output form)
    "token-3d-contiguous": ("token", "3d", "contiguous", "contiguous"),
    "token-fused3d-fusedkv": ("token", "fused3d", "fused", "contiguous"),
    "token-strided3d-headmajor": ("token", "strided3d", "head_major", "strided"),
    "token-fused2d-padded": ("token", "fused2d", "padded", "strided"),
    "paged-fused2d-nhd-fused": ("paged", "fused2d", "fused", "contiguous"),
    "paged-3d-hnd": ("paged", "3d", "head_major", "contiguous"),
    "paged-strided3d-padded": ("paged", "strided3d", "padded", "strided"),
    "sequence-transposed-contiguous": ("sequence", "transposed", "contiguous", "strided"),
    "sequence-fused4d-bshd": ("sequence", "fused4d", "head_major", "contiguous"),
    "sequence-4d-fused-padded": ("sequence", "4d", "fused", "contiguous"),
    "sequence-transposed-padded": ("sequence", "transposed", "padded", "contiguous"),
}


@pytest.mark.parametrize("case", STRIDES.values(), ids=STRIDES.keys())
def test_strides(device, case):
    """Non-contiguous q/k/v, caches and outputs: strides are arguments, never assumed."""
    layout, qkv, cache_form, out_form = case
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=10, Hq=6, Hkv=2, D=48, layout=layout, batch=batch, qkv=qkv, cache_form=cache_form,
                     is_neox=layout != "paged")
    run_and_check(args, out_form=out_form)


@pytest.mark.parametrize("buffers", ["one", "two"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_caches_written_through_their_buffers(device, layout, buffers):
    """``buffers``: the kernel gets the buffers the caches are views of, and the views' offsets (stacked caches,
    as a traced launch passes them). One buffer: the k and v caches of one layer of ``kv [2, L, ...]``; two: layer
    1 of ``k [L, ...]`` and layer 2 of ``v [L, ...]``. The views are written as the reference writes them, and no
    other byte of the buffers changes."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=10, Hq=6, Hkv=2, D=48, layout=layout, batch=batch, is_neox=layout != "paged")
    shape = args["k_cache"].shape
    if buffers == "one":
        kv = torch.empty((2, 3, *shape), dtype=args["k_cache"].dtype, device=device)
        poison(kv)
        args.update(k_cache=kv[0, 1], v_cache=kv[1, 1])
        bufs = (kv, None)
    else:
        k_buffer, v_buffer = (torch.empty((3, *shape), dtype=args["k_cache"].dtype, device=device) for _ in range(2))
        poison(k_buffer)
        poison(v_buffer)
        args.update(k_cache=k_buffer[1], v_cache=v_buffer[2])
        bufs = (k_buffer, v_buffer)
    p, *_ = run_and_check(args, buffers=bufs)
    assert p.k_cache.storage_offset() > 0 and p.v_cache.storage_offset() > 0


# --------------------------------------------------------------------------------------------------
# Launch configuration and grid
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    pytest.param(dict(BLOCK_RQ=1, BLOCK_RKV=1), marks=pytest.mark.full),  # one row a program: slow to interpret
    dict(BLOCK_RQ=2, BLOCK_RKV=8),
    pytest.param(dict(BLOCK_RQ=128, BLOCK_RKV=64, num_warps=8), marks=pytest.mark.full),
], ids=["1-1", "2-8", "128-64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_block_size(device, layout, config):
    """The result does not depend on how rows are split between programs (partial blocks included)."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=13, Hq=6, Hkv=2, D=80, rot=48, layout=layout, batch=batch)
    run_and_check(args, **config)


class KernelSpy:
    """Stands in for the kernel: records each launch's grid and arguments, runs nothing."""

    def __init__(self, arg_names):
        self.arg_names = list(arg_names)
        self.launches = []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((grid, dict(zip(self.arg_names, args)) | kwargs))
        return record


@pytest.fixture
def kernel_spy(monkeypatch):
    spy = KernelSpy(rope_kv_kernel._rope_kv_store_kernel.arg_names)
    monkeypatch.setattr(kernel_launch, "_rope_kv_store_kernel", spy)
    return spy


@pytest.mark.parametrize("layout,batch", [("token", 1), ("paged", 1), ("sequence", 2), ("sequence", 0)])
def test_zero_tokens_launches_nothing(device, kernel_spy, layout, batch):
    """T = 0 (or a batch of 0 sequences): no launch and no write (``test_shapes_styles_layouts`` runs T = 0 too)."""
    T = 0 if batch else 5
    args = make_args(device, T=T, Hq=8, Hkv=2, D=64, layout=layout, batch=batch)
    p = prepare(**args)
    before = (as_bytes(p.k_cache).clone(), as_bytes(p.v_cache).clone())
    q_out = torch.empty(p.q_shape, dtype=p.q.dtype, device=device)
    launch(p, q_out, torch.empty(p.k_shape, dtype=p.k.dtype, device=device))
    assert kernel_spy.launches == []
    assert torch.equal(as_bytes(p.k_cache), before[0]) and torch.equal(as_bytes(p.v_cache), before[1])


@pytest.mark.parametrize("T", [1, 2, 3, 17, 64, 333, 4096, 100_000])
@pytest.mark.parametrize("Hq,Hkv,D,rot", [(7, 1, 80, 80), (8, 8, 64, 32), (64, 8, 128, 128), (32, 4, 256, 64),
                                          (1, 1, 16, 2)])
def test_launch_grid_and_config(kernel_spy, T, Hq, Hkv, D, rot):
    """Config values are sane powers of two and the grid covers every (token, head) row exactly once.

    Runs on the meta device: only shapes matter, so any T is free.
    """
    meta = torch.device("meta")
    q, k, v = (torch.empty(T, h, D, dtype=torch.float16, device=meta) for h in (Hq, Hkv, Hkv))
    cache = torch.empty(T + 1, Hkv, D, dtype=torch.float16, device=meta)
    table = torch.empty(MAX_POSITION, rot // 2, dtype=torch.float32, device=meta)
    slots = torch.empty(T, dtype=torch.int64, device=meta)
    p = prepare(q, k, v, cache, cache, slots, table, table, slots, rotary_dim=rot)

    cfg = launch_config(p)
    for key in ("BLOCK_RQ", "BLOCK_RKV", "BLOCK_HALF", "BLOCK_D"):
        assert isinstance(cfg[key], int) and cfg[key] >= 1 and cfg[key] & (cfg[key] - 1) == 0, (key, cfg)
    assert D <= cfg["BLOCK_D"] < 2 * D
    assert rot // 2 <= cfg["BLOCK_HALF"] < rot
    assert cfg["num_warps"] in (1, 2, 4, 8)
    assert cfg["BLOCK_RQ"] * cfg["BLOCK_D"] <= max(4096, cfg["BLOCK_D"])  # about 4K elements per program

    launch(p, torch.empty_like(q), None)
    (grid, kw), = kernel_spy.launches
    n_q = triton.cdiv(T * Hq, kw["BLOCK_RQ"])  # the kernel's split of the grid
    assert len(grid) == 1 and grid[0] >= 2
    assert 1 <= n_q < grid[0]
    # q programs cover the T * Hq rows, kv programs the T * Hkv rows, none of them empty
    assert (n_q - 1) * kw["BLOCK_RQ"] < T * Hq <= n_q * kw["BLOCK_RQ"]
    n_kv = grid[0] - n_q
    assert (n_kv - 1) * kw["BLOCK_RKV"] < T * Hkv <= n_kv * kw["BLOCK_RKV"]
    assert kw["T"] == T and kw["HQ"] == Hq and kw["HKV"] == Hkv and kw["D"] == D and kw["ROT"] == rot
    assert kw["BLOCK_TAIL"] >= D - rot
    assert kw["k_out_ptr"] is None  # not returned: not passed (no alias of q_out)
    assert {k: kw[k] for k in cfg} == cfg
    assert triton.cdiv(T * Hq, cfg["BLOCK_RQ"]) == n_q
