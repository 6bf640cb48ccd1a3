"""RoPE on q and k -> (views) -> KV-cache store of k and v, replaced by one ``fx_fusion.rope_kv_store``.

Before (functional post-grad graph; any RoPE spelling, see ``patterns/rope.py``; any store layout,
see ``patterns/kv_store.py``)::

    q_rot = rope(q_x, cos, sin)                          # users: attention
    k_rot = rope(k_x, cos, sin)
    k_new = aten.index_put(k_cache, idx, views(k_rot))   # idx: [loc] | [loc//bs, loc%bs] | [None, None, pos]
    v_new = aten.index_put(v_cache, idx, views(v))
    ...readers of k_new, v_new...
    aten.copy_(k_cache, k_new); aten.copy_(v_cache, v_new)

After (``replacement`` traced with ``make_fx`` on the nodes' fake values, then spliced in)::

    r = auto_functionalized(fx_fusion.rope_kv_store, q=tm(q_x), k=tm(k_x), v=tm(v),
                            k_cache=k_cache, v_cache=v_cache, slot_mapping=loc, cos=.., sin=.., positions=..)
    q_rot -> views(r[0]);  k_new -> r[2];  v_new -> r[3];  (k_rot -> views(r[1]) if k_rot has other users)
    aten.copy_(k_cache, r[2]); aten.copy_(v_cache, r[3])     # the graph's own epilogue, unchanged

``tm`` views a tensor token-major (``[T, H, D]`` or ``[B, S, H, D]``) by squeeze/permute/unsqueeze only.
Inductor re-inplaces the ``auto_functionalized`` call (the cache is written in place). The op mutates only
the caches: q and k are never passed as mutated views of the qkv projection (that form was miscompiled).

On CUDA (HIP included) the traced launcher is the kernel's own launch instead of the op
(``kernel_rope_kv_store``): the graph then holds ``triton_kernel_wrapper_functional``, which Inductor
re-inplaces the same way and launches from its output code, with no Python on the hot path. A launch that
would pin a symbolic size, or whose trace writes an input other than the caches, falls back to the op.

Per site, ``can_fuse`` (is the rewrite exact? raises ``Unfusable``) and ``should_fuse`` (is it enabled
and worth it? raises ``Disabled``) are kept apart, as Inductor's ``pad_mm`` keeps ``can_pad`` and
``should_pad``. Every candidate site ends in a ``Site`` record, fused or with the reason it was not; an
unexpected exception while planning or rewriting a site leaves the graph as it was and is reported as
``internal error: <type>: <text>``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch._inductor.pattern_matcher import CallFunction, KeywordArg
from torch.fx import Graph, Node

from fx_fusion.kernels.launch import NotTraceable, launch_traceable
from fx_fusion.kernels.ops import rope_kv_store_functional
from fx_fusion.kernels.problem import MODEL_DTYPES, CacheLayout, eager_fp8_cast, prepare
from fx_fusion.kernels.rope_kv_kernel import _rope_kv_store_kernel
from fx_fusion.patterns.canonicalize import canonicalize
from fx_fusion.patterns.complex_rope import canonicalize_complex_rope
from fx_fusion.patterns.fx_utils import RESHAPES, Role, is_one, shape_of, sizes_equal, within
from fx_fusion.patterns.kv_store import (NotAStore, Origin, Store, cat_of_tokens, engine_store_op,
                                         match_copy_store, match_engine_store, match_store, same_view, view_args,
                                         walk_views)
from fx_fusion.patterns.quant import NotQuant, Quant, peel_quant, scale_rounding
from fx_fusion.patterns.rope import Evaluator, NotRope, RopeMatch, RopeStyle, TableRef, match_rope, rope_like

log = logging.getLogger("fx_fusion")
aten = torch.ops.aten
FUSED_OP = torch.ops.fx_fusion.rope_kv_store.default
_GATHER = CallFunction(aten.index.Tensor, KeywordArg("table"), KeywordArg("indices"))
# ops a RoPE ends in: a stored value computed by one of these may be a RoPE
_ARITHMETIC = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.neg.default, aten.cat.default,
                         torch.ops.prims.convert_element_type.default, aten._to_copy.default})
_TOKEN_MAJOR = {CacheLayout.TOKEN: (Role.TOKEN, Role.HEAD, Role.FEATURE),
                CacheLayout.PAGED: (Role.TOKEN, Role.HEAD, Role.FEATURE),
                CacheLayout.SEQUENCE: (Role.BATCH, Role.SEQ, Role.HEAD, Role.FEATURE)}
_TOKEN_ROLES = (Role.TOKEN, Role.BATCH, Role.SEQ)  # the dims whose product is the token count


@dataclass(frozen=True)
class FusionOptions:
    """What the pass asks of this pattern (a plain mirror of the user's config; patterns never import it)."""

    layouts: frozenset = frozenset(CacheLayout)
    styles: frozenset = frozenset(RopeStyle)
    min_tokens: int = 1
    max_tokens: int | None = None
    validate: bool = False


@dataclass
class Site:
    """One candidate: a KV-cache store of a RoPE output, fused or not (and why)."""

    store: str  # name of the k-store node
    source: str  # model source line, from the node's stack trace
    fused: bool = False
    reason: str | None = None
    disabled: bool = False  # not fused because the options said so (not because it was unsafe)
    layout: str | None = None
    style: str | None = None
    rotary_dim: int | None = None
    head_dim: int | None = None
    num_tokens: str | None = None
    nodes: dict = field(default_factory=dict)  # role -> node name (before) / new node name (after)
    layer: str | None = None  # module path of the store (``model.layers.3.self_attn``), set by the pass

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Unfusable(Exception):
    """A site that must stay as it is; the message is the reason."""


class Disabled(Unfusable):
    """A site that could be fused but the options say not to (layout/style off, token thresholds)."""


# ---- finding sites ---------------------------------------------------------------------------


@dataclass
class _KStore:
    """A store whose value is a RoPE output: the k half of a candidate site."""

    store: Store
    root: Node  # the RoPE output (the stored value seen through its views)
    roles: tuple  # roles of root's dims, as far as the store shows them
    chain: list  # the view nodes between root and the store
    rope: RopeMatch


@dataclass
class _GraphState:
    """What the sites of one graph share while the pass runs."""

    order: dict  # node -> position in the graph before the pass
    ropes: _RopeFinder
    v_candidates: list  # stores that do not store a RoPE output
    k_roots: set  # every k RoPE output (never a q)
    used: set = field(default_factory=set)  # q RoPE outputs and v stores taken by fused sites
    quants: dict = field(default_factory=dict)  # store node -> Quant of its fp8 store (see patterns/quant.py)
    quant_errors: dict = field(default_factory=dict)  # store node -> why its fp8 store cannot be reproduced
    # (cos leaf, rank, head_dim, dtype) -> the RoPE outputs reading that leaf (one walk per leaf: layers may share it)
    ropes_of_leaf: dict = field(default_factory=dict)


def fuse_rope_kv_stores(graph: Graph, options: FusionOptions = FusionOptions()) -> list[Site]:
    """Find every store of a RoPE output into a KV cache; fuse those that are safe and enabled."""
    canonicalize(graph)  # spellings reduced to the forms matched below (patterns/canonicalize.py)
    rewrites = canonicalize_complex_rope(graph)  # complex RoPE as real pairs, undone where nothing fused
    try:
        return _fuse_rope_kv_stores(graph, options, rewrites)
    finally:
        rewrites.restore()


def _fuse_rope_kv_stores(graph: Graph, options: FusionOptions, rewrites) -> list[Site]:
    ropes = _RopeFinder()
    stores, sites, ks = [], [], []
    for n in list(graph.find_nodes(op="call_function", target=aten.index_put.default)):
        try:
            stores.append(match_store(n))
        except NotAStore as e:
            # not a cache store we can take over; a candidate site only if it stores a RoPE output
            try:
                value = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], Node) else None
                if value is not None and "val" in value.meta:
                    root, _, _ = walk_views(value, (None,) * value.meta["val"].dim())
                    if ropes.match(root) is not None or ropes.near_miss(root) is not None:
                        sites.append(Site(store=n.name, source=source_line(n), reason=f"store not supported: {e}"))
            except Exception as err:  # noqa: BLE001 (a bug in the matcher must not fail the compile)
                sites.append(_internal_error(n, err))
        except Exception as err:  # noqa: BLE001
            sites.append(_internal_error(n, err))
    for n in list(graph.find_nodes(op="call_function", target=aten.copy.default)):
        try:
            stores.append(match_copy_store(n))
        except NotAStore as e:  # a candidate site only if it copies a RoPE output (or part of one) into a cache
            try:
                if _copies_rope(n, ropes):
                    sites.append(Site(store=n.name, source=source_line(n), reason=f"store not supported: {e}"))
            except Exception as err:  # noqa: BLE001
                sites.append(_internal_error(n, err))
        except Exception as err:  # noqa: BLE001
            sites.append(_internal_error(n, err))
    for n in list(graph.find_nodes(op="call_function", target=auto_functionalized_v2)):
        if engine_store_op(n) is None:
            continue
        try:
            stores.extend(match_engine_store(n))
        except NotAStore as e:
            sites.append(Site(store=n.name, source=source_line(n), reason=f"store not supported: {e}"))
        except Exception as err:  # noqa: BLE001
            sites.append(_internal_error(n, err))
    v_candidates, quants, quant_errors = [], {}, {}
    for st in stores:
        if st.flat_value:  # an engine's [T, Hkv*D] rows: a v, or a k rotated elsewhere
            v_candidates.append(st)
            if ropes.match(st.value) is not None or ropes.near_miss(st.value) is not None:
                sites.append(Site(store=st.node.name, source=source_line(st.node), reason=(
                    f"store not supported: the stored k {st.value.name} is [tokens, Hkv*D] rows with no "
                    "[tokens, Hkv, D] view to read the RoPE's heads from")))
            continue
        try:
            st, quant = _peel_quant(st)
        except NotQuant as e:  # an fp8 store the op cannot reproduce: a site if it stores a RoPE output
            quant_errors[st.node] = str(e)
            v_candidates.append(st)
            try:
                if _stores_rope_below(e.inner, ropes):
                    sites.append(Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value,
                                      reason=f"quantised store not supported: {e}"))
            except Exception as err:  # noqa: BLE001
                sites.append(_internal_error(st.node, err))
            continue
        except Exception as err:  # noqa: BLE001
            sites.append(_internal_error(st.node, err))
            continue
        if quant is not None:
            quants[st.node] = quant
        try:
            root, roles, chain = walk_views(st.value, st.value_roles)
            rope = ropes.match(root)
        except Exception as err:  # noqa: BLE001
            sites.append(_internal_error(st.node, err))
            continue
        if rope is not None:
            ks.append(_KStore(st, root, roles, chain, rope))
            continue
        v_candidates.append(st)  # a v store, or a store of something that is not rotated
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
    state = _GraphState({n: i for i, n in enumerate(graph.nodes)}, ropes, v_candidates, {k.root for k in ks},
                        quants=quants, quant_errors=quant_errors)
    fake_mode = None
    for k in ks:
        site = Site(store=k.store.node.name, source=source_line(k.store.node), layout=k.store.layout.value,
                    style=k.rope.style.value, rotary_dim=k.rope.rotary_dim, head_dim=k.rope.head_dim)
        sites.append(site)
        try:
            plan = can_fuse(k, state)
            site.num_tokens = str(plan.num_tokens) if plan.num_tokens is not None else "dynamic"
            site.nodes = {"q_rope": plan.q_root.name, "k_rope": plan.k_root.name,
                          "k_store": plan.k_store.node.name, "v_store": plan.v_store.node.name}
            should_fuse(plan, options)
            if fake_mode is None:
                fake_mode = _fake_mode(graph)
            rewrite(graph, plan, options, fake_mode)
            state.used.update({plan.q_root, plan.v_store.node})
            site.fused = True
        except Unfusable as e:
            site.reason, site.disabled = str(e), isinstance(e, Disabled)
        except Exception as err:  # noqa: BLE001
            site.reason = _internal_error(k.store.node, err).reason
    rewrites.restore()
    if any(s.fused for s in sites):
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(graph)
        graph.eliminate_dead_code()
        graph.lint()
    return sites


