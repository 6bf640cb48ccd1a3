"""Scales of whole tensors: what counts as one (``scale_factor``), and the scales a RoPE table was multiplied by
before the RoPE reads it (``table_scales``), seen through views and casts."""

from __future__ import annotations

import torch
from torch.fx import Node

from fx_fusion.patterns.fx_utils import OpRole, ops_with

aten = torch.ops.aten


def is_number(c) -> bool:
    return isinstance(c, (int, float))


def scale_factor(c) -> float | Node | None:
    """``c`` as a scale of a whole tensor: a Python number (a float), a symbolic scalar or a 0-d tensor
    (the node itself: two scales are the same only if they are the same node); None for anything else."""
    if is_number(c) and not isinstance(c, bool):
        return float(c)
    if isinstance(c, Node):
        val = c.meta.get("val")
        if isinstance(val, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(val, bool):
            return c
        if isinstance(val, torch.Tensor) and val.dim() == 0 and val.dtype.is_floating_point:
            return c
    return None


# ops a scaled table is seen through to find its scales: views and casts of one tensor
_TABLE_VIEWS = ops_with(OpRole.RESHAPE, OpRole.UNIT_DIM, OpRole.PERMUTE, OpRole.BROADCAST, OpRole.SELECTION,
                        OpRole.SPLIT, OpRole.ALIAS, OpRole.CLONE, OpRole.CAST)
# ops a scalar is seen through to the node it is cast from (``_to_copy`` only when it changes nothing but the dtype)
_COPIES_AND_CASTS = ops_with(OpRole.ALIAS, OpRole.CLONE, OpRole.CAST)


def table_scales(node: Node) -> tuple:
    """The scales (``scale_factor``s other than 1) a table leaf was multiplied by, outermost first, seen
    through views and casts: ``(emb.cos() * 1.35).to(bf16)`` -> ``(1.35,)``; a table that was not scaled: ``()``.

    The op reads each table as the graph computes it, so a scale is exact on its own; cos and sin scaled
    differently (or only one of them) are not a RoPE, and such a site is reported instead of fused."""
    out = []
    for _ in range(64):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            break
        if node.target in _TABLE_VIEWS:
            node = node.args[0]
            continue
        if node.target not in (aten.mul.Tensor, aten.mul.Scalar):
            break
        a, b = node.args[:2]
        if (f := scale_factor(b)) is not None and isinstance(a, Node):
            node = a
        elif (f := scale_factor(a)) is not None and isinstance(b, Node):
            node = b
        else:
            break
        if f != 1.0:
            out.append(f if isinstance(f, float) else _scalar_source(f))
    return tuple(out)


def _scalar_source(node: Node) -> tuple:
    """A scalar node as (the node it is cast from, the casts): equal keys are equal values. (Dynamo passes
    a Python float attribute as a graph input under ``dynamic=True``; cos and sin each cast it to fp32.)"""
    casts = []
    while (node.op == "call_function" and node.args and isinstance(node.args[0], Node)
           and node.target in _COPIES_AND_CASTS
           and (node.target is not aten._to_copy.default or not set(node.kwargs) - {"dtype"})):
        val = node.meta.get("val")
        casts.append(val.dtype if isinstance(val, torch.Tensor) else type(val).__name__)
        node = node.args[0]
    return node, tuple(reversed(casts))
