"""Scaled rotary tables (YaRN's and longrope's ``attention_scaling``): fused when cos and sin carry one scale.

HF's rotary modules compute ``cos = emb.cos() * attention_scaling`` and ``sin = emb.sin() * attention_scaling``
(YaRN: ``0.1 ln(factor) + 1``; longrope: ``sqrt(1 + ln(factor) / ln(original_max))``; 1.0 for the default
RoPE, still multiplied). The scaled tables are tensors the graph computes: the fused op reads them as they
are, so the fused result is eager's to fp32 rounding of the same operations (bf16/fp16: the usual tolerance,
the kernel rounds its fp32 result once). Every form of ``tests/attention_blocks.py`` takes ``table_scale``
(a Python float, or a 0-d buffer with ``scale_tensor=True``); two layers share the rotary tables.

Negative: a scale on only one of cos and sin, different scales on both, or a scale of the RoPE's products
(``(x * cos) * s``, which rounds differently from the scaled table) is not fused and is reported with the
reason, in the pass's report and in ``python -m fx_fusion inspect``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fx_fusion import FusionConfig
from fx_fusion.__main__ import main as cli_main
from tests.attention_blocks import Perturbation, make_block
from tests.patterns.test_rope_kv_store import (  # noqa: F401 (fixtures)
    CACHE_TOL, OUTPUT_TOL, TwoLayers, assert_close, assert_same_state, block_steps, check_fused, compile_with,
    inference, records)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
YARN = 0.1 * torch.tensor(4.0).log().item() + 1.0  # YaRN's attention_scaling for factor 4 (about 1.139)
LONGROPE = (1 + torch.tensor(8.0).log().item() / torch.tensor(4096.0).log().item()) ** 0.5  # factor 8, 4k original


# (atol, rtol) for every tensor of a model computing in ``dtype``: fp32 as test_rope_kv_store; fp16 rounds
# like bf16 (the kernel once, from fp32; eager after every op), with 3 more mantissa bits
def tolerances(dtype: torch.dtype) -> tuple[dict, dict]:
    if dtype is F32:
        return OUTPUT_TOL, CACHE_TOL
    out, cache = {BF16: (OUTPUT_TOL[BF16], CACHE_TOL[BF16]), F16: ((2e-2, 2e-2), (4e-3, 4e-3))}[dtype]
    return dict.fromkeys((F32, BF16, F16), out), dict.fromkeys((F32, BF16, F16), cache)


def run_steps(model: nn.Module, eager: nn.Module, compiled, steps, dtype: torch.dtype) -> None:
    """Every step compiled and eagerly: outputs and every cache (untouched rows included) after each step."""
    out_tol, cache_tol = tolerances(dtype)
    for i, inputs in enumerate(steps):
        assert_close(compiled(*inputs), eager(*inputs), out_tol, f"step {i} output")
        assert_same_state(model, eager, f"step {i}", cache_tol)


def two_layer_steps(model: TwoLayers) -> list[tuple]:
    return block_steps(model.layers[0])


def caches_of(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(m, "k_cache", None) if hasattr(m, "k_cache") else m.k_buffer for m in model.layers]


SCALED_CASES = [
    *(pytest.param(form, dtype, YARN, False, id=f"{form}-{name}-yarn")
      for form in ("sglang", "vllm", "hf", "gptfast") for dtype, name in ((F32, "fp32"), (BF16, "bf16"), (F16, "fp16"))),
    pytest.param("hf", F32, LONGROPE, False, id="hf-fp32-longrope"),
    pytest.param("sglang", F16, LONGROPE, False, id="sglang-fp16-longrope"),
    pytest.param("hf", F32, 1.0, False, id="hf-fp32-times-one"),
    pytest.param("vllm", F32, 1.0, False, id="vllm-fp32-times-one"),
    pytest.param("hf", F32, YARN, True, id="hf-fp32-0d-tensor"),
    pytest.param("sglang", BF16, YARN, True, id="sglang-bf16-0d-tensor"),
]


@pytest.mark.parametrize("form, dtype, scale, tensor", SCALED_CASES)
def test_scaled_tables_fuse_on_every_layer(form, dtype, scale, tensor, records, codes, inference):
    model = TwoLayers(form, table_scale=scale, scale_tensor=tensor, dtype=dtype)
    eager = copy.deepcopy(model)
    # fp32: eager's own ops, exactly (to Inductor's fp32 reordering of the attention sums); bf16/fp16 tolerance
    run_steps(model, eager, compile_with(model), two_layer_steps(model), dtype)
    check_fused(records, codes, caches_of(model), sites_per_graph=2)


@pytest.mark.parametrize("form", ["sglang", "hf"])
def test_scaled_tables_fuse_with_dynamic_shapes(form, records, codes, inference):
    """``dynamic=True``: Dynamo passes the Python scale as a graph input, cast to fp32 once for cos and once
    for sin; the two casts of one input are one scale."""
    model = TwoLayers(form, table_scale=YARN)
    eager = copy.deepcopy(model)
    run_steps(model, eager, compile_with(model, dynamic=True), two_layer_steps(model), F32)
    for rec in records:
        assert [s.fused for s in rec.sites] == [True, True], [s.reason for s in rec.sites]


# ------------------------------------------------------------------------------------------------
# Negative: scales the op does not fold are reported with the reason
# ------------------------------------------------------------------------------------------------


class ScaledAfterProduct(nn.Module):
    """``(x * cos) * s - (rotate(x) * sin) * s``: the scale applied to the products, not to the tables."""

    form = "sglang"

    def __init__(self, where: str):
        super().__init__()
        self.block = make_block("sglang")
        self.where = where

    def forward(self, positions, hidden, loc, kv_loc=None):
        b = self.block
        q, k, v = b.qkv_proj(hidden).split([b.q_size, b.kv_size, b.kv_size], dim=-1)
        cos, sin = b.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        out = []
        for x in (q, k):
            x1, x2 = x.view(x.shape[0], -1, b.head_dim).chunk(2, dim=-1)
            if self.where == "products":
                o1, o2 = (x1 * cos) * YARN - (x2 * sin) * YARN, (x2 * cos) * YARN + (x1 * sin) * YARN
            else:  # the rotated result
                o1, o2 = (x1 * cos - x2 * sin) * YARN, (x2 * cos + x1 * sin) * YARN
            out.append(torch.cat((o1, o2), dim=-1))
        b.k_buffer[loc] = out[1]
        b.v_buffer[loc] = v.view(-1, b.num_kv_heads, b.head_dim)
        kv_loc = loc if kv_loc is None else kv_loc
        return b._token_pool_attention(out[0].flatten(1), b.k_buffer[kv_loc], b.v_buffer[kv_loc], positions)


NEAR_MISSES = [
    pytest.param(lambda: make_block("sglang", perturb=Perturbation(cos_scale=YARN)),
                 f"cos is scaled by {YARN:g}, sin by nothing", id="sglang-cos-only"),
    pytest.param(lambda: make_block("hf", perturb=Perturbation(sin_scale=YARN)),
                 f"cos is scaled by nothing, sin by {YARN:g}", id="hf-sin-only"),
    pytest.param(lambda: make_block("hf", perturb=Perturbation(cos_scale=YARN, sin_scale=LONGROPE)),
                 f"cos is scaled by {YARN:g}, sin by {LONGROPE:g}", id="hf-different"),
    pytest.param(lambda: make_block("hf", dtype=BF16, perturb=Perturbation(cos_scale=2.0)),
                 "cos is scaled by 2, sin by nothing", id="hf-bf16-cos-only"),
    pytest.param(lambda: make_block("vllm", table_scale=YARN, perturb=Perturbation(cos_scale=2.0)),
                 f"cos is scaled by {YARN:g} * 2, sin by {YARN:g}", id="vllm-extra-cos-scale"),
    pytest.param(lambda: ScaledAfterProduct("products"), f"scaled by {YARN:g} after the multiply", id="products"),
    pytest.param(lambda: ScaledAfterProduct("result"), f"scaled by {YARN:g} after the multiply", id="result"),
]


@pytest.mark.parametrize("build, reason", NEAR_MISSES)
def test_unfolded_scales_are_reported_not_fused(build, reason, records, inference, tmp_path, capsys):
    model = build()
    eager = copy.deepcopy(model)
    block = getattr(model, "block", model)
    steps = block_steps(block)
    config = FusionConfig(dump_dir=str(tmp_path))
    run_steps(model, eager, compile_with(model, config), steps, block.dtype)
    assert records
    for rec in records:
        assert len(rec.sites) == 1 and not rec.sites[0].fused, [(s.fused, s.reason) for s in rec.sites]
        assert reason in rec.sites[0].reason, rec.sites[0].reason
        assert rec.sites[0].reason.startswith("stores a RoPE-like value")
    cli_main(["inspect", str(tmp_path)])
    assert reason in capsys.readouterr().out
