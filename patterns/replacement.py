"""What replaces a site, as plain torch (``replacement``), and its static description (``ReplacementSpec``,
built from a ``Plan`` by ``replacement_spec``): views of q, k and v to the token-major form the op takes, the
fused op in functional form (``kernels/functional.py``), views back to the graph's shapes.

``rewrite.py`` traces ``replacement`` on a site's fake values and splices the trace into the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fx_fusion.kernels.functional import rope_kv_store_functional
from fx_fusion.kernels.options import CacheLayout, RopeKVOptions
from fx_fusion.patterns.fx_utils import Role, is_one, shape_of
from fx_fusion.patterns.norm_plan import FusedNorm, x_roles
from fx_fusion.patterns.plan import TOKEN_MAJOR, TOKEN_ROLES, Plan, TableSource
from fx_fusion.patterns.quant import scale_rounding
from fx_fusion.patterns.rope import RopeMatch, RopeStyle, TableRef
from fx_fusion.patterns.store import Origin, Store


@dataclass(frozen=True)
class TableView:
    """How ``replacement`` turns a ``TableSource`` into the kernel's cos/sin: features ``offset, offset +
    stride, ...`` (``count`` of them) of a table gathered by positions, or of per-token values."""

    roles: tuple  # of the positions' dims (table) or of the per-token tensor's dims (last: FEATURE)
    indexed: bool  # a table read through positions
    offset: int
    stride: int
    count: int
    negated: bool = False  # the values negated (``TableRef.negated``; per-token values only)


@dataclass(frozen=True)
class ReplacementSpec:
    """The static part of a site's replacement (everything but the tensors): with the launch form (``kernel``),
    it determines the traced replacement, so sites with equal specs and input metadata share one trace."""

    options: RopeKVOptions  # the op's non-tensor arguments
    q_roles: tuple  # roles of the dims of q, k, v as they enter the op's replacement (after the reshapes below)
    k_roles: tuple
    v_roles: tuple
    out_roles: tuple  # roles of the RoPE outputs' dims (what q_out and k_out are viewed back to)
    cos: TableView
    sin: TableView
    k_store_shape: tuple | None  # the shape of the store's target when it is a view of the cache
    v_store_shape: tuple | None
    v_heads: tuple | None = None  # (Hkv, D): v arrives as an engine's [T, Hkv*D] rows
    scale_values: tuple = (None, None, None)  # k's, v's and q's scales where the graph has them as Python numbers
    # the dtype the graph converts each scale tensor to before the op (where eager rounds it, ``quant.scale_rounding``,
    # and the op's ``scale_round`` / ``q_scale_round`` cannot: ``_scale_reads``)
    scale_roundings: tuple = (None, None, None)
    # caches that are views of buffers: ``(op, args)`` of each view from the buffer down (see kernels/functional.py)
    k_views: tuple | None = None
    v_views: tuple | None = None
    # a QK-norm's [T*H, D] input reshaped to the RoPE's x (``FusedNorm.reshape``), for q and k; None: as it is
    q_reshape: tuple | None = None
    k_reshape: tuple | None = None


def replacement_spec(p: Plan, validate: bool) -> ReplacementSpec:
    """The replacement of the planned site ``p``."""
    st, v_st = p.k_store, p.v_store
    quants = (p.k_quant, p.v_quant, p.q_quant)
    views = Origin.VIEW in (st.origin, v_st.origin)
    scale_round, q_scale_round, roundings = _scale_reads(quants, st.cache.meta["val"].device)
    return ReplacementSpec(
        options=_options(p, validate, scale_round, q_scale_round), q_roles=_input_roles(p.q, p.q_norm, p.roles),
        k_roles=_input_roles(p.k, p.k_norm, p.roles),
        v_roles=p.v_roles, out_roles=p.roles, cos=_table_view(p.k.cos, p.cos, p.k.rotary_dim),
        sin=_table_view(p.k.sin, p.sin, p.k.rotary_dim),
        k_store_shape=tuple(shape_of(st.cache_view)) if st.cache_view is not None else None,
        v_store_shape=tuple(shape_of(v_st.cache_view)) if v_st.cache_view is not None else None,
        v_heads=tuple(shape_of(v_st.cache)[1:]) if v_st.flat_value else None,
        scale_values=tuple(qt.scale if qt is not None and isinstance(qt.scale, float) else None for qt in quants),
        scale_roundings=roundings,
        k_views=_view_ops(st) if views else None, v_views=_view_ops(v_st) if views else None,
        q_reshape=p.q_norm.reshape if p.q_norm is not None else None,
        k_reshape=p.k_norm.reshape if p.k_norm is not None else None)


def _scale_reads(quants: tuple, device: torch.device) -> tuple[bool, bool, tuple]:
    """``(scale_round, q_scale_round, roundings)``: how the op reads k's, v's and q's scales as eager does (``quants``:
    their ``Quant`` or None). Where eager rounds a scale tensor to the quotient's dtype (``quant.scale_rounding``)
    the op rounds it as it loads it (the options), so the graph passes the scale as it is: a conversion in the graph
    is a kernel of its own per scale, launched before the op. ``roundings``: the conversions left to the graph."""
    reads = [scale_rounding(qt, device) if qt is not None else None for qt in quants]
    # k and v share scale_round: it is set where every scale of theirs (a tensor or a Python number, which the op
    # gets as an fp32 tensor and must read as it is) is read rounded to the one quotient dtype they share
    scaled = [r for qt, r in zip(quants[:2], reads[:2]) if qt is not None and qt.scale is not None]
    scale_round = quants[0] is not None and bool(scaled) and None not in scaled
    q_scale_round = reads[2] is not None
    # k and v disagree (one scale rounded, the other not: ``s * k`` and ``v * s`` on CPU, or a Python-number scale
    # beside a tensor): only then does the graph still convert the rounded one, as eager reads it
    roundings = (None, None, None) if scale_round else (*reads[:2], None)
    return scale_round, q_scale_round, roundings


def _options(p: Plan, validate: bool, scale_round: bool = False, q_scale_round: bool = False) -> RopeKVOptions:
    """The op's options for the site: slots and positions count from the end when negative, as the graph's indexing
    does, and one out of range fails the call as eager's store would (``check_slots``); not for slots the pass made
    with a past-the-cache marker (a window copy, an engine's skipped index). Positions are always the graph's. The
    scales are read as eager reads them (``_scale_reads``)."""
    st, quant, qq = p.k_store, p.k_quant, p.q_quant
    extra = {} if quant is None else dict(fp8_dtype=quant.fp8 if quant.uint8 else None, quant_dtype=quant.quant_dtype,
                                        scale_mul=quant.scale_mul, clamp=quant.clamp, scale_round=scale_round)
    if qq is not None:
        extra.update(q_fp8_dtype=qq.fp8, q_quant_dtype=qq.quant_dtype, q_scale_mul=qq.scale_mul, q_clamp=qq.clamp,
                     q_scale_round=q_scale_round)
    norm = p.q_norm or p.k_norm
    if norm is not None:  # q's and k's constants agree (plan._fused_norms)
        extra.update(q_norm=p.q_norm is not None, k_norm=p.k_norm is not None, norm_eps=norm.match.eps,
                     norm_offset=norm.match.offset, norm_round=norm.match.round_before_weight,
                     norm_full_width=norm.match.heads > 1, norm_after_rope=norm.after)
    return RopeKVOptions(
        is_neox=p.k.style is RopeStyle.NEOX, rotary_dim=p.k.rotary_dim, layout=p.layout, return_k=p.return_k,
        validate=validate, negative_wraps=True, table_dtype=p.k.cos.leaf.round_to,
        check_slots=st.window is None and st.engine_slots is None, check_positions=True, **extra)


def _view_ops(store: Store) -> tuple:
    """``(op, args)`` of each view from the store's buffer down to its cache, outermost first."""
    if store.view_ops is not None:
        return store.view_ops
    return tuple((v.target, tuple(v.args[1:])) for v in store.views)


def replacement(q, k, v, k_cache, v_cache, slots, cos, sin, positions, k_scale=None, v_scale=None, q_scale=None,
                q_norm_weight=None, k_norm_weight=None, *, spec: ReplacementSpec, kernel: bool):
    """What replaces a site, as plain torch: views to token-major, one fused op, views back. ``kernel``: the op's
    form (``kernels.functional.routes``); ``k_cache``/``v_cache`` are the buffers when ``spec`` has views.

    Returns ``(q_rot, k_rot or None, new k cache, new v cache)``: the values of the RoPE outputs (q's fp8 cast for
    fp8 q) and of the two ``index_put`` nodes. Sizes stay symbolic: the only branches are on static sizes.
    """
    layout = spec.options.layout
    wanted = TOKEN_MAJOR[layout]
    if spec.v_heads is not None:
        v = v.unflatten(-1, spec.v_heads)
    q, k = (x if shape is None else x.reshape(shape) for x, shape in ((q, spec.q_reshape), (k, spec.k_reshape)))
    q, k, v = (_to_token_major(x, roles, wanted) for x, roles in
               ((q, spec.q_roles), (k, spec.k_roles), (v, spec.v_roles)))
    tokens = {r: s for r, s in zip(wanted, q.shape) if r in TOKEN_ROLES}
    cos, positions = _kernel_table(cos, positions, spec.cos, layout, tokens)
    sin, _ = _kernel_table(sin, None, spec.sin, layout, tokens)  # cos and sin share the positions
    k_scale, v_scale, q_scale = _scales(spec, (k_scale, v_scale, q_scale), q.device)
    q_out, k_out, k_new, v_new = rope_kv_store_functional(
        q, k, v, k_cache, v_cache, slots, cos, sin, positions, k_scale, v_scale, q_scale, spec.options, kernel=kernel,
        k_views=spec.k_views, v_views=spec.v_views, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    q_rot = _from_token_major(q_out, wanted, spec.out_roles)
    k_rot = _from_token_major(k_out, wanted, spec.out_roles) if spec.options.return_k else None
    if spec.k_store_shape is not None:
        k_new = k_new.reshape(spec.k_store_shape)
    if spec.v_store_shape is not None:
        v_new = v_new.reshape(spec.v_store_shape)
    return q_rot, k_rot, k_new, v_new


def _scales(spec: ReplacementSpec, scales: tuple, device) -> tuple:
    """The scales the op reads. A scale the graph holds as a Python number: the fp32 value eager computes with; a
    scale tensor: as it is, which the op reads rounded where eager rounds it (``scale_round``), or, where the op's
    options cannot say so (``_scale_reads``), converted to the quotient's dtype here (a bf16 tensor the op reads
    exactly; Inductor would drop a round trip back to fp32)."""
    return tuple(torch.full((1,), value, dtype=torch.float32, device=device) if value is not None
                 else None if scale is None else _convert(scale, rounding)
                 for scale, value, rounding in zip(scales, spec.scale_values, spec.scale_roundings))


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
    table = table[..., view.offset:view.offset + view.stride * (view.count - 1) + 1:view.stride]
    return (-table if view.negated else table), positions


def _broadcast_tokens(x: torch.Tensor, roles, tokens: dict) -> torch.Tensor:
    """Expand size-1 token/sequence dims of ``x`` to q's (a branch on static sizes only: no guards)."""
    sizes = [tokens[r] if r in (Role.TOKEN, Role.SEQ) and is_one(s) and not is_one(tokens[r]) else -1
             for r, s in zip(roles, x.shape)]
    return x.expand(sizes) if any(s != -1 for s in sizes) else x


def _input_roles(m: RopeMatch, norm: FusedNorm | None, roles) -> tuple:
    """Roles of the dims of what the op reads for q or k: the RoPE's input, or the input of the norm before it."""
    return norm.roles if norm is not None else x_roles(m, roles)


def _table_view(ref: TableRef, src: TableSource, rotary_dim: int) -> TableView:
    count = rotary_dim if ref.per_element else rotary_dim // 2
    return TableView(src.roles, src.positions is not None, ref.offset, ref.stride, count, ref.negated)
