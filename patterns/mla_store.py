"""MLA latent-pool stores (DeepSeek multi-head latent attention, as SGLang writes it): finding them, and the forms
the pass reports but does not match yet.

One row per token, ``[kv_c | rope(k_pe)]`` (L + R features), goes into a pool of one "head"::

    k_rot = rope(k_pe, cos, sin)                          # k_pe [T, 1, R] or [T, R]; any RoPE spelling (rope.py)
    row   = aten.cat([views(kv_c), views(k_rot)], -1)     # [T, L + R] or [T, 1, L + R]
    new   = aten.index_put(kv_pool, [loc], views(quant(row)))   # kv_pool [S, 1, L + R]; quant: patterns/quant.py
    aten.copy_(kv_pool, new)

``match_mla_store`` turns such a store into an ``MlaStore`` (planned and rewritten in ``mla_rewrite.py``). Forms
that hold an MLA row but are assembled otherwise are reported with a reason (``not_matched_reason``):

    halves   kv_pool[loc, :, :L] = kv_c; kv_pool[loc, :, L:] = k_rot   (slice -> index_put -> slice_scatter, twice;
             ``mla_halves.merge_row_halves`` makes the one-store form of it before matching, where it is one)
    latent   latent[:, :, :L] = kv_c; latent[:, :, L:] = k_rot; kv_pool[loc] = latent   (copy + slice_scatter;
             ``slice_writes.assemble_as_cat`` makes it the cat form before matching where the writes cover the row,
             so only a buffer written in part is reported)
    two caches  transformers DeepseekV3: the latent and k_rot in two caches of one head, each by
                ``index_put(cache, [None, None, cache_position], x)`` (``match_two_caches``: fused with the op's
                ``k_pe_cache``; other layouts, fp8 or views of a buffer are reported, ``two_caches_reason``)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from fx_fusion.kernels.problem import CacheLayout
from fx_fusion.patterns.evaluator import products_below
from fx_fusion.patterns.fx_utils import RESHAPES, is_one, shape_of, within
from fx_fusion.patterns.kv_store import walk_views
from fx_fusion.patterns.quant import Quant
from fx_fusion.patterns.rope import RopeMatch
from fx_fusion.patterns.store import Origin, Store

aten = torch.ops.aten

# the ops an in-place latent buffer (SGLang's forward_normal_prepare) turns into, followed down from the store
_BUFFER_OPS = frozenset({aten.slice_scatter.default, aten.copy.default, aten.slice.Tensor, aten.squeeze.dim,
                         aten.squeeze.dims, aten.unsqueeze.default}) | RESHAPES


class NotMla(Exception):
    """An MLA row store the pass cannot take (the message is the reason, reported with the site)."""


@dataclass
class MlaStore:
    """A latent-pool store of ``cat([kv_c, rope(k_pe)], -1)``: the MLA sibling of ``find.KStore``."""

    store: Store  # the index_put; ``value`` is the row below any fp8 quantisation
    quant: Quant | None
    row: Node  # the cat
    chain: list  # the views (and quantisation) from the cat to the store
    kv_c: Node  # the cat's first part as the graph has it ([T, L] or [T, 1, L])
    k_root: Node  # the RoPE output (rotated k_pe)
    k_chain: list  # the views from k_root to the cat's second part
    rope: RopeMatch
    # two caches (transformers DeepseekV3): ``store`` writes kv_c (``kv_c`` is its value, ``row`` None) and
    # ``k_store`` the rotated k_pe into a cache of its own; ``roles`` label k_root's dims (from the k store)
    k_store: Store | None = None
    roles: tuple | None = None

    @property
    def rotary_dim(self) -> int:
        return self.rope.rotary_dim

    @property
    def latent_dim(self) -> int:
        return shape_of(self.kv_c)[-1]


def is_mla_pool(st: Store) -> bool:
    """A cache of one row per slot (one "head"), as an MLA latent pool is: token or paged layout."""
    return st.layout in (CacheLayout.TOKEN, CacheLayout.PAGED) and is_one(shape_of(st.cache)[-2])


def row_cat(root: Node) -> bool:
    """Whether ``root`` concatenates along its last dim (an MLA row ``[kv_c | k_rot]``)."""
    if root.op != "call_function" or root.target is not aten.cat.default or "val" not in root.meta:
        return False
    dim = root.args[1] if len(root.args) > 1 else root.kwargs.get("dim", 0)
    return dim % root.meta["val"].dim() == root.meta["val"].dim() - 1


def match_mla_store(st: Store, quant: Quant | None, ropes) -> MlaStore | None:
    """The store ``st`` (already seen below its fp8 quantisation) as an MLA row store; None when its value is not a
    last-dim cat ending in a RoPE output (``ropes``: the graph's ``find.RopeFinder``). ``NotMla`` with the reason for
    a row store the fused op cannot take, or whose last part looks like a RoPE but is not one the op computes."""
    if not is_mla_pool(st) or st.flat_value:
        return None
    root, _, chain = walk_views(st.value, st.value_roles)
    if not row_cat(root):
        return None
    parts = list(root.args[0])
    if not parts or not isinstance(parts[-1], Node):
        return None
    k_root, _, k_chain = walk_views(parts[-1], (None,) * len(shape_of(parts[-1])))
    rope = ropes.match(k_root)
    if rope is None:
        why = ropes.near_miss(k_root)
        if why is None and products_below(k_root, ropes.max_depth):  # e.g. products rounded before the sum
            why = ropes.why_not(k_root)
        if why is None:
            return None
        # a one-head k/v cache row built by a cat reaches here too (MQA, a rotate spelled with a cat): not
        # called MLA, since it need not be
        raise NotMla(f"the row {root.name} (a last-dim cat stored into a one-row-per-slot cache, as an MLA latent row "
                     f"[kv_c | rope(k_pe)] is) ends in a RoPE-like value that is not a RoPE the fused op computes "
                     f"({k_root.name}: {why})")
    if len(parts) != 2 or not isinstance(parts[0], Node):
        raise NotMla(f"the MLA row {root.name} concatenates {len(parts)} parts; the fused op writes [kv_c | k_pe]")
    if st.origin is Origin.VIEW:
        raise NotMla(f"the MLA pool {st.base.name} is written through a view of it: not matched yet")
    return MlaStore(st, quant, root, chain, parts[0], k_root, k_chain, rope)


def halves_reason(st: Store) -> str | None:
    """The reason for a store into a feature slice of a one-row-per-slot pool (SGLang's set_mla_kv_buffer writes the
    latent and the rotated k_pe into the two halves of each row), else None."""
    if st.origin is not Origin.VIEW or not st.views:
        return None
    last = st.views[-1]
    base = last.args[0]
    rank = len(shape_of(base))
    if last.target is not aten.slice.Tensor or rank < 2 or (last.args[1] if len(last.args) > 1 else 0) % rank != (
            rank - 1) or not is_one(shape_of(base)[-2]):
        return None
    pool = st.base
    while pool.op == "call_function" and pool.target is aten.slice_scatter.default:  # the other half's result
        pool = pool.args[0]
    return (f"MLA latent store written in two halves ({st.node.name} writes features {_bounds(last)} of each row of "
            f"{pool.name}) that are not one store of the row: fused when both halves index the same rows, together "
            f"cover the row, are quantised alike and nothing else reads the pool between them")


def _bounds(view: Node) -> str:
    start = view.args[2] if len(view.args) > 2 else 0
    end = view.args[3] if len(view.args) > 3 else None
    end = "" if end is None or (isinstance(end, int) and end >= 2 ** 62) else end
    return f"{start}:{end}"


def latent_buffer_reason(root: Node, match_rope, depth: int = 16) -> str | None:
    """The reason for a store of a latent buffer written in place (``latent[:, :, L:] = k_rot``; functionalized into
    ``copy(slice(buf), k_rot)`` + ``slice_scatter``, with squeeze/unsqueeze round trips) when a RoPE output is
    copied into it; else None."""
    if root.op != "call_function" or root.target not in _BUFFER_OPS:
        return None
    nodes = [root, *within([root], depth, lambda n: [a for a in n.all_input_nodes if a.target in _BUFFER_OPS])]
    for n in nodes:
        if n.target is aten.copy.default and len(n.args) > 1 and isinstance(n.args[1], Node):
            src, _, _ = walk_views(n.args[1], (None,) * len(shape_of(n.args[1])))
            if match_rope(src) is not None:
                return (f"MLA latent row assembled in place in a buffer ({src.name}, a RoPE output, is copied into a "
                        f"slice of it by {n.name}), then stored: fused only where the writes cover the whole row, "
                        f"with static bounds, into a buffer of the graph's own that nothing reads between them")
    return None


def _latent_partner(st: Store, candidates: list) -> list:
    """The stores with ``st``'s indices and layout into another one-head cache of another width and the same
    slots (the latent next to the rotated k_pe)."""
    if st.layout is CacheLayout.SEQUENCE:
        heads, width = shape_of(st.cache)[1], shape_of(st.cache)[-1]
    else:
        heads, width = shape_of(st.cache)[-2], shape_of(st.cache)[-1]
    if not is_one(heads):
        return []
    found = []
    for v in candidates:
        if v.indices != st.indices or v.layout is not st.layout or v.cache is st.cache:
            continue
        vshape = shape_of(v.cache)
        v_heads = vshape[1] if v.layout is CacheLayout.SEQUENCE else vshape[-2]
        if is_one(v_heads) and vshape[-1] != width and tuple(vshape[:-1]) == tuple(shape_of(st.cache)[:-1]):
            found.append(v)
    return found


def match_two_caches(st: Store, root: Node, roles: tuple, chain: list, rope: RopeMatch, candidates: list,
                     order: dict, quants: dict) -> MlaStore | None:
    """A store of a RoPE output (``root``, seen through ``chain`` with dims ``roles``) into a one-head sequence
    cache, next to a store of the latent with the same cache positions into another one-head cache: one MLA site
    with two caches (the nearest such latent store); None when there is none or the form is one the op does not
    take yet (the caller reports it through ``two_caches_reason``)."""
    if st.layout is not CacheLayout.SEQUENCE or st.flat_value:
        return None
    partners = [v for v in _latent_partner(st, candidates)
                if not v.flat_value and v.node not in quants and v.cache_view is None and v.origin is not Origin.VIEW]
    if not partners or st.node in quants or st.cache_view is not None or st.origin is Origin.VIEW:
        return None
    latent = min(partners, key=lambda v: abs(order[v.node] - order[st.node]))
    return MlaStore(latent, None, None, [], latent.value, root, chain, rope, k_store=st, roles=roles)


def two_caches_reason(st: Store, candidates: list) -> str | None:
    """The reason for a RoPE output stored into a one-head cache next to a store with the same indices into another
    one-head cache of another width (transformers DeepseekV3 caches the latent and the rotated k_pe apart), else
    None."""
    partners = _latent_partner(st, candidates)
    if not partners:
        return None
    return (f"MLA latent (in {partners[0].cache.name}) and rotated k_pe (in {st.cache.name}) stored in two caches of "
            "one head each (transformers DeepseekV3's cache.update(latent, k_rot)): not matched yet")
    for v in candidates:
        if v.indices != st.indices or v.layout is not st.layout or v.cache is st.cache:
            continue
        vshape = shape_of(v.cache)
        v_heads = vshape[1] if v.layout is CacheLayout.SEQUENCE else vshape[-2]
        if is_one(v_heads) and vshape[-1] != width and tuple(vshape[:-1]) == tuple(shape_of(st.cache)[:-1]):
            return (f"MLA latent (in {v.cache.name}) and rotated k_pe (in {st.cache.name}) stored in two caches of "
                    "one head each (transformers DeepseekV3's cache.update(latent, k_rot)): not matched yet")
    return None
