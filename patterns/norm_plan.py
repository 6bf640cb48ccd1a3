"""Planning a site's QK-norms: which norms of q and k the fused op applies (``fused_norms``), before its RoPE or after
it, and how it reads their inputs (``FusedNorm``); a norm it cannot take stays a kernel of its own, said in the
site's notes (k's norm after the RoPE, which the cache holds, makes the site ``Unfusable``). The norms themselves are
recognised in ``qk_norm.py``; ``plan.can_fuse`` calls this once per site.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from fx_fusion.patterns.find import GraphState
from fx_fusion.patterns.fx_utils import RESHAPES, Role, shape_of, sizes_equal
from fx_fusion.patterns.kv_store import walk_views
from fx_fusion.patterns.qk_norm import NormMatch, NotNorm, find_norm_after, find_qk_norm
from fx_fusion.patterns.rope import RopeMatch
from fx_fusion.patterns.site import Unfusable


@dataclass(frozen=True)
class FusedNorm:
    """A QK-norm the op applies: it reads the norm's input ``match.x`` instead of the RoPE's x, reshaped to
    ``reshape`` first where that is not None (-1: the one symbolic size), its dims then labelled ``roles``. With
    ``after`` the norm is of the RoPE's output (``match.x``), and the op reads the RoPE's x as without a norm."""

    match: NormMatch
    roles: tuple
    reshape: tuple | None = None
    after: bool = False


def x_roles(m: RopeMatch, roles) -> tuple:
    """Roles of the dims of the rotated tensor (its prefix dims follow the root's, its last is FEATURE)."""
    return tuple(roles[d] if d is not None else None for d in m.x_dims) + (Role.FEATURE,)


def fused_norms(q: tuple[Node, RopeMatch], k: tuple[Node, RopeMatch], k_after: NormMatch | None, roles, device,
                 state: GraphState, notes: list) -> tuple[FusedNorm | None, FusedNorm | None]:
    """The QK-norms of q and k the op can apply (``patterns/qk_norm.py``; ``q``, ``k``: the RoPE outputs and their
    matches): before its RoPE, or after it where the graph normalises a rotated tensor (``k_after``: the stored k's
    norm, found with the store; q's is looked for here). A norm the op cannot take stays a kernel of its own, said
    in ``notes``, and the RoPE and the store still fuse; but k's norm after the RoPE is what the cache holds, so
    without it the site is ``Unfusable``."""
    after = {"k": k_after} if k_after is not None else {}
    try:
        if (m := find_norm_after(q[0])) is not None:
            after["q"] = m
    except NotNorm as e:
        notes.append(f"q's QK-norm after the RoPE stays a kernel of its own: {e}")
    fused = {}
    for what, (root, rope) in (("q", q), ("k", k)):
        try:
            if what in after:
                fused[what] = _fused_norm_after(after[what], rope, roles, root, device)
            elif (m := find_qk_norm(rope.x)) is not None:
                if after:
                    raise NotNorm("the op applies the norms after the RoPE here")
                fused[what] = _fused_norm(m, rope, roles, root, device, state)
        except NotNorm as e:
            if what == "k" and what in after:
                raise Unfusable(f"k's QK-norm after the RoPE ({after['k'].out.name}), which the cache holds: {e}")
            notes.append(f"{what}'s QK-norm{' after the RoPE' if what in after else ''} stays a kernel of its own: {e}")
    if len(fused) == 2:
        a, b = (_norm_constants(fused[w].match) for w in ("q", "k"))
        if a != b:
            if fused["k"].after:
                notes.append(f"q's QK-norm stays a kernel of its own: the op takes one eps, offset, rounding and width "
                             f"(per head or full), q's are {a}, k's (after the RoPE, which the cache holds) {b}")
                return None, fused["k"]
            notes.append(f"q's and k's QK-norms stay kernels of their own: the op takes one eps, offset, rounding "
                         f"and width (per head or full), q's are {a}, k's {b}")
            return None, None
    return fused.get("q"), fused.get("k")


def _fused_norm_after(m: NormMatch, rope: RopeMatch, roles, rope_out: Node, device) -> FusedNorm:
    """A norm of the RoPE output ``rope_out`` (``m.x``) that the op applies after its RoPE; ``NotNorm`` where it
    cannot: a norm over more than one head, a weight the op cannot read, or another reader of the rotated tensor
    or of a value of the norm (it would see the graph's values where the op's outputs hold its own)."""
    if m.heads != 1 or m.views or not sizes_equal(shape_of(m.out)[-1], rope.head_dim):
        raise NotNorm(f"{m.out.name} is not one norm per head of the rotated {rope_out.name}")
    out, rotated = shape_of(m.out), shape_of(rope_out)
    if len(out) != len(rotated) or not all(map(sizes_equal, out, rotated)):  # (no shape guards: sizes may be symbolic)
        raise NotNorm(f"{rope_out.name} {list(shape_of(rope_out))} is broadcast by the norm to "
                      f"{list(shape_of(m.out))}")
    w = m.weight.meta["val"] if m.weight is not None else None
    if w is not None and (not w.is_contiguous() or w.device != device):
        raise NotNorm(f"the weight {m.weight.name} is not a contiguous tensor on {device}")
    body = _norm_nodes(m)
    for n in (rope_out, *(n for n in body if n is not m.out)):
        other = next((u for u in n.users if u not in body), None)
        if other is not None:
            raise NotNorm(f"{other.name} also reads {n.name}, {'the rotated tensor' if n is rope_out else 'a value of the norm'}")
    return FusedNorm(m, x_roles(rope, roles), after=True)


def _norm_constants(m: NormMatch) -> tuple:
    return m.eps, m.offset, m.round_before_weight, m.heads > 1


def _fused_norm(m: NormMatch, rope: RopeMatch, roles, root: Node, device, state: GraphState) -> FusedNorm:
    """How the op reads the norm's input in place of the RoPE's x; ``NotNorm`` where the norm cannot move into
    the op."""
    x = m.x.meta["val"]
    if m.heads & (m.heads - 1):
        raise NotNorm(f"one norm over {m.heads} heads (the whole projection): the op's full-width norm sums a "
                      "power-of-two number of heads")
    if x.dim() != len(shape_of(m.out)) or not all(map(sizes_equal, x.shape, shape_of(m.out))):
        raise NotNorm(f"{m.x.name} {list(x.shape)} is broadcast by the norm to {list(shape_of(m.out))}")
    # the views from the norm to the RoPE, labelled back from the RoPE's x as far as they can be; the rest must be
    # reshapes (SGLang's [T*H, D] norm), which the op's input replays as one
    src, norm_roles, _ = walk_views(rope.x, x_roles(rope, roles))
    reshape = None
    if src is not m.out:
        head = m.views[:m.views.index(src) + 1] if src in m.views else ()
        sizes = shape_of(src)
        if not head or any(v.target not in RESHAPES for v in head) or sum(not isinstance(s, int) for s in sizes) > 1:
            raise NotNorm(f"the views from {m.out.name} to the RoPE's input {rope.x.name} cannot be followed back")
        reshape = tuple(s if isinstance(s, int) else -1 for s in sizes)
    w = m.weight.meta["val"] if m.weight is not None else None
    if w is not None and (not w.is_contiguous() or w.device != device):
        raise NotNorm(f"the weight {m.weight.name} is not a contiguous tensor on {device}")
    # the op replaces the norm's nodes: nothing else may read them (it would then be computed twice, and the
    # other reader would see the graph's norm where the cache holds the op's)
    body = _norm_nodes(m)
    rope_body = _ancestors_after(root, rope.x, state)
    for n in body:
        other = next((u for u in n.users if u not in body and u not in rope_body), None)
        if other is not None:
            raise NotNorm(f"{other.name} also reads {n.name}, a value of the norm")
    return FusedNorm(m, norm_roles, reshape)


def _norm_nodes(m: NormMatch) -> set:
    """The nodes that compute the norm from its input and weight, up to the RoPE's input."""
    body, stack = set(m.views), [m.out]
    while stack:
        n = stack.pop()
        if n in body or n is m.x or n is m.weight or n.op != "call_function":
            continue
        body.add(n)
        stack.extend(n.all_input_nodes)
    return body


def _ancestors_after(root: Node, x: Node, state: GraphState) -> set:
    """The nodes between ``x`` and ``root``: the ancestors of ``root`` that come after ``x`` in the graph."""
    first = state.order[x]
    seen, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in seen or state.order.get(n, first) <= first:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen
