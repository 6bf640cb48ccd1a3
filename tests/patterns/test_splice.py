"""patterns/splice.py: traces shared between sites with the same signature, each with its own fake values;
write-backs restricted to the caches; a splice that fails leaves the graph as it was."""

from __future__ import annotations

import operator

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fx_fusion.kernels.functional import NotTraceable
from fx_fusion.patterns.splice import Tracer, splice


@pytest.fixture
def mode():
    return FakeTensorMode(shape_env=ShapeEnv())


def graph_with(mode, *shapes, symbolic: bool = False):
    """A graph of placeholders with fake values of ``shapes`` (the first dim symbolic if asked)."""
    graph = Graph()
    nodes = []
    for i, shape in enumerate(shapes):
        n = graph.placeholder(f"x{i}")
        real = torch.randn(shape)
        if symbolic:
            from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

            ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (len(shape) - 1))
            n.meta["val"] = mode.from_tensor(real, symbolic_context=ctx)
        else:
            n.meta["val"] = mode.from_tensor(real)
        nodes.append(n)
    return graph, nodes


def add_sin(a, b, *, scale):
    return (a + b).sin() * scale, a.cos()


@pytest.fixture
def stats():
    counters["fx_fusion"].clear()
    return counters["fx_fusion"]


def test_same_signature_shares_one_trace_with_fresh_fake_values(mode, stats):
    graph, (a, b, c, d) = graph_with(mode, (4, 3), (4, 3), (4, 3), (4, 3))
    tracer = Tracer(mode)
    first = tracer.trace(add_sin, [a, b], scale=2.0)
    _, out1 = splice(graph, first.gm, [a, b], None)
    second = tracer.trace(add_sin, [c, d], scale=2.0)
    _, out2 = splice(graph, second.gm, [c, d], None)
    assert second is first and (stats["replacement_traces"], stats["replacement_traces_shared"]) == (1, 1)
    # each splice computes from its own inputs, with fake values of its own (shared ones read as aliases)
    assert [n.args[0] for n in (out1[1], out2[1])] == [a, c]
    vals = [n.meta["val"] for n in (*out1, *out2)]
    assert len({id(v) for v in vals}) == 4 and all(v.shape == (4, 3) for v in vals)


@pytest.mark.parametrize("change", ["shape", "static", "same node twice"])
def test_another_signature_traces_again(change, mode, stats):
    graph, (a, b, c) = graph_with(mode, (4, 3), (4, 3), (5, 3))
    tracer = Tracer(mode)
    tracer.trace(add_sin, [a, b], scale=2.0)
    args, scale = {"shape": ([c, c], 2.0), "static": ([a, b], 3.0), "same node twice": ([a, a], 2.0)}[change]
    gm = tracer.trace(add_sin, args, scale=scale).gm
    assert (stats["replacement_traces"], stats["replacement_traces_shared"]) == (2, 0)
    if change == "static":
        assert any(n.args[1:] == (3.0,) for n in gm.graph.nodes if n.op == "call_function")


def test_symbolic_sizes_share_and_stay_symbolic(mode, stats):
    graph, (a, b) = graph_with(mode, (4, 3), (4, 3), symbolic=True)
    graph2, (c, d) = graph_with(mode, (4, 3), (4, 3), symbolic=True)
    c.meta["val"], d.meta["val"] = a.meta["val"].clone(), a.meta["val"].clone()  # the same symbol, fresh tensors
    b.meta["val"] = a.meta["val"].clone()
    tracer = Tracer(mode)
    tracer.trace(add_sin, [a, b], scale=1.0)
    shared = tracer.trace(add_sin, [c, d], scale=1.0)
    assert stats["replacement_traces_shared"] == 1
    out = next(n for n in shared.gm.graph.nodes if n.op == "output").args[0][0]
    assert isinstance(out.meta["val"].shape[0], torch.SymInt)


def test_symbols_the_trace_proves_equal_share_the_trace(mode, stats):
    # a decode graph's first layer: the token counts of two inputs are two symbols until the trace adds them
    graph, (a, b) = graph_with(mode, (4, 3), (4, 3), symbolic=True)
    _, (c, d) = graph_with(mode, (4, 3), (4, 3), symbolic=True)
    assert str(a.meta["val"].shape[0]) != str(b.meta["val"].shape[0])
    tracer = Tracer(mode)
    tracer.trace(add_sin, [a, b], scale=1.0)
    assert str(mode.shape_env.replace(a.meta["val"].shape[0].node.expr)) == str(
        mode.shape_env.replace(b.meta["val"].shape[0].node.expr))
    # a later layer: both sizes are one symbol from the start
    c.meta["val"], d.meta["val"] = b.meta["val"].clone(), b.meta["val"].clone()
    tracer.trace(add_sin, [c, d], scale=1.0)
    assert (stats["replacement_traces"], stats["replacement_traces_shared"]) == (1, 1)


