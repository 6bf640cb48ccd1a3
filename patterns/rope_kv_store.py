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
(``kernels/functional.py``): the graph then holds ``triton_kernel_wrapper_functional``, which Inductor
re-inplaces the same way and launches from its output code, with no Python on the hot path. A launch that
would pin a symbolic size, or whose trace writes an input other than the caches, falls back to the op.

Per site, ``can_fuse`` (is the rewrite exact? raises ``Unfusable``) and ``should_fuse`` (is it enabled
and worth it? raises ``Disabled``) are kept apart, as Inductor's ``pad_mm`` keeps ``can_pad`` and
``should_pad``. Every candidate site ends in a ``Site`` record, fused or with the reason it was not; an
unexpected exception while planning or rewriting a site leaves the graph as it was and is reported as
``internal error: <type>: <text>``.
"""

from __future__ import annotations

from torch.fx import Graph

from fx_fusion.kernels.functional import FUSED_OP, is_fused_node
from fx_fusion.patterns.canonicalize import canonicalize
from fx_fusion.patterns.complex_rope import canonicalize_complex_rope
from fx_fusion.patterns.find import KStore, find_sites
from fx_fusion.patterns.fx_utils import eliminate_dead_code, fake_mode_of, in_topological_order
from fx_fusion.patterns.mla_rewrite import can_fuse_mla, mla_site, rewrite_mla, should_fuse_mla
from fx_fusion.patterns.plan import can_fuse, should_fuse
from fx_fusion.patterns.rewrite import rewrite
from fx_fusion.patterns.site import Disabled, FusionOptions, Site, Unfusable, internal_error, source_line
from fx_fusion.patterns.splice import Tracer

__all__ = ["FUSED_OP", "FusionOptions", "Site", "fuse_rope_kv_stores", "is_fused_node"]


def fuse_rope_kv_stores(graph: Graph, options: FusionOptions = FusionOptions()) -> list[Site]:
    """Find every store of a RoPE output into a KV cache; fuse those that are safe and enabled."""
    canonicalize(graph)  # spellings reduced to the forms matched below (patterns/canonicalize.py)
    rewrites = canonicalize_complex_rope(graph)  # complex RoPE as real pairs, undone where nothing fused
    try:
        ks, state, sites = find_sites(graph)
        tracer = None
        for k in ks:
            site = _site(k)
            sites.append(site)
            try:
                plan = can_fuse(k, state)
                site.num_tokens = str(plan.num_tokens) if plan.num_tokens is not None else "dynamic"
                site.nodes = {"q_rope": plan.q_rotated.name, "k_rope": k.rope_out.name,
                              "k_store": plan.k_store.node.name, "v_store": plan.v_store.node.name,
                              **{f"{w}_norm": n.match.out.name for w, n in (("q", plan.q_norm), ("k", plan.k_norm))
                                 if n is not None}}
                site.notes = list(plan.notes)
                should_fuse(plan, options)
                tracer = tracer or Tracer(_fake_mode(graph))
                rewrite(graph, plan, options, tracer)
                state.used.update({plan.q_rotated, plan.v_store.node})
                site.fused = True
            except Unfusable as e:
                site.reason, site.disabled = str(e), isinstance(e, Disabled)
            except Exception as err:  # noqa: BLE001 (a bug in the pass must not fail the compile)
                site.reason = internal_error(k.store.node, err).reason
                state.in_order = in_topological_order(graph)  # (a failed rewrite may have left nodes out of order)
        for m in state.mla:  # MLA latent-pool rows (patterns/mla_rewrite.py)
            site = mla_site(m)
            sites.append(site)
            try:
                plan = can_fuse_mla(m, state)
                site.num_tokens = str(plan.num_tokens) if plan.num_tokens is not None else "dynamic"
                site.nodes = {"q_rope": plan.q_root.name, "k_rope": m.k_root.name, "kv_store": m.store.node.name,
                              **({"row": m.row.name} if m.row is not None else {}),
                              **({"k_pe_store": m.k_store.node.name} if m.k_store is not None else {})}
                site.notes = list(plan.notes)
                should_fuse_mla(plan, options)
                tracer = tracer or Tracer(_fake_mode(graph))
                rewrite_mla(graph, plan, options, tracer)
                state.used.add(plan.q_root)
                site.fused = True
            except Unfusable as e:
                site.reason, site.disabled = str(e), isinstance(e, Disabled)
            except Exception as err:  # noqa: BLE001
                site.reason = internal_error(m.store.node, err).reason
                state.in_order = in_topological_order(graph)
        rewrites.restore()
        if any(s.fused for s in sites):
            if not in_topological_order(graph):  # each rewrite keeps the order (splice.keep_in_order): a check
                from torch._inductor.pattern_matcher import stable_topological_sort

                stable_topological_sort(graph)
            eliminate_dead_code(graph)
        return sites
    finally:
        rewrites.restore()


def _site(k: KStore) -> Site:
    return Site(store=k.store.node.name, source=source_line(k.store.node), layout=k.store.layout.value,
                style=k.rope.style.value, rotary_dim=k.rope.rotary_dim, head_dim=k.rope.head_dim)


def _fake_mode(graph: Graph):
    """The fake mode of the graph's values (one per graph), found from its inputs."""
    mode = fake_mode_of(graph)
    if mode is None:
        raise Unfusable("the graph's inputs carry no fake values to trace the replacement with")
    return mode
