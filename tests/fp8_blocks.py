"""fp8 KV-cache stores spelled as serving engines write them, on top of ``tests/attention_blocks.py``'s RoPE.

    spelling       store                                                             cache
    "sglang"       k_buffer[loc] = k.div(k_scale).to(fp8).view(torch.uint8)          uint8 [slots, Hkv, D]
    "vllm"         k_cache[blk, off] = (k / k_scale).to(fp8)                         fp8 [blocks, bs, Hkv, D]
    "vllm_clamp"   k_cache[blk, off] = (k / k_scale).clamp(-448, 448).to(fp8)        fp8 [blocks, bs, Hkv, D]
    "reciprocal"   k_buffer[loc] = (k * (1.0 / k_scale)).to(fp8)                     fp8 [slots, Hkv, D]
    "scale_first"  k_buffer[loc] = ((1.0 / k_scale) * k).to(fp8)                     fp8 [slots, Hkv, D]

``scale``: "float" (a Python number), "0d" (a 0-d fp32 buffer), "1el" (a [1] fp32 buffer, which makes the
quotient fp32 by type promotion), "per_head" (a [Hkv, 1] buffer: one scale per head, which the fused op
cannot take); ``scale_dtype``: the buffers' dtype (a module moved to bf16 as a whole has bf16 scales).
v is quantised the same way with its own scale. Caches start as random bytes (never zeros);
the scales are chosen so that rotated k and v cross the fp8 range (rounding, overflow). Each layer is
``qkv projection -> RoPE -> fp8 store -> attention over the dequantised cache -> o_proj``. ``q_fp8``: q is
quantised to fp8 too (its own scale), and attention reads it dequantised (fp8 attention); the layer returns the
fp8 q in place of the rotated q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.attention_blocks import cos_sin_table, repeat_kv, token_pool_rotary

SPELLINGS = ("sglang", "vllm", "vllm_clamp", "reciprocal", "scale_first")
SCALES = ("float", "0d", "1el", "per_head")


class Fp8Layer(nn.Module):
    def __init__(self, spelling="sglang", scale="0d", fp8=torch.float8_e4m3fn, dtype=torch.bfloat16, heads=4,
                 kv_heads=2, head_dim=16, slots=32, block_size=8, k_scale=0.37, v_scale=0.05, upcast=True,
                 scale_dtype=torch.float32, q_fp8=None, q_scale=0.11):
        super().__init__()
        self.spelling, self.fp8, self.dtype, self.upcast = spelling, fp8, dtype, upcast
        self.q_fp8 = q_fp8
        self.heads, self.kv_heads, self.head_dim, self.block_size = heads, kv_heads, head_dim, block_size
        self.qkv = nn.Linear(32, (heads + 2 * kv_heads) * head_dim, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(heads * head_dim, 32, bias=False, dtype=dtype)
        self.register_buffer("cos_sin_cache", cos_sin_table(64, head_dim))
        paged = spelling in ("vllm", "vllm_clamp")
        shape = (slots // block_size, block_size, kv_heads, head_dim) if paged else (slots, kv_heads, head_dim)
        cache_dtype = torch.uint8 if spelling == "sglang" else fp8
        for name in ("k_cache", "v_cache"):  # random bytes, NaN patterns excluded so eager compares cleanly
            self.register_buffer(name, torch.randint(0, 0x70, shape, dtype=torch.uint8).view(cache_dtype))
        if scale == "float":
            self.k_scale, self.v_scale = k_scale, v_scale
        else:
            shape = {"0d": (), "1el": (1,), "per_head": (kv_heads, 1)}[scale]
            self.register_buffer("k_scale", torch.full(shape, k_scale, dtype=scale_dtype))
            self.register_buffer("v_scale", torch.full(shape, v_scale, dtype=scale_dtype))
            if scale == "per_head":
                self.k_scale[0] = k_scale * 2
        if q_fp8 is not None:  # q's own static scale, a 0-d buffer or a Python number as k's
            self.q_scale = q_scale if scale == "float" else torch.tensor(q_scale, dtype=scale_dtype)

    def _quant(self, x, scale):
        if self.spelling == "sglang":
            return x.div(scale).to(self.fp8).view(torch.uint8)
        if self.spelling == "vllm":
            return (x / scale).to(self.fp8)
        if self.spelling == "vllm_clamp":
            return (x / scale).clamp(-448, 448).to(self.fp8)
        if self.spelling == "scale_first":
            return ((1.0 / scale) * x).to(self.fp8)
        return (x * (1.0 / scale)).to(self.fp8)

    def quant_q(self, q):
        """fp8 q for an fp8 attention kernel, as vLLM's fused RoPE + quant + cache op computes it (``q_fp8``:
        "div", "clamp" or "mul" by the reciprocal)."""
        if self.q_fp8 == "clamp":
            return (q / self.q_scale).clamp(-448, 448).to(self.fp8)
        if self.q_fp8 == "mul":
            return (q * (1.0 / self.q_scale)).to(self.fp8)
        return (q / self.q_scale).to(self.fp8)

    def dequant(self, cache, scale):
        return (cache.view(self.fp8).to(self.dtype) * scale).to(self.dtype)

    def forward(self, positions, hidden, loc):
        t, kv = hidden.shape[0], self.kv_heads * self.head_dim
        q, k, v = self.qkv(hidden).split([self.heads * self.head_dim, kv, kv], dim=-1)
        q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.head_dim, "neox",
                                 self.upcast, False)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        if self.spelling in ("vllm", "vllm_clamp"):
            blk, off = loc // self.block_size, loc % self.block_size
            self.k_cache[blk, off] = self._quant(k, self.k_scale)
            self.v_cache[blk, off] = self._quant(v, self.v_scale)
        else:
            self.k_cache[loc] = self._quant(k, self.k_scale)
            self.v_cache[loc] = self._quant(v, self.v_scale)
        k_rows = self.dequant(self.k_cache.flatten(0, -3)[loc], self.k_scale).nan_to_num()
        v_rows = self.dequant(self.v_cache.flatten(0, -3)[loc], self.v_scale).nan_to_num()
        n_rep = self.heads // self.kv_heads
        if self.q_fp8 is not None:
            q = self.quant_q(q)  # the only user of the rotated q: attention reads fp8 q
            qh = self.dequant(q, self.q_scale).view(t, self.heads, self.head_dim).transpose(0, 1)
        else:
            qh = q.view(t, self.heads, self.head_dim).transpose(0, 1)
        kh = repeat_kv(k_rows.transpose(0, 1)[None], n_rep)[0]
        vh = repeat_kv(v_rows.transpose(0, 1)[None], n_rep)[0]
        # fp32 attention on damped logits (q, k reach the hundreds here): a near tie in a bf16 softmax would
        # turn Inductor's own rounding differences from eager into large output differences
        out = F.scaled_dot_product_attention(qh.float() * 1e-3, kh.float(), vh.float()).to(self.dtype)
        return self.o_proj(out.transpose(0, 1).reshape(t, -1)), q


class Fp8Model(nn.Module):
    """``layers`` fp8 layers (each its own caches and scales), all fed the same hidden states: a layer's input
    is then exactly eager's, so its caches can be compared byte for byte (a chained layer would read Inductor's
    bf16 attention output, which is not eager's bit for bit)."""

    def __init__(self, layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(Fp8Layer(**kw) for _ in range(layers))

    def forward(self, positions, hidden, loc):
        return tuple(x for layer in self.layers for x in layer(positions, hidden, loc))


def fp8_inputs(model: Fp8Model, num_tokens: int, seed: int, loc: list[int]) -> tuple:
    """Hidden states scaled so that k / k_scale and v / v_scale reach past the fp8 range; one NaN row."""
    g = torch.Generator().manual_seed(seed)
    dtype = model.layers[0].dtype
    hidden = (torch.randn(num_tokens, 32, generator=g) * 40).to(dtype)
    if num_tokens > 2:
        hidden[1, 3] = float("nan")  # NaN reaches every k, v feature of token 1: the cast keeps it
    return torch.arange(num_tokens), hidden, torch.tensor(loc[:num_tokens])
