"""What fx_fusion writes to a dump directory, and how to look at it.

    python examples/inspect_dump.py                 # CPU: the Triton kernel runs in the interpreter
    python examples/inspect_dump.py --device cuda   # GPU

One SGLang-style attention block is compiled with ``options={"dump_dir": DIR}``. Then: the files of
DIR, the site table of ``python -m fx_fusion inspect DIR``, the graphs as networkx graphs (the fused
node and its neighbours), and a picture of the block before and after the pass, drawn with graphviz
``dot`` if it is installed, else with matplotlib, else printed as text (``fx_fusion.draw``). Pictures
go to DIR/pictures.
"""

# %%
# Set-up
# ------
# ``TRITON_INTERPRET=1`` must be set before fx_fusion or triton is imported (CPU only).

import argparse
import os
import sys
import tempfile
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--dump-dir", default=None, help="where fx_fusion writes its graph dumps (default: a temp dir)")
parser.add_argument("--renderer", default="auto", choices=["auto", "dot", "matplotlib", "text"],
                    help="how to draw the before/after pictures (auto: dot, else matplotlib, else text)")
args = parser.parse_args()

if args.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import networkx as nx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fx_fusion  # noqa: E402  (registers backend="fx_fusion"; `pip install -e .` first)
from fx_fusion import __main__ as cli  # noqa: E402  (the `python -m fx_fusion` command)
from fx_fusion import draw  # noqa: E402  (pictures of a site, as `inspect --draw` draws them)

if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda: no CUDA device is available")
device = torch.device(args.device)


# %%
# One attention block, compiled with a dump directory
# ---------------------------------------------------
# Fused qkv projection, NeoX RoPE from a ``cos_sin_cache`` table, ``k_buffer[loc] = k`` into a token
# pool kept as module buffers, attention over the stored rows.


