"""Recognise rotary position embedding by what a subgraph computes, not by how it is spelled.

Model code spells RoPE many ways: ``chunk`` or slicing into halves, ``rotate_half`` with ``neg`` and
``cat``, GPT-J's strided slices with ``stack(...).flatten(-2)``, gpt-fast's ``reshape(..., -1, 2)`` and
``select``, upcasts to fp32, partial rotary with a pass-through tail. Instead of one pattern per spelling,
the evaluator (``evaluator.py``) runs the graph below a node symbolically: every feature of the result
becomes a polynomial in features of its leaves (the tensor being rotated and the cos/sin tables).
``match_rope`` (this module) then checks the polynomials against the definition:

    NeoX   out[i]     = x[i]     * cos[i] - x[i + R/2] * sin[i]
           out[i+R/2] = x[i+R/2] * cos'[i] + x[i]      * sin'[i]        (GPT-J: pairs 2i, 2i + 1)
    GPT-J pairs written de-interleaved (HF DeepSeek's ``rope_interleave``; ``RopeMatch.deinterleave``):
           out[i]     = x[2i]    * cos[i] - x[2i+1]    * sin[i],  out[i+R/2] = x[2i+1] * cos'[i] + x[2i] * sin'[i]
           out[j]     = x[j]                                            for rotary_dim <= j < head_dim

A wrong sign, swapped cos/sin, a missing term or a different table makes the match fail with a reason.
Casts: of the result, only the fused op's own rounding (fp32 -> the stored dtype) is accepted. Scales:
cos and sin multiplied by one factor (YaRN's ``attention_scaling``) are tables of their own, read as the
graph computes them; a scale on one table only, different scales, or a scale of the products is refused
with the reason. This module holds ``RopeStyle``, ``TableRef``, ``RopeMatch``, ``match_rope``, ``rope_like``
(a near miss) and the checks ``match_rope`` makes.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch
from torch.fx import Node

from fx_fusion.patterns.complex_rope import COMPLEX_TABLE
from fx_fusion.patterns.evaluator import Evaluator, Leaf, products_below
from fx_fusion.patterns.fx_utils import is_one, shape_of
from fx_fusion.patterns.polynomial import NotRope, Poly, Sym, Value
from fx_fusion.patterns.scales import table_scales

aten = torch.ops.aten


class RopeStyle(str, enum.Enum):
    """How rotary embedding pairs features: NeoX halves ``(i, i + R/2)`` or GPT-J neighbours ``(2i, 2i+1)``."""

    NEOX = "neox"
    GPTJ = "gptj"


# The dtypes the fused op reads (x, cos, sin) and stores.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TableRef:
    """Where a RoPE's cos (or sin) values live: flat feature ``offset + stride * e`` of ``leaf``.

    ``per_element``: e is the feature index (HF's duplicated cos/sin); otherwise e is the pair index.
    ``dims`` maps each prefix dim of the leaf to the rotated tensor's prefix dim it follows (None: size 1).
    """

    leaf: Leaf
    offset: int
    stride: int
    per_element: bool
    dims: tuple
    # the values enter the rotation negated (sin of NanoChat's mirrored ``rotate_half``, ``cat((x2, -x1))``: the
    # rotation by -theta); the op then reads the table negated, which is exact
    negated: bool = False


@dataclass(frozen=True)
class RopeMatch:
    """``root`` holds ``rope(x, cos, sin)``, computed in x's dtype or wider and, when wider, rounded once
    to the root's dtype (the fused op computes in fp32 and rounds once on store: exact when the root has
    x's dtype, which callers check)."""

    root: Node  # the node holding the rotated tensor
    x: Node  # the tensor being rotated (before any upcast)
    style: RopeStyle
    rotary_dim: int
    head_dim: int
    cos: TableRef
    sin: TableRef
    x_dims: tuple = ()  # for each prefix dim of x: the root's prefix dim it follows (None: size 1)
    # GPT-J pairs (2i, 2i + 1) of x written at (i, i + R/2) of the root (HF DeepSeek's rope_interleave); only
    # the MLA op computes this
    deinterleave: bool = False


# ---- the RoPE check ------------------------------------------------------------------------


def match_rope(root: Node, evaluator: Evaluator | None = None) -> RopeMatch:
    """Check that ``root`` holds RoPE of one tensor; raise ``NotRope`` with the reason otherwise."""
    ev = evaluator or Evaluator()
    v = ev.evaluate(root, 1, result=True)
    head_dim = v.trail[0]
    n_prefix = len(v.prefix)
    # the rotated tensor: a leaf that indexes every (non-1) prefix dim of the root
    used = {lid for p in v.feats for m in p for lid, _ in m}  # the evaluator also holds other roots' leaves
    xs = {lid: dims for lid in sorted(used) if ev.leaves[lid].rank == 1
          and (dims := _follows(ev, v, lid)) is not None}
    if not xs:
        raise NotRope("no single tensor is rotated")
    # With one head (MQA) a per-token table indexes the same dims as x and the polynomials are
    # symmetric in the two: prefer one that is not a complex table's part (``complex_rope``: the complex
    # multiply's operand that is not real pairs viewed as complex), then x of the root's rank, then one that is
    # not a gather, then the dtype of the result, then the leaf read at two features in one output feature (x and
    # its partner; a table is read at one). A wrong pick is still exact; it only fails to pair with q's RoPE later.
    root_dtype = root.meta["val"].dtype

    def preference(lid):
        leaf = ev.leaves[lid].node
        return (leaf.meta.get(COMPLEX_TABLE, False), len(xs[lid]) != n_prefix, leaf.target is aten.index.Tensor,
                leaf.meta["val"].dtype != root_dtype, not _paired(v, lid))

    ranked = sorted(xs, key=preference)
    if len(ranked) > 1 and preference(ranked[0]) == preference(ranked[1]):
        raise NotRope("ambiguous rotated tensor")
    x = ranked[0]
    if (dtype := ev.leaves[x].round_to) is not None:
        raise NotRope(f"the rotated tensor {ev.leaves[x].node.name} is rounded to {dtype} just before the RoPE; "
                      "the fused op rotates the tensor it reads")
    width = shape_of(ev.leaves[x].node)[-1]
    if width != head_dim:  # e.g. chunk(3, -1) of a per-head fused qkv: feature j of x is not feature j of root
        raise NotRope(f"the rotated tensor {ev.leaves[x].node.name} has {width} features, the result {head_dim} "
                      "(RoPE of a slice of a wider last dim)")

    _check_unscaled_products(v, x)

    def passthrough(j):
        return v.feats[j] == {((x, j),): 1.0}

    rot = head_dim
    while rot > 0 and passthrough(rot - 1):
        rot -= 1
    if rot == 0:
        raise NotRope("nothing is rotated")
    if rot % 2:
        raise NotRope(f"odd rotary dim {rot}")
    half = rot // 2
    partner0 = _partner(v.feats[0], x, 0)
    deinterleave = False
    if partner0 == half:
        style, pairs = RopeStyle.NEOX, [(i, i + half) for i in range(half)]
    elif partner0 == 1:
        style, pairs = RopeStyle.GPTJ, [(2 * i, 2 * i + 1) for i in range(half)]
        # HF DeepSeek's apply_rotary_pos_emb_interleave: pairs (2i, 2i + 1) written at (i, i + R/2)
        deinterleave = half > 1 and {f for m in v.feats[1] for lid, f in m if lid == x} == {2, 3}
    else:
        raise NotRope("feature 0 is not paired like NeoX or GPT-J RoPE")
    cos, sin = _tables(ev, v, x, pairs, half, deinterleave)
    if cos.per_element != sin.per_element:
        raise NotRope("cos and sin tables have different layouts")
    if cos.leaf.round_to != sin.leaf.round_to:
        raise NotRope(f"cos is read rounded to {cos.leaf.round_to}, sin to {sin.leaf.round_to}")
    if cos.leaf.node is not sin.leaf.node and (
            (cos_scale := table_scales(cos.leaf.node)) != (sin_scale := table_scales(sin.leaf.node))):
        raise NotRope(f"cos is scaled by {_describe(cos_scale)}, sin by {_describe(sin_scale)}: not a rotation "
                      "times one common factor")
    for name, ref in (("cos", cos), ("sin", sin)):
        if (dtype := ref.leaf.node.meta["val"].dtype) not in _KERNEL_DTYPES:
            raise NotRope(f"{name} is {dtype}; the fused op reads float16, bfloat16 or float32 tables")
    _check_rounding(v.rounding, root_dtype)
    return RopeMatch(root, ev.leaves[x].node, style, rot, head_dim, cos, sin, xs[x], deinterleave)


def _tables(ev: Evaluator, v: Value, x: int, pairs: list, half: int, deinterleave: bool) -> tuple[TableRef, TableRef]:
    """cos and sin of the rotation of leaf ``x`` over ``pairs``: ``o1 = x1 * c1 - x2 * s1 ; o2 = x2 * c2 + x1 * s2``,
    or the mirrored rotation (by -theta: both signs flipped, nanochat), read as sin negated."""

    def terms(sign: float) -> tuple[list, list, list, list]:
        cos1, sin1, cos2, sin2 = [], [], [], []
        for i, (e1, e2) in enumerate(pairs):
            o1, o2 = (i, i + half) if deinterleave else (e1, e2)  # the output features of the pair
            c1, s1 = _terms(v.feats[o1], x, e1, e2, -sign)
            c2, s2 = _terms(v.feats[o2], x, e2, e1, sign)
            cos1.append(c1), sin1.append(s1), cos2.append(c2), sin2.append(s2)
        return cos1, sin1, cos2, sin2

    try:
        (cos1, sin1, cos2, sin2), mirrored = terms(1.0), False
    except NotRope as e:
        try:
            (cos1, sin1, cos2, sin2), mirrored = terms(-1.0), True
        except NotRope:
            raise e from None
    firsts, seconds = [p[0] for p in pairs], [p[1] for p in pairs]
    cos = _table(ev, v, cos1, cos2, firsts, seconds, "cos")
    sin = dataclasses.replace(_table(ev, v, sin1, sin2, firsts, seconds, "sin"), negated=mirrored)
    return cos, sin


def rope_like(root: Node, evaluator: Evaluator | None = None) -> int | None:
    """Whether ``root`` multiplies tensors feature by feature, as a RoPE does (a store of it that is not a
    proven RoPE is a near miss worth a reason in the report; a raw v, or a view of one, is not): the number
    of trailing dims taken as features where it does (1, or 2 for ``[..., heads, head_dim]``), else None."""
    ev = evaluator or Evaluator()
    if not products_below(root, ev.max_depth):
        return None  # nothing to evaluate: only a product of two tensors makes a monomial of two factors
    for r in (1, 2):  # r = 2: heads split off the features after the RoPE (``[T, H*D] -> cast -> [T, H, D]``)
        if len(shape_of(root)) < r:
            break
        try:
            v = ev.evaluate(root, r, result=True)
        except NotRope:
            continue
        if any(len(monomial) == 2 for poly in v.feats for monomial in poly):
            return r
    return None


def _check_unscaled_products(v: Value, x: int) -> None:
    """Every product of x and a table has coefficient +-1: a scale after the multiply (``(x * cos) * s``,
    a scaled RoPE result) rounds differently from the scaled table the op would read (``x * (cos * s)``)."""
    for p in v.feats:
        for m, k in p.items():
            if k not in (1.0, -1.0) and len(m) == 2 and (m[0][0] == x or m[1][0] == x):
                raise NotRope(f"the products of the rotated tensor and the tables are scaled by {abs(k):g} after "
                              "the multiply ((x * cos) * s rounds differently from x * (cos * s)); the fused op "
                              "multiplies by the tables as it reads them")


def _describe(scales: tuple) -> str:
    if not scales:
        return "nothing"
    return " * ".join(f"{f:g}" if isinstance(f, float) else f"the graph's scalar {f[0].name}" for f in scales)


def _check_rounding(rounding: tuple, root_dtype: torch.dtype) -> None:
    """The result may be rounded once, from fp32 to the stored dtype, as the fused op does.

    Anything else (fp32 -> fp16 -> fp32, a cast to int or fp8 and back, two roundings) changes values
    the op would store unrounded; and a RoPE computed in fp64 rounds differently from the op's fp32
    arithmetic before its one rounding (an fp32 model: 1 ulp off in about a third of the elements)."""
    if not rounding:
        return
    (src, dst), *more = rounding
    if src is torch.float64 and not more and dst == root_dtype:
        raise NotRope(f"the RoPE is computed in float64 and rounded to {dst}; the fused op computes in fp32, "
                      "which rounds differently")
    if more or src is not torch.float32 or dst != root_dtype or dst not in _KERNEL_DTYPES:
        casts = " -> ".join(str(d) for d in (src, *(d for _, d in rounding)))
        raise NotRope(f"the RoPE result is cast {casts} before it is stored as {root_dtype}; the fused op "
                      "rounds an fp32 result once, to the stored dtype")


def _follows(ev: Evaluator, v: Value, lid: int) -> tuple | None:
    """For each prefix dim of leaf ``lid``, the root prefix dim it indexes along (None for size-1 dims),
    if the leaf covers every non-1 root dim exactly once; else None."""
    shp = shape_of(ev.leaves[lid].node)
    dims = []
    for j in range(len(shp) - 1):
        if is_one(shp[j]):
            dims.append(None)
            continue
        hits = [i for i, e in enumerate(v.embed) if (lid, j) in e]
        if len(hits) != 1:
            return None
        dims.append(hits[0])
    covered = set(d for d in dims if d is not None)
    if len(covered) != len([d for d in dims if d is not None]):
        return None
    if any(i not in covered for i in range(len(v.prefix)) if not is_one(v.prefix[i])):
        return None
    return tuple(dims)


def _paired(v: Value, lid: int) -> bool:
    """Whether some output feature reads leaf ``lid`` at two features (as a RoPE reads x and its partner)."""
    return any(len({f for m in p for leaf, f in m if leaf == lid}) > 1 for p in v.feats)


def _partner(p: Poly, x: int, j: int) -> int | None:
    for m in p:
        for lid, f in m:
            if lid == x and f != j:
                return f
    return None


def _terms(p: Poly, x: int, own: int, other: int, other_sign: float) -> tuple[Sym, Sym]:
    """Split ``x[own]*C + other_sign*x[other]*S`` into the table symbols (C, S)."""
    if len(p) != 2:
        raise NotRope(f"feature {own} is not a two-term rotation")
    c = s = None
    for m, k in p.items():
        if len(m) != 2 or (m[0][0] == x) == (m[1][0] == x):
            raise NotRope(f"feature {own} is not x times a table")
        xs, rest = (m[0], m[1]) if m[0][0] == x else (m[1], m[0])  # x's symbol, the table's
        if xs[1] == own and k == 1.0:
            c = rest
        elif xs[1] == other and k == other_sign:
            s = rest
    if c is None or s is None:
        raise NotRope(f"feature {own} has the wrong signs or partners for a rotation")
    return c, s


def _table(ev: Evaluator, v: Value, first: list[Sym], second: list[Sym], e1: list[int], e2: list[int],
           name: str) -> TableRef:
    lids = {s[0] for s in first + second}
    if len(lids) != 1:
        raise NotRope(f"{name} values come from several tensors")
    lid = lids.pop()
    a, b = [s[1] for s in first], [s[1] for s in second]
    offset = a[0]
    if a == b:  # one value per pair
        stride = a[1] - a[0] if len(a) > 1 else 1
        per_element = False
        ok = stride > 0 and all(f == offset + stride * i for i, f in enumerate(a))
    else:  # one value per feature: first at e1, second at e2
        offset = a[0] - e1[0]
        stride = ((b[0] - a[0]) // (e2[0] - e1[0])) if (e2[0] - e1[0]) else 0
        offset = a[0] - stride * e1[0]
        per_element = True
        ok = stride > 0 and all(f == offset + stride * e for f, e in zip(a + b, e1 + e2))
    if not ok:
        raise NotRope(f"{name} values are not a strided row of one table")
    leaf = ev.leaves[lid]
    leaf_prefix = len(shape_of(leaf.node)) - leaf.rank
    dims = []
    for j in range(leaf_prefix):
        if is_one(shape_of(leaf.node)[j]):
            dims.append(None)
            continue
        hits = [i for i, e in enumerate(v.embed) if (lid, j) in e]
        if len(hits) != 1:
            raise NotRope(f"{name} does not follow one dim of the rotated tensor")
        dims.append(hits[0])
    return TableRef(leaf, offset, stride, per_element, tuple(dims))
