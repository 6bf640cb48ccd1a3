"""``fx_fusion.patterns.qk_norm.match_qk_norm`` on post-grad-like aten graphs.

Each case is a small function written the way model code spells an RMSNorm per head (HF Qwen3/Llama and
Gemma 3, vLLM's ``forward_native`` and its Gemma norm, ``F.rms_norm`` / ``nn.RMSNorm``) followed by the views a
model makes before its RoPE. It is traced to aten with Inductor's decompositions (functionalised: the post-grad
graph is functional), and ``match_qk_norm`` runs on the node returned. A positive case must match with the
expected fields, and the match must *describe the computation*: the norm rebuilt from the match alone (the
kernel's formula in fp32, rounded where the match says) must equal the traced function's output on random
inputs to 1 ulp of the model dtype (the order of the mean's sum may differ), and close in fp32. A negative case
must raise ``NotNorm`` with its reason.

The last tests run the matcher on real post-grad graphs, behind the RoPE that ``match_rope`` finds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from fx_fusion.patterns.qk_norm import NormMatch, NotNorm, match_qk_norm
from fx_fusion.patterns.rope import match_rope
from tests.patterns.test_rope import node_values, output_node

B, S, H, D = 2, 3, 4, 16
F32_EPS = torch.finfo(torch.float32).eps

# ------------------------------------------------------------------------------------------------
# Tracing and checking
# ------------------------------------------------------------------------------------------------


def trace(fn, *args) -> torch.fx.GraphModule:
    """Decomposed as Inductor does, then functionalised (a decomposition may write in place: ``F.rms_norm``'s
    ``add_`` of eps; the post-grad graph is functional)."""
    gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)
    return make_fx(torch.func.functionalize(gm), tracing_mode="fake")(*args)


def rebuild(m: NormMatch, values) -> torch.Tensor:
    """The norm from the match's fields alone, as the kernel computes it (fp32, rounded where the match says),
    then the match's views."""
    x = values[m.x]
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / xf.shape[-1] + m.eps)
    if m.round_before_weight:
        y = y.to(x.dtype).float()
    if m.weight is not None:
        w = values[m.weight]
        assert w.dtype == m.weight_dtype
        y = y * (w.float() + m.offset)
    y = y.to(x.dtype)
    for v in m.views:
        y = v.target(y, *v.args[1:], **v.kwargs)
    return y


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in the order of their values: neighbours differ by 1 (one ulp)."""
    i = t.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def assert_within_one_ulp(got: torch.Tensor, expected: torch.Tensor):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return
    gap = (ordered_bits(got.contiguous()) - ordered_bits(expected.contiguous())).abs()
    assert gap.max() <= 1, f"{int((gap > 1).sum())} values more than 1 ulp apart"
    # 1 ulp is for the order of the mean's sum: a rounding at the wrong place would show in many more values
    assert (gap > 0).float().mean() < 0.02, f"{int((gap > 0).sum())} of {gap.numel()} values differ"


def check_match(fn, args, *, weight, offset=0.0, round_before_weight=False, eps=1e-6, weight_arg=1, n_views=None):
    gm = trace(fn, *args)
    m = match_qk_norm(output_node(gm))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert m.x is placeholders[0], f"normalised {m.x}, expected {placeholders[0]}"
    assert m.out.meta["val"].dtype == args[0].dtype
    if weight:
        assert m.weight is placeholders[weight_arg] and m.weight_dtype == args[weight_arg].dtype
    else:
        assert m.weight is None and m.weight_dtype is None
    assert (m.offset, m.round_before_weight) == (offset, round_before_weight)
    assert m.eps == pytest.approx(eps, rel=1e-6)
    if n_views is not None:
        assert len(m.views) == n_views
    values = node_values(gm, *args)
    assert_within_one_ulp(rebuild(m, values), values[output_node(gm)])
    return m


# ------------------------------------------------------------------------------------------------
# Spellings (x: [B, S, H, D] from the projection viewed to heads; each returns what the RoPE rotates)
# ------------------------------------------------------------------------------------------------


def hf_rms_norm(x, w, eps=1e-6):
    """HF Qwen3RMSNorm / LlamaRMSNorm."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return w * h.to(input_dtype)


