"""MLA (DeepSeek multi-head latent attention) model fixtures: "RoPE on q_pe, k_pe -> cat with the latent ->
one-row latent-cache store", spelled as SGLang's DeepSeek model and its MLA token pool write it, and a tiny
transformers ``DeepseekV3ForCausalLM`` with a static cache. Model code only; the tests that use it live
elsewhere.

``MLABlock`` (one attention layer, SGLang ``DeepseekV2AttentionMLA`` without a q LoRA):

    q = q_proj(x).view(T, Hq, nope + R);       q_nope, q_pe = q.split([nope, R], -1)
    kv_c, k_pe = kv_a_proj(x).split([L, R], -1); kv_c = kv_a_layernorm(kv_c)       # k_pe [T, 1, R] or [T, R]
    q_pe, k_pe = rotary(positions, q_pe, k_pe)  # GPT-J (interleaved) pairs from cos_sin_cache [max_pos, R]
    path "absorb" (decode / extend):  q = cat([bmm(q_nope, w_kc), q_pe], -1)    [T, Hq, L + R]
                                      (absorb_q="buffer": q = new_empty; q[..., :L] = bmm(...); q[..., L:] = q_pe)
                                      attention over the pool rows kv_loc, values = the rows' first L
    path "prefill" (forward_normal):  k_nope, v = kv_b_proj(kv_c).view(T, Hq, nope + V).split([nope, V], -1)
                                      q = cat([q_nope, q_pe]); k = cat([k_nope, k_pe.expand(T, Hq, R)])
                                      (qk="slice_assign": q[..., nope:] = q_pe; k = empty; k[..., :nope] = ...)
    store into kv_pool [slots, 1, L + R], one row per token at loc:
      "cat_view"  kv_pool[loc] = cat([kv_c, k_pe], -1).view(-1, 1, L + R)      the cat before the view
      "view_cat"  kv_pool[loc] = cat([kv_c.unsqueeze(1), k_pe], -1)            the cat after the view
                                 (forward_absorb_core's k = cat([k_nope, k_pe]) through set_kv_buffer)
      "halves"    kv_pool[loc, :, :L] = kv_c; kv_pool[loc, :, L:] = k_pe       set_mla_kv_buffer's two halves
      "latent"    latent = kv_a_proj output .unsqueeze(1); latent[:, :, :L] = kv_c; latent[:, :, L:] = k_pe;
                  kv_pool[loc] = latent                                        forward_normal_prepare's spelling
      "latent_tail"  the same without the kv_c write: the row keeps the projection's un-normed latent
                  (a buffer written in part: reported, not fused)

rotary: "scaling" is ``DeepseekScalingRotaryEmbedding.forward_native`` (``cos_sin_cache[positions]``,
``repeat_interleave(2)``, ``x * cos + rotate_gptj(x) * sin`` with the fp32 table promoting a bf16 x, then
``.to(dtype)``); "base" is ``RotaryEmbedding.forward_native`` with is_neox_style=False (``index_select``,
``x[..., ::2]`` / ``x[..., 1::2]``, ``stack(...).flatten(-2)``, the table cast to x's dtype, and a cat with the
empty pass-through slice, since the rotary dim is the whole rope head).

fp8 pools: ``fp8="float8"`` (pool dtype float8_e4m3fn) or ``"uint8"`` (SGLang's store_dtype: the fp8 values
``.view(torch.uint8)``); the stored tensor (each half for "halves") is ``(x / k_scale).to(fp8)`` with a
per-tensor scale (a Python float, or a 0-d fp32 buffer with ``scale_tensor=True``), or ``.to(fp8)`` alone
with ``k_scale=None`` (SGLang's MLA pool casts without a scale). Attention reads the rows dequantised.

Shapes: ``SMALL`` for CPU; ``DEEPSEEK_V3_TP1`` / ``DEEPSEEK_V3_TP8`` are the real model's per-rank sizes.
Pools and caches start as random values (never zeros), so a store to a wrong row shows when whole pools are
compared. ``reference_rows`` gives the stored rows in float64 from the block's weights, independent of the
spelling.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tests.attention_blocks import cos_sin_table

PATHS = ("absorb", "prefill")
STORES = ("cat_view", "view_cat", "halves", "latent", "latent_tail")
ROTARIES = ("scaling", "base")
K_PE_LAYOUTS = ("3d", "2d")  # k_pe at RoPE time: [T, 1, R] (SGLang's unsqueeze(1)) or [T, R]
FP8_POOLS = (None, "float8", "uint8")
PREFILL_QK = ("cat", "slice_assign")
ABSORB_QS = ("cat", "buffer")  # the absorbed q: a cat, or SGLang's forward_absorb buffer written in two slices
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class MLAShape:
    """Per-rank MLA sizes: heads Hq, kv_lora_rank L, qk_nope_head_dim, qk_rope_head_dim R, v_head_dim V."""

    heads: int
    kv_lora_rank: int
    qk_nope_dim: int
    rope_dim: int
    v_head_dim: int

    @property
    def latent_dim(self) -> int:
        """One pool row: L + R."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.rope_dim


