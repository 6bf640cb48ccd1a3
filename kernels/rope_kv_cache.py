"""Fused rotary embedding + KV-cache store: Triton kernel, launcher, float reference.

One launch does what attention layers otherwise do in three memory-bound steps:

    q_out            = rope(q)
    k_cache[slot(t)] = quant(rope(k))        (and k_out = rope(k) when asked)
    v_cache[slot(t)] = quant(v)

where ``rope(x) = x * cos + rotate(x) * sin`` on the first ``rotary_dim`` features of every head
(the tail passes through unchanged), ``rotate`` pairs features as NeoX halves (i, i + R/2) or GPT-J
neighbours (2i, 2i + 1), and ``quant(x) = saturate(x / scale)`` for fp8 caches, the identity
otherwise. Maths is fp32 whatever the storage dtypes.

Tokens are addressed as ``(b, s)``: q, k, v are ``[T, H*D]``, ``[T, H, D]`` (flat layouts, ``B = 1``)
or ``[B, S, H, D]`` (sequence layout), with any strides (slices of a fused qkv projection work
without copies).

Cache layouts (``CacheLayout``), all ``[..., Hkv, D]`` with any strides:
    token     ``[num_slots, Hkv, D]``               row ``slot``                  (SGLang token pool)
    paged     ``[num_blocks, block_size, Hkv, D]``  row ``slot // bs, slot % bs`` (vLLM flash layout)
    sequence  ``[B, Hkv, max_seq, D]``              row ``b, :, slot``            (HF StaticCache, gpt-fast)

The slot of token ``(b, s)`` is ``slot_mapping[s]`` (``[T]`` for flat layouts, the ``cache_position``
``[S]`` for the sequence layout), optionally sent through a second table (``slot = swa_table[slot]``,
SGLang's sliding-window pool). A negative entry at either level skips that token's k/v store; q is
still rotated. With ``negative_wraps`` a negative final slot or position instead counts from the end,
as torch indexing does (``cache[slot] = k``): the graph pass uses this to keep eager semantics.
Slots and positions outside the cache or table are never dereferenced.

Rotary tables: ``cos`` and ``sin`` are either tables ``[P, R']`` indexed by ``positions``
(SGLang/vLLM ``cos_sin_cache`` split into halves, gpt-fast ``freqs_cis[..., 0]``), or per-token values
(HF ``cos, sin`` of shape ``[T, R']``, ``[B, S, R']`` or ``[1, S, R']``). ``R'`` is ``R`` (one value per
feature, as HF computes them) or ``R/2`` (one per pair).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor


class CacheLayout(str, enum.Enum):
    """How a KV cache is laid out; the value is what the custom op's ``layout`` argument takes."""

    TOKEN = "token"
    PAGED = "paged"
    SEQUENCE = "sequence"


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz)
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rope_pairs(
    x_ptr, x_row, x_sd,                      # x row offsets [BLOCK_R], feature stride
    cos_ptr, sin_ptr, cos_row, sin_row, cos_sd, sin_sd,
    mask, HALF,
    IS_NEOX: tl.constexpr, COS_PER_ELEMENT: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate BLOCK_R rows; returns (o1, o2) in fp32 at feature indices (e1, e2) and their mask.

    # o1 = x1 * c1 - x2 * s1 ;  o2 = x2 * c2 + x1 * s2   (pairs: NeoX (i, i+HALF), GPT-J (2i, 2i+1))
    """
    i = tl.arange(0, BLOCK_HALF)
    m = mask[:, None] & (i < HALF)[None, :]
    if IS_NEOX:
        e1 = i
        e2 = i + HALF
    else:
        e1 = 2 * i
        e2 = 2 * i + 1
    # x first: its address does not wait on the positions load, so both are in flight together
    x1 = tl.load(x_ptr + x_row[:, None] + (e1 * x_sd)[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + (e2 * x_sd)[None, :], mask=m, other=0.0).to(tl.float32)
    if COS_PER_ELEMENT:
        c1 = tl.load(cos_ptr + cos_row[:, None] + (e1 * cos_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cos_row[:, None] + (e2 * cos_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + sin_row[:, None] + (e1 * sin_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + sin_row[:, None] + (e2 * sin_sd)[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        c1 = tl.load(cos_ptr + cos_row[:, None] + (i * cos_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + sin_row[:, None] + (i * sin_sd)[None, :], mask=m, other=0.0).to(tl.float32)
        c2 = c1
        s2 = s1
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, e1, e2, m


@triton.jit
def _quantize(x, scale_ptr, fp8_max, HAS_SCALE: tl.constexpr, IS_FP8: tl.constexpr):
    # out = clamp(x / scale, -fp8_max, fp8_max)  for fp8 caches; identity otherwise
    if HAS_SCALE:
        x = x / tl.load(scale_ptr).to(tl.float32)
    if IS_FP8:
        x = tl.minimum(tl.maximum(x, -fp8_max), fp8_max)
    return x


@triton.jit
def _token_rows(
    pid, BLOCK_R: tl.constexpr, n_heads, T, S, pos_ptr, pos_sb, pos_ss, n_positions,
    cos_sp, cos_sb, cos_ss, sin_sp, sin_sb, sin_ss, HAS_POSITIONS: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
):
    """Rows pid*BLOCK_R.. of the (token, head) grid: their (b, s, h), mask, and cos/sin row offsets."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    t = rows // n_heads
    h = rows - t * n_heads
    b = t // S
    s = t - b * S
    mask = t < T
    if HAS_POSITIONS:
        pos = tl.load(pos_ptr + b * pos_sb + s * pos_ss, mask=mask, other=0).to(tl.int64)
        if NEGATIVE_WRAPS:
            pos = tl.where(pos < 0, pos + n_positions, pos)
        pos = tl.minimum(tl.maximum(pos, 0), n_positions - 1)  # never read outside the table
        cos_row = pos * cos_sp
        sin_row = pos * sin_sp
    else:
        cos_row = b * cos_sb + s * cos_ss
        sin_row = b * sin_sb + s * sin_ss
    return b, s, h, mask, cos_row, sin_row


@triton.jit
def _rotate_q(
    pid, q_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr,
    T, S, Hq, D, HALF, ROT, n_positions,
    q_sb, q_ss, q_sh, q_sd, qo_sb, qo_ss, qo_sh, qo_sd,
    pos_sb, pos_ss, cos_sp, cos_sb, cos_ss, cos_sd, sin_sp, sin_sb, sin_ss, sin_sd,
    IS_NEOX: tl.constexpr, COS_PER_ELEMENT: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    HAS_TAIL: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    """q_out = rope(q) for BLOCK_R (token, q-head) rows."""
    b, s, h, mask, cos_row, sin_row = _token_rows(
        pid, BLOCK_R, Hq, T, S, pos_ptr, pos_sb, pos_ss, n_positions,
        cos_sp, cos_sb, cos_ss, sin_sp, sin_sb, sin_ss, HAS_POSITIONS, NEGATIVE_WRAPS)
    q_row = b * q_sb + s * q_ss + h * q_sh
    o_row = b * qo_sb + s * qo_ss + h * qo_sh
    o1, o2, e1, e2, m = _rope_pairs(q_ptr, q_row, q_sd, cos_ptr, sin_ptr, cos_row, sin_row,
                                    cos_sd, sin_sd, mask, HALF, IS_NEOX, COS_PER_ELEMENT, BLOCK_HALF)
    out_ty = q_out_ptr.dtype.element_ty
    tl.store(q_out_ptr + o_row[:, None] + (e1 * qo_sd)[None, :], o1.to(out_ty), mask=m)
    tl.store(q_out_ptr + o_row[:, None] + (e2 * qo_sd)[None, :], o2.to(out_ty), mask=m)
    if HAS_TAIL:
        tail = ROT + tl.arange(0, BLOCK_TAIL)
        tm = mask[:, None] & (tail < D)[None, :]
        x = tl.load(q_ptr + q_row[:, None] + (tail * q_sd)[None, :], mask=tm)
        tl.store(q_out_ptr + o_row[:, None] + (tail * qo_sd)[None, :], x, mask=tm)


@triton.jit
def _rotate_store_kv(
    pid, k_ptr, v_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, swa_ptr, pos_ptr, cos_ptr, sin_ptr,
    k_scale_ptr, v_scale_ptr,
    T, S, Hkv, D, HALF, ROT, n_slots, n_swa, n_positions, cache_block_size, fp8_max,
    k_sb, k_ss, k_sh, k_sd, v_sb, v_ss, v_sh, v_sd, ko_sb, ko_ss, ko_sh, ko_sd,
    kc_sb, kc_sblk, kc_sin, kc_sh, kc_sd, vc_sb, vc_sblk, vc_sin, vc_sh, vc_sd,
    slot_sb, slot_ss, pos_sb, pos_ss, cos_sp, cos_sb, cos_ss, cos_sd, sin_sp, sin_sb, sin_ss, sin_sd,
    IS_NEOX: tl.constexpr, COS_PER_ELEMENT: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    HAS_SWA: tl.constexpr, HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr,
    CACHE_IS_FP8: tl.constexpr, RETURN_K: tl.constexpr, HAS_TAIL: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """k_cache[slot] = quant(rope(k)), v_cache[slot] = quant(v) (and k_out = rope(k)) for BLOCK_R (token, kv-head) rows."""
    b, s, h, mask, cos_row, sin_row = _token_rows(
        pid, BLOCK_R, Hkv, T, S, pos_ptr, pos_sb, pos_ss, n_positions,
        cos_sp, cos_sb, cos_ss, sin_sp, sin_sb, sin_ss, HAS_POSITIONS, NEGATIVE_WRAPS)
    d = tl.arange(0, BLOCK_D)
    vm = mask[:, None] & (d < D)[None, :]
    v_row = b * v_sb + s * v_ss + h * v_sh
    v = tl.load(v_ptr + v_row[:, None] + (d * v_sd)[None, :], mask=vm).to(tl.float32)
    # slot of token (b, s): negative at either level, or outside the cache, means no store
    slot = tl.load(slot_ptr + b * slot_sb + s * slot_ss, mask=mask, other=-1).to(tl.int64)
    store = mask
    if HAS_SWA:
        if NEGATIVE_WRAPS:
            slot = tl.where(slot < 0, slot + n_swa, slot)
        in_swa = (slot >= 0) & (slot < n_swa)
        store = store & in_swa
        slot = tl.load(swa_ptr + tl.where(in_swa, slot, 0), mask=store, other=-1).to(tl.int64)
    if NEGATIVE_WRAPS:
        slot = tl.where(slot < 0, slot + n_slots, slot)
    store = store & (slot >= 0) & (slot < n_slots)
    slot = tl.where(store, slot, 0)
    blk = slot // cache_block_size
    off = slot - blk * cache_block_size
    kc_row = b * kc_sb + blk * kc_sblk + off * kc_sin + h * kc_sh
    vc_row = b * vc_sb + blk * vc_sblk + off * vc_sin + h * vc_sh
    k_row = b * k_sb + s * k_ss + h * k_sh
    ko_row = b * ko_sb + s * ko_ss + h * ko_sh

    o1, o2, e1, e2, m = _rope_pairs(k_ptr, k_row, k_sd, cos_ptr, sin_ptr, cos_row, sin_row,
                                    cos_sd, sin_sd, mask, HALF, IS_NEOX, COS_PER_ELEMENT, BLOCK_HALF)
    kc_ty = k_cache_ptr.dtype.element_ty
    sm = m & store[:, None]
    tl.store(k_cache_ptr + kc_row[:, None] + (e1 * kc_sd)[None, :],
             _quantize(o1, k_scale_ptr, fp8_max, HAS_K_SCALE, CACHE_IS_FP8).to(kc_ty), mask=sm)
    tl.store(k_cache_ptr + kc_row[:, None] + (e2 * kc_sd)[None, :],
             _quantize(o2, k_scale_ptr, fp8_max, HAS_K_SCALE, CACHE_IS_FP8).to(kc_ty), mask=sm)
    if RETURN_K:
        ko_ty = k_out_ptr.dtype.element_ty
        tl.store(k_out_ptr + ko_row[:, None] + (e1 * ko_sd)[None, :], o1.to(ko_ty), mask=m)
        tl.store(k_out_ptr + ko_row[:, None] + (e2 * ko_sd)[None, :], o2.to(ko_ty), mask=m)
    if HAS_TAIL:
        tail = ROT + tl.arange(0, BLOCK_TAIL)
        tm = mask[:, None] & (tail < D)[None, :]
        x = tl.load(k_ptr + k_row[:, None] + (tail * k_sd)[None, :], mask=tm)
        tl.store(k_cache_ptr + kc_row[:, None] + (tail * kc_sd)[None, :],
                 _quantize(x.to(tl.float32), k_scale_ptr, fp8_max, HAS_K_SCALE, CACHE_IS_FP8).to(kc_ty),
                 mask=tm & store[:, None])
        if RETURN_K:
            tl.store(k_out_ptr + ko_row[:, None] + (tail * ko_sd)[None, :], x, mask=tm)

    tl.store(v_cache_ptr + vc_row[:, None] + (d * vc_sd)[None, :],
             _quantize(v, v_scale_ptr, fp8_max, HAS_V_SCALE, CACHE_IS_FP8).to(v_cache_ptr.dtype.element_ty),
             mask=vm & store[:, None])


@triton.jit
def _rope_kv_store_kernel(
    # q [B, S, Hq, D]; k, v [B, S, Hkv, D]; q_out [B, S, Hq, D]; k_out [B, S, Hkv, D]: strides below
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr,
    # caches: element (b, slot, h, d) at b*sb + (slot // block_size)*sblk + (slot % block_size)*sin
    #         + h*sh + d*sd  (token: sblk = stride(0); paged: + in-block stride; sequence: sb = stride(0))
    k_cache_ptr, v_cache_ptr,
    slot_ptr, swa_ptr, pos_ptr,      # slot_mapping [.., S]; swa_table [n_swa]; positions [.., S]
    cos_ptr, sin_ptr,                # tables [P, R'] (HAS_POSITIONS) or per-token [.., S, R']
    k_scale_ptr, v_scale_ptr,        # [1] fp32 (fp8 caches)
    T, S, Hq, Hkv, D, HALF, ROT,
    n_q_programs, n_slots, n_swa, n_positions, cache_block_size, fp8_max,
    q_sb, q_ss, q_sh, q_sd,
    k_sb, k_ss, k_sh, k_sd,
    v_sb, v_ss, v_sh, v_sd,
    qo_sb, qo_ss, qo_sh, qo_sd,
    ko_sb, ko_ss, ko_sh, ko_sd,
    kc_sb, kc_sblk, kc_sin, kc_sh, kc_sd,
    vc_sb, vc_sblk, vc_sin, vc_sh, vc_sd,
    slot_sb, slot_ss, pos_sb, pos_ss,
    cos_sp, cos_sb, cos_ss, cos_sd,
    sin_sp, sin_sb, sin_ss, sin_sd,
    IS_NEOX: tl.constexpr, COS_PER_ELEMENT: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    HAS_SWA: tl.constexpr, HAS_K_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr,
    CACHE_IS_FP8: tl.constexpr, RETURN_K: tl.constexpr, HAS_TAIL: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
    BLOCK_RQ: tl.constexpr, BLOCK_RKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Programs [0, n_q_programs) each rotate BLOCK_RQ (token, q-head) rows. The others each rotate
    # BLOCK_RKV (token, kv-head) rows of k and store them, and the same rows of v, into the caches.
    # out = x * cos + rotate(x) * sin on features [0, ROT); features [ROT, D) pass through.
    pid = tl.program_id(0).to(tl.int64)
    if pid < n_q_programs:
        _rotate_q(pid, q_ptr, q_out_ptr, pos_ptr, cos_ptr, sin_ptr,
                  T, S, Hq, D, HALF, ROT, n_positions,
                  q_sb, q_ss, q_sh, q_sd, qo_sb, qo_ss, qo_sh, qo_sd,
                  pos_sb, pos_ss, cos_sp, cos_sb, cos_ss, cos_sd, sin_sp, sin_sb, sin_ss, sin_sd,
                  IS_NEOX, COS_PER_ELEMENT, HAS_POSITIONS, HAS_TAIL, NEGATIVE_WRAPS,
                  BLOCK_RQ, BLOCK_HALF, BLOCK_TAIL)
    else:
        _rotate_store_kv(pid - n_q_programs, k_ptr, v_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, swa_ptr,
                         pos_ptr, cos_ptr, sin_ptr, k_scale_ptr, v_scale_ptr,
                         T, S, Hkv, D, HALF, ROT, n_slots, n_swa, n_positions, cache_block_size, fp8_max,
                         k_sb, k_ss, k_sh, k_sd, v_sb, v_ss, v_sh, v_sd, ko_sb, ko_ss, ko_sh, ko_sd,
                         kc_sb, kc_sblk, kc_sin, kc_sh, kc_sd, vc_sb, vc_sblk, vc_sin, vc_sh, vc_sd,
                         slot_sb, slot_ss, pos_sb, pos_ss, cos_sp, cos_sb, cos_ss, cos_sd,
                         sin_sp, sin_sb, sin_ss, sin_sd,
                         IS_NEOX, COS_PER_ELEMENT, HAS_POSITIONS, HAS_SWA, HAS_K_SCALE, HAS_V_SCALE,
                         CACHE_IS_FP8, RETURN_K, HAS_TAIL, NEGATIVE_WRAPS,
                         BLOCK_RKV, BLOCK_HALF, BLOCK_TAIL, BLOCK_D)


# --------------------------------------------------------------------------------------------
# Launcher: validate, normalise to [B, S, H, D] views, pick the launch configuration, launch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeKVProblem:
    """Validated arguments, with q/k/v (and outputs) seen as ``[B, S, H, D]`` views."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # seen as [B or 1, S]
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None  # seen as [B or 1, S]
    swa_table: torch.Tensor | None
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    is_neox: bool
    rotary_dim: int
    layout: CacheLayout
    q_shape: torch.Size  # as given, for the outputs
    k_shape: torch.Size
    negative_wraps: bool = False  # negative slots/positions count from the end instead of skipping

    @property
    def num_tokens(self) -> int:
        return self.q.shape[0] * self.q.shape[1]

    @property
    def num_slots(self) -> int:
        """Slots a cache row can be addressed by: valid slots are ``0 <= slot < num_slots``."""
        c = self.k_cache
        return c.shape[0] * c.shape[1] if self.layout is CacheLayout.PAGED else (
            c.shape[2] if self.layout is CacheLayout.SEQUENCE else c.shape[0])

    @property
    def cos_per_element(self) -> bool:
        return self.cos.shape[-1] == self.rotary_dim


def _expect_tensor(name: str, x, *, dtypes=None, ndims=None, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndims is not None and x.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, but q is on {device}")


def _as_bshd(name: str, x: torch.Tensor, layout: CacheLayout, head_dim: int) -> torch.Tensor:
    """View q/k/v as [B, S, H, D] without copying (flat layouts: B = 1, S = T)."""
    if layout is CacheLayout.SEQUENCE:
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D] for the sequence layout, got shape {tuple(x.shape)}")
        if x.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]}, but the caches have {head_dim}")
        return x
    if x.dim() == 2:
        if x.shape[-1] % head_dim != 0:
            raise ValueError(f"{name} is [T, H*D] with H*D = {x.shape[-1]}, not a multiple of the caches' "
                             f"head_dim {head_dim}")
        x = x.unflatten(-1, (x.shape[-1] // head_dim, head_dim))
    elif x.dim() == 3:
        if x.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]}, but the caches have {head_dim}")
    else:
        raise ValueError(f"{name} must be [T, H*D] or [T, H, D] for the {layout.value} layout, "
                         f"got shape {tuple(x.shape)}")
    return x.unsqueeze(0)


def _as_bs(name: str, x: torch.Tensor, batch: int, seq: int, *, per_batch: bool) -> torch.Tensor:
    """View a per-token index tensor as [B or 1, S]."""
    if x.dim() == 1 and x.shape[0] == seq:
        return x.unsqueeze(0)
    if per_batch and x.dim() == 2 and x.shape[1] == seq and x.shape[0] in (1, batch):
        return x
    want = f"[{seq}]" + (f" or [{batch}, {seq}]" if per_batch else "")
    raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def _byte_span(x: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte offsets that a non-empty tensor's elements occupy in its storage."""
    size = x.element_size()
    start = x.storage_offset() * size
    last = sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))
    return start, start + (last + 1) * size


def _check_no_overlap(inputs: dict[str, torch.Tensor], caches: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` if an input shares memory with a cache the op writes.

    The kernel reads every input while other programs write the caches, so the result would depend on
    the order programs run in (a race on a GPU). Two tensors overlap when they share a storage and
    their byte ranges intersect; this works on fake tensors too (their storages are shared the same
    way) and needs no device sync. Views that interleave without touching the same element (one
    buffer strided between an input and a cache) are conservatively counted as overlapping.
    """
    input_storages = [(name, x, x.untyped_storage()) for name, x in inputs.items()]
    for cache_name, cache in caches.items():
        storage = cache.untyped_storage()
        for name, x, x_storage in input_storages:
            if x_storage is not storage or x.numel() == 0 or cache.numel() == 0:
                continue
            (a0, a1), (b0, b1) = _byte_span(x), _byte_span(cache)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{name} overlaps {cache_name} in memory (bytes [{a0}, {a1}) and [{b0}, {b1}) of "
                                 f"one storage): the op writes {cache_name} while it reads {name}; pass a copy")


def check_writable(name: str, cache: torch.Tensor) -> None:
    """Raise ``RuntimeError`` where eager ``cache[slot] = x`` would: an inference tensor outside inference
    mode, or a cache that requires grad while grad mode is on (the op has no autograd formula).

    Skipped for fake tensors: when a graph is traced, the grad and inference modes it will run under
    are not those of the tracing, so only the real kernels check. The op's kernels run below
    custom_op's autograd layer, which turns grad mode off whenever an input requires grad: there
    only the inference check can fire, and the Python wrapper ``ops.rope_kv_store`` calls this
    before the op to catch the grad case.
    """
    if not (cache.is_inference() or cache.requires_grad) or isinstance(cache, FakeTensor):
        return
    if cache.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} is an inference tensor (created under torch.inference_mode()), which cannot be "
                           f"written outside inference mode; call the op under torch.inference_mode() or pass "
                           f"{name}.clone()")
    if cache.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} requires grad, and the op writes it in place without recording the write for "
                           f"autograd; call it under torch.no_grad() or torch.inference_mode(), or pass "
                           f"{name}.detach()")


def default_rotary_dim(cos: torch.Tensor, head_dim: int) -> int:
    """``rotary_dim`` implied by a cos table's width ``W``, where only one reading is possible.

    ``W`` is either ``rotary_dim`` (one value per feature) or ``rotary_dim / 2`` (one per pair). When
    ``2 W > head_dim`` only the first fits; otherwise both do (a ``cos_sin_cache`` half of a full
    rotary dim looks like an HF table of a half-width partial rotary) and ``ValueError`` asks for it.
    """
    width = cos.shape[-1]
    if 2 * width > head_dim:
        return width
    raise ValueError(f"rotary_dim is needed: cos has {width} features, which is either rotary_dim={width} "
                     f"(one value per feature) or rotary_dim={2 * width} (one per pair) for head_dim {head_dim}")


def prepare(
    q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions=None, swa_table=None,
    k_scale=None, v_scale=None, *, is_neox: bool = True, rotary_dim: int | None = None,
    layout: CacheLayout | str = CacheLayout.TOKEN, negative_wraps: bool = False,
) -> RopeKVProblem:
    """Check every argument (no device sync) and describe the problem as [B, S, H, D] views.

    Raises ``TypeError``/``ValueError`` naming the argument, what was expected and what arrived, and
    ``RuntimeError`` for caches that eager mode would refuse to write (real tensors only).
    ``rotary_dim=None`` takes it from cos's width where that is unambiguous (``default_rotary_dim``).
    """
    try:
        layout = CacheLayout(layout)
    except ValueError:
        raise ValueError(f"layout must be one of {[m.value for m in CacheLayout]}, got {layout!r}") from None
    _expect_tensor("q", q, dtypes=MODEL_DTYPES)
    dev = q.device
    _expect_tensor("k", k, dtypes=(q.dtype,), device=dev)
    _expect_tensor("v", v, dtypes=(q.dtype,), device=dev)
    cache_ndim = 3 if layout is CacheLayout.TOKEN else 4
    _expect_tensor("k_cache", k_cache, dtypes=(q.dtype, *FP8_DTYPES), ndims=(cache_ndim,), device=dev)
    _expect_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), ndims=(cache_ndim,), device=dev)
    if k_cache.dtype == torch.float8_e4m3fnuz and dev.type == "cuda" and torch.version.hip is None:
        raise TypeError("k_cache is float8_e4m3fnuz, which only HIP (AMD) GPUs store; use float8_e4m3fn on CUDA")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, but k_cache has {tuple(k_cache.shape)}")
    if layout is CacheLayout.SEQUENCE:
        cache_batch, n_kv, _, head_dim = k_cache.shape
    else:
        n_kv, head_dim = k_cache.shape[-2:]
    if n_kv == 0 or head_dim == 0:
        raise ValueError(f"k_cache must have at least one kv head and a head_dim above 0, got shape "
                         f"{tuple(k_cache.shape)} ({n_kv} kv heads, head_dim {head_dim})")

    q4 = _as_bshd("q", q, layout, head_dim)
    k4 = _as_bshd("k", k, layout, head_dim)
    v4 = _as_bshd("v", v, layout, head_dim)
    batch, seq = q4.shape[:2]
    for name, x in (("k", k4), ("v", v4)):
        if x.shape[:2] != q4.shape[:2]:
            raise ValueError(f"{name} has {tuple(x.shape[:2])} (batch, tokens), but q has {tuple(q4.shape[:2])}")
        if x.shape[2] != n_kv:
            raise ValueError(f"{name} has {x.shape[2]} heads, but the caches have {n_kv}")
    if q4.shape[2] == 0 or q4.shape[2] % n_kv != 0:
        raise ValueError(f"q has {q4.shape[2]} heads, expected a positive multiple of the {n_kv} kv heads")
    if layout is CacheLayout.SEQUENCE and cache_batch != batch:
        raise ValueError(f"k_cache has batch {cache_batch}, but q has batch {batch}")

    _expect_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, device=dev)
    slots = _as_bs("slot_mapping", slot_mapping, batch, seq, per_batch=False)

    for name, x in (("cos", cos), ("sin", sin)):
        _expect_tensor(name, x, dtypes=MODEL_DTYPES, device=dev)
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)}, but cos has {tuple(cos.shape)}")
    if rotary_dim is None:
        rotary_dim = default_rotary_dim(cos, head_dim)
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be an even int in [2, head_dim={head_dim}], got {rotary_dim!r}")
    if cos.shape[-1] not in (rotary_dim, rotary_dim // 2):
        raise ValueError(f"cos has {cos.shape[-1]} features, expected rotary_dim={rotary_dim} (one per feature) "
                         f"or {rotary_dim // 2} (one per pair)")
    pos2 = None
    if positions is not None:
        _expect_tensor("positions", positions, dtypes=INDEX_DTYPES, device=dev)
        pos2 = _as_bs("positions", positions, batch, seq, per_batch=True)
        if cos.dim() != 2:
            raise ValueError(f"cos indexed by positions must be a [max_position, R] table, got {tuple(cos.shape)}")
    else:
        # per-token values: [S, R'] or [B or 1, S, R'], seen as [B or 1, S, R']
        if cos.dim() == 2:
            ok = cos.shape[0] == seq
        else:
            ok = cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == seq
        if not ok:
            raise ValueError(f"cos without positions must hold one row per token, shape [{seq}, R] or "
                             f"[{batch}, {seq}, R], got {tuple(cos.shape)}")

    if swa_table is not None:
        _expect_tensor("swa_table", swa_table, dtypes=INDEX_DTYPES, ndims=(1,), device=dev)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            continue
        _expect_tensor(name, scale, dtypes=(torch.float32,), device=dev)
        if scale.numel() != 1:
            raise ValueError(f"{name} must hold one per-tensor scale, got shape {tuple(scale.shape)}")
        if k_cache.dtype not in FP8_DTYPES:
            raise ValueError(f"{name} is given, but the caches are {k_cache.dtype}, not fp8")
    _check_no_overlap({"q": q, "k": k, "v": v}, {"k_cache": k_cache, "v_cache": v_cache})
    check_writable("k_cache", k_cache)
    check_writable("v_cache", v_cache)
    return RopeKVProblem(q4, k4, v4, k_cache, v_cache, slots, cos, sin, pos2, swa_table, k_scale, v_scale,
                         bool(is_neox), rotary_dim, layout, q.shape, k.shape, bool(negative_wraps))


def check_index_ranges(p: RopeKVProblem) -> None:
    """Raise ``ValueError`` if a slot or position lies outside its cache or table (syncs the device).

    Negative entries are allowed (they skip the store, or count from the end with ``negative_wraps``).
    """
    slots = p.slot_mapping.long()
    if p.swa_table is not None:
        n_swa = p.swa_table.shape[0]
        low = -n_swa if p.negative_wraps else None
        bad = (slots >= n_swa) | ((slots < low) if low is not None else torch.zeros_like(slots, dtype=torch.bool))
        if bool(bad.any()):
            raise ValueError(f"slot_mapping has entries outside swa_table's {n_swa} rows, e.g. {int(slots[bad][0])}")
        wrapped = torch.where(slots < 0, slots + n_swa, slots) if p.negative_wraps else slots
        slots = torch.where(wrapped >= 0, p.swa_table[wrapped.clamp(min=0)].long(), -1)
    bad = slots >= p.num_slots
    if p.negative_wraps:
        bad |= slots < -p.num_slots
    if bool(bad.any()):
        where = "swa_table maps to" if p.swa_table is not None else "slot_mapping has"
        raise ValueError(f"{where} slots outside the {p.layout.value} cache's {p.num_slots} slots, "
                         f"e.g. {int(slots[bad][0])}")
    if p.positions is not None:
        low = -p.cos.shape[0] if p.negative_wraps else 0
        bad = (p.positions < low) | (p.positions >= p.cos.shape[0])
        if bool(bad.any()):
            raise ValueError(f"positions must lie in [{low}, {p.cos.shape[0]}) (the rotary table's rows), "
                             f"got {int(p.positions[bad][0])}")


def _cache_strides(c: torch.Tensor, layout: CacheLayout) -> tuple[int, int, int, int, int, int]:
    """(sb, sblk, sin, sh, sd, block_size) of a cache for the kernel's address formula."""
    if layout is CacheLayout.TOKEN:
        return 0, c.stride(0), 0, c.stride(1), c.stride(2), 1
    if layout is CacheLayout.PAGED:
        return 0, c.stride(0), c.stride(1), c.stride(2), c.stride(3), c.shape[1]
    return c.stride(0), c.stride(2), 0, c.stride(1), c.stride(3), 1


def launch_config(p: RopeKVProblem) -> dict:
    """Rows per program and warps, per target.

    At large T each q program moves about 2K elements (a 32 x 64 or 16 x 128 tile) and each kv program
    half as many rows (it moves k and v); with fewer rows than ~512 such programs the rows are split
    finer (down to 8 per program) so that more SMs share the latency-bound work. Four warps measured
    best or within noise at every size on Hopper (benchmarks/RESULTS.md). On HIP a warp is a 64-lane
    wavefront: half the warps cover the same tile, and ``waves_per_eu`` leaves the compiler room for
    two waves per SIMD.
    """
    half = triton.next_power_of_2(p.rotary_dim // 2)
    d = triton.next_power_of_2(p.q.shape[-1])
    n_q_rows = p.num_tokens * p.q.shape[2]
    block_rq = max(1, 2048 // d)
    while block_rq > 8 and n_q_rows // block_rq < 512:
        block_rq //= 2
    cfg = dict(BLOCK_RQ=block_rq, BLOCK_RKV=max(1, block_rq // 2), BLOCK_HALF=half, BLOCK_D=d, num_warps=4)
    if torch.version.hip is not None and p.q.is_cuda:
        cfg.update(num_warps=2, waves_per_eu=2)
    return cfg


def launch(p: RopeKVProblem, q_out: torch.Tensor, k_out: torch.Tensor | None, **config) -> None:
    """Launch the kernel once (nothing for T = 0). ``q_out``/``k_out`` have the shapes of q/k."""
    if p.num_tokens == 0:
        return
    head_dim = p.q.shape[-1]
    qo = _as_bshd("q_out", q_out, p.layout, head_dim)
    ko = _as_bshd("k_out", k_out, p.layout, head_dim) if k_out is not None else qo
    kc = _cache_strides(p.k_cache, p.layout)
    vc = _cache_strides(p.v_cache, p.layout)
    cfg = launch_config(p)
    cfg.update(config)
    block_rq, block_rkv = cfg["BLOCK_RQ"], cfg["BLOCK_RKV"]
    n_q_programs = triton.cdiv(p.num_tokens * p.q.shape[2], block_rq)
    n_kv_programs = triton.cdiv(p.num_tokens * p.k.shape[2], block_rkv)
    tail = head_dim - p.rotary_dim
    pos = p.positions if p.positions is not None else p.slot_mapping  # dummy pointer when unused
    swa = p.swa_table if p.swa_table is not None else p.slot_mapping
    cos_bs, sin_bs = _per_token_strides(p.cos), _per_token_strides(p.sin)
    fp8 = p.k_cache.dtype in FP8_DTYPES
    _rope_kv_store_kernel[(n_q_programs + n_kv_programs,)](
        p.q, p.k, p.v, q_out, ko,
        p.k_cache, p.v_cache,
        p.slot_mapping, swa, pos,
        p.cos, p.sin,
        p.k_scale if p.k_scale is not None else p.cos, p.v_scale if p.v_scale is not None else p.cos,
        p.num_tokens, p.q.shape[1], p.q.shape[2], p.k.shape[2], head_dim, p.rotary_dim // 2, p.rotary_dim,
        n_q_programs, p.num_slots, swa.shape[0], p.cos.shape[0], kc[5],
        torch.finfo(p.k_cache.dtype).max if fp8 else 0.0,
        *p.q.stride(), *p.k.stride(), *p.v.stride(), *qo.stride(), *ko.stride(),
        *kc[:5], *vc[:5],
        _bstride(p.slot_mapping), p.slot_mapping.stride(1),
        _bstride(pos) if p.positions is not None else 0, pos.stride(-1),
        p.cos.stride(0), *cos_bs, p.cos.stride(-1),
        p.sin.stride(0), *sin_bs, p.sin.stride(-1),
        IS_NEOX=p.is_neox, COS_PER_ELEMENT=p.cos_per_element, HAS_POSITIONS=p.positions is not None,
        HAS_SWA=p.swa_table is not None, HAS_K_SCALE=p.k_scale is not None, HAS_V_SCALE=p.v_scale is not None,
        CACHE_IS_FP8=fp8, RETURN_K=k_out is not None, HAS_TAIL=tail > 0, NEGATIVE_WRAPS=p.negative_wraps,
        BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        **cfg,
    )


def _bstride(x: torch.Tensor) -> int:
    """Batch stride of a [B or 1, S] view: 0 when broadcast over the batch."""
    return x.stride(0) if x.shape[0] > 1 else 0


def _per_token_strides(c: torch.Tensor) -> tuple[int, int]:
    """(batch, token) strides of a per-token cos/sin seen as [B or 1, S, R']."""
    if c.dim() == 2:
        return 0, c.stride(0)
    return (c.stride(0) if c.shape[0] > 1 else 0), c.stride(1)


# --------------------------------------------------------------------------------------------
# Float reference (plain torch): the definition the kernel is tested against
# --------------------------------------------------------------------------------------------


def reference(p: RopeKVProblem, return_k: bool, compute_dtype: torch.dtype = torch.float64):
    """Same contract as the kernel, computed in ``compute_dtype``; writes the caches, returns (q_out, k_out)."""
    batch, seq = p.q.shape[:2]
    rot, half = p.rotary_dim, p.rotary_dim // 2

    def table(c: torch.Tensor) -> torch.Tensor:  # -> [B or 1, S, 1, R'] per token
        if p.positions is not None:
            pos = p.positions.long()
            pos = torch.where(pos < 0, pos + c.shape[0], pos) if p.negative_wraps else pos
            return c[pos.clamp(0, c.shape[0] - 1)].unsqueeze(2)
        return (c if c.dim() == 3 else c.unsqueeze(0)).unsqueeze(2)

    cos, sin = table(p.cos).to(compute_dtype), table(p.sin).to(compute_dtype)
    if p.is_neox:
        first, second = torch.arange(half), torch.arange(half) + half
    else:
        first, second = torch.arange(0, rot, 2), torch.arange(1, rot, 2)
    first, second = first.to(cos.device), second.to(cos.device)
    if p.cos_per_element:
        c1, c2, s1, s2 = cos[..., first], cos[..., second], sin[..., first], sin[..., second]
    else:
        c1 = c2 = cos
        s1 = s2 = sin

    def rope(x: torch.Tensor) -> torch.Tensor:
        out = x.to(compute_dtype, copy=True)  # never alias the input; the tail passes through
        x1, x2 = out[..., first].clone(), out[..., second].clone()
        out[..., first] = x1 * c1 - x2 * s1
        out[..., second] = x2 * c2 + x1 * s2
        return out

    q_rot, k_rot = rope(p.q), rope(p.k)

    slots = p.slot_mapping.long().expand(batch, seq)
    valid = torch.ones_like(slots, dtype=torch.bool)
    if p.swa_table is not None:
        n_swa = p.swa_table.shape[0]
        if p.negative_wraps:
            slots = torch.where(slots < 0, slots + n_swa, slots)
        valid = (slots >= 0) & (slots < n_swa)
        slots = p.swa_table[slots.clamp(0, n_swa - 1)].long()
    if p.negative_wraps:
        slots = torch.where(slots < 0, slots + p.num_slots, slots)
    store = valid & (slots >= 0) & (slots < p.num_slots)
    b_idx = torch.arange(batch, device=slots.device)[:, None].expand(batch, seq)[store]
    s_sel = slots[store]

    def put(cache: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None) -> None:
        x = x[store]  # [N, H, D]
        if scale is not None:
            x = x / scale.to(compute_dtype)
        if cache.dtype in FP8_DTYPES:
            fmax = torch.finfo(cache.dtype).max
            x = x.clamp(-fmax, fmax)
        x = x.to(cache.dtype)
        if p.layout is CacheLayout.TOKEN:
            cache[s_sel] = x
        elif p.layout is CacheLayout.PAGED:
            bs = cache.shape[1]
            cache[s_sel // bs, s_sel % bs] = x
        else:
            cache[b_idx, :, s_sel] = x

    put(p.k_cache, k_rot, p.k_scale)
    put(p.v_cache, p.v.to(compute_dtype), p.v_scale)
    q_out = q_rot.to(p.q.dtype).reshape(p.q_shape)
    k_out = k_rot.to(p.k.dtype).reshape(p.k_shape) if return_k else None
    return q_out, k_out
