"""Planning one site: ``can_fuse`` pairs a k store of a RoPE output with its v store and its q RoPE and checks
that one fused op computes exactly what the graph does (``Plan``, or ``Unfusable`` with the reason);
``should_fuse`` asks the options (``Disabled``). Kept apart as Inductor's ``pad_mm`` keeps ``can_pad`` and
``should_pad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg
from torch.fx import Node

from fx_fusion.kernels.fp8_rules import eager_fp8_cast
from fx_fusion.kernels.problem import MODEL_DTYPES, CacheLayout
from fx_fusion.patterns.find import GraphState, KStore
from fx_fusion.patterns.fx_utils import Role, first_downstream, is_one, shape_of, sizes_equal, within
from fx_fusion.patterns.kv_store import same_view, view_args, walk_views
from fx_fusion.patterns.mla_store import two_caches_reason
from fx_fusion.patterns.norm_plan import FusedNorm, fused_norms
from fx_fusion.patterns.quant import NotQuant, Quant, fp8_cast_of, peel_fp8
from fx_fusion.patterns.rope import RopeMatch, TableRef
from fx_fusion.patterns.site import Disabled, FusionOptions, Unfusable
from fx_fusion.patterns.store import Origin, Store

aten = torch.ops.aten
_GATHER = CallFunction(aten.index.Tensor, KeywordArg("table"), KeywordArg("indices"))

# the dims of q, k and v as the op takes them, per layout
TOKEN_MAJOR = {CacheLayout.TOKEN: (Role.TOKEN, Role.HEAD, Role.FEATURE),
                CacheLayout.PAGED: (Role.TOKEN, Role.HEAD, Role.FEATURE),
                CacheLayout.SEQUENCE: (Role.BATCH, Role.SEQ, Role.HEAD, Role.FEATURE)}
TOKEN_ROLES = (Role.TOKEN, Role.BATCH, Role.SEQ)  # the dims whose product is the token count


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
    q_root: Node  # q's RoPE output, or the norm after it (replaced by the op's q_out)
    q: RopeMatch
    k_root: Node  # k's RoPE output, or the norm after it (replaced by k_out when it has other users)
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
    q_quant: Quant | None = None  # fp8 q: how the rotated q is quantised, and the cast that the op's q_out replaces
    q_fp8: Node | None = None
    q_fp8_views: tuple = ()  # the reshapes of the rotated q before its quantisation (replayed on the op's q_out)
    q_norm: FusedNorm | None = None  # QK-norm of q / k folded into the op
    k_norm: FusedNorm | None = None
    notes: tuple = ()  # what of the site stays outside the op, and why (reported with the fused site)
    q_rope_out: Node | None = None  # q's RoPE output where q_root is the norm after it

    @property
    def q_rotated(self) -> Node:
        """q's RoPE output (taken by this site: no other site pairs with it)."""
        return self.q_rope_out if self.q_rope_out is not None else self.q_root

    @property
    def layout(self) -> CacheLayout:
        return self.k_store.layout


