"""Engines' own cache-store ops matched as KV-cache stores (``match_engine_store``), and the index rule the fused
op's slots must reproduce (``EngineSlots``):

    auto_functionalized_v2(sglang.store_cache, k=k.view(-1, H*D), v=..., indices=loc, row_bytes=..., size_limit=...,
                           reserved_skip_index=0, _all_bases=[k_buffer, v_buffer], ...)
                                                                    # k_buffer [slots, Hkv, D] seen [slots, H*D]

whose index rule (an index outside ``[0, size_limit)`` fails, ``reserved_skip_index`` is not written) the
replacement reproduces on the slots it gives the fused op (``EngineSlots``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from fx_fusion.kernels.problem import CacheLayout
from fx_fusion.patterns.fx_utils import RESHAPES, broadcast_equal, shape_of
from fx_fusion.patterns.store import THD, NotAStore, Origin, Store, value_roles

aten = torch.ops.aten


ENGINE_STORES = ("sglang::store_cache",)
"""Engines' own cache-store ops matched as stores: ``(k, v, k_cache, v_cache, indices, ...)``, mutating the caches."""

_STORE_CACHE_ARGS = ("k", "v", "k_cache", "v_cache", "indices")
_STORE_CACHE_KEYWORDS = ("row_bytes", "v_row_bytes", "num_split", "size_limit", "reserved_skip_index")
"""``store_cache``'s keywords in sglang 0.5.23 (``sglang/kernels/ops/kvcache/kvcache.py``); earlier versions have
some of them (``row_bytes`` alone; then with ``num_split`` and ``size_limit``), and an absent one means what the
version without it did: no bound check, no skipped index, one row width for k and v."""


@dataclass(frozen=True)
class EngineSlots:
    """What an engine's store op does with its indices, which the fused op's slots must reproduce.

    SGLang's ``store_cache``: an index outside ``[0, limit)`` fails (a device-side assert in its kernel; ``None``:
    the version checks nothing), and one equal to ``skip`` is not written (``None``: every index is). ``rows``:
    the pools' row count; the fused op writes nothing for a slot at or past it."""

    rows: int
    limit: int | None
    skip: int | None

    @property
    def message(self) -> str:
        return f"store_cache: an index is outside [0, {self.limit}) (size_limit)"

    def slots(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(slots, inside)``: the slots the fused op gets, ``rows`` (not written) for an index the op does not
        write (the skipped one, and one outside the bound, so that nothing is written there even where the assert
        is asynchronous); and whether every index lies in the bound (``None``: no bound), which the caller
        asserts (``torch._assert_async(inside, self.message)``) as eager's op does."""
        drop = inside = None
        if self.limit is not None:
            each = (indices >= 0) & (indices < self.limit)
            drop, inside = ~each, each.all()
        if self.skip is not None:
            skipped = indices == self.skip
            drop = skipped if drop is None else drop | skipped
        return (indices if drop is None else torch.where(drop, self.rows, indices)), inside


def engine_store_op(n: Node):
    """The engine store op ``n`` (an ``auto_functionalized_v2`` node) calls, or None."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    if n.op != "call_function" or n.target is not auto_functionalized_v2 or not n.args:
        return None
    op = n.args[0]
    return op if getattr(getattr(op, "_schema", None), "name", None) in ENGINE_STORES else None


def match_engine_store(n: Node) -> tuple[Store, Store]:
    """The k and v stores of an engine's store op, or ``NotAStore`` with the reason.

    SGLang (``MHATokenToKVPool.set_kv_buffer`` on CUDA and HIP) calls ``store_cache(k.view(-1, row),
    v.view(-1, row), k_buffer.view(-1, row), v_buffer.view(-1, row), loc, row_bytes=..., size_limit=...)``: row
    ``loc[t]`` of each pool gets token t's k (v) row, but for ``loc[t] == reserved_skip_index`` (0, the CUDA-graph
    padding slot, by default), and every index must lie in ``[0, size_limit)``. Functionalized (v2), the pools
    are ``_all_bases`` and the op writes them through a ``[slots, row]`` view; each pool's new value is an output
    of the node. The index rule becomes the stores' ``engine_slots`` (``_store_cache_rule``)."""
    kw = n.kwargs
    schema = n.args[0]._schema
    names = [a.name for a in schema.arguments]
    if tuple(names[:5]) != _STORE_CACHE_ARGS or not set(names[5:]) <= set(_STORE_CACHE_KEYWORDS):
        raise NotAStore(f"{schema.name}({', '.join(names)}) is not a store_cache schema this pass knows (arguments "
                        f"{', '.join(_STORE_CACHE_ARGS)}, then keywords among {', '.join(_STORE_CACHE_KEYWORDS)})")
    bases = kw.get("_all_bases")
    if not isinstance(bases, (list, tuple)):
        raise NotAStore("the store op's caches are not recorded as bases (auto_functionalized_v2)")
    rows = [u for u in n.users if u.target is operator.getitem]
    first = max(1, len(n.args[0]._schema.returns))  # the op's outputs (None for ``-> ()``) come first
    stores = []
    for name, value_name in (("k_cache", "k"), ("v_cache", "v")):
        index = kw.get(f"_{name}_base_index")
        if not isinstance(index, int):
            raise NotAStore(f"the store op's {name} is not a view of one base")
        base, value, slots = bases[index], kw.get(value_name), kw.get("indices")
        if not isinstance(base, Node) or not isinstance(value, Node) or not isinstance(slots, Node):
            raise NotAStore(f"the store op's {name}, {value_name} or indices is not a tensor of the graph")
        cshape, cval = shape_of(base), base.meta["val"]
        if len(cshape) != 3 or not all(isinstance(s, int) for s in cshape):
            raise NotAStore(f"{name} {tuple(cshape)} is not a static [slots, Hkv, D] pool")
        row = cshape[1] * cshape[2]
        view = (kw.get(f"_{name}_size"), kw.get(f"_{name}_stride"), kw.get(f"_{name}_storage_offset"))
        if (tuple(view[0] or ()), tuple(view[1] or ()), view[2]) != ((cshape[0], row), (row, 1), 0) or (
                tuple(cval.stride()) != (row, cshape[2], 1)):
            raise NotAStore(f"the store op writes {name} through a view {view} that is not its rows [slots, Hkv*D]")
        if len(shape_of(slots)) != 1 or slots.meta["val"].dtype not in (torch.int32, torch.int64):
            raise NotAStore("the store op's indices are not a 1-D int32/int64 tensor")
        copies = [u for u in base.users if u.target is aten.copy_.default and u.args[0] is base]
        result = [u for u in rows if u.args[1] == first + index]
        if len(result) != 1 or len(copies) != 1 or copies[0].args[1] is not result[0]:
            raise NotAStore(f"the store op's new {name} is not copied back into the graph input")
        others = [u for u in base.users if u not in (copies[0], n)]
        if others:
            raise NotAStore(f"the cache is also read before the store (by {others[0].name})")
        tokens = shape_of(slots)[0]
        flat = True
        if value.target in RESHAPES and len(shape_of(value.args[0])) == 3 and (
                tuple(shape_of(value.args[0])[1:]) == tuple(cshape[1:])):
            value, flat = value.args[0], False  # [T, Hkv, D] viewed as rows
        elif len(shape_of(value)) != 2 or shape_of(value)[1] != row:
            raise NotAStore(f"the store op's {value_name} {tuple(shape_of(value))} is not [tokens, {row}]")
        if flat and not broadcast_equal(shape_of(value)[0], tokens):
            raise NotAStore(f"the store op's {value_name} {tuple(shape_of(value))} has not one row per index")
        roles = value_roles(value, (tokens, *cshape[1:]), THD) if not flat else THD
        stores.append(Store(n, base, None, copies[0], CacheLayout.TOKEN, slots, value, roles, ("engine", n),
                            Origin.INPUT, result_node=result[0], flat_value=flat))
    rule = _store_cache_rule(kw, names[5:], stores[0].cache, stores[1].cache)
    for st in stores:
        st.engine_slots = rule
    return stores[0], stores[1]


