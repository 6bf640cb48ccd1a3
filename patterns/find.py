"""Finding candidate sites: every KV-cache store in a graph, sorted into k stores of a RoPE output (the sites the
pass plans), v candidates (every other store: the v half of a site), and report entries for stores that look
like a RoPE's but cannot be taken (``Site`` with the reason).

Store forms are recognised in ``kv_store.py`` / ``engine_store.py``, fp8 quantisation in ``quant.py``, RoPE in
``rope.py``; this module runs them over the graph and keeps what the sites of one graph share (``GraphState``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2
from torch.fx import Graph, Node

from fx_fusion.patterns.fx_utils import OpRole, in_topological_order, ops_with, shape_of
from fx_fusion.patterns.engine_store import engine_store_op, match_engine_store
from fx_fusion.patterns.kv_store import cat_of_tokens, match_copy_store, match_store, walk_views
from fx_fusion.patterns.mla_store import (MlaStore, NotMla, halves_reason, latent_buffer_reason, match_mla_store,
                                          match_two_caches, two_caches_reason)
from fx_fusion.patterns.qk_norm import NormMatch, NotNorm, below_views, match_qk_norm, normalised_input
from fx_fusion.patterns.quant import NotQuant, Quant, peel_quant
from fx_fusion.patterns.rope import Evaluator, NotRope, RopeMatch, match_rope, rope_like
from fx_fusion.patterns.site import Site, internal_error, source_line
from fx_fusion.patterns.store import NotAStore, Store

aten = torch.ops.aten
# ops a RoPE ends in: a stored value computed by one of these may be a RoPE
_ARITHMETIC = ops_with(OpRole.ARITHMETIC, OpRole.CAST)
# ops between a RoPE output and an fp8 store: arithmetic, the scale's division, the clamp
_QUANTISING = ops_with(OpRole.ARITHMETIC, OpRole.CAST, OpRole.DIVIDE, OpRole.CLAMP)
_VIEWS_AND_CASTS = ops_with(OpRole.RESHAPE, OpRole.UNIT_DIM, OpRole.PERMUTE, OpRole.BROADCAST, OpRole.ALIAS,
                            OpRole.CLONE, OpRole.CAST)


@dataclass
class KStore:
    """A store whose value is a RoPE output: the k half of a candidate site."""

    store: Store
    root: Node  # the RoPE output (the stored value seen through its views)
    roles: tuple  # roles of root's dims, as far as the store shows them
    chain: list  # the view nodes between root and the store
    rope: RopeMatch
    # a QK-norm of the RoPE output (HunYuan, Llama 4: the RoPE, then the norm); root is then the norm's result and
    # ``post_norm.x`` the RoPE output
    post_norm: NormMatch | None = None

    @property
    def rope_out(self) -> Node:
        """The RoPE's output: root, or the tensor the norm after the RoPE normalises."""
        return self.post_norm.x if self.post_norm is not None else self.root


@dataclass
class GraphState:
    """What the sites of one graph share while the pass runs."""

    order: dict  # node -> position in the graph before the pass
    ropes: RopeFinder
    v_candidates: list  # stores that do not store a RoPE output
    k_roots: set  # every k RoPE output (never a q)
    used: set = field(default_factory=set)  # q RoPE outputs and v stores taken by fused sites
    quants: dict = field(default_factory=dict)  # store node -> Quant of its fp8 store (see patterns/quant.py)
    quant_errors: dict = field(default_factory=dict)  # store node -> why its fp8 store cannot be reproduced
    # (cos leaf, rank, head_dim, dtype) -> the RoPE outputs reading that leaf (one walk per leaf: layers may share it)
    ropes_of_leaf: dict = field(default_factory=dict)
    mla: list[MlaStore] = field(default_factory=list)  # MLA latent-pool row stores (patterns/mla_store.py)
    # the graph is in topological order (checked once; each rewrite keeps it so: splice.keep_in_order)
    in_order: bool = False