def can_fuse(k: KStore, state: GraphState) -> Plan:
    """The plan of an exact rewrite of the site around ``k``, or ``Unfusable`` with the reason."""
    st, root, rope = k.store, k.root, k.rope
    if root in state.used:
        raise Unfusable("this RoPE output is already taken by another site")
    if rope.deinterleave:
        raise Unfusable("the RoPE writes its GPT-J pairs de-interleaved (pairs (2i, 2i + 1) to features (i, i + R/2)):"
                        " only the MLA op computes that")
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
    wanted = TOKEN_MAJOR[st.layout]
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
    q_rope_out, q = _pair_q(k.rope_out, rope, state)
    # the op takes one dtype for q, k and v and returns q_out in it: q must be rotated in k's dtype
    for what, dtype in (("q", q.x.meta["val"].dtype), ("q's RoPE output", q_rope_out.meta["val"].dtype),
                        ("k's RoPE output", k.rope_out.meta["val"].dtype)):
        if dtype != kval.dtype:
            raise Unfusable(f"{what} is {dtype} but k is {kval.dtype}")
    roles = _complete_roles(k.roles, shape_of(q_rope_out), wanted)
    notes = []
    q_norm, k_norm = fused_norms((q_rope_out, q), (k.rope_out, rope), k.post_norm, roles, cache_val.device, state,
                                  notes)
    q_root = q_norm.match.out if q_norm is not None and q_norm.after else q_rope_out
    # q's token dims must be k's: the op takes one token count (nothing broadcasts q against k here)
    if len(shape_of(q_root)) != len(shape_of(root)) or any(
            r != Role.HEAD and not sizes_equal(a, b) for r, a, b in zip(roles, shape_of(q_root), shape_of(root))):
        raise Unfusable(f"q {tuple(shape_of(q_root))} and k {tuple(shape_of(root))} differ beyond the head count")
    head = roles.index(Role.HEAD)
    q_heads, k_heads = shape_of(q_root)[head], shape_of(root)[head]
    if not (isinstance(q_heads, int) and isinstance(k_heads, int)) or q_heads % k_heads:
        raise Unfusable(f"q has {q_heads} heads, not a multiple of k's {k_heads}")
    q_quant, q_fp8, q_fp8_views = _fp8_q(q_root, cache_val.device, notes)
    scales = [qt.scale for qt in (k_quant, v_quant, q_quant) if qt is not None and isinstance(qt.scale, Node)]
    devices = {n.meta["val"].device for n in (rope.x, q.x, v_src, st.cache, v_store.cache, st.slots, *scales)
               if n is not None}
    if len(devices) != 1:
        raise Unfusable(f"tensors on several devices: {sorted(map(str, devices))}")
    cos = _table_source(rope.cos, roles, "cos")
    sin = _table_source(rope.sin, roles, "sin")
    if (cos.positions is None) != (sin.positions is None) or cos.positions is not sin.positions:
        raise Unfusable("cos and sin are indexed by different positions")
    check_negated(rope, sin)
    chain = [*k.chain, *(k_quant.chain if k_quant is not None else ())]
    return_k = any(u not in chain and u is not st.node for n in [root, *k.chain] for u in n.users)
    tokens = [s for s, r in zip(shape_of(root), roles) if r in TOKEN_ROLES]
    num_tokens = math.prod(tokens) if all(isinstance(s, int) for s in tokens) else None
    if k_quant is not None:
        _check_quant_device(k_quant, cache_val.device)
    plan = Plan(st, v_store, q_root, q, root, rope, roles, return_k, v_src, v_roles, cos, sin, num_tokens,
                k_quant, v_quant, q_quant, q_fp8, q_fp8_views, q_norm, k_norm, tuple(notes),
                q_rope_out if q_rope_out is not q_root else None)
    # the op reads a norm's input in place of the RoPE's x (a norm after the RoPE: only its weight)
    norms = [x for n in (q_norm, k_norm) if n is not None
             for x in ((n.match.weight,) if n.after else (n.match.x, n.match.weight)) if x is not None]
    _check_acyclic(plan, [q.x, rope.x, v_src, st.slots, cos.node, sin.node, *_buffers(st, v_store), *scales,
                          *(src.positions for src in (cos, sin) if src.positions is not None), *norms], state.in_order)
    return plan


def first_of_pair(st: Store, v: Store) -> tuple[Store, Store] | None:
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
    pair = first_of_pair(st, v)
    return [pair[0].base] if pair else [st.base, v.base]


def _check_buffers(st: Store, v: Store) -> None:
    """Stores into views of buffers: one op may write both only if it can write the memory eager writes.

    Views of one stacked buffer (the second store reading the buffer the first updated) must be disjoint, e.g.
    ``kv[0, i]`` and ``kv[1, i]``, and nothing else may read the buffer between the two stores (it would see
    the k store without the v store)."""
    pair = first_of_pair(st, v)
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


def _check_quant(k_quant: Quant | None, v_store: Store, kval, state: GraphState) -> Quant | None:
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


