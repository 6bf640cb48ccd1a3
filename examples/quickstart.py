"""Quick start: compile a small SGLang-style decoder with fx_fusion and check it against eager.

    python examples/quickstart.py                 # CPU: the Triton kernel runs in the interpreter
    python examples/quickstart.py --device cuda   # GPU

The model is written the way SGLang writes its models: a fused qkv projection split into q, k, v,
``cos_sin_cache.index_select(0, positions)`` chunked into cos and sin, NeoX rotary embedding on
``[tokens, heads, head_dim]`` views, and a token-indexed KV pool written as ``k_buffer[loc] = k``.
Nothing in it knows about fx_fusion: the compiler pass finds "RoPE -> reshape -> KV store" in every
layer and replaces it by one ``torch.ops.fx_fusion.rope_kv_store`` call.
"""

# %%
# Set-up
# ------
# On a machine without a GPU the fused op runs its real Triton kernel through the Triton interpreter.
# Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so it must be set before fx_fusion (or
# triton) is imported. On CUDA it stays unset.

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--prompt-len", type=int, default=8)
parser.add_argument("--new-tokens", type=int, default=4)
parser.add_argument("--dump-dir", default=None, help="where fx_fusion writes its graph dumps (default: a temp dir)")
args = parser.parse_args()

if args.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fx_fusion  # noqa: E402  (registers backend="fx_fusion"; `pip install -e .` first)

if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda: no CUDA device is available")
device = torch.device(args.device)


# %%
# The model
# ---------
# A token pool as SGLang keeps it: one ``[num_slots, kv_heads, head_dim]`` tensor per layer for k and
# for v. A request owns a row of ``req_to_token`` (its slots, one per position); ``out_cache_loc``
# are the slots of the tokens of this forward pass. Slots are handed out scattered, so a store to the
# wrong row would show when the pools are compared.


class TokenToKVPool:
    """Per layer ``k_buffer[layer]`` / ``v_buffer[layer]`` of shape ``[num_slots, kv_heads, head_dim]``."""

    def __init__(self, num_layers, num_slots, num_kv_heads, head_dim, dtype, device):
        shape = (num_slots, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v


@dataclass
class ForwardBatch:
    """What one forward pass of one request needs besides the hidden states."""

    positions: torch.Tensor  # [T] position of each new token
    out_cache_loc: torch.Tensor  # [T] slot of each new token
    req_to_token: torch.Tensor  # [max_len] slot of every position of the request
    pool: TokenToKVPool


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """NeoX rotary embedding with a ``[max_pos, head_dim]`` table: cos of every frequency, then sin."""

    def __init__(self, head_dim, max_pos, base=10000.0):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions, q, k):
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [T, D/2] each
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        out = []
        for x in (q, k):
            x = x.view(positions.shape[0], -1, self.head_dim)  # [T, H, D]
            x1, x2 = x.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            out.append(rotated.flatten(-2))  # back to [T, H*D]
        return out[0], out[1]


class Attention(nn.Module):
    def __init__(self, layer_id, hidden, num_heads, num_kv_heads, head_dim, max_pos):
        super().__init__()
        self.layer_id, self.num_heads, self.num_kv_heads, self.head_dim = layer_id, num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.rotary_emb = RotaryEmbedding(head_dim, max_pos)

    def forward(self, hidden, batch: ForwardBatch):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(batch.positions, q, k)
        # RoPE -> reshape -> KV store: the three steps fx_fusion fuses into one kernel
        batch.pool.set_kv_buffer(self.layer_id, batch.out_cache_loc,
                                 k.view(-1, self.num_kv_heads, self.head_dim),
                                 v.view(-1, self.num_kv_heads, self.head_dim))
        # attention over the request's cached keys/values (rows of later positions are masked out)
        t, n_rep = q.shape[0], self.num_heads // self.num_kv_heads
        keys = batch.pool.k_buffer[self.layer_id][batch.req_to_token].transpose(0, 1)  # [Hkv, max_len, D]
        values = batch.pool.v_buffer[self.layer_id][batch.req_to_token].transpose(0, 1)
        keys, values = keys.repeat_interleave(n_rep, 0), values.repeat_interleave(n_rep, 0)
        mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= batch.positions[:, None]
        out = F.scaled_dot_product_attention(q.view(t, self.num_heads, self.head_dim).transpose(0, 1),
                                             keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(0, 1).reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, layer_id, hidden, intermediate, num_heads, num_kv_heads, head_dim, max_pos):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(layer_id, hidden, num_heads, num_kv_heads, head_dim, max_pos)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, hidden, batch):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), batch)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class TinyDecoder(nn.Module):
    def __init__(self, vocab=256, hidden=64, intermediate=128, layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, max_pos=64):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderLayer(i, hidden, intermediate, num_heads, num_kv_heads, head_dim, max_pos)
                                    for i in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, batch: ForwardBatch):
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, batch)
        return self.lm_head(self.norm(hidden))  # [T, vocab]


