"""RoPE on q and k -> (views) -> KV-cache store of k and v, replaced by one ``fx_fusion.rope_kv_store``.

Before (functional post-grad graph; any RoPE spelling, see ``patterns/rope.py``; any store layout,
see ``patterns/kv_store.py``)::

    q_rot = rope(q_x, cos, sin)                          # users: attention
    k_rot = rope(k_x, cos, sin)
    k_new = aten.index_put(k_cache, idx, views(k_rot))   # idx: [loc] | [loc//bs, loc%bs] | [None, None, pos]
    v_new = aten.index_put(v_cache, idx, views(v))
    ...readers of k_new, v_new...
    aten.copy_(k_cache, k_new); aten.copy_(v_cache, v_new)

After::

    r = auto_functionalized(fx_fusion.rope_kv_store, q=tm(q_x), k=tm(k_x), v=tm(v),
                            k_cache=k_cache, v_cache=v_cache, slot_mapping=loc, cos=.., sin=.., positions=..)
    q_rot -> views(r[0]);  k_new -> r[2];  v_new -> r[3];  (k_rot -> views(r[1]) if k_rot has other users)

``tm`` views a tensor token-major (``[T, H, D]`` or ``[B, S, H, D]``) by squeeze/permute/unsqueeze only.
Inductor re-inplaces the ``auto_functionalized`` call (the cache is written in place). The op mutates only
the caches: q and k are never passed as mutated views of the qkv projection (that form was miscompiled).

``can_fuse`` (is the rewrite exact?) and ``should_fuse`` (is it enabled and worth it?) are kept apart;
every candidate site ends in a ``Site`` record, fused or with the reason it was not.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import CallFunction, KeywordArg
from torch.fx import Graph, Node

import fx_fusion.kernels.ops  # noqa: F401  (registers torch.ops.fx_fusion.rope_kv_store)
from fx_fusion.kernels.rope_kv_cache import MODEL_DTYPES, CacheLayout
from fx_fusion.patterns.kv_store import NotAStore, Store, match_store, walk_views
from fx_fusion.patterns.fx_utils import broadcast_equal, is_one, shape_of
from fx_fusion.patterns.rope import Evaluator, NotRope, RopeMatch, RopeStyle, TableRef, match_rope

aten = torch.ops.aten
FUSED_OP = torch.ops.fx_fusion.rope_kv_store.default
_GATHER = CallFunction(aten.index.Tensor, KeywordArg("table"), KeywordArg("indices"))
_TOKEN_MAJOR = {CacheLayout.TOKEN: ("t", "h", "d"), CacheLayout.PAGED: ("t", "h", "d"),
                CacheLayout.SEQUENCE: ("b", "s", "h", "d")}


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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Unfusable(Exception):
    """A site that must stay as it is; the message is the reason."""


class Disabled(Unfusable):
    """A site that could be fused but the options say not to (layout/style off, token thresholds)."""


# ---- finding sites ---------------------------------------------------------------------------


def fuse_rope_kv_stores(graph: Graph, options: FusionOptions = FusionOptions()) -> list[Site]:
    """Find every store of a RoPE output into a KV cache; fuse those that are safe and enabled."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    ropes = _RopeFinder()
    stores, sites, k_sites = [], [], []
    for n in list(graph.find_nodes(op="call_function", target=aten.index_put.default)):
        try:
            stores.append(match_store(n))
        except NotAStore as e:
            # not a cache store we can take over; a candidate site only if it stores a RoPE output
            value = n.args[2] if len(n.args) > 2 and isinstance(n.args[2], Node) else None
            if value is not None and "val" in value.meta:
                root, _, _ = walk_views(value, (None,) * value.meta["val"].dim())
                if ropes.match(root) is not None:
                    sites.append(Site(store=n.name, source=source_line(n), reason=f"store not supported: {e}"))
    for st in stores:
        root, roles, chain = walk_views(st.value, st.value_roles)
        rope = ropes.match(root)
        if rope is None:
            continue  # a v store, or a store of something that is not rotated
        k_sites.append((st, root, roles, chain, rope))
    k_stores = {id(s[0]) for s in k_sites}
    k_roots = {s[1] for s in k_sites}
    v_candidates = [st for st in stores if id(st) not in k_stores]
    used: set[Node] = set()
    for st, root, roles, chain, rope in k_sites:
        site = Site(store=st.node.name, source=source_line(st.node), layout=st.layout.value,
                    style=rope.style.value, rotary_dim=rope.rotary_dim, head_dim=rope.head_dim)
        sites.append(site)
        try:
            plan = _plan(st, root, roles, chain, rope, v_candidates, k_roots, used, order, ropes, options, site)
            _rewrite(graph, plan, options)
            used.update({plan.q_root, plan.v_store.node})
            site.fused = True
        except Unfusable as e:
            site.reason, site.disabled = str(e), isinstance(e, Disabled)
    if any(s.fused for s in sites):
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(graph)
        graph.eliminate_dead_code()
        graph.lint()
    return sites


