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


# ------------------------------------------------------------------------------------------------
# The full-width norm (OLMo 2: one RMSNorm over the whole q / k projection, H * D features, before the head split)
# ------------------------------------------------------------------------------------------------

def olmo2_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Olmo2RMSNorm on the projection [T, H * D] (given here as [T, H, D]): fp32, times the weight, rounded once."""
    h = x.flatten(-2).float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (w.float() * h).to(x.dtype).view(x.shape)


def full_width_args(device, dtype, *, layout="token", rot=None, Hq=4, Hkv=2, T=7, qkv="3d"):
    args = make_args(device, T=T, Hq=Hq, Hkv=Hkv, D=64, rot=rot, layout=layout, dtype=dtype, qkv=qkv)
    # heads of very different scales: a per-head norm and a full-width one give different results
    for x, h in (("q", Hq), ("k", Hkv)):
        scale = torch.linspace(0.5, 4.0, h, device=device, dtype=dtype).repeat_interleave(64)
        args[x] = (args[x].flatten(-2) * scale).view(args[x].shape) if args[x].dim() >= 3 else args[x] * scale
    weights = {x: torch.randn(h * 64, dtype=dtype, device=device) * 0.5 + 1.0 for x, h in (("q", Hq), ("k", Hkv))}
    return args, weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout, rot, qkv", [("token", None, "3d"), ("paged", 32, "fused2d"),
                                              pytest.param("sequence", None, "4d", marks=pytest.mark.full)])
def test_full_width_norm_against_the_reference(device, dtype, layout, rot, qkv):
    args, w = full_width_args(device, dtype, layout=layout, rot=rot, qkv=qkv)
    run_and_check(dict(args, q_norm=True, k_norm=True, q_norm_weight=w["q"], k_norm_weight=w["k"], norm_eps=1e-6,
                       norm_full_width=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_full_width_norm_is_the_models_norm(device, dtype):
    """OLMo 2's norm in eager torch, then the op without it, against the op with the norm: and not the per-head
    norm (the heads' scales differ, so the two disagree)."""
    eps = 1e-6
    args, w = full_width_args(device, dtype, rot=32, Hq=8, Hkv=8, T=37)  # several tokens per program
    q_n, k_n = olmo2_norm(args["q"], w["q"], eps), olmo2_norm(args["k"], w["k"], eps)
    plain = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    common = dict(cos=args["cos"], sin=args["sin"], positions=args["positions"], rotary_dim=32, return_k=True)
    q_want, k_want = kernels.rope_kv_store(q_n, k_n, plain["v"], plain["k_cache"], plain["v_cache"],
                                           plain["slot_mapping"], **common)
    fused = dict(q_norm=True, k_norm=True, norm_eps=eps, q_norm_weight=w["q"], k_norm_weight=w["k"], **common)
    q_got, k_got = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                         args["slot_mapping"], norm_full_width=True, **fused)
    ulp = torch.finfo(dtype).eps * (1 if dtype == torch.bfloat16 else 8)
    for got, want in ((q_got, q_want), (k_got, k_want), (args["k_cache"], plain["k_cache"])):
        both_nan = got.float().isnan() & want.float().isnan()  # poisoned cache rows no token addresses
        diff = torch.where(both_nan, 0.0, (got.float() - want.float()).abs())
        want = torch.where(both_nan, 0.0, want.float())
        assert (diff <= 2 * ulp * want.abs().clamp_min(1.0)).all(), diff.max()
    assert torch.equal(as_bytes(args["v_cache"]), as_bytes(plain["v_cache"]))
    per_head_w = {x: w[x][:64] for x in w}  # a per-head norm of the same input: another result
    q_head, _ = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"].clone(),
                                      args["v_cache"].clone(), args["slot_mapping"],
                                      **dict(fused, q_norm_weight=per_head_w["q"], k_norm_weight=per_head_w["k"]))
    assert not torch.allclose(q_head.float(), q_got.float(), atol=0.1, rtol=0.1)


