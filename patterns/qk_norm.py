"""QK-norm: the RMSNorm per head that Qwen3, Gemma 3 and 4 and OLMo 2 apply to q and k before the RoPE.

Before (functional post-grad graph; ``x`` in the model dtype, ``x.float()`` absent in fp32 models)::

    xf = prims.convert_element_type(x, fp32)
    y  = aten.mul.Tensor(xf, aten.rsqrt(aten.add(aten.mean.dim(aten.pow(xf, 2), [-1], True), eps)))
    y  = prims.convert_element_type(y, x.dtype)      # optional: rounded before the weight (HF Llama/Qwen3)
    y  = aten.mul.Tensor(y, w | w.float() + offset)   # optional: the weight, [D] (Gemma: offset 1.0)
    out = prims.convert_element_type(y, x.dtype)     # the result in x's dtype
    rope_x = permute / reshape / unsqueeze (out)      # D stays the last dim, unsplit

After: a ``NormMatch`` naming x, the weight, eps and offset, and where the graph rounds to x's dtype, which
the fused kernel reproduces per row of D features in fp32::

    y = x * rsqrt(sum(x^2) / D + eps); [y = round(y)]; [y = y * (w + offset)]; out = round(y)

The rsqrt may be spelled ``pow(s, -0.5)`` (Gemma 4), which eager computes as an rsqrt.

Only graphs that round where this formula rounds are accepted (a bf16 * bf16 product is the fp32 product
rounded once, as the fp32 product of two bf16 values is exact); the order of the mean's sum is free. Any other
graph raises ``NotNorm`` with the reason, recorded for the report: a norm computed in bf16, a weight rounded
before the multiply, a tensor eps, ``max(var, eps)``, a bias, a mean over other dims, a view between the norm and
the RoPE that moves features.

OLMo 2 normalises the whole projection, ``H * D`` features with a ``[H * D]`` weight, and splits it into heads
after the norm: matched with ``heads = H`` (the op's ``norm_full_width``).

HunYuan (with a weight) and Llama 4 (without) apply the norm after the RoPE instead: the same ``NormMatch``, of the
rotated tensor (``x`` is the RoPE's output), found from the stored value (``normalised_input``) or from the
rotated q (``find_norm_after``); the op's ``norm_after_rope``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from fx_fusion.kernels.problem import MODEL_DTYPES
from fx_fusion.patterns.fx_utils import RESHAPES, OpRole, ops_with, shape_of, sizes_equal, within

aten = torch.ops.aten
_FP32 = torch.float32
_VIEWS = ops_with(OpRole.RESHAPE, OpRole.UNIT_DIM, OpRole.PERMUTE, OpRole.ALIAS, OpRole.CLONE)
_CASTS = ops_with(OpRole.CAST)
_ADDS = (aten.add.Tensor, aten.add.Scalar)
_MAXIMA = (aten.maximum.default, aten.clamp_min.default, aten.clamp.default)


class NotNorm(Exception):
    """The tensor a RoPE rotates is not an RMSNorm the fused kernel reproduces; the message says why."""


@dataclass(frozen=True)
class NormMatch:
    """``out`` holds ``RMSNorm(x)`` over the last dim, as the kernel computes it (see the module docstring)."""

    out: Node  # the node holding the normalised tensor, in x's dtype (what the views lead to)
    x: Node  # the tensor normalised (model dtype, before any upcast)
    weight: Node | None  # the [D] weight, a graph input (placeholder or get_attr), or None (no weight)
    eps: float  # as the graph adds it to the fp32 mean (1e-6, or float32(1e-6) from F.rms_norm's C++ path: one fp32)
    offset: float  # 0.0: y * w ; 1.0: Gemma's y * (1 + w)
    round_before_weight: bool  # y is rounded to x's dtype before the weight multiply
    weight_dtype: torch.dtype | None  # the dtype of the weight's values (upcasts to fp32 are exact), None: no weight
    views: tuple = ()  # the view nodes from ``out`` to the RoPE's x, in order
    heads: int = 1  # 1: a norm per head; H: one norm over the H heads' features, split into heads after (OLMo 2)


def _dtype(n: Node) -> torch.dtype:
    return n.meta["val"].dtype


def _call(n, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def _upcast_source(n: Node) -> Node:
    """``n`` without its exact casts (to the same dtype, or from bf16/fp16 to fp32)."""
    while _call(n, *_CASTS) and (_dtype(n) == _dtype(n.args[0])
                                 or (_dtype(n) == _FP32 and _dtype(n.args[0]) in (torch.bfloat16, torch.float16))):
        n = n.args[0]
    return n


def _is_rsqrt(n) -> bool:
    """``rsqrt(s)``, or ``pow(s, -0.5)`` (Gemma 4's spelling; eager computes it as rsqrt on CPU and CUDA)."""
    return _call(n, aten.rsqrt.default) or (_call(n, aten.pow.Tensor_Scalar) and n.args[1] == -0.5)


def _is_normalised(n) -> bool:
    """``n`` is a product with an rsqrt operand (the normalised value, checked in full by ``_normalised``)."""
    return _call(n, aten.mul.Tensor) and any(_is_rsqrt(a) for a in n.args)


def computes_a_norm(n: Node) -> bool:
    """``n`` is a normalised value (``x * rsqrt(...)``) or multiplies one (rounded or not) by a weight: its result
    is the tensor a RoPE after the norm rotates, never a factor of the RoPE."""
    return _is_normalised(n) or (_call(n, aten.mul.Tensor) and any(_is_normalised(_unround(a)[0]) for a in n.args))


def _near_rsqrt(n: Node, depth: int) -> bool:
    """An rsqrt at most ``depth`` steps above ``n`` (to tell a norm that does not match from no norm at all)."""
    return any(_is_rsqrt(m) for m in [n, *within([n], depth, lambda m: m.all_input_nodes)])


def _unround(n):
    """``(n, None)``, or ``(source, cast)`` when ``n`` is a cast of a normalised value."""
    if _call(n, *_CASTS) and _is_normalised(n.args[0]):
        return n.args[0], n
    return n, None


def _keeps_last(v: Node, d) -> bool:
    """The view ``v`` keeps the last dim of its input, of size ``d``, as its own last dim."""
    rank = len(shape_of(v))
    if not rank or (v.target is aten.permute.default and v.args[1][-1] % rank != rank - 1):
        return False
    return sizes_equal(shape_of(v.args[0])[-1], d) and sizes_equal(shape_of(v)[-1], d)


def _views_to(rope_x: Node) -> tuple[Node, tuple, int]:
    """The node below the views in front of ``rope_x``, those views in graph order, and the heads one norm row
    covers: each view must keep the last dim (the features) as the last dim, of one size, but for one reshape
    splitting H * D normalised features into H heads of D (OLMo 2; heads H, else 1)."""
    views, n = [], rope_x
    while _call(n, *_VIEWS):
        views.append(n)
        n = n.args[0]
    views.reverse()
    if not shape_of(n):
        raise NotNorm(f"{n.name} is a 0-d tensor, not a normalised one")
    d = shape_of(n)[-1]
    i, heads = 0, 1
    while i < len(views):
        v = views[i]
        if _keeps_last(v, d):
            i += 1
            continue
        # a run of reshapes (row-major) from [..., d] to [..., d] keeps every row of d features whole, whatever it
        # regroups in between (SGLang's ``q.reshape(-1, D)`` -> norm -> ``view(T, H*D)`` -> ``view(T, H, D)``)
        j = i
        while j < len(views) and views[j].target in RESHAPES:
            j += 1
        if j > i + 1 and sizes_equal(shape_of(v.args[0])[-1], d) and sizes_equal(shape_of(views[j - 1])[-1], d):
            i = j
            continue
        src_last, head = shape_of(v.args[0])[-1], shape_of(rope_x)[-1]
        split = (v.target in RESHAPES and isinstance(src_last, int) and isinstance(head, int) and src_last > head
                 and src_last % head == 0 and sizes_equal(shape_of(v)[-1], head))
        if split and heads == 1 and all(_keeps_last(w, head) for w in views[i + 1:]) and _near_rsqrt(n, 8):
            heads, d = src_last // head, head  # OLMo 2: one norm over the whole projection, then the head split
            i += 1
            continue
        raise NotNorm(f"{v.name} ({v.target}) between the norm and the RoPE moves the normalised features "
                      f"({list(shape_of(v.args[0]))} -> {list(shape_of(v))}); only views keeping the last dim "
                      "are followed")
    return n, tuple(views), heads


def _normalised(y: Node) -> tuple[Node, float]:
    """``y = xf * rsqrt(mean(xf^2, -1, keepdim) + eps)`` with ``xf`` x upcast to fp32: returns (x, eps)."""
    r = next(a for a in y.args if _is_rsqrt(a))
    xf = y.args[1] if y.args[0] is r else y.args[0]
    s = r.args[0]
    if _call(s, *_ADDS):
        mean, eps = s.args[0], s.args[1]
        if isinstance(eps, Node):
            raise NotNorm(f"eps is a tensor ({s.name} adds {eps}), not a number the kernel can take")
        if not isinstance(eps, (int, float)):
            raise NotNorm(f"eps is {eps!r} ({type(eps).__name__}), not a Python number")
        if s.kwargs.get("alpha", 1) != 1:
            raise NotNorm(f"{s.name} adds eps times {s.kwargs['alpha']}")
    elif _call(s, *_MAXIMA):
        raise NotNorm(f"{s.name}: {s.target} of the mean square and eps, not mean + eps")
    elif _call(s, aten.mean.dim):
        mean, eps = s, 0.0
    else:
        raise NotNorm(f"rsqrt of {s} ({getattr(s, 'target', None)}), not of mean(x^2) + eps")
    if not _call(mean, aten.mean.dim):
        raise NotNorm(f"{mean} is not a mean (the norm's mean square)")
    sq = mean.args[0]
    rank = len(shape_of(sq))
    dims = list(mean.args[1] or ())  # None or []: every dim
    if [d % rank for d in dims] != [rank - 1]:
        raise NotNorm(f"mean over dims {dims or 'all'} of a rank-{rank} tensor, not the last dim only")
    if not (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)):
        raise NotNorm(f"{mean.name} drops the reduced dim (no keepdim)")
    if _call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        xf2 = sq.args[0]
    elif _call(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
        xf2 = sq.args[0]
    else:
        raise NotNorm(f"the mean is of {sq} ({getattr(sq, 'target', None)}), not of x^2")
    x = _upcast_source(xf)
    if not isinstance(xf2, Node) or (xf2 is not xf and _upcast_source(xf2) is not x):
        raise NotNorm(f"the mean square is of {xf2}, the product of {xf}: not one tensor")
    for n in (xf, xf2, mean, y):
        if _dtype(n) != _FP32:
            raise NotNorm(f"the norm is computed in {_dtype(n)} ({n.name}), not fp32")
    if _dtype(x) not in MODEL_DTYPES:
        raise NotNorm(f"the normalised tensor {x.name} is {_dtype(x)}, not one of {MODEL_DTYPES}")
    return x, float(eps)


def _weight(e, d) -> tuple[Node, float]:
    """The weight operand of the multiply: ``w`` or ``w + offset``, w upcast exactly: returns (w, offset)."""
    if not isinstance(e, Node):
        raise NotNorm(f"the norm is multiplied by the number {e}, not by a weight tensor")
    offset, e = 0.0, _upcast_source(e)
    if _call(e, *_ADDS) and not isinstance(e.args[1], Node) and e.kwargs.get("alpha", 1) == 1:
        if _dtype(e) != _FP32:
            raise NotNorm(f"the offset is added to the weight in {_dtype(e)} ({e.name}: w + {e.args[1]} is "
                          "rounded), the kernel adds it in fp32")
        offset, e = float(e.args[1]), _upcast_source(e.args[0])
    if _call(e, *_CASTS):
        raise NotNorm(f"the weight is rounded from {_dtype(e.args[0])} to {_dtype(e)} ({e.name}) before the "
                      "multiply; the kernel reads the weight as it is")
    if e.op not in ("placeholder", "get_attr"):
        raise NotNorm(f"the weight {e.name} is computed in the graph ({e.target}), not a graph input")
    shape = shape_of(e)
    if len(shape) != 1 or not sizes_equal(shape[0], d):
        raise NotNorm(f"the weight {e.name} has shape {list(shape)}, not [{d}] (one value per feature)")
    return e, offset


_NORM_TAIL = (*_CASTS, aten.mul.Tensor, *_ADDS, aten.sub.Tensor)


def find_qk_norm(rope_x: Node) -> NormMatch | None:
    """The norm in front of ``rope_x`` (``match_qk_norm``), or None where there is none: no rsqrt within the few
    casts, products and sums a norm ends with, behind the views. ``NotNorm`` for a norm the kernel does not
    reproduce (the caller reports it). A projection (a matmul) ends the search: the layer's input norm is not
    the RoPE's."""
    n = rope_x
    while _call(n, *_VIEWS):
        n = n.args[0]
    frontier, seen = [n], {n}
    for _ in range(6):
        if any(_is_rsqrt(m) for m in frontier):
            return match_qk_norm(rope_x)
        frontier = [a for m in frontier if _call(m, *_NORM_TAIL, aten.rsqrt.default) for a in m.all_input_nodes
                    if a not in seen and not seen.add(a)]
    return None


def match_qk_norm(rope_x: Node) -> NormMatch:
    """Check that ``rope_x`` is, through views keeping the last dim, an RMSNorm over that dim that the fused
    kernel reproduces; raise ``NotNorm`` with the reason otherwise."""
    if not isinstance(rope_x, Node) or not shape_of(rope_x):
        raise NotNorm(f"{rope_x} is not a tensor with a feature dim")
    out, views, heads = _views_to(rope_x)
    top, final = out, None
    if _call(top, *_CASTS):
        top, final = top.args[0], top
    for n in (out, top):
        if _call(n, aten.add.Tensor, aten.sub.Tensor) and all(isinstance(a, Node) for a in n.args) \
                and any(_near_rsqrt(a, 3) for a in n.args):
            raise NotNorm(f"a bias is added after the norm ({n.name}: {n.target})")
    if _is_normalised(top):
        y, wmul, rounded, wexpr = top, None, None, None
    elif _call(top, aten.mul.Tensor):
        for a, b in (top.args, top.args[::-1]):
            y, rounded = _unround(a)
            if _is_normalised(y):
                wmul, wexpr = top, b
                break
        else:
            raise NotNorm(f"{top.name}: no operand of the multiply is x * rsqrt(mean(x^2) + eps)")
    else:
        raise NotNorm(f"{out.name} ({out.target}) is not an RMSNorm's result")
    x, eps = _normalised(y)
    xdt, d = _dtype(x), shape_of(y)[-1]
    for cast in (rounded, final):
        if cast is not None and not (_dtype(cast.args[0]) == _FP32 and _dtype(cast) == xdt):
            raise NotNorm(f"{cast.name} casts {_dtype(cast.args[0])} to {_dtype(cast)}; the kernel rounds fp32 "
                          f"to x's dtype {xdt} only")
    weight = weight_dtype = None
    offset = 0.0
    if wmul is not None:
        weight, offset = _weight(wexpr, d)
        weight_dtype = _dtype(weight)
        # in x's dtype only as a product of two x's dtype values (exact in fp32, rounded once); else in fp32
        low_ok = rounded is not None and _dtype(_upcast_source(wexpr)) == xdt and offset == 0.0
        if _dtype(wmul) != _FP32 and not (_dtype(wmul) == xdt and low_ok):
            raise NotNorm(f"the weight multiply {wmul.name} is in {_dtype(wmul)}, not in fp32 or as a product of "
                          f"two {xdt} values")
        if _dtype(wmul) != _FP32 and final is not None:
            raise NotNorm(f"{final.name} casts the {_dtype(wmul)} product again")
    if _dtype(out) != xdt:
        raise NotNorm(f"the normalised tensor {out.name} is {_dtype(out)}, x is {xdt}: the result is not rounded "
                      "back to x's dtype")
    return NormMatch(out=out, x=x, weight=weight, eps=eps, offset=offset, round_before_weight=rounded is not None,
                     weight_dtype=weight_dtype, views=views, heads=heads)


def normalised_input(n: Node) -> Node | None:
    """The tensor ``n`` is a norm of (below the casts and views of it, as ``match_qk_norm`` would name it:
    ``NormMatch.x``), where ``n`` computes a norm (``computes_a_norm``, through casts and views); None where it
    computes none. Nothing else is checked: the caller asks ``match_qk_norm`` whether the kernel reproduces it."""
    for _ in range(4):
        if _call(n, *_CASTS, *_VIEWS):
            n = n.args[0]
        elif _call(n, *_ADDS, aten.sub.Tensor) and any(_near_rsqrt(a, 3) for a in n.args if isinstance(a, Node)):
            n = next(a for a in n.args if isinstance(a, Node) and _near_rsqrt(a, 3))  # a bias after a norm
        else:
            break
    if not computes_a_norm(n):
        return None
    if not _is_normalised(n):
        n = next(y for y in (_unround(a)[0] for a in n.args) if _is_normalised(y))
    r = next(a for a in n.args if _is_rsqrt(a))
    xf = n.args[1] if n.args[0] is r else n.args[0]
    return _upcast_source(xf) if isinstance(xf, Node) else None


def below_views(n: Node) -> Node:
    """``n`` below its views (the tensor a norm's input is a view of)."""
    while _call(n, *_VIEWS):
        n = n.args[0]
    return n


_AFTER_NORM = (*_CASTS, aten.mul.Tensor, *_ADDS, aten.sub.Tensor, aten.pow.Tensor_Scalar, aten.mean.dim,
               aten.rsqrt.default)


def find_norm_after(rope_out: Node) -> NormMatch | None:
    """The QK-norm of the rotated tensor ``rope_out`` (HunYuan, Llama 4: the RoPE, then the norm): the largest
    ``match_qk_norm`` whose ``x`` is ``rope_out``, from the normalised product on through the casts and the weight
    multiply that read it alone. None where no norm reads ``rope_out``; ``NotNorm`` for one the kernel does not
    reproduce."""
    frontier, seen, y = [rope_out], {rope_out}, None
    for _ in range(6):  # rope_out [-> fp32] -> pow -> mean -> add -> rsqrt -> the normalised product
        y = next((u for u in frontier if _is_normalised(u) and normalised_input(u) is rope_out), None)
        if y is not None:
            break
        frontier = [u for m in frontier for u in m.users if _call(u, *_AFTER_NORM) and u not in seen
                    and not seen.add(u)]
    if y is None:
        return None
    found, error, n = None, None, y
    while True:  # on through the casts and the weight multiply, while the norm grows
        try:
            m = match_qk_norm(n)
        except NotNorm as e:
            if found is not None:
                break  # the norm ended before n (e.g. a product with a number: the attention's scaling)
            error = e
        else:
            if m.x is not rope_out:
                break
            found = m
        users = list(n.users)
        if len(users) != 1 or not _call(users[0], *_CASTS, aten.mul.Tensor):
            break
        n = users[0]
    if found is None:
        raise error
    return found