def _stores_rope_below(node: Node, ropes: _RopeFinder, depth: int = 8) -> bool:
    """Whether a RoPE output (or a near miss) lies below ``node`` through views and elementwise scaling."""
    for _ in range(depth):
        inner, _, _ = walk_views(node, (None,) * node.meta["val"].dim())
        if ropes.match(inner) is not None or ropes.near_miss(inner) is not None:
            return True
        tensors = ([a for a in inner.args if isinstance(a, Node) and "val" in a.meta]
                   if inner.op == "call_function" else [])
        if not tensors or inner.target not in _ARITHMETIC | {aten.div.Tensor, aten.clamp_min.default,
                                                            aten.clamp_max.default, aten.clamp.default}:
            return False
        node = max(tensors, key=lambda a: a.meta["val"].dim())  # the tensor, not a scale
    return False


def _copies_rope(n: Node, ropes: _RopeFinder) -> bool:
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


def _internal_error(node: Node, err: Exception) -> Site:
    log.debug("fx_fusion: internal error at %s", node.name, exc_info=err)
    return Site(store=node.name, source=source_line(node), reason=f"internal error: {type(err).__name__}: {err}")


def _fake_mode(graph: Graph):
    """The fake mode of the graph's values (one per graph), found from its inputs."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta.get("val") for n in graph.find_nodes(op="placeholder")])
    if mode is None:
        raise Unfusable("the graph's inputs carry no fake values to trace the replacement with")
    return mode


class _RopeFinder:
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


_VIEWS_AND_CASTS = RESHAPES | {aten.permute.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
                                aten.clone.default, aten.alias.default, aten.expand.default,
                                torch.ops.prims.convert_element_type.default, aten._to_copy.default}


def _below_views_and_casts(node: Node) -> Node:
    """The first node below ``node`` that is neither a view nor a cast."""
    while node.op == "call_function" and node.target in _VIEWS_AND_CASTS and node.args and isinstance(
            node.args[0], Node):
        node = node.args[0]
    return node


def source_line(node: Node) -> str:
    """``file:line code`` of the innermost model frame in the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            where = lines[i].replace("File ", "").replace('"', "")
            return f"{where}: {code}".strip()
    return "<no stack trace>"


