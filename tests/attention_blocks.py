"""Tiny attention blocks that spell "RoPE on q, k -> KV-cache store" the way real model code does.

They are test fixtures for the fusion pass: each block is a plain-torch re-implementation of one
source form, small enough to compile on CPU in a second, with the variants that change the aten graph
exposed as constructor arguments.

    form       q/k at RoPE time                rotary tables                   cache store
    "sglang"   2-D split slices [T, H*D]       cos_sin_cache[max_pos, rot]     k_buffer[loc] = k  ([slots, Hkv, D])
    "vllm"     2-D split slices [T, H*D]       cos_sin_cache[max_pos, rot]     k_cache[s // bs, s % bs] = k
    "hf"       [B, H, S, D] (transposed)       inv_freq, position_ids (fp32)   index_copy_(2, pos, k) / [:, :, pos] = k
    "gptfast"  [B, S, H, D] (not transposed)   freqs_cis[max_pos, D/2, 2]      k_cache[:, :, pos] = k

Every block: qkv projection -> RoPE on q, k -> store k, v into cache buffers (mutated in place)
-> scaled_dot_product_attention over the cached keys/values -> o_proj.

Use ``make_block(form, **kw)`` to build one and ``prefill_inputs`` / ``decode_inputs`` for its forward
arguments. Caches start filled with random values, so a store to the wrong row shows up when whole
caches are compared.

``make_block(form, perturb=Perturbation(...))`` builds a *near miss* of the fusable chain instead (a cast
round trip somewhere in it, scaled tables, one table row for every token), for soundness tests of the
pass; without ``perturb`` every block traces exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STYLES = ("neox", "gptj")
FORMS = ("sglang", "vllm", "hf", "gptfast")
CAST_POINTS = ("q", "k", "cos", "sin", "q_rot", "k_rot")
COMPLEX_CAST_POINT = "table"  # the whole complex table (real and imaginary parts): complex RoPE blocks only
TABLE_ROWS = ("slice", "index")


# --------------------------------------------------------------------------------------------------
# Near misses: optional perturbations of the RoPE -> store chain
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Perturbation:
    """A change to the RoPE -> KV-store chain that a sound pass must either fuse exactly or leave alone.

    cast / cast_at: round trip ``x.to(cast).to(x.dtype)`` at one point of the chain: "q" or "k" before
    the RoPE, "cos" or "sin" (the per-token tables), "q_rot" or "k_rot" (the rotated result, before
    attention or the cache store).  cos_scale / sin_scale: multiply one table (or both, differently).
    table_row: one table row for every token, "slice" (``cos_sin_cache[5:6]``, position 5) or "index"
    (``cos_sin_cache[positions[:1]]``, the first token's position).  cast_at="table" rounds a complex table's
    real and imaginary parts (the near-miss test's complex RoPE blocks only; no other block applies it).
    compute: the RoPE computed in this dtype (x and the tables cast to it, the result cast back; the near-miss
    test's blocks only).  The default changes nothing, and a block built with it traces exactly like one built
    without.
    """

    cast: torch.dtype | None = None
    cast_at: str = "k"
    cos_scale: float = 1.0
    sin_scale: float = 1.0
    table_row: str | None = None
    compute: torch.dtype | None = None

    SLICE_ROW = 5  # the position whose row "slice" broadcasts

    def __post_init__(self):
        if self.cast_at not in (*CAST_POINTS, COMPLEX_CAST_POINT):
            raise ValueError(f"cast_at must be one of {(*CAST_POINTS, COMPLEX_CAST_POINT)}, got {self.cast_at!r}")
        if self.table_row not in (None, *TABLE_ROWS):
            raise ValueError(f"table_row must be None or one of {TABLE_ROWS}, got {self.table_row!r}")

    def at(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` round-tripped through ``cast`` if this is the cast point, else ``x`` itself (no op traced)."""
        if self.cast is None or point != self.cast_at:
            return x
        return x.to(self.cast).to(x.dtype)

    def tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin with the scales and the cos/sin casts applied (untouched when there are none)."""
        if self.cos_scale != 1.0:
            cos = cos * self.cos_scale
        if self.sin_scale != 1.0:
            sin = sin * self.sin_scale
        return self.at("cos", cos), self.at("sin", sin)

    def rows(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``table`` rows for ``positions``, or one row for all of them (``table_row``), gathered on dim 0."""
        if self.table_row == "slice":
            return table[self.SLICE_ROW:self.SLICE_ROW + 1]
        if self.table_row == "index":
            return table[positions[:1]]
        return table.index_select(0, positions)


NO_PERTURBATION = Perturbation()


# --------------------------------------------------------------------------------------------------
# Shared RoPE maths
# --------------------------------------------------------------------------------------------------


def inv_frequencies(rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[rot_dim / 2] fp32 inverse frequencies, as every form computes them."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))


def cos_sin_table(max_pos: int, rot_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SGLang/vLLM ``cos_sin_cache``: [max_pos, rot_dim], cos of each frequency then sin of each."""
    t = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.einsum("i,j->ij", t, inv_frequencies(rot_dim))
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


def rotate_pairs(x1, x2, cos, sin):
    """The rotation shared by all forms: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def token_pool_apply_rotary(x, cos, sin, style: str, upcast: bool):
    """SGLang/vLLM ``_apply_rotary_emb`` on x [T, H, rot]; cos/sin are [T, rot / 2]."""
    orig_dtype = x.dtype
    if upcast:
        x = x.float()
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if style == "neox":
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1, o2 = rotate_pairs(x1, x2, cos, sin)
    if style == "neox":
        out = torch.cat((o1, o2), dim=-1)
    else:
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    return out.to(orig_dtype) if upcast else out


def token_pool_rotary(positions, query, key, cos_sin_cache, head_dim, rot_dim, style, upcast, use_reshape,
                      perturb: Perturbation | None = None, scale=None):
    """SGLang/vLLM ``RotaryEmbedding.forward_native``: q, k are [T, H*D]; returns the same shapes.

    ``perturb``: a near miss of this chain (see ``Perturbation``); ``None`` traces the plain form.
    ``scale``: cos and sin rows multiplied by it (a float or a 0-d tensor) after the gather; None: no multiply.
    """
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    if perturb is None:
        cos_sin = cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)
    else:
        cos, sin = perturb.tables(*perturb.rows(cos_sin_cache, positions).chunk(2, dim=-1))
    if scale is not None:
        cos, sin = cos * scale, sin * scale
    out = []
    for name, x in (("q", query), ("k", key)):
        x = x if perturb is None else perturb.at(name, x)
        shape = x.shape
        x = x.reshape(num_tokens, -1, head_dim) if use_reshape else x.view(num_tokens, -1, head_dim)
        x_rot = x[..., :rot_dim]
        x_pass = x[..., rot_dim:]
        x_rot = token_pool_apply_rotary(x_rot, cos, sin, style, upcast)
        x = torch.cat((x_rot, x_pass), dim=-1).reshape(shape)
        out.append(x if perturb is None else perturb.at(f"{name}_rot", x))
    return out[0], out[1]


def rotate_half(x):
    """HF Llama/GPT-NeoX."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    """HF GPT-J."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def hf_apply_rotary_pos_emb(q, k, cos, sin, style: str, upcast: bool, unsqueeze_dim: int = 1):
    """HF ``apply_rotary_pos_emb``; slices off the pass-through tail (GPT-NeoX) only when rot < head_dim."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotate = rotate_half if style == "neox" else rotate_every_two
    rot_dim = cos.shape[-1]
    partial = rot_dim < q.shape[-1]
    out = []
    for x in (q, k):
        orig_dtype = x.dtype
        if upcast:
            x = x.float()
        x_rot, x_pass = (x[..., :rot_dim], x[..., rot_dim:]) if partial else (x, None)
        x_embed = (x_rot * cos) + (rotate(x_rot) * sin)
        if partial:
            x_embed = torch.cat([x_embed, x_pass], dim=-1)
        out.append(x_embed.to(orig_dtype) if upcast else x_embed)
    return out[0], out[1]


def gptfast_apply_rotary_emb(x, freqs_cis):
    """gpt-fast ``apply_rotary_emb``: x [B, S, H, D], freqs_cis [S, D/2, 2] (cos, sin); always upcasts."""
    xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out2 = torch.stack(
        [
            xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
            xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1],
        ],
        -1,
    )
    x_out2 = x_out2.flatten(3)
    return x_out2.type_as(x)


def repeat_kv(x, n_rep: int):
    """HF ``repeat_kv`` on [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]."""
    b, hkv, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, hkv, n_rep, s, d).reshape(b, hkv * n_rep, s, d)


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm (over head_dim for q_norm / k_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class _BlockBase(nn.Module):
    """Knobs common to every form.

    num_heads / num_kv_heads / head_dim: Hq, Hkv, D.  rot_dim: rotated prefix of each head (default D).
    style: "neox" (rotate halves) or "gptj" (rotate interleaved pairs).  upcast: compute RoPE in fp32 and
    cast back where the source form has no upcast.  use_reshape: ``reshape`` where the source says ``view``.
    perturb: a near miss of the RoPE -> store chain (``Perturbation``); ``None`` (default) leaves it as is.
    table_scale: cos and sin both multiplied by this factor inside the RoPE (YaRN's / longrope's attention
    scaling): a Python float, or with ``scale_tensor=True`` a 0-d fp32 buffer ``rope_scale`` holding it.
    ``None`` (default): no multiply, except in "hf", whose rotary module always multiplies by its
    ``attention_scaling`` (1.0 then, as HF's default RoPE does).
    """

    form = ""

    def __init__(self, *, num_heads=4, num_kv_heads=2, head_dim=16, rot_dim=None, style="neox",
                 dtype=torch.float32, upcast=False, use_reshape=False, max_pos=64, hidden_size=None,
                 perturb: Perturbation | None = None, table_scale: float | None = None, scale_tensor=False):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        rot_dim = head_dim if rot_dim is None else rot_dim
        if rot_dim % 2 or not 0 < rot_dim <= head_dim:
            raise ValueError(f"rot_dim must be even and in (0, head_dim={head_dim}], got {rot_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rot_dim, self.style, self.dtype = rot_dim, style, dtype
        self.upcast, self.use_reshape, self.max_pos = upcast, use_reshape, max_pos
        self.perturb = None if perturb == NO_PERTURBATION else perturb
        self.hidden_size = hidden_size or num_heads * head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.o_proj = nn.Linear(self.q_size, self.hidden_size, bias=False, dtype=dtype)
        self.table_scale = table_scale
        if scale_tensor:
            self.register_buffer("rope_scale", torch.tensor(1.0 if table_scale is None else table_scale))
            self.table_scale = self.rope_scale

    def _view(self, x, *shape):
        return x.reshape(*shape) if self.use_reshape else x.view(*shape)

    def caches(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self.named_buffers() if "cache" in n or "buffer" in n}

    def _token_pool_attention(self, q, k_rows, v_rows, positions):
        """q [T, Hq*D]; k_rows/v_rows [Tk, Hkv, D] gathered from the cache, row j holding position j."""
        t = q.shape[0]
        n_rep = self.num_heads // self.num_kv_heads
        q = q.view(t, self.num_heads, self.head_dim).transpose(0, 1)
        k = repeat_kv(k_rows.transpose(0, 1)[None], n_rep)[0]
        v = repeat_kv(v_rows.transpose(0, 1)[None], n_rep)[0]
        mask = torch.arange(k.shape[1], device=q.device)[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(0, 1).reshape(t, self.q_size))


class SGLangBlock(_BlockBase):
    """SGLang: fused qkv Linear + split, ``forward_native`` RoPE, token-indexed cache ``[num_slots, Hkv, D]``.

    forward(positions [T], hidden [T, hidden], loc [T], kv_loc [Tk] = loc): kv_loc lists the cache rows
    of positions 0..Tk-1 that attention reads back.
    """

    form = "sglang"

    def __init__(self, *, num_slots=64, rope_cache_dtype=torch.float32, **kw):
        super().__init__(**kw)
        self.qkv_proj = nn.Linear(self.hidden_size, self.q_size + 2 * self.kv_size, bias=False, dtype=self.dtype)
        self.register_buffer("cos_sin_cache", cos_sin_table(self.max_pos, self.rot_dim, rope_cache_dtype))
        shape = (num_slots, self.num_kv_heads, self.head_dim)
        self.register_buffer("k_buffer", torch.randn(shape, dtype=self.dtype))
        self.register_buffer("v_buffer", torch.randn(shape, dtype=self.dtype))

    def forward(self, positions, hidden, loc, kv_loc=None):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.rot_dim,
                                 self.style, self.upcast, self.use_reshape, self.perturb, self.table_scale)
        # RadixAttention -> token_to_kv_pool.set_kv_buffer(layer, loc, k, v)
        self.k_buffer[loc] = self._view(k, -1, self.num_kv_heads, self.head_dim)
        self.v_buffer[loc] = self._view(v, -1, self.num_kv_heads, self.head_dim)
        kv_loc = loc if kv_loc is None else kv_loc
        return self._token_pool_attention(q, self.k_buffer[kv_loc], self.v_buffer[kv_loc], positions)


class VLLMPagedBlock(_BlockBase):
    """vLLM: same RoPE as SGLang, paged cache ``[num_blocks, block_size, Hkv, D]``.

    flat_store=False: ``k_cache[slot // bs, slot % bs] = k``; True: ``k_cache.view(-1, Hkv, D)[slot] = k``.
    forward(positions [T], hidden [T, hidden], slot_mapping [T], kv_slots [Tk] = slot_mapping).
    """

    form = "vllm"

    def __init__(self, *, num_blocks=8, block_size=8, flat_store=False, rope_cache_dtype=torch.float32, **kw):
        super().__init__(**kw)
        self.block_size, self.flat_store = block_size, flat_store
        self.qkv_proj = nn.Linear(self.hidden_size, self.q_size + 2 * self.kv_size, bias=False, dtype=self.dtype)
        self.register_buffer("cos_sin_cache", cos_sin_table(self.max_pos, self.rot_dim, rope_cache_dtype))
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.randn(shape, dtype=self.dtype))
        self.register_buffer("v_cache", torch.randn(shape, dtype=self.dtype))

    def forward(self, positions, hidden, slot_mapping, kv_slots=None):
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.rot_dim,
                                 self.style, self.upcast, self.use_reshape, self.perturb, self.table_scale)
        k = self._view(k, -1, self.num_kv_heads, self.head_dim)
        v = self._view(v, -1, self.num_kv_heads, self.head_dim)
        if self.flat_store:
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping] = k
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping] = v
        else:
            block_idx = slot_mapping // self.block_size
            block_off = slot_mapping % self.block_size
            self.k_cache[block_idx, block_off] = k
            self.v_cache[block_idx, block_off] = v
        kv_slots = slot_mapping if kv_slots is None else kv_slots
        k_rows = self.k_cache.flatten(0, 1)[kv_slots]
        v_rows = self.v_cache.flatten(0, 1)[kv_slots]
        return self._token_pool_attention(q, k_rows, v_rows, positions)


class HFRotaryEmbedding(nn.Module):
    """HF Llama/GPT-NeoX/GPT-J rotary module: fp32 cos/sin from ``inv_freq`` and ``position_ids``."""

    def __init__(self, rot_dim, style, freqs_via_matmul=False, attention_scaling=1.0):
        super().__init__()
        self.style, self.freqs_via_matmul, self.attention_scaling = style, freqs_via_matmul, attention_scaling
        self.register_buffer("inv_freq", inv_frequencies(rot_dim), persistent=False)

    def forward(self, x, position_ids):
        if self.freqs_via_matmul:  # transformers 4.x Llama
            inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
            position_ids_expanded = position_ids[:, None, :].float()
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        else:  # transformers 5.x
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        if self.style == "neox":
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = freqs.repeat_interleave(2, -1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class HFBlock(_BlockBase):
    """HF transformers Llama / Qwen3 (qk_norm) / GPT-NeoX (partial rotary) / GPT-J (style="gptj").

    Cache ``[batch, Hkv, max_seq, D]`` updated like ``StaticLayer.update``:
    cache_update="index_copy": ``k_cache.index_copy_(2, cache_position, k)``;
    cache_update="setitem":    ``k_cache[:, :, cache_position] = k``.
    cache_index="arg": cache_position is a forward argument; "counter": transformers 5.x computes it as
    ``arange(S) + cumulative_length`` and bumps that buffer in place (run prefill before decode).
    forward(hidden [B, S, hidden], position_ids [B, S], cache_position [S]).
    """

    form = "hf"

    def __init__(self, *, batch=1, max_seq=64, qk_norm=False, cache_update="index_copy", cache_index="arg",
                 freqs_via_matmul=False, **kw):
        super().__init__(**kw)
        if cache_update not in ("index_copy", "setitem"):
            raise ValueError(f"cache_update must be 'index_copy' or 'setitem', got {cache_update!r}")
        if cache_index not in ("arg", "counter"):
            raise ValueError(f"cache_index must be 'arg' or 'counter', got {cache_index!r}")
        self.cache_update, self.cache_index = cache_update, cache_index
        self.q_proj = nn.Linear(self.hidden_size, self.q_size, bias=False, dtype=self.dtype)
        self.k_proj = nn.Linear(self.hidden_size, self.kv_size, bias=False, dtype=self.dtype)
        self.v_proj = nn.Linear(self.hidden_size, self.kv_size, bias=False, dtype=self.dtype)
        self.q_norm = RMSNorm(self.head_dim, dtype=self.dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, dtype=self.dtype) if qk_norm else None
        self.rotary_emb = HFRotaryEmbedding(self.rot_dim, self.style, freqs_via_matmul,
                                            1.0 if self.table_scale is None else self.table_scale)
        shape = (batch, self.num_kv_heads, max_seq, self.head_dim)
        self.register_buffer("k_cache", torch.randn(shape, dtype=self.dtype))
        self.register_buffer("v_cache", torch.randn(shape, dtype=self.dtype))
        self.register_buffer("cumulative_length", torch.tensor(0, dtype=torch.int64))

    def forward(self, hidden, position_ids, cache_position=None):
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self._view(self.q_proj(hidden), *hidden_shape)
        k = self._view(self.k_proj(hidden), *hidden_shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)
        k = k.transpose(1, 2)
        v = self._view(self.v_proj(hidden), *hidden_shape).transpose(1, 2)

        p = self.perturb
        if p is None:
            cos, sin = self.rotary_emb(v, position_ids)
            q, k = hf_apply_rotary_pos_emb(q, k, cos, sin, self.style, self.upcast)
        else:
            if p.table_row is not None:  # cos/sin of one position, broadcast over the sequence
                first = position_ids[:, :1]
                position_ids = first if p.table_row == "index" else torch.full_like(first, p.SLICE_ROW)
            cos, sin = p.tables(*self.rotary_emb(v, position_ids))
            q, k = hf_apply_rotary_pos_emb(p.at("q", q), p.at("k", k), cos, sin, self.style, self.upcast)
            q, k = p.at("q_rot", q), p.at("k_rot", k)

        if self.cache_index == "counter":
            kv_length = k.shape[-2]
            cache_position = torch.arange(kv_length, device=k.device) + self.cumulative_length
            self.cumulative_length.add_(kv_length)
        if self.cache_update == "index_copy":
            self.k_cache.index_copy_(2, cache_position, k)
            self.v_cache.index_copy_(2, cache_position, v)
        else:
            self.k_cache[:, :, cache_position] = k
            self.v_cache[:, :, cache_position] = v

        n_rep = self.num_heads // self.num_kv_heads
        keys, values = repeat_kv(self.k_cache, n_rep), repeat_kv(self.v_cache, n_rep)
        mask = torch.arange(keys.shape[-2], device=q.device)[None, :] <= cache_position[:, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out)


class GptFastBlock(_BlockBase):
    """gpt-fast: fused wqkv + split, ``freqs_cis[input_pos]`` (real [.., D/2, 2]), interleaved RoPE in fp32
    on [B, S, H, D], transpose, ``k_cache[:, :, input_pos] = k``.  The source rotates the whole head in
    interleaved pairs and always upcasts: style must be "gptj", rot_dim head_dim, and ``upcast`` has no
    effect.  forward(x [B, S, hidden], input_pos [S]).
    """

    form = "gptfast"

    def __init__(self, *, batch=1, max_seq=64, style="gptj", **kw):
        super().__init__(style=style, **kw)
        if self.style != "gptj":
            raise ValueError(f"gpt-fast rotates interleaved pairs: style must be 'gptj', got {self.style!r}")
        if self.rot_dim != self.head_dim:
            raise ValueError(f"gpt-fast rotates the whole head: rot_dim must equal head_dim={self.head_dim}")
        self.wqkv = nn.Linear(self.hidden_size, self.q_size + 2 * self.kv_size, bias=False, dtype=self.dtype)
        t = torch.arange(self.max_pos, dtype=torch.float32)
        freqs = torch.outer(t, inv_frequencies(self.head_dim))
        self.register_buffer("freqs_cis", torch.stack([freqs.cos(), freqs.sin()], dim=-1).to(self.dtype))
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)))
        shape = (batch, self.num_kv_heads, max_seq, self.head_dim)
        self.register_buffer("k_cache", torch.randn(shape, dtype=self.dtype))
        self.register_buffer("v_cache", torch.randn(shape, dtype=self.dtype))

    def forward(self, x, input_pos):
        bsz, seqlen, _ = x.shape
        p = self.perturb
        freqs_cis = self.freqs_cis[input_pos] if p is None else p.rows(self.freqs_cis, input_pos)
        if self.table_scale is not None:  # cos and sin each scaled (a scale of the stacked table is not fused)
            freqs_cis = torch.stack((freqs_cis[..., 0] * self.table_scale, freqs_cis[..., 1] * self.table_scale), -1)
        mask = self.causal_mask[None, None, input_pos]
        q, k, v = self.wqkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self._view(q, bsz, seqlen, self.num_heads, self.head_dim)
        k = self._view(k, bsz, seqlen, self.num_kv_heads, self.head_dim)
        v = self._view(v, bsz, seqlen, self.num_kv_heads, self.head_dim)
        if p is not None:
            freqs_cis = torch.stack(p.tables(freqs_cis[..., 0], freqs_cis[..., 1]), dim=-1)
            freqs_cis = freqs_cis.expand(seqlen, -1, -1)  # one row (table_row) for every token
            q, k = p.at("q", q), p.at("k", k)
        q = gptfast_apply_rotary_emb(q, freqs_cis)
        k = gptfast_apply_rotary_emb(k, freqs_cis)
        if p is not None:
            q, k = p.at("q_rot", q), p.at("k_rot", k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k_out = self.k_cache
        v_out = self.v_cache
        k_out[:, :, input_pos] = k
        v_out[:, :, input_pos] = v
        n_rep = self.num_heads // self.num_kv_heads
        k = k_out.repeat_interleave(n_rep, dim=1)
        v = v_out.repeat_interleave(n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, self.q_size)
        return self.o_proj(y)


_BLOCKS = {cls.form: cls for cls in (SGLangBlock, VLLMPagedBlock, HFBlock, GptFastBlock)}


def make_block(form: str, seed: int | None = 0, **kw) -> _BlockBase:
    """Build the block of one form ("sglang", "vllm", "hf", "gptfast"), in eval mode, seeded weights."""
    if form not in _BLOCKS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _BLOCKS[form](**kw).eval()
    return _BLOCKS[form](**kw).eval()


# --------------------------------------------------------------------------------------------------
# Forward inputs
# --------------------------------------------------------------------------------------------------


def token_slots(block: _BlockBase, positions: torch.Tensor) -> torch.Tensor:
    """Cache row (slot) of each position: scattered, never the identity, so misplaced stores show."""
    if isinstance(block, SGLangBlock):
        num_slots = block.k_buffer.shape[0]
        return (num_slots - 1 - 2 * positions) % num_slots
    if isinstance(block, VLLMPagedBlock):
        num_blocks, bs = block.k_cache.shape[:2]
        block_table = torch.arange(num_blocks - 1, -1, -1)  # blocks handed out in reverse
        return block_table[positions // bs] * bs + (positions + 1) % bs
    raise ValueError(f"only token-pool forms have slots, got {type(block).__name__}")


def make_inputs(block: _BlockBase, num_tokens: int, past: int = 0, seed: int = 0) -> tuple:
    """Forward arguments for ``num_tokens`` new tokens after ``past`` cached ones (prefill: past=0)."""
    g = torch.Generator().manual_seed(seed + past)
    positions = torch.arange(past, past + num_tokens, dtype=torch.int64)
    if block.form in ("sglang", "vllm"):
        hidden = torch.randn(num_tokens, block.hidden_size, generator=g).to(block.dtype)
        slots = token_slots(block, positions)
        kv_slots = token_slots(block, torch.arange(past + num_tokens))
        return positions, hidden, slots, kv_slots
    batch = block.k_cache.shape[0]
    hidden = torch.randn(batch, num_tokens, block.hidden_size, generator=g).to(block.dtype)
    if block.form == "hf":
        position_ids = positions[None].expand(batch, -1).contiguous()
        if block.cache_index == "counter":
            return hidden, position_ids
        return hidden, position_ids, positions.clone()
    return hidden, positions


def prefill_inputs(block: _BlockBase, num_tokens: int = 5, seed: int = 0) -> tuple:
    return make_inputs(block, num_tokens, past=0, seed=seed)


def decode_inputs(block: _BlockBase, past: int = 5, seed: int = 0) -> tuple:
    return make_inputs(block, 1, past=past, seed=seed)
