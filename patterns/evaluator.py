"""Symbolic evaluation of the last-dimension arithmetic below a node: what ``match_rope`` (``rope.py``) checks.

After AOTAutograd every RoPE spelling is a small graph of view and elementwise aten ops over the last dimension.
``Evaluator.evaluate`` runs that graph symbolically: every feature of the result becomes a polynomial in features
of its leaves (the tensor being rotated and the cos/sin tables; see ``polynomial.py``). One handler per aten op
(``@_evaluates``, as Inductor registers lowerings) computes a node's value from its inputs'; an op without one,
or a node its handler cannot evaluate, is a leaf.

Casts: an exact upcast (fp16/bf16 -> fp32/fp64, fp32 -> fp64) is looked through; any other cast starts a leaf (a
bf16 tensor made by an fp32 norm is the tensor rotated, rounded cos/sin are the tables), except on the result,
where it is recorded (``Value.rounding``) for ``match_rope`` to judge, and a rounded selection of a stored table,
which is that table read rounded. Scales: cos and sin multiplied by one factor (YaRN's ``attention_scaling``) are
tensors of their own, read as the graph computes them (``table_scales`` finds the factors).

Leading ("prefix") dimensions are tracked only to prove that each token's x meets the same token's table row
(broadcasting over heads), whatever the order of batch/token/head dimensions.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch
from torch.fx import Node

from fx_fusion.patterns.fx_utils import RESHAPES, OpRole, is_one, ops_with, sizes_equal, within
from fx_fusion.patterns.polynomial import (NotRope, Value, broadcast_features, combine, concat, poly_add, poly_mul,
                                           scaled, take)
from fx_fusion.patterns.qk_norm import computes_a_norm
from fx_fusion.patterns.scales import is_number, scale_factor, table_scales

aten = torch.ops.aten

# Casts that keep every value: looked through. Any other cast rounds (or truncates) its input.
_EXACT_CASTS = frozenset({(torch.float16, torch.float32), (torch.float16, torch.float64),
                          (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float64),
                          (torch.float32, torch.float64)})


@dataclass(frozen=True)
class Leaf:
    node: Node
    rank: int  # number of trailing dims that are its features
    round_to: torch.dtype | None = None  # the values are read rounded to this dtype (see ``_cast``)


# ---- the handler registry ------------------------------------------------------------------

_HANDLERS: dict = {}


def _evaluates(*targets):
    """Register the decorated function as the evaluator of ``targets`` (as Inductor registers lowerings).

    A handler takes a ``Step`` and returns the node's ``Value``, or ``None`` when the node is not
    evaluable (it then becomes a leaf); it may raise ``NotRope`` (same effect), never anything else.
    """

    def register(fn):
        for t in targets:
            if t in _HANDLERS:
                raise RuntimeError(f"{t} already has the evaluator {_HANDLERS[t].__name__}")
            _HANDLERS[t] = fn
        return fn

    return register


@dataclass(frozen=True)
class Step:
    """One node being evaluated: what its handler sees."""

    evaluator: Evaluator
    node: Node
    r: int  # how many trailing dims of the node are features
    depth: int  # the node's distance from the root
    result: bool  # the node reaches the root through views and exact casts only

    @property
    def args(self) -> tuple:
        return self.node.args

    def operand(self, x, r: int | None = None) -> Value:
        """An input the op computes with: a rounding cast that produced it starts a leaf."""
        return self.evaluator.evaluate(x, self.r if r is None else r, self.depth + 1)

    def source(self, x, r: int | None = None) -> Value:
        """An input the op only rearranges or casts exactly: still part of the result if this node is."""
        return self.evaluator.evaluate(x, self.r if r is None else r, self.depth + 1, result=self.result)


class Evaluator:
    """Symbolic evaluation of the last-dimension arithmetic below a node (memoised per node and rank).

    A cast that is not exact (see ``_EXACT_CASTS``) is where a tensor starts: the rounded tensor is a
    leaf, so a RoPE of a bf16 tensor made by an fp32 norm rotates the bf16 tensor, and a rounded cos/sin
    is the table. The one exception is the result: between the root and the RoPE's last arithmetic op
    (``result`` mode: views and casts only) a cast is recorded in ``Value.rounding``; ``match_rope``
    accepts only the single rounding the fused op also does.

    ``max_depth`` bounds how far below a root the evaluation goes. The deepest RoPE spelling (gpt-fast:
    upcast, reshape to pairs, select, four products, stack, flatten, cast back, under a partial-rotary
    cat and views) is under 20 ops deep from the stored node; 64 leaves room for more views and casts
    while bounding the Python recursion (a few frames per level) and the work per root, which would
    otherwise walk the whole model in front of a store. A node cut off at the limit is a leaf for that
    root only: results that depend on the cut are not memoised, so a root closer to the node sees it
    evaluated.

    ``max_features`` bounds the features of a node (the product of its trailing ``r`` dims). A RoPE's input
    has at most heads x head_dim of them (a fused qkv of 128 MHA heads of 128: 49152), but with static
    shapes a 2-D ``[tokens, width]`` tensor evaluated with ``r = 2`` has tokens x width, one polynomial each
    (a 2048-token prefill: millions per node, minutes per graph): a node with more is refused at once.
    """

    def __init__(self, head_dim: int | None = None, max_depth: int = 64, max_features: int = 65536):
        # a head_dim-wide slice of a wider last dim (GPT-NeoX's per-head fused qkv) is a tensor to
        # rotate, not a selection of features: evaluation stops there
        self.head_dim = head_dim
        self.leaves: list[Leaf] = []
        self._leaf_ids: dict[Leaf, int] = {}
        self._memo: dict[tuple[Node, int, bool], Value] = {}
        self.max_depth = max_depth
        self.max_features = max_features
        self._cut = False  # the evaluation in progress hit the depth limit somewhere below

    # ---- leaves ------------------------------------------------------------------------------
    def leaf(self, node: Node, r: int) -> Value:
        shp = _shape(node)
        if len(shp) < r or not all(isinstance(s, int) for s in shp[len(shp) - r:]):
            raise NotRope(f"{node.name} has no static feature dims")
        lid = self.leaf_id(Leaf(node, r))
        trail = tuple(shp[len(shp) - r:])
        feats = [{((lid, f),): 1.0} for f in range(math.prod(trail))]
        prefix = shp[: len(shp) - r]
        return Value(prefix, tuple(frozenset({(lid, i)}) for i in range(len(prefix))), trail, feats)

    def leaf_id(self, leaf: Leaf) -> int:
        lid = self._leaf_ids.setdefault(leaf, len(self.leaves))
        if lid == len(self.leaves):
            self.leaves.append(leaf)
        return lid

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, node, r: int, depth: int = 0, *, result: bool = False) -> Value:
        """``node``'s value with its last ``r`` dims as features; ``result``: see ``Step.result``."""
        if not isinstance(node, Node):
            raise NotRope(f"unexpected constant {node!r}")
        key = (node, r, result)
        if key in self._memo:
            return self._memo[key]
        trail = _shape(node)[-r:]
        if all(isinstance(d, int) for d in trail) and (features := math.prod(trail)) > self.max_features:
            raise NotRope(f"{node.name} has {features} features, more than any RoPE's heads x head_dim "
                          f"({self.max_features} at most)")
        if depth >= self.max_depth:
            self._cut = True
            return self.leaf(node, r)
        handler = _HANDLERS.get(node.target) if node.op == "call_function" else None
        outer_cut, self._cut = self._cut, False
        try:
            value = None
            if handler is not None and isinstance(node.meta.get("val"), torch.Tensor):
                try:
                    value = handler(Step(self, node, r, depth, result))
                except NotRope:
                    value = None
            if value is None:
                value = self.leaf(node, r)
            if not self._cut:
                self._memo[key] = value
            return value
        finally:
            self._cut = outer_cut or self._cut

    def is_head_slice(self, r: int, last: bool, width: int, full: int) -> bool:
        return r == 1 and last and self.head_dim is not None and width == self.head_dim < full