# ---- can_fuse / should_fuse ------------------------------------------------------------------


@dataclass(frozen=True)
class TableSource:
    """Where the kernel reads cos (or sin) from: a ``[P, ...]`` table gathered by ``positions``, or
    per-token values (``positions is None``); ``roles`` label the dims of ``positions`` or of ``node``."""

    node: Node
    positions: Node | None
    roles: tuple


@dataclass
class Plan:
    """Everything the rewrite of one site needs, checked exact by ``can_fuse``."""

    k_store: Store
    v_store: Store
    q_root: Node  # q's RoPE output (replaced by the op's q_out)
    q: RopeMatch
    k_root: Node  # k's RoPE output (replaced by k_out when it has other users)
    k: RopeMatch
    roles: tuple  # roles of the RoPE outputs' dims (q's and k's agree but for the head count)
    return_k: bool
    v_src: Node
    v_roles: tuple
    cos: TableSource
    sin: TableSource
    num_tokens: int | None  # None when symbolic
    k_quant: Quant | None = None  # fp8 stores: how k and v are quantised (one recipe, a scale each)
    v_quant: Quant | None = None

    @property
    def layout(self) -> CacheLayout:
        return self.k_store.layout


def can_fuse(k: _KStore, state: _GraphState) -> Plan:
    """The plan of an exact rewrite of the site around ``k``, or ``Unfusable`` with the reason."""
    st, root, rope = k.store, k.root, k.rope
    if root in state.used:
        raise Unfusable("this RoPE output is already taken by another site")
    if k.roles[-1] != Role.FEATURE or rope.head_dim != st.head_dim:
        raise Unfusable("the stored feature dim is not the RoPE's last dim")
    kval = root.meta["val"]
    cache_val = st.cache.meta["val"]
    k_quant = state.quants.get(st.node)
    if k_quant is None and kval.dtype != cache_val.dtype:
        raise Unfusable(f"k is {kval.dtype} but the cache is {cache_val.dtype} (and not quantised to fp8 as "
                        "the fused op can)")
    if rope.x.meta["val"].dtype != kval.dtype or kval.dtype not in MODEL_DTYPES:
        raise Unfusable(f"RoPE changes dtype ({rope.x.meta['val'].dtype} -> {kval.dtype})")
    wanted = _TOKEN_MAJOR[st.layout]
    named = [r for r in k.roles if r is not None]
    if (len(set(named)) != len(named) or not set(named) <= set(wanted)
            or any(r is None and not is_one(s) for r, s in zip(k.roles, shape_of(root)))):
        raise Unfusable(f"cannot tell token and head dims of k (dims {k.roles})")
    v_store = _pair_v(st, state)
    v_quant = _check_quant(k_quant, v_store, kval, state)
    if v_store.flat_value:  # [T, Hkv*D]: the replacement unflattens it
        v_src, v_roles = v_store.value, v_store.value_roles
    else:
        v_src, v_roles, _ = walk_views(v_store.value, v_store.value_roles)
    _check_buffers(st, v_store)
    if v_src.meta["val"].dtype != kval.dtype:
        raise Unfusable(f"v is {v_src.meta['val'].dtype} but k is {kval.dtype}")
    q_root, q = _pair_q(root, rope, state)
    # the op takes one dtype for q, k and v and returns q_out in it: q must be rotated in k's dtype
    for what, dtype in (("q", q.x.meta["val"].dtype), ("q's RoPE output", q_root.meta["val"].dtype)):
        if dtype != kval.dtype:
            raise Unfusable(f"{what} is {dtype} but k is {kval.dtype}")
    roles = _complete_roles(k.roles, shape_of(q_root), wanted)
    # q's token dims must be k's: the op takes one token count (nothing broadcasts q against k here)
    if len(shape_of(q_root)) != len(shape_of(root)) or any(
            r != Role.HEAD and not sizes_equal(a, b) for r, a, b in zip(roles, shape_of(q_root), shape_of(root))):
        raise Unfusable(f"q {tuple(shape_of(q_root))} and k {tuple(shape_of(root))} differ beyond the head count")
    head = roles.index(Role.HEAD)
    q_heads, k_heads = shape_of(q_root)[head], shape_of(root)[head]
    if not (isinstance(q_heads, int) and isinstance(k_heads, int)) or q_heads % k_heads:
        raise Unfusable(f"q has {q_heads} heads, not a multiple of k's {k_heads}")
    scales = [qt.scale for qt in (k_quant, v_quant) if qt is not None and isinstance(qt.scale, Node)]
    devices = {n.meta["val"].device for n in (rope.x, q.x, v_src, st.cache, v_store.cache, st.slots, *scales)
               if n is not None}
    if len(devices) != 1:
        raise Unfusable(f"tensors on several devices: {sorted(map(str, devices))}")
    cos = _table_source(rope.cos, roles, "cos")
    sin = _table_source(rope.sin, roles, "sin")
    if (cos.positions is None) != (sin.positions is None) or cos.positions is not sin.positions:
        raise Unfusable("cos and sin are indexed by different positions")
    chain = [*k.chain, *(k_quant.chain if k_quant is not None else ())]
    return_k = any(u not in chain and u is not st.node for n in [root, *k.chain] for u in n.users)
    tokens = [s for s, r in zip(shape_of(root), roles) if r in _TOKEN_ROLES]
    num_tokens = math.prod(tokens) if all(isinstance(s, int) for s in tokens) else None
    if k_quant is not None:
        _check_quant_device(k_quant, cache_val.device)
    plan = Plan(st, v_store, q_root, q, root, rope, roles, return_k, v_src, v_roles, cos, sin, num_tokens,
                k_quant, v_quant)
    _check_acyclic(plan, [q.x, rope.x, v_src, st.slots, cos.node, sin.node, *_buffers(st, v_store), *scales,
                          *(src.positions for src in (cos, sin) if src.positions is not None)])
    return plan


def _first_of_pair(st: Store, v: Store) -> tuple[Store, Store] | None:
    """(first, second) when one store writes a view of the buffer the other has just updated (``kv[0, i]`` then
    ``kv[1, i]`` of one stacked buffer): the second store's base is the first's result. Else None."""
    if st.origin is Origin.VIEW and v.origin is Origin.VIEW:
        if v.base is st.result:
            return st, v
        if st.base is v.result:
            return v, st
    return None


