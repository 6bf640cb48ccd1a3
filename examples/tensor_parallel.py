"""Tensor parallel: fx_fusion fuses RoPE + KV store on every rank of a model split over processes.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                  # CPU, gloo (Triton interpreted)
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --device cuda    # one GPU per rank, NCCL

Models too large for one GPU are served tensor-parallel: every rank holds its own q/k/v heads and its own
KV cache. Attention is column-parallel (each rank's slice of the fused qkv projection computes its heads)
and row-parallel (each rank's slice of o_proj gives a partial sum, and an all-reduce adds them up); the MLP
is split the same way. The compiled graph of each rank then carries collectives between the layers.

Two ways to write the split, both compiled with ``backend="fx_fusion"`` on every rank:

``plain``    local-size ``nn.Linear`` layers and ``dist.all_reduce(out)`` after o_proj and down_proj, the
             way SGLang and vLLM write it. Dynamo traces the in-place ``all_reduce`` into functional
             collectives (``_c10d_functional.all_reduce`` + ``wait_tensor``).
``dtensor``  the unsharded model, split by ``torch.distributed.tensor.parallel.parallelize_module`` with
             ``ColwiseParallel`` / ``RowwiseParallel`` on a device mesh: the weights become DTensors and
             the all-reduce comes from ``RowwiseParallel``'s output redistribution.

Each rank checks its logits, tokens and its own KV pool (every slot) against the same sharded model run
eagerly, and against its heads' slice of the unsharded model's pool.
"""

# %%
# Set-up
# ------
# ``torchrun`` starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
# ``MASTER_PORT``. On a CPU the fused op runs its Triton kernel in the interpreter, which Triton reads
# when a kernel is defined: set it before fx_fusion (or triton) is imported.

import argparse
import copy
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: gloo, Triton interpreted; cuda: NCCL, one GPU per rank")
parser.add_argument("--variant", default="both", choices=["plain", "dtensor", "both"])
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--prompt-len", type=int, default=8)
parser.add_argument("--new-tokens", type=int, default=3)
parser.add_argument("--dump-dir", default=None,
                    help="fx_fusion's graph dumps go to DIR/<variant>/rank<r> (default: a temp dir)")
args = parser.parse_args()

if args.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fx_fusion  # noqa: E402,F401  (registers backend="fx_fusion"; `pip install -e .` first)

if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
    sys.exit("launch with torchrun, e.g. `torchrun --nproc-per-node 2 examples/tensor_parallel.py`")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if args.device == "cuda":
    if torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        sys.exit(f"--device cuda: {torch.cuda.device_count()} GPUs for "
                 f"{os.environ.get('LOCAL_WORLD_SIZE', world)} ranks on this host (one GPU per rank)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo")


def say(msg: str) -> None:
    """One write per message: the ranks share the terminal, and a single short write is not interleaved."""
    sys.stdout.write(f"[rank {rank}] {msg}\n")
    sys.stdout.flush()


# %%
# The model
# ---------
# The SGLang-style decoder of ``quickstart.py``: fused qkv projection split into q, k, v,
# ``cos_sin_cache.index_select(0, positions).chunk(2)``, NeoX RoPE, a token pool written as
# ``k_buffer[loc] = k``. Head counts are the rank's own (``tp_size`` divides them); ``all_reduce=True``
# adds the explicit all-reduce after each row-parallel projection (the ``plain`` variant).

HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 256
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 16
NUM_SLOTS, MAX_POS = 64, 64
if NUM_KV_HEADS % world or NUM_HEADS % world:
    sys.exit(f"{world} ranks must divide the {NUM_HEADS} q heads and {NUM_KV_HEADS} kv heads")
max_len = args.prompt_len + args.new_tokens
if max_len > MAX_POS:
    sys.exit(f"--prompt-len + --new-tokens must be at most {MAX_POS} (the rotary table), got {max_len}")