class _RopeFinder:
    """``match_rope`` with one shared evaluator and a memo per node (q candidates are tried per site)."""

    def __init__(self):
        self._evaluators: dict[int, Evaluator] = {}  # one per head_dim (the width that bounds a leaf)
        self._memo: dict[Node, RopeMatch | None] = {}

    def match(self, node: Node) -> RopeMatch | None:
        if node not in self._memo:
            head_dim = shape_of(node)[-1] if shape_of(node) else None
            evaluator = self._evaluators.setdefault(head_dim, Evaluator(head_dim if isinstance(head_dim, int) else None))
            try:
                self._memo[node] = match_rope(node, evaluator)
            except NotRope:
                self._memo[node] = None
        return self._memo[node]


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


@dataclass
class _Plan:
    k_store: Store
    v_store: Store
    q_root: Node
    q: RopeMatch
    k: RopeMatch
    k_root: Node
    roles: tuple  # roles of the rope roots' dims
    return_k: bool
    v_src: Node
    v_roles: tuple
    cos_src: tuple = ()  # (table node, (positions node, roles) or None), from _table_source
    sin_src: tuple = ()


def _plan(st: Store, root: Node, roles, chain, rope: RopeMatch, v_candidates, k_roots, used, order,
          ropes: _RopeFinder, options: FusionOptions, site: Site) -> _Plan:
    # -- can_fuse: everything the rewrite needs to be exact --
    if root in used:
        raise Unfusable("this RoPE output is already taken by another site")
    if roles[-1] != "d" or rope.head_dim != st.head_dim:
        raise Unfusable("the stored feature dim is not the RoPE's last dim")
    kval = root.meta["val"]
    cache_val = st.cache.meta["val"]
    if kval.dtype != cache_val.dtype:
        raise Unfusable(f"k is {kval.dtype} but the cache is {cache_val.dtype} (quantised stores are not matched)")
    if rope.x.meta["val"].dtype != kval.dtype or kval.dtype not in MODEL_DTYPES:
        raise Unfusable(f"RoPE changes dtype ({rope.x.meta['val'].dtype} -> {kval.dtype})")
    named = [r for r in roles if r is not None]
    if (len(set(named)) != len(named) or not set(named) <= set(_TOKEN_MAJOR[st.layout])
            or any(r is None and not is_one(s) for r, s in zip(roles, shape_of(root)))):
        raise Unfusable(f"cannot tell token and head dims of k (dims {roles})")
    v_store = _pair_v(st, v_candidates, used, order)
    v_src, v_roles, _ = walk_views(v_store.value, v_store.value_roles)
    if v_src.meta["val"].dtype != kval.dtype:
        raise Unfusable(f"v is {v_src.meta['val'].dtype} but k is {kval.dtype}")
    q_root, q = _pair_q(root, rope, k_roots, used, order, ropes)
    roles = _complete_roles(roles, shape_of(q_root), _TOKEN_MAJOR[st.layout])
    if len(shape_of(q_root)) != len(shape_of(root)) or any(
            r != "h" and not broadcast_equal(a, b) for r, a, b in zip(roles, shape_of(q_root), shape_of(root))):
        raise Unfusable(f"q {tuple(shape_of(q_root))} and k {tuple(shape_of(root))} differ beyond the head count")
    head_dim_index = roles.index("h")
    q_heads, k_heads = shape_of(q_root)[head_dim_index], shape_of(root)[head_dim_index]
    if not (isinstance(q_heads, int) and isinstance(k_heads, int)) or q_heads % k_heads:
        raise Unfusable(f"q has {q_heads} heads, not a multiple of k's {k_heads}")
    devices = {n.meta["val"].device for n in (rope.x, q.x, v_src, st.cache, v_store.cache, st.slots)}
    if len(devices) != 1:
        raise Unfusable(f"tensors on several devices: {sorted(map(str, devices))}")
    cos_src = _table_source(rope.cos, st.layout, roles, "cos")
    sin_src = _table_source(rope.sin, st.layout, roles, "sin")
    if (cos_src[1] is None) != (sin_src[1] is None) or (cos_src[1] and cos_src[1][0] is not sin_src[1][0]):
        raise Unfusable("cos and sin are indexed by different positions")
    other_k_users = any(u not in chain and u is not st.node for n in [root, *chain] for u in n.users)
    plan = _Plan(st, v_store, q_root, q, rope, root, roles, other_k_users, v_src, v_roles, cos_src, sin_src)
    _check_acyclic(plan, [q.x, rope.x, v_src, st.slots, cos_src[0], sin_src[0],
                          *(src[1][0] for src in (cos_src, sin_src) if src[1])])

    # -- should_fuse: enabled by the config, worth it for this size --
    tokens = [s for s, r in zip(shape_of(root), roles) if r in ("t", "b", "s")]
    n_tokens = math.prod(tokens) if all(isinstance(s, int) for s in tokens) else None
    site.num_tokens = str(n_tokens) if n_tokens is not None else "dynamic"
    site.nodes = {"q_rope": q_root.name, "k_rope": root.name, "k_store": st.node.name,
                  "v_store": v_store.node.name}
    if st.layout not in options.layouts:
        raise Disabled(f"layout {st.layout.value!r} disabled by config")
    if rope.style not in options.styles:
        raise Disabled(f"RoPE style {rope.style.value!r} disabled by config")
    if n_tokens is not None and (n_tokens < options.min_tokens or (
            options.max_tokens is not None and n_tokens > options.max_tokens)):
        raise Disabled(f"{n_tokens} tokens is outside [{options.min_tokens}, {options.max_tokens}] (config)")
    return plan


