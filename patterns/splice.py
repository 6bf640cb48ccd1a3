"""Graph surgery for the pass: trace a replacement on a site's fake values, share the trace between sites, splice
it into the graph.

Why not Inductor's ``Match.replace_by_example``: it traces the replacement afresh for every match (Inductor's
``fwd_only``: here a functionalized ``wrap_triton`` launch whose kernel is analysed each time, the pass's main
compile-time cost), and it replaces a match's outputs with all of the replacement's: the fused replacement also
writes the caches back (``copy_`` into its inputs), which must be left out because the graph's own epilogue
copies the new cache values back. So:

    Tracer.trace   ``fn(*inputs, **static)`` traced with ``make_fx`` on the inputs' fake values in the graph's
                   fake mode (symbolic sizes stay the graph's symbols), once per (fn, static arguments, input
                   metadata, read before and after the trace: a trace may prove two symbols equal, e.g. a decode
                   graph's token counts of the input and of the slots, distinct until the first layer's trace
                   checks them); a site with the same signature reuses the trace with its fake values computed
                   afresh from its own inputs (two sites sharing fake values would read as aliases to
                   Inductor's re-inplacing): views are taken again of the site's own tensors, and a node whose
                   values are tensors of their own (the fused op's outputs) gets new tensors of the same metadata
                   without running its op again (``fresh_nodes``)
    write_backs    the trace's writes into its inputs, checked to be the caches only
    splice         the trace's nodes copied into the graph, bound to the site's input nodes
"""

from __future__ import annotations

import copy
import logging
import operator
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from fx_fusion.kernels.functional import NotTraceable, routes
from fx_fusion.patterns.site import Unfusable

log = logging.getLogger("fx_fusion")


@dataclass
class Traced:
    """One traced replacement: the graph module and the write-backs ``splice`` leaves out."""

    gm: torch.fx.GraphModule
    write_backs: set
    # the nodes a site sharing the trace may get new tensors for (``fresh_nodes``); None: every node runs again
    fresh: frozenset | None = None
    # (the inputs as written, the shape environment's state) of the run whose fake values ``gm`` holds; None when
    # that run changed the shape environment (its values may predate what it proved)
    last_run: tuple | None = None