SMALL = MLAShape(heads=4, kv_lora_rank=32, qk_nope_dim=16, rope_dim=8, v_head_dim=16)
DEEPSEEK_V3_TP1 = MLAShape(heads=128, kv_lora_rank=512, qk_nope_dim=128, rope_dim=64, v_head_dim=128)
DEEPSEEK_V3_TP8 = MLAShape(heads=16, kv_lora_rank=512, qk_nope_dim=128, rope_dim=64, v_head_dim=128)


# --------------------------------------------------------------------------------------------------
# SGLang's rotary embeddings (is_neox_style=False: GPT-J pairs)
# --------------------------------------------------------------------------------------------------


def rotate_gptj(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def scaling_rotary(positions, query, key, cos_sin_cache):
    """``DeepseekScalingRotaryEmbedding.forward_native`` (rotary_dim == head_size == R): q [T, H, R], k
    [T, 1, R] or [T, R] (a 2-D k is viewed as one head and back; SGLang itself only passes [T, 1, R])."""
    dtype = query.dtype
    key_shape = key.shape
    if key.dim() == 2:
        key = key.view(key.shape[0], 1, key.shape[1])
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(-2)
    query = query * cos + rotate_gptj(query) * sin
    key = key * cos + rotate_gptj(key) * sin
    return query.to(dtype), key.to(dtype).view(key_shape)


def _apply_rotary_gptj(x, cos, sin):
    """SGLang ``_apply_rotary_emb`` with is_neox_style=False: x [T, H, R]; cos, sin [T, R / 2]."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def base_rotary(positions, query, key, cos_sin_cache, head_size):
    """``RotaryEmbedding.forward_native`` (head_size == rotary_dim == R): any q, k shape of whole heads."""
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    out = []
    for x in (query, key):
        shape = x.shape
        x = x.view(num_tokens, -1, head_size)
        x_rot = _apply_rotary_gptj(x[..., :head_size], cos, sin)
        out.append(torch.cat((x_rot, x[..., head_size:]), dim=-1).reshape(shape))
    return out[0], out[1]


class MLARMSNorm(nn.Module):
    """SGLang ``RMSNorm.forward_native``: fp32 statistics, the weight applied in fp32, one cast back."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter((1.0 + 0.1 * torch.randn(dim)).to(dtype))
        self.eps = eps

    def forward(self, x):
        orig = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(orig)


# --------------------------------------------------------------------------------------------------
# The SGLang-style block
# --------------------------------------------------------------------------------------------------


class MLABlock(nn.Module):
    """One MLA layer writing its latent rows into ``kv_pool`` [slots, 1, L + R] (see the module docstring).

    forward(positions [T] int64, hidden [T, hidden], loc [T] int64 pool rows of the new tokens,
    kv_loc [S] int64 pool rows the absorbed path attends over) -> (out [T, hidden], q) where q is the
    attention query: [T, Hq, L + R] ("absorb") or [T, Hq, nope + R] ("prefill").
    """

    def __init__(self, shape: MLAShape = SMALL, *, path="absorb", store="cat_view", rotary="scaling",
                 k_pe_layout="3d", fp8=None, k_scale: float | None = 0.05, scale_tensor=False, prefill_qk="cat",
                 absorb_q="cat", dtype=torch.float32, hidden_size=64, slots=32, max_pos=64):
        super().__init__()
        for name, value, allowed in (("path", path, PATHS), ("store", store, STORES), ("rotary", rotary, ROTARIES),
                                     ("k_pe_layout", k_pe_layout, K_PE_LAYOUTS), ("fp8", fp8, FP8_POOLS),
                                     ("prefill_qk", prefill_qk, PREFILL_QK), ("absorb_q", absorb_q, ABSORB_QS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.shape, self.path, self.store, self.rotary = shape, path, store, rotary
        self.k_pe_layout, self.fp8, self.prefill_qk, self.dtype = k_pe_layout, fp8, prefill_qk, dtype
        self.absorb_q = absorb_q
        s = shape
        self.q_proj = nn.Linear(hidden_size, s.heads * s.qk_head_dim, bias=False, dtype=dtype)
        self.kv_a_proj = nn.Linear(hidden_size, s.latent_dim, bias=False, dtype=dtype)
        self.kv_a_layernorm = MLARMSNorm(s.kv_lora_rank, dtype=dtype)
        self.kv_b_proj = nn.Linear(s.kv_lora_rank, s.heads * (s.qk_nope_dim + s.v_head_dim), bias=False,
                                   dtype=dtype)
        self.o_proj = nn.Linear(s.heads * s.v_head_dim, hidden_size, bias=False, dtype=dtype)
        # SGLang's post-load split of kv_b_proj: w_kc [Hq, nope, L], w_vc [Hq, L, V]
        w = self.kv_b_proj.weight.detach().view(s.heads, s.qk_nope_dim + s.v_head_dim, s.kv_lora_rank)
        self.register_buffer("w_kc", w[:, :s.qk_nope_dim].contiguous())
        self.register_buffer("w_vc", w[:, s.qk_nope_dim:].transpose(1, 2).contiguous())
        self.register_buffer("cos_sin_cache", cos_sin_table(max_pos, s.rope_dim))  # fp32, as on CUDA
        self.softmax_scale = s.qk_head_dim ** -0.5
        if fp8 is None:
            pool = torch.randn(slots, 1, s.latent_dim).to(dtype)
        else:  # random fp8 bit patterns without NaN (0x7f / 0xff), so eager compares cleanly
            pool = torch.randint(0, 0x7f, (slots, 1, s.latent_dim), dtype=torch.uint8)
            pool = pool if fp8 == "uint8" else pool.view(FP8)
        self.register_buffer("kv_pool", pool)
        self._k_scale = k_scale
        if scale_tensor and k_scale is not None:
            self.register_buffer("k_scale_t", torch.tensor(k_scale, dtype=torch.float32))

    @property
    def k_scale(self):
        """The pool's scale: the 0-d fp32 buffer (read here, so that ``.to(device)`` moves it), a float, or None."""
        return self.k_scale_t if hasattr(self, "k_scale_t") else self._k_scale

    # ---- the pieces -------------------------------------------------------------------------------

    def _rotary(self, positions, q_pe, k_pe):
        if self.rotary == "scaling":
            return scaling_rotary(positions, q_pe, k_pe, self.cos_sin_cache)
        return base_rotary(positions, q_pe, k_pe, self.cos_sin_cache, self.shape.rope_dim)

    def _quant(self, x):
        """What the pool holds for x: x itself, or fp8 (scaled by 1 / k_scale) as the pool's dtype."""
        if self.fp8 is None:
            return x
        if self.k_scale is not None:
            x = x / self.k_scale
        x = x.to(FP8)
        return x.view(torch.uint8) if self.fp8 == "uint8" else x

    def pool_rows(self, kv_loc):
        """The rows at kv_loc as [S, L + R] in the model dtype (dequantised for an fp8 pool)."""
        rows = self.kv_pool[kv_loc][:, 0]
        if self.fp8 is None:
            return rows
        rows = rows.view(FP8).to(self.dtype)
        return rows if self.k_scale is None else (rows * self.k_scale).to(self.dtype)

    def _store(self, loc, latent, kv_c, k_pe):
        """One row of L + R per token into kv_pool at loc; kv_c [T, L], k_pe [T, 1, R] or [T, R]."""
        t, s = kv_c.shape[0], self.shape
        if self.store == "cat_view":
            k_pe = k_pe.view(t, s.rope_dim) if k_pe.dim() == 3 else k_pe
            self.kv_pool[loc] = self._quant(torch.cat([kv_c, k_pe], dim=-1).view(-1, 1, s.latent_dim))
        elif self.store == "view_cat":
            k_pe = k_pe.view(t, 1, s.rope_dim) if k_pe.dim() == 2 else k_pe
            self.kv_pool[loc] = self._quant(torch.cat([kv_c.unsqueeze(1), k_pe], dim=-1))
        elif self.store == "halves":
            k_pe = k_pe.view(t, 1, s.rope_dim) if k_pe.dim() == 2 else k_pe
            self.kv_pool[loc, :, :s.kv_lora_rank] = self._quant(kv_c.unsqueeze(1))
            self.kv_pool[loc, :, s.kv_lora_rank:] = self._quant(k_pe)
        else:  # "latent": the projection's own output, overwritten in place, then stored whole
            latent = latent.unsqueeze(1)
            if self.store == "latent":  # ("latent_tail": only k_pe written; the row keeps the un-normed latent)
                latent[:, :, :s.kv_lora_rank] = kv_c.unsqueeze(1)
            latent[:, :, s.kv_lora_rank:] = k_pe.view(t, 1, s.rope_dim) if k_pe.dim() == 2 else k_pe
            self.kv_pool[loc] = self._quant(latent)

    def _absorbed_attention(self, q_nope, q_pe, kv_loc):
        s = self.shape
        q_nope_out = torch.bmm(q_nope.transpose(0, 1), self.w_kc).transpose(0, 1)  # [T, Hq, L]
        if self.absorb_q == "cat":
            q = torch.cat([q_nope_out, q_pe], dim=-1)  # [T, Hq, L + R]
        else:  # SGLang's forward_absorb: a new buffer, written in two slices
            q = q_nope_out.new_empty(q_nope_out.shape[0], s.heads, s.kv_lora_rank + s.rope_dim)
            q[..., :s.kv_lora_rank] = q_nope_out
            q[..., s.kv_lora_rank:] = q_pe
        rows = self.pool_rows(kv_loc)  # [S, L + R]
        # fp32 attention: Inductor's rounding of a bf16 softmax would make outputs differ from eager's
        scores = torch.einsum("thd,sd->hts", q.float(), rows.float()) * self.softmax_scale
        o = torch.einsum("hts,sl->htl", scores.softmax(-1), rows[:, :s.kv_lora_rank].float()).to(self.dtype)
        out = torch.bmm(o, self.w_vc).transpose(0, 1)  # [T, Hq, V]
        return out.flatten(1, 2), q

    def _prefill_attention(self, q, q_nope, q_pe, kv_c, k_pe):
        t, s = q.shape[0], self.shape
        kv = self.kv_b_proj(kv_c).view(t, s.heads, s.qk_nope_dim + s.v_head_dim)
        k_nope, v = kv[..., :s.qk_nope_dim], kv[..., s.qk_nope_dim:]
        k_pe = k_pe.view(t, 1, s.rope_dim) if k_pe.dim() == 2 else k_pe
        if self.prefill_qk == "cat":
            q = torch.cat([q_nope, q_pe], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(t, s.heads, s.rope_dim)], dim=-1)
        else:  # SGLang forward_normal_prepare: in place into q, k assembled in a new tensor
            q[..., s.qk_nope_dim:] = q_pe
            k = torch.empty_like(q)
            k[..., :s.qk_nope_dim] = k_nope
            k[..., s.qk_nope_dim:] = k_pe
        o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                           v.transpose(0, 1).float(), is_causal=True, scale=self.softmax_scale)
        return o.to(self.dtype).transpose(0, 1).flatten(1, 2), q

    def forward(self, positions, hidden, loc, kv_loc):
        t, s = hidden.shape[0], self.shape
        q = self.q_proj(hidden).view(t, s.heads, s.qk_head_dim)
        q_nope, q_pe = q.split([s.qk_nope_dim, s.rope_dim], dim=-1)
        latent = self.kv_a_proj(hidden)
        kv_c, k_pe = latent.split([s.kv_lora_rank, s.rope_dim], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c)
        if self.k_pe_layout == "3d":
            k_pe = k_pe.unsqueeze(1)
        q_pe, k_pe = self._rotary(positions, q_pe, k_pe)
        self._store(loc, latent, kv_c, k_pe)
        if self.path == "absorb":
            out, q_att = self._absorbed_attention(q_nope, q_pe, kv_loc)
        else:
            out, q_att = self._prefill_attention(q, q_nope, q_pe, kv_c, k_pe)
        return self.o_proj(out), q_att


def make_mla_block(seed: int | None = 0, **kw) -> MLABlock:
    """An ``MLABlock`` in eval mode, its weights drawn from ``seed`` (the global RNG untouched)."""
    if seed is None:
        return MLABlock(**kw).eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLABlock(**kw).eval()


def mla_slots(block: MLABlock, positions: torch.Tensor) -> torch.Tensor:
    """Pool row of each position: scattered (never the identity), as SGLang's out_cache_loc."""
    slots = block.kv_pool.shape[0]
    return (slots - 1 - 3 * positions) % slots


def mla_inputs(block: MLABlock, num_tokens: int, past: int = 0, seed: int = 0) -> tuple:
    """(positions, hidden, loc, kv_loc) for ``num_tokens`` new tokens after ``past`` cached ones."""
    g = torch.Generator().manual_seed(seed + past)
    positions = torch.arange(past, past + num_tokens, dtype=torch.int64)
    hidden = torch.randn(num_tokens, block.q_proj.in_features, generator=g).to(block.dtype)
    return positions, hidden, mla_slots(block, positions), mla_slots(block, torch.arange(past + num_tokens))


def mla_steps(block: MLABlock, prefill: int = 5, decode: tuple[int, ...] = (2, 2), seed: int = 0) -> list[tuple]:
    """Forward arguments of a prefill then decode steps (the decode token counts given)."""
    steps, past = [mla_inputs(block, prefill, 0, seed)], prefill
    for n in decode:
        steps.append(mla_inputs(block, n, past, seed))
        past += n
    return steps


def reference_rows(block: MLABlock, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The rows [T, L + R] the block stores, in float64 from its weights (before any fp8 cast): the RMS-normed
    latent, then k_pe rotated in interleaved pairs by position * inv_freq. Any store spelling but "latent_tail"
    (whose row keeps the projection's un-normed latent) must give these."""
    s = block.shape
    x = hidden.double()
    latent = x @ block.kv_a_proj.weight.double().t()
    kv_c, k_pe = latent[:, :s.kv_lora_rank], latent[:, s.kv_lora_rank:]
    kv_c = kv_c * torch.rsqrt(kv_c.pow(2).mean(-1, keepdim=True) + block.kv_a_layernorm.eps)
    kv_c = kv_c * block.kv_a_layernorm.weight.double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, s.rope_dim, 2, dtype=torch.float64) / s.rope_dim))
    angle = positions.double()[:, None] * inv_freq[None]
    even, odd = k_pe[:, 0::2], k_pe[:, 1::2]
    rotated = torch.stack((even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()), -1)
    return torch.cat([kv_c, rotated.flatten(-2)], dim=-1)


