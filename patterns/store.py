"""What a matched KV-cache store is: ``Store`` (the written tensor, its layout, slots and value), where the written
tensor comes from (``Origin``), why a node is not a store (``NotAStore``) and the roles of the stored value's dims.

The matchers fill it in: ``kv_store.py`` for aten stores (``index_put``, a copy into a window or a slice),
``engine_store.py`` for engines' own store ops.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.fx import Node

from fx_fusion.kernels.problem import CacheLayout
from fx_fusion.patterns.fx_utils import Role, broadcast_equal, is_one, shape_of

if TYPE_CHECKING:
    from fx_fusion.patterns.engine_store import EngineSlots

Roles = tuple  # per dim: a Role, or None (a size-1 dim of no consequence)
THD = (Role.TOKEN, Role.HEAD, Role.FEATURE)
BHSD = (Role.BATCH, Role.HEAD, Role.SEQ, Role.FEATURE)


class Origin(str, enum.Enum):
    """Where the written tensor comes from (see the module docstring)."""

    INPUT = "input"
    VIEW = "view"
    GRAPH = "graph"


class NotAStore(Exception):
    """Why an ``index_put`` is not a KV-cache store the fused op can take over (for the report)."""


@dataclass
class Store:
    node: Node  # the index_put (or the engine's store op)
    cache: Node  # the tensor written, in the layout's shape (a graph input, a view of a buffer, a graph tensor)
    cache_view: Node | None  # index_put's target when it is a reshape of ``cache``
    copy: Node | None  # the copy_ epilogue into a graph input (Origin.INPUT)
    layout: CacheLayout
    slots: Node  # [T] slot per token, or [S] cache positions
    value: Node
    value_roles: Roles
    indices: tuple  # identity of the index expression, to pair the k and v stores
    origin: Origin = Origin.INPUT
    views: tuple = ()  # Origin.VIEW: the select/slice nodes from the buffer to ``cache``, outermost first
    scatters: tuple = ()  # Origin.VIEW: the scatters of the new view back up to the buffer's new value
    parents: tuple = ()  # Origin.VIEW: the scatters' targets (views of the buffer made again by the graph)
    result_node: Node | None = None  # the node whose value is the written tensor's new value, if not ``node``
    flat_value: bool = False  # ``value`` is [T, Hkv*D] (an engine's row view), not [T, Hkv, D]
    window: tuple | None = None  # a whole-cache copy: (a, S), tokens a .. a+W-1 of S stored; ``slots`` is None
    engine_slots: EngineSlots | None = None  # an engine op's index rule, applied to ``slots`` by the replacement
    start: object = None  # a copy into a slice of the sequence dim: its first position (int or SymInt node);
    #                       the positions start .. start+T-1 are built by the rewrite (``slots`` is None)
    view_ops: tuple | None = None  # (op, args) from ``base`` to the op's [B, Hkv, max_seq, D] cache, if not ``views``
    seq_dim: int = 2  # the dim of ``cache`` holding positions (sequence layout): 1 for [B, S_max, Hkv, D]

    @property
    def base(self) -> Node:
        """The tensor whose new value the store produces (the stacked buffer for a view, else ``cache``)."""
        return self.views[0].args[0] if self.views else self.cache

    @property
    def result(self) -> Node:
        """The node holding ``base``'s value after the store (what the graph reads, copies back or returns)."""
        if self.scatters:
            return self.scatters[-1]
        return self.result_node if self.result_node is not None else self.node

    @property
    def num_heads(self) -> int:
        if self.layout is CacheLayout.SEQUENCE:
            return shape_of(self.cache)[3 - self.seq_dim]
        return shape_of(self.cache)[-2]

    @property
    def head_dim(self) -> int:
        return shape_of(self.cache)[-1]


def value_roles(value, expected: tuple, roles: tuple) -> Roles:
    """Roles of the stored value's dims; it may omit leading size-1 dims (broadcast by index_put).

    ``broadcast_equal``: index_put broadcasts the value against the indexed shape, and a graph that runs
    has them equal (a size 1 against a larger size is rejected: that would store one row many times)."""
    if not isinstance(value, Node):
        raise NotAStore("the stored value is a constant")
    vshape = shape_of(value)
    if len(vshape) > len(expected):
        raise NotAStore(f"stored value {tuple(vshape)} has more dims than the indexed {tuple(expected)}")
    lead = len(expected) - len(vshape)
    if not all(is_one(s) for s in expected[:lead]):
        raise NotAStore(f"stored value {tuple(vshape)} is broadcast over {tuple(expected)}")
    out = []
    for s, e, role in zip(vshape, expected[lead:], roles[lead:]):
        if not broadcast_equal(s, e):
            raise NotAStore(f"stored value {tuple(vshape)} is broadcast over {tuple(expected)}")
        out.append(role)
    return tuple(out)
