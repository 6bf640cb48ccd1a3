"""Tensor parallel decode: stock torch.compile vs backend="fx_fusion" on every rank, with CUDA graphs.

Model (a) of ``bench_e2e.py`` at full attention width split over the ranks: gpt-oss-120b attention shapes
with 16 q / 2 kv heads in total (8 / 1 per rank on 2 GPUs), head_dim 64, hidden 2880, 36 layers, RoPE base
150000, qkv/o biases, a dense SwiGLU MLP of 2880 split the same way. The layers are ``bench_e2e.py``'s
(SGLang style: fused qkv + split, ``forward_native`` RoPE, ``k_buffer[loc] = k`` into a token pool, SDPA);
each rank holds its own heads and its own pool, and ``o_proj`` / ``down_proj`` are row-parallel: this
rank's columns, ``dist.all_reduce`` of the partial sums (functional collectives in the compiled graph),
then the bias once. Every rank compiles its shard twice, ``torch.compile(model, mode=M)`` and
``torch.compile(model, backend="fx_fusion", mode=M)``; M is ``"reduce-overhead"`` (CUDA graphs).

For each decode batch: per-step latency from CUDA events on every rank (median and p10-p90 of rank 0; the
slowest rank's median too), per-rank fused sites (one per layer in every graph the fx_fusion side
compiled), and per rank the two sides' outputs and written cache rows compared (bf16 tolerance) with the
rest of the fx_fusion side's pool checked untouched. Rank 0 prints a markdown table and rewrites ``--out``
after every point, so a run that is cut short keeps what it measured.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out tp.md          # 2 GPUs, NCCL: about 3-4 minutes
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --layers 12 --out tp.md
    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --smoke --out tp.md  # CPU, gloo, tiny; no timing claims
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available() or "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported: the CPU runs them interpreted

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fx_fusion  # noqa: E402,F401  (registers backend="fx_fusion")

# the decoder, inputs, cache checks and timing of the single-GPU benchmark next to this file
from bench_e2e import (SPECS, Decoder, Timing, close, decode_inputs, decode_kv_len, fill_caches,  # noqa: E402
                       interleaved_timing, max_err, sdpa_backend, step, sync, untouched_rows_intact, written_rows)

FULL_Q_HEADS, FULL_KV_HEADS = 16, 2  # model (a) at full width, before the split
SMOKE = dict(q_heads=4, kv_heads=2, hidden=128, intermediate=256, layers=2)


class RowParallelLinear(nn.Module):
    """This rank's input columns of a Linear: partial sums, all-reduced, plus the bias once (not once per rank)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


@dataclasses.dataclass
class Point:
    batch: int
    ok: bool
    stock: Timing | None = None
    fused: Timing | None = None
    slowest: tuple[float, float] | None = None  # the slowest rank's median, stock and fx_fusion
    sites: list[str] = dataclasses.field(default_factory=list)  # per rank
    equal: list[bool] = dataclasses.field(default_factory=list)  # per rank
    detail: str = ""


def local_sites(fused: int, not_fused: int, graphs: int, layers: int) -> str:
    if graphs == 0:
        return "NO GRAPH"
    if fused == layers * graphs and not_fused == 0:
        return f"{layers}/{layers}" + (f" x{graphs} graphs" if graphs > 1 else "")
    return f"MISMATCH {fused}/{layers * graphs}" + (f" (+{not_fused} refused)" if not_fused else "")


