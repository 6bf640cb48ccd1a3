"""What the kernels store, rounded as eager rounds it: bf16/fp16 outputs and eager's fp8 quantisation, in Triton.

Shared by the fused RoPE + KV store kernel (``rope_kv_kernel.py``) and the MLA kernel (``mla_kernel.py``).

With ``quant_dtype`` a kernel's fp8 store is instead what eager model code computes (``_eager_fp8``), bit for bit:

    quant(x) = fp8_cast(clamp(round_Q(round_X(x) / round_S(scale))))   (or ``* scale`` with ``scale_mul``)

``round_X`` rounds the fp32 result to k's dtype (eager holds the rotated k in it), ``round_S`` rounds the
scale to ``quant_dtype`` with ``scale_round`` (as eager on CUDA reads a 0-d scale tensor; else it is read as it
is), the division is one correctly rounded fp32 division, ``round_Q`` rounds to ``quant_dtype`` (the dtype of
eager's ``x / scale``), ``clamp`` is the model's optional clamp, and ``fp8_cast`` is ``.to(fp8)`` with the
overflow rule eager has on the device (``fp8_rules.eager_fp8_cast``). The kernel computes the fp8 bits itself
(``_fp8_bits``), so the rounding is the same on every target and in the interpreter; on sm_89 and later it takes
eager's CUDA e4m3fn bits from the conversion instruction instead (``_e4m3_bits_cvt``, the same bits, checked against
torch's cast on an H200; ``launch._by_conversion``). Caches may then be ``uint8``
pools holding the bits of ``fp8_dtype`` (SGLang's fp8 pools). fp8 q (``q_fp8_dtype``, for fp8 attention) is the
same function of the rotated q with q's own scale (``q_scale_round``), quotient dtype, clamp and format (``Q_*``).
"""

from __future__ import annotations

import triton
import triton.language as tl


# The Triton interpreter truncates fp32 -> bf16 conversions (GPUs round to nearest even, as eager does): there the
# kernels round bf16 themselves, on the bits. Compiled kernels convert as they are (the explicit rounding cost up to
# 17 % at T = 512, and about six instructions an element in eager's fp8 path).
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _round(x, ROUND: tl.constexpr):
    # x (fp32) rounded to bf16 (ROUND = 1) or fp16 (2) to nearest even, as fp32; x itself for 0. Compiled: the
    # conversion instruction, as eager's on a GPU (a NaN becomes the canonical one); in the interpreter bf16 is
    # rounded on the bits (the upper 16 bits of an fp32; inf and NaN stay so).
    if ROUND == 1:
        if _INTERPRETED:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _to(x, ty):
    # x (fp32) converted to ty, rounded to nearest even
    if _INTERPRETED and ty == tl.bfloat16:
        x = _round(x, 1)
    return x.to(ty)


@triton.jit
def _quantize(x, scale_ptr, FP8_MAX: tl.constexpr):
    # out = clamp(x / scale, -FP8_MAX, FP8_MAX) for fp8 caches, NaN kept (as eager ``.to(fp8)`` keeps it);
    # identity otherwise. Scale 0, negative or non-finite: whatever the fp32 division gives, as in eager.
    if scale_ptr is not None:
        x = x / tl.load(scale_ptr).to(tl.float32)
    if FP8_MAX is not None:
        x = tl.where(x != x, x, tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX))
    return x


@triton.jit
def _cache_value(x, scale_ptr, ty, FP8_MAX: tl.constexpr, FP8_CAST: tl.constexpr, X_ROUND: tl.constexpr,
                 Q_ROUND: tl.constexpr, SCALE_MUL: tl.constexpr, CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr,
                 S_ROUND: tl.constexpr):
    # x (fp32) as the cache of element type ty stores it: quant(x) (_quantize), or eager's fp8 bits
    # (_eager_fp8) reinterpreted as ty (an fp8 type, or uint8 for pools of fp8 bits)
    if FP8_CAST == 0:
        out = _to(_quantize(x, scale_ptr, FP8_MAX), ty)
    else:
        out = _eager_fp8(x, scale_ptr, X_ROUND, SCALE_MUL, Q_ROUND, CLAMP_LO, CLAMP_HI, FP8_CAST,
                         S_ROUND).to(ty, bitcast=True)
    return out


@triton.jit
def _q_value(x, scale_ptr, ty, FP8_CAST: tl.constexpr, X_ROUND: tl.constexpr, Q_ROUND: tl.constexpr,
             SCALE_MUL: tl.constexpr, CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr, S_ROUND: tl.constexpr):
    # x (fp32) as q_out of element type ty holds it: x rounded to ty, or fp8 q (FP8_CAST != 0: eager's bits)
    if FP8_CAST == 0:
        out = _to(x, ty)
    else:
        out = _eager_fp8(x, scale_ptr, X_ROUND, SCALE_MUL, Q_ROUND, CLAMP_LO, CLAMP_HI, FP8_CAST,
                         S_ROUND).to(ty, bitcast=True)
    return out


