"""QK-norm in the fused op: each q/k head normalised as an RMSNorm (Qwen3, Gemma 3) before the RoPE, in one launch.

Two checks per case: against the float64 reference of the same options (``run_and_check``: poisoned outputs,
poisoned cache rows, the whole cache compared), and against eager model code: the model's own RMSNorm applied
in torch, then the op without the norm on its output. The second is independent of the reference's norm.
"""

from __future__ import annotations

import pytest
import torch

from fx_fusion import kernels
from fx_fusion.kernels.rope_kv_cache import prepare
from tests.kernels.test_rope_kv_cache import as_bytes, make_args, run_and_check


def qwen3_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF Qwen3RMSNorm: the normalised value rounded to x's dtype, then times the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) if w is None else w * h.to(x.dtype)


def gemma3_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Gemma3RMSNorm: fp32 throughout, times (1 + w), rounded once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


STYLES = {"qwen3": dict(norm_round=True, norm_offset=0.0), "gemma3": dict(norm_round=False, norm_offset=1.0)}


def norm_args(device, dtype, *, D=64, rot=None, is_neox=True, layout="token", weight=True, seed_scale=1.0):
    args = make_args(device, T=7, Hq=4, Hkv=2, D=D, rot=rot, layout=layout, dtype=dtype, qkv="3d", is_neox=is_neox)
    for x in ("q", "k"):
        args[x] = args[x] * seed_scale  # rows far from unit RMS: the norm has something to do
    weights = {x: (torch.randn(D, dtype=dtype, device=device) * 0.5 + 1.0 if weight else None) for x in ("q", "k")}
    return args, weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("rot,is_neox", [(None, True), (32, True), pytest.param(None, False, marks=pytest.mark.full)],
                         ids=["neox", "partial", "gptj"])  # quick: NeoX, whole and partial, on the token layout
@pytest.mark.parametrize("layout", ["token", pytest.param("paged", marks=pytest.mark.full)])
def test_norm_against_the_reference(device, dtype, style, rot, is_neox, layout):
    args, w = norm_args(device, dtype, rot=rot, is_neox=is_neox, layout=layout, seed_scale=3.0)
    run_and_check(dict(args, q_norm=True, k_norm=True, q_norm_weight=w["q"], k_norm_weight=w["k"], norm_eps=1e-6,
                       **STYLES[style]))


@pytest.mark.parametrize("which", ["q", "k"])
def test_one_side_normalised_without_weight(device, which):
    args, _ = norm_args(device, torch.bfloat16, weight=False, seed_scale=5.0)
    run_and_check(dict(args, **{f"{which}_norm": True}, norm_eps=1e-5, norm_round=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("style", list(STYLES))
def test_norm_is_the_models_norm(device, dtype, style):
    """The fused norm + RoPE + store equals the model's RMSNorm in eager torch followed by the op without it."""
    eps = 1e-6
    args, w = norm_args(device, dtype, rot=32, seed_scale=3.0)
    model_norm = qwen3_norm if style == "qwen3" else gemma3_norm
    q_n, k_n = model_norm(args["q"], w["q"], eps), model_norm(args["k"], w["k"], eps)
    assert q_n.dtype == dtype
    plain = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    common = dict(cos=args["cos"], sin=args["sin"], positions=args["positions"], rotary_dim=32, return_k=True)
    q_want, k_want = kernels.rope_kv_store(q_n, k_n, plain["v"], plain["k_cache"], plain["v_cache"],
                                           plain["slot_mapping"], **common)
    q_got, k_got = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                         args["slot_mapping"], q_norm=True, k_norm=True, norm_eps=eps,
                                         q_norm_weight=w["q"], k_norm_weight=w["k"], **STYLES[style], **common)
    # the fp32 sum of squares is the kernel's own order: in bf16 one step apart at most, rarely; in fp32 a few ulps
    ulp = torch.finfo(dtype).eps * (1 if dtype == torch.bfloat16 else 8)
    for got, want in ((q_got, q_want), (k_got, k_want), (args["k_cache"], plain["k_cache"])):
        both_nan = got.float().isnan() & want.float().isnan()  # poisoned cache rows no token addresses
        diff = torch.where(both_nan, 0.0, (got.float() - want.float()).abs())
        want = torch.where(both_nan, 0.0, want.float())
        assert (diff <= 2 * ulp * want.float().abs().clamp_min(1.0)).all(), diff.max()
        if dtype == torch.bfloat16:
            assert (diff > 0).float().mean() < 0.02
    assert torch.equal(as_bytes(args["v_cache"]), as_bytes(plain["v_cache"]))
    assert not torch.equal(q_got, kernels.rope_kv_store(  # the norm did something
        args["q"], args["k"], args["v"], args["k_cache"].clone(), args["v_cache"].clone(), args["slot_mapping"],
        **common)[0])


def test_bad_norm_arguments_name_the_argument_and_write_nothing(device):
    args, w = norm_args(device, torch.bfloat16)
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    cases = [
        (dict(q_norm_weight=w["q"]), ValueError, r"q_norm_weight is given but q_norm is False"),
        (dict(k_norm=True, k_norm_weight=w["k"][:32]), ValueError, r"k_norm_weight must be a contiguous \[64\]"),
        (dict(q_norm=True, q_norm_weight=torch.randn(128, dtype=torch.bfloat16, device=device)[::2]), ValueError,
         r"q_norm_weight must be a contiguous"),
        (dict(q_norm=True, q_norm_weight=w["q"].to(torch.int32)), TypeError, r"q_norm_weight must have dtype"),
        (dict(q_norm=True, norm_eps=float("nan")), ValueError, r"norm_eps must be a finite number"),
        (dict(k_norm=True, norm_eps=-1.0), ValueError, r"norm_eps must be >= 0"),
        (dict(k_norm=True, norm_offset="1"), ValueError, r"norm_offset must be a finite number"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            prepare(**args, **extra)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])