class Tracer:
    """The traces of one graph's replacements, in that graph's fake mode (``mode``)."""

    def __init__(self, mode):
        self.mode = mode
        self._traces: dict[str, Traced | Exception] = {}

    def trace(self, fn: Callable, inputs: list, written: tuple = (), **static) -> Traced:
        """``fn(*inputs, **static)`` traced on the inputs' fake values; ``written``: the positions of the inputs the
        trace may write back into (``write_backs``). Raises what the trace raises (``NotTraceable``: again for
        every site with the same signature, without tracing again)."""
        # make_fx tells its inputs apart by their tensors: two nodes with one fake value would merge
        nodes = {n for n in inputs if n is not None}
        if len({id(n.meta["val"]) for n in nodes}) != len(nodes):
            raise Unfusable("two inputs of the fused op share one fake value")
        vals = [None if n is None else n.meta["val"] for n in inputs]
        key = self._key(fn, written, static, inputs)
        found = self._traces.get(key)
        if isinstance(found, Exception):
            raise found
        if found is not None:
            try:
                self._propagate(found, vals)
                counters["fx_fusion"]["replacement_traces_shared"] += 1
                return found
            except Exception as e:  # noqa: BLE001 (a trace that does not replay is traced afresh)
                log.debug("a shared trace did not replay (%s: %s); tracing again", type(e).__name__, e)
        try:
            before = _env_state(self.mode)
            gm = self._make_fx(fn, vals, static)
            traced = self._traces[key] = Traced(gm, write_backs(gm, written), fresh_nodes(gm, self.mode))
            traced.last_run = _run_state(vals, before, self.mode)
        except NotTraceable as e:
            self._traces[key] = e
            raise
        # the sizes as the shape environment reads them now, with what the trace proved
        self._traces.setdefault(self._key(fn, written, static, inputs), traced)
        counters["fx_fusion"]["replacement_traces"] += 1
        return traced

    def trace_best(self, fn: Callable, inputs: list, written: tuple, device: torch.device, validate: bool,
                   **static) -> Traced:
        """``trace`` with the best launch form that traces on ``device`` (``fn``'s ``kernel`` argument, from
        ``kernels.functional.routes``): the kernel's launch, or, where a symbolic size it takes as a constant keeps it
        from tracing (``NotTraceable``), the op."""
        kernels = routes(device, validate)
        for kernel in kernels:
            try:
                return self.trace(fn, inputs, written, kernel=kernel, **static)
            except NotTraceable as e:
                if kernel is kernels[-1]:
                    raise
                log.debug("%s: %s; emitting the op", getattr(fn, "__qualname__", fn), e)
        raise AssertionError("unreachable")

    @staticmethod
    def _key(fn: Callable, written: tuple, static: dict, inputs: list) -> str:
        return repr((getattr(fn, "__qualname__", fn), written, sorted(static.items()), _signature(inputs)))

    def _make_fx(self, fn: Callable, vals: list, static: dict) -> torch.fx.GraphModule:
        from torch.fx.experimental.proxy_tensor import make_fx

        def traced(*args):
            return fn(*args, **static)

        with self.mode:
            return make_fx(traced, tracing_mode="real")(*vals)

    def _propagate(self, traced: Traced, vals: list) -> None:
        """Fresh fake values for every node of the trace from ``vals``: the trace's ops run again on fake tensors,
        but for the nodes ``fresh_nodes`` names, which get new tensors of the metadata they had when the last run
        was an equal one (``_run_state``: the same inputs, sizes written alike, in an unchanged shape environment:
        the ops would make the same metadata again)."""
        before = _env_state(self.mode)
        if traced.fresh is not None and traced.last_run is not None and traced.last_run == _run_state(
                vals, before, self.mode):
            _run_again(traced.gm, traced.fresh, vals, self.mode)
        else:
            from torch.fx.passes.fake_tensor_prop import FakeTensorProp

            with self.mode:
                FakeTensorProp(traced.gm, self.mode).propagate_dont_convert_inputs(*vals)
        traced.last_run = _run_state(vals, before, self.mode)


def _env_state(mode) -> tuple | None:
    """What the shape environment knows, as counts that grow with it (guards, replacements, ranges, ...); None where
    this torch keeps no version of it (sizes that are not static then never skip an op)."""
    env = mode.shape_env
    if env is None:
        return ()
    try:
        return (env._version_counter, len(env.guards), len(env.axioms), len(env.replacements), len(env.var_to_range),
                sum(map(len, env.deferred_runtime_asserts.values())))
    except AttributeError:
        return None


def _run_state(vals: list, before: tuple | None, mode) -> tuple | None:
    """A run's inputs as written (each size's own expression, before the shape environment's replacements: the ops
    carry it into their outputs) and the shape environment's state, when the run left it as it was (else None).

    Two runs with equal states compute equal metadata. Sizes that are all static need no shape environment."""
    after = _env_state(mode)
    if after != before:
        return None
    written = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            written.append(tuple(map(_written, (*v.shape, *v.stride(), v.storage_offset()))))
    if all(isinstance(s, int) for sizes in written for s in sizes):
        return tuple(written), "static"
    if after is None or any(s is None for sizes in written for s in sizes):
        return None
    return tuple(written), after


def _written(size):
    """A size as its node holds it (the expression it was made with), or the int."""
    if isinstance(size, torch.SymInt):
        return getattr(size.node, "_expr", None)
    return size


def fresh_nodes(gm: torch.fx.GraphModule, mode) -> frozenset[Node] | None:
    """The calls of ``gm`` whose values are tensors of their own, read from the fake values of its trace: every
    tensor they return has a storage no placeholder and no earlier node holds and that no other of their tensors
    shares, is no view, and is what ``torch.empty_strided`` makes of its sizes and strides (offset 0, no spare
    bytes). Run again on inputs of equal metadata and storage sharing (``_signature``) and sizes written alike
    (``_run_state``), the same calls make such tensors again: another site gets new ones of the same metadata
    instead of running the op (the fused op's fake implementation, with its checks, is most of a run). Every other
    node runs again: views are taken of the site's own tensors, so what aliases what is the site's own, as
    Inductor's re-inplacing reads it.

    None where the trace holds anything but placeholders, calls and the output, or binds data-dependent sizes."""
    from torch.multiprocessing.reductions import StorageWeakRef

    seen: set = set()
    fresh = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op not in ("placeholder", "call_function") or "unbacked_bindings" in n.meta:
            return None
        leaves: list = []
        torch.fx.node.map_aggregate(n.meta.get("val"), leaves.append)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        storages = [StorageWeakRef(t.untyped_storage()) for t in tensors]
        if (n.op == "call_function" and n.target is not operator.getitem and tensors
                and all(x is None or isinstance(x, torch.Tensor) for x in leaves)
                and all(_made_afresh(t, mode) for t in tensors)
                and len(set(storages)) == len(storages) and seen.isdisjoint(storages)):
            fresh.add(n)
        seen.update(storages)
    return frozenset(fresh)


