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
from fx_fusion.kernels.launch import (NotTraceable, _constexpr_names, _static, assertion_options,
                                      fp8_store_arguments, interpreted)
from fx_fusion.kernels.mla_kernel import _mla_rope_store_kernel
from fx_fusion.kernels.options import FP8_DTYPES, MODEL_DTYPES, TABLE_DTYPES, CacheLayout, MlaOptions, make_mla_options
from fx_fusion.kernels.problem import (INDEX_DTYPES, _as_bs, _check_eager_fp8, _check_no_overlap, _check_rotary,
                                       _check_scales, _expect_tensor, check_cache_dtype, check_writable)
from fx_fusion.kernels.reference import cache_values, rotary_values

analysis_cache.install(_mla_rope_store_kernel)


@dataclass(frozen=True)
class MlaProblem:
    """Validated arguments: k_pe and kv_c seen as ``[T, R]`` / ``[T, L]``, the cache as rows without its head axis."""

    q_pe: torch.Tensor  # [T, HQ, R]
    q_nope: torch.Tensor | None  # [T, HQ, LQ]
    k_pe: torch.Tensor  # seen as [T, R]
    kv_c: torch.Tensor  # seen as [T, L]
    kv_cache: torch.Tensor  # as given
    cache_rows: torch.Tensor  # kv_cache seen as [num_slots, L + R] or [num_blocks, block_size, L + R]
    slot_mapping: torch.Tensor  # seen as [1, T]
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None  # seen as [1, T]
    k_scale: torch.Tensor | None
    options: MlaOptions
    k_pe_shape: torch.Size  # as given, for k_pe_out

    swa_table = None  # (no sliding-window table: ``problem.check_index_ranges`` reads it)

    @property
    def num_tokens(self) -> int:
        return self.q_pe.shape[0]

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
        return (*self.q_pe.shape[:2], self.q_nope_dim + self.rotary_dim)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype of the cache's values (``fp8_dtype`` for uint8 pools)."""
        return self.options.fp8_dtype or self.kv_cache.dtype

    @property
    def num_slots(self) -> int:
        """Valid slots are ``0 <= slot < num_slots``."""
        return self.cache_rows.shape[0] * self.block_size

    @property
    def block_size(self) -> int:
        return self.cache_rows.shape[1] if self.options.layout is CacheLayout.PAGED else 1

    @property
    def cos_per_element(self) -> bool:
        return self.cos.shape[-1] == self.rotary_dim


# kv_cache's dims per layout: without, then with the head axis of 1
_CACHE_NDIMS = {CacheLayout.TOKEN: (2, 3), CacheLayout.PAGED: (3, 4)}


def _single_head(name: str, x: torch.Tensor, what: str) -> torch.Tensor:
    """``[T, F]``, or ``[T, 1, F]`` seen as ``[T, F]``."""
    if x.dim() == 3:
        if x.shape[1] != 1:
            raise ValueError(f"{name} must be [T, {what}] or [T, 1, {what}] (one head), got shape {tuple(x.shape)}")
        return x.squeeze(1)
    return x