def _complete_roles(roles, q_shape, wanted) -> tuple:
    """Name k's size-1 dims whose role the store did not show (one token, one kv head, batch 1).

    The head dim goes where q has more than one head; the other roles fill the remaining size-1 dims
    in order (any order is right for size-1 dims)."""
    roles = list(roles)
    free = [i for i, r in enumerate(roles) if r is None]
    missing = [w for w in wanted if w not in roles and w != "d"]
    if "h" in missing:
        if not free:
            raise Unfusable(f"cannot tell the head dim of k (dims {tuple(roles)})")
        pick = next((i for i in free if not is_one(q_shape[i])), free[0])
        roles[pick] = "h"
        free.remove(pick)
        missing.remove("h")
    for w in missing:
        if free:
            roles[free.pop(0)] = w
    return tuple(roles)


def _pair_v(st: Store, candidates, used, order) -> Store:
    """The v store: same slots and layout, another cache of the same shape and dtype, nearest in the graph."""
    same = [v for v in candidates if v.indices == st.indices and v.layout is st.layout and v.node not in used
            and v.cache is not st.cache and tuple(shape_of(v.cache)) == tuple(shape_of(st.cache))
            and v.cache.meta["val"].dtype == st.cache.meta["val"].dtype]
    if not same:
        raise Unfusable("no matching v store (same slots, same cache shape) in this graph")
    return min(same, key=lambda v: abs(order[v.node] - order[st.node]))


