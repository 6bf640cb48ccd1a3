"""End to end: decoder stacks under stock torch.compile and under the fx_fusion backend, side by side.

Models a, b, c: random-weight decoder stacks shaped like three deployments (a: gpt-oss-120b TP-8 shard,
b: gpt-oss-20b, c: Llama-3-8B), written the way SGLang writes its models: a fused qkv Linear + split,
``RotaryEmbedding.forward_native`` (fp32 ``cos_sin_cache`` [max_pos, D] -> ``index_select`` -> ``chunk``, NeoX
rotation in the model dtype), ``k_buffer[loc] = k.view(-1, Hkv, D)`` into a token-indexed pool,
``F.scaled_dot_product_attention`` over the pool, RMSNorm and a dense SwiGLU MLP. No embedding or LM head.

Model a-fp8 (``--models a-fp8``): model a with the pool in fp8 as SGLang stores it, float8_e4m3fn bytes in a
uint8 pool: ``k_buffer[loc] = k.div(k_scale).to(float8_e4m3fn).view(uint8)``, attention reading
``k_buffer.view(float8_e4m3fn).to(bf16) * k_scale`` (0-d fp32 scales). Outputs compared at (1e-1, 1e-1), the
written rows dequantised at one e4m3 step (rtol 2**-3; see FP8_ROW_RTOL). Its fused-site count is reported,
not required.

Model f (``--models f``): a decoder shaped like Qwen3-8B (32 q / 8 kv heads, head_dim 128, hidden 4096, SwiGLU
intermediate 12288, rope base 1e6, 36 layers, no qkv bias), written as models a, b, c plus Qwen3's QK-norm: each
q and k head normalised by HF's ``Qwen3RMSNorm`` (fp32, rounded to bf16, times a weight random around 1; eps
1e-6) between the split and the RoPE, on the heads as rows ``[T * H, D]`` as SGLang's Qwen3 applies it
(``q.reshape(-1, head_dim)``, the norm, ``view(q.shape)``). Checked and counted as models a, b, c. Which fusion
it measures depends on the pass: today's fuses the RoPE + store and leaves the norm to Inductor ("RoPE-only
fusion"); a pass that emits the norm in the fused op measures "norm fused". For both against the same stock, run the same command on both
versions of the pass (the stock side is the same code), or, if the pass gets a ``FusionConfig`` field that turns
the norm's fusion off, once with ``--fx-options FIELD=False``.

Model e (``--models e``): a DeepSeek-V3-shaped decoder at TP 8 (16 q heads, hidden 7168, 61 layers) with multi-head
latent attention as SGLang's absorbed path writes it (``MLAAttention``: kv_lora_rank 512, qk_nope 128, rope 64 in
GPT-J pairs from DeepSeek's fp32 ``cos_sin_cache``, v_head 128; ``q = cat([absorb(q_nope), q_pe])``,
``kv_pool[loc] = cat([kv_c, k_pe]).view(-1, 1, 576)``), random weights, and a dense SwiGLU MLP (2304 wide, the TP-8
share of DeepSeek-V3's dense layers) in place of the MoE. The pass fuses each layer into one ``fx_fusion.mla_rope_store``.

Model d (``--models d``): Hugging Face ``GptOssForCausalLM`` at gpt-oss-20b sizes (64 q / 8 kv heads, head_dim
64, hidden 2880, 32 experts top-4, sliding window 128 on alternate layers, YaRN rope scaling from
``GptOssConfig``'s defaults), random bf16 weights built on the device (nothing downloaded), embedding and LM
head included (last token's logits), eager attention (sinks), driven through HF's ``StaticCache`` made as
HF's docs make it and allocated by a first eager call. Before every step the cache is rewound (outside the
timed interval) to ``--past`` tokens (decode) or to empty (prefill), so each step runs at the same position.
Static shapes: one graph per batch and per token count. Default: 8 of the 24 layers, estimated (not yet
timed) to compile both sides in 2-3 minutes on an H200; ``--layers d=24`` for the whole model. Every
layer's site should fuse (a sliding layer's prefill longer than its window too: the copy of its last 128
tokens); the count and the pass's reasons are reported, not required. Needs ``transformers`` 5.x; without it model d
prints "skipped: transformers not installed" and the other models run.

Each model is compiled twice in one process with the same mode and flags, once by
``torch.compile(model, mode=M)`` and once by ``torch.compile(model, backend="fx_fusion", mode=M)``:

    decode    batch 1, 16, 64 (model d: 1, 16) after ``--past`` cached tokens, ``mode="reduce-overhead"``
              (CUDA graphs); per-step latency from CUDA events around every step: median (p10-p90)
    prefill   2048 and 8192 tokens (model d: 2048), batch 1, default mode (max-autotune compiles far too
              slowly); tokens/s from the median step time (p10-p90)
    compile   wall time of the calls that compiled, for each side, and the fusion pass's share of it

For every point the two sides' outputs and the KV-cache rows they wrote are compared (bf16 tolerance;
model d: logits and every layer's whole cache), the rest of the fx_fusion side's caches is checked
untouched, and the fx_fusion side must have fused one RoPE + KV-store site per layer in every graph it
compiled (``counters["fx_fusion"]``; models a-fp8 and d: reported only). The reasons the pass gave for
sites it did not fuse are listed after the compile table.

Shapes (models a, b, c, a-fp8, f): decode compiles one graph for batch 1 (Dynamo specialises size-1 dims) and
one for all batches >= 2 (``mark_dynamic`` on the token dim; CUDA graphs are still recorded per batch size,
and each timed step replays one with the same shapes); prefill compiles one graph for both token counts.
``--static-shapes`` compiles one graph per shape instead (slower to compile). The FX graph and AOT
autograd caches are off, so each side really compiles.

    python benchmarks/bench_e2e.py                          # models a, b, c: about 8 minutes on an H100
    python benchmarks/bench_e2e.py --models c --layers 16   # fewer layers (printed)
    python benchmarks/bench_e2e.py --models d --layers d=8  # HF gpt-oss-20b, 8 of 24 layers (the default)
    python benchmarks/bench_e2e.py --models a-fp8 --layers 12  # fp8 KV pool
    python benchmarks/bench_e2e.py --models f --layers 8 --decode-batches 1 64 --prefill-tokens 2048  # Qwen3 QK-norm
    python benchmarks/bench_e2e.py --models f --fx-options min_tokens=2  # options= of the fx_fusion side
    python benchmarks/bench_e2e.py --decode-mode default     # decode without CUDA graphs (host cost counts)
    python benchmarks/bench_e2e.py --smoke                  # 2 layers, tiny hidden size, CPU; no timing claims
    python benchmarks/bench_e2e.py --smoke --models f       # the same for model f

``--fx-options KEY=VALUE ...``: ``options=`` of the fx_fusion side's compile (``FusionConfig`` fields and Inductor
config, as ``backend="fx_fusion"`` takes them; values read as Python literals, else as strings), in every mode
(``torch.compile`` refuses ``mode`` with ``options``: the side then compiles with ``make_backend``).
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import gc
import inspect
import logging
import math
import os
import platform
import shlex
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported: the CPU runs them interpreted

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fx_fusion  # noqa: E402,F401  (registers backend="fx_fusion")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model's shapes (per GPU: a tensor-parallel shard sees only its own heads)."""

    key: str
    name: str
    n_q: int
    n_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    layers: int
    rope_base: float
    bias: bool  # qkv and o projections with bias (gpt-oss) or without (Llama)
    smoke_heads: tuple[int, int]  # (q, kv) heads of the --smoke version: the Triton interpreter is slow
    fp8_cache: bool = False  # pools of float8_e4m3fn bytes in uint8 tensors, per-tensor scales (SGLang's fp8 KV)
    qk_norm: bool = False  # RMSNorm of each q and k head before the RoPE, as HF's Qwen3Attention (Qwen3RMSNorm)
    # MLA (model e): (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim); head_dim is the rope dim
    mla: tuple[int, int, int, int] | None = None

    def smoke(self) -> "Spec":
        mla = (32, 16, 8, 16) if self.mla else None
        return dataclasses.replace(self, n_q=self.smoke_heads[0], n_kv=self.smoke_heads[1], hidden=SMOKE_HIDDEN,
                                   intermediate=SMOKE_INTERMEDIATE, layers=SMOKE_LAYERS, mla=mla,
                                   head_dim=mla[2] if mla else self.head_dim)


