"""Compile time of the fusion pass on a static-shape prefill of Hugging Face's ``GptOssForCausalLM``.

Small widths (``bench_e2e.py``'s smoke config: hidden 128, 16 q / 2 kv heads of 64) and as many experts,
layers and tokens as asked, so it runs on a CPU. Static shapes are what HF's own torch.compile recipe uses
for a prefill; the token count then is a number in every shape the pass looks at. Prints the first call's
wall time per side (compile plus one run; on a CPU the fx_fusion side's run goes through the fused op's CPU
path) and the pass's own time from ``counters["fx_fusion"]["pass_us"]``.

    python benchmarks/bench_compile.py --layers 4 --experts 32 --tokens 200 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e as be  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokens", type=int, nargs="+", default=[200])
    args = ap.parse_args()
    try:
        import transformers
    except ImportError:
        print("needs transformers")
        return 1
    import fx_fusion  # noqa: F401  (registers backend="fx_fusion")
    from torch._dynamo.utils import counters

    config = be.hf_config(transformers, args.layers, smoke=True)
    config.num_local_experts = args.experts
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = be.hf_model(transformers, config, device)
    print(f"HF GptOssForCausalLM, smoke widths, {args.layers} layers, {args.experts} experts; torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for tokens in args.tokens:
            for name in ("stock", "fx_fusion"):
                torch._dynamo.reset()
                state = be.HFState(transformers, model, 1, tokens, device)
                backend = {} if name == "stock" else {"backend": "fx_fusion"}
                fn = torch.compile(model, fullgraph=True, dynamic=False, **backend)
                ids = torch.randint(0, config.vocab_size, (1, tokens))
                state.rewind(0)
                before = counters["fx_fusion"]["pass_us"]
                t0 = time.perf_counter()
                state.call(fn)(ids)
                wall = time.perf_counter() - t0
                pass_s = (counters["fx_fusion"]["pass_us"] - before) / 1e6
                print(f"{tokens} tokens, {name}: first call {wall:.1f} s"
                      + (f", fusion pass {pass_s:.2f} s, fused {counters['fx_fusion']['rope_kv_store_fused']} "
                         "sites so far" if name == "fx_fusion" else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
