"""KV-cache stores in a functional post-grad graph, and the view chains that feed them.

Under ``torch.compile`` (inference, functionalized) every spelling of a cache write becomes

    new = aten.index_put.default(cache, indices, value)      # accumulate=False
    ... readers of the updated cache use ``new`` ...
    aten.copy_.default(cache, new)                           # epilogue into the mutated graph input

with ``indices`` telling the layout:

    [loc]                           token     cache [num_slots, Hkv, D]         (``k_buffer[loc] = k``)
    [loc] on reshape(cache)         paged     cache [blocks, bs, Hkv, D] seen flat (``cache.view(-1, H, D)[loc]``)
    [div(s, bs, 'floor'), s % bs]   paged     cache [blocks, bs, Hkv, D]        (``cache[s // bs, s % bs] = k``)
    [None, None, pos]               sequence  cache [B, Hkv, max_seq, D]        (``cache[:, :, pos] = k``, ``index_copy_``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg
from torch.fx import Node

from fx_fusion.kernels.rope_kv_cache import CacheLayout
from fx_fusion.patterns.fx_utils import RESHAPES, Role, broadcast_equal, is_one, shape_of, sizes_equal

aten = torch.ops.aten

Roles = tuple  # per dim: a Role, or None (a size-1 dim of no consequence)

_INDEX_PUT = CallFunction(aten.index_put.default, KeywordArg("cache"), KeywordArg("indices"), KeywordArg("value"))
_FLOOR_DIV = CallFunction(aten.div.Tensor_mode, KeywordArg("slot"), KeywordArg("block_size"), rounding_mode="floor")
_REMAINDER = CallFunction(aten.remainder.Scalar, KeywordArg("slot"), KeywordArg("block_size"))
_THD = (Role.TOKEN, Role.HEAD, Role.FEATURE)
_BHSD = (Role.BATCH, Role.HEAD, Role.SEQ, Role.FEATURE)


class NotAStore(Exception):
    """Why an ``index_put`` is not a KV-cache store the fused op can take over (for the report)."""


@dataclass
class Store:
    node: Node  # the index_put
    cache: Node  # the graph input that is written (the mutated base)
    cache_view: Node | None  # index_put's target when it is a reshape of ``cache``
    copy: Node  # the copy_ epilogue
    layout: CacheLayout
    slots: Node  # [T] slot per token, or [S] cache positions
    value: Node
    value_roles: Roles
    indices: tuple  # identity of the index expression, to pair the k and v stores

    @property
    def num_heads(self) -> int:
        return shape_of(self.cache)[-2] if self.layout is not CacheLayout.SEQUENCE else shape_of(self.cache)[1]

    @property
    def head_dim(self) -> int:
        return shape_of(self.cache)[-1]


def match_store(n: Node) -> Store:
    """Describe ``n`` (an index_put) as a KV-cache store, or raise ``NotAStore`` with the reason."""
    m = _INDEX_PUT.match(n)
    if not m:
        raise NotAStore("not an index_put")
    if len(n.args) > 3 and n.args[3]:
        raise NotAStore("index_put accumulates")
    target, indices, value = m.kwargs["cache"], list(m.kwargs["indices"]), m.kwargs["value"]
    cache, cache_view = target, None
    if isinstance(target, Node) and target.target in RESHAPES:
        cache, cache_view = target.args[0], target
    if not isinstance(cache, Node) or cache.op != "placeholder":
        raise NotAStore("the written tensor is not a graph input (a cache buffer)")
    copy = _epilogue(n, cache, cache_view)
    others = [u for u in cache.users if u not in (copy, cache_view, n)]
    if others:
        raise NotAStore(f"the cache is also read before the store (by {others[0].name})")
    if cache_view is not None and len(cache_view.users) != 1:
        raise NotAStore("the cache view is used by more than the store")
    cshape = shape_of(cache)
    if not all(isinstance(s, int) for s in cshape):
        raise NotAStore("the cache has dynamic sizes")

    if cache_view is not None:  # flat view of a paged cache
        vshape = shape_of(cache_view)
        if len(cshape) != 4 or len(vshape) != 3 or tuple(vshape) != (cshape[0] * cshape[1], *cshape[2:]):
            raise NotAStore(f"store through a view {tuple(vshape)} of a {tuple(cshape)} cache")
        layout, slots = CacheLayout.PAGED, _single_index(indices)
        expected, roles = (shape_of(slots)[0], *cshape[2:]), _THD
        key = ("flat", slots)
    elif len(cshape) == 3:
        layout, slots = CacheLayout.TOKEN, _single_index(indices)
        expected, roles = (shape_of(slots)[0], *cshape[1:]), _THD
        key = ("token", slots)
    elif len(cshape) == 4 and len(indices) == 2:
        div, rem = (_FLOOR_DIV.match(indices[0]) if isinstance(indices[0], Node) else None,
                    _REMAINDER.match(indices[1]) if isinstance(indices[1], Node) else None)
        if not (div and rem) or div.kwargs["slot"] is not rem.kwargs["slot"] or not (
                div.kwargs["block_size"] == rem.kwargs["block_size"] == cshape[1]):
            raise NotAStore("two index tensors that are not (slot // block_size, slot % block_size)")
        layout, slots = CacheLayout.PAGED, div.kwargs["slot"]
        expected, roles = (shape_of(slots)[0], *cshape[2:]), _THD
        key = ("paged", slots)
    elif len(cshape) == 4 and len(indices) == 3 and indices[0] is None and indices[1] is None:
        layout, slots = CacheLayout.SEQUENCE, indices[2]
        if not isinstance(slots, Node) or len(shape_of(slots)) != 1:
            raise NotAStore("the sequence index is not a 1-D tensor")
        expected, roles = (cshape[0], cshape[1], shape_of(slots)[0], cshape[3]), _BHSD
        key = ("sequence", slots)
    else:
        raise NotAStore(f"index form {_describe(indices)} on a {len(cshape)}-D cache is not a KV-cache layout")
    if shape_of(slots)[0] is None or slots.meta["val"].dtype not in (torch.int32, torch.int64):
        raise NotAStore("slot indices are not int32/int64")
    return Store(n, cache, cache_view, copy, layout, slots, value, _value_roles(value, expected, roles), key)


def _single_index(indices) -> Node:
    if len(indices) != 1 or not isinstance(indices[0], Node) or len(shape_of(indices[0])) != 1:
        raise NotAStore("expected one 1-D index tensor")
    return indices[0]


def _epilogue(n: Node, cache: Node, cache_view: Node | None) -> Node:
    """The ``copy_(cache, new)`` that writes the store back into the graph input."""
    new = n
    if cache_view is not None:
        back = [u for u in n.users if u.target in RESHAPES and tuple(shape_of(u)) == tuple(shape_of(cache))]
        if len(back) != 1:
            raise NotAStore("no reshape back to the cache after a store through a view")
        new = back[0]
    copies = [u for u in cache.users if u.target is aten.copy_.default and u.args[0] is cache]
    if len(copies) != 1 or copies[0].args[1] is not new:
        raise NotAStore("the store is not copied back into the cache input (not an in-place cache)")
    return copies[0]


def _value_roles(value, expected: tuple, roles: tuple) -> Roles:
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


def _describe(indices) -> str:
    return "[" + ", ".join("None" if i is None else getattr(i, "name", "?") for i in indices) + "]"


# ---- view chains ---------------------------------------------------------------------------


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(sizes_equal(x, y) for x, y in zip(a, b))


def walk_views(node: Node, roles: Roles) -> tuple[Node, Roles, list[Node]]:
    """Follow ``node`` back through pure views; return the first non-view node, its dims' roles, the chain.

    Reshapes are followed only when they add or drop size-1 dims (a reshape that regroups features
    belongs to the RoPE itself).
    """
    chain = []
    while node.op == "call_function":
        t = node.target
        src = node.args[0] if node.args else None
        if not isinstance(src, Node) or "val" not in src.meta:
            break
        if t is aten.permute.default:
            perm = [p % len(roles) for p in node.args[1]]
            new = [None] * len(roles)
            for i, p in enumerate(perm):
                new[p] = roles[i]
            roles = tuple(new)
        elif t is aten.unsqueeze.default:
            d = node.args[1] % len(roles)
            roles = roles[:d] + roles[d + 1:]
        elif t in (aten.squeeze.dim, aten.squeeze.dims):
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            src_shape = shape_of(src)
            squeezed = sorted({d % len(src_shape) for d in dims if is_one(src_shape[d % len(src_shape)])})
            new = list(roles)
            for d in squeezed:
                new.insert(d, None)
            roles = tuple(new)
        elif t in RESHAPES:
            a = [i for i, s in enumerate(shape_of(src)) if not is_one(s)]
            b = [i for i, s in enumerate(shape_of(node)) if not is_one(s)]
            # a reshape keeps the dims only if their sizes are known equal: ``[s0, 8, D] -> [8, s0, D]``
            # regroups elements although a symbolic s0 "may be" 8 (no broadcasting here)
            if len(a) != len(b) or not all(sizes_equal(shape_of(src)[i], shape_of(node)[j]) for i, j in zip(a, b)):
                # a round trip (x -> [T, H*D] -> [T, H, D], kept when the middle has other users) is the identity
                if src.target in RESHAPES and _same_shape(shape_of(src.args[0]), shape_of(node)):
                    chain += [node, src]
                    node = src.args[0]
                    continue
                break
            new = [None] * len(shape_of(src))
            for i, j in zip(a, b):
                new[i] = roles[j]
            roles = tuple(new)
        elif t in (aten.clone.default, aten.alias.default):
            pass
        else:
            break
        chain.append(node)
        node = src
    return node, roles, chain
