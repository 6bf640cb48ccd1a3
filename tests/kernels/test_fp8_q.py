"""fp8 q (``q_fp8_dtype``): the kernel writes q_out as eager's fp8 quantisation of the rotated q, byte for byte.

Two checks per case, on fresh random data with poisoned outputs (q_out filled with NaN bytes before the launch):
* exactness: the fp8 q_out equals eager's chain ``(q_rot / q_scale)[.clamp(lo, hi)].to(fp8)``, computed with torch
  on this device from the kernel's own q_out in q's dtype (the same launch without fp8 q), byte for byte;
* the float64 reference (``reference``): within one fp8 code where the fp32 and the float64 rotations round apart.
The caches and k_out are those of the same launch without fp8 q, byte for byte.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fx_fusion.kernels.rope_kv_cache import launch, prepare, reference
from tests.kernels.test_rope_kv_cache import LAYOUTS, TOLERANCES, make_args, poison

FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


def eager_fp8_q(q_rot: torch.Tensor, scale, *, quotient=None, mul=False, clamp=None, fmt=torch.float8_e4m3fn):
    """What model code computes: ``q_rot / scale`` in ``quotient``, clamp, cast; the scale read as its fp32 value,
    as eager on CPU reads a one-element scale (eager CUDA first rounds a scale tensor to the quotient's dtype: the
    graph pass hands the op that rounded scale, ``patterns/quant.py: scale_rounding``)."""
    quotient = quotient or q_rot.dtype
    x = q_rot
    if scale is not None:
        s = scale.float() if isinstance(scale, torch.Tensor) else scale
        x = (x.float() * s if mul else x.float() / s).to(quotient)
    x = x.to(quotient)
    if clamp is not None:
        x = x.clamp(*clamp)
    return x.to(fmt)


def run(args: dict, **fp8) -> tuple:
    """One launch without fp8 q and one with ``fp8`` options, on copies of the same poisoned caches: returns
    (problem with fp8 q, q_out in q's dtype, fp8 q_out, caches after each launch)."""
    q_scale = fp8.pop("q_scale", None)
    plain = prepare(**dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone()))
    p = prepare(**dict(args, q_scale=q_scale, **fp8))
    q_plain = torch.full(plain.q_shape, float("nan"), dtype=plain.q.dtype, device=plain.q.device)
    q_fp8 = torch.empty(p.q_shape, dtype=p.q_out_dtype, device=p.q.device)
    q_fp8.view(torch.uint8).fill_(0x7F)  # NaN in both formats
    k_plain, k_fp8 = (torch.empty(x.k_shape, dtype=x.k.dtype, device=x.k.device) for x in (plain, p))
    launch(plain, q_plain, k_plain)
    launch(p, q_fp8, k_fp8)
    assert torch.equal(k_plain, k_fp8)
    for a, b in ((plain.k_cache, p.k_cache), (plain.v_cache, p.v_cache)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return p, q_plain, q_fp8


def check(args: dict, *, scale_value=None, **fp8) -> None:
    p, q_plain, q_fp8 = run(args, **fp8)
    o = p.options
    scale = scale_value if scale_value is not None else p.q_scale
    want = eager_fp8_q(q_plain, scale if scale is None or not isinstance(scale, torch.Tensor) else scale.reshape(()),
                       quotient=o.q_quant_dtype, mul=o.q_scale_mul, clamp=o.q_clamp, fmt=o.q_fp8_dtype)
    differ = (q_fp8.view(torch.uint8) != want.view(torch.uint8)).sum().item()
    assert differ == 0, f"{differ} of {q_fp8.numel()} fp8 q bytes differ from eager's cast"
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, _ = reference(ref, False, compute_dtype=torch.float64)
    assert q_ref.dtype == q_fp8.dtype
    atol, rtol = TOLERANCES[o.q_fp8_dtype]
    torch.testing.assert_close(q_fp8.float(), q_ref.float(), atol=atol, rtol=rtol, equal_nan=True)


def _scale(device, dtype=torch.float32, value=0.0625):
    return torch.tensor([value], dtype=dtype, device=device)


@pytest.mark.parametrize("fmt", FORMATS, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_q_is_eagers_cast(device, layout, dtype, fmt):
    args = make_args(device, T=7, Hq=8, Hkv=2, D=64, layout=layout, dtype=dtype, batch=2 if layout == "sequence"
                     else 1)
    args["q"] = args["q"] * 8  # quotients up to ~500: saturation and the top of e4m3fn included
    check(args, q_fp8_dtype=fmt, q_scale=_scale(device))


@pytest.mark.parametrize("case", ["no-scale", "bf16-scale", "mul", "clamp", "fp32-quotient", "partial", "gptj"])
def test_fp8_q_variants(device, case):
    rot = 32 if case == "partial" else None
    args = make_args(device, T=9, Hq=4, Hkv=2, D=64, rot=rot, dtype=torch.bfloat16, is_neox=case != "gptj")
    args["q"] = args["q"] * 4
    fp8 = dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale=_scale(device, value=0.0234))
    if case == "no-scale":
        fp8.pop("q_scale")
    elif case == "bf16-scale":
        fp8["q_scale"] = _scale(device, torch.bfloat16, 0.0234)
    elif case == "mul":
        fp8.update(q_scale_mul=True, q_scale=_scale(device, value=42.5))
    elif case == "clamp":
        fp8.update(q_clamp=(-240.0, 240.0))
    elif case == "fp32-quotient":
        fp8.update(q_quant_dtype=torch.float32)
    check(args, **fp8)


def test_fp8_q_keeps_nan_and_inf(device):
    args = make_args(device, T=5, Hq=4, Hkv=2, D=64, dtype=torch.float32)
    args["q"][1, 3] = float("nan")
    args["q"][2, 5] = float("inf")
    for fmt in FORMATS:
        check(dict(args), q_fp8_dtype=fmt, q_scale=_scale(device, value=0.5))


def test_fp8_q_with_fp8_caches(device):
    """q's quantisation and the caches' are independent: each its own scale, format and rounding."""
    args = make_args(device, T=6, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, cache_dtype=torch.float8_e5m2)
    args.update(k_scale=_scale(device, value=0.5), v_scale=_scale(device, value=2.0))
    check(args, q_fp8_dtype=torch.float8_e4m3fn, q_scale=_scale(device, value=0.03), q_clamp=(-448.0, 448.0))


def test_op_returns_fp8_q(device):
    from fx_fusion.kernels import rope_kv_store

    args = make_args(device, T=5, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16)
    scale = _scale(device, value=0.125)
    q_out, _ = rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"].clone(), args["v_cache"].clone(),
                             args["slot_mapping"], cos=args["cos"], sin=args["sin"], positions=args["positions"],
                             rotary_dim=64, q_scale=scale, q_fp8_dtype=torch.float8_e4m3fn)
    plain, _ = rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                             args["slot_mapping"], cos=args["cos"], sin=args["sin"], positions=args["positions"],
                             rotary_dim=64)
    assert q_out.dtype == torch.float8_e4m3fn and q_out.shape == plain.shape
    assert torch.equal(q_out.view(torch.uint8), (plain / scale).to(torch.float8_e4m3fn).view(torch.uint8))
    # a Python number: its fp32 value
    q_num, _ = rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"].clone(), args["v_cache"].clone(),
                             args["slot_mapping"], cos=args["cos"], sin=args["sin"], positions=args["positions"],
                             rotary_dim=64, q_scale=0.125, q_fp8_dtype=torch.float8_e4m3fn)
    assert torch.equal(q_num.view(torch.uint8), q_out.view(torch.uint8))