SPECS = {
    "a": Spec("a", "gpt-oss-120b TP-8 shard", 8, 1, 64, 2880, 2880, 36, 150000.0, True, (8, 1)),
    "b": Spec("b", "gpt-oss-20b", 64, 8, 64, 2880, 2880, 24, 150000.0, True, (16, 2)),
    "c": Spec("c", "Llama-3-8B", 32, 8, 128, 4096, 14336, 32, 500000.0, False, (8, 2)),
    "f": Spec("f", "Qwen3-8B", 32, 8, 128, 4096, 12288, 36, 1000000.0, False, (8, 2), qk_norm=True),
}
# DeepSeek-V3 at TP 8: 16 of its 128 q heads, the latent pool of one row per token; a dense SwiGLU MLP in place of
# the MoE (its dense layers' 18432, sharded 8 ways), 61 layers
SPECS["e"] = Spec("e", "DeepSeek-V3 TP-8 shard (MLA, dense MLP)", 16, 1, 64, 7168, 2304, 61, 10000.0, False, (4, 1),
                  mla=(512, 128, 64, 128))
SPECS["a-fp8"] = dataclasses.replace(SPECS["a"], key="a-fp8", name="gpt-oss-120b TP-8 shard, fp8 KV cache",
                                     fp8_cache=True)
SMOKE_HIDDEN, SMOKE_INTERMEDIATE, SMOKE_LAYERS = 128, 256, 2
QK_NORM_EPS = 1e-6  # Qwen3's rms_norm_eps

# (atol, rtol): bf16 results of two compiled programs that round at different points
OUT_TOL = (6e-2, 5e-2)
# fp8 caches (model a-fp8). Per-tensor scales as SGLang applies them (k / k_scale -> float8_e4m3fn, read back as
# fp8 -> bf16 * k_scale). Two programs whose bf16 k differs in the last bit can round a value to neighbouring
# e4m3 codes: one step of a 3-bit mantissa is at most 2**-3 of the value, so the written rows, compared
# dequantised, get rtol 2**-3; and OUT_TOL's atol, as unquantised rows: k is rotated in bf16, and where its two
# products nearly cancel, a value far below its operands carries their bf16 rounding (one side rounds every op,
# the other once), which the quantisation keeps. The outputs attend over those rows (every row at prefill), so
# they get a looser (1e-1, 1e-1).
FP8 = torch.float8_e4m3fn
FP8_SCALES = (0.0625, 0.03125)  # (k_scale, v_scale): fixed per-tensor scales, as a calibrated checkpoint has
FP8_ROW_RTOL = 2.0 ** -3
FP8_OUT_TOL = (1e-1, 1e-1)


# --------------------------------------------------------------------------------------------------
# The model: SGLang-style decoder layers over a token-indexed KV pool
# --------------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """NeoX RoPE as SGLang's ``RotaryEmbedding.forward_native`` computes it, rotating the whole head."""

    def __init__(self, head_dim: int, max_pos: int, base: float, device):
        super().__init__()
        self.head_dim = self.rotary_dim = head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions, query, key):
        positions = positions.flatten()
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return self._apply(positions.shape[0], query, cos, sin), self._apply(positions.shape[0], key, cos, sin)

    def _apply(self, num_tokens, x, cos, sin):
        shape = x.shape
        x = x.view(num_tokens, -1, self.head_dim)
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        x1, x2 = torch.chunk(x_rot, 2, dim=-1)
        x_rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((x_rot, x_pass), dim=-1).reshape(shape)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype, device, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Qwen3RMSNorm(nn.Module):
    """HF ``Qwen3RMSNorm`` as written there (the QK-norm of model f); the weight random around 1, as trained
    QK-norm weights are far from ones (and a weight of ones would hide a missing multiply)."""

    def __init__(self, dim: int, dtype, device, eps: float = QK_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, device=device).mul(0.1).add(1.0).to(dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Attention(nn.Module):
    """qkv Linear -> split -> RoPE -> store k, v in the pool -> SDPA over the pool -> o Linear.

    The pool ``[num_slots, Hkv, D]`` is a module buffer (a static address for CUDA graphs). Sequence i owns
    slots ``[i * L, (i + 1) * L)``, where ``B, L = mask.shape[0], mask.shape[-1]``: attention reads the pool
    as ``[B, L, Hkv, D]`` and the boolean mask ``[B, 1, Tq, L]`` keeps the valid positions.

    With ``spec.fp8_cache`` the pools hold float8_e4m3fn bytes in uint8 tensors, as SGLang's
    ``MHATokenToKVPool`` stores fp8 (``store_dtype = uint8``): ``k_buffer[loc] = k.div(k_scale)
    .to(float8_e4m3fn).view(uint8)``; attention dequantises, ``k_buffer.view(float8_e4m3fn).to(bf16) * k_scale``.
    The scales are 0-d fp32 buffers (SGLang's ``layer.k_scale``).
    """

    def __init__(self, spec: Spec, hidden: int, num_slots: int, rotary: RotaryEmbedding, gqa: bool, dtype, device):
        super().__init__()
        self.n_q, self.n_kv, self.d = spec.n_q, spec.n_kv, spec.head_dim
        self.q_size, self.kv_size = self.n_q * self.d, self.n_kv * self.d
        self.gqa = gqa
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=spec.bias, dtype=dtype, device=device)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=spec.bias, dtype=dtype, device=device)
        self.rotary = rotary
        self.qk_norm = spec.qk_norm
        if self.qk_norm:
            self.q_norm = Qwen3RMSNorm(self.d, dtype, device)
            self.k_norm = Qwen3RMSNorm(self.d, dtype, device)
        self.fp8 = spec.fp8_cache
        shape = (num_slots, self.n_kv, self.d)
        pool_dtype = torch.uint8 if self.fp8 else dtype
        self.register_buffer("k_buffer", torch.zeros(shape, dtype=pool_dtype, device=device), persistent=False)
        self.register_buffer("v_buffer", torch.zeros(shape, dtype=pool_dtype, device=device), persistent=False)
        if self.fp8:
            for name, scale in zip(("k_scale", "v_scale"), FP8_SCALES):
                self.register_buffer(name, torch.tensor(scale, dtype=torch.float32, device=device), persistent=False)

    def forward(self, positions, hidden, loc, mask):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # SGLang's Qwen3Attention._apply_qk_norm: each head a row [T * H, D]
            q = self.q_norm(q.reshape(-1, self.d)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.d)).view(k.shape)
        q, k = self.rotary(positions, q, k)
        # RadixAttention -> token_to_kv_pool.set_kv_buffer(layer, loc, k, v)
        k, v = k.view(-1, self.n_kv, self.d), v.view(-1, self.n_kv, self.d)
        if self.fp8:
            self.k_buffer[loc] = k.div(self.k_scale).to(FP8).view(torch.uint8)
            self.v_buffer[loc] = v.div(self.v_scale).to(FP8).view(torch.uint8)
        else:
            self.k_buffer[loc] = k
            self.v_buffer[loc] = v
        batch, tq, kv_len = mask.shape[0], mask.shape[2], mask.shape[3]
        keys, values = self.k_buffer[: batch * kv_len], self.v_buffer[: batch * kv_len]
        if self.fp8:
            keys = keys.view(FP8).to(q.dtype) * self.k_scale
            values = values.view(FP8).to(q.dtype) * self.v_scale
        keys = keys.view(batch, kv_len, self.n_kv, self.d).transpose(1, 2)
        values = values.view(batch, kv_len, self.n_kv, self.d).transpose(1, 2)
        q = q.view(batch, tq, self.n_q, self.d).transpose(1, 2)
        if self.n_q == self.n_kv or self.gqa:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_q != self.n_kv)
        else:  # SDPA would fall back to its math kernel with GQA and a mask: repeat the kv heads instead
            rep = self.n_q // self.n_kv
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch * tq, self.q_size))