def find_sites(graph: Graph) -> tuple[list[KStore], GraphState, list[Site]]:
    """The k stores of RoPE outputs, the state their planning shares, and the report entries of stores that
    cannot be taken. A matcher's own exception is reported as an internal error, never raised."""
    ropes = RopeFinder()
    sites: list[Site] = []
    stores = _stores(graph, ropes, sites)
    ks, state = [], GraphState({n: i for i, n in enumerate(graph.nodes)}, ropes, [], set())
    state.in_order = in_topological_order(graph)
    for st in stores:
        try:
            k = _classify(st, state, sites)
        except Exception as err:  # noqa: BLE001 (a bug in the matcher must not fail the compile)
            sites.append(internal_error(st.node, err))
            continue
        if k is not None:
            ks.append(k)
    for k in list(ks):  # transformers DeepseekV3: the rotated k_pe and the latent in two caches, one MLA site
        if k.post_norm is not None:
            continue
        try:
            two = match_two_caches(k.store, k.root, k.roles, k.chain, k.rope, state.v_candidates, state.order,
                                   state.quants)
        except Exception as err:  # noqa: BLE001
            sites.append(internal_error(k.store.node, err))
            ks.remove(k)
            continue
        if two is not None:
            ks.remove(k)
            state.mla.append(two)
            state.v_candidates.remove(two.store)
    state.k_roots = {k.root for k in ks} | {k.rope_out for k in ks} | {m.k_root for m in state.mla}
    by_name = {st.node.name: st for st in stores}
    for site in sites:  # an MLA latent and rotated k_pe in two caches: say so first
        st = by_name.get(site.store)
        if st is not None and not site.fused and (why := two_caches_reason(st, state.v_candidates)) is not None:
            site.reason = f"{why} ({site.reason})" if site.reason else why
    return ks, state, sites


def _stores(graph: Graph, ropes: RopeFinder, sites: list[Site]) -> list[Store]:
    """Every store the pass can take over; a store it cannot take is a report entry if it stores a RoPE output."""
    stores: list[Store] = []

    def find(n: Node, match: Callable, stores_rope: Callable) -> None:
        try:
            stores.extend(match(n))
        except NotAStore as e:
            try:
                if stores_rope(n):
                    sites.append(Site(store=n.name, source=source_line(n), reason=f"store not supported: {e}"))
            except Exception as err:  # noqa: BLE001
                sites.append(internal_error(n, err))
        except Exception as err:  # noqa: BLE001
            sites.append(internal_error(n, err))

    for n in list(graph.find_nodes(op="call_function", target=aten.index_put.default)):
        find(n, lambda n: [match_store(n)], lambda n: _puts_rope(n, ropes))
    for n in list(graph.find_nodes(op="call_function", target=aten.copy.default)):
        # a candidate site only if it copies a RoPE output (or part of one) into a cache
        find(n, lambda n: [match_copy_store(n)], lambda n: _copies_rope(n, ropes))
    for n in list(graph.find_nodes(op="call_function", target=auto_functionalized_v2)):
        if engine_store_op(n) is not None:
            find(n, match_engine_store, lambda n: True)
    return stores


def _puts_rope(n: Node, ropes: RopeFinder) -> bool:
    """Whether the ``index_put`` ``n`` (not a cache store we can take over) stores a RoPE output or a near miss."""
    value = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], Node) else None
    if value is None or "val" not in value.meta:
        return False
    root, _, _ = walk_views(value, (None,) * value.meta["val"].dim())
    return ropes.match(root) is not None or ropes.near_miss(root) is not None