# --------------------------------------------------------------------------------------------------
# transformers DeepseekV3ForCausalLM with a static latent cache
# --------------------------------------------------------------------------------------------------


def hf_cache_arg() -> str:
    """The forward argument naming the cache: transformers renamed ``past_key_values`` to ``cache`` in 5.x."""
    import transformers

    params = inspect.signature(transformers.DeepseekV3ForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def deepseek_v3_config(rope_interleave: bool = True, layers: int = 2, shape: MLAShape = SMALL, version: int = 3,
                       **overrides):
    """A tiny ``DeepseekV3Config`` (``version=2``: ``DeepseekV2Config``, whose attention rotates q_pe and k_pe by a
    complex multiply, GPT-J pairs, and has no ``rope_interleave``): hidden 64, q LoRA rank 16, the MLA sizes of
    ``shape``, dense MLPs only (``first_k_dense_replace = layers``: the eager expert loop's ``nonzero`` would break
    the graph), vocab 128, SDPA attention."""
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
              q_lora_rank=16, kv_lora_rank=shape.kv_lora_rank, qk_nope_head_dim=shape.qk_nope_dim,
              qk_rope_head_dim=shape.rope_dim, v_head_dim=shape.v_head_dim, n_routed_experts=4, n_group=1,
              topk_group=1, num_experts_per_tok=2, first_k_dense_replace=layers, max_position_embeddings=64,
              bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="sdpa")
    if version == 3:
        kw.update(rope_interleave=rope_interleave)
    kw.update(overrides)
    return (transformers.DeepseekV3Config if version == 3 else transformers.DeepseekV2Config)(**kw)


