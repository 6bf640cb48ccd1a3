"""A pool row written in two feature halves, rewritten as one row store (a canonicalisation rule).

SGLang's MLA token pool stores a token's row ``[kv_c | k_rot]`` with ``set_mla_kv_buffer``; spelled in torch, as
its fallback and model code write it, that is two stores into feature slices of the same rows::

    kv_pool[loc, :, :L] = quant(kv_c)       s1 = slice(pool, -1, 0, L);  p1 = index_put(s1, [loc], quant(kv_c))
                                            w1 = slice_scatter(pool, p1, -1, 0, L)
    kv_pool[loc, :, L:] = quant(k_rot)      s2 = slice(w1, -1, L, W);    p2 = index_put(s2, [loc], quant(k_rot))
                                            w2 = slice_scatter(w1, p2, -1, L, W)

``merge_row_halves`` replaces ``w2`` by the one-store form the MLA matcher reads (``mla_store.py``)::

    w2' = index_put(pool, [loc], quant(cat([kv_c, k_rot], -1)))

The two are one value: both write the features of the rows at ``loc`` and nothing else, with the same values.
With a slot repeated in ``loc``, eager on CPU keeps the last token's row either way; on CUDA which token's values
win is unspecified for both, and whatever the one store keeps, the two could keep as well. ``quant`` is what
each half applies alike before its store: the same elementwise ops (a division or product by the same
one-element scale, casts, a dtype view, a clamp) on both values; it is applied once, to the cat, as the
one-store form spells it. Anything else is left as it is (``mla_store.halves_reason`` reports it): the halves
must cover the row exactly, index the same rows (the same index nodes, none accumulating), have values of the
pool's dtype with the same leading sizes, and the pool between the two stores must be read by the second store
alone.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from fx_fusion.patterns.fx_utils import Emitter, fake_mode_of, shape_of, sizes_equal, slice_bounds

aten = torch.ops.aten
prims = torch.ops.prims

# elementwise ops a quantisation applies to each half; their other arguments must be the same for both halves
_ELEMENTWISE = frozenset({aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar, aten.clamp.default,
                          aten.clamp_min.default, aten.clamp_max.default, aten._to_copy.default, aten.view.dtype,
                          prims.convert_element_type.default})


def _half(w: Node) -> tuple[Node, Node, list, Node, tuple[int, int]] | None:
    """``w = slice_scatter(dest, index_put(slice(dest), indices, value))`` of the last dim: ``(dest, the slice,
    indices, value, (start, end))``, else None."""
    if w.op != "call_function" or w.target is not aten.slice_scatter.default or len(w.args) < 2:
        return None
    dest, put = w.args[0], w.args[1]
    if not (isinstance(put, Node) and put.target is aten.index_put.default and len(put.users) == 1):
        return None
    view, indices, value = put.args[:3]
    if (len(put.args) > 3 and put.args[3]) or put.kwargs.get("accumulate", False):
        return None
    if not (isinstance(view, Node) and view.target is aten.slice.Tensor and view.args[0] is dest
            and len(view.users) == 1 and isinstance(value, Node)):
        return None
    width = shape_of(dest)[-1]
    bounds = slice_bounds(view, width)
    if bounds is None or bounds != slice_bounds(w, width):
        return None
    return dest, view, list(indices), value, bounds


def _same_indices(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _leading_equal(a, b) -> bool:
    """Every size but the last equal (no guard)."""
    return len(a) == len(b) and all(sizes_equal(x, y) for x, y in zip(a[:-1], b[:-1]))


def _quant_chain(a: Node, b: Node) -> tuple[list[Node], Node, Node]:
    """The elementwise ops applied alike to both halves' values, from the values down, and what they were applied
    to: ``(ops of a's side, a0, b0)``."""
    ops = []
    while (a.op == b.op == "call_function" and a.target is b.target and a.target in _ELEMENTWISE
           and len(a.users) == 1 and len(b.users) == 1 and isinstance(a.args[0], Node) and isinstance(b.args[0], Node)
           and a.kwargs == b.kwargs and _same_rest(a.args[1:], b.args[1:])):
        ops.append(a)
        a, b = a.args[0], b.args[0]
    return ops, a, b


def _same_rest(x: tuple, y: tuple) -> bool:
    """The other arguments of one op on both halves: equal, a tensor only if it is one node of one element."""
    if len(x) != len(y):
        return False
    for u, v in zip(x, y):
        if isinstance(u, Node) or isinstance(v, Node):
            if u is not v or u.meta["val"].numel() != 1:
                return False
        elif u != v or type(u) is not type(v):
            return False
    return True


def merge_row_halves(graph: Graph) -> int:
    """Rewrite every pool row written in two feature halves as one store of the row (module docstring); returns
    the number of nodes replaced."""
    changed, fake_mode = 0, None
    for w2 in list(graph.find_nodes(op="call_function", target=aten.slice_scatter.default)):
        second = _half(w2)
        if second is None:
            continue
        w1, slice2, indices, hi, (s2, e2) = second
        first = _half(w1) if isinstance(w1, Node) else None
        if first is None or set(w1.users) != {w2, slice2}:
            continue
        pool, slice1, indices1, lo, (s1, e1) = first
        width = shape_of(pool)[-1]
        if not _same_indices(indices, indices1) or len(indices) >= len(shape_of(pool)):
            continue
        if (s1, e1, e2) == (0, s2, width):
            parts = [lo, hi]
        elif (s2, e2, e1) == (0, s1, width):
            parts = [hi, lo]
        else:
            continue
        ops, a0, b0 = _quant_chain(*parts)
        if a0.op == b0.op == "call_function" and a0.target is b0.target and a0.target in _ELEMENTWISE:
            continue  # the halves quantised unalike (two scales): reported as two halves
        va, vb = parts[0].meta["val"], parts[1].meta["val"]
        if not (va.dtype == vb.dtype == pool.meta["val"].dtype and va.dim() == vb.dim() == a0.meta["val"].dim()
                == b0.meta["val"].dim() and _leading_equal(va.shape, vb.shape)
                and _leading_equal(shape_of(a0), shape_of(b0))):
            continue
        fake_mode = fake_mode or fake_mode_of(graph)
        if fake_mode is None:
            return changed
        emit = Emitter(graph, fake_mode, [], w2.meta.get("stack_trace"))
        with graph.inserting_before(w2):
            row = emit(aten.cat.default, [a0, b0], -1)
            for op in reversed(ops):
                row = emit(op.target, row, *op.args[1:], **op.kwargs)
            store = emit(aten.index_put.default, pool, indices, row)
        replaced = [w2, w2.args[1], slice2, w1, w1.args[1], slice1]  # users before inputs
        for side in parts:  # the halves' own quantisations, each down to a0 / b0
            while side is not a0 and side is not b0:
                replaced.append(side)
                side = side.args[0]
        w2.replace_all_uses_with(store)
        for n in replaced:
            graph.erase_node(n)
        changed += 1
    return changed