class MLAAttention(nn.Module):
    """DeepSeek-V3's multi-head latent attention as SGLang's absorbed path writes it (``forward_absorb``).

    q straight from the hidden state (no q LoRA) ``[T, Hq, nope + R]`` -> split; ``kv_a_proj`` -> the latent ``kv_c``
    (RMS-normed) and one k_pe head; both rope parts rotated in GPT-J pairs by DeepSeek's ``forward_native`` (the
    fp32 ``cos_sin_cache`` row per position, ``repeat_interleave(2)``, ``x * cos + rotate(x) * sin`` promoted to
    fp32, cast back); q_nope absorbed into the latent space (``bmm`` with ``w_kc``); ``q = cat([q_nope, q_pe])``;
    ``kv_pool[loc] = cat([kv_c, k_pe]).view(-1, 1, L + R)`` (SGLang's MLA token pool); attention of q over the
    pool's rows (the latent part as the values), then ``w_vc`` and ``o_proj``.
    """

    def __init__(self, spec: Spec, hidden: int, num_slots: int, rotary: RotaryEmbedding, dtype, device):
        super().__init__()
        self.n_q = spec.n_q
        self.L, self.nope, self.R, self.V = spec.mla
        make = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden, self.n_q * (self.nope + self.R), bias=False, **make)
        self.kv_a_proj = nn.Linear(hidden, self.L + self.R, bias=False, **make)
        self.kv_a_norm = RMSNorm(self.L, dtype, device)
        self.w_kc = nn.Parameter(torch.randn(self.n_q, self.nope, self.L, **make) * self.nope ** -0.5)
        self.w_vc = nn.Parameter(torch.randn(self.n_q, self.L, self.V, **make) * self.L ** -0.5)
        self.o_proj = nn.Linear(self.n_q * self.V, hidden, bias=False, **make)
        self.rotary = rotary
        self.scale = (self.nope + self.R) ** -0.5
        self.register_buffer("kv_pool", torch.zeros(num_slots, 1, self.L + self.R, **make), persistent=False)

    def _rope(self, positions, x):
        """DeepseekScalingRotaryEmbedding.forward_native, GPT-J pairs, on ``x [T, H, R]``."""
        cos, sin = self.rotary.cos_sin_cache[positions].chunk(2, dim=-1)
        cos = cos.repeat_interleave(2, dim=-1).unsqueeze(-2)
        sin = sin.repeat_interleave(2, dim=-1).unsqueeze(-2)
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return (x * cos + rotated * sin).to(x.dtype)

    def forward(self, positions, hidden, loc, mask):
        t, n_q, L = hidden.shape[0], self.n_q, self.L
        q = self.q_proj(hidden).view(t, n_q, self.nope + self.R)
        q_nope, q_pe = q.split([self.nope, self.R], dim=-1)
        kv_c, k_pe = self.kv_a_proj(hidden).split([L, self.R], dim=-1)
        kv_c = self.kv_a_norm(kv_c)
        q_pe, k_pe = self._rope(positions, q_pe), self._rope(positions, k_pe.unsqueeze(1))
        q = torch.cat([torch.bmm(q_nope.transpose(0, 1), self.w_kc).transpose(0, 1), q_pe], dim=-1)
        self.kv_pool[loc] = torch.cat([kv_c, k_pe.view(t, self.R)], dim=-1).view(-1, 1, L + self.R)
        batch, tq, kv_len = mask.shape[0], mask.shape[2], mask.shape[3]
        rows = self.kv_pool[: batch * kv_len].view(batch, 1, kv_len, L + self.R).expand(batch, n_q, kv_len, -1)
        q = q.view(batch, tq, n_q, L + self.R).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, rows, rows[..., :L], attn_mask=mask, scale=self.scale)
        out = torch.bmm(out.transpose(1, 2).reshape(batch * tq, n_q, L).transpose(0, 1), self.w_vc)
        return self.o_proj(out.transpose(0, 1).reshape(t, n_q * self.V))


class MLP(nn.Module):
    """Dense SwiGLU: down(silu(gate) * up), gate and up from one merged Linear."""

    def __init__(self, hidden: int, intermediate: int, dtype, device):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec, hidden, intermediate, num_slots, rotary, gqa, dtype, device):
        super().__init__()
        self.input_norm = RMSNorm(hidden, dtype, device)
        self.attn = (MLAAttention(spec, hidden, num_slots, rotary, dtype, device) if spec.mla
                     else Attention(spec, hidden, num_slots, rotary, gqa, dtype, device))
        self.post_norm = RMSNorm(hidden, dtype, device)
        self.mlp = MLP(hidden, intermediate, dtype, device)

    def forward(self, positions, h, loc, mask):
        h = h + self.attn(positions, self.input_norm(h), loc, mask)
        return h + self.mlp(self.post_norm(h))


