"""The symbolic values the RoPE evaluator (``evaluator.py``) computes, and their algebra.

A tensor is a ``Value``: ``prefix`` dims (sizes, tracked only to prove that each token's x meets the same
token's table row), then concrete ``trail`` feature dims, one polynomial per flat feature. A polynomial maps
monomials (sorted tuples of ``(leaf id, leaf feature)`` symbols) to coefficients: ``x[i] * cos[i] - x[i + R/2] *
sin[i]`` is ``{((x, i), (cos, i)): 1.0, ((x, i + R/2), (sin, i)): -1.0}``. The functions here are what the aten
ops do to Values: scale, add, multiply (with broadcasting), select features, concatenate. ``NotRope`` is what they,
the evaluator and ``match_rope`` raise for a subgraph that is not a RoPE the fused op can compute.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from fx_fusion.patterns.fx_utils import is_one

Sym = tuple[int, int]  # (leaf id, flat feature index of that leaf)
Poly = dict[tuple[Sym, ...], float]  # monomial (sorted symbols) -> coefficient


@dataclass
class Value:
    """A tensor in the symbolic domain: ``prefix`` dims, then ``trail`` feature dims (concrete)."""

    prefix: tuple  # sizes (ints or SymInts)
    embed: tuple  # per prefix dim: frozenset of (leaf id, leaf prefix dim) that index along it
    trail: tuple[int, ...]
    feats: list[Poly]  # one polynomial per flat feature (row-major over ``trail``)
    # casts that are not exact, applied to the result after its arithmetic, innermost first: (from, to)
    rounding: tuple = ()


class NotRope(Exception):
    """Why a subgraph is not a RoPE the fused op can compute; the message goes into the report."""


def scaled(v: Value, c: float) -> Value:
    """``v`` times the number ``c``."""
    return replace(v, feats=[{m: k * c for m, k in p.items()} for p in v.feats])


def poly_add(p: Poly, q: Poly, sign: float) -> Poly:
    out = dict(p)
    for m, k in q.items():
        out[m] = out.get(m, 0.0) + sign * k
    return {m: k for m, k in out.items() if k != 0.0}


def poly_mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for m1, k1 in p.items():
        for m2, k2 in q.items():
            if len(m1) + len(m2) > 2:
                raise NotRope("products of more than two factors")
            if len(m1) == 1 and len(m2) == 1:  # the common case (x times a table), sorted without a sort
                a, b = m1[0], m2[0]
                m = (a, b) if a <= b else (b, a)
            else:
                m = tuple(sorted(m1 + m2))
            out[m] = out.get(m, 0.0) + k1 * k2
    return {m: k for m, k in out.items() if k != 0.0}


def combine(a: Value, b: Value, fn) -> Value:
    """Elementwise binary op with broadcasting of prefix and feature dims."""
    if len(a.trail) != len(b.trail):
        raise NotRope("operands with different feature ranks")
    trail = []
    for x, y in zip(a.trail, b.trail):
        if x != y and 1 not in (x, y):
            raise NotRope("feature dims do not broadcast")
        trail.append(max(x, y))
    n = max(len(a.prefix), len(b.prefix))
    pa = (1,) * (n - len(a.prefix)) + a.prefix
    pb = (1,) * (n - len(b.prefix)) + b.prefix
    ea = (frozenset(),) * (n - len(a.embed)) + a.embed
    eb = (frozenset(),) * (n - len(b.embed)) + b.embed
    prefix, embed = [], []
    for sa, sb, xa, xb in zip(pa, pb, ea, eb):
        if is_one(sa) and not is_one(sb):
            prefix.append(sb)
            embed.append(xb)
        elif is_one(sb) and not is_one(sa):
            prefix.append(sa)
            embed.append(xa)
        else:
            prefix.append(sa)
            embed.append(xa | xb)
    if a.trail == b.trail and len(a.feats) == len(b.feats) == math.prod(a.trail):  # nothing to broadcast
        feats = [fn(p, q) for p, q in zip(a.feats, b.feats)]
    else:
        feats = [fn(a.feats[fa], b.feats[fb]) for fa, fb in zip(_broadcast(trail, a.trail), _broadcast(trail, b.trail))]
    return Value(tuple(prefix), tuple(embed), tuple(trail), feats)


def broadcast_features(v: Value, trail: tuple) -> Value:
    """Expand size-1 feature dims of ``v`` to ``trail`` (each feature repeated, as ``expand`` does)."""
    feats = [v.feats[f] for f in _broadcast(trail, v.trail)]
    return replace(v, trail=tuple(trail), feats=feats)


def take(v: Value, dim: int, index: list[int], squeeze: bool = False) -> Value:
    trail = list(v.trail)
    trail[dim] = len(index)
    coords = [list(index) if d == dim else range(size) for d, size in enumerate(trail)]
    feats = [v.feats[f] for f in _flat_all(coords, v.trail)]
    if squeeze:
        del trail[dim]
    return replace(v, trail=tuple(trail), feats=feats)


def concat(parts: list[Value], dim: int) -> Value:
    first = parts[0]
    if any(len(p.trail) != len(first.trail) or len(p.prefix) != len(first.prefix) for p in parts):
        raise NotRope("cat of mismatched operands")
    roundings = {p.rounding for p in parts if p.rounding}
    if len(roundings) > 1:
        raise NotRope("cat of parts cast differently")
    sizes = [p.trail[dim] for p in parts]
    trail = list(first.trail)
    trail[dim] = sum(sizes)
    embed = tuple(frozenset().union(*(p.embed[i] for p in parts)) for i in range(len(first.prefix)))
    feats = []
    for idx in _ndindex(trail):
        k, i = 0, idx[dim]
        while i >= sizes[k]:
            i -= sizes[k]
            k += 1
        src = list(idx)
        src[dim] = i
        feats.append(parts[k].feats[_flat(src, parts[k].trail)])
    return Value(first.prefix, embed, tuple(trail), feats, roundings.pop() if roundings else ())


def _ndindex(shape):
    return list(itertools.product(*(range(s) for s in shape)))


def _flat(idx, shape) -> int:
    f = 0
    for i, s in zip(idx, shape):
        f = f * s + i
    return f


def _flat_all(coords: list, shape) -> list[int]:
    """``_flat(idx, shape)`` for every ``idx`` of ``coords[0] x coords[1] x ...`` (one sequence of indices per dim), in
    row-major order: all the flat indices at once."""
    flat = [0]
    for values, size in zip(coords, shape):
        flat = [f * size + i for f in flat for i in values]
    return flat


def _broadcast(trail, src_trail) -> list[int]:
    """For each feature of ``trail`` (row-major), the flat feature of ``src_trail`` that broadcasts to it (a size-1 dim
    of ``src_trail`` reads index 0)."""
    return _flat_all([range(size) if src > 1 else [0] * size for size, src in zip(trail, src_trail)], src_trail)
