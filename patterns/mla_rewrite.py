"""An MLA latent-pool site (``mla_store.MlaStore``) planned and replaced by one ``fx_fusion.mla_rope_store``.

Before (functional post-grad graph; see ``mla_store.py`` for the store)::

    q_rot = rope(q_pe, cos, sin)                       # q_pe [T, Hq, R]; users: the q cat, or anything
    q     = aten.cat([q_nope_part, q_rot], -1)         # optional: [T, Hq, LQ + R] (absorbed or prefill q)
    k_rot = rope(k_pe, cos, sin)                       # users: the row cat (and, prefill, the per-head k expand)
    new   = aten.index_put(kv_pool, [loc], views(quant(aten.cat([kv_c, views(k_rot)], -1))))
    aten.copy_(kv_pool, new)

After::

    q_out, k_out, new = auto_functionalized(fx_fusion.mla_rope_store, q_pe=q_pe, q_nope=q_nope_part | None,
                                            k_pe=k_pe, kv_c=kv_c, kv_cache=kv_pool, slot_mapping=loc, cos=.., ..)
                                           # on CUDA: the kernel's traced launch (triton_kernel_wrapper_functional)
    q -> q_out (or q_rot -> q_out without the q cat);  k_rot -> k_out when it has other users;  new -> new
    aten.copy_(kv_pool, new)                           # the graph's own epilogue, unchanged

``can_fuse_mla`` checks exactness (``Unfusable`` with the reason) as ``plan.can_fuse`` does for the k/v op: one
dtype for q_pe, k_pe, kv_c and the RoPE outputs (the op rounds an fp32 result once, as the matched RoPE does;
``rope.match_rope`` refuses other roundings), the pool in that dtype or quantised to fp8 as ``quant.py`` reads it,
q's RoPE with k's tables; ``should_fuse_mla`` asks the options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from fx_fusion.kernels.functional import mla_rope_store_functional
from fx_fusion.kernels.options import MlaOptions
from fx_fusion.kernels.problem import MODEL_DTYPES
from fx_fusion.patterns.find import GraphState
from fx_fusion.patterns.fx_utils import Role, first_downstream, is_one, same_meta, shape_of, sizes_equal, within
from fx_fusion.patterns.mla_store import MlaStore, row_cat
from fx_fusion.patterns.norm_plan import x_roles
from fx_fusion.patterns.plan import (TOKEN_MAJOR, TOKEN_ROLES, TableSource, _check_quant_device, _complete_roles,
                                     _table_source, check_negated)
from fx_fusion.patterns.quant import scale_rounding
from fx_fusion.patterns.replacement import (TableView, _from_token_major, _kernel_table, _table_view,
                                            _to_token_major)
from fx_fusion.patterns.rope import RopeMatch, RopeStyle
from fx_fusion.patterns.site import Disabled, FusionOptions, Site, Unfusable, source_line
from fx_fusion.patterns.splice import Tracer, keep_in_order, splice

aten = torch.ops.aten


@dataclass
class MlaPlan:
    """Everything the rewrite of one MLA site needs, checked exact by ``can_fuse_mla``."""

    site: MlaStore
    q_root: Node  # q's RoPE output
    q: RopeMatch
    q_cat: Node | None  # ``cat([q_nope_part, q_root], -1)``, replaced by q_out (None: q_root is)
    return_k: bool
    cos: TableSource
    sin: TableSource
    num_tokens: int | None  # None when symbolic
    notes: tuple = ()
    roles: tuple | None = None  # two caches: the roles of q_root's dims (k_root's, its head dim named)

    @property
    def q_nope(self) -> Node | None:
        return self.q_cat.args[0][0] if self.q_cat is not None else None


@dataclass(frozen=True)
class MlaSpec:
    """The static part of the replacement (traces are shared between sites with equal specs and inputs)."""

    options: MlaOptions
    cos: tuple  # (offset, stride, count, per-token dims to squeeze or None for a gathered table)
    sin: tuple
    k_out_shape: tuple | None  # k_rot's shape (-1: a symbolic size) when the op's k_pe_out is viewed to it
    store_shape: tuple | None  # the index_put's shape when it writes a view of the pool
    scale_value: float | None  # a Python-number scale


def mla_site(m: MlaStore) -> Site:
    return Site(store=m.store.node.name, source=source_line(m.store.node), layout=m.store.layout.value,
                style=m.rope.style.value, rotary_dim=m.rotary_dim, head_dim=shape_of(m.store.cache)[-1],
                notes=["MLA latent-pool row [kv_c | rope(k_pe)]: torch.ops.fx_fusion.mla_rope_store"])


def can_fuse_mla(m: MlaStore, state: GraphState) -> MlaPlan:
    """The plan of an exact rewrite of the MLA site ``m``, or ``Unfusable`` with the reason."""
    if m.k_store is not None:
        return _can_fuse_two_caches(m, state)
    st, rope, k_root = m.store, m.rope, m.k_root
    dtype = _k_pe_dtype(m)
    k_x = shape_of(rope.x)
    if not _one_head(k_x) or not _one_head(shape_of(k_root)):
        raise Unfusable(f"k_pe {tuple(k_x)} / its RoPE output {tuple(shape_of(k_root))} is not [T, R] or [T, 1, R]")
    kv_c, latent = m.kv_c, m.latent_dim
    if kv_c.meta["val"].dtype != dtype:
        raise Unfusable(f"kv_c is {kv_c.meta['val'].dtype} but the rotated k_pe is {dtype}")
    if not _one_head(shape_of(kv_c)) or len(shape_of(kv_c)) != len(shape_of(m.row)):
        raise Unfusable(f"kv_c {tuple(shape_of(kv_c))} is not one row of L features per token")
    tokens = k_x[0]
    if not sizes_equal(shape_of(kv_c)[0], tokens):
        raise Unfusable(f"kv_c has {shape_of(kv_c)[0]} tokens, k_pe {tokens}")
    width = shape_of(st.cache)[-1]
    if not (isinstance(latent, int) and width == latent + rope.rotary_dim):
        raise Unfusable(f"the pool rows have {width} features, not L + R = {latent} + {rope.rotary_dim}")
    cache_dtype = st.cache.meta["val"].dtype
    if m.quant is None and cache_dtype != dtype:
        raise Unfusable(f"the row is {dtype} but the pool is {cache_dtype} (and not quantised to fp8 as the op can)")
    if m.quant is not None:
        _check_quant_device(m.quant, st.cache.meta["val"].device)
        scale = m.quant.scale
        if isinstance(scale, Node) and scale.meta["val"].device != st.cache.meta["val"].device:
            raise Unfusable(f"tensors on several devices: the scale {scale.name} on {scale.meta['val'].device}, "
                            f"the pool on {st.cache.meta['val'].device}")
    q_root, q = _pair_q(m, state, 3)
    if q.x.meta["val"].dtype != dtype or q_root.meta["val"].dtype != dtype:
        raise Unfusable(f"q_pe is rotated in {q.x.meta['val'].dtype} -> {q_root.meta['val'].dtype}, k_pe in {dtype}")
    q_shape = shape_of(q.x)
    # q_pe's dims follow its RoPE output's (x_dims: None for a size-1 dim, e.g. the tokens of a one-token decode)
    follows = len(q.x_dims) == 2 and all(d == i or (d is None and q_shape[i] == 1) for i, d in enumerate(q.x_dims))
    if len(q_shape) != 3 or not follows or not sizes_equal(q_shape[0], tokens) or not all(
            map(sizes_equal, q_shape, shape_of(q_root))):
        raise Unfusable(f"q_pe {tuple(q_shape)} and its RoPE output are not [T, Hq, R] with k_pe's T")
    roles = (Role.TOKEN,) + (Role.HEAD,) * (len(shape_of(k_root)) - 2)
    cos, sin = (_mla_table(ref, roles, name) for ref, name in ((rope.cos, "cos"), (rope.sin, "sin")))
    if cos.positions is not sin.positions:
        raise Unfusable("cos and sin are indexed by different positions")
    check_negated(rope, sin)
    q_cat = _q_cat(q_root)
    chain = set(m.k_chain) | {m.row}
    return_k = any(u not in chain for n in [k_root, *m.k_chain] for u in n.users)
    devices = {n.meta["val"].device for n in (q.x, rope.x, kv_c, st.cache, st.slots, cos.node, sin.node)}
    if len(devices) != 1:
        raise Unfusable(f"tensors on several devices: {sorted(map(str, devices))}")
    notes = ["MLA latent-pool row [kv_c | rope(k_pe)]: torch.ops.fx_fusion.mla_rope_store"]
    if q_cat is None:
        notes.append(f"q's cat with q_nope stays outside the op ({q_root.name} has users other than one "
                     "cat([q_nope, q_rot], -1))")
    if any(u not in m.chain and u is not st.node for n in [m.row, *m.chain] for u in n.users):
        notes.append(f"the row {m.row.name} is also read elsewhere: the graph keeps computing it")
    num_tokens = tokens if isinstance(tokens, int) else None
    plan = MlaPlan(m, q_root, q, q_cat, return_k, cos, sin, num_tokens, tuple(notes))
    _check_acyclic(plan, state.in_order)
    return plan


def _can_fuse_two_caches(m: MlaStore, state: GraphState) -> MlaPlan:
    """``can_fuse_mla`` for the latent and the rotated k_pe in two caches (transformers DeepseekV3, sequence layout):
    the op's ``k_pe_cache``. Every tensor is read through its dims' roles (``[B, H, S, D]`` as HF has them)."""
    st, kst, rope, k_root = m.store, m.k_store, m.rope, m.k_root
    dtype = _k_pe_dtype(m)
    wanted = TOKEN_MAJOR[st.layout]
    roles = tuple(m.roles)
    named = [r for r in roles if r is not None]
    if roles[-1] is not Role.FEATURE or len(set(named)) != len(named) or not set(named) <= set(wanted) or any(
            r is None and not is_one(n) for r, n in zip(roles, shape_of(k_root))):
        raise Unfusable(f"cannot tell the batch and sequence dims of k_pe (dims {roles})")
    latent = shape_of(m.kv_c)[-1]
    c_roles = tuple(st.value_roles)
    if m.kv_c.meta["val"].dtype != dtype:
        raise Unfusable(f"kv_c is {m.kv_c.meta['val'].dtype} but the rotated k_pe is {dtype}")
    if c_roles[-1] is not Role.FEATURE or not {r for r in c_roles if r is not None} <= set(wanted):
        raise Unfusable(f"cannot tell the dims of the latent (dims {c_roles})")
    for name, cache, width in (("latent", st.cache, latent), ("k_pe", kst.cache, rope.rotary_dim)):
        if cache.meta["val"].dtype != dtype:
            raise Unfusable(f"the {name} cache is {cache.meta['val'].dtype}, the values {dtype}")
        if shape_of(cache)[-1] != width:
            raise Unfusable(f"the {name} cache has rows of {shape_of(cache)[-1]} features, the values {width}")
    if kst.slots is not st.slots:
        raise Unfusable("the latent and the rotated k_pe are stored at different cache positions")
    q_root, q = _pair_q(m, state, len(shape_of(k_root)))
    if q.x.meta["val"].dtype != dtype or q_root.meta["val"].dtype != dtype:
        raise Unfusable(f"q_pe is rotated in {q.x.meta['val'].dtype} -> {q_root.meta['val'].dtype}, k_pe in {dtype}")
    q_roles = _complete_roles(roles, shape_of(q_root), wanted)
    if Role.HEAD not in q_roles:
        raise Unfusable(f"cannot tell q's head dim (dims {q_roles})")
    cos, sin = (_table_source(ref, q_roles, name) for ref, name in ((rope.cos, "cos"), (rope.sin, "sin")))
    if cos.positions is not sin.positions:
        raise Unfusable("cos and sin are indexed by different positions")
    check_negated(rope, sin)
    q_cat = _q_cat(q_root)
    return_k = any(u not in m.k_chain and u is not kst.node for n in [k_root, *m.k_chain] for u in n.users)
    devices = {n.meta["val"].device for n in (q.x, rope.x, m.kv_c, st.cache, kst.cache, st.slots, cos.node,
                                               sin.node)}
    if len(devices) != 1:
        raise Unfusable(f"tensors on several devices: {sorted(map(str, devices))}")
    notes = ["MLA latent and rotated k_pe in two caches (transformers DeepseekV3): torch.ops.fx_fusion.mla_rope_store"
             " with k_pe_cache"]
    if q_cat is None:
        notes.append(f"q's cat with q_nope stays outside the op ({q_root.name} has users other than one "
                     "cat([q_nope, q_rot], -1))")
    tokens = [n for r, n in zip(roles, shape_of(k_root)) if r in TOKEN_ROLES]
    num_tokens = None
    if all(isinstance(n, int) for n in tokens):
        num_tokens = 1
        for n in tokens:
            num_tokens *= n
    plan = MlaPlan(m, q_root, q, q_cat, return_k, cos, sin, num_tokens, tuple(notes), roles=q_roles)
    _check_acyclic(plan, state.in_order)
    return plan


def should_fuse_mla(plan: MlaPlan, options: FusionOptions) -> None:
    """``Disabled`` where the options turn this (exact) site off: layout, style, token thresholds."""
    layout = plan.site.store.layout
    if layout not in options.layouts:
        raise Disabled(f"layout {layout.value!r} disabled by config")
    if plan.q.style not in options.styles:
        raise Disabled(f"RoPE style {plan.q.style.value!r} disabled by config")
    n = plan.num_tokens
    if n is not None and (n < options.min_tokens or (options.max_tokens is not None and n > options.max_tokens)):
        raise Disabled(f"{n} tokens is outside [{options.min_tokens}, {options.max_tokens}] (config)")


def _k_pe_dtype(m: MlaStore) -> torch.dtype:
    """The rotated k_pe's dtype, once its RoPE is one the op computes (a model dtype throughout, every feature
    rotated), else ``Unfusable``."""
    rope, dtype = m.rope, m.k_root.meta["val"].dtype
    if dtype not in MODEL_DTYPES:
        raise Unfusable(f"the rotated k_pe is {dtype}, not a model dtype")
    if rope.x.meta["val"].dtype != dtype:
        raise Unfusable(f"k_pe's RoPE changes dtype ({rope.x.meta['val'].dtype} -> {dtype})")
    if rope.rotary_dim != rope.head_dim:
        raise Unfusable(f"k_pe's RoPE rotates {rope.rotary_dim} of its {rope.head_dim} features; the MLA op rotates "
                        "all of k_pe")
    return dtype


def _one_head(shape: tuple) -> bool:
    return len(shape) == 2 or (len(shape) == 3 and is_one(shape[1]))


def _pair_q(m: MlaStore, state: GraphState, rank: int) -> tuple[Node, RopeMatch]:
    """q_pe's RoPE (``rank`` dims): the same tables, style and width as k_pe's, another input, outermost node,
    nearest to k's."""
    k = m.rope
    found = []
    for cand in within([k.cos.leaf.node], state.ropes.max_depth, lambda n: n.users):
        val = cand.meta.get("val")
        if (not isinstance(val, torch.Tensor) or val.dim() != rank or cand not in state.order or cand is m.k_root
                or cand in state.k_roots or cand in state.used or not isinstance(val.shape[-1], int)
                or val.shape[-1] != k.head_dim):
            continue
        r = state.ropes.match(cand)
        if r is not None and (r.style, r.deinterleave, r.rotary_dim, r.cos, r.sin) == (
                k.style, k.deinterleave, k.rotary_dim, k.cos, k.sin) and r.x is not k.x:
            found.append((cand, r))
    inner = {c for c, r in found for u in c.users if any(u is c2 for c2, _ in found)}
    outer = [(c, r) for c, r in found if c not in inner]
    if not outer:
        raise Unfusable("no RoPE of q_pe with k_pe's cos/sin in this graph")
    return min(outer, key=lambda cr: abs(state.order[cr[0]] - state.order[m.k_root]))