class TokenToKVPool:
    """Per layer ``k_buffer[layer]`` / ``v_buffer[layer]`` of shape ``[num_slots, kv_heads, head_dim]``.

    Filled with seeded random values, not zeros: a store to a wrong slot or head shows when pools are compared.
    """

    def __init__(self, num_layers, num_kv_heads, seed):
        gen = torch.Generator().manual_seed(seed)
        shape = (NUM_SLOTS, num_kv_heads, HEAD_DIM)
        self.k_buffer = [torch.randn(shape, generator=gen).to(device) for _ in range(num_layers)]
        self.v_buffer = [torch.randn(shape, generator=gen).to(device) for _ in range(num_layers)]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v


@dataclass
class ForwardBatch:
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
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """NeoX rotary embedding with a ``[max_pos, head_dim]`` table: cos of every frequency, then sin."""

    def __init__(self, head_dim, max_pos, base=10000.0):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions, q, k):
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        out = []
        for x in (q, k):
            x = x.view(positions.shape[0], -1, self.head_dim)
            x1, x2 = x.chunk(2, dim=-1)
            out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))
        return out[0], out[1]


class Attention(nn.Module):
    def __init__(self, layer_id, tp_size, all_reduce):
        super().__init__()
        self.layer_id, self.all_reduce = layer_id, all_reduce
        self.set_tp_size(tp_size)
        self.qkv_proj = nn.Linear(HIDDEN, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, HIDDEN, bias=False)
        self.rotary_emb = RotaryEmbedding(HEAD_DIM, MAX_POS)

    def set_tp_size(self, tp_size):
        """This rank's head counts (``parallelize_module`` shards the weights, not these attributes)."""
        self.num_heads, self.num_kv_heads = NUM_HEADS // tp_size, NUM_KV_HEADS // tp_size
        self.q_size, self.kv_size = self.num_heads * HEAD_DIM, self.num_kv_heads * HEAD_DIM

    def forward(self, hidden, batch: ForwardBatch):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(batch.positions, q, k)
        # RoPE -> reshape -> KV store of this rank's kv heads: what fx_fusion fuses
        batch.pool.set_kv_buffer(self.layer_id, batch.out_cache_loc,
                                 k.view(-1, self.num_kv_heads, HEAD_DIM), v.view(-1, self.num_kv_heads, HEAD_DIM))
        t, n_rep = q.shape[0], self.num_heads // self.num_kv_heads
        keys = batch.pool.k_buffer[self.layer_id][batch.req_to_token].transpose(0, 1)  # [Hkv, max_len, D]
        values = batch.pool.v_buffer[self.layer_id][batch.req_to_token].transpose(0, 1)
        keys, values = keys.repeat_interleave(n_rep, 0), values.repeat_interleave(n_rep, 0)
        mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= batch.positions[:, None]
        out = F.scaled_dot_product_attention(q.view(t, self.num_heads, HEAD_DIM).transpose(0, 1),
                                             keys, values, attn_mask=mask)
        out = self.o_proj(out.transpose(0, 1).reshape(t, self.q_size))  # a partial sum on each rank
        if self.all_reduce:
            dist.all_reduce(out)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, layer_id, tp_size, all_reduce):
        super().__init__()
        self.input_layernorm = RMSNorm(HIDDEN)
        self.self_attn = Attention(layer_id, tp_size, all_reduce)
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.gate_up_proj = nn.Linear(HIDDEN, 2 * INTERMEDIATE // tp_size, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE // tp_size, HIDDEN, bias=False)
        self.all_reduce = all_reduce

    def forward(self, hidden, batch):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), batch)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        if self.all_reduce:
            dist.all_reduce(out)
        return hidden + out


class TinyDecoder(nn.Module):
    """Embedding and LM head replicated on every rank; attention and MLP split over ``tp_size`` ranks."""

    def __init__(self, layers, tp_size=1, all_reduce=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(DecoderLayer(i, tp_size, all_reduce) for i in range(layers))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, batch: ForwardBatch):
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, batch)
        return self.lm_head(self.norm(hidden))


