"""Rewriting one planned site: the replacement traced on the site's fake values (shared between sites with the
same signature, see ``splice.py``), spliced in, and the replaced nodes redirected to it.

Every new node exists before the first ``replace_all_uses_with``; if building them fails, they are erased and the
graph is as it was. The slots a store has no tensor for (a copy into a slice, a window copy, an engine store's
indices) are made here, once per graph and rule (the layers of a model share them).
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from fx_fusion.patterns.fx_utils import same_meta, shape_of, sizes_equal
from fx_fusion.patterns.plan import Plan, first_of_pair
from fx_fusion.patterns.replacement import replacement, replacement_spec
from fx_fusion.patterns.site import FusionOptions, Unfusable
from fx_fusion.patterns.splice import Traced, Tracer, keep_in_order, splice
from fx_fusion.patterns.store import Origin, Store

aten = torch.ops.aten


def rewrite(graph: Graph, p: Plan, options: FusionOptions, tracer: Tracer) -> None:
    """Replace the site ``p`` by the fused op (see the module docstring)."""
    st = p.k_store
    spec = replacement_spec(p, options.validate)
    pair = first_of_pair(st, p.v_store)
    if Origin.VIEW in (st.origin, p.v_store.origin):
        # the caches are views of buffers (kernels/functional.py): the new buffers replace the stores' results
        k_buf, v_buf = (pair[0].base, None) if pair else (st.base, p.v_store.base)
        replaced = [(1, pair[1])] if pair else [(0, st), (1, p.v_store)]  # (output: new k or v buffer, store)
    else:
        k_buf, v_buf = st.cache, p.v_store.cache
        replaced = [(0, st), (1, p.v_store)]
    scales = [qt.scale if qt is not None and isinstance(qt.scale, Node) else None
              for qt in (p.k_quant, p.v_quant, p.q_quant)]
    # the op reads a norm's input in place of the RoPE's x, but for a norm after the RoPE
    q_x, k_x = (norm.match.x if norm is not None and not norm.after else rope.x
                for norm, rope in ((p.q_norm, p.q), (p.k_norm, p.k)))
    weights = [norm.match.weight if norm is not None else None for norm in (p.q_norm, p.k_norm)]
    inputs = [q_x, k_x, p.v_src, k_buf, v_buf, _slots(graph, st, tracer.mode), p.cos.node, p.sin.node,
              p.cos.positions, *scales, *weights]
    traced = _trace(tracer, spec, inputs, st)
    last_input = max(n for n in inputs if n is not None)  # nodes compare by their place in the graph
    anchor = last_input.next
    with graph.inserting_before(anchor):  # keeps the inserted nodes in order
        new_nodes, outputs = splice(graph, traced.gm, inputs, st.node.meta.get("stack_trace"), traced.write_backs)
    try:
        q_rot, k_rot, k_new, v_new = outputs
        if p.q_fp8_views:  # fp8 q: the graph's reshapes of the rotated q, on the op's (elementwise ops commute)
            q_rot = _replay_views(graph, q_rot, p.q_fp8_views, tracer.mode, new_nodes)
        olds = [(q_rot, p.q_fp8 if p.q_fp8 is not None else p.q_root), (k_rot, p.k_root if p.return_k else None),
                *(((k_new, v_new)[i], store.result) for i, store in replaced)]
        for new, old in olds:
            if old is not None and not (isinstance(new, Node) and same_meta(new.meta["val"], old.meta["val"])):
                raise RuntimeError(f"the replacement of {old.name} has another shape or dtype")
    except Exception:
        for n in reversed(new_nodes):
            graph.erase_node(n)
        raise
    for new, old in olds:
        if old is not None:
            old.replace_all_uses_with(new)
    keep_in_order(new_nodes, anchor)
    # the replaced stores (index_put; an engine op's outputs, then the op); a view's scatters die with them
    for n in dict.fromkeys(n for store in (st, p.v_store) for n in (store.result, store.node)):
        if not n.users:
            graph.erase_node(n)


def _replay_views(graph: Graph, x: Node, views: tuple, mode, new_nodes: list) -> Node:
    """``views`` (reshapes, outermost last) applied to ``x`` instead of their own input; the new nodes are appended
    to ``new_nodes`` (erased if the rewrite fails)."""
    for v in views:
        with graph.inserting_after(x):
            x = graph.call_function(v.target, (x, *v.args[1:]), dict(v.kwargs))
        new_nodes.append(x)
        with mode:
            x.meta["val"] = v.target(*torch.fx.node.map_arg(x.args, lambda n: n.meta["val"]), **x.kwargs)
    return x


def _trace(tracer: Tracer, spec, inputs: list, st: Store) -> Traced:
    """The replacement traced with the best launch form that traces (``Tracer.trace_best``); it writes the caches."""
    return tracer.trace_best(replacement, inputs, (3, 4), st.cache.meta["val"].device, spec.options.validate,
                             spec=spec)


def _slots(graph: Graph, st: Store, mode) -> Node:
    """The slots node of the store: its own, or one made for a window copy, a copy into a slice or an engine store."""
    if st.window is not None:
        return _window_slots(graph, st, mode)
    if st.start is not None:
        return _run_slots(graph, st, mode)
    if st.engine_slots is not None:
        return _engine_slots(graph, st, mode)
    return st.slots


def _window_slots(graph: Graph, st: Store, mode) -> Node:
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

    with mode:  # in the ops Inductor lowers (``arange`` -> ``prims.iota``), as its own ``fwd_only`` traces
        traced = make_fx(positions, decomposition_table=select_decomp_table(), tracing_mode="real")()
    top = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(top):
        _, out = splice(graph, traced, [], None)
    out.meta["fx_fusion_window_slots"] = key
    return out


def _engine_slots(graph: Graph, st: Store, mode) -> Node:
    """The slots of an engine store op's indices (``EngineSlots.slots``: its bound asserted, a skipped index moved
    past the pools), made once per graph and rule right after the indices (the layers of a model share them)."""
    key = (st.slots.name, st.engine_slots)
    for n in st.slots.users:
        if n.meta.get("fx_fusion_engine_slots") == key:
            return n
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with mode:  # in the ops Inductor lowers (``all`` -> ``logical_not(any(logical_not))``), as ``fwd_only``
        traced = make_fx(lambda indices: st.engine_slots.slots(indices), decomposition_table=select_decomp_table(),
                         tracing_mode="real")(st.slots.meta["val"])
    at = st.slots.next
    while at.op == "placeholder":
        at = at.next
    with graph.inserting_before(at):
        _, (out, inside) = splice(graph, traced, [st.slots], st.node.meta.get("stack_trace"))
        if inside is not None:
            graph.call_function(aten._assert_async.msg, (inside, st.engine_slots.message))
    out.meta["fx_fusion_engine_slots"] = key
    return out


def _run_slots(graph: Graph, st: Store, mode) -> Node:
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
    with mode:
        val = torch.ops.prims.iota.default(tokens, **{**kwargs, "start": start.meta["val"] if isinstance(start, Node)
                                                       else start})
    computed = [n for n in (start, length) if isinstance(n, Node) and n.op != "placeholder"]
    if computed:
        where = max(computed).next  # the last of them in the graph
    else:
        where = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(where):
        out = graph.call_function(torch.ops.prims.iota.default, (length,), kwargs)
    out.meta["val"] = val
    out.meta["fx_fusion_run_slots"] = key
    return out
