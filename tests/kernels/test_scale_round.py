"""``scale_round`` / ``q_scale_round`` (``MlaOptions.scale_round``): the kernels read a scale rounded to the
quotient's dtype, as eager on CUDA reads a 0-d scale tensor (``patterns/quant.py: scale_rounding``), so that the
graph pass hands the op the graph's scale tensor unchanged (no conversion kernel of its own before the op).

Each case takes fp32 scales whose rounding to the quotient's dtype changes the stored bytes (e.g. 0.0123, not a bf16
value), on fresh random data with poisoned caches and outputs, and checks the whole cache and fp8 q_out:
* byte for byte against eager model code dividing by the rounded value (``x / scale.to(quotient)``);
* byte for byte against the float64 reference of the same options (which rounds the same way);
* the same launch without the option differs from eager there (the cases can fail when the rounding is skipped).
"""

from __future__ import annotations

import pytest
import torch

from fx_fusion import kernels
from fx_fusion.kernels import mla
from fx_fusion.kernels.options import MlaOptions, RopeKVOptions
from fx_fusion.kernels.rope_kv_cache import prepare, reference
from tests.kernels.test_mla import OP as MLA_OP
from tests.kernels.test_mla import eager_rope_fp32, make_mla, split
from tests.kernels.test_rope_kv_cache import as_bytes, make_args

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
# none a bf16 or fp16 value: each rounds by about 0.3 % to bf16 and 0.045 % to fp16 (0.0123: 0.24 % to bf16)
K_SCALE, V_SCALE, Q_SCALE, MLA_SCALE = 0.0158, 0.0316, 0.01667, 0.0123
FULL = pytest.mark.full


def _scaled(x: torch.Tensor, scale: torch.Tensor, quotient: torch.dtype, mul: bool) -> torch.Tensor:
    """Eager model code with the scale as eager CUDA reads it: ``x`` (in the model dtype) divided (multiplied) by
    the scale rounded to the quotient's dtype, in that dtype."""
    s = scale.reshape(()).to(quotient)
    return x.to(quotient) * s if mul else x.to(quotient) / s


def _rope_case(dtype, fmt, mul, uint8, **kw):
    """A token-layout fp8 problem (uint8 pools of ``fmt`` bits or ``fmt`` caches, poisoned with random bytes),
    fp32 scales, values past the fp8 range; ``kw``: options."""
    args = make_args("cpu", T=48, Hq=4, Hkv=2, D=32, rot=16, dtype=dtype, qkv="3d")  # many values: an fp16
    # rounding of the scale (0.045 %) moves a few of them across an fp8 rounding boundary
    cache_dtype = torch.uint8 if uint8 else fmt
    for name in ("k_cache", "v_cache"):
        args[name] = torch.randint(0, 256, args[name].shape, dtype=torch.uint8).view(cache_dtype)
    args["v"].mul_(4)
    scales = [K_SCALE, V_SCALE, Q_SCALE]
    if mul:  # multipliers of the same significands (a power of two keeps the rounding error)
        scales = [s * 4096 for s in scales]
    args.update(k_scale=torch.tensor(scales[0]), v_scale=torch.tensor([scales[1]]), q_scale=torch.tensor(scales[2]))
    return dict(args, fp8_dtype=fmt if uint8 else None, quant_dtype=dtype, scale_mul=mul, q_fp8_dtype=fmt,
                q_scale_mul=mul, **kw)


def _launch(args: dict) -> tuple:
    """The op on copies of the caches: (q_out, k_out, k_cache, v_cache)."""
    args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    tensors = {n: args.pop(n) for n in ("q", "k", "v", "k_cache", "v_cache", "slot_mapping")}
    q_out, k_out = kernels.rope_kv_store(**tensors, return_k=True, **args)
    return q_out, k_out, tensors["k_cache"], tensors["v_cache"]


def _eager(args: dict, k_rot: torch.Tensor, q_rot: torch.Tensor, fmt, quotient, mul) -> tuple:
    """The caches and fp8 q eager model code writes, from the rotated k and q in the model dtype."""
    k_cache, v_cache = args["k_cache"].clone(), args["v_cache"].clone()
    loc = args["slot_mapping"]
    for cache, x, scale in ((k_cache, k_rot, args["k_scale"]), (v_cache, args["v"], args["v_scale"])):
        cache.view(torch.uint8)[loc] = _scaled(x, scale, quotient, mul).to(fmt).view(torch.uint8)
    return _scaled(q_rot, args["q_scale"], quotient, mul).to(fmt), k_cache, v_cache


CASES = [
    pytest.param(torch.bfloat16, E4, False, True, id="bf16-e4m3fn-uint8-div"),
    pytest.param(torch.float16, E4, True, False, id="fp16-e4m3fn-mul", marks=FULL),
    pytest.param(torch.bfloat16, E5, False, False, id="bf16-e5m2-div", marks=FULL),
]


