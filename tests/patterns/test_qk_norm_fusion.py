"""QK-norm + RoPE + KV-cache store in one op: token-pool blocks that normalise q and k per head before the RoPE,
written as vLLM and SGLang write Qwen3 and Gemma 3, compiled with the fx_fusion backend.

Positive cases: every layer's site fuses with both norms inside the op (the site names them; no rsqrt is left in
Inductor's code), outputs and caches (poisoned, untouched rows included) equal to eager over a prefill and two
decode steps. Negative cases: a norm the op cannot take (a bias after it, its result read by something else)
stays a kernel of its own and the site says why; the RoPE and the store still fuse.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.attention_blocks import SGLangBlock, decode_inputs, make_inputs, prefill_inputs, token_pool_rotary
from tests.patterns.test_rope_kv_store import (
    CACHE_TOL, OUTPUT_TOL, assert_close, assert_same_state, check_fused, compile_with, inference, records)

__all__ = ["inference", "records"]  # fixtures
BF16 = torch.bfloat16
# bf16: the op sums the squares in its own order, so a normalised value may be one ulp from eager's, and the
# RoPE passes that on (up to 2^-5 for values in [4, 8))
NORM_CACHE_TOL = {**CACHE_TOL, BF16: (5e-2, 2e-2)}


def vllm_rms_norm(x, w, eps):
    """vLLM ``RMSNorm.forward_static`` (Qwen3's q_norm / k_norm): rounded to x's dtype, then times the weight."""
    orig = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    x = x.to(orig)
    return x if w is None else x * w


def sglang_rms_norm(x, w, eps):
    """SGLang ``RMSNorm.forward_native``: the weight multiplied in fp32, then rounded once."""
    orig = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return (x * w.to(torch.float32)).to(orig)


def gemma_rms_norm(x, w, eps):
    """vLLM ``GemmaRMSNorm.forward_static``: ``x * (1 + w)`` in fp32."""
    orig = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x * (1.0 + w.float())).to(orig)


class QKNormBlock(SGLangBlock):
    """A token-pool attention block with QK-norm (``form``):

    vllm-qwen3     ``q.view(T, H, D)`` -> vLLM RMSNorm -> ``view(q.shape)`` (vLLM's Qwen3Attention)
    sglang-qwen3   ``q.reshape(-1, D)`` -> SGLang RMSNorm -> ``view(q.shape)`` (SGLang's ``_apply_qk_norm``)
    gemma3         ``q.unflatten(-1, (H, D))`` -> GemmaRMSNorm (``1 + w``) -> ``flatten`` (vLLM's Gemma 3)
    no-weight      vLLM's RMSNorm without a weight
    olmo2          HF's Olmo2RMSNorm over the whole projection ``[T, H * D]`` (weight ``[H * D]``), then the heads
    bias           vLLM's RMSNorm plus a per-feature bias: not an RMSNorm the op takes
    read-k-norm    vLLM-qwen3, and the normalised k is also returned: the k norm stays a kernel of its own
    """

    def __init__(self, *, form="vllm-qwen3", eps=1e-6, **kw):
        super().__init__(**kw)
        self.norm_form, self.eps = form, eps
        wdtype = torch.float32 if form == "sglang-qwen3" else self.dtype
        heads = (self.num_heads, self.num_kv_heads) if form == "olmo2" else (1, 1)
        self.q_norm_weight = nn.Parameter(1.0 + 0.2 * torch.randn(heads[0] * self.head_dim, dtype=wdtype))
        self.k_norm_weight = nn.Parameter(1.0 + 0.2 * torch.randn(heads[1] * self.head_dim, dtype=wdtype))
        self.bias = nn.Parameter(0.1 * torch.randn(self.head_dim, dtype=self.dtype))

    def _norm(self, x, w):
        d, f = self.head_dim, self.norm_form
        if f == "sglang-qwen3":
            return sglang_rms_norm(x.reshape(-1, d), w, self.eps).view(x.shape)
        if f == "olmo2":
            h = x.float()
            return (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)
        if f == "gemma3":
            return gemma_rms_norm(x.unflatten(-1, (-1, d)), w, self.eps).flatten(-2)
        y = vllm_rms_norm(x.view(*x.shape[:-1], x.shape[-1] // d, d), None if f == "no-weight" else w, self.eps)
        return (y + self.bias if f == "bias" else y).view(x.shape)

    def forward(self, positions, hidden, loc, kv_loc=None):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self._norm(q, self.q_norm_weight), self._norm(k, self.k_norm_weight)
        k_normed = k
        q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.rot_dim, self.style,
                                 self.upcast, False)
        self.k_buffer[loc] = k.view(-1, self.num_kv_heads, self.head_dim)
        self.v_buffer[loc] = v.view(-1, self.num_kv_heads, self.head_dim)
        kv_loc = loc if kv_loc is None else kv_loc
        out = self._token_pool_attention(q, self.k_buffer[kv_loc], self.v_buffer[kv_loc], positions)
        return (out, k_normed) if self.norm_form == "read-k-norm" else out


def run(block, records, codes_of=None):
    """Prefill of 5 tokens and two decode steps, compiled and eager; outputs and caches compared."""
    eager = copy.deepcopy(block)
    compiled = compile_with(block)
    out_tol = OUTPUT_TOL
    for i, inputs in enumerate((prefill_inputs(block, 5), decode_inputs(block, 5), decode_inputs(block, 6, seed=1))):
        assert_close(compiled(*inputs), eager(*inputs), out_tol, f"step {i} output")
        assert_same_state(block, eager, f"step {i}", NORM_CACHE_TOL)
    return records


FULL = pytest.mark.full  # the quick tier keeps one case of each kind
CASES = [pytest.param(form, dtype, id=f"{form}-{name}",
                      marks=() if (form, name) in (("vllm-qwen3", "fp32"), ("olmo2", "bf16")) else FULL)
         for form in ("vllm-qwen3", "sglang-qwen3", "gemma3", "no-weight", "olmo2")
         for dtype, name in ((torch.float32, "fp32"), (BF16, "bf16"))]


@pytest.mark.parametrize("form, dtype", CASES)
def test_qk_norms_fuse_into_the_op(form, dtype, records, codes, inference):
    check_norms_fused(QKNormBlock(form=form, dtype=dtype, num_heads=4, num_kv_heads=2, head_dim=16).eval(), records,
                      codes)


def check_norms_fused(block, records, codes) -> None:
    """``run``, then: one fused site per graph with both norms inside the op and no note, no rsqrt left."""
    run(block, records)
    check_fused(records, codes, [block.k_buffer])
    for rec in records:
        (site,) = rec.fused
        assert {"q_norm", "k_norm"} <= set(site.nodes) and site.notes == [], (site.nodes, site.notes)
    assert not any("rsqrt" in code for code in codes), "a norm is left outside the op"


@FULL
def test_partial_rotary_normalises_the_whole_head(records, codes, inference):
    """The norm covers all D features; the RoPE only the first rot_dim: the op normalises the tail too."""
    block = QKNormBlock(form="vllm-qwen3", rot_dim=8, style="gptj").eval()
    run(block, records)
    check_fused(records, codes, [block.k_buffer])
    assert all({"q_norm", "k_norm"} <= set(rec.fused[0].nodes) for rec in records)


@pytest.mark.parametrize("form, who, why", [
    pytest.param("bias", "q's", "a bias is added after the norm", marks=FULL),
    ("read-k-norm", "k's", "also reads"),
], ids=["bias", "read-k-norm"])
def test_a_norm_the_op_cannot_take_stays_and_is_reported(form, who, why, records, codes, inference):
    block = QKNormBlock(form=form).eval()
    run(block, records)
    check_fused(records, codes, [block.k_buffer])
    for rec in records:
        (site,) = rec.fused
        assert any(note.startswith(f"{who} QK-norm stays a kernel of its own") and why in note
                   for note in site.notes), site.notes
        if form == "read-k-norm":  # q's norm still moves into the op
            assert "q_norm" in site.nodes and "k_norm" not in site.nodes, site.nodes


@FULL
def test_a_full_width_norm_over_heads_not_a_power_of_two_stays(records, codes, inference):
    """OLMo 2's norm over 6 q heads: the op's full-width norm takes a power-of-two head count, so q's norm stays a
    kernel of its own (reported) and k's (2 heads) moves into the op."""
    block = QKNormBlock(form="olmo2", num_heads=6, num_kv_heads=2, head_dim=16).eval()
    run(block, records)
    check_fused(records, codes, [block.k_buffer])
    for rec in records:
        (site,) = rec.fused
        assert "q_norm" not in site.nodes and "k_norm" in site.nodes, site.nodes
        assert any(n.startswith("q's QK-norm stays") and "power-of-two" in n for n in site.notes), site.notes


@FULL
def test_q_and_k_norms_with_different_eps_stay_outside(records, codes, inference):
    """The op takes one eps for both norms: with two, neither moves in (the RoPE and the store still fuse)."""
    block = QKNormBlock(form="vllm-qwen3").eval()
    norm = block._norm

    def two_eps(x, w):
        block.eps = 1e-6 if w is block.q_norm_weight else 1e-5
        return norm(x, w)

    block._norm = two_eps
    run(block, records)
    for rec in records:
        (site,) = rec.fused
        assert "q_norm" not in site.nodes and any("one eps" in n for n in site.notes), site.notes


@FULL
@pytest.mark.parametrize("form", ["sglang-qwen3", "vllm-qwen3", "olmo2"])
def test_a_dynamic_token_count_keeps_the_norms_in_the_op(form, records, codes, inference):
    """``mark_dynamic`` on the token dim: SGLang's ``[T*H, D]`` rows are reshaped to ``[-1, H, D]`` for the op (one
    symbolic size); both norms fused in every graph (the dynamic one included), equal to eager at three token
    counts."""
    run_dynamic(QKNormBlock(form=form, dtype=BF16).eval(), records)


def run_dynamic(block, records) -> None:
    """Three token counts with ``mark_dynamic`` on the token dim, compiled and eager: outputs and caches equal, a
    graph with a dynamic token count among those fused, both norms in every graph's op."""
    eager = copy.deepcopy(block)
    compiled = compile_with(block)
    for i, (t, past) in enumerate(((5, 0), (3, 5), (7, 8))):
        inputs = make_inputs(block, t, past=past)
        for x in inputs[:3]:
            torch._dynamo.mark_dynamic(x, 0)
        assert_close(compiled(*inputs), eager(*inputs), OUTPUT_TOL, f"step {i} output")
        assert_same_state(block, eager, f"step {i}", NORM_CACHE_TOL)
    assert records and any(rec.fused[0].num_tokens == "dynamic" for rec in records)
    for rec in records:
        assert {"q_norm", "k_norm"} <= set(rec.fused[0].nodes), rec.fused[0].notes
