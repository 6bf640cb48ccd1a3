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

and one more sequence store is a whole-cache copy (``match_copy_store``)::

    new = aten.copy.default(cache, aten.slice(k, 2, a, a + W))   # cache.copy_(k[:, :, a:a + W]), cache [B, Hkv, W, D]

which stores token ``a + j`` at position ``j`` and no other token: HF's sliding-window layer keeps the last W
tokens of a prefill longer than its window this way (``self.keys.copy_(key_states[:, :, -W:, :])``).

The written tensor (``cache`` above) is one of

    a graph input        the epilogue ``copy_(cache, new)`` writes the store back (``Origin.INPUT``)
    a view of a buffer   ``select``/``slice`` of a stacked buffer (``kv[0, i][blk, off] = k``): the new view is
                         scattered back, ``select_scatter(select(buf, 0, 0), new, 0, i)`` ... up to ``buf``'s
                         new value, which the next store reads and the graph copies into the input (``Origin.VIEW``)
    a graph's own tensor allocated in the graph (HF ``StaticCache`` allocating on its first update: ``full``) or
                         computed there (a full sliding window: the rolled keys, a gather); nothing else reads it
                         before the store (``Origin.GRAPH``)

A store may also be an engine's own cache op (``sglang.store_cache``): ``engine_store.py``. What a matched store
is (``Store``, ``Origin``, ``NotAStore``) is in ``store.py``.
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg
from torch.fx import Node
from torch.multiprocessing.reductions import StorageWeakRef

from fx_fusion.kernels.problem import CacheLayout
from fx_fusion.patterns.fx_utils import (RESHAPES, SCATTER_OF, OpRole, Role, is_one, ops_with, same_shape, shape_of,
                                        sizes_equal)
from fx_fusion.patterns.store import BHSD, THD, NotAStore, Origin, Roles, Store, value_roles

aten = torch.ops.aten

_INDEX_PUT = CallFunction(aten.index_put.default, KeywordArg("cache"), KeywordArg("indices"), KeywordArg("value"))
_FLOOR_DIV = CallFunction(aten.div.Tensor_mode, KeywordArg("slot"), KeywordArg("block_size"), rounding_mode="floor")
_REMAINDER = CallFunction(aten.remainder.Scalar, KeywordArg("slot"), KeywordArg("block_size"))


_VIEWS = {op: SCATTER_OF[op] for op in ops_with(OpRole.SELECTION)}
"""Views of a stacked buffer a store may write through, and the op that scatters the new view back."""

_WALKED = ops_with(OpRole.RESHAPE, OpRole.UNIT_DIM, OpRole.PERMUTE, OpRole.ALIAS, OpRole.CLONE)
"""The views ``walk_views`` follows from a stored value back to what was computed."""


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
    if not isinstance(cache, Node) or "val" not in cache.meta:
        raise NotAStore("the written tensor is not a tensor of the graph")
    views, scatters, parents, copy = _view_chain(cache), (), (), None
    if views:
        origin = Origin.VIEW
        if cache_view is not None:
            raise NotAStore(f"store through a reshape of a view ({views[-1].target}) of {views[0].args[0].name}")
        scatters, parents = _scatter_chain(n, views)
    elif cache.op == "placeholder":
        origin = Origin.INPUT
        copy = _epilogue(n, cache, cache_view)
    else:
        origin = Origin.GRAPH
        if cache_view is not None:
            raise NotAStore(f"store through a view of {cache.name}, a tensor computed in the graph")
        _check_not_a_view(cache)
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
        expected, roles = (shape_of(slots)[0], *cshape[2:]), THD
        key = ("flat", slots)
    elif len(cshape) == 3 and len(indices) == 2 and indices[0] is None:
        raise NotAStore(f"a {list(cshape)} cache written along its second dim, with no head dim (a one-head key "
                        "cache [B, S, D], as DeepSeek-V3.2's indexer keeps its keys): the op's caches have a head dim, "
                        "and a v cache beside them")
    elif len(cshape) == 3:
        layout, slots = CacheLayout.TOKEN, _single_index(indices)
        expected, roles = (shape_of(slots)[0], *cshape[1:]), THD
        key = ("token", slots)
    elif len(cshape) == 4 and len(indices) == 2:
        div, rem = (_FLOOR_DIV.match(indices[0]) if isinstance(indices[0], Node) else None,
                    _REMAINDER.match(indices[1]) if isinstance(indices[1], Node) else None)
        if not (div and rem) or div.kwargs["slot"] is not rem.kwargs["slot"] or not (
                div.kwargs["block_size"] == rem.kwargs["block_size"] == cshape[1]):
            raise NotAStore("two index tensors that are not (slot // block_size, slot % block_size)")
        layout, slots = CacheLayout.PAGED, div.kwargs["slot"]
        expected, roles = (shape_of(slots)[0], *cshape[2:]), THD
        key = ("paged", slots)
    elif len(cshape) == 4 and len(indices) == 3 and indices[0] is None and indices[1] is None:
        layout, slots = CacheLayout.SEQUENCE, indices[2]
        if not isinstance(slots, Node) or len(shape_of(slots)) != 1:
            raise NotAStore("the sequence index is not a 1-D tensor")
        expected, roles = (cshape[0], cshape[1], shape_of(slots)[0], cshape[3]), BHSD
        key = ("sequence", slots)
    else:
        raise NotAStore(f"index form {_describe(indices)} on a {len(cshape)}-D cache is not a KV-cache layout")
    if shape_of(slots)[0] is None or slots.meta["val"].dtype not in (torch.int32, torch.int64):
        raise NotAStore("slot indices are not int32/int64")
    return Store(n, cache, cache_view, copy, layout, slots, value, value_roles(value, expected, roles), key,
                 origin, views, scatters, parents)