def _buffers(st: Store, v: Store) -> list[Node]:
    """The tensors the fused op writes (or writes views of): one stacked buffer, or one per cache."""
    pair = _first_of_pair(st, v)
    return [pair[0].base] if pair else [st.base, v.base]


def _check_buffers(st: Store, v: Store) -> None:
    """Stores into views of buffers: one op may write both only if it can write the memory eager writes.

    Views of one stacked buffer (the second store reading the buffer the first updated) must be disjoint, e.g.
    ``kv[0, i]`` and ``kv[1, i]``, and nothing else may read the buffer between the two stores (it would see
    the k store without the v store)."""
    pair = _first_of_pair(st, v)
    if pair is None:
        if st.origin is Origin.VIEW and v.origin is Origin.VIEW and same_view(st.base, v.base):
            raise Unfusable("k and v are stored into views of one buffer that the graph does not update in turn")
        return
    first, second = pair
    inner = set(second.views) | set(second.scatters) | set(second.parents)
    readers = [u for u in first.result.users if u not in inner]
    if readers:
        raise Unfusable(f"{readers[0].name} reads {first.base.name} between the k and the v store")
    for a, b in zip(first.views, second.views):
        if a.target is not b.target:
            break
        fa, fb = view_args(a), view_args(b)
        if fa == fb:
            continue
        if a.target is aten.select.int and fa[0] == fb[0]:
            size = shape_of(a.args[0])[fa[0]]
            if fa[1] % size != fb[1] % size:
                return  # different entries of one dim: disjoint
        break
    raise Unfusable(f"the k and v views of {first.base.name} ({first.views[-1].name}, {second.views[-1].name}) "
                    "may overlap")


def _check_quant(k_quant: Quant | None, v_store: Store, kval, state: _GraphState) -> Quant | None:
    """v's quantisation, which must follow k's recipe (each with its own scale)."""
    v_quant = state.quants.get(v_store.node)
    if k_quant is None:
        return None
    if v_quant is None:
        why = state.quant_errors.get(v_store.node, "v is not quantised to fp8")
        raise Unfusable(f"k is quantised, but the v store is not one the fused op can reproduce: {why}")
    if k_quant.recipe != v_quant.recipe:
        raise Unfusable(f"k and v are quantised differently: k {k_quant.describe()}, v {v_quant.describe()}")
    if kval.dtype not in MODEL_DTYPES:
        raise Unfusable(f"k is {kval.dtype}, not a model dtype")
    return v_quant


def _check_quant_device(quant: Quant, device: torch.device) -> None:
    """The fp8 cast's rounding and overflow, and the scale's division, as eager does them on ``device``."""
    try:
        eager_fp8_cast(device, quant.fp8)
    except ValueError as e:
        raise Unfusable(f"quantised store: {e}") from None
    if device.type == "cuda" and not quant.scale_mul and isinstance(quant.scale, float):
        mantissa, _ = math.frexp(quant.scale)
        if abs(mantissa) != 0.5:  # a power of two: x / s == x * (1 / s) exactly
            raise Unfusable(f"k is divided by the Python number {quant.scale}, which eager CUDA computes as a "
                            "multiply by its fp32 reciprocal (not measured here); a power of two, a scale "
                            "tensor or a multiply by the reciprocal fuses")


def should_fuse(plan: Plan, options: FusionOptions) -> None:
    """Raise ``Disabled`` if the options turn this (exact) site off: layout, style, token thresholds."""
    if plan.layout not in options.layouts:
        raise Disabled(f"layout {plan.layout.value!r} disabled by config")
    if plan.k.style not in options.styles:
        raise Disabled(f"RoPE style {plan.k.style.value!r} disabled by config")
    window = plan.k_store.window
    if options.validate and window is not None and window[1] != shape_of(plan.k_store.cache)[2]:
        raise Disabled("validate=True rejects the slots of the tokens a window copy leaves out (config)")
    rule = plan.k_store.engine_slots
    if options.validate and rule is not None and rule.skip is not None:
        raise Disabled(f"validate=True rejects the slot store_cache skips (reserved_skip_index={rule.skip}) (config)")
    n = plan.num_tokens  # a symbolic count always qualifies: one graph serves every size
    if n is not None and (n < options.min_tokens or (options.max_tokens is not None and n > options.max_tokens)):
        raise Disabled(f"{n} tokens is outside [{options.min_tokens}, {options.max_tokens}] (config)")


def _complete_roles(roles, q_shape, wanted) -> tuple:
    """Name k's size-1 dims whose role the store did not show (one token, one kv head, batch 1).

    The head dim goes where q has more than one head; the other roles fill the remaining size-1 dims
    in order (any order is right for size-1 dims)."""
    roles = list(roles)
    free = [i for i, r in enumerate(roles) if r is None]
    missing = [w for w in wanted if w not in roles and w != Role.FEATURE]
    if Role.HEAD in missing:
        if not free:
            raise Unfusable(f"cannot tell the head dim of k (dims {tuple(roles)})")
        pick = next((i for i in free if not is_one(q_shape[i])), free[0])
        roles[pick] = Role.HEAD
        free.remove(pick)
        missing.remove(Role.HEAD)
    for w in missing:
        if free:
            roles[free.pop(0)] = w
    return tuple(roles)


def _pair_v(st: Store, state: _GraphState) -> Store:
    """The v store: same slots and layout, another cache of the same shape and dtype, nearest in the graph."""
    same = [v for v in state.v_candidates if v.indices == st.indices and v.layout is st.layout
            and v.node not in state.used and v.cache is not st.cache
            and tuple(shape_of(v.cache)) == tuple(shape_of(st.cache))
            and v.cache.meta["val"].dtype == st.cache.meta["val"].dtype]
    if not same:
        raise Unfusable("no matching v store (same slots, same cache shape) in this graph")
    return min(same, key=lambda v: abs(state.order[v.node] - state.order[st.node]))


