"""The mirrored rotation (nanochat: ``y1 = x1 * cos + x2 * sin; y2 = x1 * (-sin) + x2 * cos``, HF NanoChat's
``rotate_half`` returning ``cat((x2, -x1))``): the rotation by -theta, which is the RoPE with sin negated. The op
reads per-token sin values negated (exact); a table gathered by positions would be negated whole on every call, so
that form is reported, not fused.

The block is written as nanochat writes its attention: q, k ``[B, T, H, D]`` rotated with ``cos``/``sin`` slices of
precomputed ``[1, S, 1, D/2]`` buffers, then ``F.rms_norm`` of each (the norm after the RoPE), stored into a
``[B, H, S_max, D]`` cache at ``t0 .. t0 + T``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fx_fusion import FusionConfig
from tests.patterns.test_rope_kv_store import (
    CACHE_TOL, OUTPUT_TOL, assert_close, assert_same_state, check_fused, compile_with, inference, records)

__all__ = ["inference", "records"]  # fixtures
BF16 = torch.bfloat16


def nanochat_rotary(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


class NanochatBlock(nn.Module):
    """nanochat's ``CausalSelfAttention`` with a plain ``[B, H, S_max, D]`` cache. ``gathered``: a token pool
    ``[S_max, H, D]`` instead, ``k[0]`` stored at the positions, and cos/sin gathered by them: rows of the
    ``[1, S, 1, D/2]`` buffers (``"rows"``) or of ``[S, D/2]`` tables (``"table"``)."""

    def __init__(self, *, dtype=torch.float32, heads=4, kv_heads=2, head_dim=16, max_seq=32, gathered=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.gathered = heads, kv_heads, head_dim, gathered
        hidden = heads * head_dim
        self.c_q = nn.Linear(hidden, heads * head_dim, bias=False, dtype=dtype)
        self.c_k = nn.Linear(hidden, kv_heads * head_dim, bias=False, dtype=dtype)
        self.c_v = nn.Linear(hidden, kv_heads * head_dim, bias=False, dtype=dtype)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos().to(dtype)[None, :, None, :])  # [1, S, 1, D/2]
        self.register_buffer("sin", freqs.sin().to(dtype)[None, :, None, :])
        self.register_buffer("cos_table", freqs.cos().to(dtype))  # [S, D/2], gathered by positions
        self.register_buffer("sin_table", freqs.sin().to(dtype))
        self.register_buffer("k_cache", torch.randn(1, kv_heads, max_seq, head_dim, dtype=dtype))
        self.register_buffer("v_cache", torch.randn(1, kv_heads, max_seq, head_dim, dtype=dtype))
        self.register_buffer("k_pool", torch.randn(max_seq, kv_heads, head_dim, dtype=dtype))
        self.register_buffer("v_pool", torch.randn(max_seq, kv_heads, head_dim, dtype=dtype))

    def forward(self, x, t0: int):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim)
        if self.gathered:  # cos/sin rows gathered by positions, the token pool's store
            positions = torch.arange(t0, t0 + T, device=x.device)
            if self.gathered == "rows":  # rows of the [1, S, 1, D/2] buffers: per-token values to the op
                cos, sin = self.cos[0, positions][None], self.sin[0, positions][None]
            else:
                cos, sin = self.cos_table[positions][None, :, None], self.sin_table[positions][None, :, None]
        else:
            cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        q, k = nanochat_rotary(q, cos, sin), nanochat_rotary(k, cos, sin)
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.gathered:
            self.k_pool[positions] = k[0]
            self.v_pool[positions] = v[0]
            keys, values = self.k_pool[:t0 + T].transpose(0, 1)[None], self.v_pool[:t0 + T].transpose(0, 1)[None]
        else:
            self.k_cache[:, :, t0:t0 + T] = k.transpose(1, 2)
            self.v_cache[:, :, t0:t0 + T] = v.transpose(1, 2)
            keys, values = self.k_cache[:, :, :t0 + T], self.v_cache[:, :, :t0 + T]
        keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
        values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=T > 1)  # prefill from 0, or one token
        return y.transpose(1, 2).reshape(B, T, -1)


def steps(block):
    g = torch.Generator().manual_seed(0)
    hidden = block.heads * block.head_dim
    return [(torch.randn(1, t, hidden, generator=g, dtype=block.cos.dtype), t0) for t, t0 in ((5, 0), (1, 5), (1, 6))]


@pytest.mark.parametrize("dtype, gathered", [(torch.float32, None), pytest.param(BF16, None, marks=pytest.mark.full),
                                             pytest.param(torch.float32, "rows", marks=pytest.mark.full)],
                         ids=["fp32", "bf16", "rows-fp32"])
def test_the_mirrored_rotation_fuses_with_its_norms(dtype, gathered, records, codes, inference):
    """nanochat's attention: every graph's site fused (the norms after the RoPE inside the op), outputs and the
    poisoned caches equal to eager over a prefill and two decode steps; also into a token pool (``k[0]``, a select of
    the batch of one, stored) with rows of per-token values gathered by positions."""
    block = NanochatBlock(dtype=dtype, gathered=gathered).eval()
    eager = copy.deepcopy(block)
    compiled = compile_with(block)
    for i, inputs in enumerate(steps(block)):
        assert_close(compiled(*inputs), eager(*inputs), OUTPUT_TOL, f"step {i} output")
        assert_same_state(block, eager, f"step {i}", CACHE_TOL)
    check_fused(records, codes, [block.k_pool if gathered else block.k_cache])
    for rec in records:
        assert {"q_norm", "k_norm"} <= set(rec.fused[0].nodes), rec.fused[0].nodes


def test_the_mirrored_rotation_with_a_gathered_table_is_reported(records, codes, inference):
    """cos/sin gathered from their tables by positions: the op would read the whole sin table negated on every
    call, so the site is reported with that reason and the graph runs as eager does."""
    block = NanochatBlock(gathered="table").eval()
    eager = copy.deepcopy(block)
    compiled = compile_with(block, FusionConfig())
    for i, inputs in enumerate(steps(block)):
        assert_close(compiled(*inputs), eager(*inputs), OUTPUT_TOL, f"step {i} output")
        assert_same_state(block, eager, f"step {i}", CACHE_TOL)
    assert records
    for rec in records:
        assert not rec.fused and len(rec.unfused) == 1, [s.reason for s in rec.sites]
        assert "the rotation is mirrored" in rec.unfused[0].reason, rec.unfused[0].reason