def _classify(st: Store, state: GraphState, sites: list[Site]) -> KStore | None:
    """A k store (returned), or a v candidate (recorded in ``state``, with a report entry if it looks like a
    RoPE's store)."""
    ropes = state.ropes
    if st.flat_value:  # an engine's [T, Hkv*D] rows: a v, or a k rotated elsewhere
        state.v_candidates.append(st)
        if ropes.match(st.value) is not None or ropes.near_miss(st.value) is not None:
            sites.append(Site(store=st.node.name, source=source_line(st.node), reason=(
                f"store not supported: the stored k {st.value.name} is [tokens, Hkv*D] rows with no "
                "[tokens, Hkv, D] view to read the RoPE's heads from")))
        return None
    try:
        st, quant = _peel_quant(st)
    except NotQuant as e:  # an fp8 store the op cannot reproduce: a site if it stores a RoPE output
        state.quant_errors[st.node] = str(e)
        state.v_candidates.append(st)
        if _stores_rope_below(e.inner, ropes):
            sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value,
                              reason=f"quantised store not supported: {e}"))
        return None
    if quant is not None:
        state.quants[st.node] = quant
    root, roles, chain = walk_views(st.value, st.value_roles)
    rope = ropes.match(root)
    if rope is not None:
        if (why := halves_reason(st)) is not None:  # an MLA row written in two halves
            sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value, reason=why))
            return None
        return KStore(st, root, roles, chain, rope)
    x = normalised_input(root)
    if x is not None and any(ropes.match(n) is not None or ropes.near_miss(n) is not None for n in (x, below_views(x))):
        # a QK-norm of a RoPE output (HunYuan, Llama 4): fused with the norm after the RoPE, or reported
        return _post_norm_store(st, root, roles, chain, x, ropes, sites)
    try:
        mla = match_mla_store(st, quant, ropes)
    except NotMla as e:
        sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value, reason=str(e)))
        return None
    if mla is not None:  # planned by patterns/mla_rewrite.py
        state.mla.append(mla)
        return None
    state.v_candidates.append(st)  # a v store, or a store of something that is not rotated
    if (why := latent_buffer_reason(root, ropes.match)) is not None:
        sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value, reason=why))
        return None
    # one report entry per store that looks like a RoPE's (a v store, a raw view, gets none)
    if (_below_views_and_casts(root).target in _ARITHMETIC
            and not all(isinstance(s, int) for s in shape_of(root)[-1:])):
        # RoPE is recognised by evaluating features one by one: a symbolic width cannot be checked
        # (a computed value is reported; a view of a projection, as v is, is not a candidate)
        sites.append(Site(store=st.node.name, source=source_line(st.node), reason=(
            f"the stored value {root.name} has a symbolic last dim {tuple(shape_of(root))}, so a RoPE "
            "in it cannot be recognised (dynamic=True with q/k as graph inputs? mark only the token "
            "dim dynamic)")))
    elif (why := ropes.near_miss(root)) is not None:
        sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value,
                          reason=f"stores a RoPE-like value that is not a RoPE the fused op computes: {why}"))
    return None


def _post_norm_store(st: Store, root: Node, roles: tuple, chain: list, x: Node, ropes: RopeFinder,
                     sites: list[Site]) -> KStore | None:
    """The k store of a norm of the RoPE output ``x`` or a view of it (``root`` the norm's result), or None with a
    report entry where the op cannot compute it."""
    rope, rotated = ropes.match(x), below_views(x)
    try:
        if rope is None and ropes.match(rotated) is not None:
            raise NotNorm(f"the norm is of {x.name}, a view of the RoPE output {rotated.name}; the op fuses a norm of "
                          "the RoPE output itself")
        if rope is None:
            raise NotNorm(f"the normalised tensor {rotated.name} is RoPE-like but not a RoPE the fused op computes: "
                          f"{ropes.near_miss(x) or ropes.near_miss(rotated)}")
        m = match_qk_norm(root)
        if m.x is not x or m.heads != 1 or m.views:
            raise NotNorm(f"{root.name} is not one norm per head of the RoPE output {x.name}")
    except NotNorm as e:
        sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value,
                          reason=f"stores a QK-norm of a RoPE output that the fused op cannot compute: {e}"))
        return None
    return KStore(st, root, roles, chain, rope, post_norm=m)


def _stores_rope_below(node: Node, ropes: RopeFinder, depth: int = 8) -> bool:
    """Whether a RoPE output (or a near miss) lies below ``node`` through views and elementwise scaling."""
    for _ in range(depth):
        inner, _, _ = walk_views(node, (None,) * node.meta["val"].dim())
        if ropes.match(inner) is not None or ropes.near_miss(inner) is not None:
            return True
        tensors = ([a for a in inner.args if isinstance(a, Node) and "val" in a.meta]
                   if inner.op == "call_function" else [])
        if not tensors or inner.target not in _QUANTISING:
            return False
        node = max(tensors, key=lambda a: a.meta["val"].dim())  # the tensor, not a scale
    return False


