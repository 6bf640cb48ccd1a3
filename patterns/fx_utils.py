"""Small FX helpers shared by the patterns: the table of views and casts (``OP_ROLES``, ``ops_with``), shapes of
nodes, size comparisons, dim roles.

Size comparisons never install shape guards: a symbolic size is compared only by identity or by what
the shape environment already knows (``statically_known_true``), so a fused graph stays valid for every
size its guards admit.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims


class OpRole(enum.Enum):
    """What an op can do to a tensor, as the matchers read it (``OP_ROLES`` gives each op its roles)."""

    RESHAPE = "reshape"  # the same elements in another shape
    UNIT_DIM = "unit_dim"  # adds or drops size-1 dims
    PERMUTE = "permute"  # the dims in another order
    BROADCAST = "broadcast"  # size-1 dims repeated
    SELECTION = "selection"  # a part along one dim, a view a store writes through (scattered back: ``SCATTER_OF``)
    SPLIT = "split"  # the parts of a split, and the item that takes one
    ALIAS = "alias"  # the same tensor
    CLONE = "clone"  # a copy of the same values
    CAST = "cast"  # the values in another dtype (exact, or rounded)
    ARITHMETIC = "arithmetic"  # what a RoPE computes with: products, sums, negation, the halves concatenated
    DIVIDE = "divide"  # a division (by an fp8 store's scale)
    CLAMP = "clamp"  # a clamp (to an fp8 store's range)


OP_ROLES: Mapping[object, frozenset[OpRole]] = MappingProxyType({op: frozenset(roles) for op, roles in (
    (aten.reshape.default, {OpRole.RESHAPE}),  # post-grad graphs hold reshape where traces hold view
    (aten.view.default, {OpRole.RESHAPE}),
    (aten._unsafe_view.default, {OpRole.RESHAPE}),
    (aten.squeeze.dim, {OpRole.UNIT_DIM}),
    (aten.squeeze.dims, {OpRole.UNIT_DIM}),
    (aten.unsqueeze.default, {OpRole.UNIT_DIM}),
    (aten.permute.default, {OpRole.PERMUTE}),
    (aten.expand.default, {OpRole.BROADCAST}),
    (aten.select.int, {OpRole.SELECTION}),
    (aten.slice.Tensor, {OpRole.SELECTION}),
    (aten.split.Tensor, {OpRole.SPLIT}),
    (aten.split_with_sizes.default, {OpRole.SPLIT}),
    (operator.getitem, {OpRole.SPLIT}),
    (aten.alias.default, {OpRole.ALIAS}),
    (aten.clone.default, {OpRole.CLONE}),
    (prims.convert_element_type.default, {OpRole.CAST}),
    (aten._to_copy.default, {OpRole.CAST}),
    (aten.add.Tensor, {OpRole.ARITHMETIC}),
    (aten.sub.Tensor, {OpRole.ARITHMETIC}),
    (aten.mul.Tensor, {OpRole.ARITHMETIC}),
    (aten.neg.default, {OpRole.ARITHMETIC}),
    (aten.cat.default, {OpRole.ARITHMETIC}),
    (aten.div.Tensor, {OpRole.DIVIDE}),
    (aten.clamp_min.default, {OpRole.CLAMP}),
    (aten.clamp_max.default, {OpRole.CLAMP}),
    (aten.clamp.default, {OpRole.CLAMP}),
)})
"""The one table of views, casts and the arithmetic the matchers follow: each op (an ``OpOverload``, or
``operator.getitem``) and the roles it can play. Every matcher's set of ops is ``ops_with(<roles>)``, so a new
view or cast is one line here (and a handler in ``evaluator.py`` if the RoPE evaluator should see through it)."""

SCATTER_OF: Mapping[object, object] = MappingProxyType({aten.select.int: aten.select_scatter.default,
                                                        aten.slice.Tensor: aten.slice_scatter.default})
"""For each ``SELECTION`` op, the op functionalization writes its view back with (a store into a stacked buffer)."""


def ops_with(*roles: OpRole) -> frozenset:
    """The ops of ``OP_ROLES`` that can play any of ``roles``: ``ops_with(OpRole.RESHAPE, OpRole.CAST)``."""
    if not roles:
        raise ValueError("ops_with needs at least one OpRole, got none")
    for role in roles:
        if not isinstance(role, OpRole):
            raise TypeError(f"ops_with takes OpRole members, got {role!r} ({type(role).__name__})")
    wanted = set(roles)
    return frozenset(op for op, has in OP_ROLES.items() if has & wanted)


RESHAPES = ops_with(OpRole.RESHAPE)
"""Ops that give a tensor another shape over the same elements (post-grad graphs hold ``reshape``)."""


class Role(str, enum.Enum):
    """What a dim of q, k, v or a cache indexes (a ``None`` role is a size-1 dim of no consequence)."""

    BATCH = "b"
    SEQ = "s"  # position in the sequence (sequence layout)
    TOKEN = "t"  # flat token (token and paged layouts)
    HEAD = "h"
    FEATURE = "d"

    def __repr__(self) -> str:
        return repr(self.value)


def shape_of(n: Node) -> tuple:
    """The shape of ``n``'s value (ints and SymInts)."""
    return tuple(n.meta["val"].shape)