def _q_cat(q_root: Node) -> Node | None:
    """``cat([q_nope_part, q_root], -1)`` when that is q_root's only user, q_nope_part a ``[T, Hq, LQ]`` tensor of
    q's dtype; else None."""
    if len(q_root.users) != 1:
        return None
    cat = next(iter(q_root.users))
    if not row_cat(cat) or len(cat.args[0]) != 2 or cat.args[0][1] is not q_root:
        return None
    nope = cat.args[0][0]
    if not isinstance(nope, Node) or nope.meta["val"].dtype != q_root.meta["val"].dtype:
        return None
    ns, qs = shape_of(nope), shape_of(q_root)
    if len(ns) != len(qs) or not all(map(sizes_equal, ns[:-1], qs[:-1])):
        return None
    return cat


def _mla_table(ref, roles: tuple, name: str) -> TableSource:
    src = _table_source(ref, roles, name)
    if src.positions is not None:
        if len(shape_of(src.positions)) != 1 or len(shape_of(src.node)) != 2:
            raise Unfusable(f"{name} is gathered from {tuple(shape_of(src.node))} by positions "
                            f"{tuple(shape_of(src.positions))}, not a [P, W] table by [T] positions")
    elif [r for r in src.roles if r is not None] != [Role.TOKEN, Role.FEATURE]:
        raise Unfusable(f"{name} is not a [tokens, features] tensor")
    return src