class Decoder(nn.Module):
    """forward(hidden [T, hidden], positions [T], loc [T], mask [B, 1, Tq, L]) -> normed hidden [T, hidden].

    No embedding or LM head: the stack between them is what the fusion touches.
    """

    def __init__(self, spec, layers, hidden, intermediate, num_slots, max_pos, gqa, dtype, device):
        super().__init__()
        self.rotary = RotaryEmbedding(spec.head_dim, max_pos, spec.rope_base, device)
        self.layers = nn.ModuleList(DecoderLayer(spec, hidden, intermediate, num_slots, self.rotary, gqa, dtype, device)
                                    for _ in range(layers))
        self.norm = RMSNorm(hidden, dtype, device)

    def forward(self, hidden, positions, loc, mask):
        for layer in self.layers:
            hidden = layer(positions, hidden, loc, mask)
        return self.norm(hidden)

    def caches(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, its pools: (k, v), or the MLA latent pool alone."""
        return [(layer.attn.kv_pool,) if isinstance(layer.attn, MLAAttention) else
                (layer.attn.k_buffer, layer.attn.v_buffer) for layer in self.layers]


# --------------------------------------------------------------------------------------------------
# Inputs, caches, checks
# --------------------------------------------------------------------------------------------------


def decode_inputs(batch, past, kv_len, hidden, dtype, device, seed):
    """One new token for each of ``batch`` sequences, all at position ``past``."""
    gen = torch.Generator(device).manual_seed(seed)
    positions = torch.full((batch,), past, dtype=torch.int64, device=device)
    loc = torch.arange(batch, device=device) * kv_len + past
    x = torch.randn(batch, hidden, generator=gen, device=device).to(dtype)
    mask = (torch.arange(kv_len, device=device)[None, :] <= positions[:, None]).view(batch, 1, 1, kv_len)
    return x, positions, loc, mask


def prefill_inputs(tokens, hidden, dtype, device, seed):
    """One sequence of ``tokens`` new tokens in slots 0..tokens-1, causal mask."""
    gen = torch.Generator(device).manual_seed(seed)
    positions = torch.arange(tokens, device=device)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    mask = (positions[None, :] <= positions[:, None]).view(1, 1, tokens, tokens)
    return x, positions, positions.clone(), mask


def mark_token_dim_dynamic(args, decode: bool) -> None:
    """Compile the token dim symbolic. ``maybe_mark_dynamic``: a compile that specialises it anyway (a guard
    such as ``T != 64``) recompiles, which the compile table shows, instead of raising."""
    x, positions, loc, mask = args
    for t in (x, positions, loc):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    for d in ((0,) if decode else (2, 3)):
        torch._dynamo.maybe_mark_dynamic(mask, d)


def _fill_seed(seed: int, layer: int, which: int) -> int:
    return seed * 1000 + 2 * layer + which


def random_like(c: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal values in ``c``'s dtype; for a uint8 (fp8) pool, their float8_e4m3fn bytes (no NaN codes)."""
    gen = torch.Generator(c.device).manual_seed(seed)
    if c.dtype == torch.uint8:
        return torch.randn(c.shape, generator=gen, device=c.device).to(FP8).view(torch.uint8)
    return torch.empty_like(c).normal_(generator=gen)


def fill_caches(model: Decoder, seed: int) -> None:
    """Deterministic random caches: the 'past' tokens attention reads, and rows a stray write would change."""
    for i, caches in enumerate(model.caches()):
        for which, c in enumerate(caches):
            c.copy_(random_like(c, _fill_seed(seed, i, which)))


def untouched_rows_intact(model: Decoder, seed: int, loc: torch.Tensor) -> bool:
    """Every cache row outside ``loc`` still holds what ``fill_caches(seed)`` put there."""
    for i, caches in enumerate(model.caches()):
        keep = torch.ones(caches[0].shape[0], dtype=torch.bool, device=loc.device)
        keep[loc] = False
        for which, c in enumerate(caches):
            expected = random_like(c, _fill_seed(seed, i, which))
            if not torch.equal(c[keep], expected[keep]):
                return False
    return True


def written_rows(model: Decoder, loc: torch.Tensor) -> torch.Tensor:
    """The rows at ``loc`` of every layer's pools ``[layers, pools, T, ...]`` (k and v, or the MLA latent pool);
    fp8 pools (k and v) dequantised."""
    rows = torch.stack([torch.stack([c[loc] for c in caches]) for caches in model.caches()])
    if rows.dtype == torch.uint8:
        return rows.view(FP8).float() * torch.tensor(FP8_SCALES, device=rows.device).view(1, 2, 1, 1, 1)
    return rows


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, tol: tuple[float, float] = OUT_TOL) -> bool:
    atol, rtol = tol
    return bool(torch.isfinite(a).all()) and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# Compiling, timing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompileLog:
    """What the calls that compiled cost, for one side and one mode."""

    graphs: int = 0
    wall_s: float = 0.0
    pass_us: int = 0
    pass_full_gc_us: int = 0  # of pass_us: Python's full garbage collections that fell inside the pass
    fused: int = 0
    not_fused: int = 0
    pass_graphs: int = 0
    cudagraph_skips: int = 0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # unfused site -> count


class ReasonLog(logging.Handler):
    """Keeps the reason of every site the pass did not fuse (the ``fx_fusion_site`` of its per-site INFO record)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        site = getattr(record, "fx_fusion_site", None)
        if site is not None and not site.fused:
            self.reasons.append(str(site.reason))


REASONS = ReasonLog()  # installed on the "fx_fusion" logger by main()


class PassGC:
    """Python's cyclic garbage collector while the fusion pass runs (``install`` once per process).

    A full collection scans the whole compile's heap (hundreds of thousands of objects at full depth, 0.3-0.5 s)
    and lands in whichever code allocates when it is due, sometimes the pass; its time is counted here so that
    the pass's share can be read with and without it. ``seconds``/``calls``: every collection inside the pass;
    ``full_seconds``/``full``: those of the oldest generation.
    """

    in_pass = False
    start = 0.0
    seconds = full_seconds = 0.0
    calls = full = 0

    @classmethod
    def install(cls) -> None:
        from fx_fusion.fusion_pass import RopeKVFusionPass

        if getattr(RopeKVFusionPass.__call__, "_watched", False):
            return
        call = RopeKVFusionPass.__call__

        def watched(self, graph):
            cls.in_pass = True
            try:
                return call(self, graph)
            finally:
                cls.in_pass = False

        watched._watched = True
        RopeKVFusionPass.__call__ = watched
        gc.callbacks.append(cls._callback)

    @classmethod
    def _callback(cls, phase: str, info: dict) -> None:
        if not cls.in_pass:
            return
        if phase == "start":
            cls.start = time.perf_counter()
            return
        seconds = time.perf_counter() - cls.start
        cls.seconds += seconds
        cls.calls += 1
        if info["generation"] == 2:
            cls.full_seconds += seconds
            cls.full += 1


def _snapshot() -> dict:
    fx = counters["fx_fusion"]
    return dict(graphs=counters["stats"]["unique_graphs"], pass_graphs=fx["graphs"], pass_us=fx["pass_us"],
                pass_full_gc_us=int(1e6 * PassGC.full_seconds),
                fused=fx["rope_kv_store_fused"], not_fused=fx["rope_kv_store_not_fused"],
                cudagraph_skips=counters["inductor"]["cudagraph_skips"])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(fn, args):
    if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()
    return fn(*args)


def call_logged(fn, args, log: CompileLog, per_graph: list, device):
    """Call ``fn``; if that compiled, add its wall time and the pass's counters to ``log``."""
    before = _snapshot()
    n_reasons = len(REASONS.reasons)
    start = time.perf_counter()
    out = step(fn, args)
    sync(device)
    wall = time.perf_counter() - start
    after = _snapshot()
    delta = {k: after[k] - before[k] for k in after}
    if delta["graphs"]:
        log.graphs += delta["graphs"]
        log.wall_s += wall
        log.pass_us += delta["pass_us"]
        log.pass_full_gc_us += delta["pass_full_gc_us"]
        log.fused += delta["fused"]
        log.not_fused += delta["not_fused"]
        log.pass_graphs += delta["pass_graphs"]
        log.cudagraph_skips += delta["cudagraph_skips"]
        log.reasons.update(REASONS.reasons[n_reasons:])
        if delta["pass_graphs"]:
            per_graph.append((delta["fused"], delta["not_fused"], delta["pass_graphs"]))
    return out


def time_steps(fn, args, n: int, device, before=None) -> list[float]:
    """Milliseconds of each of ``n`` steps: CUDA events around every call (wall clock on CPU).

    ``before()``, if given, runs before each step, outside the timed interval (HF caches rewind there)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            if before is not None:
                before()
            start.record()
            step(fn, args)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    out = []
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter()
        step(fn, args)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclasses.dataclass
class Timing:
    ms: list[float]

    @property
    def median(self) -> float:
        return quantile(self.ms, 0.5)

    def spread(self) -> tuple[float, float]:
        return quantile(self.ms, 0.1), quantile(self.ms, 0.9)


def interleaved_timing(fns: dict, args, steps: int, blocks: int, device, before=None) -> dict[str, Timing]:
    """``steps`` timed steps per side, in ``blocks`` alternating blocks (clock and thermal drift hit both)."""
    per_block = max(1, math.ceil(steps / blocks))
    out = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            out[name] += time_steps(fn, args, per_block, device, before)
    return {name: Timing(ms) for name, ms in out.items()}


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    model: str
    point: str  # "batch 16" / "2048 tokens"
    stock: Timing
    fused: Timing
    equal: bool
    fused_sites: str
    detail: str
    sites_required: bool = True  # False: fused sites are reported, a shortfall does not fail the run


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    decode_mode: str | None
    decode_batches: list[int]
    past: int
    prefill_tokens: list[int]
    steps: int
    warmup: int
    blocks: int
    prefill_steps: int
    max_pos: int
    static_shapes: bool
    smoke: bool
    fx_options: dict = dataclasses.field(default_factory=dict)  # --fx-options: the fx_fusion side's options=
    hf_decode_batches: list[int] = dataclasses.field(default_factory=lambda: list(HF_BATCHES))  # model d
    hf_prefill_tokens: list[int] = dataclasses.field(default_factory=lambda: list(HF_PREFILL))


def sdpa_backend(spec: Spec, s: Settings, batch: int, tq: int, kv_len: int) -> tuple[bool, str]:
    """Whether SDPA with ``enable_gqa=True`` and a boolean mask avoids the math kernel; the backend's name."""
    if spec.n_q == spec.n_kv:
        return True, "-"
    q = torch.empty(batch, spec.n_q, tq, spec.head_dim, dtype=s.dtype, device=s.device)
    k = torch.empty(batch, kv_len, spec.n_kv, spec.head_dim, dtype=s.dtype, device=s.device).transpose(1, 2)
    mask = torch.ones(batch, 1, tq, kv_len, dtype=torch.bool, device=s.device)
    try:
        choice = torch._fused_sdp_choice(q, k, k, mask, 0.0, False, enable_gqa=True)
        name = torch.nn.attention.SDPBackend(choice).name
    except Exception as e:  # an older or newer signature: repeat the kv heads, which always works
        return False, f"unknown ({type(e).__name__})"
    return name != "MATH" or s.device.type != "cuda", name