@pytest.mark.parametrize("dtype, fmt, mul, uint8", CASES)
def test_rope_kv_store_reads_the_scales_rounded(dtype, fmt, mul, uint8):
    args = _rope_case(dtype, fmt, mul, uint8, scale_round=True, q_scale_round=True)
    q_out, k_out, k_cache, v_cache = _launch(args)
    plain_q = _launch(dict(args, q_fp8_dtype=None, q_scale=None, q_scale_mul=False, q_scale_round=False))[0]
    q_want, k_want, v_want = _eager(args, k_out, plain_q, fmt, dtype, mul)
    for name, got, want in (("k_cache", k_cache, k_want), ("v_cache", v_cache, v_want), ("q_out", q_out, q_want)):
        differ = int((as_bytes(got) != as_bytes(want)).sum())
        assert differ == 0, f"{name}: {differ} bytes differ from eager's division by the rounded scale"

    # the float64 reference of the same options: the same bytes
    p = prepare(**dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone()))
    q_ref, _ = reference(p, False, compute_dtype=torch.float64)
    assert torch.equal(as_bytes(p.k_cache), as_bytes(k_cache)) and torch.equal(as_bytes(p.v_cache), as_bytes(v_cache))
    assert torch.equal(as_bytes(q_ref), as_bytes(q_out))

    # without the options the scales are read as they are: other bytes (the case tells the two apart)
    q_raw, _, k_raw, v_raw = _launch(dict(args, scale_round=False, q_scale_round=False))
    for name, got, want in (("k_cache", k_raw, k_want), ("v_cache", v_raw, v_want), ("q_out", q_raw, q_want)):
        assert not torch.equal(as_bytes(got), as_bytes(want)), f"{name}: the rounding changes nothing here"


@pytest.mark.parametrize("sglang", [pytest.param(True, id="uint8-div"),
                                    pytest.param(False, id="e4m3fn-mul-clamp", marks=FULL)])
def test_mla_reads_the_scale_rounded(sglang):
    """The MLA op's pool rows against eager ``(row / k_scale_bf16).to(fp8)`` (or ``* scale`` with a clamp)."""
    opts = (dict(fp8_dtype=E4, quant_dtype=torch.bfloat16) if sglang else
            dict(quant_dtype=torch.bfloat16, scale_mul=True, clamp=(-448.0, 448.0)))
    args = make_mla("cpu", cache_dtype=torch.uint8 if sglang else E4, scale_round=True, **opts)
    args["kv_c"].mul_(8)
    scale = MLA_SCALE if sglang else MLA_SCALE * 4096
    args["k_scale"] = torch.tensor(scale)
    tensors, options = split(args)
    p = mla.prepare_mla(**tensors, **options)
    before = p.kv_cache.clone()

    pos = args["positions"]
    c, s = args["cos"][pos], args["sin"][pos]
    k_rot = eager_rope_fp32(p.k_pe[:, None], c, s, args["is_neox"])[:, 0]
    row = _scaled(torch.cat([p.kv_c, k_rot], -1), args["k_scale"], torch.bfloat16, not sglang)
    if not sglang:
        row = row.clamp(-448, 448)
    want = before.clone()
    want.view(torch.uint8)[args["slot_mapping"]] = row.to(E4).view(torch.uint8).view(len(pos), 1, -1)

    MLA_OP(**tensors, **MlaOptions(**options).op_arguments())
    assert torch.equal(as_bytes(p.kv_cache), as_bytes(want))
    ref = mla.reference_problem(mla.prepare_mla(**dict(tensors, kv_cache=before.clone()), **options))
    mla.reference(ref, compute_dtype=torch.float64)
    assert torch.equal(as_bytes(ref.kv_cache), as_bytes(want))
    raw = before.clone()
    MLA_OP(**dict(tensors, kv_cache=raw), **MlaOptions(**dict(options, scale_round=False)).op_arguments())
    assert not torch.equal(as_bytes(raw), as_bytes(want)), "the rounding changes nothing here"


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, kw, error, match", [
    (RopeKVOptions, dict(scale_round=True), ValueError, r"^scale_round is given without quant_dtype"),
    (RopeKVOptions, dict(q_scale_round=True, quant_dtype=torch.bfloat16), ValueError,
     r"^q_scale_round is given without q_fp8_dtype"),
    (RopeKVOptions, dict(scale_round="yes"), TypeError, r"^scale_round must be a bool, got 'yes'"),
    (MlaOptions, dict(scale_round=True, scale_mul=True), ValueError, r"^scale_round is given without quant_dtype"),
    (MlaOptions, dict(scale_round=2), TypeError, r"^scale_round must be a bool, got 2"),
])
def test_bad_options_are_rejected(cls, kw, error, match):
    with pytest.raises(error, match=match):
        cls(**kw)


def test_rejected_call_writes_nothing():
    args = _rope_case(torch.bfloat16, E4, False, True, scale_round=True, q_scale_round=True)
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    tensors = {n: args.pop(n) for n in ("q", "k", "v", "k_cache", "v_cache", "slot_mapping")}
    with pytest.raises(ValueError, match=r"^q_scale_round is given without q_fp8_dtype"):
        kernels.rope_kv_store(**tensors, **dict(args, q_fp8_dtype=None, q_scale=None))
    with pytest.raises(ValueError, match=r"^scale_round is given without quant_dtype"):
        kernels.rope_kv_store(**tensors, **dict(args, quant_dtype=None, fp8_dtype=None, scale_mul=False))
    assert torch.equal(as_bytes(tensors["k_cache"]), before[0]) and torch.equal(as_bytes(tensors["v_cache"]),
                                                                                 before[1])


def test_options_keep_their_positions():
    """The new fields come last: options passed by position keep their meaning."""
    names = [f.name for f in RopeKVOptions.__dataclass_fields__.values()]
    # each added after the one before
    assert names[-4:] == ["scale_round", "q_scale_round", "norm_full_width", "norm_after_rope"]
    assert names[:3] == ["is_neox", "rotary_dim", "layout"]
    assert list(MlaOptions.__dataclass_fields__)[-2:] == ["scale_round", "deinterleave"]
    assert RopeKVOptions(False, 16).rotary_dim == 16 and not RopeKVOptions(False, 16).scale_round