def _made_afresh(t: torch.Tensor, mode) -> bool:
    """Whether ``torch.empty_strided(t.shape, t.stride())`` makes a tensor like ``t`` (a fake tensor, no view, no
    constant, no grad, offset 0, a storage of as many bytes), compared without shape guards."""
    from torch._subclasses.fake_tensor import FakeTensor

    from fx_fusion.patterns.fx_utils import sizes_equal

    if type(t) is not FakeTensor or t.layout is not torch.strided or t._is_view() or t.constant is not None:
        return False
    offset = t.storage_offset()
    if t.requires_grad or not isinstance(offset, int) or offset != 0:
        return False
    with mode:
        made = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return sizes_equal(made.untyped_storage().nbytes(), t.untyped_storage().nbytes())


def _run_again(gm: torch.fx.GraphModule, fresh: frozenset, vals: list, mode) -> None:
    """Each call of ``gm`` run on the fake values ``vals`` (as ``FakeTensorProp`` runs it, with the values it records),
    but the nodes in ``fresh``, which get new tensors of the sizes and strides their last values had."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import py_sym_types, snapshot_fake

    def new_like(x):
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        return x

    def recorded(x):  # FakeTensorProp's record of a value
        if isinstance(x, FakeTensor):
            return snapshot_fake(x)
        if isinstance(x, torch.Tensor):
            return snapshot_fake(mode.from_tensor(x, static_shapes=True))
        return x if isinstance(x, (*py_sym_types, int, float, bool)) else None

    env: dict[Node, object] = dict(zip(gm.graph.find_nodes(op="placeholder"), vals, strict=True))
    with mode:
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if n in fresh:
                value = torch.fx.node.map_aggregate(n.meta["val"], new_like)
            else:
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                value = n.target(*args, **kwargs)
            env[n] = value
            meta = torch.fx.node.map_aggregate(value, recorded)
            if meta is not None:
                n.meta["val"] = meta


def _signature(inputs: list) -> tuple:
    """What a trace depends on in its inputs: metadata (sizes and strides as expressions in the graph's symbols),
    which inputs are the same node, and which share a storage."""
    def describe(n: Node | None):
        if n is None:
            return None
        v = n.meta["val"]
        if not isinstance(v, torch.Tensor):
            return ("value", str(v))
        return (v.dtype, v.device, tuple(map(_expr, v.shape)), tuple(map(_expr, v.stride())),
                _expr(v.storage_offset()), v.requires_grad)

    from torch.multiprocessing.reductions import StorageWeakRef

    storages = [StorageWeakRef(n.meta["val"].untyped_storage())
                if n is not None and isinstance(n.meta["val"], torch.Tensor) else None for n in inputs]
    # which inputs share a storage (q, k and v split from one projection): the op's checks read it. (A dict: a
    # StorageWeakRef compared with None raises, so no list.index over a list holding both.)
    first: dict = {}
    for i, st in enumerate(storages):
        if st is not None:
            first.setdefault(st, i)
    shared = tuple(None if st is None else first[st] for st in storages)
    return tuple(describe(n) for n in inputs), tuple(inputs.index(n) for n in inputs), shared


def _expr(size) -> str:
    """A size as text; a symbolic one in the shape environment's canonical symbols (a token count that Dynamo
    found equal to another is one symbol, whichever tensor it was first seen on)."""
    if isinstance(size, torch.SymInt):
        return str(size.node.shape_env.replace(size.node.expr))
    return str(size)


def write_backs(gm: torch.fx.GraphModule, written: tuple) -> set[Node]:
    """``gm``'s write-backs (``copy_``) into the inputs numbered in ``written`` (the caches), which the
    splice leaves out: the replaced ``index_put`` nodes' values are copied back by the graph's epilogue.

    A write into any other input raises ``NotTraceable``, so the site is fused with the op instead:
    Inductor decides which arguments a user Triton kernel writes from the kernel's TTIR, and where that
    analysis fails it assumes every tensor argument is written (the functionalized launch writes q, k, v)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    allowed = {placeholders[i] for i in written}
    out = set()
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default):
        if n.args[0].op != "placeholder":
            continue
        if n.args[0] not in allowed or n.users:
            raise NotTraceable(f"the traced launch writes its input {n.args[0].name}")
        out.add(n)
    return out