# ---- handlers: casts and copies ----------------------------------------------------------------


@_evaluates(*ops_with(OpRole.ALIAS, OpRole.CLONE))
def _copy(s: Step) -> Value | None:
    return s.source(s.args[0])


@_evaluates(*ops_with(OpRole.CAST))
def _cast(s: Step) -> Value | None:
    """Exact casts are looked through; another cast ends the evaluation (a leaf), unless it rounds the
    result, where it is recorded for ``match_rope`` to judge."""
    if s.node.target is aten._to_copy.default and set(s.node.kwargs) - {"dtype"}:
        return None
    x = s.args[0]
    src, dst = _dtype(x), _dtype(s.node)
    if src == dst or (src, dst) in _EXACT_CASTS:
        return s.source(x)
    if s.result:
        v = s.source(x)
        return replace(v, rounding=v.rounding + ((src, dst),))
    if (src, dst) in _TABLE_ROUNDINGS:
        return _rounded(s, s.operand(x), dst)
    return None


# Roundings of a selection of a tensor that the fused op can do as it reads the tensor (cos/sin cast to
# the model dtype before the multiply, as SGLang's and vLLM's ``forward_native`` do).
_TABLE_ROUNDINGS = frozenset({(torch.float32, torch.bfloat16), (torch.float32, torch.float16)})