def is_one(s) -> bool:
    """``s`` is the concrete size 1 (a symbolic size is never taken to be 1)."""
    return isinstance(s, int) and s == 1


def sizes_equal(a, b) -> bool:
    """``a == b`` is known without a guard: equal ints, the same symbol, or implied by the shape env."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a is b or statically_known_true(a == b)


def broadcast_equal(a, b) -> bool:
    """Sizes that a valid graph makes equal where an op broadcasts them against each other.

    Equal sizes, or two sizes that are not 1 where one is symbolic: Dynamo may give the slots and the
    tokens different symbols for what is one size at run time, and an op such as ``index_put`` only runs
    when they agree. Use it only where such an op stands between the two sizes; a reshape needs
    ``sizes_equal``.
    """
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sizes_equal(a, b) or not (is_one(a) or is_one(b))


def within(starts, depth: int, step) -> list[Node]:
    """Nodes at most ``depth`` steps from ``starts`` (each step: ``step(node)``, e.g. its users or its inputs),
    in breadth-first order, the starts left out: one walk from all of them at once."""
    seen, frontier, out = set(starts), list(starts), []
    for _ in range(depth):
        nxt = [m for n in frontier for m in step(n) if m not in seen and not seen.add(m)]
        if not nxt:
            break
        out += nxt
        frontier = nxt
    return out


def same_shape(a, b) -> bool:
    """Equal sizes (compared without guards)."""
    return len(a) == len(b) and all(map(sizes_equal, a, b))


def same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and sizes, compared without guards."""
    return a.dtype == b.dtype and same_shape(a.shape, b.shape)


def slice_bounds(n: Node, width) -> tuple[int, int] | None:
    """``(start, end)`` of a step-1 slice or slice_scatter of the last dim (``width`` features), else None."""
    base, args = n.args[0], n.args[1:] if n.target is aten.slice.Tensor else n.args[2:]
    rank = len(shape_of(base))
    dim, start, end, step = (list(args) + [0, None, None, 1][len(args):])[:4]
    if dim % rank != rank - 1 or step != 1 or not isinstance(width, int):
        return None
    start, end = start or 0, width if end is None else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = (start + width if start < 0 else start), (end + width if end < 0 else end)
    return max(0, min(start, width)), max(0, min(end, width))


def eliminate_dead_code(graph) -> bool:
    """``graph.eliminate_dead_code()`` (which lints the graph first), with the same result for less: it asks whether
    a node is impure (the op's schema, its registered effects: far more than counting users) of every node, this
    only of nodes without users (a node with users is never removed), and once per ``OpOverload`` (whose answer
    does not depend on the call's arguments)."""
    import torch._inductor.config
    from torch._guards import TracingContext

    impure_random = torch._inductor.config.fallback_random if TracingContext.try_get() else True  # as it decides
    of_op: dict = {}

    def impure(n) -> bool:
        if n.users:
            return True
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            return n.is_impure(impure_random)
        if n.target not in of_op:
            of_op[n.target] = n.is_impure(impure_random)
        return of_op[n.target]

    return graph.eliminate_dead_code(impure)


def in_topological_order(graph) -> bool:
    """Whether every node comes after its inputs (one walk; ``stable_topological_sort`` costs far more, and on a
    sorted graph it keeps every node where it is)."""
    seen = set()
    for n in graph.nodes:
        if not all(a in seen for a in n.all_input_nodes):
            return False
        seen.add(n)
    return True


def first_downstream(replaced, inputs, in_order: bool) -> Node | None:
    """One of ``inputs`` computed from a node of ``replaced`` (reached through users), or None. ``in_order``: the
    graph is in topological order, so every node's users follow it and the walk stops at nodes past the last
    input (what they reach comes later still): a walk near the site, not through the rest of the graph."""
    inputs = {n for n in inputs if n is not None}
    if not inputs:
        return None
    last = max(inputs) if in_order else None  # nodes compare by their place in the graph
    seen = set(replaced)
    frontier = [n for n in replaced if last is None or n < last]
    while frontier:
        for u in frontier.pop().users:
            if u in inputs:
                return u
            if u not in seen and (last is None or u < last):
                seen.add(u)
                frontier.append(u)
    return None


class Emitter:
    """Insert ``target(*args, **kwargs)`` at the graph's insertion point, its fake value computed on the args' fake
    values (``fake_mode``), the new node appended to ``created`` and given ``stack_trace``."""

    def __init__(self, graph, fake_mode, created: list, stack_trace: str | None):
        self.graph, self.fake_mode, self.created, self.stack_trace = graph, fake_mode, created, stack_trace

    def __call__(self, target, *args, **kwargs) -> Node:
        vals, kw_vals = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            val = target(*vals, **kw_vals)
        n = self.graph.call_function(target, args, kwargs or None)
        n.meta["val"] = val
        if self.stack_trace:
            n.meta["stack_trace"] = self.stack_trace
        self.created.append(n)
        return n


def fake_mode_of(graph):
    """The fake mode of the graph's values (one per graph), found from its inputs; None if they carry none."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])