@triton.jit
def _eager_fp8(x, scale_ptr, X_ROUND: tl.constexpr, SCALE_MUL: tl.constexpr, Q_ROUND: tl.constexpr,
               CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr, FP8_CAST: tl.constexpr, S_ROUND: tl.constexpr):
    # out = bits of fp8_cast(clamp(round_Q(round_X(x) / round_S(scale)))) as eager computes them (module
    # docstring); x fp32, out uint8. S_ROUND (a _round code, 0: none) rounds the loaded scale as eager on CUDA
    # reads a 0-d scale tensor (to the quotient's dtype). div_rn: one correctly rounded division, as eager's
    # (Triton's ``/`` is approximate).
    x = _round(x, X_ROUND)
    if scale_ptr is not None:
        scale = _round(tl.load(scale_ptr).to(tl.float32), S_ROUND)
        if SCALE_MUL:
            x = x * scale
        elif Q_ROUND == 1 and X_ROUND == 1 and (S_ROUND == 1 or scale_ptr.dtype.element_ty == tl.bfloat16):
            x = _bf16_quotient(x, scale)
        else:
            x = tl.math.div_rn(x, scale)
    x = _round(x, Q_ROUND)
    if CLAMP_LO is not None or CLAMP_HI is not None:  # NaN stays NaN, as torch.clamp keeps it
        c = x
        if CLAMP_LO is not None:
            c = tl.maximum(c, CLAMP_LO)
        if CLAMP_HI is not None:
            c = tl.minimum(c, CLAMP_HI)
        x = tl.where(x != x, x, c)
    if FP8_CAST == 1:  # e4m3fn, saturating (torch on CPU: |x| > 448, inf too, -> 448)
        bits = _fp8_bits(x, 3, 7, 0x7E, None, 1024.0)
    elif FP8_CAST == 2:  # e4m3fn, NaN past the tie at 464 (torch on CUDA: (448, 464] -> 448, |x| > 464 -> NaN)
        bits = _fp8_bits(x, 3, 7, 0x7E, 0x7F, 1024.0)
    elif FP8_CAST == 4:  # the same bits from the GPU's own conversion (sm_89 and later)
        bits = _e4m3_bits_cvt(x)
    else:  # e5m2, inf from the tie at 61440 on (torch on CPU and CUDA: 480 -> 512, 1e6 -> inf)
        bits = _fp8_bits(x, 2, 15, 0x7B, 0x7C, 131072.0)
    return bits


@triton.jit
def _bf16_quotient(x, s):
    # x / s, of bf16 values x and s, as eager's bf16 ``x / scale`` holds it once rounded to bf16 (the caller rounds):
    # x * (1 / s), one multiply instead of a correctly rounded division an element. Exact: x and s have 8 significant
    # bits, so x / s is never a bf16 midpoint (its odd part would need 9 bits) and lies at least 2^-17 (relative)
    # from every one, while 1 / s and the product are each rounded once (within 2^-23 together); the correctly
    # rounded x / s is as far from the midpoints, so both round to the same bf16. A quotient in fp32's subnormal
    # range (an fp8 zero either way) keeps its sign. Scales whose reciprocal would leave fp32's normal range
    # (|s| outside [2^-100, 2^100], zero, inf, NaN) divide as they are. (0 mismatches against ``(x / s).to(bf16)``
    # over every finite bf16 x and 456 scales: tests/kernels/test_fp8_q.py.)
    inv = tl.math.div_rn(1.0, s)
    if (tl.abs(s) >= 2.0 ** -100) & (tl.abs(s) <= 2.0 ** 100):
        q = x * inv
    else:
        q = tl.math.div_rn(x, s)
    return q


@triton.jit
def _e4m3_bits_cvt(x):
    # FP8_CAST 2's bits through the conversion instruction (cvt.rn.satfinite: nearest even, subnormals included,
    # |x| past 448 saturated): saturation is right up to the tie at 464; past it, and for NaN, eager's sign | 0x7F
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    hw = x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return tl.where(tl.abs(x) <= 464.0, hw, (sign | 0x7F).to(tl.uint8))  # (false for NaN)


@triton.jit
def _fp8_bits(x, M: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr, OVF_CODE: tl.constexpr,
              BIG: tl.constexpr):
    # uint8 bits of fp32 x in a format with M mantissa bits and exponent bias BIAS, rounded to nearest even,
    # ties included (e4m3fn: 464, halfway between 448 and the next code, rounds to 448). A code past MAX_CODE
    # (the largest finite value) becomes OVF_CODE (inf or NaN), or MAX_CODE when OVF_CODE is None (saturating);
    # NaN -> sign | 0x7F (torch's bits). BIG: a power of two whose code is past MAX_CODE (|x| is clamped to it).
    xi = x.to(tl.int32, bitcast=True)
    sign = (xi >> 24) & 0x80
    a = tl.abs(x)
    a = tl.where(a != a, 0.0, tl.minimum(a, BIG))
    u = a.to(tl.int32, bitcast=True)
    # normal: round the fp32 mantissa to M bits (a carry moves into the exponent), rebias the exponent
    normal = ((u + ((1 << (22 - M)) - 1) + ((u >> (23 - M)) & 1)) >> (23 - M)) - ((127 - BIAS) << M)
    # subnormal (a < 2^(1 - BIAS)): count of quanta 2^(1 - BIAS - M), rounded to nearest even by the fp32 add
    t = tl.minimum(a, 2.0 ** (1 - BIAS)) * (2.0 ** (BIAS - 1 + M))  # exact; at most 2^M
    sub = ((t + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 2.0 ** (1 - BIAS), sub, normal)
    if OVF_CODE is None:
        code = tl.minimum(code, MAX_CODE)
    else:
        code = tl.where(code > MAX_CODE, OVF_CODE, code)
    bits = tl.where(x != x, sign | 0x7F, sign | code)
    return bits.to(tl.uint8)