def match_copy_store(n: Node) -> Store:
    """Describe ``n`` (``aten.copy(cache, src)``) as a sequence store of W consecutive tokens, or raise
    ``NotAStore`` with the reason.

    ``src`` is ``k[:, :, a:a + W]`` (a static slice of the sequence dim, step 1) or ``k`` itself (``a = 0``), with
    the cache's ``[B, Hkv, W, D]`` shape and dtype: the copy overwrites every row of the cache, token ``a + j`` at
    position ``j``, and stores no other token (``Store.window``)."""
    if n.target is not aten.copy.default or len(n.args) < 2:
        raise NotAStore("not a copy")
    cache, src = n.args[0], n.args[1]
    if not all(isinstance(x, Node) and isinstance(x.meta.get("val"), torch.Tensor) for x in (cache, src)):
        raise NotAStore("the copy's tensors are not tensors of the graph")
    if chain := _slice_chain(cache):  # cache_k[:b, s:s + T] = k
        return _match_slice_store(n, chain, src)
    cshape = shape_of(cache)
    if len(cshape) != 4 or not all(isinstance(s, int) for s in cshape):
        raise NotAStore(f"the copy target {tuple(cshape)} is not a static [B, Hkv, W, D] cache")
    if tuple(shape_of(src)) != tuple(cshape) or src.meta["val"].dtype != cache.meta["val"].dtype:
        raise NotAStore(f"the copy broadcasts or casts {tuple(shape_of(src))} {src.meta['val'].dtype} to the "
                        f"cache's {tuple(cshape)} {cache.meta['val'].dtype}")
    value, first = src, 0
    if src.target is aten.slice.Tensor:
        if not _static_view(src):
            raise NotAStore("the copied slice has symbolic bounds")
        value = src.args[0]
        if cat_of_tokens(value):
            raise NotAStore(f"the copy keeps the last rows of a concatenation ({value.name}: rows already cached "
                            "and new tokens), which moves cached rows; the fused op stores new tokens only")
        dim, start, _, step = view_args(src)
        tokens = shape_of(value)[2] if len(shape_of(value)) == 4 else None
        if dim % 4 != 2 or step != 1 or not isinstance(tokens, int):
            raise NotAStore(f"the copied slice (dim {dim}, step {step}) of {tuple(shape_of(value))} is not a run of "
                            "tokens of a [B, Hkv, S, D] tensor with a static S")
        first = min(max(start + tokens if start < 0 else start, 0), tokens)  # as slice clamps its start
    if value.target is aten.index_put.default:
        raise NotAStore(f"the copied value is the result of another store ({value.name})")
    copy = None
    if cache.op == "placeholder":
        origin, copy = Origin.INPUT, _epilogue(n, cache, None)
    else:
        origin = Origin.GRAPH
        _check_not_a_view(cache)
    others = [u for u in cache.users if u not in (copy, n)]
    if others:
        raise NotAStore(f"the cache is also read before the store (by {others[0].name})")
    tokens = shape_of(value)[2]
    roles = value_roles(value, (cshape[0], cshape[1], tokens, cshape[3]), BHSD)
    return Store(n, cache, None, copy, CacheLayout.SEQUENCE, None, value, roles, ("window", first, tokens), origin,
                 window=(first, tokens))