def _pair_q(k_root: Node, k: RopeMatch, state: _GraphState) -> tuple[Node, RopeMatch]:
    """The q RoPE: same tables, style and rotary dim, its own input, nearest to the k RoPE."""
    key = (k.cos.leaf.node, len(shape_of(k_root)), k.head_dim, k_root.meta["val"].dtype)
    if key not in state.ropes_of_leaf:
        ropes = []
        # q's RoPE output reads the same cos leaf as k's; match_rope evaluates at most ``max_depth`` ops
        # below a RoPE output, so every output it can accept lies within that many uses of the leaf
        for cand in within([k.cos.leaf.node], state.ropes.max_depth, lambda n: n.users):
            val = cand.meta.get("val")
            # compare sizes without creating shape guards (a symbolic token count must stay symbolic)
            if not isinstance(val, torch.Tensor) or val.dim() != key[1] or not (
                    isinstance(val.shape[-1], int) and val.shape[-1] == k.head_dim):
                continue
            if val.dtype != key[3] or cand not in state.order:
                continue
            m = state.ropes.match(cand)
            if m is not None:
                ropes.append((cand, m))
        state.ropes_of_leaf[key] = ropes
    found = [(cand, m) for cand, m in state.ropes_of_leaf[key]
             if cand is not k_root and cand not in state.k_roots and cand not in state.used
             and (m.style, m.rotary_dim, m.cos, m.sin) == (k.style, k.rotary_dim, k.cos, k.sin) and m.x is not k.x]
    # keep the outermost node of each q RoPE (e.g. the cast back after an fp32 RoPE)
    outer = [(c, m) for c, m in found if not any(u is not c and m2.x is m.x and c in u.all_input_nodes
                                                 for u, m2 in found)]
    if not outer:
        raise Unfusable("no RoPE of q with the same cos/sin in this graph")
    return min(outer, key=lambda cm: abs(state.order[cm[0]] - state.order[k_root]))


def _table_source(ref: TableRef, roles, name: str) -> TableSource:
    """The table (and positions) or the per-token tensor the kernel reads ``name`` from."""
    leaf = ref.leaf.node
    leaf_prefix = len(shape_of(leaf)) - ref.leaf.rank
    leaf_roles = tuple(roles[d] if d is not None else None for d in ref.dims)
    if Role.HEAD in leaf_roles:
        raise Unfusable(f"{name} varies per head")
    m = _GATHER.match(leaf)
    if m and len(m.kwargs["indices"]) == 1 and isinstance(m.kwargs["indices"][0], Node):
        table, pos = m.kwargs["table"], m.kwargs["indices"][0]
        pshape, tshape = shape_of(pos), shape_of(table)
        if len(pshape) == leaf_prefix and len(tshape) - 1 == ref.leaf.rank and all(
                isinstance(s, int) for s in tshape) and pos.meta["val"].dtype in (torch.int32, torch.int64):
            return TableSource(table, pos, leaf_roles)
    if ref.leaf.rank != 1:
        raise Unfusable(f"{name} is not a [tokens, features] tensor")
    return TableSource(leaf, None, leaf_roles + (Role.FEATURE,))


def _check_acyclic(plan: Plan, inputs: list[Node]) -> None:
    """The fused op's inputs must not depend on anything it replaces."""
    replaced = {plan.q_root, plan.k_root, plan.k_store.node, plan.v_store.node}
    inputs = set(inputs)
    seen, frontier = set(replaced), list(replaced)
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in inputs:
                raise Unfusable(f"{u.name} is both an input of the fused op and computed from the store")
            if u not in seen:
                seen.add(u)
                frontier.append(u)


# ---- the replacement -------------------------------------------------------------------------


# Every launcher below takes the tensors, then the op's other arguments by name (``options``: built once, in
# ``replacement``), and passes those on by name: a new op option is set in one place of this file.


def functional_rope_kv_store(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, k_scale=None,
                             v_scale=None, **options):
    """The fused op in functional form: ``(q_out, k_out, new k_cache, new v_cache)``.

    ``auto_functionalized`` of the mutating op; Inductor re-inplaces it into a write of the caches."""
    return auto_functionalized(FUSED_OP, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                               slot_mapping=slot_mapping, cos=cos, sin=sin, positions=positions, swa_table=None,
                               k_scale=k_scale, v_scale=v_scale, negative_wraps=True, **options)


def kernel_rope_kv_store(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, k_scale=None,
                         v_scale=None, **options):
    """The fused kernel itself, for Inductor to launch from its output code: ``(q_out, k_out, new k_cache,
    new v_cache)`` like ``functional_rope_kv_store``.

    The op broken down into its ``wrap_triton`` launch and functionalized: the traced graph holds
    ``triton_kernel_wrapper_functional``, which Inductor re-inplaces and launches as ``<kernel>.run(...)``
    from its generated wrapper, with no Python dispatch and no argument checks on the hot path (they ran
    once, here, on the fake tensors). Raises ``NotTraceable`` where the launch would pin a symbolic size.
    """
    def launch(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, k_scale, v_scale):
        q_out, k_out = rope_kv_store_functional(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions,
                                                swa_table=None, k_scale=k_scale, v_scale=v_scale,
                                                negative_wraps=True, **options)
        return q_out, k_out, k_cache, v_cache

    return torch.func.functionalize(launch, remove="mutations")(q, k, v, k_cache, v_cache, slot_mapping, cos, sin,
                                                                positions, k_scale, v_scale)


def is_fused_node(n: Node) -> bool:
    """Whether ``n`` is what a fused site became: the op (``auto_functionalized`` or direct), or the launch
    of its kernel (``triton_kernel_wrapper_functional``/``_mutation`` on CUDA)."""
    if n.op != "call_function":
        return False
    if n.target is FUSED_OP or (n.args and n.args[0] is FUSED_OP):
        return True
    if "triton_kernel_wrapper" not in getattr(n.target, "__name__", ""):
        return False
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
    while kernel is not None and kernel is not _rope_kv_store_kernel:
        kernel = getattr(kernel, "fn", None)  # an Autotuner holds the JITFunction
    return kernel is not None


def launchers_for(device: torch.device, validate: bool) -> tuple[Callable, ...]:
    """The functional launchers the replacement may call for tensors on ``device``, best first.

    On CUDA (HIP included) the kernel launched from Inductor's own code; the op (``auto_functionalized``)
    where that launch cannot be traced, on CPU (Inductor does not launch user Triton kernels there) and
    with ``validate`` (a device sync the kernel launch does not do)."""
    if device.type == "cuda" and not validate:
        return kernel_rope_kv_store, functional_rope_kv_store
    return (functional_rope_kv_store,)


@dataclass(frozen=True)
class TableView:
    """How ``replacement`` turns a ``TableSource`` into the kernel's cos/sin: features ``offset, offset +
    stride, ...`` (``count`` of them) of a table gathered by positions, or of per-token values."""

    roles: tuple  # of the positions' dims (table) or of the per-token tensor's dims (last: FEATURE)
    indexed: bool  # a table read through positions
    offset: int
    stride: int
    count: int


@dataclass(frozen=True)
class ReplacementSpec:
    """The static part of a site's replacement (everything but the tensors)."""

    layout: CacheLayout
    q_roles: tuple  # roles of the dims of q, k, v as they enter the op's replacement
    k_roles: tuple
    v_roles: tuple
    out_roles: tuple  # roles of the RoPE outputs' dims (what q_out and k_out are viewed back to)
    cos: TableView
    sin: TableView
    is_neox: bool
    rotary_dim: int
    return_k: bool
    validate: bool
    table_dtype: torch.dtype | None  # cos/sin rounded to it before the multiply (the model's cast)
    k_store_shape: tuple | None  # the shape of the store's target when it is a view of the cache
    v_store_shape: tuple | None
    v_heads: tuple | None = None  # (Hkv, D): v arrives as an engine's [T, Hkv*D] rows
    quant: tuple | None = None  # fp8 stores: (fp8_dtype for uint8 caches or None, quant_dtype, scale_mul, clamp)
    scale_values: tuple = (None, None)  # k's and v's scales where the graph has them as Python numbers
    scale_roundings: tuple = (None, None)  # the dtype eager rounds each scale tensor to first (quant.scale_rounding)
    # the slots are the graph's, so one out of range fails the call as eager's store would (``check_slots``); not
    # for slots the pass made with a past-the-cache marker (a window copy, an engine's skipped index). Positions
    # are always the graph's: always checked.
    check_slots: bool = True