def _check_acyclic(plan: MlaPlan, in_order: bool) -> None:
    """The op's inputs must not depend on anything it replaces."""
    m = plan.site
    inputs = [plan.q.x, plan.q_nope, m.rope.x, m.kv_c, m.store.cache, m.store.slots, plan.cos.node, plan.sin.node,
              plan.cos.positions]
    if m.quant is not None and isinstance(m.quant.scale, Node):
        inputs.append(m.quant.scale)
    replaced = {plan.q_root, m.k_root, m.store.node} | ({m.k_store.node} if m.k_store is not None else set())
    if m.k_store is not None:
        inputs.append(m.k_store.cache)
    u = first_downstream(replaced, inputs, in_order)
    if u is not None:
        raise Unfusable(f"{u.name} is both an input of the fused op and computed from the site")


# ---- the replacement -----------------------------------------------------------------------------


def mla_spec(plan: MlaPlan, validate: bool) -> MlaSpec:
    m, quant = plan.site, plan.site.quant
    device = m.store.cache.meta["val"].device
    # where eager reads the scale tensor rounded to the quotient's dtype, the op rounds it as it loads it
    # (``scale_round``): the graph passes it as it is (a conversion would be a kernel of its own, launched before)
    extra = {} if quant is None else dict(fp8_dtype=quant.fp8 if quant.uint8 else None,
                                        quant_dtype=quant.quant_dtype, scale_mul=quant.scale_mul, clamp=quant.clamp,
                                        scale_round=scale_rounding(quant, device) is not None)
    options = MlaOptions(is_neox=m.rope.style is RopeStyle.NEOX, layout=m.store.layout, return_k=plan.return_k,
                         validate=validate, negative_wraps=True, table_dtype=m.rope.cos.leaf.round_to,
                         check_slots=True, check_positions=True, deinterleave=m.rope.deinterleave, **extra)

    def table(ref, src: TableSource) -> tuple:
        count = m.rotary_dim if ref.per_element else m.rotary_dim // 2
        squeeze = None if src.positions is not None else tuple(i for i, r in enumerate(src.roles) if r is None)
        return ref.offset, ref.stride, count, squeeze

    k_shape = shape_of(m.k_root)
    return MlaSpec(
        options=options, cos=table(m.rope.cos, plan.cos), sin=table(m.rope.sin, plan.sin),
        k_out_shape=tuple(s if isinstance(s, int) else -1 for s in k_shape) if plan.return_k else None,
        store_shape=tuple(shape_of(m.store.cache_view)) if m.store.cache_view is not None else None,
        scale_value=quant.scale if quant is not None and isinstance(quant.scale, float) else None)


