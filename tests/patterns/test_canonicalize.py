"""Canonicalisation before matching (``patterns/canonicalize.py``): value-equal pure nodes merged, never across a
write of what they read, never random or side-effecting ones; and the torchtune-style decoder it makes fusable.

Unit tests build small FX graphs by hand (``torch.fx.Graph``, fake values propagated with ``FakeTensorProp``), so
in-place ops sit in them where a functional graph would not put them; every graph ends in a cache store
(``index_put``), since the merge only touches nodes within reach of one. Each checks which nodes are left and
that the graph still computes what it computed before, on random inputs.

End to end: ``tests/torchtune_blocks.TorchtuneDecoder`` (torchtune's ``KVCache`` slicing ``cache_pos[:seq_len]``
for k and again for v, one RoPE module called for q and for k) compiled with ``on_unfusable="raise"``: every layer
of the prefill and of both decode steps fused, outputs and whole caches equal to eager, in fp32 and bf16.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fx_fusion.patterns import canonicalize as canon
from fx_fusion.patterns.canonicalize import canonicalize, merge_value_equal
from tests.patterns.test_rope_kv_store import RAISE, check_fused, compile_with, records, run_steps  # noqa: F401
from tests.patterns.test_rope_kv_store import inference  # noqa: F401
from tests.torchtune_blocks import TorchtuneDecoder, torchtune_steps

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------------
# Hand-built graphs
# ------------------------------------------------------------------------------------------------


class G:
    """A graph under construction: ``x`` [8, 4] fp32, ``i`` [3] int64 (rows), ``y`` [8, 4], a ``cache`` [16, 4] and
    ``slots`` [16]; ``store(value, rows)`` ends it with ``index_put(cache, [slots[:rows]], value)``, returned."""

    def __init__(self):
        self.graph = Graph()
        self.inputs = {"x": torch.randn(8, 4), "i": torch.tensor([5, 0, 2]), "y": torch.randn(8, 4),
                       "cache": torch.randn(16, 4), "slots": torch.randperm(16)}
        self.x, self.i, self.y, self.cache, self.slots = (self.graph.placeholder(n) for n in self.inputs)

    def __call__(self, op, *args, **kwargs):
        return self.graph.call_function(op, args, kwargs)

    def store(self, value, rows: int) -> GraphModule:
        slots = self(aten.slice.Tensor, self.slots, 0, 0, rows)
        return self.finish(self(aten.index_put.default, self.cache, [slots], value))

    def finish(self, out) -> GraphModule:
        self.graph.output(out)
        gm = GraphModule(torch.nn.Module(), self.graph)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            FakeTensorProp(gm, mode).propagate(*(mode.from_tensor(t) for t in self.inputs.values()))
        return gm

    def run(self, gm: GraphModule) -> torch.Tensor:
        return gm(*(t.clone() for t in self.inputs.values()))


def targets(gm: GraphModule, target) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def merged(g: G, gm: GraphModule, **kw) -> int:
    """Merge, and check the graph is still valid and computes what it did (same random inputs)."""
    torch.manual_seed(1)
    before = g.run(gm)
    n = merge_value_equal(gm.graph, **kw)
    gm.graph.lint()
    gm.recompile()
    torch.manual_seed(1)
    torch.testing.assert_close(g.run(gm), before, atol=0, rtol=0)
    return n


def test_equal_gathers_views_and_arithmetic_merge():
    """Two copies of one chain (gather, views, a select, arithmetic) collapse into one, level by level."""
    g = G()

    def chain():
        rows = g(aten.index.Tensor, g.x, [g.i])  # [3, 4]
        v = g(aten.view.default, rows, [3, 2, 2])
        p = g(aten.permute.default, v, [1, 0, 2])
        e = g(aten.expand.default, g(aten.unsqueeze.default, p, 0), [2, 2, 3, 2])
        s = g(aten.select.int, e, 0, 1)
        r = g(aten.reshape.default, g(aten.slice.Tensor, s, 2, 0, 1), [6])
        return g(aten.add.Tensor, g(aten.mul.Tensor, r, 2.0), 1)

    a, b = chain(), chain()
    row = g(aten.cat.default, [a, b, g(aten.sub.Tensor, a, b)])  # [18]
    gm = g.store(g(aten.expand.default, g(aten.slice.Tensor, row, 0, 0, 4), [8, 4]), 8)
    assert merged(g, gm) == 10
    for op in (aten.index.Tensor, aten.view.default, aten.permute.default, aten.unsqueeze.default, aten.select.int,
               aten.reshape.default, aten.mul.Tensor, aten.add.Tensor):
        assert len(targets(gm, op)) == 1, op
    (cat,) = targets(gm, aten.cat.default)
    assert cat.args[0][0] is cat.args[0][1]


def test_two_slices_of_the_slots_become_one():
    """torchtune's ``cache_pos[:seq_len]``, sliced for the k store and again for the v store."""
    g = G()
    k_slots = g(aten.slice.Tensor, g.slots, 0, 0, 3)
    v_slots = g(aten.slice.Tensor, g.slots, 0, 0, 3)
    k_store = g(aten.index_put.default, g.cache, [k_slots], g(aten.slice.Tensor, g.x, 0, 0, 3))
    v_store = g(aten.index_put.default, g(aten.clone.default, g.cache), [v_slots], g(aten.slice.Tensor, g.y, 0, 0, 3))
    gm = g.finish(g(aten.cat.default, [k_store, v_store]))
    assert merged(g, gm) == 1
    stores = targets(gm, aten.index_put.default)
    assert stores[0].args[1][0] is stores[1].args[1][0]


