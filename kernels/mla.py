"""The fused MLA RoPE + cache store's host side: checks (``prepare_mla`` -> ``MlaProblem``), the launch configuration
and arguments, the direct and the traceable launch, and the float reference. The kernel, its maths and layouts:
``mla_kernel``; the custom op ``torch.ops.fx_fusion.mla_rope_store``: ``ops``.

The checks are the existing op's (``problem``'s helpers): argument types, dtypes and devices, the cache's dtype
(model dtype, fp8, or a uint8 pool with ``fp8_dtype``), scales, eager fp8 store options, no input sharing memory with
the cache, eager's refusals to write it; ``problem.check_index_ranges`` takes an ``MlaProblem`` as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton

from fx_fusion.kernels import analysis_cache
from fx_fusion.kernels.launch import (_static, assertion_options, check_traceable, fp8_store_arguments,
                                      interpreted)
from fx_fusion.kernels.mla_kernel import _mla_rope_store_kernel
from fx_fusion.kernels.options import FP8_DTYPES, MODEL_DTYPES, TABLE_DTYPES, CacheLayout, MlaOptions, make_mla_options
from fx_fusion.kernels.problem import (INDEX_DTYPES, _as_bs, _check_eager_fp8, _check_no_overlap, _check_rotary,
                                       _check_scales, _expect_tensor, check_cache_dtype, check_writable)
from fx_fusion.kernels.reference import cache_values, rotary_values

analysis_cache.install(_mla_rope_store_kernel)


@dataclass(frozen=True)
class MlaProblem:
    """Validated arguments: k_pe and kv_c seen as ``[T, R]`` / ``[T, L]`` (sequence layout: ``[B, S, R]`` /
    ``[B, S, L]``), the caches as rows without their head axis."""

    q_pe: torch.Tensor  # [T, HQ, R] (sequence: [B, S, HQ, R])
    q_nope: torch.Tensor | None  # [T, HQ, LQ] (sequence: [B, S, HQ, LQ])
    k_pe: torch.Tensor  # seen as [T, R] (sequence: [B, S, R])
    kv_c: torch.Tensor  # seen as [T, L] (sequence: [B, S, L])
    kv_cache: torch.Tensor  # as given
    cache_rows: torch.Tensor  # kv_cache seen as [num_slots, W], [num_blocks, block_size, W] or [B, S_max, W]
    slot_mapping: torch.Tensor  # seen as [1, T] (sequence: [1, S], the cache_position)
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None  # seen as [B or 1, S]
    k_scale: torch.Tensor | None
    options: MlaOptions
    k_pe_shape: torch.Size  # as given, for k_pe_out
    k_pe_cache: torch.Tensor | None = None  # as given (None: the rotated k_pe goes to kv_cache's last R features)
    k_pe_rows: torch.Tensor | None = None  # k_pe_cache seen as rows, as cache_rows

    swa_table = None  # (no sliding-window table: ``problem.check_index_ranges`` reads it)

    @property
    def sequence(self) -> bool:
        return self.options.layout is CacheLayout.SEQUENCE

    @property
    def batch(self) -> int:
        return self.q_pe.shape[0] if self.sequence else 1

    @property
    def num_tokens(self) -> int:
        """B * S (T for the flat layouts)."""
        return self.q_pe.shape[0] * self.q_pe.shape[1] if self.sequence else self.q_pe.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q_pe.shape[-2]

    @property
    def rotary_dim(self) -> int:
        return self.q_pe.shape[-1]

    @property
    def latent_dim(self) -> int:
        """L: kv_c's features, the first L of a cache row."""
        return self.kv_c.shape[-1]

    @property
    def q_nope_dim(self) -> int:
        """LQ: q_nope's features (0 without it), the first LQ of a q_out row."""
        return self.q_nope.shape[-1] if self.q_nope is not None else 0

    @property
    def q_out_shape(self) -> tuple:
        return (*self.q_pe.shape[:-1], self.q_nope_dim + self.rotary_dim)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype of the cache's values (``fp8_dtype`` for uint8 pools)."""
        return self.options.fp8_dtype or self.kv_cache.dtype

    @property
    def num_slots(self) -> int:
        """Valid slots are ``0 <= slot < num_slots`` (sequence layout: per batch row)."""
        if self.sequence:
            return self.cache_rows.shape[1]
        return self.cache_rows.shape[0] * self.block_size

    @property
    def block_size(self) -> int:
        return self.cache_rows.shape[1] if self.options.layout is CacheLayout.PAGED else 1

    @property
    def cos_per_element(self) -> bool:
        return self.cos.shape[-1] == self.rotary_dim

    def bs(self, x: torch.Tensor) -> torch.Tensor:
        """A token-major tensor of this problem seen as ``[B, S, ...]`` (flat layouts: ``[1, T, ...]``)."""
        return x if self.sequence else x.unsqueeze(0)