def mla_replacement(q_pe, q_nope, k_pe, kv_c, kv_pool, slots, cos, sin, positions, k_scale=None, *, spec: MlaSpec,
                    kernel: bool):
    """What replaces an MLA site, as plain torch: ``(q_out, k_rot or None, the pool's new value)``; ``kernel``: the
    kernel's launch or the op (``kernels.functional.routes``)."""
    cos, sin = _table(cos, spec.cos), _table(sin, spec.sin)
    if spec.scale_value is not None:
        k_scale = torch.full((1,), spec.scale_value, dtype=torch.float32, device=q_pe.device)
    q_out, k_out, new, _ = mla_rope_store_functional(q_pe, q_nope, k_pe, kv_c, kv_pool, slots, cos, sin, positions,
                                                     k_scale, spec.options, kernel=kernel)
    k_rot = k_out.reshape(spec.k_out_shape) if spec.k_out_shape is not None else None
    if spec.store_shape is not None:
        new = new.reshape(spec.store_shape)
    return q_out, k_rot, new


def _table(x: torch.Tensor, view: tuple) -> torch.Tensor:
    offset, stride, count, squeeze = view
    if squeeze:
        x = x.squeeze(squeeze)
    return x[..., offset:offset + stride * (count - 1) + 1:stride]


