"""Which transformers causal LMs fuse: tiny random-weight configs of each, compiled with fx_fusion (a maintainer's
tool, not a test; ``tests/e2e/test_hf_models.py`` holds the models CI checks).

    python tests/e2e/hf_coverage.py                        # every *ForCausalLM transformers exports
    python tests/e2e/hf_coverage.py Llama4ForCausalLM ...  # these; --bf16 for bf16 weights and caches

For each model: a prefill of 5 tokens and two decode steps with a ``StaticCache`` of 16 positions, eager and
compiled; one line with the largest logit difference, and per compiled graph the sites fused of those found and
the reasons of the others. A graph with attention layers and no site at all is what to look at first: the model's
RoPE and store were passed over in silence. Models whose tiny config cannot be built here (a hybrid cache, a
required argument this script does not set) say so and are skipped.
"""

from __future__ import annotations

import inspect
import sys
import tempfile

import torch
import transformers

import fx_fusion
from fx_fusion.__main__ import load_reports

# a small model of most families; the MLA sizes make one rotary head of 16 features (head_dim = qk_rope_head_dim)
SIZES = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
             pad_token_id=0, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, sliding_window=8, n_group=1,
             topk_group=1, kv_lora_rank=32, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
MLA = {"kv_lora_rank"}  # MLA models: one latent "head", so as many kv heads as q heads in the config


def build(name: str, dtype: torch.dtype):
    model_cls = getattr(transformers, name)
    cfg_cls = model_cls.config_class
    params = inspect.signature(cfg_cls.__init__).parameters
    anything = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kw = {k: v for k, v in SIZES.items() if k in params or anything}
    if MLA & set(params):
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    config = cfg_cls(**kw)
    config._attn_implementation = "sdpa"
    try:
        model = model_cls(config)
    except Exception:  # noqa: BLE001 (no SDPA for this family: eager attention)
        config._attn_implementation = "eager"
        model = model_cls(config)
    return config, model.to(dtype).eval()


def check(name: str, dtype: torch.dtype) -> str:
    torch._dynamo.reset()
    torch.manual_seed(0)
    config, model = build(name, dtype)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    steps = [torch.randint(1, 128, (1, n)) for n in (5, 1, 1)]

    def run(forward):
        cache = transformers.StaticCache(config=config, max_cache_len=16)
        with torch.no_grad():
            return [forward(input_ids=ids, use_cache=True, **{cache_arg: cache}).logits for ids in steps]

    expected = run(model)
    dump = tempfile.mkdtemp(prefix="hf_coverage_")
    actual = run(fx_fusion.compile(model.forward, dump_dir=dump))
    diff = max((a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected))
    graphs = []
    for report in load_reports(dump):
        sites = report["sites"]
        reasons = sorted({s["reason"] for s in sites if not s["fused"]})
        graphs.append(f"{sum(s['fused'] for s in sites)}/{len(sites)}" + (f" ({'; '.join(reasons)})" if reasons else ""))
    return f"{name}: max |logits - eager| {diff:.3g}; fused per graph: {', '.join(graphs) or 'no graph'}; {dump}"


def main(argv: list[str]) -> None:
    dtype = torch.bfloat16 if "--bf16" in argv else torch.float32
    names = [a for a in argv if not a.startswith("--")] or sorted(
        n for n in dir(transformers) if n.endswith("ForCausalLM") and n != "AutoModelForCausalLM")
    for name in names:
        try:
            print(check(name, dtype), flush=True)
        except Exception as err:  # noqa: BLE001 (a model this script cannot build: say so, go on)
            print(f"{name}: skipped: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