def _is_stored(node: Node) -> bool:
    """A tensor the op can read from memory as it is: an input or buffer, or rows gathered from one (a
    table indexed by positions). A computed tensor rounded is a tensor of its own (the cast is a leaf)."""
    return node.op in ("placeholder", "get_attr") or node.target in (
        aten.index.Tensor, aten.index_select.default, aten.embedding.default)


def _rounded(s: Step, v: Value, dtype: torch.dtype) -> Value | None:
    """``v`` rounded to ``dtype``, when every feature of ``v`` is one feature of an unrounded leaf that is a
    stored tensor or a scaled table (``(rows * attention_scaling).to(bf16)``, cast once per RoPE call; a
    selection commutes with the rounding): the same features of that leaf read rounded.
    Otherwise None: the cast is a leaf, a tensor of its own (the RoPE rotates or reads it as it is)."""
    leaves = s.evaluator.leaves
    if not all(len(p) == 1 and next(iter(p.values())) == 1.0 and len(next(iter(p))) == 1 for p in v.feats):
        return None
    used = {lid for p in v.feats for ((lid, _),) in p}
    if any(leaves[lid].round_to is not None or not (_is_stored(leaves[lid].node) or table_scales(leaves[lid].node))
           for lid in used):
        return None
    new = {lid: s.evaluator.leaf_id(replace(leaves[lid], round_to=dtype)) for lid in used}
    feats = [{((new[lid], f),): 1.0} for p in v.feats for ((lid, f),) in p]
    embed = tuple(frozenset((new.get(lid, lid), d) for lid, d in e) for e in v.embed)
    return Value(v.prefix, embed, v.trail, feats, v.rounding)


# ---- handlers: arithmetic ----------------------------------------------------------------------


@_evaluates(aten.neg.default)
def _neg(s: Step) -> Value | None:
    return scaled(s.operand(s.args[0]), -1.0)


@_evaluates(aten.mul.Tensor, aten.mul.Scalar)
def _mul(s: Step) -> Value | None:
    """A product of two tensors, or a tensor times a scale (see ``scale_factor``).

    A scale of a selection of leaves (``cos * attention_scaling``: YaRN, longrope) is a tensor of its own,
    a leaf: the fused op reads it as the graph computes it, which is exact whatever the scale. A scale of
    anything else (``(x * cos) * s``, a scaled RoPE result) stays in the polynomial as a coefficient, which
    ``match_rope`` refuses with the reason: the op multiplies x by a table, it does not scale products.
    A scale of +-1 is exact anywhere and is looked through."""
    a, b = s.args[:2]
    for x, c in ((a, b), (b, a)):
        factor = scale_factor(c)
        if factor is None or not isinstance(x, Node):
            continue
        if factor in (1.0, -1.0):
            return scaled(s.operand(x), float(factor))
        v = s.operand(x)
        if _is_selection(v):
            return None  # the scaled tensor is a leaf
        if isinstance(factor, float):
            return scaled(v, factor)
        return None  # a scale we cannot carry as a coefficient: the product is a leaf
    if isinstance(a, Node) and isinstance(b, Node):
        if computes_a_norm(s.node):  # a QK-norm: its result is the tensor rotated, a leaf
            return None
        return combine(s.operand(a), s.operand(b), poly_mul)
    return None


def _is_selection(v: Value) -> bool:
    """Every feature of ``v`` is one feature of a leaf, unscaled and unrounded (views, slices, cats)."""
    return not v.rounding and all(
        len(p) == 1 and len(m := next(iter(p))) == 1 and p[m] == 1.0 for p in v.feats)


