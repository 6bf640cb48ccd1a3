"""Property test of the pass: generated attention blocks compiled with fx_fusion always equal eager.

Each example draws a surface form (tests/attention_blocks.py) and its knobs: RoPE style, partial
rotary, fp32 upcast in bf16, view/reshape, head counts (MQA, GQA, MHA), the store spelling (vLLM flat
view, HF setitem/index_copy, Qwen3 q/k norm), the prefill length; it runs a prefill and a decode step.
Outputs and every cache must equal eager, and every candidate site must be either fused or reported
with a reason (here all of them are fusable, so all must fuse).

CI runs a few derandomised examples (each one compiles twice on the CPU); set
``FX_FUSION_HYPOTHESIS_PROFILE=large`` for a longer run.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fx_fusion
from tests.attention_blocks import decode_inputs, make_block, prefill_inputs

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("pass-ci", max_examples=6, derandomize=True, database=None, **_COMMON)
settings.register_profile("pass-large", max_examples=100, **_COMMON)
PROFILE = settings.get_profile(
    "pass-large" if os.environ.get("FX_FUSION_HYPOTHESIS_PROFILE") == "large" else "pass-ci")


@st.composite
def blocks(draw):
    form = draw(st.sampled_from(["sglang", "vllm", "hf", "gptfast"]))
    heads = draw(st.sampled_from([(4, 2), (4, 1), (2, 2), (6, 3)]))
    kw = dict(num_heads=heads[0], num_kv_heads=heads[1], head_dim=16,
              style="gptj" if form == "gptfast" else draw(st.sampled_from(["neox", "gptj"])),
              rot_dim=draw(st.sampled_from([16, 8])), use_reshape=draw(st.booleans()))
    if draw(st.booleans()):
        kw.update(dtype=torch.bfloat16, upcast=draw(st.booleans()))
    if form == "gptfast":
        kw["rot_dim"] = 16  # gpt-fast rotates the whole head
    if form == "vllm":
        kw["flat_store"] = draw(st.booleans())
    if form == "hf":
        kw.update(cache_update=draw(st.sampled_from(["index_copy", "setitem"])), qk_norm=draw(st.booleans()))
    return form, kw, draw(st.integers(1, 6))


@pytest.mark.full  # a subprocess or a property run: the full suite only (README's quick command skips it)
@settings(PROFILE)
@given(case=blocks())
def test_generated_blocks_equal_eager_and_fuse(case):
    form, kw, tokens = case
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    block, eager = make_block(form, **kw), make_block(form, **kw)
    eager.load_state_dict(block.state_dict())
    tol = 3e-2 if kw.get("dtype") == torch.bfloat16 else 1e-5
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():
        compiled = torch.compile(block, backend="fx_fusion")
        for inputs in (prefill_inputs(block, num_tokens=tokens), decode_inputs(block, past=tokens)):
            torch.testing.assert_close(compiled(*inputs).float(), eager(*inputs).float(), atol=tol, rtol=tol)
    for (name, got), want in zip(block.caches().items(), eager.caches().values()):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=name)
    stats = torch._dynamo.utils.counters["fx_fusion"]
    assert stats["rope_kv_store_not_fused"] == 0, f"{form} {kw}: a site was left unfused"
    assert stats["rope_kv_store_fused"] == stats["graphs"] >= 1, f"{form} {kw}: {dict(stats)}"
    torch._dynamo.reset()