def rewrite_mla(graph: Graph, plan: MlaPlan, options: FusionOptions, tracer: Tracer) -> None:
    """Replace the MLA site by the op (new nodes first; on a failure they are erased and the graph is as it was)."""
    if plan.site.k_store is not None:
        return rewrite_two_caches(graph, plan, options, tracer)
    m = plan.site
    st = m.store
    scale = m.quant.scale if m.quant is not None and isinstance(m.quant.scale, Node) else None
    inputs = [plan.q.x, plan.q_nope, m.rope.x, m.kv_c, st.cache, st.slots, plan.cos.node, plan.sin.node,
              plan.cos.positions, scale]
    traced = tracer.trace_best(mla_replacement, inputs, (4,), st.cache.meta["val"].device, options.validate,
                               spec=mla_spec(plan, options.validate))
    _splice_in(graph, plan, traced, inputs, st.node.meta.get("stack_trace"), [st.result], [st])


@dataclass(frozen=True)
class TwoCachesSpec:
    """The static part of a two-cache replacement: options, and the roles of every tensor's dims."""

    options: MlaOptions
    q_roles: tuple  # q_pe's, q_nope's and q_out's (as q_root's)
    k_roles: tuple  # k_pe's (the RoPE input's)
    k_out_roles: tuple | None  # k_root's, when the op returns the rotated k_pe
    c_roles: tuple  # kv_c's (the latent store's value)
    cos: TableView
    sin: TableView