def gemma3_rms_norm(x, w, eps=1e-6):
    """HF Gemma3RMSNorm."""

    def _norm(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    out = _norm(x.float())
    out = out * (1.0 + w.float())
    return out.type_as(x)


def vllm_rms_norm(x, w, eps=1e-6):
    """vLLM RMSNorm.forward_native (no residual)."""
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    x = x.to(orig_dtype)
    return x * w


def vllm_gemma_rms_norm(x, w, eps=1e-6):
    """vLLM GemmaRMSNorm.forward_native (no residual)."""
    orig_dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    x = x * (1.0 + w.float())
    return x.to(orig_dtype)


def functional_rms_norm(x, w, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


SPELLINGS = {  # name: (fn, offset, rounds before the weight in bf16/fp16)
    "hf": (hf_rms_norm, 0.0, True),
    "gemma3": (gemma3_rms_norm, 1.0, False),
    "vllm": (vllm_rms_norm, 0.0, True),
    "vllm_gemma": (vllm_gemma_rms_norm, 1.0, False),
    "F.rms_norm": (functional_rms_norm, 0.0, False),  # torch 2.13: the weight multiply in fp32, one rounding
}


def hf_layout(norm, eps=1e-6):
    """HF attention: norm on [B, S, H, D], then ``transpose(1, 2)`` to [B, H, S, D]."""
    return lambda x, w: norm(x, w, eps).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("name", SPELLINGS)
def test_spellings(name, eps, dtype):
    fn, offset, rounds = SPELLINGS[name]
    x, w = torch.randn(B, S, H, D, dtype=dtype), 1.0 + 0.1 * torch.randn(D, dtype=dtype)
    m = check_match(hf_layout(fn, eps), (x, w), weight=True, offset=offset, eps=eps, n_views=1,
                    round_before_weight=rounds and dtype != torch.float32)
    assert m.views[0].target is torch.ops.aten.permute.default


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fp32_weight_in_a_bf16_model(dtype):
    """A weight kept in fp32: the multiply is in fp32 (type promotion); rounded once after it when x is bf16."""

    def fn(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (w * h.to(x.dtype)).to(x.dtype)

    check_match(fn, (torch.randn(S, H, D, dtype=dtype), torch.randn(D)), weight=True,
                round_before_weight=dtype != torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("spelling", ["hf", "nn.RMSNorm", "F.rms_norm_default_eps"])
def test_without_weight(spelling, dtype):
    """``elementwise_affine=False`` and a norm with no weight: only the final rounding."""
    if spelling == "hf":
        def fn(x):
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
        eps = 1e-5
    elif spelling == "nn.RMSNorm":
        norm = torch.nn.RMSNorm(D, eps=1e-5, elementwise_affine=False, dtype=dtype)
        fn, eps = (lambda x: norm(x)), 1e-5
    else:
        def fn(x):
            return F.rms_norm(x, (D,))
        eps = F32_EPS  # eps=None: fp32's machine epsilon
    check_match(fn, (torch.randn(5, H, D, dtype=dtype),), weight=False, eps=eps)


def test_nn_rmsnorm_module_weight():
    norm = torch.nn.RMSNorm(D, eps=1e-6, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(D))

    def fn(x, w):
        return torch.func.functional_call(norm, {"weight": w}, (x,)).transpose(1, 2)

    check_match(fn, (torch.randn(B, S, H, D, dtype=torch.bfloat16), norm.weight.detach()), weight=True)


@pytest.mark.parametrize("views", ["flat_rows_to_heads", "unsqueeze", "transpose_then_reshape", "none"])
def test_views_that_keep_the_features(views):
    """The norm on [T*H, D] rows viewed to heads, an unsqueezed batch dim, HF's transpose then a reshape."""
    T = 5
    if views == "flat_rows_to_heads":
        def fn(x, w):
            return hf_rms_norm(x.view(T * H, D), w).view(T, H, D)
        shape, n = (T, H, D), 1
    elif views == "unsqueeze":
        def fn(x, w):
            return hf_rms_norm(x, w).unsqueeze(0)
        shape, n = (T, H, D), 1
    elif views == "transpose_then_reshape":
        def fn(x, w):
            return hf_rms_norm(x, w).transpose(1, 2).reshape(B * H, S, D)
        shape, n = (B, S, H, D), 3  # permute, then clone and view (the reshape of a transposed tensor)
    else:
        fn, shape, n = (lambda x, w: hf_rms_norm(x, w)), (T, H, D), 0
    x = torch.randn(shape, dtype=torch.bfloat16)
    if views == "flat_rows_to_heads":  # the view of x before the norm is traced first: x is its input
        gm = trace(fn, x, torch.randn(D, dtype=torch.bfloat16))
        m = match_qk_norm(output_node(gm))
        assert m.x.target is torch.ops.aten.view.default and len(m.views) == n
        values = node_values(gm, x, torch.randn(D, dtype=torch.bfloat16))
        assert_within_one_ulp(rebuild(m, values), values[output_node(gm)])
        return
    check_match(fn, (x, torch.randn(D, dtype=torch.bfloat16)), weight=True, round_before_weight=True, n_views=n)


def square_first_then_rsqrt(x, w):
    h = x.float()
    return (torch.rsqrt(1e-6 + (h * h).mean(-1, keepdim=True)) * h * (1 + w.float())).to(x.dtype)


def square_method(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + 1e-6)).type_as(x)


def two_upcasts_of_x(x, w):  # the square and the product each upcast x on their own
    return w * (x.float() * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def no_eps(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True))).to(x.dtype)


def rms_norm_fp32_weight(x, w):  # the weight upcast for F.rms_norm (torch 2.11 and 2.13 take the composite path)
    return F.rms_norm(x, (x.shape[-1],), w.float(), 1e-6)


@pytest.mark.parametrize("fn, offset, rounds, eps", [
    (rms_norm_fp32_weight, 0.0, False, 1e-6),
    (square_first_then_rsqrt, 1.0, False, 1e-6),
    (square_method, 0.0, True, 1e-6),
    (two_upcasts_of_x, 0.0, True, 1e-6),
    (no_eps, 0.0, True, 0.0),
], ids=lambda v: getattr(v, "__name__", None))
def test_other_spellings_of_the_same_maths(fn, offset, rounds, eps):
    args = (torch.randn(S, H, D, dtype=torch.bfloat16), 1.0 + 0.1 * torch.randn(D, dtype=torch.bfloat16))
    check_match(fn, args, weight=True, offset=offset, round_before_weight=rounds, eps=eps)


def test_the_description_is_specific():
    """Where the graph rounds matters: HF's bf16 norm rebuilt without its rounding before the weight, or
    Gemma's with it, is off by more than the reduction order allows; so is Gemma's without its offset."""
    import dataclasses

    for norm in (hf_rms_norm, gemma3_rms_norm):
        fn = lambda x, w: norm(x, w)  # noqa: E731
        args = (torch.randn(64, H, D, dtype=torch.bfloat16), 1.0 + torch.randn(D, dtype=torch.bfloat16))
        gm = trace(fn, *args)
        m = match_qk_norm(output_node(gm))
        values = node_values(gm, *args)
        assert_within_one_ulp(rebuild(m, values), values[output_node(gm)])
        for wrong in (dataclasses.replace(m, round_before_weight=not m.round_before_weight),
                      dataclasses.replace(m, offset=1.0 - m.offset)):
            with pytest.raises(AssertionError):
                assert_within_one_ulp(rebuild(wrong, values), values[output_node(gm)])


def test_what_the_matcher_follows():
    """The views and casts are the table's (``fx_utils.OP_ROLES``), as the store matcher walks them."""
    from fx_fusion.patterns import kv_store, qk_norm, quant

    assert qk_norm._VIEWS == kv_store._WALKED
    assert qk_norm._CASTS == quant._CONVERT == {torch.ops.prims.convert_element_type.default,
                                                torch.ops.aten._to_copy.default}


# ------------------------------------------------------------------------------------------------
# What is refused, and why
# ------------------------------------------------------------------------------------------------


def _norm_fp32(h, eps=1e-6):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def bias_added(x, w, b):
    return hf_rms_norm(x, w) + b


def weight_per_head(x, w):  # w: [H, D]
    return hf_rms_norm(x, w)


def mean_over_heads(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-2, keepdim=True) + 1e-6)).to(x.dtype)


