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
                   Inductor's re-inplacing)
    write_backs    the trace's writes into its inputs, checked to be the caches only
    splice         the trace's nodes copied into the graph, bound to the site's input nodes
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch._dynamo.utils import counters
from torch.fx import Graph, Node

from fx_fusion.kernels.functional import NotTraceable
from fx_fusion.patterns.site import Unfusable

log = logging.getLogger("fx_fusion")


@dataclass
class Traced:
    """One traced replacement: the graph module and the write-backs ``splice`` leaves out."""

    gm: torch.fx.GraphModule
    write_backs: set


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
                self._propagate(found.gm, vals)
                counters["fx_fusion"]["replacement_traces_shared"] += 1
                return found
            except Exception as e:  # noqa: BLE001 (a trace that does not replay is traced afresh)
                log.debug("a shared trace did not replay (%s: %s); tracing again", type(e).__name__, e)
        try:
            gm = self._make_fx(fn, vals, static)
            traced = self._traces[key] = Traced(gm, write_backs(gm, written))
        except NotTraceable as e:
            self._traces[key] = e
            raise
        # the sizes as the shape environment reads them now, with what the trace proved
        self._traces.setdefault(self._key(fn, written, static, inputs), traced)
        counters["fx_fusion"]["replacement_traces"] += 1
        return traced

    @staticmethod
    def _key(fn: Callable, written: tuple, static: dict, inputs: list) -> str:
        return repr((getattr(fn, "__qualname__", fn), written, sorted(static.items()), _signature(inputs)))

    def _make_fx(self, fn: Callable, vals: list, static: dict) -> torch.fx.GraphModule:
        from torch.fx.experimental.proxy_tensor import make_fx

        def traced(*args):
            return fn(*args, **static)

        with self.mode:
            return make_fx(traced, tracing_mode="real")(*vals)

    def _propagate(self, gm: torch.fx.GraphModule, vals: list) -> None:
        """Fresh fake values for every node of ``gm`` from ``vals`` (the trace's ops run again, on fake tensors)."""
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        with self.mode:
            FakeTensorProp(gm, self.mode).propagate_dont_convert_inputs(*vals)


def _signature(inputs: list) -> tuple:
    """What a trace depends on in its inputs: metadata (sizes and strides as expressions in the graph's symbols),
    and which inputs are the same node."""
    def describe(n: Node | None):
        if n is None:
            return None
        v = n.meta["val"]
        if not isinstance(v, torch.Tensor):
            return ("value", str(v))
        return (v.dtype, v.device, tuple(map(_expr, v.shape)), tuple(map(_expr, v.stride())),
                _expr(v.storage_offset()), v.requires_grad)
    return tuple(describe(n) for n in inputs), tuple(inputs.index(n) for n in inputs)


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
            new = graph.node_copy(n, env.__getitem__)
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