def test_not_traceable_is_raised_again_without_tracing(mode, stats):
    graph, (a, b, c, d) = graph_with(mode, (4, 3), (4, 3), (4, 3), (4, 3))
    calls = []

    def refuses(x, y):
        calls.append(1)
        raise NotTraceable("a symbolic constexpr")

    tracer = Tracer(mode)
    for args in ([a, b], [c, d]):
        with pytest.raises(NotTraceable, match="a symbolic constexpr"):
            tracer.trace(refuses, args)
    assert len(calls) == 1


def mutate_first(x, y):
    x.add_(y)
    return (y * 2,)


@pytest.mark.parametrize("written", [(0,), ()])
def test_write_backs_only_into_the_inputs_allowed(written, mode):
    graph, (a, b) = graph_with(mode, (4, 3), (4, 3))
    functional = torch.func.functionalize(mutate_first, remove="mutations")
    if written:
        traced = Tracer(mode).trace(functional, [a, b], written=written)
        assert [n.target for n in traced.write_backs] == [torch.ops.aten.copy_.default]
        _, (out,) = splice(graph, traced.gm, [a, b], "trace", traced.write_backs)
        # the write-back is left out: the graph's own epilogue copies new cache values back
        assert not any(n.target is torch.ops.aten.copy_.default for n in graph.nodes)
        assert out.meta["stack_trace"] == "trace"
    else:
        with pytest.raises(NotTraceable, match="writes its input"):
            Tracer(mode).trace(functional, [a, b], written=written)


def test_inputs_sharing_a_fake_value_are_refused(mode):
    from fx_fusion.patterns.site import Unfusable

    graph, (a, b) = graph_with(mode, (4, 3), (4, 3))
    b.meta["val"] = a.meta["val"]
    with pytest.raises(Unfusable, match="share one fake value"):
        Tracer(mode).trace(add_sin, [a, b], scale=1.0)


def test_a_failed_splice_leaves_the_graph_as_it_was(mode):
    graph, (a, b) = graph_with(mode, (4, 3), (4, 3))
    traced = Tracer(mode).trace(add_sin, [a, b], scale=1.0)
    before = [n.name for n in graph.nodes]
    with pytest.raises(ValueError):  # one input too few
        splice(graph, traced.gm, [a], None)
    last = list(traced.gm.graph.nodes)[-2]
    del last.meta["val"]
    with pytest.raises(RuntimeError, match="no fake value"):
        splice(graph, traced.gm, [a, b], None)
    assert [n.name for n in graph.nodes] == before


# --------------------------------------------------------------------------------------------------
# A shared trace's fake values for another site: views of the site's own tensors, new tensors for what the
# trace's ops make afresh (their fake implementations are not run again), what FakeTensorProp would record
# --------------------------------------------------------------------------------------------------

FAKE_RUNS = []


