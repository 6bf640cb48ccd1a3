"""``fx_utils.eliminate_dead_code``: the graph ``Graph.eliminate_dead_code`` leaves, node for node, for less."""

from __future__ import annotations

import pytest
import torch
from torch._guards import TracingContext, tracing

from fx_fusion.patterns.fx_utils import eliminate_dead_code

aten = torch.ops.aten


def _graph() -> torch.fx.Graph:
    g = torch.fx.Graph()
    x, buf = g.placeholder("x"), g.placeholder("buf")
    dead = g.call_function(aten.mul.Tensor, (x, x))
    g.call_function(aten.neg.default, (dead,))  # a dead chain: both go
    g.call_function(aten.add_.Tensor, (buf, x))  # writes an input: stays, unused
    g.call_function(aten.rand.default, ([4],))  # random: stays unless Inductor's fallback_random is off
    live = g.call_function(aten.sin.default, (x,))
    g.call_function(aten.sin.default, (live,))  # the op of a live node, dead here: goes
    g.call_function(aten.cos.default, (g.call_function(aten.rand.default, ([4],)),))  # dead cos of a random
    g.output(g.call_function(aten.cos.default, (live,)))
    return g


def _code(g: torch.fx.Graph) -> str:
    return g.python_code("self").src


@pytest.mark.parametrize("context", ["none", "fallback_random", "no_fallback_random"])
def test_same_graph_as_eliminate_dead_code(context):
    expected, got = _graph(), _graph()
    if context == "none":
        expected_changed, changed = expected.eliminate_dead_code(), eliminate_dead_code(got)
    else:
        with torch._inductor.config.patch(fallback_random=context == "fallback_random"), tracing(TracingContext(None)):
            expected_changed, changed = expected.eliminate_dead_code(), eliminate_dead_code(got)
    assert changed == expected_changed is True
    assert _code(got) == _code(expected)
    kept = [n.target for n in got.nodes if n.op == "call_function"]
    assert aten.add_.Tensor in kept and aten.mul.Tensor not in kept and aten.neg.default not in kept
    assert (aten.rand.default in kept) == (context != "no_fallback_random")


def test_nothing_dead():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(aten.sin.default, (x,)))
    before = _code(g)
    assert eliminate_dead_code(g) is False
    assert _code(g) == before