def replacement(q, k, v, k_cache, v_cache, slots, cos, sin, positions, k_scale=None, v_scale=None, *,
                spec: ReplacementSpec, launch: Callable):
    """What replaces a site, as plain torch: views to token-major, one fused op, views back.

    Returns ``(q_rot, k_rot or None, new k cache, new v cache)``: the values of the RoPE outputs and of
    the two ``index_put`` nodes. Sizes stay symbolic: the only branches are on static sizes.
    """
    wanted = _TOKEN_MAJOR[spec.layout]
    if spec.v_heads is not None:
        v = v.unflatten(-1, spec.v_heads)
    q, k, v = (_to_token_major(x, roles, wanted) for x, roles in
               ((q, spec.q_roles), (k, spec.k_roles), (v, spec.v_roles)))
    tokens = {r: s for r, s in zip(wanted, q.shape) if r in _TOKEN_ROLES}
    cos, positions = _kernel_table(cos, positions, spec.cos, spec.layout, tokens)
    sin, _ = _kernel_table(sin, None, spec.sin, spec.layout, tokens)  # cos and sin share the positions
    # the op's arguments other than the tensors, by name (every launcher passes them on as they are)
    options = dict(is_neox=spec.is_neox, rotary_dim=spec.rotary_dim, layout=spec.layout.value,
                   return_k=spec.return_k, validate=spec.validate, table_dtype=spec.table_dtype,
                   check_slots=spec.check_slots, check_positions=True)
    if spec.quant is not None:
        fp8_dtype, quant_dtype, scale_mul, clamp = spec.quant
        options.update(fp8_dtype=fp8_dtype, quant_dtype=quant_dtype, scale_mul=scale_mul,
                       clamp=None if clamp is None else list(clamp))
        # a scale the graph holds as a Python number: the fp32 value eager computes with; a scale tensor: the
        # value eager reads, in the dtype it is read in (rounded to the quotient's dtype first where eager rounds
        # it: a bf16 tensor the op reads exactly; Inductor would drop a round trip back to fp32)
        k_scale, v_scale = (
            torch.full((1,), value, dtype=torch.float32, device=q.device) if value is not None
            else None if scale is None else _convert(scale, rounding)
            for scale, value, rounding in zip((k_scale, v_scale), spec.scale_values, spec.scale_roundings))
    q_out, k_out, k_new, v_new = launch(q, k, v, k_cache, v_cache, slots, cos, sin, positions, k_scale, v_scale,
                                        **options)
    q_rot = _from_token_major(q_out, wanted, spec.out_roles)
    k_rot = _from_token_major(k_out, wanted, spec.out_roles) if spec.return_k else None
    if spec.k_store_shape is not None:
        k_new = k_new.reshape(spec.k_store_shape)
    if spec.v_store_shape is not None:
        v_new = v_new.reshape(spec.v_store_shape)
    return q_rot, k_rot, k_new, v_new


