"""Fused RoPE + KV-cache store vs. the unfused sequence (eager and stock torch.compile), on a GPU.

For each model shape and token count: CUDA-graph replay medians (``triton.testing.do_bench_cudagraph``)
of three implementations of "RoPE on q, k (SGLang forward_native) -> store k, v in a token-indexed
cache at random slots", side by side in one process, plus the floor: the fewest bytes the operation
must move divided by the device-to-device copy bandwidth measured in the same run.

    python benchmarks/bench_kernel.py                      # the full table
    python benchmarks/bench_kernel.py --tokens 1 8 --models gpt-oss
    python benchmarks/bench_kernel.py --sweep --layouts sequence  # launch configurations of ours, per layout
    python benchmarks/bench_kernel.py --compiled           # compiled functions: stock vs backend="fx_fusion"
    python benchmarks/bench_kernel.py --bounds-check       # the kernel with its index checks vs without
    python benchmarks/bench_kernel.py --baseline OLD.py    # the kernel vs another version of it, per layout
                                                           # (OLD.py: git show REV:kernels/rope_kv_cache.py)
                                                           # (a REV from before kernels/ was split into
                                                           # layers: later, that file only re-exports them)
    python benchmarks/bench_kernel.py --qk-norm            # QK-norm -> RoPE -> store: stock, norm + op, op with norm
    python benchmarks/bench_kernel.py --fp8-q              # RoPE -> fp8 q -> store: stock, op + quantisation, op fp8 q
    python benchmarks/bench_kernel.py --qk-norm --fp8-q --device cpu --tokens 1 8  # CPU: the checks (interpreter)
    python benchmarks/bench_kernel.py --mla                # DeepSeek-V3 MLA latent store: stock vs the MLA op
    python benchmarks/bench_kernel.py --mla-rows [--checks]  # the MLA kernel at 1, 2, 4 kv rows a program

``--compiled`` times what a torch.compile user gets instead of the op alone: one RoPE + KV-store function
per cache layout (SGLang token pool, vLLM paged cache, Hugging Face sequence cache with per-token cos/sin),
compiled by stock Inductor and by ``backend="fx_fusion"`` in one process, each measured two ways:
CUDA-graph replay medians (GPU time) and a host loop without CUDA graphs (N calls back to back, one sync:
what the default mode costs per call, host overhead included).

``--qk-norm`` (Qwen3-8B 32/8/128 with HF's Qwen3RMSNorm, Gemma-3-27B 32/16/128 with HF's Gemma3RMSNorm, ``1 + w``
in fp32) and ``--fp8-q`` (q quantised to float8_e4m3fn with a static scale, ``(q_rot / q_scale).clamp(-448, 448)
.to(fp8)``; the same shapes) time three compiled functions per point, measured both ways (replay and host loop),
one compiled function per side and model called at every T (q/k/v split from one qkv input inside):

    stock       torch.compile of the model's eager code: norm q and k -> RoPE -> store k, v (fp8: RoPE -> store
                -> quantise q)
    op + norm   torch.compile of the model's norm (fp8: quantisation) around the op doing the RoPE + store only:
                what the graph pass gives today (Inductor's kernels for the rest, the op's launch)
    fused       torch.compile of the op with the norm (fp8: the quantisation) inside: one launch
    fx          the stock side's model code compiled with ``backend="fx_fusion"``: what a user gets (the pass puts
                the norm or the quantisation into the op; the backend launches it statically in the default mode)

Models: Qwen3-8B, Gemma-3-27B and OLMo-2-7B (its norm over a token's whole q and k, ``norm_full_width``).
Before timing, each point runs every side once from the same caches and compares with stock: q out and the whole
caches, at bf16 tolerance (``QK_NORM_TOL``); fp8 q within one e4m3 step of stock's, and the fused side's q
byte-exact against eager's quantisation of the op's own bf16 q (``_check_sides`` says why not against stock); the
fx side against the model code run eagerly, its differing bytes counted. A failed check is marked in its row and
makes the exit status 1. The floor counts the norm weights (fp8: q out at one byte an element). On a machine
without CUDA (or ``--device cpu``) the kernel runs in the Triton interpreter, there is no replay and no floor, and
the host loops run twice each: the checks are the point there, the CPU timings say nothing.

``--mla`` (DeepSeek-V3: kv_lora_rank 512, rope 64, GPT-J pairs with an fp32 ``cos_sin_cache``; 16 q heads (TP 8) and
128 (TP 1); a bf16 pool and SGLang's fp8 pool, float8_e4m3fn bytes in uint8 after ``row / k_scale``) times three
compiled functions per point, both ways: stock (the absorbed decode's model code: rotate q_pe and k_pe,
``q = cat([q_nope, q_pe])``, ``pool[loc] = cat([kv_c, k_pe]).view(-1, 1, 576)``), the MLA op doing it in one
launch (``mla_rope_store``, plain ``torch.compile``), and the model code compiled with ``backend="fx_fusion"``
(the pass finds the op, and the backend's static launch: what a user gets). Checked first (``_mla_check``): the
two fused sides against eager and stock, every differing value within one step of the stored format, the
differing bytes counted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported: the CPU runs them interpreted

import triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from fx_fusion.kernels import rope_kv_cache as impl  # noqa: E402
from fx_fusion.kernels import mla_rope_store, rope_kv_store  # noqa: E402

MODELS = {"gpt-oss": (64, 8, 64), "llama3-8b": (32, 8, 128), "qwen3-moe": (32, 4, 128)}
TOKENS = [1, 8, 32, 128, 512, 2048, 8192, 32768]
MAX_POS = 65536


def forward_native(q, k, positions, cos_sin_cache, n_q, n_kv, d):
    """SGLang's RotaryEmbedding.forward_native (NeoX) on [T, H*D] q and k: ([T, Hq, D], [T, Hkv, D])."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)

    def rope(x, heads):
        x = x.view(x.shape[0], heads, d)
        x1, x2 = torch.chunk(x, 2, dim=-1)
        c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rope(q, n_q), rope(k, n_kv)


def unfused(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, n_q, n_kv, d):
    """SGLang's RoPE followed by the token-pool store."""
    q_out, k_rot = forward_native(q, k, positions, cos_sin_cache, n_q, n_kv, d)
    k_cache[loc] = k_rot
    v_cache[loc] = v.view(-1, n_kv, d)
    return q_out