torch.manual_seed(0)
NUM_KV_HEADS, HEAD_DIM, NUM_SLOTS = 2, 16, 64
model = TinyDecoder(layers=args.layers, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM).to(device).eval()
max_len = args.prompt_len + args.new_tokens
if max_len > 64:
    sys.exit(f"--prompt-len + --new-tokens must be at most 64 (the rotary table), got {max_len}")
req_to_token = (torch.randperm(NUM_SLOTS - 1)[:max_len] + 1).to(device)  # slot 0 stays free, as in SGLang
prompt = torch.randint(0, 256, (args.prompt_len,), device=device)


# %%
# Compile with fx_fusion
# ----------------------
# ``backend="fx_fusion"`` is Inductor with the fusion pass installed; ``options`` mixes the pass's
# settings (``FusionConfig`` fields such as ``dump_dir``) with Inductor config patches.
# ``dynamic=False``: prefill and decode get one graph each (the pass also handles a dynamic token count).

dump_dir = args.dump_dir or tempfile.mkdtemp(prefix="fx_fusion_quickstart_")
compiled = torch.compile(model, backend="fx_fusion", dynamic=False, options={"dump_dir": dump_dir})


def generate(fn, pool):
    """Greedy decoding: a prefill of the prompt, then one token per step. Returns tokens and logits."""
    tokens, all_logits = prompt.tolist(), []
    positions = torch.arange(args.prompt_len, device=device)
    ids = prompt
    with torch.no_grad():
        for _ in range(args.new_tokens):
            batch = ForwardBatch(positions, req_to_token[positions], req_to_token, pool)
            logits = fn(ids, batch)
            all_logits.append(logits)
            next_id = logits[-1].argmax()
            tokens.append(int(next_id))
            ids, positions = next_id[None], positions[-1:] + 1
    return tokens, all_logits


def new_pool():
    return TokenToKVPool(args.layers, NUM_SLOTS, NUM_KV_HEADS, HEAD_DIM, torch.float32, device)


# %%
# Prefill, then decode
# --------------------
# The first call compiles the prefill graph, the second the decode graph; later steps reuse it.

start = time.perf_counter()
pool = new_pool()
tokens, logits = generate(compiled, pool)
print(f"compiled run (including compilation): {time.perf_counter() - start:.1f} s")
print("prompt + generated tokens:", tokens)


# %%
# What the pass did
# -----------------
# Every compiled graph has a report in the dump directory: each candidate site with its source line,
# fused or the reason it was not. ``python -m fx_fusion inspect DIR`` prints them all as one table.

reports = sorted(Path(dump_dir).glob("graph_*.report.txt"))
for path in reports:
    print(f"--- {path.name}")
    print(path.read_text(), end="")
print(f"(dumps in {dump_dir}; summary: python -m fx_fusion inspect {dump_dir})")


# %%
# Check against eager
# -------------------
# Same weights, a fresh pool: the compiled model must give the same logits, the same tokens and the
# same pool contents (untouched slots included).

ref_pool = new_pool()
ref_tokens, ref_logits = generate(model, ref_pool)
failures = []
if tokens != ref_tokens:
    failures.append(f"tokens differ: compiled {tokens}, eager {ref_tokens}")
for step, (a, b) in enumerate(zip(logits, ref_logits)):
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        failures.append(f"step {step}: logits differ by {(a - b).abs().max().item():.2e}")
for name in ("k_buffer", "v_buffer"):
    for layer, (a, b) in enumerate(zip(getattr(pool, name), getattr(ref_pool, name))):
        if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
            failures.append(f"{name}[{layer}] differs by {(a - b).abs().max().item():.2e}")
fused_per_graph = [sum(site["fused"] for site in json.loads(path.with_suffix(".json").read_text())["sites"])
                   for path in reports]
if len(reports) != 2 or any(n != args.layers for n in fused_per_graph):
    failures.append(f"expected 2 graphs with {args.layers} fused sites each, got {fused_per_graph}")
if failures:
    print("MISMATCH:\n  " + "\n  ".join(failures))
    sys.exit(1)
print(f"OK: tokens, logits and KV pools match eager; {args.layers} of {args.layers} layers fused in each of "
      f"{len(reports)} graphs")


# %%
# Time a decode step (GPU only)
# -----------------------------
# In the Triton interpreter the kernel runs as numpy code, so CPU timings say nothing.

if device.type == "cuda":
    def step_time(fn, iters=50):
        batch = ForwardBatch(torch.tensor([max_len - 1], device=device), req_to_token[-1:], req_to_token, new_pool())
        ids = prompt[:1]
        with torch.no_grad():
            for _ in range(5):
                fn(ids, batch)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                fn(ids, batch)
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / iters * 1e6

    print(f"decode step: eager {step_time(model):.0f} us, fx_fusion {step_time(compiled):.0f} us "
          "(a tiny model: launch overhead dominates; see benchmarks/ for kernel timings)")
else:
    print("timing skipped on CPU (the kernel runs in the Triton interpreter)")