@torch.library.custom_op("fx_fusion_tests::scale_into", mutates_args=("out",))
def scale_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes ``2 x`` into ``out`` and returns ``x + 1`` (the fused op's shape: a fresh output, a written cache)."""
    out.copy_(x * 2)
    return x + 1


@scale_into.register_fake
def _(x, out):
    FAKE_RUNS.append(x)
    return torch.empty_like(x)


def through_op(x, cache, table):
    """Views of the inputs, a functionalized op (a fresh output and a fresh cache), views of its outputs."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    rows = table[:, :3]
    y, new_cache = auto_functionalized(torch.ops.fx_fusion_tests.scale_into.default, x=x * rows, out=cache)
    return y.view(-1), new_cache, y.t(), x.unsqueeze(0)


def aliasing(vals: list, gm) -> list:
    """Per node of ``gm`` (placeholders bound to ``vals``): the metadata of each tensor it holds and the first
    position (input or node, in order) whose value shares its storage."""
    from torch.multiprocessing.reductions import StorageWeakRef

    owners, out = [], []
    values = [*vals, *(n.meta["val"] for n in gm.graph.nodes if n.op == "call_function")]
    for v in values:
        leaves = []
        torch.fx.node.map_aggregate(v, leaves.append)
        row = []
        for t in leaves:
            if not isinstance(t, torch.Tensor):
                row.append(t)
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in owners:
                owners.append(ref)
            row.append((t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t._is_view(), owners.index(ref)))
        out.append(row)
    return out


def site_values(mode):
    with mode:
        return [torch.randn(4, 3), torch.zeros(4, 3), torch.randn(4, 5)]


def test_a_shared_trace_records_what_fake_tensor_prop_records(mode, stats):
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    graph = Graph()
    tracer = Tracer(mode)
    sites = []
    for i in range(3):
        nodes = [graph.placeholder(f"s{i}_{name}") for name in ("x", "cache", "table")]
        for n, v in zip(nodes, site_values(mode)):
            n.meta["val"] = v
        sites.append(nodes)
    FAKE_RUNS.clear()
    traced = tracer.trace(through_op, sites[0])
    first = {n: n.meta["val"] for n in traced.gm.graph.nodes if n.op != "output"}
    assert tracer.trace(through_op, sites[1]) is traced and len(FAKE_RUNS) == 1  # the op's fake impl: once
    vals = [n.meta["val"] for n in sites[1]]
    shared = aliasing(vals, traced.gm)
    mine = {n: n.meta["val"] for n in traced.gm.graph.nodes if n.op == "call_function"}
    with mode:
        FakeTensorProp(traced.gm, mode).propagate_dont_convert_inputs(*vals)
    assert shared == aliasing(vals, traced.gm)
    # nothing of the first site's is reused, and the views are of this site's own tensors
    from torch.multiprocessing.reductions import StorageWeakRef

    def storages(v):
        leaves = []
        torch.fx.node.map_aggregate(v, leaves.append)
        return {StorageWeakRef(t.untyped_storage()) for t in leaves if isinstance(t, torch.Tensor)}

    before = set().union(*(storages(v) for v in first.values()), *(storages(n.meta["val"]) for n in sites[0]))
    assert all(storages(v).isdisjoint(before) for v in mine.values())
    view_of_x = next(n for n in traced.gm.graph.nodes if n.target is torch.ops.aten.unsqueeze.default)
    assert storages(mine[view_of_x]) == storages(vals[0])
    assert (stats["replacement_traces"], stats["replacement_traces_shared"]) == (1, 1)


def test_inputs_sharing_storage_otherwise_trace_again(mode, stats):
    graph = Graph()
    a, b, c, d = (graph.placeholder(name) for name in "abcd")
    with mode:
        a.meta["val"], b.meta["val"] = torch.randn(4, 3), torch.randn(4, 3)
        base = torch.randn(4, 3)
        c.meta["val"], d.meta["val"] = base[:], base[:]  # one storage, the metadata of a and b
    tracer = Tracer(mode)
    tracer.trace(add_sin, [a, b], scale=1.0)
    tracer.trace(add_sin, [c, d], scale=1.0)
    assert (stats["replacement_traces"], stats["replacement_traces_shared"]) == (2, 0)


def add_through_op(x, out, y):
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    return auto_functionalized(torch.ops.fx_fusion_tests.scale_into.default, x=x + y, out=out)


def written(vals) -> list:
    """The sizes as their nodes hold them (expressions before the shape environment's replacements)."""
    def one(size):
        return str(size.node._expr) if isinstance(size, torch.SymInt) else size
    return [tuple(map(one, (*v.shape, *v.stride()))) for v in vals]


def test_symbolic_sizes_written_alike_get_new_tensors(mode, stats):
    graph, (a, b) = graph_with(mode, (4, 3), (4, 3), symbolic=True)
    c, d, cache1, cache2 = (graph.placeholder(name) for name in ("c", "d", "cache1", "cache2"))
    for n in (b, c, d, cache1, cache2):
        n.meta["val"] = a.meta["val"].clone()  # one symbol for the token count, as a decode graph's later layers
    FAKE_RUNS.clear()
    tracer = Tracer(mode)
    traced = tracer.trace(add_through_op, [a, cache1, b])
    assert tracer.trace(add_through_op, [c, cache2, d]) is traced and len(FAKE_RUNS) == 1
    out = next(n for n in traced.gm.graph.nodes if n.target is operator.getitem and n.args[1] == 0)
    assert isinstance(out.meta["val"].shape[0], torch.SymInt) and written([out.meta["val"]]) == written([a.meta["val"]])


def test_a_run_that_proves_symbols_equal_is_run_again(mode, stats):
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    # a decode graph's first layer: two symbols until the trace proves them equal; later layers: one symbol
    graph, (a, b) = graph_with(mode, (4, 3), (4, 3), symbolic=True)
    later = [[graph.placeholder(f"{name}{i}") for name in ("x", "out", "y")] for i in range(2)]
    FAKE_RUNS.clear()
    tracer = Tracer(mode)
    cache = graph.placeholder("cache")
    cache.meta["val"] = a.meta["val"].clone()
    traced = tracer.trace(add_through_op, [a, cache, b])
    for nodes in later:
        for n in nodes:
            n.meta["val"] = b.meta["val"].clone()
    # the trace's values predate the equality it proved: the next site runs the op again, the one after need not
    tracer.trace(add_through_op, later[0])
    assert len(FAKE_RUNS) == 2
    tracer.trace(add_through_op, later[1])
    assert len(FAKE_RUNS) == 2 and stats["replacement_traces_shared"] == 2
    vals = [n.meta["val"] for n in later[1]]
    mine = aliasing(vals, traced.gm)
    sizes = [written([v for v in n.meta["val"] if v is not None]) if isinstance(n.meta["val"], tuple)
             else written([n.meta["val"]]) for n in traced.gm.graph.nodes if n.op == "call_function"]
    with mode:
        FakeTensorProp(traced.gm, mode).propagate_dont_convert_inputs(*vals)
    assert mine == aliasing(vals, traced.gm)
    assert sizes == [written([v for v in n.meta["val"] if v is not None]) if isinstance(n.meta["val"], tuple)
                     else written([n.meta["val"]]) for n in traced.gm.graph.nodes if n.op == "call_function"]


def test_signature_of_inputs_with_an_absent_one_before_tensors():
    """An absent input (None: a v cache that is a view of k's buffer) before tensor inputs: the signature still
    says which inputs share a storage (a StorageWeakRef compared with None raised, on the GPU's stacked caches)."""
    from fx_fusion.patterns.splice import _signature

    graph = torch.fx.Graph()
    a, b, c = (graph.placeholder(name) for name in "abc")
    base = torch.randn(8, 4)
    a.meta["val"], b.meta["val"], c.meta["val"] = base[:4], base[4:], torch.randn(3)
    _, _, shared = _signature([None, a, b, c])
    assert shared == (None, 1, 1, 3)


# --------------------------------------------------------------------------------------------------
# The graph stays in topological order after a splice (keep_in_order)
# --------------------------------------------------------------------------------------------------


def test_readers_of_a_spliced_value_that_came_first_move_after_it():
    """``r = relu(x); v = r.view(-1); w = v + 1; late = neg(y); out = w * late.view(-1)``: ``r`` replaced by nodes
    spliced in after ``late`` (their last input); ``v`` and ``w`` read them and come before: they move after them,
    in their order,
    and nothing else moves. Then the graph computes what it did, with every node after its inputs."""
    from fx_fusion.patterns.fx_utils import in_topological_order
    from fx_fusion.patterns.splice import keep_in_order

    g = Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    r = g.call_function(torch.relu, (x,))
    v = g.call_function(torch.reshape, (r, (-1,)))
    w = g.call_function(operator.add, (v, 1))
    other = g.call_function(torch.sin, (x,))  # reads nothing spliced: stays where it is
    late = g.call_function(torch.neg, (y,))
    out = g.call_function(operator.mul, (w, g.call_function(torch.reshape, (late, (-1,)))))
    g.output((out, other))
    anchor = late.next
    with g.inserting_before(anchor):
        new = g.call_function(torch.clamp, (x, 0.0, None))  # relu's value, now after its last input (late's place)
        same = g.call_function(operator.eq, (late, late))  # a second new node, reading the late input
        spliced = g.call_function(torch.where, (same, new, new))
    r.replace_all_uses_with(spliced)
    g.erase_node(r)
    assert not in_topological_order(g)
    keep_in_order([new, same, spliced], anchor)
    assert in_topological_order(g)
    order = [n for n in g.nodes if n.op == "call_function"]
    assert order == [other, late, new, same, spliced, v, w, out.args[1], out]
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    xs, ys = torch.randn(3, 2), torch.randn(3, 2)
    got, got_other = gm(xs, ys)
    assert torch.equal(got, (torch.relu(xs).reshape(-1) + 1) * -ys.reshape(-1))
    assert torch.equal(got_other, torch.sin(xs))


def test_downstream_inputs_are_found_with_and_without_the_order_bound():
    """``first_downstream`` finds an input computed from a replaced node, and the walk bounded by the last input's
    place (a graph in order) gives what the whole walk gives."""
    from fx_fusion.patterns.fx_utils import first_downstream, in_topological_order

    g = Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b = g.call_function(torch.neg, (a,))
    c = g.call_function(torch.sin, (x,))
    d = g.call_function(torch.cos, (b,))
    tail = [g.call_function(torch.exp, (d,)) for _ in range(3)]
    g.output((d, c, *tail))
    assert in_topological_order(g)
    for in_order in (True, False):
        assert first_downstream({a}, [c, d], in_order) is d
        assert first_downstream({a}, [c, x], in_order) is None
        assert first_downstream({b}, [d], in_order) is d
        assert first_downstream({d}, [c, b], in_order) is None