def _check_quant_device(quant: Quant, device: torch.device, what: str = "k") -> None:
    """The fp8 cast's rounding and overflow, and the scale's division, as eager does them on ``device``."""
    try:
        eager_fp8_cast(device, quant.fp8)
    except ValueError as e:
        raise Unfusable(f"quantised {'store' if what == 'k' else what}: {e}") from None
    if device.type == "cuda" and not quant.scale_mul and isinstance(quant.scale, float):
        mantissa, _ = math.frexp(quant.scale)
        if abs(mantissa) != 0.5:  # a power of two: x / s == x * (1 / s) exactly
            raise Unfusable(f"{what} is divided by the Python number {quant.scale}, which eager CUDA computes as a "
                            "multiply by its fp32 reciprocal (not measured here); a power of two, a scale "
                            "tensor or a multiply by the reciprocal fuses")


def _fp8_q(q_root: Node, device: torch.device, notes: list) -> tuple[Quant | None, Node | None, tuple]:
    """fp8 q: when the rotated q's only users quantise it to fp8 in a way the op reproduces, (how, the cast the op's
    q_out replaces, the reshapes before it); else (None, None, ()), and the quantisation stays a kernel of its own
    (said in ``notes``)."""
    found = fp8_cast_of(q_root)
    if found is None:
        return None, None, ()
    cast, views = found
    try:
        x, quant = peel_fp8(cast)
        if x is not (views[-1] if views else q_root):
            raise NotQuant(f"{cast.name} quantises {x.name}, not the rotated q", x)
        _check_quant_device(quant, device, "q")
    except (NotQuant, Unfusable) as e:
        notes.append(f"q's fp8 quantisation {cast.name} stays a kernel of its own: {e}")
        return None, None, ()
    return quant, cast, views


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


def _pair_v(st: Store, state: GraphState) -> Store:
    """The v store: same slots and layout, another cache of the same shape and dtype, nearest in the graph."""
    same = [v for v in state.v_candidates if v.indices == st.indices and v.layout is st.layout
            and v.node not in state.used and v.cache is not st.cache
            and tuple(shape_of(v.cache)) == tuple(shape_of(st.cache))
            and v.cache.meta["val"].dtype == st.cache.meta["val"].dtype]
    if not same:
        raise Unfusable(two_caches_reason(st, state.v_candidates)
                        or "no matching v store (same slots, same cache shape) in this graph")
    return min(same, key=lambda v: abs(state.order[v.node] - state.order[st.node]))


def _pair_q(k_root: Node, k: RopeMatch, state: GraphState) -> tuple[Node, RopeMatch]:
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
    # keep the outermost node of each q RoPE (e.g. the cast back after an fp32 RoPE): compared within the RoPEs
    # of one x only (one pass over the candidates, not one per candidate)
    of_x: dict[Node, list[Node]] = {}
    for u, m2 in found:
        of_x.setdefault(m2.x, []).append(u)
    outer = [(c, m) for c, m in found if not any(u is not c and c in u.all_input_nodes for u in of_x[m.x])]
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


def check_negated(rope: RopeMatch, sin: TableSource) -> None:
    """A mirrored rotation (``TableRef.negated``) reads sin negated: per-token values, which the replacement negates
    (a few values a token); a table gathered by positions would be negated whole on every call."""
    if rope.sin.negated and sin.positions is not None:
        raise Unfusable("the rotation is mirrored (x * cos + rotate(x) * sin with rotate = (x2, -x1)) and sin is "
                        "gathered from a table by positions: the op would read the whole table negated on every call")


def _check_acyclic(plan: Plan, inputs: list[Node], in_order: bool) -> None:
    """The fused op's inputs must not depend on anything it replaces."""
    replaced = {plan.q_root, plan.k_root, plan.k_store.node, plan.v_store.node} | (
        {plan.q_fp8} if plan.q_fp8 is not None else set())
    u = first_downstream(replaced, inputs, in_order)
    if u is not None:
        raise Unfusable(f"{u.name} is both an input of the fused op and computed from the store")
