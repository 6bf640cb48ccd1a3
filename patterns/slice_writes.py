"""A buffer written slice by slice until every feature is written, rewritten as the cat of what was written (a
canonicalisation rule).

SGLang's DeepSeek attention assembles MLA's q and latent row in buffers, one feature range at a time::

    q_input = q.new_empty(T, Hq, L + R)     b = empty(...)
    q_input[..., :L] = q_nope_out           w1 = slice_scatter(b, copy(slice(b, -1, 0, L), q_nope_out), -1, 0, L)
    q_input[..., L:] = q_pe                 w2 = slice_scatter(w1, copy(slice(w1, -1, L, W), q_pe), -1, L, W)

and the latent row in the projection's own output (``k_input = latent.unsqueeze(1); k_input[..., :L] = kv_c``; the
functional graph then has ``squeeze``/``unsqueeze`` round trips between the writes). ``assemble_as_cat`` replaces
the last write ``w2`` by ``cat([q_nope_out, q_pe], -1)``, the form the MLA matcher reads (``mla_store.py``,
``mla_rewrite.py``). The two are one value: the slices cover the last dim exactly once, so no feature of the
buffer's own values is left, and ``copy(dst, src)`` is ``src`` (broadcast to the slice and converted to its dtype,
which the cat's parts do explicitly where they differ). Inductor writes the cat's parts into one new buffer: the
same bytes as the writes into the old one.

Taken only where that holds and nothing else can see the difference: the writes are ``slice_scatter``s of the last
dim, with static step-1 bounds that tile it; what lies between two writes is a chain of views that keeps the
shape (``squeeze``/``unsqueeze`` of a size-1 dim, ``view``/``reshape``: each keeps the elements' order); every
partial result (a write but the last, each view between) has one user, the next step; and the buffer is an
intermediate of the graph, not an input or a view of one (a cache written slice by slice, SGLang's two-half row
store, is ``mla_halves.py``'s, and replacing it would copy the whole cache).
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from fx_fusion.patterns.fx_utils import (Emitter, eliminate_dead_code, fake_mode_of, same_shape, shape_of,
                                        slice_bounds)

aten = torch.ops.aten

# views between two writes that keep the elements' order (checked to give the write's shape back)
_ORDER_KEEPING_VIEWS = frozenset({aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
                                  aten.view.default, aten.reshape.default, aten._unsafe_view.default})


def _behind_views(x: Node) -> tuple[Node, list[Node]]:
    """``x`` seen back through order-keeping views: (the first node that is not one, the views from ``x`` down)."""
    views, n = [], x
    while n.op == "call_function" and n.target in _ORDER_KEEPING_VIEWS and isinstance(n.args[0], Node):
        views.append(n)
        n = n.args[0]
    return n, views


def _written(src: Node) -> Node:
    """What a write's source holds: ``copy(dst, value)`` holds ``value`` (converted and broadcast to ``dst``)."""
    if src.op == "call_function" and src.target is aten.copy.default and isinstance(src.args[1], Node):
        return src.args[1]
    return src


def _is_intermediate(base: Node) -> bool:
    """Whether ``base``'s storage is the graph's own (not an input's): no input is reached through its view
    inputs."""
    from fx_fusion.patterns.canonicalize import _aliased_input

    while base.op == "call_function":
        aliased = _aliased_input(base, {})
        if aliased is None:
            return True
        base = aliased
    return False


def _writes(last: Node) -> tuple[Node, list[tuple[Node, Node, int, int]], list[Node]] | None:
    """The writes ending in ``last``: (the buffer, [(write, source, start, end)] from the last, the partial results
    and views between, from the last), or None if they are not a chain this rule takes."""
    width, shape = shape_of(last)[-1], shape_of(last)
    writes, between, w = [], [], last
    while True:
        bounds = slice_bounds(w, width)
        if bounds is None or not isinstance(w.args[1], Node):
            return None
        writes.append((w, w.args[1], *bounds))
        base, views = _behind_views(w.args[0])
        if not (base.op == "call_function" and base.target is aten.slice_scatter.default
                and same_shape(shape_of(base), shape)):
            return base, writes, between
        between += [*views, base]
        w = base


def _seen_only_by(n: Node, chain: set[Node], copies: set[Node]) -> bool:
    """Whether every user of ``n`` is in ``chain`` or reads it only for its shape: as the destination of one of
    ``copies`` (whose value is the source's), through slices and views."""
    for u in n.users:
        if u in chain:
            continue
        if u in copies and u.args[0] is n and u.args[1] is not n:
            continue
        if not (u.op == "call_function" and (u.target in _ORDER_KEEPING_VIEWS or u.target is aten.slice.Tensor)
                and _seen_only_by(u, set(), copies)):
            return False
    return True


def _tiles(writes: list, width: int) -> bool:
    """Whether the writes' ranges cover ``[0, width)`` exactly once (no empty range)."""
    spans = sorted((s, e) for _, _, s, e in writes)
    return all(s < e for s, e in spans) and spans[0][0] == 0 and spans[-1][1] == width and all(
        a[1] == b[0] for a, b in zip(spans, spans[1:]))


def _part(emit: Emitter, value: Node, shape: tuple, dtype: torch.dtype) -> Node:
    """``value`` as ``copy`` writes it into a slice of ``shape`` and ``dtype``: broadcast, then converted."""
    if not same_shape(shape_of(value), shape):
        value = emit(aten.expand.default, value, list(shape))
    if value.meta["val"].dtype != dtype:
        value = emit(torch.ops.prims.convert_element_type.default, value, dtype)
    return value


def assemble_as_cat(graph: Graph) -> int:
    """Rewrite every buffer written slice by slice over its whole last dim as the cat of the writes (module
    docstring); returns the number of writes replaced."""
    changed, fake_mode = 0, None
    consumed: set[Node] = set()
    for last in reversed(list(graph.find_nodes(op="call_function", target=aten.slice_scatter.default))):
        if last in consumed:
            continue
        found = _writes(last)
        if found is None:
            continue
        buffer, writes, between = found
        width = shape_of(last)[-1]
        if len(writes) < 2 or not _tiles(writes, width) or not _is_intermediate(buffer):
            continue
        copies = {src for _, src, _, _ in writes if _written(src) is not src}
        chain = {last, *between}
        if not all(_seen_only_by(n, chain, copies) for n in between):
            continue  # a partial result is read (the buffer seen before its last write)
        fake_mode = fake_mode or fake_mode_of(graph)
        if fake_mode is None:
            return changed
        dtype = last.meta["val"].dtype
        emit = Emitter(graph, fake_mode, [], last.meta.get("stack_trace"))
        with graph.inserting_before(last):
            parts = [_part(emit, _written(src), shape_of(src), dtype)
                     for _, src, _, _ in sorted(writes, key=lambda w: w[2])]
            cat = emit(aten.cat.default, parts, -1)
        last.replace_all_uses_with(cat)
        consumed.update(between)
        changed += len(writes)
    if changed:  # the replaced writes and what they read only for a shape: the pass takes every copy for a store
        eliminate_dead_code(graph)
    return changed