def test_full_width_bad_arguments(device):
    args, w = full_width_args(device, torch.bfloat16)
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    cases = [
        (dict(norm_full_width=True), ValueError, r"norm_full_width is given without q_norm or k_norm"),
        (dict(q_norm=True, norm_full_width=True, q_norm_weight=w["q"][:64]), ValueError,
         r"q_norm_weight must be a contiguous \[256\] tensor \(q's heads \* head_dim\)"),
        (dict(k_norm=True, q_norm_weight=None, k_norm_weight=w["k"]), ValueError,
         r"k_norm_weight must be a contiguous \[64\] tensor \(head_dim\)"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            prepare(**args, **extra)
    odd, _ = full_width_args(device, torch.bfloat16, Hq=6, Hkv=2)
    with pytest.raises(ValueError, match=r"norm_full_width needs a power-of-two number of q heads, got 6"):
        prepare(**odd, q_norm=True, norm_full_width=True)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])


# ------------------------------------------------------------------------------------------------
# The norm after the RoPE (HunYuan: RMSNorm with a weight; Llama 4: without): the rotated head, rounded to x's
# dtype as the model stores it, then normalised
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("weight", [True, False], ids=["hunyuan", "llama4"])
@pytest.mark.parametrize("rot,is_neox,layout", [(None, True, "token"), (32, True, "paged"),
                                                pytest.param(None, False, "token", marks=pytest.mark.full)],
                         ids=["neox", "partial-paged", "gptj"])
def test_norm_after_rope_against_the_reference(device, dtype, weight, rot, is_neox, layout):
    args, w = norm_args(device, dtype, rot=rot, is_neox=is_neox, layout=layout, weight=weight, seed_scale=3.0)
    run_and_check(dict(args, q_norm=True, k_norm=True, q_norm_weight=w["q"], k_norm_weight=w["k"], norm_eps=1e-5,
                       norm_round=True, norm_after_rope=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_norm_after_rope_is_the_models_norm(device, dtype):
    """The op with ``norm_after_rope`` equals the op without the norm (the RoPE and the store, k returned)
    followed by HunYuan's RMSNorm in eager torch, and differs from the norm before the RoPE."""
    eps = 1e-5
    args, w = norm_args(device, dtype, rot=32, seed_scale=3.0)
    common = dict(cos=args["cos"], sin=args["sin"], positions=args["positions"], rotary_dim=32, return_k=True)
    plain = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    q_rot, k_rot = kernels.rope_kv_store(args["q"], args["k"], plain["v"], plain["k_cache"], plain["v_cache"],
                                         plain["slot_mapping"], **common)
    q_want, k_want = qwen3_norm(q_rot, w["q"], eps), qwen3_norm(k_rot, w["k"], eps)
    fused = dict(q_norm=True, k_norm=True, norm_eps=eps, norm_round=True, q_norm_weight=w["q"], k_norm_weight=w["k"],
                 **common)
    q_got, k_got = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                         args["slot_mapping"], norm_after_rope=True, **fused)
    ulp = torch.finfo(dtype).eps * (1 if dtype == torch.bfloat16 else 8)
    for got, want in ((q_got, q_want), (k_got, k_want)):
        diff = (got.float() - want.float()).abs()
        assert (diff <= 2 * ulp * want.float().abs().clamp_min(1.0)).all(), diff.max()
        if dtype == torch.bfloat16:
            assert (diff > 0).float().mean() < 0.02
    stored = args["slot_mapping"]
    torch.testing.assert_close(args["k_cache"][stored].float(), k_got.float(), rtol=0, atol=0)
    assert torch.equal(as_bytes(args["v_cache"]), as_bytes(plain["v_cache"]))
    q_before, _ = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"].clone(),
                                        args["v_cache"].clone(), args["slot_mapping"], **fused)
    assert not torch.allclose(q_before.float(), q_got.float(), atol=1e-2, rtol=1e-2)


def test_norm_after_rope_needs_a_norm(device):
    args, _ = norm_args(device, torch.bfloat16)
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(ValueError, match=r"^norm_after_rope is given without q_norm or k_norm"):
        kernels.rope_kv_store(**args, norm_after_rope=True)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])