def vllm_paged(q, k, v, k_cache, v_cache, slot, positions, cos_sin_cache, n_q, n_kv, d):
    """The same RoPE, stored vLLM-style into a paged cache ``[blocks, block_size, Hkv, D]``."""
    q_out, k_rot = forward_native(q, k, positions, cos_sin_cache, n_q, n_kv, d)
    bs = k_cache.shape[1]
    k_cache[slot // bs, slot % bs] = k_rot
    v_cache[slot // bs, slot % bs] = v.view(-1, n_kv, d)
    return q_out


def hf_sequence(q, k, v, k_cache, v_cache, cache_position, cos, sin, n_q, n_kv, d):
    """Hugging Face attention: ``[B, H, S, D]`` after the transpose, per-token cos/sin, ``StaticCache`` update."""
    b, s = q.shape[:2]
    q, k = q.view(b, s, n_q, d).transpose(1, 2), k.view(b, s, n_kv, d).transpose(1, 2)
    v = v.view(b, s, n_kv, d).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat((-x2, x1), dim=-1)

    q_out = q * cos + rotate_half(q) * sin
    k_cache.index_copy_(2, cache_position, k * cos + rotate_half(k) * sin)
    v_cache.index_copy_(2, cache_position, v)
    return q_out


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def min_bytes(t, n_q, n_kv, d, dtype, table_dtype, q_out_dtype=None) -> int:
    e = torch.empty((), dtype=dtype).element_size()
    qkv_in = t * (n_q + 2 * n_kv) * d * e
    q_out = t * n_q * d * torch.empty((), dtype=q_out_dtype or dtype).element_size()
    kv_out = 2 * t * n_kv * d * e
    table = t * d * torch.empty((), dtype=table_dtype).element_size()  # one cos/sin row per token
    indices = 2 * t * 8  # positions and slots, int64
    return qkv_in + q_out + kv_out + table + indices


def make_case(t, n_q, n_kv, d, dtype=torch.bfloat16, gen=None, num_slots=None, dev="cuda"):
    num_slots = num_slots or max(2 * t, 4096)
    qkv = torch.randn(t, (n_q + 2 * n_kv) * d, dtype=dtype, device=dev, generator=gen)
    q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
    k_cache = torch.randn(num_slots, n_kv, d, dtype=dtype, device=dev, generator=gen)
    v_cache = torch.randn_like(k_cache)
    loc = torch.randperm(num_slots, device=dev, generator=gen)[:t]
    positions = torch.randint(0, MAX_POS, (t,), device=dev, generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    freqs = torch.arange(MAX_POS, device=dev, dtype=torch.float32)[:, None] * inv[None]
    cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache


def check(case, n_q, n_kv, d) -> float:
    """Max abs difference of ours vs. eager (q out and both caches, whole caches compared)."""
    q, k, v, kc, vc, loc, pos, csc = case
    kc2, vc2 = kc.clone(), vc.clone()
    ref_q = unfused(q, k, v, kc2, vc2, loc, pos, csc, n_q, n_kv, d)
    out_q, _ = rope_kv_store(q, k, v, kc, vc, loc, cos_sin_cache=csc, positions=pos)
    return max((out_q.float().reshape(ref_q.shape) - ref_q.float()).abs().max().item(),
               (kc.float() - kc2.float()).abs().max().item(), (vc.float() - vc2.float()).abs().max().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--rep", type=int, default=100, help="ms of replays per measurement")
    ap.add_argument("--sweep", action="store_true", help="time alternative launch configurations (per layout)")
    ap.add_argument("--compiled", action="store_true",
                    help="time compiled functions (stock vs fx_fusion, replay and host loop) instead of the op")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--host-calls", type=int, default=200, help="calls per host-loop measurement")
    ap.add_argument("--host-rounds", type=int, default=5, help="host loops per side (median; sides alternate)")
    ap.add_argument("--bounds-check", action="store_true",
                    help="time the kernel with its slot/position checks (as the graph pass emits it) against without")
    ap.add_argument("--baseline", metavar="FILE",
                    help="time the kernel against the kernels module in FILE (another version), per layout")
    ap.add_argument("--qk-norm", action="store_true",
                    help="QK-norm -> RoPE -> store (Qwen3-8B, Gemma-3-27B): stock compile, norm + op, op with norm")
    ap.add_argument("--fp8-q", action="store_true",
                    help="RoPE -> fp8 q -> store (same shapes): stock compile, op + quantisation, op with fp8 q")
    ap.add_argument("--norm-models", nargs="+", default=list(QK_MODELS), choices=list(QK_MODELS),
                    help="shapes of --qk-norm and --fp8-q")
    ap.add_argument("--mla", action="store_true",
                    help="DeepSeek-V3 MLA: RoPE of q_pe/k_pe -> q cat -> latent pool store; stock vs the MLA op")
    ap.add_argument("--mla-models", nargs="+", default=list(MLA_MODELS), choices=list(MLA_MODELS))
    ap.add_argument("--mla-rows", action="store_true",
                    help="the MLA kernel alone at 1, 2 and 4 kv rows a program (fp8 pools' tile choice)")
    ap.add_argument("--checks", action="store_true", help="with --mla-rows: with the index checks the pass emits")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu: --qk-norm / --fp8-q checks only (the kernel interpreted when TRITON_INTERPRET=1, "
                         "set when no GPU is present; timings meaningless)")
    args = ap.parse_args()

    if args.qk_norm or args.fp8_q:
        norm_and_fp8_tables(args)
        return
    if args.mla:
        mla_table(args)
        return
    if args.mla_rows:
        mla_rows_table(args)
        return
    if args.device != "cuda":
        ap.error("--device cpu runs only --qk-norm and --fp8-q")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.compiled:
        compiled_table(args, bw, gen)
        return
    if args.baseline:
        baseline_table(args, bw, gen)
        return
    if args.bounds_check:
        bounds_check_table(args, bw, gen)
        return
    if args.sweep:
        sweep_table(args, bw, gen)
        return
    print("| model | T | eager us | torch.compile us | fx_fusion us | floor us | fx_fusion % of floor "
          "| speed-up vs compile | max abs err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        n_q, n_kv, d = MODELS[name]
        for t in args.tokens:
            case = make_case(t, n_q, n_kv, d, gen=gen)
            err = check(case, n_q, n_kv, d)
            q, k, v, kc, vc, loc, pos, csc = case
            torch._dynamo.reset()
            compiled = torch.compile(unfused)
            with torch.no_grad():
                compiled(q, k, v, kc, vc, loc, pos, csc, n_q, n_kv, d)  # compile outside the timing
            eager_us = 1e3 * do_bench_cudagraph(lambda: unfused(q, k, v, kc, vc, loc, pos, csc, n_q, n_kv, d),
                                                rep=args.rep, return_mode="median")
            comp_us = 1e3 * do_bench_cudagraph(lambda: compiled(q, k, v, kc, vc, loc, pos, csc, n_q, n_kv, d),
                                               rep=args.rep, return_mode="median")
            ours_us = 1e3 * do_bench_cudagraph(lambda: rope_kv_store(q, k, v, kc, vc, loc, cos_sin_cache=csc,
                                                                      positions=pos),
                                               rep=args.rep, return_mode="median")
            floor_us = 1e6 * min_bytes(t, n_q, n_kv, d, q.dtype, csc.dtype) / bw
            print(f"| {name} | {t} | {eager_us:.2f} | {comp_us:.2f} | {ours_us:.2f} | {floor_us:.2f} | "
                  f"{100 * floor_us / ours_us:.0f}% | {comp_us / ours_us:.2f}x | {err:.3g} |", flush=True)


LAYOUTS = {"token": unfused, "paged": vllm_paged, "sequence": hf_sequence}
BLOCK_SIZE = 16  # paged layout


def layout_case(layout: str, t: int, n_q: int, n_kv: int, d: int, gen, num_slots: int | None = None,
                dtype=torch.bfloat16) -> tuple:
    """Arguments of ``LAYOUTS[layout]`` for T tokens (the sequence layout: one sequence of T tokens).

    ``num_slots``: cache rows (sequence layout: max_seq), by default ``max(2 T, 4096)``; keep it fixed
    across T to reuse one compiled graph (a cache size is static)."""
    num_slots = num_slots or max(2 * t, 4096)
    q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache = make_case(t, n_q, n_kv, d, dtype, gen, num_slots)
    if layout == "token":
        return q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, n_q, n_kv, d
    if layout == "paged":
        k_cache = k_cache.view(-1, BLOCK_SIZE, n_kv, d)
        return q, k, v, k_cache, k_cache.clone().normal_(generator=gen), loc, positions, cos_sin_cache, n_q, n_kv, d
    k_cache = torch.randn(1, n_kv, num_slots, d, dtype=dtype, device="cuda", generator=gen)
    start = int(torch.randint(0, num_slots - t + 1, (1,), device="cuda", generator=gen))
    cache_position = torch.arange(start, start + t, device="cuda")
    # HF: emb = cat(freqs, freqs); cos, sin = emb.cos(), emb.sin() in the model dtype, [1, T, D]
    cos = torch.cat((cos_sin_cache[positions, : d // 2],) * 2, dim=-1)[None].to(dtype)
    sin = torch.cat((cos_sin_cache[positions, d // 2:],) * 2, dim=-1)[None].to(dtype)
    as_seq = lambda x: x.unsqueeze(0)  # noqa: E731  [1, T, H*D]
    return (as_seq(q), as_seq(k), as_seq(v), k_cache, torch.randn_like(k_cache), cache_position, cos, sin,
            n_q, n_kv, d)


def host_loop_us(fns: dict, args, calls: int, rounds: int, warmup: int = 10) -> dict:
    """Microseconds per call of ``calls`` back-to-back calls without CUDA graphs, one sync at the end, for
    each function in ``fns``: the median of ``rounds`` loops, the functions taking turns loop by loop so
    that both see the same machine (host timings drift by tens of us over a run)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn(*args)
    sync()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            sync()
            times[name].append(1e6 * (time.perf_counter() - start) / calls)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def with_fused_qkv(fn, n_q: int, n_kv: int, d: int):
    """``fn`` taking one fused qkv tensor and splitting it inside, as a model splits its projection: the
    q/k/v views then have static strides in the graph even when the token count is dynamic."""
    def f(qkv, *rest):
        q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
        return fn(q, k, v, *rest)
    f.__name__ = fn.__name__
    return f


def compiled_table(args, bw: float, gen) -> None:
    """Stock torch.compile vs backend="fx_fusion" on each layout: replay medians and host loops.

    One compiled function per side, layout and model, called at every T without a reset, as a server
    calls its prefill: Dynamo compiles T = 1, the first other T, then one graph with a dynamic T."""
    import fx_fusion  # noqa: F401  (registers backend="fx_fusion")
    from torch._dynamo.utils import counters

    print("| layout | model | T | stock replay us | fx_fusion replay us | replay speed-up | floor us "
          "| fx_fusion % of floor | stock host us/call | fx_fusion host us/call | host speed-up | fused / graphs "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    num_slots = max(4096, 2 * max(args.tokens))
    for layout in args.layouts:
        fn = LAYOUTS[layout]
        for name in args.models:
            n_q, n_kv, d = MODELS[name]
            torch._dynamo.reset()
            counters.clear()
            fused = with_fused_qkv(fn, n_q, n_kv, d)
            compiled = {"stock": torch.compile(fused), "fx_fusion": torch.compile(fused, backend="fx_fusion")}
            for t in args.tokens:
                q, k, v, *rest = layout_case(layout, t, n_q, n_kv, d, gen, num_slots)
                case = (torch.cat((q, k, v), dim=-1), *rest)
                caches = (case[1], case[2])
                start = [c.clone() for c in caches]
                replay, outs = {}, {}
                with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
                    for side, f in compiled.items():
                        for c, c0 in zip(caches, start):
                            c.copy_(c0)  # same starting caches for both sides
                        out = f(*case)
                        outs[side] = (out.float(), *(c.float() for c in caches))
                        replay[side] = 1e3 * do_bench_cudagraph(lambda: f(*case), rep=args.rep, return_mode="median")
                    host = host_loop_us(compiled, case, args.host_calls, args.host_rounds)
                sides = {side: (replay[side], host[side]) for side in compiled}
                fx = counters["fx_fusion"]
                diff = max((a - b).abs().max().item() for a, b in zip(outs["stock"], outs["fx_fusion"]))
                (s_rep, s_host), (f_rep, f_host) = sides["stock"], sides["fx_fusion"]
                # per token: one fp32 cos|sin row (token, paged) or a bf16 cos row and sin row (sequence): 4*D bytes
                floor_us = 1e6 * min_bytes(t, n_q, n_kv, d, q.dtype, torch.float32) / bw
                print(f"| {layout} | {name} | {t} | {s_rep:.2f} | {f_rep:.2f} | {s_rep / f_rep:.2f}x | {floor_us:.2f} "
                      f"| {100 * floor_us / f_rep:.0f}% | {s_host:.1f} | {f_host:.1f} | {s_host / f_host:.2f}x "
                      f"| {fx['rope_kv_store_fused']} / {fx['graphs']} | {diff:.3g} |", flush=True)


def _problem(module, layout: str, case: tuple, **options):
    """``module.prepare`` of a ``layout_case`` (the kernel's own arguments, no graph in between); ``options``: more
    of prepare's keyword arguments (a ``--baseline`` module's prepare takes its options by keyword too)."""
    q, k, v, k_cache, v_cache, index, a, b, n_q, n_kv, d = case
    if layout == "sequence":  # index: cache positions; a, b: per-token cos, sin [1, T, D]
        t = q.shape[1]
        return module.prepare(q.view(1, t, n_q, d), k.view(1, t, n_kv, d), v.view(1, t, n_kv, d), k_cache, v_cache,
                              index, a, b, None, rotary_dim=d, layout=layout, **options)
    half = d // 2  # index: slots; a: positions; b: the fp32 cos_sin_cache
    return module.prepare(q, k, v, k_cache, v_cache, index, b[:, :half], b[:, half:], a, rotary_dim=d, layout=layout,
                          **options)


def baseline_table(args, bw: float, gen) -> None:
    """CUDA-graph replay medians of this kernel and of another version of it (``--baseline FILE``), per layout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_rope_kv_cache", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = baseline  # its dataclasses look their module up
    spec.loader.exec_module(baseline)
    print(f"baseline: {args.baseline}")
    _side_by_side(args, bw, gen, ("baseline", "current"),
                  lambda layout, case: [(m, _problem(m, layout, case)) for m in (baseline, impl)])


def bounds_check_table(args, bw: float, gen) -> None:
    """CUDA-graph replay medians of the kernel without and with ``check_slots``/``check_positions`` (device-side
    assertions compiled in, as Inductor compiles the launches the graph pass emits), per layout, side by side.
    The sequence layout has per-token cos/sin: only its slots are checked."""
    def variants(layout, case):
        return [(impl, _problem(impl, layout, case)),
                (impl, _problem(impl, layout, case, check_slots=True, check_positions=True))]

    _side_by_side(args, bw, gen, ("unchecked", "checked"), variants)


def _side_by_side(args, bw: float, gen, names: tuple[str, str], variants) -> None:
    """For each layout, model and T: replay medians of two launches of one case (``variants(layout, case)``: two
    ``(kernels module, problem)`` pairs), named ``names``, their ratio, and the floor."""
    a, b = names
    print(f"| layout | model | T | {a} us | {b} us | {b} / {a} | floor us | {b} % of floor |")
    print("|---|---|---|---|---|---|---|---|")
    for layout in args.layouts:
        for name in args.models:
            n_q, n_kv, d = MODELS[name]
            for t in args.tokens:
                case = layout_case(layout, t, n_q, n_kv, d, gen)
                times = []
                for module, p in variants(layout, case):
                    q_out = torch.empty(p.q_shape, dtype=p.q.dtype, device="cuda")
                    times.append(1e3 * do_bench_cudagraph(lambda: module.launch(p, q_out, None), rep=args.rep,
                                                          return_mode="median"))
                floor_us = 1e6 * min_bytes(t, n_q, n_kv, d, case[0].dtype, torch.float32) / bw
                print(f"| {layout} | {name} | {t} | {times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.3f} "
                      f"| {floor_us:.2f} | {100 * floor_us / times[1]:.0f}% |", flush=True)


def sweep_table(args, bw: float, gen) -> None:
    """For each layout, model and T: ours under alternative (BLOCK_RQ, BLOCK_RKV, num_warps), the best few."""
    for layout in args.layouts:
        for name in args.models:
            n_q, n_kv, d = MODELS[name]
            for t in args.tokens:
                case = layout_case(layout, t, n_q, n_kv, d, gen)
                p = _problem(impl, layout, case)
                floor_us = 1e6 * min_bytes(t, n_q, n_kv, d, case[0].dtype, torch.float32) / bw
                q_out = torch.empty(p.q_shape, dtype=p.q.dtype, device="cuda")
                results = []
                for brq, ratio, warps in itertools.product([1, 2, 4, 8, 16, 32, 64], [1, 2], [1, 2, 4, 8]):
                    brkv = max(1, brq // ratio)
                    if brq * d > 8192 or brq * d // 2 < 32 * warps // 2:  # tiles far too big, or most lanes idle
                        continue
                    cfg = dict(BLOCK_RQ=brq, BLOCK_RKV=brkv, num_warps=warps)
                    us = 1e3 * do_bench_cudagraph(lambda: impl.launch(p, q_out, None, **cfg), rep=args.rep,
                                                  return_mode="median")
                    results.append((us, cfg))
                results.sort(key=lambda r: r[0])
                default = {k: impl.launch_config(p)[k] for k in ("BLOCK_RQ", "BLOCK_RKV", "num_warps")}
                at_default = next((us for us, cfg in results if cfg == default), float("nan"))
                print(f"{layout} {name} T={t}: default {default} {at_default:.2f}us "
                      f"({100 * floor_us / at_default:.0f}% of floor); best: "
                      + "; ".join(f"{us:.2f}us ({100 * floor_us / us:.0f}%) {cfg}" for us, cfg in results[:3]),
                      flush=True)


# --------------------------------------------------------------------------------------------------
# --qk-norm, --fp8-q: what a model does around the RoPE + store, three compiled sides side by side
# --------------------------------------------------------------------------------------------------

# (Hq, Hkv, D, QK-norm style): Qwen3-8B, Gemma-3-27B, OLMo-2-7B (whole models, no tensor parallelism)
QK_MODELS = {"qwen3-8b": (32, 8, 128, "qwen3"), "gemma3-27b": (32, 16, 128, "gemma3"),
             "olmo2-7b": (32, 32, 128, "olmo2")}
NORM_EPS = 1e-6  # both models' rms_norm_eps
# (atol, rtol) of a side against stock (--qk-norm's outputs and caches, --fp8-q's caches): bf16 values below 8 in
# magnitude (unit-RMS heads times weights near 1, rotated; randn caches), which the sides round at different
# points: the fused norm sums the squares in its own order (the normalised value at most one bf16 step from
# eager's, README "The op"), Inductor and the kernel compute the rotation in fp32 and round once (NVIDIA: with
# FMAs, which Inductor may place elsewhere). One bf16 step of an operand in [4, 8) is 2**-5 and carries through
# the rotation as such even where the result cancels to a small value: the check allows two (atol 2**-4), and
# torch's bf16 rtol. (CPU, T = 1 and 8: at most one step, 2**-5, measured.)
QK_NORM_TOL = (2.0 ** -4, 1.6e-2)
FP8_Q = torch.float8_e4m3fn
FP8_Q_MAX = 448.0
# a static per-tensor q scale (a calibrated checkpoint's): a 0-d fp32 tensor, so ``q_rot / q_scale`` is bf16 (type
# promotion), as the op's default q_quant_dtype; not a power of two, so the division rounds; q_rot up to ~5 times
# 1 / scale ~ 410: near e4m3's 448, a few values of the largest rows clamp
Q_SCALE = 0.0123
FP8_Q_STEP = 2.0 ** -3  # one e4m3 step (3 mantissa bits), relative to the larger of two neighbouring values


def qwen3_rms_norm(x, weight, eps):
    """HF ``Qwen3RMSNorm.forward``: fp32 normalised value rounded to x's dtype, times the weight in x's dtype."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def gemma3_rms_norm(x, weight, eps):
    """HF ``Gemma3RMSNorm.forward``: fp32 throughout, times ``1 + w`` in fp32, rounded once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def olmo2_rms_norm(x, weight, eps):
    """HF ``Olmo2RMSNorm.forward`` (over the whole ``[T, H * D]`` projection): fp32 throughout, times the weight,
    rounded once."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(input_dtype)


# style -> (the model's norm, the op's options that compute it)
NORM_STYLES = {"qwen3": (qwen3_rms_norm, dict(norm_round=True, norm_offset=0.0)),
               "gemma3": (gemma3_rms_norm, dict(norm_round=False, norm_offset=1.0)),
               "olmo2": (olmo2_rms_norm, dict(norm_round=False, norm_offset=0.0, norm_full_width=True))}


def _norms(q, k, q_w, k_w, n_q, n_kv, d, style):
    """The model's QK-norm of ``style``: of each head, or (OLMo 2) of a token's whole q and k, then the heads."""
    norm = NORM_STYLES[style][0]
    if NORM_STYLES[style][1].get("norm_full_width"):
        return (norm(q.reshape(-1, n_q * d), q_w, NORM_EPS).view(-1, n_q, d),
                norm(k.reshape(-1, n_kv * d), k_w, NORM_EPS).view(-1, n_kv, d))
    return norm(q.view(-1, n_q, d), q_w, NORM_EPS), norm(k.view(-1, n_kv, d), k_w, NORM_EPS)


def norm_rope_store(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, q_w, k_w, n_q, n_kv, d, style):
    """The model: QK-norm (HF's RMSNorm of ``style``) -> SGLang's RoPE -> the token-pool store."""
    q, k = _norms(q, k, q_w, k_w, n_q, n_kv, d, style)
    return unfused(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, n_q, n_kv, d)


def norm_then_op(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, q_w, k_w, n_q, n_kv, d, style):
    """The model's QK-norm, then the op doing the RoPE + store only (the RoPE-only fusion)."""
    q, k = _norms(q, k, q_w, k_w, n_q, n_kv, d, style)
    return rope_kv_store(q, k, v, k_cache, v_cache, loc, cos_sin_cache=cos_sin_cache, positions=positions)[0]


def op_with_norm(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, q_w, k_w, n_q, n_kv, d, style):
    """The op with the norm inside: norm, RoPE and store in one launch."""
    return rope_kv_store(q, k, v, k_cache, v_cache, loc, cos_sin_cache=cos_sin_cache, positions=positions,
                         q_norm=True, k_norm=True, norm_eps=NORM_EPS, q_norm_weight=q_w, k_norm_weight=k_w,
                         **NORM_STYLES[style][1])[0]


def rope_store_fp8_q(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, q_scale, n_q, n_kv, d):
    """The model: SGLang's RoPE -> the store -> q quantised for an fp8 attention with a static scale."""
    q_rot = unfused(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, n_q, n_kv, d)
    return (q_rot / q_scale).clamp(-FP8_Q_MAX, FP8_Q_MAX).to(FP8_Q)


def op_then_fp8_q(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, q_scale, n_q, n_kv, d):
    """The op with bf16 q, then the model's quantisation of q."""
    q_rot = rope_kv_store(q, k, v, k_cache, v_cache, loc, cos_sin_cache=cos_sin_cache, positions=positions)[0]
    return (q_rot / q_scale).clamp(-FP8_Q_MAX, FP8_Q_MAX).to(FP8_Q)


def op_fp8_q(q, k, v, k_cache, v_cache, loc, positions, cos_sin_cache, q_scale, n_q, n_kv, d):
    """The op emitting fp8 q: the same quantisation in the same launch. Eager CUDA reads a 0-d CUDA scale rounded
    to the quotient's dtype (``patterns/quant.py::scale_rounding``): the op rounds it as it loads it
    (``q_scale_round``), as the pass asks of it."""
    return rope_kv_store(q, k, v, k_cache, v_cache, loc, cos_sin_cache=cos_sin_cache, positions=positions,
                         q_fp8_dtype=FP8_Q, q_scale=q_scale, q_clamp=(-FP8_Q_MAX, FP8_Q_MAX),
                         q_scale_round=q_scale.is_cuda)[0]


# table -> (the three sides: stock's model code, the op plus the rest compiled, the op doing it all), each compiled
# with plain torch.compile; a fourth, "fx", is stock's model code compiled with backend="fx_fusion" (what a user
# gets: the pass puts the norm or the quantisation into the op, and the backend launches it statically)
THREE_SIDES = {"qk-norm": (norm_rope_store, norm_then_op, op_with_norm),
               "fp8-q": (rope_store_fp8_q, op_then_fp8_q, op_fp8_q)}
SIDE_NAMES = {"qk-norm": ("stock", "op + norm", "fused"), "fp8-q": ("stock", "op + quant", "fused")}


def norm_and_fp8_tables(args) -> None:
    """``--qk-norm`` and ``--fp8-q``: per model and T, the three sides' replay medians, host loops and checks."""
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    if dev.type == "cuda":
        bw = copy_bandwidth()
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
              f"copy bandwidth {bw / 1e9:.0f} GB/s")
    else:
        bw = None
        how = ("the Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1"
               else "its fp32 torch reference (TRITON_INTERPRET unset)")
        print(f"# CPU | torch {torch.__version__} | triton {triton.__version__} | the op runs through {how}; no "
              "replay, no floor, host loops of 2 calls: CPU timings are meaningless, the checks are the point")
    failed = []
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), _recompile_limit(64):
        for table in ("qk-norm", "fp8-q"):
            if getattr(args, table.replace("-", "_")):
                failed += three_sides_table(table, args, dev, bw, gen)
    if failed:
        print(f"FAILED checks: {', '.join(failed)}")
        sys.exit(1)


def _recompile_limit(n: int):
    """Dynamo's per-code-object recompile limit raised to ``n`` (the sides share ``with_fused_qkv``'s code)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            return torch._dynamo.config.patch(**{name: n})
    raise RuntimeError("torch._dynamo.config has neither recompile_limit nor cache_size_limit")


def three_sides_table(table: str, args, dev: torch.device, bw: float | None, gen) -> list[str]:
    """One ``--qk-norm`` or ``--fp8-q`` table; returns the points whose check failed.

    One compiled function per side and model, called at every T without a reset (as ``--compiled``): Dynamo
    compiles T = 1, the first other T, then one graph with a dynamic T."""
    import fx_fusion  # noqa: F401  (registers backend="fx_fusion")
    from torch._dynamo.utils import counters

    cuda = dev.type == "cuda"
    names = SIDE_NAMES[table]
    a, b, c = names
    if table == "qk-norm":
        what = (f"QK-norm (HF Qwen3RMSNorm / Gemma3RMSNorm / Olmo2RMSNorm, eps {NORM_EPS}) -> RoPE -> store; check: "
                f"{b} and {c} against stock, q out and whole caches, allclose(atol={QK_NORM_TOL[0]:g}, "
                f"rtol={QK_NORM_TOL[1]:g})")
    else:
        what = (f"RoPE -> store -> q to {FP8_Q} with a static scale {Q_SCALE} (0-d fp32), clamp +-{FP8_Q_MAX:g}; "
                f"check: {c}'s q byte-exact against eager's quantisation of the op's bf16 q; q of {b} and {c} "
                f"against stock within one e4m3 step, caches at allclose(atol={QK_NORM_TOL[0]:g}, "
                f"rtol={QK_NORM_TOL[1]:g})")
    print(f"\n## --{table}: {what}; bf16, token pool at random slots; times in us"
          + ("" if cuda else " (CPU: meaningless)"))
    print(f"| model | T | {a} replay | {b} replay | {c} replay | fx replay | floor | {c} % of floor | fx % of floor "
          f"| {c} / {a} | {c} / {b} | fx / {a} | fx / {b} | {a} host/call | {b} host/call | {c} host/call "
          f"| fx host/call | {c} / {a} host | {c} / {b} host | fx / {a} host | fx / {b} host | fx fused / graphs "
          "| check |")
    print("|---" * 23 + "|")
    failed = []
    num_slots = max(4096, 2 * max(args.tokens))
    for name in args.norm_models:
        n_q, n_kv, d, style = QK_MODELS[name]
        torch._dynamo.reset()
        counters.clear()
        sides = {side: torch.compile(with_fused_qkv(fn, n_q, n_kv, d))
                 for side, fn in zip(names, THREE_SIDES[table])}
        sides["fx"] = torch.compile(with_fused_qkv(THREE_SIDES[table][0], n_q, n_kv, d), backend="fx_fusion")
        for t in args.tokens:
            q, k, v, kc, vc, loc, pos, csc = make_case(t, n_q, n_kv, d, gen=gen, num_slots=num_slots, dev=dev)
            if table == "qk-norm":
                offset = 0.0 if style == "gemma3" else 1.0  # Gemma stores w for its 1 + w
                full = NORM_STYLES[style][1].get("norm_full_width", False)
                q_w, k_w = (torch.randn(d * (h if full else 1), generator=gen, device=dev).mul(0.1).add(offset)
                            .to(q.dtype) for h in (n_q, n_kv))
                extra = (q_w, k_w)
            else:
                extra = (torch.tensor(Q_SCALE, dtype=torch.float32, device=dev),)
                style = None
            case = (torch.cat((q, k, v), dim=-1), kc, vc, loc, pos, csc, *extra, n_q, n_kv, d,
                    *((style,) if style else ()))
            ok, detail = _check_sides(table, sides, case, with_fused_qkv(THREE_SIDES[table][0], n_q, n_kv, d))
            if not ok:
                failed.append(f"{table} {name} T={t}")
            if cuda:
                replay = [1e3 * do_bench_cudagraph(lambda: f(*case), rep=args.rep, return_mode="median")
                          for f in sides.values()]
                calls, rounds, warmup = args.host_calls, args.host_rounds, 10
            else:
                replay = [float("nan")] * 4
                calls, rounds, warmup = 2, 1, 0
            host = list(host_loop_us(sides, case, calls, rounds, warmup).values())
            q_out_dtype = FP8_Q if table == "fp8-q" else None
            nbytes = min_bytes(t, n_q, n_kv, d, q.dtype, csc.dtype, q_out_dtype)
            if table == "qk-norm":  # the two weights
                nbytes += (n_q + n_kv if full else 2) * d * q.element_size()
            floor_us = 1e6 * nbytes / bw if bw else float("nan")
            cells = [*replay, floor_us, 100 * floor_us / replay[2], 100 * floor_us / replay[3],
                     replay[2] / replay[0], replay[2] / replay[1], replay[3] / replay[0], replay[3] / replay[1],
                     *host, host[2] / host[0], host[2] / host[1], host[3] / host[0], host[3] / host[1]]
            specs = [".2f"] * 5 + [".0f", ".0f"] + [".2f"] * 4 + [".1f"] * 4 + [".2f"] * 4
            fx = counters["fx_fusion"]
            print(f"| {name} | {t} | " + " | ".join("-" if x != x else format(x, spec) for x, spec in zip(cells, specs))
                  + f" | {fx['rope_kv_store_fused']} / {fx['graphs']} | {detail} |", flush=True)
    return failed


def _check_sides(table: str, sides: dict, case: tuple, eager) -> tuple[bool, str]:
    """Run every side once from the same caches and compare with stock; returns (all checks held, the row's text).

    --qk-norm: q out and the whole caches at ``QK_NORM_TOL``. --fp8-q: the caches at ``QK_NORM_TOL``; q's bytes
    exact where the maths is the same, against the op's own bf16 q quantised in eager (``(q_rot / q_scale)`` in
    bf16, clamp, cast): the fused quantisation must be that bit for bit. Against stock q is not byte-exact, nor
    can it be: Inductor fuses RoPE, division and cast in fp32 without eager's bf16 roundings of q_rot and of the
    quotient (and so does the op + quant side's division), so a value near an e4m3 rounding boundary lands one
    code apart; the check there is that every differing byte is one e4m3 step at most (``FP8_Q_STEP``).
    fx (the model code with backend="fx_fusion") is checked against the model code run eagerly: bytes differing
    counted, values within ``QK_NORM_TOL`` (fp8 q dequantised: within one e4m3 step or the atol). The caches end as
    the last side left them."""
    qkv, kc, vc = case[:3]
    start = (kc.clone(), vc.clone())
    results = {}
    for side, f in {**sides, "eager": eager}.items():
        kc.copy_(start[0])
        vc.copy_(start[1])
        out = f(*case)  # the first call of a compiled side at this T may compile
        results[side] = (out.reshape(qkv.shape[0], -1), kc.clone(), vc.clone())
    stock, eager, fx = results.pop("stock"), results.pop("eager"), results.pop("fx")
    atol, rtol = QK_NORM_TOL

    def close(x, y):
        return torch.allclose(x.float(), y.float(), atol=atol, rtol=rtol)

    def max_diff(x, y):
        return max((p.float() - r.float()).abs().max().item() for p, r in zip(x, y))

    oks, texts = [], []
    for side, got in results.items():
        caches_ok = close(got[1], stock[1]) and close(got[2], stock[2])
        if table == "qk-norm":
            oks.append(caches_ok and close(got[0], stock[0]))
            texts.append(f"{side} max diff {max_diff(got, stock):.3g}")
            continue
        a, b = got[0].float(), stock[0].float()
        differ = got[0].view(torch.uint8) != stock[0].view(torch.uint8)
        # one e4m3 step: 2**-3 of the larger magnitude (normal range), 2**-9 (subnormals)
        within_step = bool(((a - b).abs() <= torch.maximum(a.abs(), b.abs()) * FP8_Q_STEP + 2.0 ** -9).all())
        oks.append(caches_ok and within_step)
        texts.append(f"{side}: {int(differ.sum())} of {differ.numel()} q bytes differ from stock"
                     f" ({'each' if within_step else 'NOT all'} within one e4m3 step), caches max diff "
                     f"{max_diff(got[1:], stock[1:]):.3g}")
    if table == "fp8-q":  # the fused quantisation against eager's, of the op's own bf16 q
        q, k, v = qkv.split([case[-3] * case[-1], case[-2] * case[-1], case[-2] * case[-1]], dim=-1)
        _, _, _, loc, pos, csc, q_scale = case[:7]
        kc.copy_(start[0])
        vc.copy_(start[1])
        q_rot = rope_kv_store(q, k, v, kc, vc, loc, cos_sin_cache=csc, positions=pos)[0].reshape(qkv.shape[0], -1)
        want = (q_rot / q_scale).clamp(-FP8_Q_MAX, FP8_Q_MAX).to(FP8_Q)
        exact = int((results["fused"][0].view(torch.uint8) != want.view(torch.uint8)).sum())
        oks.append(exact == 0)
        texts.append(f"fused vs eager quantisation of the op's bf16 q: {exact} bytes differ")
    # fx: the model code through the pass, against the model code run eagerly. The op computes each product of the
    # rotation in fp32 where this bf16 model code rounds it to bf16 (README, "Exactness"), as stock's fp32 maths
    # does not either: where the two products nearly cancel, eager's q is far from both in e4m3 steps. So fx's q
    # is compared dequantised (times q_scale): within one e4m3 step or the bf16 caches' atol; bytes differing are
    # counted.
    differ = [int((x.contiguous().view(torch.uint8) != y.contiguous().view(torch.uint8)).sum())
              for x, y in zip(fx, eager)]
    if table == "qk-norm":
        oks.append(all(close(x, y) for x, y in zip(fx, eager)))
    else:
        a, b = fx[0].float() * case[6].item(), eager[0].float() * case[6].item()  # dequantised
        q_ok = bool(((a - b).abs() <= torch.maximum(a.abs(), b.abs()) * FP8_Q_STEP + atol).all())
        oks.append(q_ok and close(fx[1], eager[1]) and close(fx[2], eager[2]))
    texts.append(f"fx vs eager: q / k cache / v cache bytes differing {' / '.join(map(str, differ))}")
    return all(oks), ("ok; " if all(oks) else "FAILED; ") + "; ".join(texts)



# --mla: DeepSeek-V3's latent cache; model -> q heads of one shard
MLA_MODELS = {"dsv3-tp8": 16, "dsv3-tp1": 128}
MLA_L, MLA_R, MLA_NOPE = 512, 64, 128
MLA_K_SCALE = 0.05  # randn rows / 0.05 stay far inside e4m3's +-448 (no clamp in the model; beyond it is NaN)
MLA_TOL = (2e-2, 2e-2)


def mla_rope(x, cos, sin):
    """DeepSeek's GPT-J rotation of ``x [T, H, R]`` with fp32 ``cos``/``sin`` ``[T, 1, R / 2]``, rounded once."""
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2).to(x.dtype)


def mla_model(q_nope, q_pe, kv_c, k_pe, pool, loc, positions, cos_sin_cache, k_scale):
    """The absorbed decode's RoPE, q cat and latent store as SGLang's DeepSeek model writes them."""
    cos, sin = (c.unsqueeze(-2) for c in cos_sin_cache[positions].chunk(2, dim=-1))
    q_rot, k_rot = mla_rope(q_pe, cos, sin), mla_rope(k_pe.unsqueeze(1), cos, sin)
    row = torch.cat([kv_c.unsqueeze(1), k_rot], dim=-1)
    if k_scale is not None:
        row = (row / k_scale).to(torch.float8_e4m3fn).view(torch.uint8)
    pool[loc] = row
    return torch.cat([q_nope, q_rot], dim=-1)


def mla_op(q_nope, q_pe, kv_c, k_pe, pool, loc, positions, cos_sin_cache, k_scale):
    """The MLA op doing all of it (the fp8 pool: SGLang's bf16 quotient, as ``mla_model`` rounds it; eager CUDA
    reads a 0-d CUDA scale rounded to the quotient's dtype, which the op does as it loads it: ``scale_round``, as
    the graph pass asks of it)."""
    fp8 = {} if k_scale is None else dict(fp8_dtype=torch.float8_e4m3fn, quant_dtype=torch.bfloat16,
                                          scale_round=k_scale.is_cuda)
    return mla_rope_store(q_pe, k_pe, kv_c, pool, loc, q_nope=q_nope, cos_sin_cache=cos_sin_cache,
                          positions=positions, is_neox=False, k_scale=k_scale, **fp8)[0]


def mla_case(t: int, n_q: int, fp8: bool, num_slots: int, gen, dev):
    """Inputs as the absorbed decode has them: q_pe a slice of q's projection, k_pe one of kv_a_proj's."""
    bf16 = dict(dtype=torch.bfloat16, device=dev)
    q = torch.randn(t, n_q, MLA_NOPE + MLA_R, generator=gen, **bf16)
    latent = torch.randn(t, MLA_L + MLA_R, generator=gen, **bf16)
    q_nope = torch.randn(t, n_q, MLA_L, generator=gen, **bf16)
    kv_c = torch.randn(t, MLA_L, generator=gen, **bf16)
    pool = torch.randn(num_slots, 1, MLA_L + MLA_R, generator=gen, **bf16)
    k_scale = None
    if fp8:
        pool = (pool / MLA_K_SCALE).to(torch.float8_e4m3fn).view(torch.uint8)
        k_scale = torch.tensor(MLA_K_SCALE, dtype=torch.float32, device=dev)
    loc = torch.randperm(num_slots, generator=gen, device=dev)[:t]
    positions = torch.randint(0, MAX_POS, (t,), generator=gen, device=dev)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, MLA_R, 2, device=dev, dtype=torch.float32) / MLA_R))
    freqs = torch.outer(torch.arange(MAX_POS, device=dev, dtype=torch.float32), inv_freq)
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return (q_nope, q[..., MLA_NOPE:], kv_c, latent[:, MLA_L:], pool, loc, positions, cos_sin_cache, k_scale)


def mla_min_bytes(t: int, n_q: int, fp8: bool) -> int:
    """Reads: q_nope, q_pe, kv_c, k_pe, one fp32 table row and two int64 indices per token; writes: q out, the rows."""
    reads = 2 * t * (n_q * (MLA_L + MLA_R) + MLA_L + MLA_R) + 4 * t * MLA_R + 2 * 8 * t
    writes = 2 * t * n_q * (MLA_L + MLA_R) + t * (MLA_L + MLA_R) * (1 if fp8 else 2)
    return reads + writes


def _mla_check(sides: dict, case: tuple) -> tuple[bool, str]:
    """Every side and eager ``mla_model`` once from the same pool: untouched rows intact; each fused side against
    eager (its rounding: one rounding of the fp32 rotation, SGLang's bf16 quotient before the fp8 cast) and stock
    (Inductor keeps fp32 between the steps), each differing value within one step of the stored format (bf16:
    2**-7 relative; fp8: one e4m3 step, 2**-3), with the count of differing bytes. A GPU contracts ``x1 * c - x2 * s`` into
    an FMA where eager rounds both products, so a rotated value near a bf16 rounding boundary may land one step
    from eager's (the CPU interpreter matches eager bit for bit: ``tests/kernels/test_mla.py``)."""
    pool, loc = case[4], case[5]
    start = pool.clone()
    got = {}
    for name, f in (*sides.items(), ("eager", mla_model)):
        pool.copy_(start)
        got[name] = (f(*case).clone(), pool.clone())
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    untouched[loc] = False
    ok = all(torch.equal(got[side][1][untouched], start[untouched]) for side in sides)
    texts = []
    for side in sides:
        for other in ("eager", "stock"):
            if side == other:
                continue
            differ = 0
            for a, b in zip(got[side], got[other]):
                differ += int((a.view(torch.uint8) != b.view(torch.uint8)).sum())
                if a.dtype == torch.uint8:
                    a, b, step = a.view(torch.float8_e4m3fn).float(), b.view(torch.float8_e4m3fn).float(), FP8_Q_STEP
                else:
                    a, b, step = a.float(), b.float(), 2.0 ** -7  # one bf16 step: up to 2**-7 of the value
                ok &= bool(((a - b).abs() <= torch.maximum(a.abs(), b.abs()) * step + 2.0 ** -9).all())
            texts.append(f"{side}/{other} {differ}")
    return ok, f"{'ok' if ok else 'FAILED'}; bytes differing " + ", ".join(texts)


def mla_table(args) -> None:
    """``--mla``: per model, pool dtype and T, stock, the MLA op and the pass: replay medians, host loops, checks."""
    import fx_fusion  # noqa: F401  (registers backend="fx_fusion")
    from torch._dynamo.utils import counters

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print("\n## --mla: DeepSeek-V3 MLA (L 512, R 64, GPT-J pairs): RoPE of q_pe/k_pe -> q cat -> latent pool at "
          "random slots; times in us; op = torch.compile of the MLA op, fx = the model code with backend=\"fx_fusion\"")
    print("| model | pool | T | stock replay | op replay | fx replay | floor | fx % of floor | op / stock | fx / stock "
          "| stock host/call | op host/call | fx host/call | op / stock host | fx / stock host | fused / graphs | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = []
    num_slots = max(4096, 2 * max(args.tokens))
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), _recompile_limit(64):
        for name, fp8 in itertools.product(args.mla_models, (False, True)):
            n_q = MLA_MODELS[name]
            torch._dynamo.reset()
            counters.clear()
            sides = {"stock": torch.compile(mla_model), "op": torch.compile(mla_op),
                     "fx": torch.compile(mla_model, backend="fx_fusion")}
            for t in args.tokens:
                case = mla_case(t, n_q, fp8, num_slots, gen, dev)
                ok, detail = _mla_check(sides, case)
                if not ok:
                    failed.append(f"mla {name} fp8={fp8} T={t}")
                replay = [1e3 * do_bench_cudagraph(lambda: f(*case), rep=args.rep, return_mode="median")
                          for f in sides.values()]
                host = list(host_loop_us(sides, case, args.host_calls, args.host_rounds).values())
                floor_us = 1e6 * mla_min_bytes(t, n_q, fp8) / bw
                fx = counters["fx_fusion"]
                print(f"| {name} | {'fp8' if fp8 else 'bf16'} | {t} | {replay[0]:.2f} | {replay[1]:.2f} | "
                      f"{replay[2]:.2f} | {floor_us:.2f} | {100 * floor_us / replay[2]:.0f} | "
                      f"{replay[1] / replay[0]:.2f} | {replay[2] / replay[0]:.2f} | {host[0]:.1f} | {host[1]:.1f} | "
                      f"{host[2]:.1f} | {host[1] / host[0]:.2f} | {host[2] / host[0]:.2f} | "
                      f"{fx['rope_kv_store_fused']} / {fx['graphs']} | {detail} |", flush=True)
    if failed:
        print(f"FAILED checks: {', '.join(failed)}")
        sys.exit(1)


def mla_rows_table(args) -> None:
    """``--mla-rows``: replay medians of the MLA kernel (``mla.launch``) at the default launch configuration and at
    1, 2 and 4 cache rows a kv program (``BLOCK_RKV``), bf16 and fp8 pools; ``--checks``: with the index checks (as
    the pass launches it). The written bytes must not depend on the tile."""
    from fx_fusion.kernels import mla

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy bandwidth {bw / 1e9:.0f} GB/s | index checks {'on' if args.checks else 'off'}")
    variants = {"default": {}, "1 row": {"BLOCK_RKV": 1}, "2 rows": {"BLOCK_RKV": 2}, "4 rows": {"BLOCK_RKV": 4}}
    print("| model | pool | T | " + " | ".join(f"{v} us" for v in variants) + " | default % of floor | same bytes |")
    print("|---|---|---|" + "---|" * (len(variants) + 2))
    num_slots = max(4096, 2 * max(args.tokens))
    for name, fp8 in itertools.product(args.mla_models, (False, True)):
        for t in args.tokens:
            q_nope, q_pe, kv_c, k_pe, pool, loc, positions, table, k_scale = mla_case(
                t, MLA_MODELS[name], fp8, num_slots, gen, dev)
            fp8_options = dict(fp8_dtype=torch.float8_e4m3fn, quant_dtype=torch.bfloat16, scale_round=True)
            p = mla.prepare_mla(q_pe, q_nope, k_pe, kv_c, pool, loc, *table.chunk(2, dim=-1), positions, k_scale,
                                is_neox=False, check_slots=args.checks, check_positions=args.checks,
                                **(fp8_options if fp8 else {}))
            q_out, _ = mla.outputs(p)
            start, times, written = pool.clone(), {}, {}
            for v, config in variants.items():
                pool.copy_(start)
                mla.launch(p, q_out, None, **config)
                written[v] = (q_out.clone(), pool.clone())
                times[v] = 1e3 * do_bench_cudagraph(lambda: mla.launch(p, q_out, None, **config), rep=args.rep,
                                                    return_mode="median")
            same = all(torch.equal(a, b) for v in variants for a, b in zip(written[v], written["default"]))
            floor_us = 1e6 * mla_min_bytes(t, MLA_MODELS[name], fp8) / bw
            print(f"| {name} | {'fp8' if fp8 else 'bf16'} | {t} | " + " | ".join(f"{times[v]:.2f}" for v in variants)
                  + f" | {100 * floor_us / times['default']:.0f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