def two_caches_replacement(q_pe, q_nope, k_pe, kv_c, kv_cache, k_pe_cache, slots, cos, sin, positions, *,
                           spec: TwoCachesSpec, kernel: bool):
    """What replaces a two-cache MLA site, as plain torch: views to ``[B, S, H, D]``, the op, views back. Returns
    ``(q_out as q's cat or q_root, k_rot or None, the new latent cache, the new k_pe cache)``."""
    layout = spec.options.layout
    wanted = TOKEN_MAJOR[layout]
    q_pe = _to_token_major(q_pe, spec.q_roles, wanted)
    q_nope = _to_token_major(q_nope, spec.q_roles, wanted) if q_nope is not None else None
    k_pe = _to_token_major(k_pe, spec.k_roles, wanted)
    kv_c = _to_token_major(kv_c, spec.c_roles, wanted)
    tokens = {r: n for r, n in zip(wanted, q_pe.shape) if r in TOKEN_ROLES}
    cos, positions = _kernel_table(cos, positions, spec.cos, layout, tokens)
    sin, _ = _kernel_table(sin, None, spec.sin, layout, tokens)
    q_out, k_out, new_kv, new_kp = mla_rope_store_functional(q_pe, q_nope, k_pe, kv_c, kv_cache, slots, cos, sin,
                                                             positions, None, spec.options, kernel=kernel,
                                                             k_pe_cache=k_pe_cache)
    q_out = _from_token_major(q_out, wanted, spec.q_roles)
    k_rot = _from_token_major(k_out, wanted, spec.k_out_roles) if spec.k_out_roles is not None else None
    return q_out, k_rot, new_kv, new_kp


