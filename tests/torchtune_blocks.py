"""A torchtune-style decoder: "RoPE on q, k -> KV-cache store" spelled the way torchtune's modules spell it.

Written from reading torchtune's public ``modules/kv_cache.py`` (``KVCache``), ``modules/position_embeddings.py``
(``RotaryPositionalEmbeddings``) and ``modules/attention.py`` (``MultiHeadAttention``); the code here is our own.
What makes the form hard for a pass that compares nodes by identity:

* ``KVCache.update(k, v)`` writes ``k_out[:, :, self.cache_pos[:seq_len]] = k_val`` and then
  ``v_out[:, :, self.cache_pos[:seq_len]] = v_val``: the slots are sliced twice (two ``slice`` nodes), and
  the counter moves with ``self.cache_pos.add_(seq_len)`` (an ``add`` and a ``copy_`` back into the buffer).
* one ``RotaryPositionalEmbeddings`` module is called for q and again for k, so its table gather
  ``self.cache[input_pos]`` (and the view and selects of it) appears twice in the graph.

The rotation is torchtune's: ``x.float().reshape(*x.shape[:-1], -1, 2)``, interleaved pairs (GPT-J), from a
``[max_seq_len, D/2, 2]`` table of cos and sin, cast back with ``type_as``. Attention is
``F.scaled_dot_product_attention`` over the whole cache with a boolean mask gathered from a causal mask
buffer at ``input_pos``, kv heads expanded as torchtune does (``unsqueeze(2).expand(...).flatten(1, 2)``).

``TorchtuneDecoder(layers=2).forward(x [B, S, E], input_pos [B, S])``; caches start random, so a store to
the wrong row, or a row written that should not be, shows when whole caches are compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.attention_blocks import RMSNorm


class KVCache(nn.Module):
    """``[B, Hkv, S_max, D]`` k/v caches and the ``cache_pos`` counter, as buffers (torchtune's layout)."""

    def __init__(self, batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.randn(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.randn(shape, dtype=dtype), persistent=False)
        self.register_buffer("cache_pos", torch.arange(0, max_seq_len), persistent=False)

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, _, seq_len, _ = k_val.shape
        if bsz > self.k_cache.shape[0]:
            raise ValueError(f"k_val has batch {bsz}, but the cache was set up for {self.k_cache.shape[0]}")
        k_out = self.k_cache
        v_out = self.v_cache
        k_out[:, :, self.cache_pos[:seq_len]] = k_val
        v_out[:, :, self.cache_pos[:seq_len]] = v_val
        self.cache_pos.add_(seq_len)
        return k_out, v_out


class RotaryPositionalEmbeddings(nn.Module):
    """Interleaved RoPE from a ``[max_seq_len, D/2, 2]`` fp32 cos/sin table, gathered at ``input_pos``."""

    def __init__(self, dim: int, max_seq_len: int = 64, base: float = 10_000.0):
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        seq_idx = torch.arange(max_seq_len, dtype=theta.dtype)
        idx_theta = torch.einsum("i, j -> ij", seq_idx, theta).float()
        self.register_buffer("cache", torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1),
                             persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor) -> torch.Tensor:
        rope_cache = self.cache[input_pos]  # [b, s, D/2, 2]
        xshaped = x.float().reshape(*x.shape[:-1], -1, 2)  # [b, s, h, D/2, 2]
        rope_cache = rope_cache.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
        x_out = torch.stack([
            xshaped[..., 0] * rope_cache[..., 0] - xshaped[..., 1] * rope_cache[..., 1],
            xshaped[..., 1] * rope_cache[..., 0] + xshaped[..., 0] * rope_cache[..., 1],
        ], -1)
        return x_out.flatten(3).type_as(x)


class MultiHeadAttention(nn.Module):
    """torchtune's attention order: project, view ``[b, s, h, D]``, RoPE, transpose, cache update, expand kv
    heads, SDPA with the mask, output projection."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 pos_embeddings: RotaryPositionalEmbeddings, kv_cache: KVCache, dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False, dtype=dtype)
        self.output_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=False, dtype=dtype)
        self.pos_embeddings = pos_embeddings
        self.kv_cache = kv_cache

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        b, s_x, _ = x.shape
        q_per_kv = self.num_heads // self.num_kv_heads
        q = self.q_proj(x).view(b, s_x, self.num_kv_heads * q_per_kv, self.head_dim)
        q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)
        k = self.k_proj(x).view(b, s_x, -1, self.head_dim)
        v = self.v_proj(x).view(b, s_x, -1, self.head_dim)
        k = self.pos_embeddings(k, input_pos=input_pos)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        k, v = self.kv_cache.update(k, v)
        if self.num_heads != self.num_kv_heads:
            expand_shape = (b, self.num_kv_heads, q_per_kv, -1, self.head_dim)
            k = k.unsqueeze(2).expand(expand_shape).flatten(1, 2)
            v = v.unsqueeze(2).expand(expand_shape).flatten(1, 2)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :, :], dropout_p=0.0)
        output = output.transpose(1, 2).contiguous().view(b, s_x, -1)
        return self.output_proj(output)


class TorchtuneDecoder(nn.Module):
    """``layers`` pre-norm attention layers sharing one RoPE module (as torchtune's builders share one)."""

    def __init__(self, layers: int = 2, *, batch: int = 1, embed_dim: int = 64, num_heads: int = 4,
                 num_kv_heads: int = 2, head_dim: int = 16, max_seq_len: int = 32, dtype=torch.float32):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.dtype = dtype
        rope = RotaryPositionalEmbeddings(head_dim, max_seq_len)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.sa_norm = RMSNorm(embed_dim, dtype=dtype)
            layer.attn = MultiHeadAttention(embed_dim, num_heads, num_kv_heads, head_dim, rope,
                                            KVCache(batch, num_kv_heads, max_seq_len, head_dim, dtype), dtype)
            self.layers.append(layer)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool)),
                             persistent=False)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        mask = self.causal_mask[input_pos]  # [b, s, S_max]
        for layer in self.layers:
            x = x + layer.attn(layer.sa_norm(x), mask=mask, input_pos=input_pos)
        return x


def torchtune_steps(model: TorchtuneDecoder, prefill: int = 5, decode: int = 2, seed: int = 0) -> list[tuple]:
    """Forward arguments: a prefill of ``prefill`` tokens, then ``decode`` one-token steps."""
    g = torch.Generator().manual_seed(seed)
    batch, embed = model.layers[0].attn.kv_cache.k_cache.shape[0], model.layers[0].sa_norm.weight.shape[0]
    steps, past = [], 0
    for n in [prefill] + [1] * decode:
        x = torch.randn(batch, n, embed, generator=g).to(model.dtype)
        input_pos = torch.arange(past, past + n)[None].expand(batch, -1).contiguous()
        steps.append((x, input_pos))
        past += n
    return steps