# %%
# Sharding
# --------
# Every rank builds the full model from the same seed, so all ranks hold the same full weights; each then
# keeps its part. Rank r owns q heads ``[r * Hq/N, (r + 1) * Hq/N)`` and kv heads ``[r * Hkv/N, ...)``.
# The fused projections ``[q | k | v]`` and ``[gate | up]`` are sharded per part, not as one block: a
# rank's rows are its q rows, then its k rows, then its v rows (SGLang's ``QKVParallelLinear`` and
# ``MergedColumnParallelLinear`` do the same).


def shard_rows(weight, sizes, r, n):
    """Rows of rank ``r`` of ``n`` from each consecutive part (of ``sizes`` rows) of a fused weight."""
    return torch.cat([part.chunk(n, dim=0)[r] for part in weight.split(sizes, dim=0)], dim=0)


# rows of each part of the fused column-parallel weights, per decoder-layer parameter name
FUSED_PARTS = {"self_attn.qkv_proj.weight": [NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM],
               "gate_up_proj.weight": [INTERMEDIATE, INTERMEDIATE]}


def shard_plain(full: TinyDecoder) -> TinyDecoder:
    """Local-size Linears holding this rank's rows (column-parallel) or columns (row-parallel)."""
    tp = TinyDecoder(len(full.layers), tp_size=world, all_reduce=True).to(device).eval()
    state = {}
    for name, value in full.state_dict().items():
        param = name.split(".", 2)[2] if name.startswith("layers.") else name  # "layers.0.<param>"
        if param in FUSED_PARTS:
            value = shard_rows(value, FUSED_PARTS[param], rank, world)
        elif param in ("self_attn.o_proj.weight", "down_proj.weight"):
            value = value.chunk(world, dim=1)[rank]
        state[name] = value
    tp.load_state_dict(state)
    return tp