def _copies_rope(n: Node, ropes: RopeFinder) -> bool:
    """Whether the copy ``n`` writes a 4-D tensor from (a slice or a concatenation with) a RoPE output, as HF's
    sliding-window layer does when a multi-token step fills or passes a window that already holds tokens."""
    src = n.args[1] if len(n.args) > 1 else None
    if not isinstance(src, Node) or not isinstance(src.meta.get("val"), torch.Tensor) or src.meta["val"].dim() != 4:
        return False
    if src.target is aten.slice.Tensor:
        src = src.args[0]
    parts = src.args[0] if cat_of_tokens(src) else [src]
    return any(isinstance(p, Node) and "val" in p.meta and _stores_rope_below(p, ropes) for p in parts)


def _peel_quant(st: Store) -> tuple[Store, Quant | None]:
    """The store seen as a store of the unquantised value (and how it is quantised), or as it is."""
    root, roles, chain = walk_views(st.value, st.value_roles)  # e.g. a reshape of the uint8 view (one token)
    peeled = peel_quant(root, st.cache)
    if peeled is None:
        return st, None
    x, quant = peeled
    node = root
    while node is not x:  # the quantisation's own nodes, which are no other users of the stored value
        chain.append(node)
        node = next(a for a in node.all_input_nodes if a is x or a.meta["val"].shape == root.meta["val"].shape)
    return dataclasses.replace(st, value=x, value_roles=roles), dataclasses.replace(quant, chain=tuple(chain))


class RopeFinder:
    """``match_rope`` with one shared evaluator and a memo per node (q candidates are tried per site).

    Why a node that is not a RoPE looks like one (a near miss, for the report) is worked out only when asked:
    it evaluates the node again as a product of features, which costs more than the match, and the q
    candidates tried per site are never asked about."""

    def __init__(self):
        self._evaluators: dict[int | None, Evaluator] = {}  # one per head_dim (the width that bounds a leaf)
        self._memo: dict[Node, RopeMatch | None] = {}
        self._why_not: dict[Node, str] = {}  # match_rope's reason, for nodes that are not a RoPE
        self._near_misses: dict[Node, str | None] = {}  # RoPE-like nodes that are not a RoPE: the reason
        # the evaluator recurses at most this many ops from a RoPE output to a leaf (x, cos, sin)
        self.max_depth = Evaluator().max_depth

    def _evaluator(self, node: Node) -> Evaluator:
        shape = shape_of(node)
        # a symbolic width is no dict key (SymInts are unhashable) and bounds no leaf: evaluate without it
        head_dim = shape[-1] if shape and isinstance(shape[-1], int) else None
        if head_dim not in self._evaluators:
            self._evaluators[head_dim] = Evaluator(head_dim)
        return self._evaluators[head_dim]

    def match(self, node: Node) -> RopeMatch | None:
        if node not in self._memo:
            try:
                self._memo[node] = match_rope(node, self._evaluator(node))
            except NotRope as e:
                self._memo[node] = None
                self._why_not[node] = str(e)
        return self._memo[node]

    def why_not(self, node: Node) -> str | None:
        """``match_rope``'s reason why ``node`` is not a RoPE (None for a RoPE)."""
        return None if self.match(node) is not None else self._why_not[node]

    def near_miss(self, node: Node) -> str | None:
        """Why ``node`` is not a RoPE the op computes, if it looks like one (products of tensors); else None."""
        if self.match(node) is not None:
            return None
        if node not in self._near_misses:
            ev, why = self._evaluator(node), self._why_not[node]
            features = rope_like(node, ev)
            computed = _below_views_and_casts(node)
            reason = None
            if features == 1:
                reason = why
            elif features == 2:  # the RoPE is only seen across heads: something regroups its output
                reason = ("products of tensors reach the store across heads: the RoPE output is regrouped (e.g. "
                          "flattened and cast) before the store")
            elif computed is not node and rope_like(computed, ev):
                # views the evaluator cannot follow (symbolic sizes) or casts stand between the two
                reason = (f"{computed.name} computes products of tensors like a RoPE, but views or casts between "
                          f"it and the store hide it ({why})")
            self._near_misses[node] = reason
        return self._near_misses[node]


def _below_views_and_casts(node: Node) -> Node:
    """The first node below ``node`` that is neither a view nor a cast."""
    while node.op == "call_function" and node.target in _VIEWS_AND_CASTS and node.args and isinstance(
            node.args[0], Node):
        node = node.args[0]
    return node