@_evaluates(aten.add.Tensor, aten.sub.Tensor)
def _add(s: Step) -> Value | None:
    a, b = s.args[:2]
    alpha = s.node.kwargs.get("alpha", 1)
    if not (isinstance(a, Node) and isinstance(b, Node) and is_number(alpha) and alpha == 1):
        return None
    sign = 1.0 if s.node.target is aten.add.Tensor else -1.0
    va, vb = s.operand(a), s.operand(b)
    if _is_selection(va) and _is_selection(vb):
        return None  # a sum of two tensors (a norm's bias, a residual) is the tensor rotated: a leaf
    return combine(va, vb, lambda p, q: poly_add(p, q, sign))


# ---- handlers: views and selections ------------------------------------------------------------


@_evaluates(aten.unsqueeze.default)
def _unsqueeze(s: Step) -> Value | None:
    out_nd = len(_shape(s.node))
    d = _dim(s.args[1], out_nd)
    if d >= out_nd - s.r:  # a new feature dim of size 1
        v = s.source(s.args[0], s.r - 1)
        pos = d - (out_nd - s.r)
        return replace(v, trail=v.trail[:pos] + (1,) + v.trail[pos:])
    v = s.source(s.args[0])
    return replace(v, prefix=v.prefix[:d] + (1,) + v.prefix[d:], embed=v.embed[:d] + (frozenset(),) + v.embed[d:])


@_evaluates(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(s: Step) -> Value | None:
    x = s.args[0]
    in_shape = _shape(x)
    dims = s.args[1] if isinstance(s.args[1], (list, tuple)) else [s.args[1]]
    dims = sorted({d for d in (_dim(d, len(in_shape)) for d in dims) if is_one(in_shape[d])})
    if any(d >= len(in_shape) - s.r for d in dims):
        return None
    v = s.source(x)
    keep = [i for i in range(len(v.prefix)) if i not in dims]
    return replace(v, prefix=tuple(v.prefix[i] for i in keep), embed=tuple(v.embed[i] for i in keep))


@_evaluates(aten.select.int)
def _select(s: Step) -> Value | None:
    in_nd = len(_shape(s.node)) + 1
    d, index = _dim(s.args[1], in_nd), s.args[2]
    first = in_nd - (s.r + 1)  # the input's first feature dim
    if d < first:
        return None
    if isinstance(s.args[0], Node) and s.args[0].target is aten.view_as_real.default and d == in_nd - 1:
        return None  # the real or imaginary part of a complex tensor (a complex RoPE's table) is a tensor of its own
    v = s.source(s.args[0], s.r + 1)
    size = v.trail[d - first]
    if not isinstance(index, int) or not -size <= index < size:
        return None
    return take(v, d - first, [index % size], squeeze=True)


@_evaluates(aten.slice.Tensor)
def _slice(s: Step) -> Value | None:
    x, out_nd = s.args[0], len(_shape(s.node))
    d = _dim(s.args[1] if len(s.args) > 1 else 0, out_nd)
    start, end, step = (list(s.args[2:]) + [None, None, 1])[:3]
    if s.node.kwargs or not all(b is None or isinstance(b, int) for b in (start, end, step)):
        return None  # a symbolic bound
    size = _shape(x)[d]
    if d < out_nd - s.r:  # a prefix dim: only the whole of it
        if start in (None, 0) and step in (None, 1) and (end is None or end >= 2**62):
            return s.source(x)
        return None
    if not isinstance(size, int) or (step is not None and step < 1):
        return None
    index = list(range(*slice(start, end, step).indices(size)))
    if s.evaluator.is_head_slice(s.r, d == out_nd - 1, len(index), size):
        return None
    return take(s.source(x), d - (out_nd - s.r), index)


@_evaluates(operator.getitem)
def _split_part(s: Step) -> Value | None:
    """One part of ``split`` / ``split_with_sizes`` along a feature dim."""
    src, i = s.args[:2]
    if not isinstance(src, Node) or src.target not in (aten.split.Tensor, aten.split_with_sizes.default):
        return None
    x, sizes = src.args[0], src.args[1]
    nd = len(_shape(x))
    d = _dim(src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0), nd)
    if d < nd - s.r:
        return None
    full = _shape(x)[d]
    if not isinstance(full, int):
        return None
    if isinstance(sizes, int):
        sizes = [sizes] * math.ceil(full / sizes) if sizes > 0 else []
    if not isinstance(sizes, (list, tuple)) or not isinstance(i, int) or not all(isinstance(z, int) and z >= 0 for z in sizes) or not 0 <= i < len(sizes):
        return None  # symbolic split sizes
    start = sum(sizes[:i])
    index = list(range(start, min(start + sizes[i], full)))
    if s.evaluator.is_head_slice(s.r, d == nd - 1, len(index), full):
        return None
    return take(s.source(x), d - (nd - s.r), index)