def rewrite_two_caches(graph: Graph, plan: MlaPlan, options: FusionOptions, tracer: Tracer) -> None:
    """``rewrite_mla`` for a two-cache site: one op writes both caches."""
    m = plan.site
    st, kst, rope = m.store, m.k_store, m.rope
    q_nope = plan.q_nope
    inputs = [plan.q.x, q_nope, rope.x, m.kv_c, st.cache, kst.cache, st.slots, plan.cos.node, plan.sin.node,
              plan.cos.positions]
    opts = MlaOptions(is_neox=rope.style is RopeStyle.NEOX, layout=st.layout, return_k=plan.return_k,
                      validate=options.validate, negative_wraps=True, table_dtype=rope.cos.leaf.round_to,
                      check_slots=True, check_positions=True, deinterleave=rope.deinterleave)
    spec = TwoCachesSpec(opts, plan.roles, x_roles(rope, m.roles[:-1]),
                         tuple(m.roles) if plan.return_k else None, tuple(st.value_roles),
                         _table_view(rope.cos, plan.cos, rope.rotary_dim),
                         _table_view(rope.sin, plan.sin, rope.rotary_dim))
    traced = tracer.trace_best(two_caches_replacement, inputs, (4, 5), st.cache.meta["val"].device,
                               options.validate, spec=spec)
    _splice_in(graph, plan, traced, inputs, kst.node.meta.get("stack_trace"), [st.result, kst.result], [st, kst])


def _splice_in(graph: Graph, plan: MlaPlan, traced, inputs: list, stack_trace: str | None, new_caches: list,
               stores: list) -> None:
    """Splice ``traced`` (outputs: q_out, the rotated k_pe or None, then the new value of each cache) in after its
    last input; q's cat (or the rotated q), the rotated k_pe where the op returns it, and each store's result
    (``new_caches``) are redirected to them, then the stores left without users are erased. New nodes first: if
    an output's shape or dtype is not the node's it replaces, they are erased and the graph is as it was."""
    last_input = max(n for n in inputs if n is not None)
    anchor = last_input.next
    with graph.inserting_before(anchor):
        new_nodes, outputs = splice(graph, traced.gm, inputs, stack_trace, traced.write_backs)
    olds = [plan.q_cat if plan.q_cat is not None else plan.q_root, plan.site.k_root if plan.return_k else None,
            *new_caches]
    for n_new, old in zip(outputs, olds, strict=True):
        if old is not None and not (isinstance(n_new, Node) and same_meta(n_new.meta["val"], old.meta["val"])):
            for n in reversed(new_nodes):
                graph.erase_node(n)
            raise RuntimeError(f"the replacement of {old.name} has another shape or dtype")
    for n_new, old in zip(outputs, olds):
        if old is not None:
            old.replace_all_uses_with(n_new)
    keep_in_order(new_nodes, anchor)
    for n in dict.fromkeys(n for store in stores for n in (store.result, store.node)):
        if not n.users:
            graph.erase_node(n)