BAD = {
    # id: (fp8 q arguments, exception, match: the argument's name)
    "scale-without-format": (dict(q_scale=torch.ones(1)), ValueError, r"^q_scale is given without q_fp8_dtype"),
    "quotient-without-format": (dict(q_quant_dtype=torch.float32), ValueError, r"^q_quant_dtype is given without"),
    "mul-without-format": (dict(q_scale_mul=True), ValueError, r"^q_scale_mul is given without"),
    "clamp-without-format": (dict(q_clamp=(-1.0, 1.0)), ValueError, r"^q_clamp is given without"),
    "format-fnuz": (dict(q_fp8_dtype=torch.float8_e4m3fnuz), ValueError, r"^q_fp8_dtype must be None or one of"),
    "format-bf16": (dict(q_fp8_dtype=torch.bfloat16), ValueError, r"^q_fp8_dtype must be None or one of"),
    "scale-two-values": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale=torch.ones(2)), ValueError, r"^q_scale must"),
    "scale-fp64": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale=torch.ones(1, dtype=torch.float64)), TypeError,
                   r"^q_scale must have dtype"),
    "scale-int": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale=torch.ones(1, dtype=torch.int32)), TypeError,
                  r"^q_scale must have dtype"),
    "scale-not-tensor": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale="0.5"), TypeError, r"^q_scale must be a"),
    "scale-device": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale=torch.ones(1, device="meta")), ValueError,
                     r"^q_scale is on meta"),
    "mul-without-scale": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_scale_mul=True), ValueError,
                          r"^q_scale_mul is given without q_scale"),
    "clamp-not-exact": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_clamp=(-448.1, 448.0)), ValueError,
                        r"^q_clamp bounds must be exact"),
    "quotient-fp64": (dict(q_fp8_dtype=torch.float8_e4m3fn, q_quant_dtype=torch.float64), ValueError,
                      r"^q_quant_dtype must be None or one of"),
}