def _convert(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` cast to ``dtype`` (rounded to nearest even) as post-grad graphs spell it; ``x`` for None or its dtype."""
    if dtype is None or x.dtype == dtype:
        return x
    return torch.ops.prims.convert_element_type.default(x, dtype)


def _to_token_major(x: torch.Tensor, roles, wanted) -> torch.Tensor:
    """View ``x`` (dims labelled by ``roles``) with dims ordered as ``wanted`` (size-1 dims added/dropped)."""
    drop = [i for i, r in enumerate(roles) if r not in wanted]
    if drop:
        x = x.squeeze(drop)
    roles = [r for r in roles if r in wanted]
    present = [w for w in wanted if w in roles]
    perm = [roles.index(w) for w in present]
    if perm != list(range(len(perm))):
        x = x.permute(perm)
    for i, w in enumerate(wanted):
        if w not in present:
            x = x.unsqueeze(i)
    return x


def _from_token_major(x: torch.Tensor, wanted, roles) -> torch.Tensor:
    """Inverse of ``_to_token_major``: view token-major ``x`` with dims ordered as ``roles``."""
    missing = [i for i, w in enumerate(wanted) if w not in roles]
    if missing:
        x = x.squeeze(missing)
    present = [w for w in wanted if w in roles]
    target = [r for r in roles if r in present]
    perm = [present.index(r) for r in target]
    if perm != list(range(len(perm))):
        x = x.permute(perm)
    for i, r in enumerate(roles):
        if r is None:
            x = x.unsqueeze(i)
    return x


def _kernel_table(src, positions, view: TableView, layout: CacheLayout, tokens: dict):
    """(cos-or-sin as the kernel takes it, positions or None).

    One row (or one position) broadcast over all tokens is expanded to one per token (a stride-0 view):
    the op wants a row or a position per token."""
    if view.indexed:
        table = src if src.dim() == 2 else src.reshape(src.shape[0], -1)
        if positions is not None:
            want = (Role.TOKEN,) if layout is not CacheLayout.SEQUENCE else (
                (Role.BATCH, Role.SEQ) if Role.BATCH in view.roles else (Role.SEQ,))
            positions = _broadcast_tokens(_to_token_major(positions, view.roles, want), want, tokens)
    else:
        want = (Role.TOKEN, Role.FEATURE) if layout is not CacheLayout.SEQUENCE else (
            Role.BATCH, Role.SEQ, Role.FEATURE)
        table = _broadcast_tokens(_to_token_major(src, view.roles, want), want, tokens)
    return table[..., view.offset:view.offset + view.stride * (view.count - 1) + 1:view.stride], positions


def _broadcast_tokens(x: torch.Tensor, roles, tokens: dict) -> torch.Tensor:
    """Expand size-1 token/sequence dims of ``x`` to q's (a branch on static sizes only: no guards)."""
    sizes = [tokens[r] if r in (Role.TOKEN, Role.SEQ) and is_one(s) and not is_one(tokens[r]) else -1
             for r, s in zip(roles, x.shape)]
    return x.expand(sizes) if any(s != -1 for s in sizes) else x


def _x_roles(m: RopeMatch, roles) -> tuple:
    """Roles of the dims of the rotated tensor (its prefix dims follow the root's, its last is FEATURE)."""
    return tuple(roles[d] if d is not None else None for d in m.x_dims) + (Role.FEATURE,)


def _table_view(ref: TableRef, src: TableSource, rotary_dim: int) -> TableView:
    count = rotary_dim if ref.per_element else rotary_dim // 2
    return TableView(src.roles, src.positions is not None, ref.offset, ref.stride, count)


# ---- the rewrite -----------------------------------------------------------------------------


def rewrite(graph: Graph, p: Plan, options: FusionOptions, fake_mode) -> None:
    """Trace ``replacement`` on the site's fake values, splice it in, and redirect the replaced nodes.

    Every new node exists before the first ``replace_all_uses_with``; if building them fails, they are
    erased and the graph is as it was.
    """
    st = p.k_store
    spec = ReplacementSpec(
        layout=p.layout, q_roles=_x_roles(p.q, p.roles), k_roles=_x_roles(p.k, p.roles), v_roles=p.v_roles,
        out_roles=p.roles, cos=_table_view(p.k.cos, p.cos, p.k.rotary_dim),
        sin=_table_view(p.k.sin, p.sin, p.k.rotary_dim), is_neox=p.k.style is RopeStyle.NEOX,
        rotary_dim=p.k.rotary_dim, return_k=p.return_k, validate=options.validate,
        table_dtype=p.k.cos.leaf.round_to,
        k_store_shape=tuple(shape_of(st.cache_view)) if st.cache_view is not None else None,
        v_store_shape=tuple(shape_of(p.v_store.cache_view)) if p.v_store.cache_view is not None else None,
        v_heads=tuple(shape_of(p.v_store.cache)[1:]) if p.v_store.flat_value else None,
        quant=None if p.k_quant is None else (p.k_quant.fp8 if p.k_quant.uint8 else None, p.k_quant.quant_dtype,
                                              p.k_quant.scale_mul, p.k_quant.clamp),
        scale_values=tuple(qt.scale if qt is not None and isinstance(qt.scale, float) else None
                           for qt in (p.k_quant, p.v_quant)),
        scale_roundings=tuple(scale_rounding(qt, st.cache.meta["val"].device) if qt is not None else None
                              for qt in (p.k_quant, p.v_quant)),
        check_slots=st.window is None and st.engine_slots is None)
    pair = _first_of_pair(st, p.v_store)
    if Origin.VIEW in (st.origin, p.v_store.origin):
        # the caches are views of the buffers: the kernel gets the buffers and the views' offsets, or the op gets
        # views (auto_functionalized_v2 over the buffers); either way Inductor writes the buffers in place
        k_buf, v_buf = (pair[0].base, None) if pair else (st.base, p.v_store.base)
        launchers = tuple(functools.partial(launch, k_views=_view_ops(st), v_views=_view_ops(p.v_store))
                          for launch in view_launchers_for(st.cache.meta["val"].device, options.validate))
        replaced = [(1, pair[1])] if pair else [(0, st), (1, p.v_store)]  # (output: new k or v buffer, store)
    else:
        k_buf, v_buf = st.cache, p.v_store.cache
        launchers = launchers_for(st.cache.meta["val"].device, options.validate)
        replaced = [(0, st), (1, p.v_store)]
    scales = [qt.scale if qt is not None and isinstance(qt.scale, Node) else None for qt in (p.k_quant, p.v_quant)]
    if st.window is not None:
        slots = _window_slots(graph, st, fake_mode)
    elif st.start is not None:
        slots = _run_slots(graph, st, fake_mode)
    elif st.engine_slots is not None:
        slots = _engine_slots(graph, st, fake_mode)
    else:
        slots = st.slots
    inputs = [p.q.x, p.k.x, p.v_src, k_buf, v_buf, slots, p.cos.node, p.sin.node, p.cos.positions, *scales]
    for launch in launchers:
        try:
            traced = _trace(replacement, inputs, fake_mode, spec=spec, launch=launch)
            write_backs = _write_backs(traced, written=(3, 4))  # the caches
            break
        except NotTraceable as e:  # e.g. a symbolic stride the kernel takes as a constant: the op instead
            if launch is launchers[-1]:
                raise
            log.debug("%s: %s; emitting the op", st.node.name, e)
    position = {n: i for i, n in enumerate(graph.nodes)}
    last_input = max((n for n in inputs if n is not None), key=position.get)
    with graph.inserting_before(last_input.next):  # keeps the inserted nodes in order
        new_nodes, outputs = _splice(graph, traced, inputs, st.node.meta.get("stack_trace"), write_backs)
    try:
        q_rot, k_rot, k_new, v_new = outputs
        olds = [(q_rot, p.q_root), (k_rot, p.k_root if p.return_k else None),
                *(((k_new, v_new)[i], store.result) for i, store in replaced)]
        for new, old in olds:
            if old is not None and not (isinstance(new, Node) and _same_meta(new.meta["val"], old.meta["val"])):
                raise RuntimeError(f"the replacement of {old.name} has another shape or dtype")
    except Exception:
        for n in reversed(new_nodes):
            graph.erase_node(n)
        raise
    for new, old in olds:
        if old is not None:
            old.replace_all_uses_with(new)
    # the replaced stores (index_put; an engine op's outputs, then the op); a view's scatters die with them
    for n in dict.fromkeys(n for store in (st, p.v_store) for n in (store.result, store.node)):
        if not n.users:
            graph.erase_node(n)


def _window_slots(graph: Graph, st: Store, fake_mode) -> Node:
    """The ``[S]`` cache positions of a window copy (``Store.window``): token ``s`` at ``s - a``, and the tokens
    before ``a`` at ``W`` (past the cache: not stored; a negative position would count from the end).

    Made once per graph and window, at the top of the graph (the layers of a model share it)."""
    first, tokens = st.window
    rows = shape_of(st.cache)[2]
    device = st.cache.meta["val"].device
    key = (first, tokens, rows, str(device))
    for n in graph.nodes:
        if n.meta.get("fx_fusion_window_slots") == key:
            return n

    def positions():
        s = torch.arange(-first, tokens - first, dtype=torch.int64, device=device)
        return s if first == 0 else torch.where(s < 0, rows, s)

    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with fake_mode:  # in the ops Inductor lowers (``arange`` -> ``prims.iota``), as its own ``fwd_only`` traces
        traced = make_fx(positions, decomposition_table=select_decomp_table(), tracing_mode="real")()
    top = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(top):
        _, out = _splice(graph, traced, [], None)
    out.meta["fx_fusion_window_slots"] = key
    return out


def _engine_slots(graph: Graph, st: Store, fake_mode) -> Node:
    """The slots of an engine store op's indices (``EngineSlots.slots``: its bound asserted, a skipped index moved
    past the pools), made once per graph and rule right after the indices (the layers of a model share them)."""
    key = (st.slots.name, st.engine_slots)
    for n in st.slots.users:
        if n.meta.get("fx_fusion_engine_slots") == key:
            return n
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with fake_mode:  # in the ops Inductor lowers (``all`` -> ``logical_not(any(logical_not))``), as ``fwd_only``
        traced = make_fx(lambda indices: st.engine_slots.slots(indices), decomposition_table=select_decomp_table(),
                         tracing_mode="real")(st.slots.meta["val"])
    at = st.slots.next
    while at.op == "placeholder":
        at = at.next
    with graph.inserting_before(at):
        _, (out, inside) = _splice(graph, traced, [st.slots], st.node.meta.get("stack_trace"))
        if inside is not None:
            graph.call_function(aten._assert_async.msg, (inside, st.engine_slots.message))
    out.meta["fx_fusion_engine_slots"] = key
    return out


def _run_slots(graph: Graph, st: Store, fake_mode) -> Node:
    """The ``[T]`` cache positions ``start .. start+T-1`` of a copy into a slice (``Store.start``), ``start`` and ``T``
    ints or the graph's symbolic values. Made once per graph, start and T (the layers of a model share it)."""
    tokens = shape_of(st.views[-1])[st.seq_dim]
    length = tokens
    if not isinstance(tokens, int):  # the node holding the symbolic count (compared without a guard)
        length = next((n for n in graph.nodes if isinstance(n.meta.get("val"), torch.SymInt)
                       and sizes_equal(n.meta["val"], tokens)), None)
        if length is None:
            raise Unfusable(f"no node of the graph holds the token count {tokens} of the copy into a slice")
    start, device = st.start, st.cache.meta["val"].device
    key = ("run", start, length, str(device))
    for n in graph.nodes:
        if n.meta.get("fx_fusion_run_slots") == key:
            return n
    kwargs = dict(start=start, step=1, dtype=torch.int64, device=device, requires_grad=False)
    with fake_mode:
        val = torch.ops.prims.iota.default(tokens, **{**kwargs, "start": start.meta["val"] if isinstance(start, Node)
                                                       else start})
    computed = [n for n in (start, length) if isinstance(n, Node) and n.op != "placeholder"]
    if computed:
        order = {n: i for i, n in enumerate(graph.nodes)}
        where = max(computed, key=order.get).next
    else:
        where = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(where):
        out = graph.call_function(torch.ops.prims.iota.default, (length,), kwargs)
    out.meta["val"] = val
    out.meta["fx_fusion_run_slots"] = key
    return out


def _view_ops(store: Store) -> tuple:
    """``(op, args)`` of each view from the store's buffer down to its cache, outermost first."""
    if store.view_ops is not None:
        return store.view_ops
    return tuple((v.target, tuple(v.args[1:])) for v in store.views)


def view_launchers_for(device: torch.device, validate: bool) -> tuple[Callable, ...]:
    """``launchers_for`` for caches that are views of buffers: the kernel writing the buffers, then the op."""
    if device.type == "cuda" and not validate:
        return kernel_rope_kv_store_on_views, rope_kv_store_on_views
    return (rope_kv_store_on_views,)


def kernel_rope_kv_store_on_views(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale=None,
                                  v_scale=None, *, k_views: tuple, v_views: tuple, return_k: bool, validate: bool,
                                  **options):
    """``rope_kv_store_on_views`` as the kernel launched from Inductor's code (see ``kernel_rope_kv_store``).

    The kernel gets the buffers and the views' offsets in them (``launch.kernel_arguments``), so the
    functionalized launch writes the buffers, graph inputs that Inductor re-inplaces; a written view would be
    cloned instead (Inductor does not re-inplace a view of a graph input)."""
    def launch(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale, v_scale):
        v_base = k_buffer if v_buffer is None else v_buffer
        k_cache, v_cache = _replay(k_buffer, k_views), _replay(v_base, v_views)
        p = prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, None, k_scale, v_scale,
                    negative_wraps=True, **options)
        q_out, k_out = launch_traceable(p, return_k, buffers=(k_buffer, v_buffer))
        return q_out, k_out, k_buffer, v_base

    return torch.func.functionalize(launch, remove="mutations")(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin,
                                                                positions, k_scale, v_scale)


def rope_kv_store_on_views(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale=None,
                           v_scale=None, *, k_views: tuple, v_views: tuple, **options):
    """The fused op writing views of buffers (a stacked ``kv[0, i]``, ``kv[1, i]``): ``(q_out, k_out, new k
    buffer, new v buffer)``; ``v_buffer`` None: both views are of ``k_buffer``.

    Functionalized as AOTAutograd does it (``auto_functionalized_v2`` with the buffers as bases), which Inductor
    re-inplaces: the op writes the buffer's memory, and the graph's scatters of the views are gone."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize

    def mutate(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale, v_scale):
        v_base = k_buffer if v_buffer is None else v_buffer
        k_cache, v_cache = _replay(k_buffer, k_views), _replay(v_base, v_views)
        q_out, k_out = FUSED_OP(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table=None,
                                k_scale=k_scale, v_scale=v_scale, negative_wraps=True, **options)
        return q_out, k_out, k_buffer, v_base

    return dispatch_functionalize(mutate, FunctionalTensorMode())(q, k, v, k_buffer, v_buffer, slot_mapping, cos,
                                                                  sin, positions, k_scale, v_scale)


def _replay(x: torch.Tensor, views: tuple) -> torch.Tensor:
    for op, args in views:
        x = op(x, *args)
    return x


def _same_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and sizes, compared without guards."""
    return a.dtype == b.dtype and a.dim() == b.dim() and all(map(sizes_equal, a.shape, b.shape))


def _trace(fn: Callable, inputs: list, fake_mode, **static) -> torch.fx.GraphModule:
    """``fn(*inputs, **static)`` traced to an aten graph on the inputs' fake values (Inductor's
    ``fwd_only`` with the graph's own fake mode: the symbolic sizes are the graph's symbols)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    # make_fx tells its inputs apart by their tensors: two nodes with one fake value would merge
    nodes = {n for n in inputs if n is not None}
    if len({id(n.meta["val"]) for n in nodes}) != len(nodes):
        raise Unfusable("two inputs of the fused op share one fake value")
    vals = [None if n is None else n.meta["val"] for n in inputs]

    def traced(*args):
        return fn(*args, **static)

    with fake_mode:
        return make_fx(traced, tracing_mode="real")(*vals)


def _write_backs(gm: torch.fx.GraphModule, written: tuple) -> set[Node]:
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


def _splice(graph: Graph, gm: torch.fx.GraphModule, inputs: list, stack_trace: str | None, skip=frozenset()):
    """Copy ``gm``'s nodes but those in ``skip`` (see ``_write_backs``) into ``graph`` at the insertion point,
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
            if stack_trace:
                new.meta["stack_trace"] = stack_trace
            if "val" not in new.meta:
                raise RuntimeError(f"the traced replacement's {n.name} has no fake value")
            env[n] = new
            new_nodes.append(new)
        raise RuntimeError("the traced replacement has no output")
    except Exception:
        for n in reversed(new_nodes):
            graph.erase_node(n)
        raise