class Block(nn.Module):
    def __init__(self, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, max_pos=64, num_slots=32):
        super().__init__()
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.qkv_proj = nn.Linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), -1), persistent=False)
        self.register_buffer("k_buffer", torch.zeros(num_slots, num_kv_heads, head_dim))
        self.register_buffer("v_buffer", torch.zeros(num_slots, num_kv_heads, head_dim))

    def rope(self, x, cos, sin):
        x = x.view(x.shape[0], -1, self.d)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def forward(self, positions, hidden, loc):
        q, k, v = self.qkv_proj(hidden).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        cos, sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(-2).chunk(2, dim=-1)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        self.k_buffer[loc] = k
        self.v_buffer[loc] = v.view(-1, self.hkv, self.d)
        keys = self.k_buffer[loc].transpose(0, 1).repeat_interleave(self.h // self.hkv, 0)
        values = self.v_buffer[loc].transpose(0, 1).repeat_interleave(self.h // self.hkv, 0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, is_causal=True)
        return self.o_proj(out.transpose(0, 1).flatten(1))


torch.manual_seed(0)
block = Block().to(device).eval()
eager_block = Block().to(device).eval()
eager_block.load_state_dict(block.state_dict())
dump_dir = Path(args.dump_dir or tempfile.mkdtemp(prefix="fx_fusion_inspect_"))
compiled = torch.compile(block, backend="fx_fusion", options={"dump_dir": str(dump_dir)})

T = 6
positions = torch.arange(T, device=device)
hidden = torch.randn(T, 64, device=device)
loc = torch.randperm(32, device=device)[:T]
with torch.no_grad():
    out, ref = compiled(positions, hidden, loc), eager_block(positions, hidden, loc)
same = torch.allclose(out, ref, atol=1e-5) and torch.allclose(block.k_buffer, eager_block.k_buffer, atol=1e-6)
print(f"compiled output and k_buffer equal eager: {same}")


# %%
# The dump directory
# ------------------
# One set of files per compiled graph (graph_000 is the first graph compiled in this process).

descriptions = {
    ".before.py": "post-grad graph as Python, before the pass",
    ".after.py": "the same graph after the pass (the fused op call in place of RoPE + stores)",
    ".report.json": "every candidate site: source line, layout, style, fused or the reason not",
    ".report.txt": "the same report as text",
    ".before.graphml": "the graph for networkx (nx.read_graphml); site nodes marked",
    ".after.graphml": "after the pass; fused op calls marked (attribute fused_op)",
    ".before.dot": "Graphviz text of the graph before",
    ".after.dot": "Graphviz text of the graph after",
}
print(f"\n{dump_dir}:")
for path in sorted(dump_dir.glob("graph_*")):
    suffix = path.name[len(path.name.split(".")[0]):]
    print(f"  {path.name:<26} {descriptions.get(suffix, '')}")


# %%
# ``python -m fx_fusion inspect DIR``
# -----------------------------------
# One row per site over all graphs of the directory, then the totals. Called in-process here; from a
# shell it is ``python -m fx_fusion inspect DIR`` (exit code 2 when DIR holds no reports).

print(f"\n$ python -m fx_fusion inspect {dump_dir}")
cli.main(["inspect", str(dump_dir)])
reports = cli.load_reports(dump_dir)
site = reports[0]["sites"][0]
print(f"site roles -> nodes of the graph before: {site['nodes']}")


# %%
# The graphs in networkx
# ----------------------
# Every FX node is a graph node with its op, target, shape and dtype; every use an edge. In the graph
# after the pass, ``fused_op`` marks the ``auto_functionalized(fx_fusion.rope_kv_store, ...)`` call;
# its outputs are taken with ``getitem``: 0 = rotated q, 1 = rotated k (empty unless something else
# reads it), 2 and 3 = the updated k and v caches.

stem = dump_dir / reports[0]["graph"]
before = nx.read_graphml(f"{stem}.before.graphml")
after = nx.read_graphml(f"{stem}.after.graphml")
fused_nodes = [n for n, attrs in after.nodes(data=True) if attrs.get("fused_op")]
print(f"\nbefore: {before.number_of_nodes()} nodes, after: {after.number_of_nodes()} nodes; fused: {fused_nodes}")


def describe(g: nx.DiGraph, n: str) -> str:
    a = g.nodes[n]
    return f"{n} = {a.get('target', '')} {a.get('shape', '')} {a.get('dtype', '')}".rstrip()


for n in fused_nodes:
    print(f"inputs of {n} (keyword arguments q, k, v, caches, slots, cos, sin: see {stem.name}.after.py):")
    for p in after.predecessors(n):
        print(f"  {describe(after, p)}")
    print(f"users of {n}:")
    for s in after.successors(n):
        users = ", ".join(after.successors(s)) or "-"
        print(f"  {describe(after, s)}  -> used by {users}")


# %%
# A picture of the site before and after
# --------------------------------------
# Only the part that changes: everything feeding the k/v stores and the q RoPE, back to the qkv
# projection (before), and the fused call with its inputs and users (after). ``fx_fusion.draw`` does
# it from the graphml files; ``python -m fx_fusion inspect DIR --draw`` draws every site this way.

renderer = args.renderer
if renderer == "auto":
    try:
        renderer = draw.pick_renderer("auto")  # graphviz dot, else matplotlib
    except draw.DrawError:
        renderer = "text"
pictures = dump_dir / "pictures"
pictures.mkdir(exist_ok=True)
for path in draw.draw_site(dump_dir, reports[0]["graph"], 0, site, renderer, pictures, before, after):
    print(f"{path.name.split('.')[-2]}: -> {path}")
    if renderer == "text":
        print(path.read_text())

if not same or not fused_nodes:
    sys.exit("MISMATCH: the compiled block differs from eager or nothing was fused")
print(f"\nOK: {len(fused_nodes)} fused op in {stem.name}; pictures in {pictures}")