def _pair_q(k_root: Node, k: RopeMatch, k_roots, used, order, ropes: _RopeFinder) -> tuple[Node, RopeMatch]:
    """The q RoPE: same tables, style and rotary dim, its own input, nearest to the k RoPE."""
    found = []
    for cand in _reachable(k.cos.leaf.node, depth=24):
        if cand is k_root or cand in k_roots or cand in used or "val" not in cand.meta:
            continue
        val = cand.meta["val"]
        # compare sizes without creating shape guards (a symbolic token count must stay symbolic)
        if not isinstance(val, torch.Tensor) or val.dim() != len(shape_of(k_root)) or not (
                isinstance(val.shape[-1], int) and val.shape[-1] == k.head_dim):
            continue
        if val.dtype != k_root.meta["val"].dtype or cand not in order:
            continue
        m = ropes.match(cand)
        if m is None:
            continue
        if (m.style, m.rotary_dim, m.cos, m.sin) == (k.style, k.rotary_dim, k.cos, k.sin) and m.x is not k.x:
            found.append((cand, m))
    # keep the outermost node of each q RoPE (e.g. the cast back after an fp32 RoPE)
    outer = [(c, m) for c, m in found if not any(u is not c and m2.x is m.x and c in u.all_input_nodes
                                                 for u, m2 in found)]
    if not outer:
        raise Unfusable("no RoPE of q with the same cos/sin in this graph")
    return min(outer, key=lambda cm: abs(order[cm[0]] - order[k_root]))


def _reachable(start: Node, depth: int) -> list[Node]:
    seen, frontier, out = {start}, [start], []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    nxt.append(u)
                    out.append(u)
        frontier = nxt
    return out


def _table_source(ref: TableRef, layout: CacheLayout, roles, name: str):
    """(table node, (positions node, positions roles) or None) the kernel reads ``name`` from."""
    leaf = ref.leaf.node
    leaf_prefix = len(shape_of(leaf)) - ref.leaf.rank
    leaf_roles = tuple(roles[d] if d is not None else None for d in ref.dims)
    if any(r == "h" for r in leaf_roles):
        raise Unfusable(f"{name} varies per head")
    m = _GATHER.match(leaf)
    if m and len(m.kwargs["indices"]) == 1 and isinstance(m.kwargs["indices"][0], Node):
        table, pos = m.kwargs["table"], m.kwargs["indices"][0]
        pshape, tshape = shape_of(pos), shape_of(table)
        if len(pshape) == leaf_prefix and len(tshape) - 1 == ref.leaf.rank and all(
                isinstance(s, int) for s in tshape) and pos.meta["val"].dtype in (torch.int32, torch.int64):
            return table, (pos, leaf_roles)
    if ref.leaf.rank != 1:
        raise Unfusable(f"{name} is not a [tokens, features] tensor")
    return leaf, None


def _check_acyclic(plan: _Plan, inputs: list[Node]) -> None:
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


# ---- the rewrite -----------------------------------------------------------------------------


class _Builder:
    """Inserts nodes and fills ``meta['val']`` by running them on the fake values."""

    def __init__(self, graph: Graph, meta_from: Node):
        from torch._guards import detect_fake_mode

        self.graph = graph
        self.trace = meta_from.meta.get("stack_trace")
        vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
        self.fake_mode = detect_fake_mode(vals)

    def __call__(self, target, *args, **kwargs) -> Node:
        n = self.graph.call_function(target, args, kwargs)
        fake = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with self.fake_mode:
            n.meta["val"] = target(*fake[0], **fake[1])
        if self.trace:
            n.meta["stack_trace"] = self.trace
        return n


def _token_major(b: _Builder, x: Node, roles, wanted) -> Node:
    """View ``x`` (dims labelled by ``roles``) with dims ordered as ``wanted`` (size-1 dims added/dropped)."""
    drop = [i for i, r in enumerate(roles) if r not in wanted]
    if drop:
        x = b(aten.squeeze.dims, x, drop)
    roles = [r for r in roles if r in wanted]
    present = [w for w in wanted if w in roles]
    perm = [roles.index(w) for w in present]
    if perm != list(range(len(perm))):
        x = b(aten.permute.default, x, perm)
    for i, w in enumerate(wanted):
        if w not in present:
            x = b(aten.unsqueeze.default, x, i)
    return x


