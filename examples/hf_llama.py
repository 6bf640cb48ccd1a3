"""A Hugging Face Llama with a StaticCache, compiled with fx_fusion: greedy tokens equal eager's.

    python examples/hf_llama.py                 # CPU: the Triton kernel runs in the interpreter
    python examples/hf_llama.py --device cuda   # GPU

The model is ``transformers``' own ``LlamaForCausalLM`` (random weights from a small ``LlamaConfig``,
nothing downloaded), unmodified. Its attention applies RoPE to q and k, then ``StaticCache`` stores k
and v with ``keys.index_copy_(2, cache_position, k)`` into ``[batch, kv_heads, max_cache_len, head_dim]``
tensors: the "sequence" cache layout. fx_fusion replaces the RoPE and both stores of every layer by one
``torch.ops.fx_fusion.rope_kv_store`` call.

A ``StaticCache`` allocates its tensors lazily, on the first ``update``. When that first update happens
inside the compiled prefill (``--lazy-cache``, HF's own torch.compile recipe), the tensors are created in
the graph (``aten.full``) and the stores are ``index_put`` into those fresh tensors, returned as graph
outputs: the fused op writes them just the same, so every graph fuses either way. Allocating before the
first compiled call (``cache.early_initialization(...)``) lets ``StaticCache`` mark the tensors as static
addresses, which CUDA graphs want. ``model.generate`` with a compile config (part 2) runs the prefill
eagerly, so there the cache is always allocated before compilation.
"""

# %%
# Set-up
# ------
# ``TRITON_INTERPRET=1`` must be set before fx_fusion or triton is imported (CPU only).

import argparse
import inspect
import os
import sys
import tempfile
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--prompt-len", type=int, default=6)
parser.add_argument("--new-tokens", type=int, default=4)
parser.add_argument("--lazy-cache", action="store_true",
                    help="let the compiled prefill allocate the StaticCache (HF's recipe; fused as well)")
parser.add_argument("--skip-generate", action="store_true", help="skip part 2 (model.generate with a compile config)")
parser.add_argument("--dump-dir", default=None, help="where fx_fusion writes its graph dumps (default: a temp dir)")
args = parser.parse_args()

if args.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import fx_fusion  # noqa: E402  (registers backend="fx_fusion"; `pip install -e .` first)
from fx_fusion.__main__ import format_table, load_reports  # noqa: E402

# transformers renamed the forward/generate argument ``past_key_values`` to ``cache`` during 5.x
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda: no CUDA device is available")
device = torch.device(args.device)
dump_root = Path(args.dump_dir or tempfile.mkdtemp(prefix="fx_fusion_hf_llama_"))


# %%
# A tiny random-weight Llama
# --------------------------
# Grouped-query attention (4 query heads, 2 kv heads), SDPA attention. ``eos_token_id=None`` so that
# random weights never stop generation early.

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                     bos_token_id=0, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
model = LlamaForCausalLM(config).to(device).eval()
max_cache_len = args.prompt_len + args.new_tokens
prompt = torch.randint(1, config.vocab_size, (1, args.prompt_len), device=device)


def new_cache(allocate: bool = True) -> StaticCache:
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    if allocate:  # allocate the [1, kv_heads, max_cache_len, head_dim] tensors now, not in the first update
        cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads, head_dim=config.head_dim,
                                   dtype=model.dtype, device=device)
    return cache


def greedy(forward, cache: StaticCache) -> list[int]:
    """Prefill the prompt, then decode one token per call; positions come from the cache."""
    ids, tokens = prompt, prompt[0].tolist()
    with torch.no_grad():
        for _ in range(args.new_tokens):
            logits = forward(input_ids=ids, use_cache=True, **{CACHE_ARG: cache}).logits
            ids = logits[:, -1:].argmax(-1)
            tokens.append(int(ids))
    return tokens


def show_and_check(dump_dir: Path, expect_graphs: int) -> list[str]:
    """Print the dump's site table; return problems (a graph without one fused site per layer)."""
    reports = load_reports(dump_dir)
    print(format_table(reports), end="")
    problems = [] if len(reports) == expect_graphs else [f"{len(reports)} graphs compiled, expected {expect_graphs}"]
    for report in reports:
        fused = sum(site["fused"] for site in report["sites"])
        if fused != args.layers:
            problems.append(f"{report['graph']}: {fused} of {args.layers} layers fused")
    return problems


# %%
# Eager reference
# ---------------
# ``model.generate`` with greedy decoding; our manual loop must agree with it.

with torch.no_grad():
    expected = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                              **{CACHE_ARG: StaticCache(config=config, max_cache_len=max_cache_len)})[0].tolist()
problems = []
if greedy(model, new_cache()) != expected:
    problems.append("the eager manual loop disagrees with model.generate")
print("eager tokens:   ", expected)


# %%
# Part 1: compile ``model.forward`` with ``fx_fusion.compile``
# ------------------------------------------------------------
# Prefill and decode get one graph each; the second decode step reuses the decode graph.

dump_dir = dump_root / "forward"
compiled_forward = fx_fusion.compile(model.forward, dump_dir=str(dump_dir))
tokens = greedy(compiled_forward, new_cache(allocate=not args.lazy_cache))
print("compiled tokens:", tokens)
if tokens != expected:
    problems.append(f"compiled tokens {tokens} differ from eager {expected}")
print(f"fusion report ({dump_dir}):")
problems += show_and_check(dump_dir, expect_graphs=2)


# %%
# Part 2: ``model.generate`` compiles the decode step with fx_fusion
# ------------------------------------------------------------------
# ``generate`` compiles the forward of the decode steps when the cache is static and a compile config
# allows it (on CUDA by default; ``_compile_all_devices`` lets it run on CPU too). The prefill runs
# eagerly and allocates the cache, so the decode graph sees it as an input and every layer fuses.
# ``mode=None``: ``mode`` and ``options`` cannot be given together to ``torch.compile``.

if not args.skip_generate:
    torch._dynamo.reset()
    dump_dir = dump_root / "generate"
    compile_config = CompileConfig(backend="fx_fusion", mode=None, fullgraph=True,
                                   options={"dump_dir": str(dump_dir)})
    compile_config._compile_all_devices = True
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                   compile_config=compile_config,
                                   **{CACHE_ARG: StaticCache(config=config, max_cache_len=max_cache_len)})[0].tolist()
    print("generate (compiled decode) tokens:", generated)
    if generated != expected:
        problems.append(f"generate with fx_fusion gave {generated}, eager {expected}")
    print(f"fusion report ({dump_dir}):")
    problems += show_and_check(dump_dir, expect_graphs=1)


# %%
# Result
# ------

if problems:
    print("MISMATCH:\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"OK: tokens equal eager generation; every layer fused in every compiled graph ({args.layers} layers)")