def build_deepseek_v3(rope_interleave: bool = True, dtype=torch.float32, layers: int = 2, seed: int = 0,
                      device="cpu", version: int = 3, **overrides):
    """A random-weight ``DeepseekV3ForCausalLM`` (``version=2``: ``DeepseekV2ForCausalLM``; eval, ``dtype``) and its
    config."""
    import transformers

    config = deepseek_v3_config(rope_interleave, layers, version=version, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (transformers.DeepseekV3ForCausalLM if version == 3 else transformers.DeepseekV2ForCausalLM)(config)
    return model.to(device=device, dtype=dtype).eval(), config


def new_latent_cache(config, batch: int = 1, max_cache_len: int = 16, dtype=torch.float32, device="cpu",
                     seed: int = 1):
    """A ``StaticCache`` allocated before compilation, its layers filled with random values.

    DeepseekV3Attention caches the latents, not per-head keys: ``cache.update(kv_nope, k_rot)`` stores the
    normed latent [B, 1, S, L] as the layer's keys and the rotated k_rot [B, 1, S, R] as its values, each with
    ``index_copy_(2, cache_position, ...)``. Keys and values differ in width, so each layer is initialised
    from two empty tensors (``early_initialization`` takes one head_dim for both).
    """
    import transformers

    cache = transformers.StaticCache(config=config, max_cache_len=max_cache_len)
    g = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        keys = torch.empty(batch, 1, 0, config.kv_lora_rank, dtype=dtype, device=device)
        values = torch.empty(batch, 1, 0, config.qk_rope_head_dim, dtype=dtype, device=device)
        layer.lazy_initialization(keys, values)
        layer.keys.copy_(torch.randn(layer.keys.shape, generator=g).to(dtype))
        layer.values.copy_(torch.randn(layer.values.shape, generator=g).to(dtype))
    return cache


def hf_steps(config, batch: int = 1, prefill: int = 5, decodes: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """input_ids of a prefill of ``prefill`` tokens, then ``decodes`` one-token steps."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, config.vocab_size, (batch, n), generator=g) for n in (prefill, *([1] * decodes))]


def run_hf_steps(forward, cache, steps) -> list[torch.Tensor]:
    """Logits of each step, the cache passed by the argument name this transformers uses."""
    arg = hf_cache_arg()
    with torch.no_grad():
        return [forward(input_ids=ids, use_cache=True, **{arg: cache}).logits for ids in steps]
