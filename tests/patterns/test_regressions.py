"""Regressions found by running real shapes: one kv head (MQA), and no shape guards from the pass."""

import pytest
import torch

import fx_fusion
from tests.attention_blocks import decode_inputs, make_block, prefill_inputs

RAISE = fx_fusion.FusionConfig(on_unfusable="raise")


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("form, kw", [("sglang", {}), ("vllm", {}), ("hf", {}), ("gptfast", {"style": "gptj"}),
                                      ("sglang", {"style": "gptj", "rot_dim": 8})])
def test_one_kv_head_fuses(form, kw):
    """Hkv = 1 (gpt-oss-120b per TP rank): a per-token table then indexes the same dims as k."""
    shape = dict(num_heads=8, num_kv_heads=1, head_dim=16, **kw)
    block, eager = make_block(form, **shape), make_block(form, **shape)
    eager.load_state_dict(block.state_dict())
    compiled = torch.compile(block, backend=fx_fusion.make_backend(RAISE))
    for inputs in (prefill_inputs(block), decode_inputs(block)):
        torch.testing.assert_close(compiled(*inputs), eager(*inputs), atol=1e-5, rtol=1e-5)
    for (name, got), want in zip(block.caches().items(), eager.caches().values()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert torch._dynamo.utils.counters["fx_fusion"]["rope_kv_store_fused"] == 2  # prefill and decode graphs


def test_dynamic_token_count_equal_to_head_dim_does_not_recompile():
    """The pass compares sizes without guards: T == head_dim must reuse the dynamic graph."""
    block = make_block("sglang", head_dim=16, num_slots=64)
    compiled = torch.compile(block, backend=fx_fusion.make_backend(RAISE), dynamic=True)
    for t in (3, 16, 5):  # 16 == head_dim
        positions, hidden, slots, kv_slots = prefill_inputs(block, num_tokens=t)
        compiled(positions, hidden, slots, kv_slots)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.utils.counters["fx_fusion"]["rope_kv_store_fused"] == 1


def test_one_kv_head_decode_fuses_every_layer():
    """T = 1 and Hkv = 1: every size of k's prefix is 1, so leaves of other layers' RoPEs (the evaluator
    holds them all) also 'index every dim'; only leaves of this RoPE may be the rotated tensor."""
    shape = dict(num_heads=8, num_kv_heads=1, head_dim=16)
    blocks = torch.nn.ModuleList(make_block("sglang", seed=i, **shape) for i in range(3))
    eager = torch.nn.ModuleList(make_block("sglang", seed=i, **shape) for i in range(3))

    def stack(layers, positions, hidden, loc, kv_loc):
        for layer in layers:
            hidden = hidden + layer(positions, hidden, loc, kv_loc)
        return hidden

    compiled = torch.compile(stack, backend=fx_fusion.make_backend(RAISE))
    inputs = decode_inputs(blocks[0])
    torch.testing.assert_close(compiled(blocks, *inputs), stack(eager, *inputs), atol=1e-5, rtol=1e-5)
    for got, want in zip(blocks, eager):
        for a, b in zip(got.caches().values(), want.caches().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["fx_fusion"]["rope_kv_store_fused"] == 3