@pytest.mark.parametrize("write", ["index_put_", "copy_", "add_", "copy_ of a view", "index_put_ of a view",
                                   "add_ of a split item"])
@pytest.mark.parametrize("read", ["gather", "arithmetic", "slice"])
def test_reads_either_side_of_a_write_into_what_they_read_stay_apart(read, write):
    """``a = f(x); <x written in place>; b = f(x)``: a and b differ, whatever the write's spelling (through a view
    of x too). Two reads before the write still merge (the control: the scope reaches them)."""
    g = G()

    def f():
        return {"gather": lambda: g(aten.index.Tensor, g.x, [g.i]),
                "arithmetic": lambda: g(aten.mul.Tensor, g(aten.slice.Tensor, g.x, 0, 0, 3), 3.0),
                "slice": lambda: g(aten.clone.default, g(aten.slice.Tensor, g.x, 0, 1, 4))}[read]()

    a, a2 = f(), f()
    rows = g(aten.slice.Tensor, g.y, 0, 0, 3)
    if write == "index_put_":
        g(aten.index_put_.default, g.x, [g.i], rows)
    elif write == "copy_":
        g(aten.copy_.default, g.x, g.y)
    elif write == "add_":
        g(aten.add_.Tensor, g.x, 1.0)
    elif write == "copy_ of a view":
        g(aten.copy_.default, g(aten.select.int, g.x, 0, 2), g(aten.select.int, g.y, 0, 0))
    elif write == "index_put_ of a view":
        g(aten.index_put_.default, g(aten.slice.Tensor, g.x, 0, 0, 8), [g.i], rows)
    else:
        g(aten.add_.Tensor, g(operator.getitem, g(aten.split.Tensor, g.x, 4), 0), 1.0)
    b = f()
    gm = g.store(g(aten.cat.default, [a, a2, b]), 9)
    merged(g, gm)
    (cat,) = targets(gm, aten.cat.default)
    first, second, after = cat.args[0]
    assert first is second, "two reads before the write should merge"
    assert after is not first, f"a read after {write} was merged with one before it"


def test_a_write_into_another_tensor_does_not_separate_reads():
    """Writing a tensor the graph made (not an input, not a view of x) does not change x: the reads still merge."""
    g = G()
    a = g(aten.index.Tensor, g.x, [g.i])
    z = g(aten.zeros.default, [3, 4], dtype=torch.float32, device=torch.device("cpu"))
    g(aten.add_.Tensor, z, 1.0)
    b = g(aten.index.Tensor, g.x, [g.i])
    gm = g.store(g(aten.cat.default, [a, b, z]), 9)
    assert merged(g, gm) == 1


def test_a_write_into_any_input_separates_reads_of_every_input():
    """Inputs may share memory at run time: a write into y (an input) may change x, so reads of x stay apart."""
    g = G()
    a = g(aten.index.Tensor, g.x, [g.i])
    g(aten.add_.Tensor, g.y, 1.0)
    b = g(aten.index.Tensor, g.x, [g.i])
    gm = g.store(g(aten.cat.default, [a, b]), 6)
    assert merged(g, gm) == 0