def prepare_mla(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin, positions=None, k_scale=None, *,
                options: MlaOptions | None = None, **kwargs) -> MlaProblem:
    """Check every argument (no device sync) and describe the problem; see ``problem.prepare``, whose rules these
    are. The options are ``options`` with the ``MlaOptions`` fields named in ``kwargs`` replaced."""
    o = make_mla_options(options, **kwargs)
    _expect_tensor("q_pe", q_pe, dtypes=MODEL_DTYPES, ndims=(3,))
    dev, dtype = q_pe.device, q_pe.dtype
    n_tok, heads, rot = q_pe.shape
    if heads == 0 or rot < 2 or rot % 2:
        raise ValueError(f"q_pe must be [T, Hq, R] with at least one head and an even R >= 2 (the rope features), "
                         f"got shape {tuple(q_pe.shape)}")
    if q_nope is not None:
        _expect_tensor("q_nope", q_nope, dtypes=(dtype,), ndims=(3,), device=dev)
        if q_nope.shape[:2] != q_pe.shape[:2] or q_nope.shape[2] == 0:
            raise ValueError(f"q_nope must be [T, Hq, LQ] = [{n_tok}, {heads}, LQ >= 1] (q_pe's tokens and heads), "
                             f"got shape {tuple(q_nope.shape)}")
    _expect_tensor("k_pe", k_pe, dtypes=(dtype,), ndims=(2, 3), device=dev)
    _expect_tensor("kv_c", kv_c, dtypes=(dtype,), ndims=(2, 3), device=dev)
    k2, c2 = _single_head("k_pe", k_pe, "R"), _single_head("kv_c", kv_c, "L")
    if k2.shape != (n_tok, rot):
        raise ValueError(f"k_pe must have {n_tok} tokens of R = {rot} features (q_pe's), got shape {tuple(k_pe.shape)}")
    if c2.shape[0] != n_tok or c2.shape[1] == 0:
        raise ValueError(f"kv_c must have {n_tok} tokens (q_pe's) of L >= 1 features, got shape {tuple(kv_c.shape)}")
    latent = c2.shape[1]

    ndims = _CACHE_NDIMS[o.layout]
    check_cache_dtype("kv_cache", kv_cache, ndims, dtype, dev, o.fp8_dtype, o.quant_dtype)
    rows = kv_cache
    if kv_cache.dim() == ndims[1]:
        if kv_cache.shape[-2] != 1:
            raise ValueError(f"kv_cache has {kv_cache.shape[-2]} heads (shape {tuple(kv_cache.shape)}), expected 1: "
                             "MLA caches hold one latent row per slot")
        rows = kv_cache.squeeze(-2)
    if rows.shape[-1] != latent + rot:
        raise ValueError(f"kv_cache has rows of {rows.shape[-1]} features (shape {tuple(kv_cache.shape)}), expected "
                         f"L + R = {latent} + {rot} = {latent + rot} (kv_c's, then k_pe's)")

    _expect_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, device=dev)
    slots = _as_bs("slot_mapping", slot_mapping, 1, n_tok, per_batch=False)
    _, pos2 = _check_rotary(cos, sin, positions, rot, rot, 1, n_tok, dev)
    _check_scales(k_scale, None, kv_cache.dtype, o.fp8_dtype, dev)
    _check_eager_fp8(dev, o.fp8_dtype or kv_cache.dtype, o.quant_dtype, o.scale_mul, o.clamp)
    inputs = dict(q_pe=q_pe, q_nope=q_nope, k_pe=k_pe, kv_c=kv_c, slot_mapping=slot_mapping, cos=cos, sin=sin,
                  positions=positions, k_scale=k_scale)
    _check_no_overlap({name: x for name, x in inputs.items() if x is not None}, {"kv_cache": kv_cache})
    check_writable("kv_cache", kv_cache)
    return MlaProblem(q_pe, q_nope, k2, c2, kv_cache, rows, slots, cos, sin, pos2, k_scale, o, k_pe.shape)


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def launch_config(p: MlaProblem) -> dict:
    """Rows per program and warps, per target.

    A q program writes BLOCK_RQ (token, head) rows of LQ + R features, a kv program BLOCK_RKV tokens' cache rows of
    L + R: about 2K elements each at large T, as the existing kernel's programs move (``launch.launch_config``), and
    finer (down to one row) while there are fewer than ~512 programs, so that small decode batches still spread over
    the SMs. Four warps; on HIP, where a warp is a 64-lane wavefront, two. Not yet measured on a GPU. Under
    torch.compile a symbolic token count keeps the large-T tiles (no guard on it). In the interpreter: few programs of
    large tiles (its cost is per program).
    """
    half = triton.next_power_of_2(_static(p.rotary_dim) // 2)
    block_lq = triton.next_power_of_2(max(_static(p.q_nope_dim), 1))
    block_l = triton.next_power_of_2(_static(p.latent_dim))
    q_width = (block_lq if p.q_nope is not None else 0) + 2 * half
    kv_width = block_l + 2 * half
    budget = 16384 if interpreted() and p.q_pe.device.type == "cpu" else 2048
    block_rq = triton.next_power_of_2(max(1, budget // q_width))
    block_rkv = triton.next_power_of_2(max(1, budget // kv_width))
    n_tok = p.num_tokens
    if budget == 2048 and isinstance(n_tok, int):
        while block_rq > 1 and n_tok * p.q_pe.shape[1] // block_rq < 512:
            block_rq //= 2
        while block_rkv > 1 and n_tok // block_rkv < 512:
            block_rkv //= 2
    cfg = dict(BLOCK_RQ=block_rq, BLOCK_RKV=block_rkv, BLOCK_HALF=half, BLOCK_LQ=block_lq, BLOCK_L=block_l,
               num_warps=4)
    if torch.version.hip is not None and p.q_pe.is_cuda:
        cfg.update(num_warps=2)
    return cfg


def kernel_arguments(p: MlaProblem, q_out: torch.Tensor, k_out: torch.Tensor | None, **config) -> tuple[tuple, dict]:
    """``(grid, keyword arguments)`` of one launch; ``config`` overrides ``launch_config(p)``. Run-time values: the
    tensors (absent ones None), the token count and the inputs' token strides; everything else is a constexpr."""
    o = p.options
    ko = k_out.reshape(p.num_tokens, p.rotary_dim) if k_out is not None else None
    rows, paged = p.cache_rows, o.layout is CacheLayout.PAGED
    fp8 = p.kv_cache.dtype in FP8_DTYPES
    cfg = launch_config(p) | config
    qn = p.q_nope
    args = dict(
        q_pe_ptr=p.q_pe, q_nope_ptr=qn, q_out_ptr=q_out, k_pe_ptr=p.k_pe, kv_c_ptr=p.kv_c, k_out_ptr=ko,
        kv_cache_ptr=p.kv_cache, slot_ptr=p.slot_mapping, pos_ptr=p.positions, cos_ptr=p.cos, sin_ptr=p.sin,
        k_scale_ptr=p.k_scale, T=p.num_tokens,
        qpe_ss=p.q_pe.stride(0), qnope_ss=qn.stride(0) if qn is not None else None,
        kpe_ss=p.k_pe.stride(0), kvc_ss=p.kv_c.stride(0),
        qpe_sh=p.q_pe.stride(1), qpe_sd=p.q_pe.stride(2),
        qnope_sh=qn.stride(1) if qn is not None else None, qnope_sd=qn.stride(2) if qn is not None else None,
        qo_ss=q_out.stride(0), qo_sh=q_out.stride(1), qo_sd=q_out.stride(2),
        kpe_sd=p.k_pe.stride(1), kvc_sd=p.kv_c.stride(1),
        ko_ss=ko.stride(0) if ko is not None else None, ko_sd=ko.stride(1) if ko is not None else None,
        kc_sblk=rows.stride(0), kc_sslot=rows.stride(1) if paged else 0, kc_sd=rows.stride(-1),
        slot_ss=p.slot_mapping.stride(1), pos_ss=p.positions.stride(1) if p.positions is not None else None,
        cos_sr=p.cos.stride(-2), cos_sd=p.cos.stride(-1), sin_sr=p.sin.stride(-2), sin_sd=p.sin.stride(-1),
        HQ=p.q_pe.shape[1], LQ=p.q_nope_dim, L=p.latent_dim, R=p.rotary_dim,
        N_SLOTS=p.num_slots, N_POSITIONS=p.cos.shape[0] if p.positions is not None else None,
        CACHE_BLOCK_SIZE=p.block_size, FP8_MAX=torch.finfo(p.kv_cache.dtype).max if fp8 else None,
        **fp8_store_arguments(o, p.q_pe.device, p.q_pe.dtype, p.kv_cache.dtype, p.stored_dtype),
        IS_NEOX=o.is_neox, COS_PER_ELEMENT=p.cos_per_element, NEGATIVE_WRAPS=o.negative_wraps,
        CHECK_SLOTS=o.check_slots, CHECK_POSITIONS=o.check_positions,
        ROUND_TABLE=TABLE_DTYPES.index(o.table_dtype),
        **cfg,
    )
    n_q_programs = triton.cdiv(p.num_tokens * p.q_pe.shape[1], cfg["BLOCK_RQ"])
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
    symbolic = sorted(name for name in _constexpr_names(_mla_rope_store_kernel)
                      if isinstance(args.get(name), torch.SymInt))
    if symbolic:
        raise NotTraceable(f"the kernel takes {', '.join(symbolic)} as compile-time constants, but they are "
                           "symbolic here: launching it from traced code would specialise them")
    torch.library.wrap_triton(_mla_rope_store_kernel)[grid](**args)  # the launch for T = 0 is empty
    return q_out, k_out


# --------------------------------------------------------------------------------------------------
# Float reference
# --------------------------------------------------------------------------------------------------


def reference(p: MlaProblem, compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's contract in plain torch, computed in ``compute_dtype``: writes the cache, returns ``(q_out,
    k_pe_out or None)`` (None unless ``return_k``)."""
    o = p.options
    first, second, c1, c2, s1, s2 = rotary_values(p.cos, p.sin, p.positions, p.rotary_dim, o, compute_dtype)
    c1, c2, s1, s2 = (c[0] for c in (c1, c2, s1, s2))  # [T, 1, R']

    def rope(x: torch.Tensor) -> torch.Tensor:  # [T, H, R]
        out = x.to(compute_dtype, copy=True)
        x1, x2 = out[..., first].clone(), out[..., second].clone()
        out[..., first] = x1 * c1 - x2 * s1
        out[..., second] = x2 * c2 + x1 * s2
        return out

    q_rot = rope(p.q_pe)
    k_rot = rope(p.k_pe[:, None])[:, 0]  # [T, R]
    slots = p.slot_mapping[0].long()
    if o.negative_wraps:
        slots = torch.where(slots < 0, slots + p.num_slots, slots)
    store = (slots >= 0) & (slots < p.num_slots)
    row = torch.cat([p.kv_c.to(compute_dtype), k_rot], dim=-1)[store]
    values = cache_values(row, p.kv_cache.dtype, p.stored_dtype, p.k_scale, o, p.q_pe.dtype, compute_dtype)
    sel = slots[store]
    if o.layout is CacheLayout.PAGED:
        p.cache_rows[sel // p.block_size, sel % p.block_size] = values
    else:
        p.cache_rows[sel] = values
    q_out = q_rot.to(p.q_pe.dtype)
    if p.q_nope is not None:
        q_out = torch.cat([p.q_nope, q_out], dim=-1)
    k_out = k_rot.to(p.k_pe.dtype).reshape(p.k_pe_shape) if o.return_k else None
    return q_out.contiguous(), k_out


def reference_problem(p: MlaProblem) -> MlaProblem:
    """``p`` on a copy of its cache (for the reference to write)."""
    cache = p.kv_cache.clone()
    rows = cache.squeeze(-2) if cache.dim() == _CACHE_NDIMS[p.options.layout][1] else cache
    return dataclasses.replace(p, kv_cache=cache, cache_rows=rows)