# kv_cache's dims per layout: without, then with the head axis of 1 (sequence: always [B, 1, S_max, W])
_CACHE_NDIMS = {CacheLayout.TOKEN: (2, 3), CacheLayout.PAGED: (3, 4), CacheLayout.SEQUENCE: (4, 4)}


def _single_head(name: str, x: torch.Tensor, what: str, sequence: bool) -> torch.Tensor:
    """``[T, F]``, or ``[T, 1, F]`` seen as ``[T, F]`` (sequence layout: ``[B, S, (1,) F]`` as ``[B, S, F]``)."""
    if x.dim() == 3 + sequence:
        if x.shape[-2] != 1:
            lead = "B, S" if sequence else "T"
            raise ValueError(f"{name} must be [{lead}, {what}] or [{lead}, 1, {what}] (one head), got shape "
                             f"{tuple(x.shape)}")
        return x.squeeze(-2)
    return x


def _cache_rows(name: str, cache: torch.Tensor, layout: CacheLayout, width: int, what: str) -> torch.Tensor:
    """``cache`` (dtype and dims checked) without its head axis of 1, its rows ``width`` wide."""
    rows = cache
    if layout is CacheLayout.SEQUENCE:
        if cache.shape[1] != 1:
            raise ValueError(f"{name} has {cache.shape[1]} heads (shape {tuple(cache.shape)}, [B, 1, S_max, W]), "
                             "expected 1: MLA caches hold one latent row per slot")
        rows = cache.squeeze(1)
    elif cache.dim() == _CACHE_NDIMS[layout][1]:
        if cache.shape[-2] != 1:
            raise ValueError(f"{name} has {cache.shape[-2]} heads (shape {tuple(cache.shape)}), expected 1: "
                             "MLA caches hold one latent row per slot")
        rows = cache.squeeze(-2)
    if rows.shape[-1] != width:
        raise ValueError(f"{name} has rows of {rows.shape[-1]} features (shape {tuple(cache.shape)}), expected "
                         f"{what}")
    return rows


