"""A decoder written as Meta's Llama reference implementation writes it (and Mistral's reference code, and many
research codebases copied from them): a test fixture for the fusion pass.

    rotary tables    ``freqs_cis = torch.polar(ones, outer(t, inv_freq))``: complex64 ``[max_seq, D/2]``, a buffer
    RoPE             ``view_as_complex(x.float().reshape(..., -1, 2)) * freqs_cis`` -> ``view_as_real``
                     -> ``flatten(3)`` -> ``type_as(x)``: GPT-J pairs, cos the real part, sin the imaginary part
    caches           buffers ``[max_batch, max_seq, Hkv, D]`` (``cache_layout="bshd"``, as the reference) or
                     ``[max_batch, Hkv, max_seq, D]`` (``"bhsd"``), written through slices with a Python ``start_pos``:
                     ``cache_k[:bsz, start_pos:start_pos + seqlen] = xk``
    steps            ``forward(tokens, start_pos)``: a prefill at ``start_pos = 0``, then decode steps

Written here from the public description of that code, not copied. Caches start random (poisoned): a store to a
wrong row, or a write to a row no step stores, shows when the whole caches are compared with eager's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIM, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 2, 4, 2, 96
HEAD_DIM = DIM // HEADS


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """``[end, dim / 2]`` complex64 rotations ``exp(i * t * theta^(-2j/dim))``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[S, D/2]`` -> ``[1, S, 1, D/2]`` for ``x`` ``[B, S, H, D/2]``."""
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> ``[B, S, Hkv * n_rep, D]``."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim).reshape(
        bs, slen, n_kv_heads * n_rep, head_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, max_batch: int, max_seq: int, cache_layout: str, dtype: torch.dtype):
        super().__init__()
        if cache_layout not in ("bshd", "bhsd"):
            raise ValueError(f"cache_layout must be 'bshd' or 'bhsd', got {cache_layout!r}")
        self.cache_layout = cache_layout
        self.n_rep = HEADS // KV_HEADS
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        shape = ((max_batch, max_seq, KV_HEADS, HEAD_DIM) if cache_layout == "bshd"
                 else (max_batch, KV_HEADS, max_seq, HEAD_DIM))
        self.register_buffer("cache_k", torch.randn(shape).to(dtype))  # poisoned: random, not zeros
        self.register_buffer("cache_v", torch.randn(shape).to(dtype))

    def forward(self, x, start_pos: int, freqs_cis, mask):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, HEADS, HEAD_DIM)
        xk = self.wk(x).view(bsz, seqlen, KV_HEADS, HEAD_DIM)
        xv = self.wv(x).view(bsz, seqlen, KV_HEADS, HEAD_DIM)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        if self.cache_layout == "bshd":
            self.cache_k[:bsz, start_pos: start_pos + seqlen] = xk
            self.cache_v[:bsz, start_pos: start_pos + seqlen] = xv
            keys = self.cache_k[:bsz, : start_pos + seqlen]
            values = self.cache_v[:bsz, : start_pos + seqlen]
        else:
            self.cache_k[:bsz, :, start_pos: start_pos + seqlen] = xk.transpose(1, 2)
            self.cache_v[:bsz, :, start_pos: start_pos + seqlen] = xv.transpose(1, 2)
            keys = self.cache_k[:bsz, :, : start_pos + seqlen].transpose(1, 2)
            values = self.cache_v[:bsz, :, : start_pos + seqlen].transpose(1, 2)
        keys = repeat_kv(keys, self.n_rep).transpose(1, 2)  # [B, H, cache_len, D]
        values = repeat_kv(values, self.n_rep).transpose(1, 2)
        xq = xq.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(HEAD_DIM)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, hidden: int = 4 * DIM):
        super().__init__()
        self.w1 = nn.Linear(DIM, hidden, bias=False)
        self.w2 = nn.Linear(hidden, DIM, bias=False)
        self.w3 = nn.Linear(DIM, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, max_batch: int, max_seq: int, cache_layout: str, dtype: torch.dtype):
        super().__init__()
        self.attention = Attention(max_batch, max_seq, cache_layout, dtype)
        self.feed_forward = FeedForward()
        self.attention_norm = RMSNorm(DIM)
        self.ffn_norm = RMSNorm(DIM)

    def forward(self, x, start_pos: int, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Meta-reference-style decoder: ``forward(tokens [B, S], start_pos: int) -> logits [B, S, VOCAB]`` (fp32)."""

    def __init__(self, *, max_batch: int = 3, max_seq: int = 32, cache_layout: str = "bshd",
                 dtype: torch.dtype = torch.float32, layers: int = LAYERS):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(TransformerBlock(max_batch, max_seq, cache_layout, dtype) for _ in range(layers))
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.to(dtype)
        # a plain attribute, as in the reference (``Module.to(dtype)`` would cast a complex buffer to a real dtype)
        self.freqs_cis = precompute_freqs_cis(HEAD_DIM, max_seq * 2)

    def forward(self, tokens: torch.Tensor, start_pos: int):
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[start_pos: start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask]).type_as(h)
        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return self.output(self.norm(h)).float()

    def caches(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self.named_buffers() if "cache" in n}


def reference_steps(batch: int = 2, prefill: int = 5, decode: int = 2, seed: int = 0) -> list[tuple]:
    """``(tokens, start_pos)`` of a prefill of ``prefill`` tokens at 0, then ``decode`` one-token steps."""
    g = torch.Generator().manual_seed(seed)
    steps = [(torch.randint(0, VOCAB, (batch, prefill), generator=g), 0)]
    for i in range(decode):
        steps.append((torch.randint(0, VOCAB, (batch, 1), generator=g), prefill + i))
    return steps