def _from_token_major(b: _Builder, x: Node, wanted, roles) -> Node:
    """Inverse of ``_token_major``: view token-major ``x`` with dims ordered as ``roles``."""
    missing = [i for i, w in enumerate(wanted) if w not in roles]
    if missing:
        x = b(aten.squeeze.dims, x, missing)
    present = [w for w in wanted if w in roles]
    target = [r for r in roles if r in present]
    perm = [present.index(r) for r in target]
    if perm != list(range(len(perm))):
        x = b(aten.permute.default, x, perm)
    for i, r in enumerate(roles):
        if r is None:
            x = b(aten.unsqueeze.default, x, i)
    return x


def _table_view(b: _Builder, ref: TableRef, source: tuple, layout: CacheLayout, roles, rotary_dim: int):
    """(cos-or-sin view for the kernel, positions node or None); ``source`` from ``_table_source``."""
    table, pos = source
    n = rotary_dim if ref.per_element else rotary_dim // 2
    if pos is not None:
        tshape = shape_of(table)
        flat = table if len(tshape) == 2 else b(aten.reshape.default, table, [tshape[0], math.prod(tshape[1:])])
        pos_node, pos_roles = pos
        wanted = ("t",) if layout is not CacheLayout.SEQUENCE else (("b", "s") if "b" in pos_roles else ("s",))
        positions = _token_major(b, pos_node, pos_roles, wanted)
    else:
        wanted = ("t", "f") if layout is not CacheLayout.SEQUENCE else ("b", "s", "f")
        leaf_roles = tuple(roles[d] if d is not None else None for d in ref.dims) + ("f",)
        flat, positions = _token_major(b, table, leaf_roles, wanted), None
    sl = b(aten.slice.Tensor, flat, -1, ref.offset, ref.offset + ref.stride * (n - 1) + 1, ref.stride)
    return sl, positions


def _x_roles(m: RopeMatch, roles) -> tuple:
    """Roles of the dims of the rotated tensor (its prefix dims follow the root's, its last is "d")."""
    return tuple(roles[d] if d is not None else None for d in m.x_dims) + ("d",)


def _rewrite(graph: Graph, p: _Plan, options: FusionOptions) -> None:
    st, layout = p.k_store, p.k_store.layout
    wanted = _TOKEN_MAJOR[layout]
    position = {n: i for i, n in enumerate(graph.nodes)}
    last_input = max((p.q.x, p.k.x, p.v_src, st.slots, p.k.cos.leaf.node, p.k.sin.leaf.node), key=position.get)
    with graph.inserting_before(last_input.next):  # keeps the inserted nodes in order
        b = _Builder(graph, st.node)
        q = _token_major(b, p.q.x, _x_roles(p.q, p.roles), wanted)
        k = _token_major(b, p.k.x, _x_roles(p.k, p.roles), wanted)
        v = _token_major(b, p.v_src, p.v_roles, wanted)
        cos, positions = _table_view(b, p.k.cos, p.cos_src, layout, p.roles, p.k.rotary_dim)
        sin, _ = _table_view(b, p.k.sin, p.sin_src, layout, p.roles, p.k.rotary_dim)
        out = b(auto_functionalized, FUSED_OP, q=q, k=k, v=v, k_cache=st.cache, v_cache=p.v_store.cache,
                slot_mapping=st.slots, cos=cos, sin=sin, positions=positions, swa_table=None, k_scale=None,
                v_scale=None, is_neox=p.k.style is RopeStyle.NEOX, rotary_dim=p.k.rotary_dim,
                layout=layout.value, return_k=p.return_k, validate=options.validate, negative_wraps=True)
        q_out, k_out, k_new, v_new = (b(operator.getitem, out, i) for i in range(4))
        p.q_root.replace_all_uses_with(_from_token_major(b, q_out, wanted, p.roles))
        if p.return_k:
            p.k_root.replace_all_uses_with(_from_token_major(b, k_out, wanted, p.roles))
        for store, new in ((st, k_new), (p.v_store, v_new)):
            if store.cache_view is not None:
                new = b(aten.reshape.default, new, list(shape_of(store.cache_view)))
            store.node.replace_all_uses_with(new)
    for store in (st, p.v_store):
        graph.erase_node(store.node)
