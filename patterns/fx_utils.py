"""Small FX helpers shared by the patterns: shapes of nodes, size comparisons, view ops, dim roles.

Size comparisons never install shape guards: a symbolic size is compared only by identity or by what
the shape environment already knows (``statically_known_true``), so a fused graph stays valid for every
size its guards admit.
"""

from __future__ import annotations

import enum

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

RESHAPES = frozenset({aten.reshape.default, aten.view.default, aten._unsafe_view.default})
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
