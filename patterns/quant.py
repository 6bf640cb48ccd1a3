"""fp8 quantisation in front of a KV-cache store: ``(x / scale).clamp(lo, hi).to(fp8)[.view(uint8)]``.

Before (functional post-grad graph; the chain is elementwise, so the stored value keeps x's shape)::

    y = aten.div.Tensor(x, scale)            # or aten.mul.Tensor(x, inv_scale); or no scale at all
    y = convert(clamp_max(clamp_min(convert(y, fp32), lo), hi), y.dtype)   # optional clamp (bf16/fp16
                                             # clamps are decomposed through fp32); fp32: clamp_min/max on y
    q = prims.convert_element_type(y, float8_e4m3fn | float8_e5m2)
    q = aten.view.dtype(q, uint8)            # SGLang's uint8 pools only
    aten.index_put(cache, idx, q)

The same chain below the RoPE output of q, as its only users (``fp8_cast_of``), is fp8 q for an fp8 attention
kernel, which the fused op also writes (``q_fp8_dtype`` and the ``q_*`` options).

After: the same store of ``x`` (the RoPE output or v) described by a ``Quant``, which the fused op
reproduces bit for bit (its ``quant_dtype``/``scale_mul``/``clamp``/``fp8_dtype`` arguments, see
``kernels/rope_kv_kernel.py``). ``peel_quant`` returns None for a value that is not cast to fp8, and raises
``NotQuant`` with the reason for a quantisation the op cannot reproduce (the site is reported, not fused).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from fx_fusion.kernels.fp8_rules import exactly_representable
from fx_fusion.kernels.problem import FP8_DTYPES, MODEL_DTYPES, SCALE_DTYPES
from fx_fusion.patterns.fx_utils import RESHAPES, OpRole, is_one, ops_with, shape_of

aten = torch.ops.aten
_CONVERT = ops_with(OpRole.CAST)
_CLAMPS = ops_with(OpRole.CLAMP)
_QUANT_OPS = _CONVERT | _CLAMPS | {aten.div.Tensor, aten.mul.Tensor}


class NotQuant(Exception):
    """A cast to fp8 in front of a store that the fused op cannot reproduce exactly; ``inner`` is the node
    below the cast chain as far as it was followed (to tell whether it stores a RoPE output)."""

    def __init__(self, reason: str, inner: Node):
        super().__init__(reason)
        self.inner = inner


@dataclass(frozen=True)
class Quant:
    """How a stored value ``x`` is quantised: ``fp8(clamp(round_quant_dtype(x / scale)))``."""

    fp8: torch.dtype  # the fp8 format of the stored bits
    uint8: bool  # stored through ``view(uint8)`` into a uint8 cache
    quant_dtype: torch.dtype  # the dtype of ``x / scale`` (eager rounds the quotient to it)
    scale_mul: bool  # ``x * scale`` (a reciprocal) instead of ``x / scale``
    clamp: tuple | None  # (lo, hi)
    scale: Node | float | None  # a graph tensor of one fp32, bf16 or fp16 value, a Python number, or no scale
    chain: tuple = ()  # the store's view and quantisation nodes above the quantised value (set by the pass)
    scale_first: bool = False  # the scale tensor is the first operand of the multiply (``s * x``)

    @property
    def recipe(self) -> tuple:
        """What k's and v's quantisation must share to be one fused op (everything but the scale)."""
        return self.fp8, self.uint8, self.quant_dtype, self.scale_mul, self.clamp

    def describe(self) -> str:
        op = "*" if self.scale_mul else "/"
        scale = "" if self.scale is None else f" {op} {getattr(self.scale, 'name', self.scale)}"
        clamp = "" if self.clamp is None else f".clamp{self.clamp}"
        view = ".view(uint8)" if self.uint8 else ""
        return f"(x{scale} in {self.quant_dtype}){clamp}.to({self.fp8}){view}"


def scale_rounding(quant: Quant, device: torch.device) -> torch.dtype | None:
    """The dtype eager rounds a scale tensor to before it divides or multiplies by it (None: its own value).

    ``x / s`` with a one-element ``s`` is computed in the quotient's dtype from operands converted to it, except
    where ATen reads a scalar operand in fp32: on CPU, the second operand of a bf16/fp16 division or multiply
    (``s * x`` rounds ``s``; measured, torch 2.13); on CUDA only CPU scalars, so a 0-d CUDA tensor is rounded
    to the quotient's dtype as it is loaded (measured, H200, torch 2.11). A quotient in fp32 reads every
    bf16/fp16/fp32 scale exactly. Python-number scales are not tensors: see ``_check_quant_device``."""
    if not isinstance(quant.scale, Node) or quant.quant_dtype is torch.float32:
        return None
    return quant.quant_dtype if device.type == "cuda" or quant.scale_first else None


def _convert_target(n: Node) -> torch.dtype | None:
    """The dtype ``n`` casts to, if it is a plain dtype conversion."""
    if not isinstance(n, Node) or n.op != "call_function" or n.target not in _CONVERT:
        return None
    if n.target is aten._to_copy.default:
        extra = set(n.kwargs) - {"dtype"}
        return n.kwargs.get("dtype") if not extra else None
    return n.args[1] if len(n.args) > 1 else None


def _dtype(n) -> torch.dtype | None:
    return n.meta["val"].dtype if isinstance(n, Node) and "val" in n.meta else None


def peel_quant(value: Node, cache: Node) -> tuple[Node, Quant] | None:
    """``(x, quant)`` when ``value`` is ``x`` quantised to fp8 as above; None when it is not cast to fp8."""
    node, uint8 = value, False
    if node.op == "call_function" and node.target is aten.view.dtype:
        if _dtype(node) is not torch.uint8:
            return None
        node, uint8 = node.args[0], True
    fp8 = _convert_target(node)
    if fp8 not in FP8_DTYPES:
        return None
    if uint8 and _dtype(cache) is not torch.uint8:
        raise NotQuant(f"fp8 bits viewed as uint8 are stored into a {_dtype(cache)} cache", node.args[0])
    if not uint8 and _dtype(cache) is not fp8:
        raise NotQuant(f"a {fp8} value is stored into a {_dtype(cache)} cache", node.args[0])
    x, quant = peel_fp8(node)
    return x, dataclasses.replace(quant, uint8=uint8)


def fp8_cast_of(x: Node) -> tuple[Node, tuple[Node, ...]] | None:
    """``(cast, views)``: the cast to fp8 at the end of ``x``'s only chain of users, when that chain is reshapes of
    ``x`` (``views``, which commute with the elementwise rest), then a quantisation (scale, clamp, casts) as above:
    fp8 q for an fp8 attention kernel. None when ``x`` has other users or no such chain."""
    node, views = x, []
    for _ in range(12):  # reshapes, upcast, scale, clamp (decomposed: two casts and two clamps), cast
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node.op != "call_function":
            return None
        if node.target in RESHAPES and len(views) == _steps(node, x) - 1:
            views.append(node)
            continue
        if node.target not in _QUANT_OPS:
            return None
        if _convert_target(node) in FP8_DTYPES:
            return node, tuple(views)
    return None


def _steps(node: Node, x: Node) -> int:
    """How many single-argument steps ``node`` is below ``x`` (through first arguments)."""
    n = 0
    while node is not x and isinstance(node, Node) and node.args:
        node, n = node.args[0], n + 1
    return n


def peel_fp8(node: Node) -> tuple[Node, Quant]:
    """``(x, quant)`` of ``node``, a cast of ``x`` quantised to fp8 (``NotQuant`` where the op cannot reproduce it)."""
    fp8 = _convert_target(node)
    x = node.args[0]
    if fp8 not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise NotQuant(f"{fp8} stores are not fused: eager's cast to it was not measured on any device "
                       "(it is a HIP format)", x)
    quant_dtype = _dtype(x)
    if quant_dtype not in MODEL_DTYPES:
        raise NotQuant(f"the value cast to {fp8} is {quant_dtype}, not a model dtype", x)
    x, clamp = _peel_clamp(x, quant_dtype)
    x, scale, scale_mul, scale_first = _peel_scale(x, quant_dtype)
    up = _convert_target(x)  # ``x.float() / scale``: an exact upcast of the stored tensor
    if up is torch.float32 and _dtype(x.args[0]) in (torch.bfloat16, torch.float16):
        x = x.args[0]
    if _dtype(x) not in MODEL_DTYPES or len(shape_of(x)) != len(shape_of(node)):
        raise NotQuant(f"the quantised value {x.name} is {_dtype(x)} {tuple(shape_of(x))}, not the stored "
                       f"{tuple(shape_of(node))} in a model dtype", x)
    return x, Quant(fp8, False, quant_dtype, scale_mul, clamp, scale, scale_first=scale_first)


def _peel_clamp(x: Node, dtype: torch.dtype) -> tuple[Node, tuple | None]:
    """Strip ``clamp(lo, hi)`` in ``dtype`` (through an exact fp32 round trip for bf16/fp16)."""
    inner, down = x, False
    if dtype is not torch.float32 and _convert_target(x) is dtype and _dtype(x.args[0]) is torch.float32:
        inner, down = x.args[0], True
    lo, hi, seen = -math.inf, math.inf, False
    while isinstance(inner, Node) and inner.op == "call_function" and inner.target in _CLAMPS:
        args = list(inner.args[1:]) + [None] * 2
        if inner.target is aten.clamp_min.default:
            bounds = (args[0], None)
        elif inner.target is aten.clamp_max.default:
            bounds = (None, args[0])
        else:
            bounds = (inner.kwargs.get("min", args[0]), inner.kwargs.get("max", args[1]))
        for b in bounds:
            if b is not None and not (isinstance(b, (int, float)) and not isinstance(b, bool)):
                raise NotQuant(f"{inner.name} clamps to a bound that is not a number ({b!r})", inner)
        if bounds[0] is not None:
            if inner.target is aten.clamp.default and bounds[1] is not None and bounds[0] > bounds[1]:
                raise NotQuant(f"{inner.name} clamps with min > max", inner)
            lo = max(lo, float(bounds[0]))
        if bounds[1] is not None:
            hi = min(hi, float(bounds[1]))
        seen, inner = True, inner.args[0]
    if not seen:
        return x, None
    if down:
        if _convert_target(inner) is not torch.float32 or _dtype(inner.args[0]) is not dtype:
            raise NotQuant(f"the clamp before the fp8 cast is computed in fp32 on a value that is not an "
                           f"exact upcast of {dtype}", inner)
        inner = inner.args[0]
    elif _dtype(inner) is not dtype:
        raise NotQuant(f"the clamp before the fp8 cast changes the dtype ({_dtype(inner)} -> {dtype})", inner)
    if not lo <= hi:
        raise NotQuant(f"the clamps before the fp8 cast have lo {lo} > hi {hi}", inner)
    if not (exactly_representable(lo, dtype) and exactly_representable(hi, dtype)):
        raise NotQuant(f"the clamp bounds ({lo}, {hi}) are not exact {dtype} values", inner)
    return inner, (lo, hi)


def _peel_scale(x: Node, dtype: torch.dtype) -> tuple[Node, Node | float | None, bool, bool]:
    """Strip ``x / scale`` or ``x * scale``: (the scaled tensor, the scale, multiplied?, scale first?)."""
    if not (isinstance(x, Node) and x.op == "call_function"
            and x.target in (aten.div.Tensor, aten.mul.Tensor) and len(x.args) == 2 and not x.kwargs):
        return x, None, False, False
    a, b = x.args
    mul = x.target is aten.mul.Tensor
    first = mul and not _is_scale_like(b) and _is_scale_like(a)
    if first:
        a, b = b, a
    if not isinstance(a, Node):
        raise NotQuant(f"{x.name} scales a constant", x)
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b), mul, first
    if not isinstance(b, Node) or "val" not in b.meta:
        raise NotQuant(f"{x.name} scales by {b!r}", a)
    sval = b.meta["val"]
    if not all(is_one(s) for s in sval.shape) or len(sval.shape) > len(shape_of(a)):
        raise NotQuant(f"the scale {b.name} has shape {tuple(sval.shape)}: one scale per head or feature, but "
                       "the fused op takes one per-tensor scale", a)
    if sval.dtype not in SCALE_DTYPES:
        raise NotQuant(f"the scale {b.name} is {sval.dtype}; the fused op reproduces fp32, bf16 and fp16 scales", a)
    return a, b, mul, first


def _is_scale_like(n) -> bool:
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return True
    return isinstance(n, Node) and "val" in n.meta and all(is_one(s) for s in n.meta["val"].shape)
