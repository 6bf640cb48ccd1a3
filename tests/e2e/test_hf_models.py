"""Unmodified Hugging Face models with a StaticCache, compiled with fx_fusion: fused and equal to eager.

Tiny random-weight models built from configs (nothing downloaded): 2 layers, hidden 64, 4 heads,
2 kv heads where the family has grouped-query attention, head_dim 16, vocab 128. Each test compiles
``model.forward`` and runs a prefill and two decode steps against a ``StaticCache`` allocated before
compilation (``early_initialization``); the lazy tests at the end let the compiled prefill allocate it, as HF's
own torch.compile recipe does (the cache is then a tensor of the prefill graph, fused too). The second decode step
must reuse the decode graph, the logits and caches must equal eager, and every compiled graph must hold
one ``fx_fusion.rope_kv_store`` per layer.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fx_fusion  # noqa: E402
from fx_fusion.__main__ import load_reports  # noqa: E402

# transformers renamed the forward argument ``past_key_values`` to ``cache`` during 5.x
CACHE_ARG = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
             else "past_key_values")

LAYERS = 2
TOL = dict(atol=1e-4, rtol=1e-4)
COMMON = dict(vocab_size=128, num_hidden_layers=LAYERS, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=0, pad_token_id=0, attn_implementation="sdpa")
GQA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
                short_factor=[1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5], long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])


RSQRT = re.compile(r"aten\.rsqrt\.default\(|aten\.pow\.Tensor_Scalar\([^,)]*, -0\.5\)")


class NotFused(AssertionError):
    """A compiled graph without one fused op per layer (what the xfail marks expect)."""


@dataclass(frozen=True)
class Family:
    config: Callable[[], "transformers.PretrainedConfig"]
    model: Callable


FAMILIES = {
    "llama": Family(lambda: transformers.LlamaConfig(**GQA, **COMMON), lambda c: transformers.LlamaForCausalLM(c)),
    # q/k RMSNorm per head before RoPE
    "qwen3": Family(lambda: transformers.Qwen3Config(**GQA, **COMMON), lambda c: transformers.Qwen3ForCausalLM(c)),
    # sliding_window (default 4096) makes StaticCache use its sliding-window layer
    "mistral": Family(lambda: transformers.MistralConfig(**GQA, **COMMON),
                      lambda c: transformers.MistralForCausalLM(c)),
    # partial rotary (8 of 16 features), one fused qkv projection per head
    "gpt_neox": Family(lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128,
                                                          num_attention_heads=4, rotary_pct=0.5, **COMMON),
                       lambda c: transformers.GPTNeoXForCausalLM(c)),
    # interleaved pairs (GPT-J style), partial rotary (8 of 16), sin/cos from a gathered table; eager attention
    # (older transformers 5.x have no SDPA for GPT-J; attention comes after the cache update either way)
    # YaRN scaling in an fp32 model: cos = emb.cos() * attention_scaling (0.1 ln 4 + 1), sin likewise
    "llama_yarn": Family(lambda: transformers.LlamaConfig(**GQA, **COMMON, rope_parameters=YARN),
                         lambda c: transformers.LlamaForCausalLM(c)),
    # longrope (Phi-3): short/long factors picked in the graph, attention_scaling sqrt(1 + ln 4 / ln 16)
    "phi3_longrope": Family(lambda: transformers.Phi3Config(**GQA, **COMMON, rope_parameters=LONGROPE),
                            lambda c: transformers.Phi3ForCausalLM(c)),
    "gptj": Family(lambda: transformers.GPTJConfig(n_embd=64, n_head=4, n_layer=LAYERS, rotary_dim=8, n_positions=64,
                                                   vocab_size=128, bos_token_id=0, eos_token_id=0,
                                                   attn_implementation="eager"),
                   lambda c: transformers.GPTJForCausalLM(c)),
}

# GPT-NeoX takes q, k, v per head with chunk(3, dim=-1) of one [B, H, S, 3*D] projection: the RoPE
# recogniser stops at a head_dim-wide slice of a wider last dim and rotates that slice.
CASES = ["llama", "qwen3", "mistral", "gpt_neox", "gptj", "llama_yarn", "phi3_longrope"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def new_cache(config, device, batch: int = 1, max_cache_len: int = 16):
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = transformers.StaticCache(config=config, max_cache_len=max_cache_len)
    cache.early_initialization(batch_size=batch, num_heads=heads, head_dim=head_dim, dtype=torch.float32,
                               device=device)
    return cache


def run_steps(forward, cache, steps) -> list[torch.Tensor]:
    with torch.no_grad():
        return [forward(input_ids=ids, use_cache=True, **{CACHE_ARG: cache}).logits for ids in steps]


@pytest.mark.parametrize("family", CASES)
def test_static_cache_prefill_and_decode(family, device, tmp_path):
    spec = FAMILIES[family]
    config = spec.config()
    model = spec.model(config).to(device).eval()
    steps = [torch.randint(1, 128, (1, n), device=device) for n in (5, 1, 1)]

    ref_cache, cache = new_cache(config, device), new_cache(config, device)
    expected = run_steps(model, ref_cache, steps)
    compiled = fx_fusion.compile(model.forward, dump_dir=str(tmp_path))
    actual = run_steps(compiled, cache, steps)

    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"step {i} logits: {m}")
    for i, (layer, ref_layer) in enumerate(zip(cache.layers, ref_cache.layers)):
        torch.testing.assert_close(layer.keys, ref_layer.keys, **TOL, msg=lambda m: f"layer {i} keys: {m}")
        torch.testing.assert_close(layer.values, ref_layer.values, **TOL, msg=lambda m: f"layer {i} values: {m}")

    reports = load_reports(tmp_path)
    assert len(reports) == 2, f"expected a prefill and one decode graph, got {[r['graph'] for r in reports]}"
    for report in reports:
        calls = (tmp_path / f"{report['graph']}.after.py").read_text().count("torch.ops.fx_fusion.rope_kv_store")
        fused = [s for s in report["sites"] if s["fused"]]
        reasons = sorted({s["reason"] for s in report["sites"] if not s["fused"]})
        if calls != LAYERS or len(fused) != LAYERS:
            raise NotFused(f"{report['graph']}: {calls} fused op calls, {len(fused)} fused sites for {LAYERS} "
                           f"layers; not fused: {reasons or 'no candidate site'}")
        if family == "qwen3":  # fp32 here; bf16 and the other QK-norm families below
            assert all({"q_norm", "k_norm"} <= set(s["nodes"]) for s in fused), [s["notes"] for s in fused]


def gpt_oss_config():
    return transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8, attn_implementation="eager")


SCALED = {"gpt_oss": (gpt_oss_config, lambda c: transformers.GptOssForCausalLM(c)),
          "phi3_longrope": (FAMILIES["phi3_longrope"].config, FAMILIES["phi3_longrope"].model)}
# fp32: the op multiplies by the scaled tables eager computes; bf16/fp16: the kernel rounds once in fp32
# where eager rounds after every op
SCALED_TOL = {torch.float32: TOL, torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16,
                                   pytest.param(torch.float16, marks=pytest.mark.slow)],  # bf16 rounds likewise
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["gpt_oss", "phi3_longrope"])
def test_scaled_rope_models_every_layer_fused(name, dtype, tmp_path):
    """Hugging Face gpt-oss with its default YaRN scaling (one sliding-window and one full-attention layer)
    and Phi-3 with longrope, in fp32, bf16 and fp16: ``cos = emb.cos() * attention_scaling`` (and sin
    likewise) is the table the op reads (cast to the model dtype by the rotary module where it is not fp32).
    Every layer of the prefill and decode graphs fused; logits and caches equal to eager."""
    make_config, make_model = SCALED[name]
    config = make_config()
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == {"gpt_oss": "yarn", "phi3_longrope": "longrope"}[name]
    model = make_model(config).to(dtype).eval()
    steps = [torch.randint(1, 128, (1, n)) for n in (5, 1)]

    def cache():
        c = transformers.StaticCache(config=config, max_cache_len=16)
        c.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=dtype, device="cpu")
        g = torch.Generator().manual_seed(1)
        for layer in c.layers:  # poisoned, not zeros: a row written wrongly (or not at all) shows
            for t in (layer.keys, layer.values):
                t.copy_(torch.randn(t.shape, generator=g))
        return c

    ref_cache, fused_cache = cache(), cache()
    expected = run_steps(model, ref_cache, steps)
    actual = run_steps(fx_fusion.compile(model.forward, dump_dir=str(tmp_path)), fused_cache, steps)
    tol = SCALED_TOL[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m: f"step {i} logits: {m}")
    for i, (layer, ref_layer) in enumerate(zip(fused_cache.layers, ref_cache.layers)):
        torch.testing.assert_close(layer.keys.float(), ref_layer.keys.float(), **tol)
        torch.testing.assert_close(layer.values.float(), ref_layer.values.float(), **tol)
    reports = load_reports(tmp_path)
    assert len(reports) == 2
    for report in reports:
        assert [s["fused"] for s in report["sites"]] == [True] * LAYERS, report["sites"]


def assert_every_layer_fused(tmp_path, graphs: int) -> list[dict]:
    reports = load_reports(tmp_path)
    assert len(reports) == graphs, [r["graph"] for r in reports]
    for report in reports:
        calls = (tmp_path / f"{report['graph']}.after.py").read_text().count("torch.ops.fx_fusion.rope_kv_store")
        assert calls == LAYERS and [s["fused"] for s in report["sites"]] == [True] * LAYERS, report["sites"]
    return reports


def test_lazily_allocated_static_cache_prefill_and_decode(device, tmp_path):
    """``StaticCache(config=..., max_cache_len=...)`` as HF's docs create it, without ``early_initialization``:
    the compiled prefill allocates the cache (``full`` in its graph) and stores into it; decode graphs see it as
    an input. Every layer of both graphs fused, logits and caches equal to eager."""
    config = FAMILIES["llama"].config()
    model = FAMILIES["llama"].model(config).to(device).eval()
    steps = [torch.randint(1, 128, (1, n), device=device) for n in (5, 1, 1)]
    ref_cache = transformers.StaticCache(config=config, max_cache_len=16)
    cache = transformers.StaticCache(config=config, max_cache_len=16)
    expected = run_steps(model, ref_cache, steps)
    actual = run_steps(fx_fusion.compile(model.forward, dump_dir=str(tmp_path)), cache, steps)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"step {i} logits: {m}")
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys, ref_layer.keys, **TOL)
        torch.testing.assert_close(layer.values, ref_layer.values, **TOL)
    assert_every_layer_fused(tmp_path, graphs=2)


@pytest.mark.parametrize("prefill", [3, 10])
def test_gpt_oss_lazy_static_cache_through_a_full_sliding_window(prefill, tmp_path):
    """gpt-oss in bf16 (YaRN, one sliding-window layer of window 4, one full layer), a lazily allocated
    ``StaticCache``, a prefill then decode steps: the prefill allocates the cache in its graph. After 3 prefill
    tokens the first decode fills the window with ``index_copy_`` and the next ones roll it (``new_keys[:, :,
    [-1]] = k`` into the rolled keys, then ``copy_``); a 10-token prefill keeps its last 4 tokens
    (``self.keys.copy_(key_states[:, :, -4:, :])``) and every decode rolls. Every layer of every graph fused,
    logits and caches equal to eager (bf16)."""
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4, attn_implementation="eager")
    model = transformers.GptOssForCausalLM(config).to(torch.bfloat16).eval()
    steps = [torch.randint(1, 128, (1, n)) for n in (prefill, 1, 1, 1, 1)]
    ref_cache = transformers.StaticCache(config=config, max_cache_len=16)
    cache = transformers.StaticCache(config=config, max_cache_len=16)
    expected = run_steps(model, ref_cache, steps)
    actual = run_steps(fx_fusion.compile(model.forward, dump_dir=str(tmp_path)), cache, steps)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.float(), e.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"step {i} logits: {m}")
    for layer, ref_layer in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys.float(), ref_layer.keys.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer.values.float(), ref_layer.values.float(), atol=2e-2, rtol=2e-2)
    reports = assert_every_layer_fused(tmp_path, graphs=3 if prefill < 4 else 2)
    sources = [s["source"] for r in reports for s in r["sites"]]
    assert any("new_keys[:, :, index] = key_states" in s for s in sources), sources
    if prefill > 4:
        assert any("self.keys.copy_(full_key_states[:, :, -self.max_cache_len :, :])" in s for s in sources), sources


# QK-norm before the RoPE: per head (Qwen3: w * round(norm); Gemma 3: norm * (1 + w) in fp32, with sliding-window
# layers), and OLMo 2's full-width norm over the whole q / k projection before the head split (fused whole)
QK_NORM = {
    "qwen3": FAMILIES["qwen3"],
    "gemma3": Family(lambda: transformers.Gemma3TextConfig(
        **GQA, **COMMON, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16), lambda c: transformers.Gemma3ForCausalLM(c)),
    "olmo2": Family(lambda: transformers.Olmo2Config(**GQA, **COMMON), lambda c: transformers.Olmo2ForCausalLM(c)),
    # the norm after the RoPE (the op's norm_after_rope): HunYuan's RMSNorm with a weight; Llama 4's weightless norm
    # of its complex RoPE's output (use_qk_norm, as in Llama 4 Scout), two MoE layers with chunked attention
    "hunyuan": Family(lambda: transformers.HunYuanDenseV1Config(**GQA, **COMMON),
                      lambda c: transformers.HunYuanDenseV1ForCausalLM(c)),
    "llama4": Family(lambda: transformers.Llama4TextConfig(
        **GQA, **COMMON, intermediate_size_mlp=128, num_local_experts=2, num_experts_per_tok=1, use_qk_norm=True),
        lambda c: transformers.Llama4ForCausalLM(c)),
    # Gemma 4: QK-norm before the RoPE (the full-attention layer with its own head dim and partial rotary), and a
    # weightless norm of v (v_norm) whose store is the fused site's v store, not a site of its own
    # nanochat: the mirrored rotation (rotate_half returns cat((x2, -x1)): sin negated) and weightless norms after it
    "nanochat": Family(lambda: transformers.NanoChatConfig(**GQA, **COMMON),
                       lambda c: transformers.NanoChatForCausalLM(c)),
    "gemma4": Family(lambda: transformers.Gemma4TextConfig(**GQA, **COMMON, sliding_window=8, global_head_dim=16),
                     lambda c: transformers.Gemma4ForCausalLM(c)),
}


# CI runs Qwen3, Gemma 3 and 4, HunYuan, Llama 4 and nanochat in bf16 (Qwen3 in fp32: CASES above) and OLMo 2 in fp32; the others are
# ``slow`` (the written blocks of tests/patterns/test_qk_norm_fusion.py and test_qk_norm_after_rope.py run in fp32)
QK_NORM_CASES = [pytest.param(name, dtype, id=f"{name}-{tag}", marks=pytest.mark.slow if (name, tag) in (
    ("gemma3", "fp32"), ("olmo2", "bf16"), ("hunyuan", "fp32"), ("llama4", "fp32"), ("gemma4", "fp32"), ("nanochat", "fp32")) else ())
    for name in QK_NORM
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")) if (name, tag) != ("qwen3", "fp32")]


@pytest.mark.parametrize("name, dtype", QK_NORM_CASES)
def test_qk_norm_models_fuse_the_norm_with_the_rope(name, dtype, tmp_path):
    """Qwen3, Gemma 3 and 4, OLMo 2, HunYuan, Llama 4 and nanochat (tiny, random weights): every layer's q and k norms
    are applied by the fused op (the site names the norms it took, and no rsqrt of theirs is left in the graph; OLMo
    2's norm over the whole projection too, ``norm_full_width``; HunYuan's, Llama 4's and nanochat's after the RoPE,
    ``norm_after_rope``). Logits and poisoned caches equal to eager over a prefill and a decode step."""
    spec = QK_NORM[name]
    config = spec.config()
    model = spec.model(config).to(dtype).eval()
    steps = [torch.randint(1, 128, (1, n)) for n in (5, 1)]

    def cache():
        c = transformers.StaticCache(config=config, max_cache_len=16)
        c.early_initialization(batch_size=1, num_heads=2, head_dim=16, dtype=dtype, device="cpu")
        g = torch.Generator().manual_seed(1)
        for layer in c.layers:
            for t in (layer.keys, layer.values):
                t.copy_(torch.randn(t.shape, generator=g))
        return c

    ref_cache, fused_cache = cache(), cache()
    expected = run_steps(model, ref_cache, steps)
    actual = run_steps(fx_fusion.compile(model.forward, dump_dir=str(tmp_path)), fused_cache, steps)
    # bf16: the op sums the norm's squares in its own order, so a normalised value may differ from eager's by one
    # ulp, up to 2^-5 for |values| in [4, 8), which the RoPE passes on to a smaller rotated value
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOL
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m: f"step {i} logits: {m}")
    for layer, ref_layer in zip(fused_cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys.float(), ref_layer.keys.float(), **tol)
        torch.testing.assert_close(layer.values.float(), ref_layer.values.float(), **tol)
    for report in assert_every_layer_fused(tmp_path, graphs=2):
        for site in report["sites"]:
            assert {"q_norm", "k_norm"} <= set(site["nodes"]) and not site["notes"], (site["nodes"], site["notes"])
        # the q and k norms went, the others stay (an rsqrt, or Gemma 4's pow(s, -0.5))
        before, after = (len(RSQRT.findall((tmp_path / f"{report['graph']}.{when}.py").read_text()))
                         for when in ("before", "after"))
        assert before == after + 2 * LAYERS, (before, after)