def mean_over_heads_and_features(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean((-2, -1), keepdim=True) + 1e-6)).to(x.dtype)


def max_instead_of_add(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).clamp_min(1e-6))).to(x.dtype)


def eps_tensor(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def eps_with_alpha(x, w):  # mean + 2 * eps
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add(1e-6, alpha=2))).to(x.dtype)


def offset_with_alpha(x, w):  # w + 3 * 1.0
    return (_norm_fp32(x.float()) * w.float().add(1.0, alpha=3)).to(x.dtype)


def olmo2_full_width(x, w):  # x: [B, S, H*D], w: [H*D]; OLMo 2 normalises q and k before the head split
    h = x.float()
    h = (w * _norm_fp32(h)).to(x.dtype)
    return h.view(B, S, H, D).transpose(1, 2)


def olmo2_per_head_weight(x, w):  # a full-width norm, then a [D] weight per head after the split: not the op's
    h = (_norm_fp32(x.float()).view(B, S, H, D) * w).to(x.dtype)
    return h.transpose(1, 2)


def test_full_width_norm_is_matched_with_its_heads():
    """OLMo 2: one norm over the H * D features of the projection, then the head split: heads = H."""
    m = match_qk_norm(output_node(trace(olmo2_full_width, torch.randn(B, S, H * D, **bf), torch.randn(H * D))))
    assert isinstance(m, NormMatch) and m.heads == H and list(m.weight.meta["val"].shape) == [H * D]
    assert (m.offset, m.round_before_weight) == (0.0, False)