def _match_slice_store(n: Node, views: tuple, value: Node) -> Store:
    """``n`` = ``copy(slice(inner, d, s, s + T), value)``: a sequence store of T tokens at positions s .. s+T-1 of
    ``inner``, a 4-D cache made of a graph input by static select/slice views (``cache_k[:bsz, s:s + T] = xk``).

    ``d = 1`` is a ``[B, S_max, Hkv, D]`` cache, the op's sequence layout seen through ``permute(0, 2, 1, 3)``;
    ``d = 2`` is ``[B, Hkv, S_max, D]``. ``s`` may be symbolic (a Python ``start_pos`` that changes between
    calls). The op writes the input's own memory through the views (``Origin.VIEW``), as for stacked buffers;
    the graph scatters the new slice back up to the input, and those scatters are replaced."""
    buf, seq = views[0].args[0], views[-1]
    if buf.op != "placeholder":
        raise NotAStore(f"a copy into a view of {buf.name}, which is not a graph input")
    if seq.target is not aten.slice.Tensor or not all(_static_view(v) for v in views[:-1]):
        raise NotAStore(f"a copy into a view of {buf.name} that is not static select/slice views and then one slice "
                        f"of the sequence dim (the last view is {seq.name}, {seq.target})")
    inner = seq.args[0]
    ishape, target = shape_of(inner), shape_of(seq)
    if len(ishape) != 4 or not all(isinstance(z, int) for z in ishape):
        raise NotAStore(f"a copy into a slice of {inner.name} {tuple(ishape)}, not a static 4-D cache")
    dim, start, _, step = view_args(seq)
    dim = dim % 4
    tokens = target[dim]
    if dim not in (1, 2) or step != 1:
        raise NotAStore(f"the copy writes a slice (dim {dim}, step {step}) of {inner.name} {tuple(ishape)} that is not "
                        "a run of positions of a [B, S_max, Hkv, D] or [B, Hkv, S_max, D] cache")
    start = 0 if start is None else start
    if isinstance(start, int) and isinstance(tokens, int):
        start = start + ishape[dim] if start < 0 else start
        if not 0 <= start <= ishape[dim] - tokens:
            raise NotAStore(f"the copy writes positions {start} .. {start + tokens - 1} of {ishape[dim]}")
    if value.meta["val"].dtype != seq.meta["val"].dtype:
        raise NotAStore(f"the copy casts {value.meta['val'].dtype} to the cache's {seq.meta['val'].dtype}")
    scatters, parents = _scatter_chain(n, views)
    others = [u for u in seq.users if u is not n]
    if others:
        raise NotAStore(f"the cache slice {seq.name} is also read before the store (by {others[0].name})")
    roles = (Role.BATCH, Role.SEQ, Role.HEAD, Role.FEATURE) if dim == 1 else BHSD
    view_ops = tuple((v.target, tuple(v.args[1:])) for v in views[:-1])
    if dim == 1:
        view_ops += ((aten.permute.default, ([0, 2, 1, 3],)),)
    key = ("slice", tuple((v.target, view_args(v)) for v in views))
    return Store(n, inner, None, None, CacheLayout.SEQUENCE, None, value, value_roles(value, tuple(target), roles),
                 key, Origin.VIEW, views, scatters, parents, start=start, view_ops=view_ops, seq_dim=dim)


def _check_not_a_view(cache: Node) -> None:
    """A tensor computed in the graph must not share a graph input's memory (the op would write the input)."""
    aliased = _aliased_input(cache)
    if aliased is None:
        return
    chain = _slice_chain(cache)
    if chain and chain[0].args[0] is aliased:
        raise NotAStore(f"the written tensor {cache.name} is a slice of the graph input {aliased.name} with symbolic "
                        "bounds; only a copy into such a slice (cache[:b, s:s + T] = k) is a sequence store")
    raise NotAStore(f"the written tensor {cache.name} ({cache.target}) is a view of the graph input "
                    f"{aliased.name} that is not a select/slice of it")


def _is_symint(a) -> bool:
    return isinstance(a, Node) and isinstance(a.meta.get("val"), torch.SymInt)


def _slice_chain(cache: Node) -> tuple:
    """The select/slice nodes from a tensor down to ``cache``, outermost first, with static or symbolic bounds."""
    views = []
    while (isinstance(cache, Node) and cache.op == "call_function" and cache.target in _VIEWS and not cache.kwargs
           and isinstance(cache.args[0], Node) and len(cache.args) > 1 and isinstance(cache.args[1], int)
           and all(isinstance(a, int) or a is None or _is_symint(a) for a in cache.args[2:])):
        views.insert(0, cache)
        cache = cache.args[0]
    return tuple(views)


def cat_of_tokens(n: Node) -> bool:
    """Whether ``n`` concatenates 4-D ``[B, Hkv, S, D]`` tensors along S (cached rows and new tokens)."""
    return (n.target is aten.cat.default and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4
            and (n.args[1] if len(n.args) > 1 else 0) % 4 == 2)


