"""The pass hands the op the graph's scale tensor unchanged and sets ``scale_round`` where eager reads the scale
rounded (``quant.scale_rounding``): on CPU, a 0-d scale first in a bf16 multiply (``(1 / s) * k``). The graph after
the pass holds no conversion of the scale; the caches are eager's byte for byte."""

from __future__ import annotations

import pytest
import torch
from torch.fx import Node

from fx_fusion import backend as fx_backend
from fx_fusion.fusion_pass import RopeKVFusionPass
from fx_fusion.kernels.functional import FUSED_OP
from fx_fusion.patterns.quant import Quant
from fx_fusion.patterns.replacement import _scale_reads
from tests.fp8_blocks import Fp8Model
from tests.patterns.test_fp8_store import run
from tests.patterns.test_rope_kv_store import inference  # noqa: F401 (fixture)

CONVERTS = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)
E4 = torch.float8_e4m3fn


def _scale_facts(graph) -> list[dict]:
    """Per fused op node: its scale_round, and per scale argument the node's target and its conversions' targets."""
    facts = []
    for node in graph.nodes:
        if node.op == "call_function" and node.args[:1] == (FUSED_OP,):
            scales = {name: node.kwargs[name] for name in ("k_scale", "v_scale")}
            facts.append(dict(scale_round=node.kwargs["scale_round"], **{
                name: (s.target if isinstance(s, Node) else s,
                       [u.format_node() for u in s.users if u.target in CONVERTS] if isinstance(s, Node) else [])
                for name, s in scales.items()}))
    return facts


@pytest.fixture
def facts(monkeypatch) -> list:
    """``_scale_facts`` of every graph as the pass left it (Inductor changes the graph after)."""
    out = []

    class Keep(RopeKVFusionPass):
        def __call__(self, graph):
            super().__call__(graph)
            out.extend(_scale_facts(graph))

    monkeypatch.setattr(fx_backend, "RopeKVFusionPass", Keep)
    return out


@pytest.mark.parametrize("spelling, rounded", [pytest.param("scale_first", True, id="scale-first"),
                                               pytest.param("vllm", False, id="scale-second",
                                                            marks=pytest.mark.full)])
def test_scale_passes_unconverted_and_the_op_rounds_it(facts, inference, spelling, rounded):  # noqa: F811
    # 1 / 0.0123 and 1 / 0.0371: not bf16 values (their rounding changes stored bytes)
    run(Fp8Model(layers=1, spelling=spelling, scale="0d", k_scale=0.0123, v_scale=0.0371), steps=((5, 0),))
    assert facts, "no fused op in the graphs"
    for fact in facts:
        assert fact["scale_round"] is rounded
        for name in ("k_scale", "v_scale"):
            target, converts = fact[name]
            assert target not in CONVERTS and not converts, f"{name} is converted in the graph: {fact}"


def test_k_and_v_scales_read_apart_keep_one_conversion():
    """k's scale first (``s * k``, rounded on CPU), v's second (read as it is): one option cannot say both, so the
    graph converts k's scale, as before; on CUDA both are rounded: the option, no conversion."""
    from torch.fx import Graph

    graph = Graph()
    ks, vs = graph.placeholder("k_scale"), graph.placeholder("v_scale")
    k = Quant(E4, False, torch.bfloat16, True, None, ks, scale_first=True)
    v = Quant(E4, False, torch.bfloat16, True, None, vs)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _scale_reads((k, v, None), cpu) == (False, False, (torch.bfloat16, None, None))
    assert _scale_reads((k, v, None), cuda) == (True, False, (None, None, None))
    assert _scale_reads((k, Quant(E4, False, torch.bfloat16, False, None, 0.5), None), cuda) == (
        False, False, (torch.bfloat16, None, None))  # a Python number beside a tensor
    assert _scale_reads((k, k, v), cuda) == (True, True, (None, None, None))
    assert _scale_reads((k, k, v), cpu) == (True, False, (None, None, None))