@_evaluates(aten.cat.default)
def _cat(s: Step) -> Value | None:
    parts, out_nd = s.args[0], len(_shape(s.node))
    d = _dim(s.args[1] if len(s.args) > 1 else 0, out_nd)
    if d < out_nd - s.r or not parts or not all(isinstance(p, Node) for p in parts):
        return None
    return concat([s.source(p) for p in parts], d - (out_nd - s.r))


@_evaluates(*RESHAPES)
def _reshape(s: Step) -> Value | None:
    """A reshape that keeps the prefix (up to size-1 dims) and regroups the feature dims."""
    src, out = _shape(s.args[0]), _shape(s.node)
    out_prefix, out_trail = out[: len(out) - s.r], out[len(out) - s.r:]
    if not all(isinstance(z, int) for z in out_trail):
        return None
    for r_in in range(0, len(src) + 1):
        in_prefix, in_trail = src[: len(src) - r_in], src[len(src) - r_in:]
        if not all(isinstance(z, int) for z in in_trail) or math.prod(in_trail) != math.prod(out_trail):
            continue
        a = [i for i, z in enumerate(in_prefix) if not is_one(z)]
        b = [i for i, z in enumerate(out_prefix) if not is_one(z)]
        # equal sizes, not merely sizes that could be equal: [s0, 8] -> [8, s0] moves data between dims
        if len(a) != len(b) or not all(sizes_equal(in_prefix[i], out_prefix[j]) for i, j in zip(a, b)):
            continue
        v = s.source(s.args[0], r_in)
        embed = [frozenset()] * len(out_prefix)
        for i, j in zip(a, b):
            embed[j] = v.embed[i]
        return replace(v, prefix=tuple(out_prefix), embed=tuple(embed), trail=tuple(out_trail))
    return None


@_evaluates(aten.expand.default)
def _expand(s: Step) -> Value | None:
    out = _shape(s.node)
    out_trail = tuple(out[len(out) - s.r:])
    if not all(isinstance(o, int) for o in out_trail):
        return None
    v = s.source(s.args[0])
    if out_trail != v.trail:
        if len(out_trail) != len(v.trail) or not all(o == i or i == 1 for o, i in zip(out_trail, v.trail)):
            return None
        v = broadcast_features(v, out_trail)
    extra = len(out) - s.r - len(v.prefix)
    if extra < 0:
        return None
    return replace(v, prefix=tuple(out[: len(out) - s.r]), embed=(frozenset(),) * extra + v.embed)


# ---- small helpers -------------------------------------------------------------------------------


def _shape(x) -> tuple:
    """Like ``shape_of``, but ``NotRope`` for anything that is not a node holding a tensor."""
    val = x.meta.get("val") if isinstance(x, Node) else None
    if not isinstance(val, torch.Tensor):
        raise NotRope(f"{x} is not a tensor")
    return tuple(val.shape)


def _dtype(x) -> torch.dtype:
    val = x.meta.get("val") if isinstance(x, Node) else None
    if not isinstance(val, torch.Tensor):
        raise NotRope(f"{x} is not a tensor")
    return val.dtype


def _dim(d, nd: int) -> int:
    if not isinstance(d, int) or not -nd <= d < nd:
        raise NotRope(f"dim {d!r} of a {nd}-d tensor")
    return d % nd


# ---- the evaluator's reach -----------------------------------------------------


def products_below(root: Node, depth: int) -> bool:
    """Whether a product of two tensors (``_mul`` on two nodes) lies within ``depth`` evaluated ops below ``root``:
    the evaluator's reach, walked without evaluating (a v store's near-miss check otherwise builds one polynomial
    per feature of its projection)."""
    def inputs(n: Node):
        return n.all_input_nodes if n.op == "call_function" and n.target in _HANDLERS else ()
    return any(n.target is aten.mul.Tensor and all(isinstance(a, Node) for a in n.args[:2])
               for n in [root, *within([root], depth, inputs)])