def _static_view(n) -> bool:
    return (isinstance(n, Node) and n.op == "call_function" and n.target in _VIEWS and isinstance(n.args[0], Node)
            and all(isinstance(a, int) or a is None for a in n.args[1:]) and not n.kwargs)


def _view_chain(cache: Node) -> tuple:
    """The select/slice nodes (static arguments) from a buffer down to ``cache``, outermost first."""
    views = []
    while _static_view(cache):
        views.insert(0, cache)
        cache = cache.args[0]
    return tuple(views)


def view_args(n: Node) -> tuple:
    """A select's (dim, index) or a slice's (dim, start, end, step), defaults filled in, of a view or a scatter."""
    args = n.args[1:] if n.target in _VIEWS else n.args[2:]
    if n.target in (aten.slice.Tensor, aten.slice_scatter.default):
        args = tuple(args) + (0, None, None, 1)[len(args):]
    return tuple(args)


def same_view(a, b) -> bool:
    """``a`` and ``b`` are the same node, or the same static views of the same node (made twice by the graph)."""
    if a is b:
        return True
    return (_static_view(a) and _static_view(b) and a.target is b.target and view_args(a) == view_args(b)
            and same_view(a.args[0], b.args[0]))


def _scatter_chain(n: Node, views: tuple) -> tuple[tuple, tuple]:
    """The scatters that put the store's new view back into the buffer, innermost first, and their targets.

    Functionalization writes ``buf[0, i][loc] = k`` as ``new = index_put(select(select(buf, 0, 0), 0, i), ...)``,
    ``select_scatter(select(buf, 0, 0), new, 0, i)``, ``select_scatter(buf, that, 0, 0)``: each scatter must
    write exactly the region its view read, into the same view of the same buffer, and be the only reader."""
    x, scatters, parents = n, [], []
    for view in reversed(views):
        scatter = _VIEWS[view.target]
        users = list(x.users)
        if len(users) != 1 or users[0].target is not scatter or users[0].args[1] is not x:
            raise NotAStore(f"the new value of {view.name}, a view of {views[0].args[0].name}, is not only scattered "
                            f"back into it ({', '.join(u.name for u in users) or 'no users'})")
        s = users[0]
        if view_args(s) != view_args(view) or not same_view(s.args[0], view.args[0]):
            raise NotAStore(f"{s.name} scatters the store into another region than {view.name} read")
        scatters.append(s)
        parents.append(s.args[0])
        x = s
    return tuple(scatters), tuple(parents)


def _aliased_input(n: Node) -> Node | None:
    """The graph input whose storage ``n``'s value shares, if any (a view the store would write through)."""
    storage = StorageWeakRef(n.meta["val"].untyped_storage())
    for ph in n.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor) and StorageWeakRef(val.untyped_storage()) == storage:
            return ph
    return None


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


def _describe(indices) -> str:
    return "[" + ", ".join("None" if i is None else getattr(i, "name", "?") for i in indices) + "]"


# ---- view chains ---------------------------------------------------------------------------


def _unit_select(node: Node) -> bool:
    """``select(x, d, 0)`` of a size-1 dim ``d`` (``k[0]`` of a batch of one): the values of ``x`` without the dim."""
    if node.op != "call_function" or node.target is not aten.select.int or len(node.args) < 3:
        return False
    src = node.args[0]
    if not isinstance(src, Node) or "val" not in src.meta:
        return False
    shape = shape_of(src)
    d = node.args[1]
    return isinstance(d, int) and -len(shape) <= d < len(shape) and is_one(shape[d]) and node.args[2] in (0, -1)


def walk_views(node: Node, roles: Roles) -> tuple[Node, Roles, list[Node]]:
    """Follow ``node`` back through pure views; return the first non-view node, its dims' roles, the chain.

    Reshapes are followed only when they add or drop size-1 dims (a reshape that regroups features
    belongs to the RoPE itself).
    """
    chain = []
    while node.op == "call_function" and (node.target in _WALKED or _unit_select(node)):
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
        elif t is aten.select.int:  # of a size-1 dim (``_unit_select``): drops it, as squeeze does
            d = node.args[1] % len(shape_of(src))
            roles = roles[:d] + (None,) + roles[d:]
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
                if src.target in RESHAPES and same_shape(shape_of(src.args[0]), shape_of(node)):
                    chain += [node, src]
                    node = src.args[0]
                    continue
                break
            new = [None] * len(shape_of(src))
            for i, j in zip(a, b):
                new[i] = roles[j]
            roles = tuple(new)
        # an alias or a clone: the same values, the same roles
        chain.append(node)
        node = src
    return node, roles, chain