def splice(graph: Graph, gm: torch.fx.GraphModule, inputs: list, stack_trace: str | None, skip=frozenset()):
    """Copy ``gm``'s nodes but those in ``skip`` (see ``write_backs``) into ``graph`` at the insertion point,
    its inputs bound to ``inputs``. Returns (the new nodes, the values of ``gm``'s outputs in ``graph``)."""
    env: dict[Node, object] = {}
    new_nodes: list[Node] = []
    try:
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        for ph, node in zip(placeholders, inputs, strict=True):
            env[ph] = node
        for n in gm.graph.nodes:
            if n.op == "placeholder" or n in skip:
                continue
            if n.op == "output":
                return new_nodes, torch.fx.node.map_arg(n.args[0], env.__getitem__)
            if n.op != "call_function":
                raise RuntimeError(f"the traced replacement holds a {n.op} node ({n.name})")
            if n.target is operator.getitem and not n.users and n.meta.get("val") is None:
                continue  # an op's output for an optional cache it was not given (None): nothing to copy
            new = _copy_node(graph, n, env)
            new_nodes.append(new)
            if stack_trace:
                new.meta["stack_trace"] = stack_trace
            if "val" not in new.meta:
                raise RuntimeError(f"the traced replacement's {n.name} has no fake value")
            env[n] = new
        raise RuntimeError("the traced replacement has no output")
    except Exception:
        for n in reversed(new_nodes):
            graph.erase_node(n)
        raise


def keep_in_order(new_nodes: list[Node], anchor: Node) -> None:
    """After ``new_nodes`` were spliced in just before ``anchor`` and given the uses of what they replace: move the
    nodes that read them but come before them (views of the rotated q, reads of a cache after its store), with
    what those feed that also comes before them, to just before ``anchor``, in their order. The graph stays in
    topological order after every rewrite: the pass needs no sort of the whole graph at its end, and a node's place
    bounds what can depend on it (``fx_utils.first_downstream``). A node moves only past nodes it does not read."""
    new = set(new_nodes)
    first = min(new_nodes)  # nodes compare by their place in the graph
    early = {u for n in new_nodes for u in n.users if u not in new and u < first}
    frontier = list(early)
    while frontier:
        for u in frontier.pop().users:
            if u not in early and u not in new and u < first:
                early.add(u)
                frontier.append(u)
    if any(a in early for n in new_nodes for a in n.all_input_nodes):
        raise RuntimeError("the fused op reads a node that reads its outputs")  # (the planner's check failed)
    for n in sorted(early):
        anchor.prepend(n)


_NUMBERED = re.compile(r"_\d+$")


def _copy_node(graph: Graph, n: Node, env: dict) -> Node:
    """``graph.node_copy(n)`` named after ``n``'s name without its number (``getitem_3`` -> ``getitem``).

    torch 2.11's ``_Namespace.create_name`` counts up from a candidate's own number one name at a time: every
    site's copy of ``getitem_3`` would walk past the copies of all the sites before it (12 ms a site at 32 layers
    on the GPU, quadratic in depth). A name without a number starts from the base's counter."""
    args, kwargs = (torch.fx.node.map_arg(a, env.__getitem__) for a in (n.args, n.kwargs))
    new = graph.create_node(n.op, n.target, args, kwargs, _NUMBERED.sub("", n.name), n.type)
    new.meta = copy.copy(n.meta)
    return new
