"""The fusion pass's own compile time by stage, on ``bench_e2e.py``'s decoder (one model per process).

Compiles a decode step (the token count symbolic) and a static prefill with ``backend="fx_fusion"`` (FX graph and
AOT caches off), and prints per graph the pass's time and share of the first call (compile plus one run), the
traced replacements made and shared, and the time of each stage: canonicalisation, finding sites, planning,
tracing (``make_fx``), re-running a shared trace on a site's own fake values, splicing; the garbage collector's
time inside the pass; and, beside the pass, Inductor's analyses of the kernel (TTIR generations, in the pass's
traces and in Inductor's lowering).

    python benchmarks/bench_pass.py --model a --layers 8
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e as be  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import fx_fusion.patterns.rewrite as rewrite  # noqa: E402
import fx_fusion.patterns.rope_kv_store as rope_kv_store  # noqa: E402
import fx_fusion.patterns.splice as splice  # noqa: E402

STAGES = collections.Counter()
CALLS = collections.Counter()


def _time(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STAGES[label] += time.perf_counter() - start
            CALLS[label] += 1
    setattr(owner, name, timed)


for owner, name, label in ((rope_kv_store, "canonicalize", "canonicalize"), (rope_kv_store, "find_sites", "find"),
                           (rope_kv_store, "can_fuse", "can_fuse"), (rope_kv_store, "rewrite", "rewrite (all)"),
                           (splice.Tracer, "_make_fx", "  make_fx"), (splice.Tracer, "_propagate", "  propagate"),
                           (rewrite, "splice", "  splice")):
    _time(owner, name, label)
# Inductor's analysis of the kernel (its TTIR, made once per configuration: kernels/analysis_cache.py), counted
# apart from the pass: made while the pass traces and while Inductor lowers the launches
from torch._higher_order_ops import triton_kernel_wrap  # noqa: E402

_time(triton_kernel_wrap, "generate_ttir", "kernel TTIR (Inductor's analysis, all calls)")

# Python's cyclic garbage collector while the pass runs (a full collection lands in whichever stage allocates
# when it is due): be.PassGC, installed in main()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="a", choices=list(be.SPECS))
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    be.PassGC.install()
    spec = be.SPECS[args.model]
    hidden, inter = (spec.hidden, spec.intermediate) if dev == "cuda" else (256, 256)
    model = be.Decoder(spec, args.layers, hidden, inter, 4096, 4096, True, torch.bfloat16, dev).eval()
    print(f"model {args.model}, {args.layers} layers, {dev}; torch {torch.__version__}")
    for mode, inputs in (("decode", be.decode_inputs(16, 100, 128, hidden, torch.bfloat16, dev, 0)),
                         ("prefill", be.prefill_inputs(256, hidden, torch.bfloat16, dev, 0))):
        torch._dynamo.reset()
        counters.clear()
        STAGES.clear()
        CALLS.clear()
        be.PassGC.seconds = be.PassGC.full_seconds = 0.0
        be.PassGC.calls = be.PassGC.full = 0
        if mode == "decode":
            be.mark_token_dim_dynamic(inputs, True)
        fn = torch.compile(model, backend="fx_fusion", fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
        total = time.perf_counter() - start
        stats = counters["fx_fusion"]
        print(f"{mode}: first call {total:.2f} s, pass {stats['pass_us'] / 1e3:.0f} ms "
              f"({stats['pass_us'] / 1e4 / total:.1f} %), fused {stats['rope_kv_store_fused']}, traces made "
              f"{stats['replacement_traces']}, shared {stats['replacement_traces_shared']}")
        for label, seconds in STAGES.items():
            print(f"  {label:16s} {seconds * 1e3:7.0f} ms  ({CALLS[label]} calls)")
        print(f"  gc (inside the stages above) {be.PassGC.seconds * 1e3:7.0f} ms  ({be.PassGC.calls} calls, "
              f"{be.PassGC.full} full: {be.PassGC.full_seconds * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