def shard_dtensor(full: TinyDecoder) -> TinyDecoder:
    """``parallelize_module`` on a 1-D mesh: column-parallel qkv/gate_up, row-parallel o_proj/down_proj.

    ``ColwiseParallel`` gives rank r the r-th block of rows, so the fused weights are first reordered into
    ``[rank 0's q, k, v | rank 1's q, k, v | ...]``; the attention modules are told their local head counts.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = copy.deepcopy(full)
    with torch.no_grad():
        for layer in model.layers:
            for linear, sizes in ((layer.self_attn.qkv_proj, FUSED_PARTS["self_attn.qkv_proj.weight"]),
                                  (layer.gate_up_proj, FUSED_PARTS["gate_up_proj.weight"])):
                linear.weight.copy_(torch.cat([shard_rows(linear.weight, sizes, r, world) for r in range(world)]))
            layer.self_attn.set_tp_size(world)
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    plan = {}
    for i in range(len(model.layers)):
        plan |= {f"layers.{i}.self_attn.qkv_proj": ColwiseParallel(), f"layers.{i}.self_attn.o_proj": RowwiseParallel(),
                 f"layers.{i}.gate_up_proj": ColwiseParallel(), f"layers.{i}.down_proj": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


torch.manual_seed(0)
full_model = TinyDecoder(args.layers).to(device).eval()
gen = torch.Generator().manual_seed(1)
req_to_token = (torch.randperm(NUM_SLOTS - 1, generator=gen)[:max_len] + 1).to(device)  # slot 0 stays free
prompt = torch.randint(0, VOCAB, (args.prompt_len,), generator=gen).to(device)


def generate(fn, pool):
    """Greedy decoding: a prefill of the prompt, then one token per step. Returns tokens and logits."""
    tokens, all_logits = prompt.tolist(), []
    positions = torch.arange(args.prompt_len, device=device)
    ids = prompt
    with torch.no_grad():
        for _ in range(args.new_tokens):
            logits = fn(ids, ForwardBatch(positions, req_to_token[positions], req_to_token, pool))
            all_logits.append(logits.clone())
            next_id = logits[-1].argmax()
            tokens.append(int(next_id))
            ids, positions = next_id[None], positions[-1:] + 1
    return tokens, all_logits


def pool_for(num_kv_heads, seed=2):
    return TokenToKVPool(args.layers, num_kv_heads, seed)


# The unsharded model's run, for the check that the split computes the same model.
full_tokens, full_logits = generate(full_model, full_pool := pool_for(NUM_KV_HEADS))
kv_local = NUM_KV_HEADS // world
my_heads = slice(rank * kv_local, (rank + 1) * kv_local)


# %%
# Compile on every rank, run, compare
# -----------------------------------
# Every rank compiles its own graphs (prefill and decode) with the fusion pass; the pass sees the
# functional collectives as ordinary nodes between the layers. Its report counts fused sites per rank.
# The FX graph cache is off through ``dump_dir``: a cache hit would skip the pass (and its report).

dump_root = Path(args.dump_dir or tempfile.mkdtemp(prefix="fx_fusion_tp_"))
failures = []


def compare(what, a, b, atol=1e-5, rtol=1e-5):
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        failures.append(f"{what} differs by {(a - b).abs().max().item():.2e}")


for variant in (["plain", "dtensor"] if args.variant == "both" else [args.variant]):
    torch._dynamo.reset()
    model = shard_plain(full_model) if variant == "plain" else shard_dtensor(full_model)
    dump_dir = dump_root / variant / f"rank{rank}"
    compiled = torch.compile(model, backend="fx_fusion", dynamic=False, fullgraph=True,
                             options={"dump_dir": str(dump_dir)})
    tokens, logits = generate(compiled, pool := pool_for(kv_local, seed=2 + rank))
    ref_tokens, ref_logits = generate(model, ref_pool := pool_for(kv_local, seed=2 + rank))

    # what the pass did on this rank, and the collectives in the graphs it rewrote
    reports = sorted(dump_dir.glob("graph_*.report.json"))
    fused = [sum(site["fused"] for site in json.loads(p.read_text())["sites"]) for p in reports]
    collectives = [sum(line.count("_c10d_functional.all_reduce") for line in p.with_name(
        p.name.replace(".report.json", ".after.py")).read_text().splitlines()) for p in reports]
    say(f"{variant}: fused sites per graph {fused} (of {args.layers} layers), all_reduce nodes per graph "
        f"{collectives}; dumps in {dump_dir}")

    before = len(failures)
    if len(reports) != 2 or any(n != args.layers for n in fused):
        failures.append(f"{variant}: expected 2 graphs with {args.layers} fused sites each, got {fused}")
    if tokens != ref_tokens or tokens != full_tokens:
        failures.append(f"{variant}: tokens: compiled {tokens}, eager {ref_tokens}, unsharded {full_tokens}")
    for step, (a, b, c) in enumerate(zip(logits, ref_logits, full_logits)):
        compare(f"{variant}: step {step} logits vs eager", a, b, atol=1e-4, rtol=1e-4)
        compare(f"{variant}: step {step} logits vs unsharded", a, c, atol=1e-4, rtol=1e-4)
    for name in ("k_buffer", "v_buffer"):
        for layer in range(args.layers):
            mine = getattr(pool, name)[layer]
            compare(f"{variant}: {name}[{layer}] vs eager", mine, getattr(ref_pool, name)[layer])
            # the written slots hold this rank's heads of the unsharded pool (the rest is each side's noise)
            written = req_to_token[: max_len - 1]
            compare(f"{variant}: {name}[{layer}] vs unsharded", mine[written],
                    getattr(full_pool, name)[layer][written][:, my_heads])
    if len(failures) == before:
        say(f"{variant}: OK: tokens, logits and this rank's KV pool match eager and the unsharded model")


# %%
# Every rank must agree
# ---------------------
# A rank that fails must not leave the others waiting: gather every rank's verdict, then exit together.

verdicts = [None] * world
dist.all_gather_object(verdicts, failures)
dist.destroy_process_group()
if any(verdicts):
    if failures:
        say("MISMATCH:\n  " + "\n  ".join(failures))
    sys.exit(1)
if rank == 0:
    print(f"OK: all {world} ranks fused {args.layers} of {args.layers} layers in every graph and match eager "
          f"({args.variant})", flush=True)