@pytest.mark.parametrize("fp8,exc,match", BAD.values(), ids=BAD.keys())
def test_bad_fp8_q_arguments_name_the_argument_and_write_nothing(fp8, exc, match):
    from fx_fusion.kernels import rope_kv_store

    args = make_args("cpu", T=5, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16)
    poison(args["k_cache"])
    before = args["k_cache"].clone()
    with pytest.raises(exc, match=match):
        rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"], args["slot_mapping"],
                      cos=args["cos"], sin=args["sin"], positions=args["positions"], rotary_dim=64, **fp8)
    assert torch.equal(args["k_cache"].view(torch.uint8), before.view(torch.uint8))


def test_a_bf16_quotient_is_a_multiply_by_the_reciprocal():
    """``casts._bf16_quotient``'s claim, for every finite bf16 x and 456 bf16 scales across fp32's range: x * (1 / s),
    each rounded once in fp32, rounds to the same bf16 as the correctly rounded x / s (quotients below 2^-120, an
    fp8 zero either way, aside). The kernels' bf16-quotient fp8 path rests on it; ``test_fp8_q_variants`` and
    ``test_scale_round.py`` run that path against eager."""
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x)].float()
    g = torch.Generator().manual_seed(0)
    exponents = torch.randint(-100, 100, (400,), generator=g).float()
    mantissas = torch.randint(128, 256, (400,), generator=g).float() / 128
    scales = (mantissas * torch.pow(2.0, exponents)).to(torch.bfloat16).float()
    scales = torch.cat([scales, -scales[:50], torch.tensor([0.0234, 0.3, 0.05, 0.37, 1 / 3, 0.0625]).bfloat16().float()])
    for s in scales:
        fast = (x * (1.0 / s)).to(torch.bfloat16)
        exact = (x / s).to(torch.bfloat16)
        differ = (fast.view(torch.int16) != exact.view(torch.int16)) & (exact.float().abs() >= 2.0 ** -120)
        assert not differ.any(), (s.item(), x[differ][:4])