def fx_backend(s: Settings):
    """The fx_fusion side's backend: ``"fx_fusion"``, or with ``--fx-options`` the same backend made by ``make_backend``
    with those options (``torch.compile`` refuses ``mode`` together with ``options``)."""
    if not s.fx_options:
        return "fx_fusion"
    from fx_fusion.backend import make_backend
    from fx_fusion.config import FusionConfig, split_options

    ours, inductor = split_options(s.fx_options)
    return make_backend(FusionConfig(**ours), inductor)


def parse_fx_options(values: list[str]) -> dict:
    """``--fx-options KEY=VALUE ...``: each value a Python literal (``False``, ``2``, ``'x'``), else a string."""
    out = {}
    for item in values or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--fx-options: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def decode_kv_len(past: int) -> int:
    return 64 * math.ceil((past + 1) / 64)


def run_model(spec: Spec, layers: int, s: Settings, rows: dict, compile_rows: list, log) -> None:
    hidden, intermediate = spec.hidden, spec.intermediate
    kv_len = decode_kv_len(s.past)
    num_slots = max(max(s.decode_batches, default=1) * kv_len, max(s.prefill_tokens, default=1))
    gqa_decode, backend_decode = sdpa_backend(spec, s, max(s.decode_batches, default=1), 1, kv_len)
    gqa_prefill, backend_prefill = sdpa_backend(spec, s, 1, max(s.prefill_tokens, default=1),
                                                max(s.prefill_tokens, default=1))
    gqa = gqa_decode and gqa_prefill
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Decoder(spec, layers, hidden, intermediate, num_slots, s.max_pos, gqa, s.dtype, s.device).eval()
    for caches in model.caches():
        for c in caches:
            torch._dynamo.mark_static_address(c)
    params = sum(p.numel() for p in model.parameters())
    cache_bytes = sum(c.numel() * c.element_size() for caches in model.caches() for c in caches)
    log(f"\n## model {spec.key}: {spec.name} — {layers} layers"
        + (f" (the real model has {spec.layers})" if layers != spec.layers else "")
        + f", {spec.n_q} q / {spec.n_kv} kv heads, head_dim {spec.head_dim}, hidden {hidden}, "
          f"SwiGLU intermediate {intermediate}, {params / 1e9:.2f} B params, KV pool {num_slots} slots "
          f"({cache_bytes / 2**30:.2f} GiB)")
    store = ("fp8: k_buffer[loc] = k.div(k_scale).to(float8_e4m3fn).view(uint8), uint8 pool, scales "
             f"{FP8_SCALES}" if spec.fp8_cache else "k_buffer[loc] = k")
    if spec.mla:
        store = f"MLA latent pool [slots, 1, {spec.mla[0]} + {spec.mla[2]}]: kv_pool[loc] = cat([kv_c, k_pe])"
    log(f"   cache: token pool [slots, Hkv, D] (SGLang style, {store}); attention: "
        + ("SDPA(enable_gqa=True)" if gqa else "repeat_interleave kv heads + SDPA")
        + f" with a bool mask; SDPA backend for GQA: decode {backend_decode}, prefill {backend_prefill}")

    out_tol, row_tol = OUT_TOL, OUT_TOL
    if spec.fp8_cache:
        out_tol, row_tol = FP8_OUT_TOL, (OUT_TOL[0], FP8_ROW_RTOL)

    def check(fns, args, seed_base):
        """Fill caches, one step per side (and eagerly); compare outputs and written rows."""
        loc = args[2]
        results = {}
        for name, fn in (*fns.items(), ("eager", model)):
            fill_caches(model, seed_base)
            out = step(fn, args).clone()
            sync(s.device)
            intact = untouched_rows_intact(model, seed_base, loc) if name == "fx_fusion" else True
            results[name] = (out, written_rows(model, loc), intact)
        (o_s, r_s, _), (o_f, r_f, intact), (o_e, r_e, _) = results["stock"], results["fx_fusion"], results["eager"]
        equal = close(o_f, o_s, out_tol) and close(r_f, r_s, row_tol) and intact
        detail = (f"max|fx-stock| out {max_err(o_f, o_s):.3g} cache rows {max_err(r_f, r_s):.3g}; "
                  f"max|stock-eager| out {max_err(o_s, o_e):.3g}; max|fx-eager| out {max_err(o_f, o_e):.3g} "
                  f"cache rows {max_err(r_f, r_e):.3g}; "
                  f"other cache rows {'untouched' if intact else 'CHANGED'}")
        return equal, detail

    with torch.no_grad():
        # ---- decode -----------------------------------------------------------------------------
        dynamic = False if s.static_shapes else None
        mode = s.decode_mode
        fns = {"stock": torch.compile(model, mode=mode, fullgraph=True, dynamic=dynamic),
               "fx_fusion": torch.compile(model, backend=fx_backend(s), mode=mode, fullgraph=True, dynamic=dynamic)}
        logs = {name: CompileLog() for name in fns}
        per_graph = {name: [] for name in fns}
        for batch in s.decode_batches:
            args = decode_inputs(batch, s.past, kv_len, hidden, s.dtype, s.device, seed=batch)
            if batch > 1 and not s.static_shapes:
                mark_token_dim_dynamic(args, decode=True)
            fill_caches(model, 1)
            for name in ("fx_fusion", "stock"):  # fx_fusion first: caches warmed by it only help stock
                t0 = time.perf_counter()
                call_logged(fns[name], args, logs[name], per_graph[name], s.device)
                for _ in range(s.warmup):
                    step(fns[name], args)
                sync(s.device)
                log(f"   decode batch {batch}: {name} ready in {time.perf_counter() - t0:.1f} s")
            t = interleaved_timing(fns, args, s.steps, s.blocks, s.device)
            equal, detail = check(fns, args, seed_base=100 + batch)
            sites = _sites(per_graph["fx_fusion"], layers)
            rows["decode"].append(Row(spec.key, f"batch {batch}", t["stock"], t["fx_fusion"], equal, sites, detail,
                                      sites_required=not spec.fp8_cache))
            log(f"   decode batch {batch}: stock {t['stock'].median:.3f} ms, fx_fusion {t['fx_fusion'].median:.3f} ms;"
                f" {detail}")
        compile_rows.append((spec.key, f"decode ({mode or 'default'})", logs, per_graph, layers))

        # ---- prefill ----------------------------------------------------------------------------
        fns = {"stock": torch.compile(model, fullgraph=True, dynamic=dynamic),
               "fx_fusion": torch.compile(model, backend=fx_backend(s), fullgraph=True, dynamic=dynamic)}
        logs = {name: CompileLog() for name in fns}
        per_graph = {name: [] for name in fns}
        for tokens in s.prefill_tokens:
            args = prefill_inputs(tokens, hidden, s.dtype, s.device, seed=tokens)
            if not s.static_shapes and tokens > 1:
                mark_token_dim_dynamic(args, decode=False)
            fill_caches(model, 2)
            for name in ("fx_fusion", "stock"):
                t0 = time.perf_counter()
                call_logged(fns[name], args, logs[name], per_graph[name], s.device)
                for _ in range(max(1, s.warmup // 4)):
                    step(fns[name], args)
                sync(s.device)
                log(f"   prefill {tokens} tokens: {name} ready in {time.perf_counter() - t0:.1f} s")
            t = interleaved_timing(fns, args, s.prefill_steps, min(s.blocks, s.prefill_steps), s.device)
            equal, detail = check(fns, args, seed_base=200 + tokens)
            sites = _sites(per_graph["fx_fusion"], layers)
            rows["prefill"].append(Row(spec.key, f"{tokens} tokens", t["stock"], t["fx_fusion"], equal, sites,
                                       detail, sites_required=not spec.fp8_cache))
            log(f"   prefill {tokens} tokens: stock {t['stock'].median:.3f} ms, "
                f"fx_fusion {t['fx_fusion'].median:.3f} ms; {detail}")
        compile_rows.append((spec.key, "prefill (default)", logs, per_graph, layers))

    del fns, model
    torch._dynamo.reset()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Model d: Hugging Face GptOssForCausalLM through HF's StaticCache
# --------------------------------------------------------------------------------------------------

HF_NAME = "gpt-oss-20b, Hugging Face GptOssForCausalLM"
HF_LAYERS = 24  # the real model's
HF_DEFAULT_LAYERS = 8  # estimated (not yet timed) to compile both sides' three graphs in 2-3 minutes on an H200
HF_BATCHES, HF_PREFILL = [1, 16], [2048]
HF_ROUTING_SLACK = 1.5  # model d past layer 0: fx_fusion's distance from eager against stock's (see check)
HF_SMOKE_BATCHES, HF_SMOKE_PREFILL = [1], [24]  # 24 > the smoke window (16), as 2048 > 128


def hf_config(transformers, layers: int, smoke: bool):
    """gpt-oss-20b's shapes (its published config), or a tiny one for --smoke; eager attention (gpt-oss has
    attention sinks, which SDPA lacks); YaRN rope scaling from ``GptOssConfig``'s defaults, which are 20b's."""
    if smoke:
        sizes = dict(vocab_size=256, hidden_size=SMOKE_HIDDEN, intermediate_size=SMOKE_INTERMEDIATE,
                     num_attention_heads=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=16, max_position_embeddings=4096)
    else:
        sizes = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                     num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                     max_position_embeddings=131072)
    return transformers.GptOssConfig(
        **sizes, head_dim=64, num_hidden_layers=layers,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        attn_implementation="eager")


def hf_model(transformers, config, device):
    """Random weights, built in bf16 on ``device``; the modules HF keeps in fp32 when loading (the norms) in fp32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            module.float()
    return model.eval()


class HFState:
    """One ``StaticCache``, made as HF's docs make it (``StaticCache(config=..., max_cache_len=...)``, no early
    initialisation), allocated by a first, eager call with ``batch`` tokens (as ``generate`` runs its prefill
    eagerly), then rewound before every step to ``length`` cached tokens: each timed step decodes (or
    prefills) at the same position, as the SGLang-style models rewrite the same slots."""

    def __init__(self, transformers, model, batch: int, max_cache_len: int, device):
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.cache_arg = ("cache" if "cache" in inspect.signature(type(model).forward).parameters
                          else "past_key_values")  # renamed during transformers 5.x
        ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        layers = getattr(self.cache, "layers", None)
        if not layers or not all(hasattr(layer, "cumulative_length") for layer in layers):
            raise RuntimeError(f"transformers {transformers.__version__}: StaticCache layers without "
                               "`cumulative_length`; model d needs the StaticCache of transformers 5.x")

    def call(self, fn):
        """``fn`` (the model, eager or compiled) as ``f(input_ids) -> logits``."""
        kwargs = {self.cache_arg: self.cache, "use_cache": True, "logits_to_keep": 1}
        return lambda ids: fn(input_ids=ids, **kwargs).logits

    def rewind(self, length: int) -> None:
        for layer in self.cache.layers:
            if hasattr(layer, "cumulative_length_int"):  # sliding window: a Python int decides full or not
                layer.cumulative_length_int = length
                layer.cumulative_length.fill_(min(length, layer.max_cache_len))
            else:
                layer.cumulative_length.fill_(length)

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def fill(self, seed: int) -> None:
        for i, t in enumerate(self.tensors()):
            t.copy_(random_like(t, seed * 1000 + i))


def run_hf_gpt_oss(layers: int, s: Settings, rows: dict, compile_rows: list, log) -> str | None:
    """Model d; returns why it was skipped, or None."""
    try:
        import transformers
    except ImportError:
        return "transformers not installed"
    if not hasattr(transformers, "GptOssForCausalLM"):
        return f"transformers {transformers.__version__} has no GptOssForCausalLM"
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = hf_config(transformers, layers, s.smoke)
    model = hf_model(transformers, config, s.device)
    params = sum(p.numel() for p in model.parameters())
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    experts_impl = getattr(config, "_experts_implementation", None)
    log(f"\n## model d: {HF_NAME} — {layers} layers"
        + (f" (the real model has {HF_LAYERS}; --layers d={HF_LAYERS} for all)" if layers != HF_LAYERS else "")
        + f", {config.num_attention_heads} q / {config.num_key_value_heads} kv heads, head_dim {config.head_dim}, "
          f"hidden {config.hidden_size}, {config.num_local_experts} experts top-{config.num_experts_per_tok} "
          f"(experts_implementation {experts_impl!r}), {params / 1e9:.2f} B params incl. embedding and LM head; "
          f"transformers {transformers.__version__}")
    log(f"   layers {config.layer_types[:2]} alternating, sliding window {config.sliding_window}; rope {rope}; "
        "attention 'eager' (sinks); cache: HF StaticCache [B, Hkv, max_cache_len, D] (index_copy_; sliding "
        "layers once full: roll + write + copy_, and a prefill past the window: copy_ of its last tokens); static shapes (one graph per batch / token count); "
        "logits of the last token only (logits_to_keep=1)")

    def check(fns, state: HFState, ids, length: int, seed: int):
        """Layer 0's caches must match tightly: nothing but attention and norms comes before its store. Later
        layers' caches and the logits pass through random-weight MoE layers, whose top-k routing can flip
        between near-tied experts on rounding differences (stock flips against eager too): they must be
        within ``HF_ROUTING_SLACK`` times stock's distance from eager, and each layer's error is printed.
        (Which compiled side lands nearer eager is a coin flip once a routing flips: a 2048-token prefill
        measured fx_fusion 1.16 from eager against stock's 1.14, with layer 0 equal.)"""
        results = {}
        for name, fn in (*fns.items(), ("eager", state.call(model))):
            state.fill(seed)
            state.rewind(length)
            out = step(fn, (ids,)).clone()
            sync(s.device)
            results[name] = (out, [t.clone() for t in state.tensors()])
        (o_s, c_s), (o_f, c_f), (o_e, c_e) = results["stock"], results["fx_fusion"], results["eager"]
        per_layer = [max(max_err(c_f[i], c_s[i]), max_err(c_f[i + 1], c_s[i + 1])) for i in range(0, len(c_f), 2)]
        cache_err = lambda a, b: max(max_err(x, y) for x, y in zip(a, b))  # noqa: E731
        equal = (close(c_f[0], c_s[0]) and close(c_f[1], c_s[1])
                 and (close(o_f, o_s) or max_err(o_f, o_e) <= HF_ROUTING_SLACK * max_err(o_s, o_e))
                 and (close(torch.cat([t.flatten() for t in c_f]), torch.cat([t.flatten() for t in c_s]))
                      or cache_err(c_f, c_e) <= HF_ROUTING_SLACK * cache_err(c_s, c_e)))
        detail = (f"max|fx-stock| logits {max_err(o_f, o_s):.3g}, caches per layer "
                  f"{' '.join(f'{e:.3g}' for e in per_layer)}; max|stock-eager| logits {max_err(o_s, o_e):.3g} "
                  f"caches {cache_err(c_s, c_e):.3g}; max|fx-eager| logits {max_err(o_f, o_e):.3g} "
                  f"caches {cache_err(c_f, c_e):.3g}")
        return equal, detail

    def measure(kind, fns, logs, per_graph, state: HFState, ids, length, point, steps, warmup, seed):
        rewind = lambda: state.rewind(length)  # noqa: E731
        for name in ("fx_fusion", "stock"):
            t0 = time.perf_counter()
            rewind()
            call_logged(fns[name], (ids,), logs[name], per_graph[name], s.device)
            for _ in range(warmup):
                rewind()
                step(fns[name], (ids,))
            sync(s.device)
            log(f"   {kind} {point}: {name} ready in {time.perf_counter() - t0:.1f} s")
        t = interleaved_timing(fns, (ids,), steps, min(s.blocks, steps), s.device, before=rewind)
        equal, detail = check(fns, state, ids, length, seed)
        sites = _sites(per_graph["fx_fusion"], layers)
        rows[kind].append(Row("d", point, t["stock"], t["fx_fusion"], equal, sites, detail, sites_required=False))
        log(f"   {kind} {point}: stock {t['stock'].median:.3f} ms, fx_fusion {t['fx_fusion'].median:.3f} ms; "
            f"fused sites {sites}; {detail}")

    gen = torch.Generator(s.device).manual_seed(0)
    with torch.no_grad():
        # ---- decode: one cache per batch size, rewound to --past cached tokens before every step ---------
        mode = s.decode_mode
        compiled = {"stock": torch.compile(model, mode=mode, fullgraph=True, dynamic=False),
                    "fx_fusion": torch.compile(model, backend=fx_backend(s), mode=mode, fullgraph=True,
                                               dynamic=False)}
        logs = {name: CompileLog() for name in compiled}
        per_graph = {name: [] for name in compiled}
        for batch in s.hf_decode_batches:
            state = HFState(transformers, model, batch, decode_kv_len(s.past), s.device)
            fns = {name: state.call(fn) for name, fn in compiled.items()}
            ids = torch.randint(0, config.vocab_size, (batch, 1), generator=gen, device=s.device)
            state.fill(1)
            measure("decode", fns, logs, per_graph, state, ids, s.past, f"batch {batch}", s.steps, s.warmup,
                    seed=100 + batch)
            del state, fns
        compile_rows.append(("d", f"decode ({mode or 'default'})", logs, per_graph, layers))

        # ---- prefill: one batch-1 cache, rewound to empty before every step ------------------------------
        compiled = {"stock": torch.compile(model, fullgraph=True, dynamic=False),
                    "fx_fusion": torch.compile(model, backend=fx_backend(s), fullgraph=True, dynamic=False)}
        logs = {name: CompileLog() for name in compiled}
        per_graph = {name: [] for name in compiled}
        state = HFState(transformers, model, 1, max(s.hf_prefill_tokens), s.device)
        fns = {name: state.call(fn) for name, fn in compiled.items()}
        for tokens in s.hf_prefill_tokens:
            ids = torch.randint(0, config.vocab_size, (1, tokens), generator=gen, device=s.device)
            state.fill(2)
            measure("prefill", fns, logs, per_graph, state, ids, 0, f"{tokens} tokens", s.prefill_steps,
                    max(1, s.warmup // 4), seed=200 + tokens)
        compile_rows.append(("d", "prefill (default)", logs, per_graph, layers))

    del compiled, fns, state, model
    torch._dynamo.reset()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return None


def _sites(per_graph: list, layers: int) -> str:
    """'36/36' when every graph the fx_fusion side compiled fused one site per layer; else what it did."""
    if not per_graph:
        return "NO GRAPH"
    if all(f == layers * g and nf == 0 for f, nf, g in per_graph):
        return f"{layers}/{layers}" + (f" x{len(per_graph)} graphs" if len(per_graph) > 1 else "")
    return "MISMATCH " + ", ".join(f"{f}/{layers * g}" + (f" (+{nf} refused)" if nf else "") for f, nf, g in per_graph)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def print_tables(rows: dict, compile_rows: list, s: Settings, header: list[str], skipped: dict) -> None:
    print()
    print("\n".join(header))
    note = " (CPU smoke run: timings say nothing)" if s.device.type != "cuda" else ""
    print(f"\n### Decode step latency, ms{note}: median (p10-p90) over {s.steps} steps per side, "
          f"past length {s.past}, mode={s.decode_mode!r}")
    print("| model | batch | stock median (p10-p90) | fx_fusion median (p10-p90) | speed-up % | outputs equal "
          "| fused sites |")
    print("|---|---|---|---|---|---|---|")
    for r in rows["decode"]:
        print(f"| {r.model} | {r.point.split()[1]} | {_fmt(r.stock)} | {_fmt(r.fused)} | "
              f"{100 * (r.stock.median / r.fused.median - 1):+.1f} | {'yes' if r.equal else 'NO'} | {r.fused_sites} |")
    print(f"\n### Prefill throughput, tokens/s{note}: median (p10-p90) over {s.prefill_steps} steps per side, "
          "batch 1, default mode")
    print("| model | tokens | stock median (p10-p90) | fx_fusion median (p10-p90) | speed-up % | outputs equal "
          "| fused sites |")
    print("|---|---|---|---|---|---|---|")
    for r in rows["prefill"]:
        tokens = int(r.point.split()[0])
        print(f"| {r.model} | {tokens} | {_fmt_tput(r.stock, tokens)} | {_fmt_tput(r.fused, tokens)} | "
              f"{100 * (r.stock.median / r.fused.median - 1):+.1f} | {'yes' if r.equal else 'NO'} | {r.fused_sites} |")
    print("\n### Compile time: calls that compiled (first call of a shape; includes one run), wall seconds")
    print("| model | mode | graphs stock / fx_fusion | stock s | fx_fusion s | fusion pass ms | pass share % "
          "| of it full gc ms | share without it % | fused sites per graph | CUDA-graph skips stock / fx_fusion |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for key, mode, logs, per_graph, layers in compile_rows:
        st, fx = logs["stock"], logs["fx_fusion"]
        if st.graphs != fx.graphs:
            notes.append(f"- {key} {mode}: fx_fusion compiled {fx.graphs} graphs where stock compiled {st.graphs}: "
                         "a recompile (TORCH_LOGS=recompiles names the guard)")
        share = 100 * fx.pass_us / (1e6 * fx.wall_s) if fx.wall_s else float("nan")
        bare = 100 * (fx.pass_us - fx.pass_full_gc_us) / (1e6 * fx.wall_s) if fx.wall_s else float("nan")
        print(f"| {key} | {mode} | {st.graphs} / {fx.graphs} | {st.wall_s:.1f} | {fx.wall_s:.1f} | "
              f"{fx.pass_us / 1e3:.0f} | {share:.2f} | {fx.pass_full_gc_us / 1e3:.0f} | {bare:.2f} | "
              f"{_sites(per_graph['fx_fusion'], layers)} | "
              f"{st.cudagraph_skips} / {fx.cudagraph_skips} |")
    if notes:
        print("\n".join(["", *notes]))
    unfused = [(key, mode, logs["fx_fusion"].reasons) for key, mode, logs, _, _ in compile_rows
               if logs["fx_fusion"].reasons]
    if unfused:
        print("\n### Sites the fx_fusion side did not fuse, with the pass's reasons (count over its graphs)")
        for key, mode, reasons in unfused:
            for reason, n in reasons.most_common():
                print(f"- {key} {mode}: {n} x {reason}")
    print("\n### Checks per point")
    for kind in ("decode", "prefill"):
        for r in rows[kind]:
            print(f"- {r.model} {kind} {r.point}: {'ok' if r.equal else 'MISMATCH'}; {r.detail}")
    for key, why in skipped.items():
        print(f"- model {key}: skipped: {why}")


def _fmt(t: Timing) -> str:
    lo, hi = t.spread()
    return f"{t.median:.3f} ({lo:.3f}-{hi:.3f})"


def _fmt_tput(t: Timing, tokens: int) -> str:
    lo, hi = t.spread()
    return f"{tokens / t.median * 1e3:,.0f} ({tokens / hi * 1e3:,.0f}-{tokens / lo * 1e3:,.0f})"


MODELS = [*SPECS, "d"]


def parse_layers(values: list[str], models: list[str]) -> dict[str, int]:
    """``--layers 16`` (every model) or ``--layers c=16 a=12``."""
    out = {}
    for v in values or []:
        key, _, n = v.rpartition("=")
        targets = [key] if key else models
        for t in targets:
            if t not in MODELS:
                raise SystemExit(f"--layers: unknown model {t!r} in {v!r}")
            out[t] = int(n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", nargs="+", default=["a", "b", "c"], choices=MODELS,
                    help="a: gpt-oss-120b TP-8 shard, b: gpt-oss-20b, c: Llama-3-8B (the default three); "
                         "a-fp8: model a with an fp8 KV pool; f: Qwen3-8B (QK-norm); "
                         "d: Hugging Face GptOssForCausalLM at gpt-oss-20b "
                         f"sizes ({HF_DEFAULT_LAYERS} of {HF_LAYERS} layers unless --layers d=N)")
    ap.add_argument("--layers", nargs="+", metavar="[MODEL=]N", help="fewer layers: N for all, or e.g. c=16")
    ap.add_argument("--decode-batches", nargs="+", type=int,
                    help="default 1 16 64 (model d: 1 16)")
    ap.add_argument("--past", type=int, help="tokens already cached per sequence at decode (default 1024)")
    ap.add_argument("--prefill-tokens", nargs="+", type=int, help="default 2048 8192 (model d: 2048)")
    ap.add_argument("--steps", type=int, help="timed decode steps per side and batch (default 120)")
    ap.add_argument("--prefill-steps", type=int,
                    help="timed prefill steps per side and size (default 40: host-bound prefills are noisy)")
    ap.add_argument("--static-shapes", action="store_true", help="one compile per shape (dynamic=False)")
    ap.add_argument("--decode-mode", choices=["reduce-overhead", "default"],
                    help="decode with CUDA graphs (reduce-overhead, the default on a GPU) or without (default)")
    ap.add_argument("--smoke", action="store_true", help="2 layers, tiny hidden size, few steps (CPU ok)")
    ap.add_argument("--fx-options", nargs="+", metavar="KEY=VALUE",
                    help="options= of the fx_fusion side (FusionConfig fields, Inductor config), e.g. min_tokens=2")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke
    s = Settings(
        device=device, dtype=torch.bfloat16,
        decode_mode=None if (args.decode_mode == "default" or not cuda) else "reduce-overhead",
        decode_batches=args.decode_batches or ([1, 3] if smoke else [1, 16, 64]),
        past=args.past if args.past is not None else (40 if smoke else 1024),
        prefill_tokens=args.prefill_tokens or ([16, 24] if smoke else [2048, 8192]),
        steps=args.steps or (2 if smoke else 120), warmup=1 if smoke else 10, blocks=2 if smoke else 4,
        prefill_steps=args.prefill_steps or (1 if smoke else 40),
        max_pos=1024 if smoke else 131072, static_shapes=args.static_shapes, smoke=smoke,
        fx_options=parse_fx_options(args.fx_options),
        hf_decode_batches=args.decode_batches or (HF_SMOKE_BATCHES if smoke else HF_BATCHES),
        hf_prefill_tokens=args.prefill_tokens or (HF_SMOKE_PREFILL if smoke else HF_PREFILL))
    layers = parse_layers(args.layers, args.models)
    reasons_logger = logging.getLogger("fx_fusion")
    reasons_logger.addHandler(REASONS)
    PassGC.install()
    if reasons_logger.getEffectiveLevel() > logging.INFO:
        reasons_logger.setLevel(logging.INFO)  # the pass logs each unfused site's reason at INFO

    torch._inductor.config.fx_graph_cache = False  # each side really compiles, and the pass really runs
    torch._functorch.config.enable_autograd_cache = False
    for name in ("recompile_limit", "cache_size_limit"):  # 4 compiled wrappers share Decoder.forward
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
            break

    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    header = [
        "# fx_fusion end to end: stock torch.compile vs backend=\"fx_fusion\", same mode, one process",
        f"- device: {card}; torch {torch.__version__}; triton {triton.__version__}; Python {platform.python_version()}",
        f"- command: python {' '.join(shlex.quote(a) for a in sys.argv)}",
        f"- dtype bf16; random weights; decode past length {s.past}; shapes: "
        + ("one static graph per shape" if s.static_shapes else
           "decode: batch 1 static + one graph with a dynamic batch for batch >= 2, prefill: one dynamic graph")
        + " (models a, b, c, a-fp8, f; model d: one static graph per shape)",
        "- cache: token-indexed pool (SGLang style) for models a, b, c, f (a-fp8: fp8 bytes in a uint8 pool; f: "
        "Qwen3's QK-norm before the RoPE); "
        "no embedding / LM head. Model d: HF's own StaticCache, embedding and LM head (last token), static shapes",
    ]
    if s.fx_options:
        header.append(f"- fx_fusion side compiled with options={s.fx_options!r}")
    if smoke:
        header.append(f"- SMOKE: {SMOKE_LAYERS} layers, hidden {SMOKE_HIDDEN}, intermediate {SMOKE_INTERMEDIATE}, "
                      "fewer heads (same head_dim)"
                      + ("; CPU: no CUDA graphs, Triton interpreted, timings meaningless" if not cuda else ""))
    print("\n".join(header), flush=True)

    rows = {"decode": [], "prefill": []}
    compile_rows = []
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg.lstrip()}" if not msg.startswith("\n") else msg,
              flush=True)

    crashed, skipped = [], {}
    for key in args.models:
        try:
            if key == "d":
                why = run_hf_gpt_oss(layers.get(key, SMOKE_LAYERS if smoke else HF_DEFAULT_LAYERS), s, rows,
                                     compile_rows, log)
                if why:
                    skipped[key] = why
                    log(f"\n## model d: {HF_NAME} — skipped: {why}")
                continue
            spec = SPECS[key].smoke() if smoke else SPECS[key]
            run_model(spec, layers.get(key, spec.layers), s, rows, compile_rows, log)
        except Exception:  # report it, keep the other models' numbers
            traceback.print_exc()
            crashed.append(key)
            torch._dynamo.reset()
            if cuda:
                torch.cuda.empty_cache()
    print_tables(rows, compile_rows, s, header, skipped)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    bad = [f"{r.model} {r.point}" for kind in rows.values() for r in kind
           if not r.equal or (r.sites_required and not r.fused_sites[0].isdigit())]
    bad += [f"model {key} crashed (traceback above)" for key in crashed]
    if bad:
        print(f"FAILED checks: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