def features_reordered(x, w):  # interleaved pairs to halves between the norm and the RoPE
    return hf_rms_norm(x, w).unflatten(-1, (D // 2, 2)).transpose(-1, -2).flatten(-2)


def features_transposed(x, w):  # x: [B, S, D, D]
    return hf_rms_norm(x, w).transpose(-1, -2)


def computed_in_bf16(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def weight_rounded_first(x, w):  # w fp32, multiply in fp32
    return (_norm_fp32(x.float()) * w.to(torch.bfloat16)).to(x.dtype)


def offset_added_in_bf16(x, w):
    return (_norm_fp32(x.float()) * (1.0 + w).float()).to(x.dtype)


def left_in_fp32(x, w):  # fp32 weight times the rounded norm: promoted to fp32 and never rounded back
    return w * _norm_fp32(x.float()).to(x.dtype)


def rounded_to_another_dtype(x, w):
    return w * _norm_fp32(x.float()).to(torch.float16)


def divided_by_sqrt(x, w):
    h = x.float()
    return w * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def scaled_by_a_number(x):
    return (_norm_fp32(x.float()) * 0.5).to(x.dtype)


bf = dict(dtype=torch.bfloat16)
NEGATIVES = [
    (bias_added, (torch.randn(S, H, D, **bf), torch.randn(D, **bf), torch.randn(D, **bf)), "a bias is added"),
    (weight_per_head, (torch.randn(S, H, D, **bf), torch.randn(H, D, **bf)), r"has shape \[4, 16\], not \[16\]"),
    (mean_over_heads, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), r"mean over dims \[-2\]"),
    (mean_over_heads_and_features, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "not the last dim only"),
    (max_instead_of_add, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "not mean \\+ eps"),
    (eps_tensor, (torch.randn(S, H, D, **bf), torch.randn(D, **bf), torch.tensor(1e-6)), "eps is a tensor"),
    (eps_with_alpha, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "adds eps times 2"),
    (offset_with_alpha, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "computed in the graph"),
    (olmo2_per_head_weight, (torch.randn(B, S, H * D, **bf), torch.randn(D)), "no operand of the multiply"),
    (features_reordered, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "moves the normalised features"),
    (features_transposed, (torch.randn(S, H, D, D, **bf), torch.randn(D, **bf)), "moves the normalised features"),
    (computed_in_bf16, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "computed in torch.bfloat16"),
    (weight_rounded_first, (torch.randn(S, H, D, **bf), torch.randn(D)), "weight is rounded from torch.float32"),
    (offset_added_in_bf16, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "offset is added .* in torch.bf"),
    (left_in_fp32, (torch.randn(S, H, D, **bf), torch.randn(D)), "not rounded back"),
    (rounded_to_another_dtype, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "casts torch.float32 to "
     "torch.float16"),
    (divided_by_sqrt, (torch.randn(S, H, D, **bf), torch.randn(D, **bf)), "no operand of the multiply"),
    (scaled_by_a_number, (torch.randn(S, H, D, **bf),), "multiplied by the number 0.5"),
]


@pytest.mark.parametrize("fn, args, reason", NEGATIVES, ids=[f.__name__ for f, _, _ in NEGATIVES])
def test_not_norm(fn, args, reason):
    with pytest.raises(NotNorm, match=reason):
        match_qk_norm(output_node(trace(fn, *args)))


def test_not_a_norm_at_all():
    with pytest.raises(NotNorm, match="not an RMSNorm's result"):
        match_qk_norm(output_node(trace(lambda x: x.exp().transpose(0, 1), torch.randn(S, H, D))))


def test_weight_computed_in_the_graph():
    """The weight must be a graph input (a parameter): one row of a stacked [L, D] weight is refused."""

    def fn(x, stacked):
        return hf_rms_norm(x, stacked[1])

    args = (torch.randn(S, H, D, dtype=torch.bfloat16), torch.randn(3, D, dtype=torch.bfloat16))
    with pytest.raises(NotNorm, match="computed in the graph"):
        match_qk_norm(output_node(trace(fn, *args)))


# ------------------------------------------------------------------------------------------------
# Real post-grad graphs: the norm behind the RoPE that match_rope finds
# ------------------------------------------------------------------------------------------------


class CaptureRopeX(torch._inductor.custom_graph_pass.CustomGraphPass):
    """A post-grad pass that only looks: for each RoPE it is pointed at, the norm behind the rotated tensor."""

    def __init__(self, roots):
        self.roots, self.results = roots, []

    def __call__(self, graph):
        for root in self.roots(graph):
            x = match_rope(root).x
            try:
                self.results.append(match_qk_norm(x))
            except NotNorm as e:
                self.results.append(e)

    def uuid(self):
        return "test_qk_norm.CaptureRopeX"


def compile_and_capture(fn, args, roots, dynamic_dims=()):
    """Compile ``fn`` on ``args`` with ``dynamic_dims`` ((arg, dim) pairs) marked dynamic; the captured results."""
    capture = CaptureRopeX(roots)
    torch._dynamo.reset()
    for i, dim in dynamic_dims:
        torch._dynamo.mark_dynamic(args[i], dim)
    try:
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=capture):
            torch.compile(fn)(*args)
    finally:
        torch._dynamo.reset()
    return capture.results


def graph_outputs(graph):
    (out,) = graph.find_nodes(op="output")
    return list(out.args[0])


def rope_after(norm):
    """k = norm(k).transpose(1, 2), then HF's NeoX RoPE with the fp32 tables cast to k's dtype."""

    def fn(k, w, cos, sin):
        k = norm(k, w).transpose(1, 2)
        cos, sin = cos.to(k.dtype).unsqueeze(1), sin.to(k.dtype).unsqueeze(1)
        return k * cos + torch.cat((-k[..., D // 2:], k[..., : D // 2]), dim=-1) * sin

    return fn


@pytest.mark.parametrize("name, dtype, dynamic", [
    ("hf", torch.bfloat16, False),
    ("hf", torch.float16, True),
    ("gemma3", torch.bfloat16, False),
    ("F.rms_norm", torch.bfloat16, False),
    ("vllm_gemma", torch.float32, False),
])
def test_post_grad_graph_behind_a_rope(name, dtype, dynamic):
    norm, offset, rounds = SPELLINGS[name]
    args = (torch.randn(B, S, H, D, dtype=dtype), 1.0 + 0.1 * torch.randn(D, dtype=dtype), torch.randn(B, S, D),
            torch.randn(B, S, D))
    tokens = ((0, 1), (2, 1), (3, 1)) if dynamic else ()  # the sequence dim of k, cos and sin
    (m,) = compile_and_capture(rope_after(lambda x, w: norm(x, w)), args, graph_outputs, tokens)
    assert isinstance(m, NormMatch), m
    assert (m.x.op, m.weight.op) == ("placeholder", "placeholder")
    assert (m.offset, m.round_before_weight, m.weight_dtype) == (offset, rounds and dtype != torch.float32, dtype)
    assert m.eps == pytest.approx(1e-6, rel=1e-6)
    assert [v.target for v in m.views] == [torch.ops.aten.permute.default]
    assert any(not isinstance(s, int) for s in m.x.meta["val"].shape) == dynamic


def test_post_grad_graph_olmo2_full_width():
    def norm(x, w):  # x: [B, S, H*D] projected, normalised over H*D, then split into heads
        h = x.float()
        return (w * _norm_fp32(h)).to(x.dtype).view(B, S, H, D)

    args = (torch.randn(B, S, H * D, dtype=torch.bfloat16), torch.randn(H * D), torch.randn(B, S, D),
            torch.randn(B, S, D))
    (m,) = compile_and_capture(rope_after(norm), args, graph_outputs)
    assert isinstance(m, NormMatch) and m.heads == H, m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_post_grad_graph_of_the_hf_qk_norm_block(dtype):
    """tests/attention_blocks.py's HF block with Qwen3's q/k norm: the norm behind the stored k's RoPE."""
    from fx_fusion.patterns.kv_store import match_store, walk_views
    from tests.attention_blocks import make_block, prefill_inputs

    def stored_k(graph):
        st = match_store(next(iter(graph.find_nodes(op="call_function", target=torch.ops.aten.index_put.default))))
        return [walk_views(st.value, st.value_roles)[0]]

    block = make_block("hf", qk_norm=True, dtype=dtype)
    (m,) = compile_and_capture(block, prefill_inputs(block), stored_k)
    assert isinstance(m, NormMatch), m
    assert m.weight.op == "placeholder" and m.weight_dtype == dtype and m.offset == 0.0
    assert m.round_before_weight == (dtype != torch.float32)
    assert m.eps == block.k_norm.variance_epsilon
    assert m.out.meta["val"].shape[-1] == block.head_dim


def test_mean_over_every_dim():
    """``mean(dim=None)`` of the squares (one value for the whole tensor) is not a norm per row."""

    def fn(x, w):
        h = x.float()
        ms = torch.ops.aten.mean.dim(h.pow(2), None, True)
        return w * (h * torch.rsqrt(ms + 1e-6)).to(x.dtype)

    args = (torch.randn(S, H, D, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16))
    with pytest.raises(NotNorm, match="mean over dims all"):
        match_qk_norm(output_node(trace(fn, *args)))


HF_FAMILIES = {  # transformers' own attention code, one layer, bf16: (config class, model class, expected)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(offset=0.0, round_before_weight=True, n_views=1)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(offset=1.0, round_before_weight=False, n_views=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(offset=0.0, round_before_weight=False, n_views=2)),
}


@pytest.mark.full  # three model compiles (about 20 s each on two cores)
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_models(family):
    """The norm behind the stored k's RoPE in transformers' Qwen3 and Gemma 3 (per head, after or before the
    transpose), and OLMo 2's norm over the whole projection (its heads counted)."""
    transformers = pytest.importorskip("transformers")
    from fx_fusion.patterns.kv_store import match_store, walk_views

    config_cls, model_cls, expected = HF_FAMILIES[family]
    sizes = dict(vocab_size=128, num_hidden_layers=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                 pad_token_id=0, attn_implementation="sdpa", hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2)
    if family != "olmo2":
        sizes["head_dim"] = 16
    config = getattr(transformers, config_cls)(**sizes)
    model = getattr(transformers, model_cls)(config).to(torch.bfloat16).eval()
    cache = transformers.StaticCache(config=config, max_cache_len=16)
    cache.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=torch.bfloat16, device="cpu")

    def stored_ropes(graph):
        roots = []
        for n in graph.find_nodes(op="call_function", target=torch.ops.aten.index_put.default):
            st = match_store(n)
            roots.append(walk_views(st.value, st.value_roles)[0])
        return roots[:1]  # the k store (the v store holds no RoPE)

    (m,) = compile_and_capture(lambda ids: model(input_ids=ids, past_key_values=cache, use_cache=True).logits,
                               (torch.randint(1, 128, (1, 5)),), stored_ropes)
    if isinstance(expected, str):
        assert isinstance(m, NotNorm) and expected in str(m), m
        return
    assert isinstance(m, NormMatch), m
    assert m.weight.op == "placeholder" and m.weight_dtype == torch.bfloat16
    assert m.eps == (1e-5 if family == "olmo2" else 1e-6)  # the configs' defaults
    assert (m.offset, m.round_before_weight, len(m.views)) == tuple(expected.values())
    assert m.heads == (2 if family == "olmo2" else 1)  # k's heads (num_key_value_heads) under one norm