def test_tensors_written_in_place_later_are_never_merged():
    """Two equal fresh tensors, one written in place afterwards: one node would make them share that write."""
    g = G()
    z1 = g(aten.zeros.default, [8, 4], dtype=torch.float32, device=torch.device("cpu"))
    z2 = g(aten.zeros.default, [8, 4], dtype=torch.float32, device=torch.device("cpu"))
    c1 = g(aten.clone.default, g(aten.slice.Tensor, g.x, 0, 0, 3))
    c2 = g(aten.clone.default, g(aten.slice.Tensor, g.x, 0, 0, 3))
    g(aten.index_put_.default, z1, [g.i], g(aten.slice.Tensor, g.y, 0, 0, 3))
    g(aten.add_.Tensor, g(aten.select.int, c2, 0, 0), 5.0)  # through a view
    gm = g.store(g(aten.cat.default, [g(aten.sub.Tensor, z1, z2), c1, c2]), 14)
    merged(g, gm)
    assert len(targets(gm, aten.zeros.default)) == 2 and len(targets(gm, aten.clone.default)) == 2


@pytest.mark.parametrize("write", ["index_put", "slice_scatter", "copy"])
def test_destinations_of_functional_writes_are_never_merged(write):
    """Two caches allocated alike (``zeros_like(k_cache)``, ``zeros_like(v_cache)``), each written functionally:
    one node would leave the k and the v store writing one buffer (Inductor then copies it; the pass sees the
    cache read before its store). Equal reads of x beside them still merge."""
    g = G()
    z1 = g(aten.zeros_like.default, g.x)
    z2 = g(aten.zeros_like.default, g.x)
    rows = g(aten.slice.Tensor, g.y, 0, 0, 3)
    if write == "index_put":
        w1, w2 = (g(aten.index_put.default, z, [g.i], rows) for z in (z1, z2))
    elif write == "slice_scatter":
        w1, w2 = (g(aten.slice_scatter.default, z, rows, 0, 0, 3) for z in (z1, z2))
    else:
        w1, w2 = (g(aten.copy.default, z, g.y) for z in (z1, z2))
    r1, r2 = (g(aten.mul.Tensor, g.x, 2.0) for _ in range(2))
    gm = g.store(g(aten.cat.default, [g(aten.add.Tensor, w1, r1), g(aten.sub.Tensor, r2, w2)]), 16)
    assert merged(g, gm) == 1
    assert len(targets(gm, aten.zeros_like.default)) == 2


def test_random_ops_are_never_merged():
    g = G()
    cpu = torch.device("cpu")
    r1 = g(aten.rand.default, [3, 4], device=cpu)
    r2 = g(aten.rand.default, [3, 4], device=cpu)
    d1 = g(aten.native_dropout.default, g.x, 0.5, True)
    d2 = g(aten.native_dropout.default, g.x, 0.5, True)
    b1 = g(aten.bernoulli.p, g.y, 0.5)
    b2 = g(aten.bernoulli.p, g.y, 0.5)
    e1 = g(aten.empty.memory_format, [3, 4], device=cpu)  # uninitialised: not one value either
    e2 = g(aten.empty.memory_format, [3, 4], device=cpu)
    m1 = g(aten.mul.Tensor, g.x, 2.0)  # the control: equal pure nodes next to them merge
    m2 = g(aten.mul.Tensor, g.x, 2.0)
    parts = [r1, r2, g(operator.getitem, d1, 0), g(operator.getitem, d2, 0), b1, b2, m1, m2]
    gm = g.store(g(aten.slice.Tensor, g(aten.cat.default, parts + [g(aten.mul.Tensor, e1, 0.0),
                                                                   g(aten.mul.Tensor, e2, 0.0)]), 0, 0, 8), 8)
    assert merge_value_equal(gm.graph) == 1  # (the outputs are random: no comparison against a run)
    gm.graph.lint()
    for op in (aten.rand.default, aten.native_dropout.default, aten.bernoulli.p, aten.empty.memory_format):
        assert len(targets(gm, op)) == 2, op
    assert len(targets(gm, aten.mul.Tensor)) == 3  # m1 and m2 are one; e1 * 0 and e2 * 0 are two


def test_distinct_meta_and_arguments_stay_apart():
    """Same target and inputs, but other strides, another float (0.0 and -0.0; 2 and 2.0), other kwargs."""
    g = G()
    c1 = g(aten.clone.default, g.x)
    c2 = g(aten.clone.default, g.x)
    m = [g(aten.mul.Tensor, g.x, s) for s in (0.0, -0.0, 2, 2.0)]
    s1 = g(aten.sum.dim_IntList, g.x, [0], dtype=torch.float32)
    s2 = g(aten.sum.dim_IntList, g.x, [0], dtype=torch.float64)
    flat = [g(aten.reshape.default, t, [32]) for t in (c1, c2, *m)]
    sums = g(aten.add.Tensor, s1, g(aten._to_copy.default, s2, dtype=torch.float32))
    gm = g.store(g(aten.expand.default, g(aten.slice.Tensor, g(aten.cat.default, flat + [sums]), 0, 0, 4), [8, 4]), 8)
    c2_node = next(n for n in gm.graph.nodes if n.name == c2.name)
    c2_node.meta["val"] = c2_node.meta["val"].t().contiguous().t()  # as if cloned with other strides
    assert merged(g, gm) == 0
    assert len(targets(gm, aten.mul.Tensor)) == 4 and len(targets(gm, aten.sum.dim_IntList)) == 2


