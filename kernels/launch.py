"""Launching the fused RoPE + KV-cache store kernel: the launch configuration per target (``launch_config``), the
kernel's keyword arguments from a ``RopeKVProblem`` (``kernel_arguments``), and the two launches: direct
(``launch``) and through ``torch.library.wrap_triton`` for traced code (``launch_traceable``).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import guard_int

from fx_fusion.kernels import analysis_cache
from fx_fusion.kernels.fp8_rules import eager_fp8_cast
from fx_fusion.kernels.problem import FP8_DTYPES, TABLE_DTYPES, CacheLayout, RopeKVProblem, _as_bshd
from fx_fusion.kernels.rope_kv_kernel import _rope_kv_store_kernel

analysis_cache.install(_rope_kv_store_kernel)  # Inductor analyses the kernel once per configuration, not per site


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``, read as Triton reads it)."""
    return bool(triton.knobs.runtime.interpret)


def launch_config(p: RopeKVProblem) -> dict:
    """Rows per program and warps, per target.

    At large T each q program moves about 2K elements (a 32 x 64 or 16 x 128 tile) and each kv program
    half as many rows (it moves k and v), as many for a sequence cache; with fewer rows than ~512 such programs the rows are split
    finer (down to 8 per program) so that more SMs share the latency-bound work. Four warps measured
    best or within noise at every size on Hopper (benchmarks/RESULTS.md). On HIP a warp is a 64-lane
    wavefront: half the warps cover the same tile. (No ``waves_per_eu``: from Triton 3.6 on it also caps
    occupancy, and Inductor's launch of a user kernel does not pass it.)

    Under torch.compile the token count may be symbolic: a decision on it would install a guard (one
    compile per count), so then only the static dims decide and the large-T tiles are used (the sweep
    found at most ~4 % between configurations at small T).
    """
    half = triton.next_power_of_2(_static(p.options.rotary_dim) // 2)
    d = triton.next_power_of_2(_static(p.q.shape[-1]))
    block_rq = max(1, 2048 // d)
    n_q_rows = p.num_tokens * p.q.shape[2]
    if interpreted() and p.q.device.type == "cpu":
        # the interpreter runs the launch: its cost is per program and per operation, not per element, so few
        # programs of large tiles (numpy arrays of up to 16K elements). Compiled kernels never get these tiles
        # (the HIP and sm_90 compile tests record CPU launches of the compiled kernel: the GPUs' tiles).
        block_rq = max(1, 16384 // d)
    elif isinstance(n_q_rows, int):
        while block_rq > 8 and n_q_rows // block_rq < 512:
            block_rq //= 2
    # sequence caches [B, Hkv, S, D]: a kv tile of as many rows as a q tile stores longer runs of one
    # head's consecutive positions (gpt-oss shapes on an H200: 93 % / 97 % of the floor at T = 8192 / 32768,
    # against 90 % / 93 % with half; benchmarks/RESULTS.md)
    block_rkv = block_rq if p.options.layout is CacheLayout.SEQUENCE else max(1, block_rq // 2)
    if p.options.norm_full_width:  # every program's rows whole tokens: the norm sums a token's heads
        block_rq = max(block_rq, _static(p.q.shape[2]))
        block_rkv = max(block_rkv, _static(p.k.shape[2]))
    cfg = dict(BLOCK_RQ=block_rq, BLOCK_RKV=block_rkv, BLOCK_HALF=half, BLOCK_D=d, num_warps=4)
    if torch.version.hip is not None and p.q.is_cuda:
        cfg.update(num_warps=2)
    return cfg


def launch(p: RopeKVProblem, q_out: torch.Tensor, k_out: torch.Tensor | None, buffers: tuple | None = None,
           **config) -> None:
    """Launch the kernel once (nothing for T = 0). ``q_out``/``k_out`` have the shapes of q/k; ``buffers``: see
    ``kernel_arguments``."""
    if p.num_tokens == 0:
        return
    grid, args = kernel_arguments(p, q_out, k_out, buffers, **config)
    _rope_kv_store_kernel[grid](**args, **_assertions(p))


def _assertions(p: RopeKVProblem) -> dict:
    """Launch options that compile the kernel's index checks in where they are asked for: on CUDA, assertions on
    (``debug``) without Triton's overflow checks, as Inductor compiles its own kernels (and ours when it launches
    them). HIP: none, as Inductor on HIP; CPU: ``ops`` checks on the host."""
    return assertion_options(p.options, p.q)


def assertion_options(options, x: torch.Tensor) -> dict:
    """``_assertions`` for a kernel with the options ``options`` (``check_slots``, ``check_positions``) launched on
    ``x``'s device."""
    if (options.check_slots or options.check_positions) and x.is_cuda and torch.version.hip is None:
        return dict(debug=True, sanitize_overflow=False)
    return {}


def launch_traceable(p: RopeKVProblem, return_k: bool, buffers: tuple | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and launch through ``torch.library.wrap_triton``; returns ``(q_out, k_out)``.

    Made to be traced (``make_fx(torch.func.functionalize(fn, remove="mutations"))`` over fake tensors,
    ``p`` from ``prepare`` on them): the graph then holds ``triton_kernel_wrapper_functional`` and Inductor
    launches the kernel from its own generated code. No argument checks (``prepare`` did them), no
    Python branch on the token count and no ``int()`` of it: it reaches the kernel and the grid as a
    symbolic value. ``k_out`` is empty unless ``return_k``, as the custom op returns it. With ``buffers`` (see
    ``kernel_arguments``) the launch writes the buffers the caches are views of, not the views.
    """
    q_out = torch.empty(p.q_shape, dtype=p.q_out_dtype, device=p.q.device)
    k_out = torch.empty(p.k_shape if return_k else (0,), dtype=p.k.dtype, device=p.k.device)
    grid, args = kernel_arguments(p, q_out, k_out if return_k else None, buffers)
    check_traceable(_rope_kv_store_kernel, args)
    torch.library.wrap_triton(_rope_kv_store_kernel)[grid](**args)  # the launch for T = 0 is empty
    return q_out, k_out


def check_traceable(kernel, args: dict) -> None:
    """``NotTraceable`` naming the arguments ``kernel`` takes as compile-time constants that are symbolic in ``args``:
    launching it from traced code would specialise them."""
    symbolic = sorted(name for name in _constexpr_names(kernel) if isinstance(args.get(name), torch.SymInt))
    if symbolic:
        raise NotTraceable(f"the kernel takes {', '.join(symbolic)} as compile-time constants, but they are "
                           "symbolic here: launching it from traced code would specialise them")


class NotTraceable(Exception):
    """``launch_traceable`` would pin a symbolic size to one value (a constexpr); launch the op instead."""


def _constexpr_names(kernel) -> frozenset[str]:
    """Names of the ``tl.constexpr`` parameters of a ``@triton.jit`` kernel (interpreted or not)."""
    fn = getattr(kernel, "fn", kernel)
    return frozenset(name for name, prm in inspect.signature(fn).parameters.items()
                     if prm.annotation is tl.constexpr or prm.annotation in ("tl.constexpr", "constexpr"))


def kernel_arguments(p: RopeKVProblem, q_out: torch.Tensor, k_out: torch.Tensor | None,
                     buffers: tuple | None = None, **config) -> tuple[tuple, dict]:
    """``(grid, keyword arguments)`` of one launch; ``config`` overrides ``launch_config(p)``.

    Run-time values: the tensors (absent ones are None: Triton makes them constexprs), the token
    count and the batch strides. Everything else is a constexpr.

    ``buffers = (k_buffer, v_buffer or None)``: ``p``'s caches are views of these (``v_buffer`` None: both of
    ``k_buffer``), and the kernel gets the buffers and the views' element offsets in them, so that a traced
    launch writes the buffers in place (functionalized, a written view would be cloned and scattered back).
    """
    o = p.options
    head_dim = p.q.shape[-1]
    qo = _as_bshd("q_out", q_out, o.layout, head_dim)
    ko = _as_bshd("k_out", k_out, o.layout, head_dim) if k_out is not None else None
    fp8 = p.k_cache.dtype in FP8_DTYPES
    cfg = launch_config(p) | config
    tail = _static(head_dim) - _static(o.rotary_dim)
    args = dict(
        q_ptr=p.q, k_ptr=p.k, v_ptr=p.v, q_out_ptr=q_out, k_out_ptr=k_out, k_cache_ptr=p.k_cache,
        v_cache_ptr=p.v_cache, slot_ptr=p.slot_mapping, swa_ptr=p.swa_table, pos_ptr=p.positions,
        cos_ptr=p.cos, sin_ptr=p.sin, k_scale_ptr=p.k_scale, v_scale_ptr=p.v_scale, q_scale_ptr=p.q_scale,
        q_norm_w_ptr=p.q_norm_weight, k_norm_w_ptr=p.k_norm_weight,
        Q_NORM=o.q_norm, K_NORM=o.k_norm, NORM_EPS=o.norm_eps, NORM_OFFSET=o.norm_offset, NORM_ROUND=o.norm_round,
        NORM_FULL=o.norm_full_width, NORM_AFTER=o.norm_after_rope,
        T=p.num_tokens,
        **_stride_arguments(p, qo, ko),
        B=p.q.shape[0], HQ=p.q.shape[2], HKV=p.k.shape[2], D=head_dim, ROT=o.rotary_dim,
        N_SLOTS=p.num_slots, N_SWA=p.swa_table.shape[0] if p.swa_table is not None else None,
        N_POSITIONS=p.cos.shape[0] if p.positions is not None else None,
        CACHE_BLOCK_SIZE=p.block_size,
        FP8_MAX=torch.finfo(p.k_cache.dtype).max if fp8 else None,
        **_fp8_store_arguments(p), **_fp8_q_arguments(p),
        IS_NEOX=o.is_neox, COS_PER_ELEMENT=p.cos_per_element, NEGATIVE_WRAPS=o.negative_wraps,
        CHECK_SLOTS=o.check_slots, CHECK_POSITIONS=o.check_positions,
        ROUND_TABLE=TABLE_DTYPES.index(o.table_dtype),
        BLOCK_TAIL=triton.next_power_of_2(max(tail, 1)),
        kc_off=None, vc_off=None,
        **cfg,
    )
    if buffers is not None:
        k_buffer, v_buffer = buffers
        v_base = k_buffer if v_buffer is None else v_buffer
        args.update(k_cache_ptr=k_buffer, v_cache_ptr=v_buffer,
                    kc_off=p.k_cache.storage_offset() - k_buffer.storage_offset(),
                    vc_off=p.v_cache.storage_offset() - v_base.storage_offset())
    n_q_programs = triton.cdiv(p.num_tokens * p.q.shape[2], cfg["BLOCK_RQ"])
    n_kv_programs = triton.cdiv(p.num_tokens * p.k.shape[2], cfg["BLOCK_RKV"])
    return (n_q_programs + n_kv_programs,), args


# the saturating FP8_CAST code of each fp8 format the kernel writes bits of (see casts._eager_fp8)
_SATURATING_FP8_CAST = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 3}


def _fp8_store_arguments(p: RopeKVProblem) -> dict:
    """The kernel's FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL, CLAMP_LO, CLAMP_HI and S_ROUND (see ``casts._eager_fp8``).

    With ``quant_dtype``: eager's quantisation, rounded as eager rounds it on this device. Without it, an fp8
    cache of a format whose bits the kernel computes stores ``clamp(x / scale, -max, max)`` from the fp32
    value, rounded to nearest even, NaN kept, through the same code (so the interpreter and every GPU agree);
    ``float8_e4m3fnuz`` (HIP) is cast by Triton (FP8_CAST 0)."""
    return fp8_store_arguments(p.options, p.q.device, p.k.dtype, p.k_cache.dtype, p.stored_dtype)


def fp8_store_arguments(o, device: torch.device, model_dtype: torch.dtype, cache_dtype: torch.dtype,
                        stored_dtype: torch.dtype) -> dict:
    """``_fp8_store_arguments`` for a cache of ``cache_dtype`` holding ``stored_dtype`` values (uint8 pools: the
    fp8 format) written from values of ``model_dtype`` on ``device``, with the options ``o`` (``quant_dtype``,
    ``scale_mul``, ``clamp``, ``scale_round``)."""
    plain = dict(FP8_CAST=0, X_ROUND=0, Q_ROUND=0, SCALE_MUL=False, CLAMP_LO=None, CLAMP_HI=None, S_ROUND=0)
    if o.quant_dtype is not None:
        return dict(FP8_CAST=_by_conversion(eager_fp8_cast(device, stored_dtype), device),
                    X_ROUND=_round_code(model_dtype), Q_ROUND=_round_code(o.quant_dtype),
                    SCALE_MUL=o.scale_mul, CLAMP_LO=o.clamp[0] if o.clamp is not None else None,
                    CLAMP_HI=o.clamp[1] if o.clamp is not None else None,
                    S_ROUND=_round_code(o.quant_dtype) if o.scale_round else 0)
    if cache_dtype in _SATURATING_FP8_CAST:
        fmax = torch.finfo(cache_dtype).max
        return plain | dict(FP8_CAST=_SATURATING_FP8_CAST[cache_dtype], CLAMP_LO=-fmax, CLAMP_HI=fmax)
    return plain


def _fp8_q_arguments(p: RopeKVProblem) -> dict:
    """The kernel's Q_FP8_CAST, Q_X_ROUND, Q_QROUND, Q_SCALE_MUL, Q_CLAMP_LO, Q_CLAMP_HI and Q_S_ROUND: fp8 q as eager
    computes it (``_eager_fp8`` on q's rotated values, in q's dtype), or Q_FP8_CAST 0 for q_out in q's dtype."""
    o = p.options
    if o.q_fp8_dtype is None:
        return dict(Q_FP8_CAST=0, Q_X_ROUND=0, Q_QROUND=0, Q_SCALE_MUL=False, Q_CLAMP_LO=None, Q_CLAMP_HI=None,
                    Q_S_ROUND=0)
    quotient = _round_code(o.q_quant_dtype or p.q.dtype)
    return dict(Q_FP8_CAST=_by_conversion(eager_fp8_cast(p.q.device, o.q_fp8_dtype), p.q.device),
                Q_X_ROUND=_round_code(p.q.dtype),
                Q_QROUND=quotient, Q_SCALE_MUL=o.q_scale_mul,
                Q_CLAMP_LO=o.q_clamp[0] if o.q_clamp is not None else None,
                Q_CLAMP_HI=o.q_clamp[1] if o.q_clamp is not None else None,
                Q_S_ROUND=quotient if o.q_scale_round else 0)


def _by_conversion(code: int, device: torch.device) -> int:
    """FP8_CAST ``code``, or 4 where the GPU's conversion instruction gives code 2's bits (e4m3fn on CUDA, sm_89
    and later, compiled: the interpreter keeps the integer arithmetic, which it runs as written). The arithmetic
    of code 2 took about 30 integer operations an element; the kernels' fp8 stores and fp8 q were bound by it."""
    if (code == 2 and device.type == "cuda" and torch.version.hip is None and not interpreted()
            and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)):
        return 4
    return code


def _round_code(dtype: torch.dtype) -> int:
    """The kernel's ``_round`` code of a model dtype: 1 bf16, 2 fp16, 0 fp32 (nothing to round)."""
    return TABLE_DTYPES.index(dtype) if dtype in TABLE_DTYPES else 0


def _static(n):
    """A size the kernel takes as a constexpr, as an int (a symbolic one is specialised, as Inductor would)."""
    return n if isinstance(n, int) else guard_int(n)


def _batch_stride(x: torch.Tensor):
    """Stride of dim 0 of a [B or 1, S, ...] view; None when that dim has size 1 (B = 1, or broadcast)."""
    return None if x.shape[0] == 1 else x.stride(0)


def _stride_arguments(p: RopeKVProblem, qo: torch.Tensor, ko: torch.Tensor | None) -> dict:
    """The kernel's stride parameters by name (which of them are constexprs: see its signature)."""
    q_sb, q_ss, q_sh, q_sd = _token_strides(p.q)
    k_sb, k_ss, k_sh, k_sd = _token_strides(p.k)
    v_sb, v_ss, v_sh, v_sd = _token_strides(p.v)
    qo_sb, qo_ss, qo_sh, qo_sd = _token_strides(qo)
    ko_sb, ko_ss, ko_sh, ko_sd = _token_strides(ko)
    (kc_sb, kc_sblk, kc_sslot, kc_sh, kc_sd), (kc_sslot_hi, KC_SLOT_SPLIT), (kc_sd_hi, KC_D_SPLIT) = _cache_strides(
        p.k_cache, p.options.layout, "k", p.x)
    (vc_sb, vc_sblk, vc_sslot, vc_sh, vc_sd), (vc_sslot_hi, VC_SLOT_SPLIT), (vc_sd_hi, VC_D_SPLIT) = _cache_strides(
        p.v_cache, p.options.layout, "v", p.x)
    slot_sb, slot_ss = _index_strides(p.slot_mapping)
    pos_sb, pos_ss = _index_strides(p.positions)
    cos_sb, cos_sr, cos_sd = _rotary_strides(p.cos, p.positions is not None)
    sin_sb, sin_sr, sin_sd = _rotary_strides(p.sin, p.positions is not None)
    return dict(
        q_sb=q_sb, q_ss=q_ss, q_sh=q_sh, q_sd=q_sd, k_sb=k_sb, k_ss=k_ss, k_sh=k_sh, k_sd=k_sd,
        v_sb=v_sb, v_ss=v_ss, v_sh=v_sh, v_sd=v_sd,
        qo_sb=qo_sb, qo_ss=qo_ss, qo_sh=qo_sh, qo_sd=qo_sd, ko_sb=ko_sb, ko_ss=ko_ss, ko_sh=ko_sh, ko_sd=ko_sd,
        kc_sb=kc_sb, kc_sblk=kc_sblk, kc_sslot=kc_sslot, kc_sh=kc_sh, kc_sd=kc_sd,
        vc_sb=vc_sb, vc_sblk=vc_sblk, vc_sslot=vc_sslot, vc_sh=vc_sh, vc_sd=vc_sd,
        kc_sslot_hi=kc_sslot_hi, kc_sd_hi=kc_sd_hi, vc_sslot_hi=vc_sslot_hi, vc_sd_hi=vc_sd_hi,
        KC_SLOT_SPLIT=KC_SLOT_SPLIT, KC_D_SPLIT=KC_D_SPLIT, VC_SLOT_SPLIT=VC_SLOT_SPLIT, VC_D_SPLIT=VC_D_SPLIT,
        slot_sb=slot_sb, slot_ss=slot_ss, pos_sb=pos_sb, pos_ss=pos_ss,
        cos_sb=cos_sb, cos_sr=cos_sr, cos_sd=cos_sd, sin_sb=sin_sb, sin_sr=sin_sr, sin_sd=sin_sd,
    )


def _token_strides(x: torch.Tensor | None) -> tuple:
    """(sb, ss, sh, sd) of a [B, S, H, D] view (sb None where dim 0 has size 1); all None without the tensor."""
    if x is None:
        return None, None, None, None
    return _batch_stride(x), x.stride(1), x.stride(2), x.stride(3)


def _index_strides(x: torch.Tensor | None) -> tuple:
    """(sb, ss) of a [B or 1, S] index view; both None without the tensor."""
    if x is None:
        return None, None
    return _batch_stride(x), x.stride(1)


def _rotary_strides(c: torch.Tensor, table: bool) -> tuple:
    """(sb, sr, sd) of cos/sin: a table [P, R'] (row = position) or per-token values [S, R'] / [B or 1, S, R']
    (row = token)."""
    if table or c.dim() == 2:
        return None, c.stride(0), c.stride(-1)
    return _batch_stride(c), c.stride(1), c.stride(2)


def _cache_strides(c: torch.Tensor, layout: CacheLayout, which: str, x: int | None) -> tuple:
    """``((sb, sblk, sslot, sh, sd), (sslot_hi, SLOT_SPLIT), (sd_hi, D_SPLIT))`` of cache ``which`` ("k" or "v") for
    the kernel's address formula (see its signature). A split index i (SPLIT not None) is addressed as
    ``(i // SPLIT) * s_hi + (i % SPLIT) * s``; no split: ``(None, None)``, and the address is ``i * s``."""
    none = (None, None)
    if layout is CacheLayout.TOKEN:
        return (None, c.stride(0), 0, c.stride(1), c.stride(2)), none, none
    if layout is CacheLayout.PAGED:
        return (None, c.stride(0), c.stride(1), c.stride(2), c.stride(3)), none, none
    if layout is CacheLayout.SEQUENCE:
        return (_batch_stride(c), c.stride(2), 0, c.stride(1), c.stride(3)), none, none
    if which == "k":  # [num_blocks, Hkv, D // x, block_size, x]: d split
        return (None, c.stride(0), c.stride(3), c.stride(1), c.stride(4)), none, (c.stride(2), x)
    if layout is CacheLayout.PAGED_X:  # v [num_blocks, Hkv, D, block_size]
        return (None, c.stride(0), c.stride(3), c.stride(1), c.stride(2)), none, none
    # shuffled v [num_blocks, Hkv, block_size // x, D, x]: the slot in the block split
    return (None, c.stride(0), c.stride(4), c.stride(1), c.stride(3)), (c.stride(2), x), none