def _store_cache_rule(kw: dict, keywords: list, k_pool: Node, v_pool: Node) -> EngineSlots | None:
    """``store_cache``'s keywords, read as SGLang's op reads them (sglang 0.5.23), as the stores' index rule; or
    ``NotAStore`` for a call the fused op cannot reproduce, or that SGLang's op rejects.

        row_bytes, v_row_bytes  k's and v's row width in bytes (0: inferred); the kernel rejects any other width
        num_split               warps per row (<= 0: chosen by the op): stores the same bytes; the kernel takes 1,
                                and 2 or 4 for rows of a multiple of 256 or 512 bytes
        size_limit              every index must lie in [0, size_limit) (<= 0: the k pool's rows), else the
                                kernel's device-side assert fails
        reserved_skip_index     an index equal to it is not written (< 0: none); 0 by default
    """
    values = {}
    for name in keywords:
        value = kw.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise NotAStore(f"store_cache's {name} is {value!r}, not a constant int")
        values[name] = value
    (rows, *k_row), (v_rows, *v_row) = shape_of(k_pool), shape_of(v_pool)
    size = k_pool.meta["val"].element_size()
    k_bytes, v_bytes = k_row[0] * k_row[1] * size, v_row[0] * v_row[1] * size
    if k_row != v_row:
        raise NotAStore(f"store_cache writes {k_bytes}-byte k rows ({k_row[0]} heads x {k_row[1]}) and "
                        f"{v_bytes}-byte v rows ({v_row[0]} x {v_row[1]}, v_row_bytes): the fused op stores k and v "
                        "with one head count and head_dim")
    if v_rows != rows:
        raise NotAStore(f"store_cache's k pool has {rows} rows and its v pool {v_rows}: the fused op stores into "
                        "two pools of one shape")
    for name in ("row_bytes", "v_row_bytes"):
        if values.get(name, 0) != 0 and values[name] != k_bytes:  # SGLang infers the width from 0 only
            raise NotAStore(f"store_cache's {name}={values[name]} is not the width of the {k_bytes}-byte rows it "
                            "stores, a call SGLang's kernel rejects")
    split = values.get("num_split", 0)
    if split > 0 and not (split == 1 or (split in (2, 4) and k_bytes % (128 * split) == 0)):
        raise NotAStore(f"store_cache's num_split={split} is not 1, or 2 or 4 for rows of a multiple of 256 or 512 "
                        f"bytes ({k_bytes} here), a call SGLang's kernel rejects")
    limit = None
    if "size_limit" in values:
        limit = values["size_limit"] if values["size_limit"] > 0 else rows
        if limit > rows:
            raise NotAStore(f"store_cache's size_limit={limit} is above the pools' {rows} rows: eager's bound "
                            "admits indices past the pools (which SGLang's kernel would write out of bounds)")
    skip = values.get("reserved_skip_index", -1)
    skip = skip if skip >= 0 else None
    return None if limit is None and skip is None else EngineSlots(rows, limit, skip)