def test_returned_nodes_and_nodes_far_from_any_store_stay():
    """A node the graph returns keeps its own identity (two outputs would alias); a duplicate further from every
    store than the scope's depth is left to Inductor."""
    g = G()
    r1 = g(aten.mul.Tensor, g.x, 2.0)
    r2 = g(aten.mul.Tensor, g.x, 2.0)
    far1 = g(aten.add.Tensor, g.y, 1.0)
    far2 = g(aten.add.Tensor, g.y, 1.0)
    value = g(aten.mul.Tensor, far1, far2)
    for _ in range(4):
        value = g(aten.neg.default, value)
    value = g(aten.add.Tensor, value, g(aten.sub.Tensor, r1, r2))  # r1, r2 within 3 inputs of the store
    gm = g.finish((g(aten.index_put.default, g.cache, [g(aten.slice.Tensor, g.slots, 0, 0, 8)], value), r1, r2))
    assert merge_value_equal(gm.graph, depth=3) == 0
    assert merge_value_equal(gm.graph, depth=8) == 1  # the store reaches far1/far2 at depth 8
    gm.graph.lint()
    assert len(targets(gm, aten.mul.Tensor)) == 3 and len(targets(gm, aten.add.Tensor)) == 2


def test_tensors_returned_through_views_are_never_merged():
    """Two equal fresh tensors each returned through a view: one node would make the two outputs share memory."""
    g = G()
    c1 = g(aten.clone.default, g.x)
    c2 = g(aten.clone.default, g.x)
    value = g(aten.add.Tensor, c1, c2)
    gm = g.finish((g(aten.index_put.default, g.cache, [g(aten.slice.Tensor, g.slots, 0, 0, 8)], value),
                   g(aten.view.default, c1, [32]), g(aten.view.default, c2, [32])))
    assert merge_value_equal(gm.graph) == 0


def test_rules_run_in_order_and_are_counted(monkeypatch):
    from torch._dynamo.utils import counters

    seen = []

    def first(graph):
        seen.append("first")
        return 0

    monkeypatch.setattr(canon, "RULES", [first, merge_value_equal])
    g = G()
    gm = g.store(g(aten.add.Tensor, g(aten.neg.default, g.x), g(aten.neg.default, g.x)), 8)
    before = counters["fx_fusion"]["canonicalize.merge_value_equal"]
    assert canonicalize(gm.graph) == {"first": 0, "merge_value_equal": 1} and seen == ["first"]
    assert counters["fx_fusion"]["canonicalize.merge_value_equal"] == before + 1


# ------------------------------------------------------------------------------------------------
# End to end: torchtune's spelling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.full)])
def test_torchtune_decoder_fuses_every_layer_and_matches_eager(dtype, records, codes, inference):
    """Prefill of 5 tokens, then 2 decode steps: every layer of every graph fused; outputs, the caches and the
    ``cache_pos`` counters equal to eager after every step; the cache rows no step wrote hold their random start."""
    torch.manual_seed(0)
    model = TorchtuneDecoder(layers=2, dtype=dtype).eval()
    eager = copy.deepcopy(model)
    start = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("k_cache", "v_cache"))}
    steps = torchtune_steps(model, prefill=5, decode=2)
    run_steps(model, eager, compile_with(model, RAISE), steps, bf16_anywhere=dtype is torch.bfloat16)
    caches = [b for n, b in model.named_buffers() if n.endswith(("k_cache", "v_cache"))]
    check_fused(records, codes, caches, sites_per_graph=2)
    assert len(records) == 2  # the prefill graph and one decode graph (the second decode step reuses it)
    written = 5 + 2
    for name, b in model.named_buffers():
        if name in start:
            assert torch.equal(b[:, :, written:], start[name][:, :, written:]), f"{name}: rows past {written} changed"
            assert not torch.equal(b[:, :, :written], start[name][:, :, :written]), f"{name}: nothing stored"
    for layer in model.layers:
        assert layer.attn.kv_cache.cache_pos[0].item() == written