def prepare_mla(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin, positions=None, k_scale=None,
                k_pe_cache=None, *, options: MlaOptions | None = None, **kwargs) -> MlaProblem:
    """Check every argument (no device sync) and describe the problem; see ``problem.prepare``, whose rules these
    are. The options are ``options`` with the ``MlaOptions`` fields named in ``kwargs`` replaced."""
    o = make_mla_options(options, **kwargs)
    seq_layout = o.layout is CacheLayout.SEQUENCE
    if o.deinterleave and o.is_neox:
        raise ValueError("deinterleave=True rotates GPT-J pairs (2i, 2i + 1) and writes them as halves; it needs "
                         "is_neox=False")
    lead = "B, S" if seq_layout else "T"
    _expect_tensor("q_pe", q_pe, dtypes=MODEL_DTYPES, ndims=(3 + seq_layout,))
    dev, dtype = q_pe.device, q_pe.dtype
    heads, rot = q_pe.shape[-2:]
    tokens = tuple(q_pe.shape[:-2])  # (T,) or (B, S)
    n_tok = " x ".join(map(str, tokens))
    if heads == 0 or rot < 2 or rot % 2:
        raise ValueError(f"q_pe must be [{lead}, Hq, R] with at least one head and an even R >= 2 (the rope "
                         f"features), got shape {tuple(q_pe.shape)}")
    if q_nope is not None:
        _expect_tensor("q_nope", q_nope, dtypes=(dtype,), ndims=(3 + seq_layout,), device=dev)
        if q_nope.shape[:-1] != q_pe.shape[:-1] or q_nope.shape[-1] == 0:
            raise ValueError(f"q_nope must be [{lead}, Hq, LQ] = [{n_tok}, {heads}, LQ >= 1] "
                             f"(q_pe's tokens and heads), got shape {tuple(q_nope.shape)}")
    _expect_tensor("k_pe", k_pe, dtypes=(dtype,), ndims=(2 + seq_layout, 3 + seq_layout), device=dev)
    _expect_tensor("kv_c", kv_c, dtypes=(dtype,), ndims=(2 + seq_layout, 3 + seq_layout), device=dev)
    k2, c2 = (_single_head("k_pe", k_pe, "R", seq_layout), _single_head("kv_c", kv_c, "L", seq_layout))
    if k2.shape != (*tokens, rot):
        raise ValueError(f"k_pe must have {n_tok} tokens of R = {rot} features (q_pe's), got shape "
                         f"{tuple(k_pe.shape)}")
    if tuple(c2.shape[:-1]) != tokens or c2.shape[-1] == 0:
        raise ValueError(f"kv_c must have {n_tok} tokens (q_pe's) of L >= 1 features, got shape {tuple(kv_c.shape)}")
    latent = c2.shape[-1]

    ndims = _CACHE_NDIMS[o.layout]
    check_cache_dtype("kv_cache", kv_cache, ndims, dtype, dev, o.fp8_dtype, o.quant_dtype)
    kp_rows = None
    if k_pe_cache is None:
        rows = _cache_rows("kv_cache", kv_cache, o.layout, latent + rot,
                           f"L + R = {latent} + {rot} = {latent + rot} (kv_c's, then k_pe's)")
    else:
        rows = _cache_rows("kv_cache", kv_cache, o.layout, latent, f"L = {latent} (kv_c's; k_pe_cache holds k_pe)")
        _expect_tensor("k_pe_cache", k_pe_cache, dtypes=(kv_cache.dtype,), ndims=ndims, device=dev)
        kp_rows = _cache_rows("k_pe_cache", k_pe_cache, o.layout, rot, f"R = {rot} (k_pe's)")
        if kp_rows.shape[:-1] != rows.shape[:-1]:
            raise ValueError(f"k_pe_cache has {tuple(kp_rows.shape[:-1])} slots (shape {tuple(k_pe_cache.shape)}), "
                             f"but kv_cache has {tuple(rows.shape[:-1])} (shape {tuple(kv_cache.shape)}): one slot "
                             "of each per token")
    if seq_layout and rows.shape[0] != tokens[0]:
        raise ValueError(f"kv_cache has batch {rows.shape[0]} (shape {tuple(kv_cache.shape)}), but q_pe has batch "
                         f"{tokens[0]}")

    _expect_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, device=dev)
    batch, seq = (tokens if seq_layout else (1, tokens[0]))
    slots = _as_bs("slot_mapping", slot_mapping, 1, seq, per_batch=False)
    _, pos2 = _check_rotary(cos, sin, positions, rot, rot, batch, seq, dev)
    _check_scales(k_scale, None, kv_cache.dtype, o.fp8_dtype, dev)
    _check_eager_fp8(dev, o.fp8_dtype or kv_cache.dtype, o.quant_dtype, o.scale_mul, o.clamp)
    inputs = dict(q_pe=q_pe, q_nope=q_nope, k_pe=k_pe, kv_c=kv_c, slot_mapping=slot_mapping, cos=cos, sin=sin,
                  positions=positions, k_scale=k_scale)
    caches = {"kv_cache": kv_cache} | ({"k_pe_cache": k_pe_cache} if k_pe_cache is not None else {})
    _check_no_overlap({name: x for name, x in inputs.items() if x is not None}, caches)
    if k_pe_cache is not None:
        _check_no_overlap({"k_pe_cache": k_pe_cache}, {"kv_cache": kv_cache})
    for name, cache in caches.items():
        check_writable(name, cache)
    return MlaProblem(q_pe, q_nope, k2, c2, kv_cache, rows, slots, cos, sin, pos2, k_scale, o, k_pe.shape,
                      k_pe_cache, kp_rows)


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def launch_config(p: MlaProblem) -> dict:
    """Rows per program and warps, per target.

    A q program writes BLOCK_RQ (token, head) rows of LQ + R features, a kv program BLOCK_RKV tokens' cache rows of
    L + R: about 2K elements each at large T, as the existing kernel's programs move (``launch.launch_config``), and
    finer (down to one row) while there are fewer than ~512 programs, so that small decode batches still spread over
    the SMs. Four warps; on HIP, where a warp is a 64-lane wavefront, two. Under torch.compile a symbolic token count
    keeps the large-T tiles (no guard on it). In the interpreter: few programs of large tiles (its cost is per
    program).

    An fp8 cache takes one row per kv program (of 4 at L + R = 576). The fp8 cast took the kernel from 32 to 35-40
    registers a thread on sm_90 at 2-4 rows (48 resident warps of 64, for the q programs too); one row needs 30-32.
    Measured on an H200 (DeepSeek-V3, SGLang's uint8 pool, T = 8192 / 32768, the cast by the conversion instruction;
    benchmarks/RESULTS.md): at 16 q heads 88.3 / 349 us with 1 row, 90.9 / 357 with 2, 91.3 / 357 with 4; with the
    pass's index checks 88.7 / 351, 91.4 / 360, 95.2 / 373; at 128 q heads 600 / 2396 with 1 row, 633 / 2527 with 2.
    """
    half = triton.next_power_of_2(_static(p.rotary_dim) // 2)
    block_lq = triton.next_power_of_2(max(_static(p.q_nope_dim), 1))
    block_l = triton.next_power_of_2(_static(p.latent_dim))
    q_width = (block_lq if p.q_nope is not None else 0) + 2 * half
    kv_width = block_l + 2 * half
    budget = 16384 if interpreted() and p.q_pe.device.type == "cpu" else 2048
    block_rq = triton.next_power_of_2(max(1, budget // q_width))
    block_rkv = triton.next_power_of_2(max(1, budget // kv_width))
    if budget == 2048 and p.stored_dtype in FP8_DTYPES:
        block_rkv = 1
    n_tok = p.num_tokens
    if budget == 2048 and isinstance(n_tok, int):
        while block_rq > 1 and n_tok * p.num_heads // block_rq < 512:
            block_rq //= 2
        while block_rkv > 1 and n_tok // block_rkv < 512:
            block_rkv //= 2
    cfg = dict(BLOCK_RQ=block_rq, BLOCK_RKV=block_rkv, BLOCK_HALF=half, BLOCK_LQ=block_lq, BLOCK_L=block_l,
               num_warps=4)
    if torch.version.hip is not None and p.q_pe.is_cuda:
        cfg.update(num_warps=2)
    return cfg


def _cache_strides(p: MlaProblem, rows: torch.Tensor | None) -> tuple:
    """``(sb, sblk, sslot, sd)`` of cache rows for the kernel's address formula (see its signature)."""
    if rows is None:
        return None, None, None, None
    layout = p.options.layout
    if layout is CacheLayout.SEQUENCE:
        return rows.stride(0), rows.stride(1), 0, rows.stride(2)
    if layout is CacheLayout.PAGED:
        return None, rows.stride(0), rows.stride(1), rows.stride(2)
    return None, rows.stride(0), 0, rows.stride(1)


def kernel_arguments(p: MlaProblem, q_out: torch.Tensor, k_out: torch.Tensor | None, **config) -> tuple[tuple, dict]:
    """``(grid, keyword arguments)`` of one launch; ``config`` overrides ``launch_config(p)``. Run-time values: the
    tensors (absent ones None), the token count, the batch strides and the inputs' token strides; everything else
    is a constexpr."""
    o = p.options
    q4, qo4, k3, c3 = p.bs(p.q_pe), p.bs(q_out), p.bs(p.k_pe), p.bs(p.kv_c)
    qn = p.bs(p.q_nope) if p.q_nope is not None else None
    ko = k_out.reshape(*k3.shape) if k_out is not None else None
    fp8 = p.kv_cache.dtype in FP8_DTYPES
    cfg = launch_config(p) | config
    batched = p.batch > 1

    def sb(x):  # a batch stride, None where the batch index is always 0 or the tensor is broadcast over it
        return x.stride(0) if x is not None and batched and x.shape[0] > 1 else None

    kc_sb, kc_sblk, kc_sslot, kc_sd = _cache_strides(p, p.cache_rows)
    kp_sb, kp_sblk, kp_sslot, kp_sd = _cache_strides(p, p.k_pe_rows)
    per_token = p.positions is None
    cos3 = p.cos if not per_token or p.cos.dim() == 3 else p.cos.unsqueeze(0)
    sin3 = p.sin if not per_token or p.sin.dim() == 3 else p.sin.unsqueeze(0)
    args = dict(
        q_pe_ptr=p.q_pe, q_nope_ptr=p.q_nope, q_out_ptr=q_out, k_pe_ptr=p.k_pe, kv_c_ptr=p.kv_c, k_out_ptr=ko,
        kv_cache_ptr=p.kv_cache, k_pe_cache_ptr=p.k_pe_cache, slot_ptr=p.slot_mapping, pos_ptr=p.positions,
        cos_ptr=p.cos, sin_ptr=p.sin, k_scale_ptr=p.k_scale, T=p.num_tokens,
        qpe_sb=sb(q4), qnope_sb=sb(qn), qo_sb=sb(qo4), kpe_sb=sb(k3), kvc_sb=sb(c3), ko_sb=sb(ko),
        kc_sb=kc_sb if batched else None, kp_sb=kp_sb if batched else None, pos_sb=sb(p.positions),
        cos_sb=sb(cos3) if per_token else None, sin_sb=sb(sin3) if per_token else None,
        qpe_ss=q4.stride(1), qnope_ss=qn.stride(1) if qn is not None else None,
        kpe_ss=k3.stride(1), kvc_ss=c3.stride(1),
        qpe_sh=q4.stride(2), qpe_sd=q4.stride(3),
        qnope_sh=qn.stride(2) if qn is not None else None, qnope_sd=qn.stride(3) if qn is not None else None,
        qo_ss=qo4.stride(1), qo_sh=qo4.stride(2), qo_sd=qo4.stride(3),
        kpe_sd=k3.stride(2), kvc_sd=c3.stride(2),
        ko_ss=ko.stride(1) if ko is not None else None, ko_sd=ko.stride(2) if ko is not None else None,
        kc_sblk=kc_sblk, kc_sslot=kc_sslot, kc_sd=kc_sd, kp_sblk=kp_sblk, kp_sslot=kp_sslot, kp_sd=kp_sd,
        slot_ss=p.slot_mapping.stride(1), pos_ss=p.positions.stride(1) if p.positions is not None else None,
        cos_sr=p.cos.stride(-2), cos_sd=p.cos.stride(-1), sin_sr=p.sin.stride(-2), sin_sd=p.sin.stride(-1),
        B=p.batch, HQ=p.num_heads, LQ=p.q_nope_dim, L=p.latent_dim, R=p.rotary_dim,
        N_SLOTS=p.num_slots, N_POSITIONS=p.cos.shape[0] if p.positions is not None else None,
        CACHE_BLOCK_SIZE=p.block_size, FP8_MAX=torch.finfo(p.kv_cache.dtype).max if fp8 else None,
        **fp8_store_arguments(o, p.q_pe.device, p.q_pe.dtype, p.kv_cache.dtype, p.stored_dtype),
        IS_NEOX=o.is_neox, COS_PER_ELEMENT=p.cos_per_element, NEGATIVE_WRAPS=o.negative_wraps,
        DEINTERLEAVE=o.deinterleave, CHECK_SLOTS=o.check_slots, CHECK_POSITIONS=o.check_positions,
        ROUND_TABLE=TABLE_DTYPES.index(o.table_dtype),
        **cfg,
    )
    n_q_programs = triton.cdiv(p.num_tokens * p.num_heads, cfg["BLOCK_RQ"])
    n_kv_programs = triton.cdiv(p.num_tokens, cfg["BLOCK_RKV"])
    return (n_q_programs + n_kv_programs,), args


def outputs(p: MlaProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(q_out, k_pe_out)``; ``k_pe_out`` is empty unless ``return_k``."""
    return (p.q_pe.new_empty(p.q_out_shape),
            p.k_pe.new_empty(p.k_pe_shape if p.options.return_k else (0,)))


def launch(p: MlaProblem, q_out: torch.Tensor, k_out: torch.Tensor | None, **config) -> None:
    """Launch the kernel once (nothing for T = 0). ``q_out``: ``[T, HQ, LQ + R]`` contiguous; ``k_out``: k_pe's
    shape, contiguous, or None."""
    if p.num_tokens == 0:
        return
    grid, args = kernel_arguments(p, q_out, k_out, **config)
    _mla_rope_store_kernel[grid](**args, **assertion_options(p.options, p.q_pe))


def launch_traceable(p: MlaProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch through ``torch.library.wrap_triton`` (see ``launch.launch_traceable``);
    returns ``(q_out, k_pe_out)``, ``k_pe_out`` empty unless ``return_k``."""
    q_out = torch.empty(p.q_out_shape, dtype=p.q_pe.dtype, device=p.q_pe.device)
    k_out = torch.empty(p.k_pe_shape if p.options.return_k else (0,), dtype=p.k_pe.dtype, device=p.k_pe.device)
    grid, args = kernel_arguments(p, q_out, k_out if p.options.return_k else None)
    check_traceable(_mla_rope_store_kernel, args)
    torch.library.wrap_triton(_mla_rope_store_kernel)[grid](**args)  # the launch for T = 0 is empty
    return q_out, k_out


# --------------------------------------------------------------------------------------------------
# Float reference
# --------------------------------------------------------------------------------------------------


def reference(p: MlaProblem, compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's contract in plain torch, computed in ``compute_dtype``: writes the cache(s), returns ``(q_out,
    k_pe_out or None)`` (None unless ``return_k``)."""
    o = p.options
    first, second, c1, c2, s1, s2 = rotary_values(p.cos, p.sin, p.positions, p.rotary_dim, o, compute_dtype)
    # c1.. [B or 1, S, 1, R']

    def rope(x: torch.Tensor) -> torch.Tensor:  # [B, S, H, R]
        out = x.to(compute_dtype, copy=True)
        x1, x2 = out[..., first].clone(), out[..., second].clone()
        out[..., first] = x1 * c1 - x2 * s1
        out[..., second] = x2 * c2 + x1 * s2
        if o.deinterleave:  # pair i written at (i, i + R/2)
            out = torch.cat([out[..., first], out[..., second]], dim=-1)
        return out

    q_rot = rope(p.bs(p.q_pe))  # [B, S, HQ, R]
    k_rot = rope(p.bs(p.k_pe)[:, :, None])[:, :, 0]  # [B, S, R]
    slots = p.slot_mapping[0].long()
    if o.negative_wraps:
        slots = torch.where(slots < 0, slots + p.num_slots, slots)
    store = (slots >= 0) & (slots < p.num_slots)
    sel = slots[store]

    def write(rows: torch.Tensor, x: torch.Tensor) -> None:  # x [B, S, W] in compute_dtype
        values = cache_values(x[:, store], p.kv_cache.dtype, p.stored_dtype, p.k_scale, o, p.q_pe.dtype,
                              compute_dtype)
        if o.layout is CacheLayout.SEQUENCE:
            rows[:, sel] = values
        elif o.layout is CacheLayout.PAGED:
            rows[sel // p.block_size, sel % p.block_size] = values[0]
        else:
            rows[sel] = values[0]

    kv_c = p.bs(p.kv_c).to(compute_dtype)
    if p.k_pe_cache is None:
        write(p.cache_rows, torch.cat([kv_c, k_rot], dim=-1))
    else:
        write(p.cache_rows, kv_c)
        write(p.k_pe_rows, k_rot)
    q_out = q_rot.to(p.q_pe.dtype)
    if p.q_nope is not None:
        q_out = torch.cat([p.bs(p.q_nope), q_out], dim=-1)
    q_out = q_out.reshape(p.q_out_shape)
    k_out = k_rot.to(p.k_pe.dtype).reshape(p.k_pe_shape) if o.return_k else None
    return q_out.contiguous(), k_out


def reference_problem(p: MlaProblem) -> MlaProblem:
    """``p`` on a copy of its cache(s) (for the reference to write)."""
    def rows_of(cache: torch.Tensor) -> torch.Tensor:
        if p.sequence:
            return cache.squeeze(1)
        return cache.squeeze(-2) if cache.dim() == _CACHE_NDIMS[p.options.layout][1] else cache

    cache = p.kv_cache.clone()
    kp = p.k_pe_cache.clone() if p.k_pe_cache is not None else None
    return dataclasses.replace(p, kv_cache=cache, cache_rows=rows_of(cache), k_pe_cache=kp,
                               k_pe_rows=rows_of(kp) if kp is not None else None)
