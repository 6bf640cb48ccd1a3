"""What launching the fused kernel costs the host without CUDA graphs: stock torch.compile vs
``backend="fx_fusion"`` with the kernel launched by Triton's launcher vs by Inductor's static launcher.

One process, one of ``bench_e2e.py``'s decoders, three compiled sides called in alternating rounds (a host
loop of N steps and one sync per round; medians over rounds), so the ratio is not the difference between
two processes or machines. Inductor picks a kernel's launcher where it compiles it, so the two fx_fusion
sides compile in this process (``compile_threads=1``), under ``static_launch_user_defined_triton_kernels``
False and True; their in-memory kernel caches are cleared in between so the second does not reuse the
first's kernel. "one call from idle" is one step after a sync: issue time (until the call returns) and
total (until the GPU is done); issue close to total means the step is host-bound.

    python benchmarks/bench_launch.py --model b --layers 8 --points p16 d1
    python benchmarks/bench_launch.py --model a --layers 12 --points d1 d64 p2048

Points: ``pN`` a prefill of N tokens (token dim dynamic), ``dN`` a decode step of batch N.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e as be  # noqa: E402

PAST = 1024


def kernel_launchers() -> list[str]:
    """The compile-result types of the fused kernels in the output code loaded so far."""
    from torch._inductor.codecache import PyCodeCache

    kinds = set()
    for module in list(PyCodeCache.modules) + list(getattr(PyCodeCache, "modules_no_attr", {}).values()):
        for attr in dir(module):
            if attr.startswith("_rope_kv_store_kernel"):
                kinds.update(type(r).__name__ for r in getattr(getattr(module, attr), "compile_results", []))
    return sorted(kinds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="b", choices=list(be.SPECS))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--points", nargs="+", default=["p16", "d1"])
    ap.add_argument("--calls", type=int, default=100, help="steps per round and side")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device (the launchers compared are GPU launchers)")
        return 1

    import fx_fusion  # noqa: F401  (registers backend="fx_fusion")
    from torch._inductor.async_compile import CompiledTritonKernels
    from torch._inductor.codecache import PyCodeCache

    dev, dtype, spec = torch.device("cuda"), torch.bfloat16, be.SPECS[args.model]
    kv_len = be.decode_kv_len(PAST)
    torch.manual_seed(0)
    model = be.Decoder(spec, args.layers, spec.hidden, spec.intermediate, max(64 * kv_len, 2048), 8192, True,
                       dtype, dev).eval()
    for k, v in model.caches():
        torch._dynamo.mark_static_address(k)
        torch._dynamo.mark_static_address(v)
    print(f"## model {args.model}, {args.layers} layers, {torch.cuda.get_device_name()}, torch {torch.__version__}",
          flush=True)
    with torch.no_grad():
        for p in args.points:
            torch._dynamo.reset()
            if p.startswith("p"):
                inputs = be.prefill_inputs(int(p[1:]), spec.hidden, dtype, dev, seed=1)
                be.mark_token_dim_dynamic(inputs, decode=False)
            else:
                inputs = be.decode_inputs(int(p[1:]), PAST, kv_len, spec.hidden, dtype, dev, seed=1)
            fns = {"stock": torch.compile(model, fullgraph=True)}
            outs = {"stock": fns["stock"](*inputs).float()}
            for name, static in (("fx_triton", False), ("fx_static", True)):
                CompiledTritonKernels.cache_clear()
                PyCodeCache.cache_clear()
                fns[name] = torch.compile(model, backend="fx_fusion", fullgraph=True, options={
                    "compile_threads": 1, "fx_graph_cache": False, "static_launch_user_defined_triton_kernels": static})
                t0 = time.perf_counter()
                outs[name] = fns[name](*inputs).float()
                print(f"{p} {name}: compiled in {time.perf_counter() - t0:.1f} s; kernel compile results "
                      f"{kernel_launchers()}", flush=True)
            for f in fns.values():
                for _ in range(5):
                    f(*inputs)
            torch.cuda.synchronize()
            print(f"{p}: max|fx_triton-stock| {(outs['fx_triton'] - outs['stock']).abs().max().item():.3g} "
                  f"max|fx_static-fx_triton| {(outs['fx_static'] - outs['fx_triton']).abs().max().item():.3g}")
            loop = {name: [] for name in fns}
            single = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, f in fns.items():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        f(*inputs)
                    torch.cuda.synchronize()
                    loop[name].append(1e6 * (time.perf_counter() - t0) / args.calls)
                    for _ in range(5):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        f(*inputs)
                        t1 = time.perf_counter()
                        torch.cuda.synchronize()
                        single[name].append((1e6 * (t1 - t0), 1e6 * (time.perf_counter() - t0)))
            median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            base = median(loop["stock"])
            for name in fns:
                med = median(loop[name])
                print(f"{p} {name}: loop us/call median {med:.1f} (min {min(loop[name]):.1f}, max "
                      f"{max(loop[name]):.1f}) vs stock {100 * (base / med - 1):+.1f} %; one call from idle: issue "
                      f"{median([i for i, _ in single[name]]):.1f} us, done {median([t for _, t in single[name]]):.1f} us",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