def table(header: list[str], points: list[Point], notes: list[str]) -> str:
    lines = [*header, "",
             "| batch | stock ms, rank 0: median (p10-p90) | fx_fusion ms, rank 0: median (p10-p90) | speed-up % "
             "| slowest rank's median, stock / fx_fusion ms | outputs and caches equal (per rank) "
             "| fused sites (per rank) |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        if not p.ok:
            lines.append(f"| {p.batch} | FAILED | | | | | {', '.join(p.sites)} |")
            continue
        lo_s, hi_s = p.stock.spread()
        lo_f, hi_f = p.fused.spread()
        lines.append(
            f"| {p.batch} | {p.stock.median:.3f} ({lo_s:.3f}-{hi_s:.3f}) "
            f"| {p.fused.median:.3f} ({lo_f:.3f}-{hi_f:.3f}) "
            f"| {100 * (p.stock.median / p.fused.median - 1):+.1f} | {p.slowest[0]:.3f} / {p.slowest[1]:.3f} "
            f"| {', '.join('yes' if e else 'NO' for e in p.equal)} | {', '.join(p.sites)} |")
    lines += ["", "Checks per point:"] + [f"- batch {p.batch}: {p.detail}" for p in points] + notes
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, help="rank 0 writes the markdown table here (rewritten after each point)")
    ap.add_argument("--layers", type=int, help=f"decoder layers (default {SPECS['a'].layers}; --smoke 2)")
    ap.add_argument("--decode-batches", nargs="+", type=int, help="default 1 64 (--smoke 1 4)")
    ap.add_argument("--past", type=int, help="tokens already cached per sequence (default 1024; --smoke 40)")
    ap.add_argument("--steps", type=int, help="timed steps per side and batch (default 100; --smoke 2)")
    ap.add_argument("--mode", default=None, help='torch.compile mode of both sides (default "reduce-overhead" '
                    'on CUDA, none with --smoke); "default" for no CUDA graphs')
    ap.add_argument("--collective-timeout", type=float, default=180.0,
                    help="seconds a rank waits in a collective before the run fails (a rank that crashed)")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model, no CUDA graphs; no timing claims")
    args = ap.parse_args()

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch with torchrun, e.g. `torchrun --nproc-per-node 2 benchmarks/bench_tp.py --out tp.md`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    q_heads, kv_heads = (SMOKE["q_heads"], SMOKE["kv_heads"]) if args.smoke else (FULL_Q_HEADS, FULL_KV_HEADS)
    spec = SPECS["a"]
    hidden, intermediate = (SMOKE["hidden"], SMOKE["intermediate"]) if args.smoke else (spec.hidden, spec.intermediate)
    if q_heads % world or kv_heads % world or intermediate % world:
        raise SystemExit(f"{world} ranks must divide {q_heads} q heads, {kv_heads} kv heads and the MLP "
                         f"width {intermediate}")
    timeout = datetime.timedelta(seconds=args.collective_timeout)
    if args.smoke:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            raise SystemExit(f"rank {rank}: needs GPU {local_rank}, found {torch.cuda.device_count()} "
                             "(one GPU per rank; --smoke runs on CPU)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)

    layers = args.layers or (SMOKE["layers"] if args.smoke else spec.layers)
    batches = args.decode_batches or ([1, 4] if args.smoke else [1, 64])
    past = args.past if args.past is not None else (40 if args.smoke else 1024)
    steps = args.steps or (2 if args.smoke else 100)
    mode = args.mode or (None if args.smoke else "reduce-overhead")
    mode = None if mode == "default" else mode
    dtype = torch.bfloat16
    local = dataclasses.replace(spec, n_q=q_heads // world, n_kv=kv_heads // world)

    torch._inductor.config.fx_graph_cache = False  # each side really compiles, and the pass really runs
    torch._functorch.config.enable_autograd_cache = False
    for name in ("recompile_limit", "cache_size_limit"):  # 2 compiled wrappers share Decoder.forward
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
            break

    start = time.perf_counter()

    def log(msg: str) -> None:
        if rank == 0:
            print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    header = [
        f"# fx_fusion tensor parallel decode: stock torch.compile vs backend=\"fx_fusion\", {world} ranks",
        f"- device: {world} x {card} ({dist.get_backend()}); torch {torch.__version__}; triton {triton.__version__}",
        f"- command: torchrun --nproc-per-node {world} {' '.join(shlex.quote(a) for a in sys.argv)}",
        f"- model (a) full width over {world} ranks: {q_heads} q / {kv_heads} kv heads in total "
        f"({local.n_q} / {local.n_kv} per rank), head_dim {spec.head_dim}, hidden {hidden}, SwiGLU "
        f"{intermediate} ({intermediate // world} per rank), {layers} layers"
        + (f" (the real model has {spec.layers})" if layers != spec.layers else "")
        + f"; bf16, random weights; past length {past}; mode={mode!r}; static shapes (one graph per batch)",
        "- attention column-parallel, o_proj and down_proj row-parallel + dist.all_reduce; token pool per rank",
    ]
    if args.smoke:
        header.append("- SMOKE: CPU, gloo, Triton interpreted, no CUDA graphs: timings meaningless")
    log("\n".join(header))

    # ---- the shard of this rank --------------------------------------------------------------------------
    kv_len = decode_kv_len(past)
    num_slots = max(batches) * kv_len
    if past + 1 > kv_len or max(batches) < 1:
        raise SystemExit(f"bad sizes: past {past}, batches {batches}")
    gqa, sdpa_name = sdpa_backend(local, argparse.Namespace(dtype=dtype, device=device), max(batches), 1, kv_len)
    torch.manual_seed(1000 + rank)  # each rank its own random shard
    model = Decoder(local, layers, hidden, intermediate // world, num_slots, past + 64, gqa, dtype, device).eval()
    for layer in model.layers:
        layer.attn.o_proj = RowParallelLinear(layer.attn.o_proj)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj)
    for k, v in model.caches():
        torch._dynamo.mark_static_address(k)
        torch._dynamo.mark_static_address(v)
    log(f"SDPA over the pool: {'enable_gqa=True' if gqa else 'repeat_interleave'} ({sdpa_name}); "
        f"pool {num_slots} slots per layer and rank")
    fns = {"stock": torch.compile(model, mode=mode, fullgraph=True, dynamic=False),
           "fx_fusion": torch.compile(model, backend="fx_fusion", mode=mode, fullgraph=True, dynamic=False)}

    points: list[Point] = []
    notes: list[str] = []

    def publish() -> None:
        if rank == 0 and args.out:
            args.out.write_text(table(header, points, notes))

    publish()
    failed = False
    with torch.no_grad():
        for batch in batches:
            mine = {"ok": False, "sites": "not compiled", "equal": False, "detail": "", "skips": 0}
            try:
                inputs = decode_inputs(batch, past, kv_len, hidden, dtype, device, seed=batch)
                fill_caches(model, 1)
                for name in ("fx_fusion", "stock"):
                    t0 = time.perf_counter()
                    before = dict(counters["fx_fusion"]), counters["inductor"]["cudagraph_skips"]
                    for _ in range(3):  # compile, then warm up (CUDA graphs record on a later call)
                        step(fns[name], inputs)
                    sync(device)
                    fx = {k: counters["fx_fusion"][k] - before[0].get(k, 0)
                          for k in ("graphs", "rope_kv_store_fused", "rope_kv_store_not_fused")}
                    mine["skips"] += counters["inductor"]["cudagraph_skips"] - before[1]
                    if name == "fx_fusion":
                        mine["sites"] = local_sites(fx["rope_kv_store_fused"], fx["rope_kv_store_not_fused"],
                                                    fx["graphs"], layers)
                    log(f"batch {batch}: {name} compiled and warm in {time.perf_counter() - t0:.1f} s")
                timing = interleaved_timing(fns, inputs, steps, 2 if args.smoke else 4, device)
                mine["equal"], mine["detail"] = check(model, fns, inputs, seed=100 + batch, device=device)
                mine.update(ok=True, stock=timing["stock"].ms, fused=timing["fx_fusion"].ms)
            except Exception as e:  # reported by rank 0 below; the ranks stop together
                traceback.print_exc()
                mine["detail"] = f"rank {rank}: {type(e).__name__}: {e}"
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            ok = all(r["ok"] for r in everyone)
            point = Point(batch, ok, sites=[r["sites"] for r in everyone], equal=[r["equal"] for r in everyone],
                          detail="; ".join(f"rank {i}: {r['detail']}" for i, r in enumerate(everyone)))
            if ok:
                point.stock, point.fused = Timing(everyone[0]["stock"]), Timing(everyone[0]["fused"])
                point.slowest = (max(Timing(r["stock"]).median for r in everyone),
                                 max(Timing(r["fused"]).median for r in everyone))
            skips = sum(r["skips"] for r in everyone)
            if skips and mode == "reduce-overhead":
                notes.append(f"- batch {batch}: Inductor skipped CUDA graphs {skips} times over the ranks "
                             "(TORCH_LOGS=perf_hints says why): those steps ran without CUDA graphs")
            points.append(point)
            publish()
            log(f"batch {batch}: " + (f"stock {point.stock.median:.3f} ms, fx_fusion {point.fused.median:.3f} ms "
                                      f"(rank 0); fused sites {point.sites}; {point.detail}" if ok else
                                      f"FAILED: {point.detail}"))
            if not ok:
                failed = True
                break  # the ranks may no longer run the same collectives: stop here

    if rank == 0:
        print("\n" + table(header, points, notes), flush=True)
        print(f"total wall time {time.perf_counter() - start:.0f} s" + (f"; written to {args.out}" if args.out else ""))
    bad = failed or any(not p.ok or not all(p.equal) or not all(s[0].isdigit() for s in p.sites) for p in points)
    if rank == 0 and bad:
        print("FAILED checks: see the table (outputs not equal, sites not fused, or a rank crashed)", flush=True)
    dist.destroy_process_group()
    return 1 if bad else 0


def check(model: Decoder, fns: dict, inputs, seed: int, device) -> tuple[bool, str]:
    """One step per side and eagerly from the same filled pool; outputs and written rows must agree."""
    loc = inputs[2]
    results = {}
    for name, fn in (*fns.items(), ("eager", model)):
        fill_caches(model, seed)
        out = step(fn, inputs).clone()
        sync(device)
        intact = untouched_rows_intact(model, seed, loc) if name == "fx_fusion" else True
        results[name] = (out, written_rows(model, loc), intact)
    (o_s, r_s, _), (o_f, r_f, intact), (o_e, r_e, _) = results["stock"], results["fx_fusion"], results["eager"]
    equal = close(o_f, o_s) and close(r_f, r_s) and intact
    return equal, (f"max|fx-stock| out {max_err(o_f, o_s):.3g} cache rows {max_err(r_f, r_s):.3g}; "
                   f"max|fx-eager| out {max_err(o_f, o_e):.3g} cache rows {max_err(r_f, r_e):.3g}; "
                   f"other cache rows {'untouched' if intact else 'CHANGED'}")


if __name__ == "__main__":
    sys.exit(main())
