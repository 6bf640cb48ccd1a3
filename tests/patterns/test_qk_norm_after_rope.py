"""QK-norm after the RoPE (HunYuan, Llama 4): the rotated q and k normalised per head, then k stored; fused into one
op with ``norm_after_rope``. Token-pool blocks written as an engine writes them (the RoPE on ``[T, H*D]`` rows, the
norm on a ``[T, H, D]`` view), compiled with the fx_fusion backend.

Positive cases: every layer's site fuses with both norms inside the op (the site names them; no rsqrt is left in
Inductor's code), outputs and caches equal to eager over a prefill and two decode steps. Negative cases: a norm the op
cannot take is never passed over in silence: k's (what the cache holds) is reported with the reason and the site is
not fused; q's stays a kernel of its own, said in the fused site's notes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fx_fusion import FusionConfig
from tests.attention_blocks import SGLangBlock, decode_inputs, prefill_inputs, token_pool_rotary
from tests.patterns.test_qk_norm_fusion import check_norms_fused, run, vllm_rms_norm
from tests.patterns.test_rope_kv_store import (
    CACHE_TOL, OUTPUT_TOL, assert_close, assert_same_state, check_fused, compile_with, inference, records)

__all__ = ["inference", "records"]  # fixtures
BF16 = torch.bfloat16


def l2_norm(x, eps):
    """Llama 4's weightless RMSNorm (``Llama4TextL2Norm``): fp32, rounded back once."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class PostNormBlock(SGLangBlock):
    """A token-pool block normalising the rotated q and k per head (``form``):

    hunyuan     vLLM's RMSNorm (rounded to x's dtype, then times the weight) of ``q.view(T, H, D)``
    llama4      Llama 4's weightless norm in fp32
    bias        hunyuan plus a per-feature bias: not an RMSNorm the op takes (k's: the site is reported)
    read-k      hunyuan, and the rotated k is also returned: k's norm cannot move into the op (reported)
    read-q      hunyuan, and the rotated q is also returned: q's norm stays a kernel of its own (a note)
    bf16-norm   the norm computed in the model's dtype, without the upcast (reported)
    """

    def __init__(self, *, form="hunyuan", eps=1e-5, **kw):
        super().__init__(**kw)
        self.norm_form, self.eps = form, eps
        self.q_norm_weight = nn.Parameter(1.0 + 0.2 * torch.randn(self.head_dim, dtype=self.dtype))
        self.k_norm_weight = nn.Parameter(1.0 + 0.2 * torch.randn(self.head_dim, dtype=self.dtype))
        self.bias = nn.Parameter(0.1 * torch.randn(self.head_dim, dtype=self.dtype))

    def _norm(self, x, w):
        f = self.norm_form
        if f == "llama4":
            return l2_norm(x, self.eps)
        if f == "bf16-norm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w
        y = vllm_rms_norm(x, w, self.eps)
        return y + self.bias if f == "bias" else y

    def forward(self, positions, hidden, loc, kv_loc=None):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.rot_dim, self.style,
                                 self.upcast, False)
        shape = q.shape
        q_rot, k_rot = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
        q = self._norm(q_rot, self.q_norm_weight).view(shape)
        k = self._norm(k_rot, self.k_norm_weight)
        self.k_buffer[loc] = k
        self.v_buffer[loc] = v.view(-1, self.num_kv_heads, self.head_dim)
        kv_loc = loc if kv_loc is None else kv_loc
        out = self._token_pool_attention(q, self.k_buffer[kv_loc], self.v_buffer[kv_loc], positions)
        if self.norm_form == "read-k":
            return out, k_rot
        return (out, q_rot) if self.norm_form == "read-q" else out


FULL = pytest.mark.full
CASES = [pytest.param(form, dtype, kw, id=f"{form}-{name}{'-' + tag if tag else ''}",
                      marks=() if (form, name, tag) == ("hunyuan", "bf16", "") else FULL)
         for form in ("hunyuan", "llama4")
         for dtype, name in ((torch.float32, "fp32"), (BF16, "bf16"))
         for kw, tag in ((dict(), ""), (dict(rot_dim=8, style="gptj"), "partial-gptj"))]


@pytest.mark.parametrize("form, dtype, kw", CASES)
def test_norms_after_the_rope_fuse_into_the_op(form, dtype, kw, records, codes, inference):
    check_norms_fused(PostNormBlock(form=form, dtype=dtype, num_heads=4, num_kv_heads=2, head_dim=16, **kw).eval(),
                      records, codes)


@pytest.mark.parametrize("form, why", [
    ("bias", "a bias is added after the norm"),
    ("read-k", "also reads"),
    pytest.param("bf16-norm", "not fp32", marks=FULL),
])
def test_a_k_norm_after_the_rope_the_op_cannot_take_is_reported(form, why, records, codes, inference):
    """The cache holds k's norm: where the op cannot compute it, the site is not fused, and the report says why."""
    block = PostNormBlock(form=form, dtype=BF16 if form == "bf16-norm" else torch.float32).eval()
    eager = copy.deepcopy(block)
    compiled = compile_with(block, FusionConfig())  # warn: the unfused site is reported, the compile goes on
    for i, inputs in enumerate((prefill_inputs(block, 5), decode_inputs(block, 5))):
        assert_close(compiled(*inputs), eager(*inputs), OUTPUT_TOL, f"step {i} output")
        assert_same_state(block, eager, f"step {i}", CACHE_TOL)
    assert records
    for rec in records:
        assert not rec.fused and len(rec.unfused) == 1, [s.reason for s in rec.sites]
        reason = rec.unfused[0].reason
        assert "QK-norm" in reason and why in reason, reason


@FULL
def test_a_q_norm_after_the_rope_with_another_reader_stays(records, codes, inference):
    """The rotated q is also returned: q's norm stays a kernel of its own (a note), k's moves into the op."""
    block = PostNormBlock(form="read-q").eval()
    run(block, records)
    check_fused(records, codes, [block.k_buffer])
    for rec in records:
        (site,) = rec.fused
        assert "k_norm" in site.nodes and "q_norm" not in site.nodes, site.nodes
        assert any(n.startswith("q's QK-norm after the RoPE stays") and "also reads" in n for n in site.notes), \
            site.notes


@FULL
def test_a_dynamic_token_count_keeps_the_norms_after_the_rope_in_the_op(records, codes, inference):
    """``mark_dynamic`` on the token dim: both norms after the RoPE fused in every graph (the dynamic one included),
    equal to eager at three token counts."""
    from tests.patterns.test_qk_norm_fusion import run_dynamic

    run_dynamic(PostNormBlock(form="hunyuan", dtype=BF16).eval(), records)
