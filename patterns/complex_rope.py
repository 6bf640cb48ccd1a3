"""RoPE through complex numbers, rewritten into the real pair arithmetic the RoPE evaluator reads.

Meta's Llama reference (and Mistral's reference code) rotate q and k by a complex multiply::

    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)     # freqs_cis = polar(1, t * inv_freq)

which the post-grad graph keeps complex (torch 2.11 and 2.13; Inductor falls back to ATen for complex ops)::

    z = aten.view_as_complex(x)          # x [..., D/2, 2] real: pairs (2i, 2i + 1)
    p = aten.mul.Tensor(z, t)            # t complex, broadcast: a slice of freqs_cis, or computed in the graph
    r = aten.view_as_real(p)             # [..., D/2, 2]

``canonicalize_complex_rope`` writes each such ``r`` as the product it computes, (a + bi)(c + di) =
(ac - bd) + (ad + bc)i, every product rounded once (no FMA), as ATen's vectorised CPU loop computes it::

    a, b = select(x, -1, 0), select(x, -1, 1)                           # once per operand
    c, d = select(view_as_real(t), -1, 0), select(view_as_real(t), -1, 1)
    r' = cat([unsqueeze(a*c - b*d, -1), unsqueeze(a*d + b*c, -1)], -1)   # the users of r read r'

so the GPT-J rotation is plain to the evaluator (``patterns/rope.py``): cos is the real part of the table, sin its
imaginary part, both fp32 strided views (``select`` of a ``view_as_real`` is a table of its own there). Which
operand is rotated and which is a table (per position, not per head) is the evaluator's and ``can_fuse``'s
business, as for every other spelling; the parts of a complex tensor of its own (not real pairs viewed as complex)
are marked ``COMPLEX_TABLE``, which tells the table from x where the two index the same dims (one head: DeepSeek-V2's
k_pe). The rewrite is undone (``restore``) wherever it was not fused, so an
unfused graph computes exactly what it computed before (Inductor would compile the real form differently).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from fx_fusion.patterns.fx_utils import Emitter, OpRole, fake_mode_of, ops_with

aten = torch.ops.aten
log = logging.getLogger("fx_fusion")
# meta key of the real and imaginary parts of a complex operand that is a tensor of its own (the table): with one
# head, x and a per-token table index the same dims, and this tells them apart (``rope.match_rope``)
COMPLEX_TABLE = "fx_fusion_complex_table"


@dataclass
class _Rewrite:
    old: Node  # the view_as_real the model wrote
    new: Node  # its real form (what the old node's users read until ``restore``)


@dataclass
class ComplexRopeRewrites:
    """What ``canonicalize_complex_rope`` changed; ``restore()`` puts back every rewrite nothing fused."""

    graph: Graph
    rewrites: list = field(default_factory=list)
    created: list = field(default_factory=list)  # every node inserted, in order

    def __bool__(self) -> bool:
        return bool(self.rewrites)

    def restore(self) -> None:
        """Give each real form still read (not replaced by a fused op) its complex node back; drop dead nodes."""
        for rw in self.rewrites:
            if rw.new.users:
                rw.new.replace_all_uses_with(rw.old)
        for n in reversed(self.created):
            if not n.users:
                self.graph.erase_node(n)
        self.rewrites, self.created = [], []


def canonicalize_complex_rope(graph: Graph) -> ComplexRopeRewrites:
    """Rewrite every ``view_as_real(mul(a, b))`` of complex ``a``, ``b`` into real pair arithmetic (see the module
    docstring). Returns the record to ``restore()`` once the pass has fused what it could."""
    out = ComplexRopeRewrites(graph)
    try:
        _rewrite(graph, out)
    except Exception as err:  # noqa: BLE001 (a bug here must not fail the compile: the graph is put back)
        log.debug("fx_fusion: complex RoPE rewrite failed, graph left as it was", exc_info=err)
        out.restore()
    return out


def _rewrite(graph: Graph, out: ComplexRopeRewrites) -> None:
    pairs: dict = {}  # operand (``_view_key``) -> its (real, imaginary) parts, made once
    fake_mode = None
    for vr in list(graph.find_nodes(op="call_function", target=aten.view_as_real.default)):
        p = vr.args[0]
        if not _is_complex_mul(p):
            continue
        if fake_mode is None:
            fake_mode = fake_mode_of(graph)
            if fake_mode is None:
                return
        emit = Emitter(graph, fake_mode, out.created, vr.meta.get("stack_trace"))
        operands = p.args[:2]
        with graph.inserting_before(p):
            parts = [pairs.get(_view_key(o)) or pairs.setdefault(_view_key(o), _parts(emit, o)) for o in operands]
        (a, b), (c, d) = parts
        with graph.inserting_before(vr):
            re = emit(aten.sub.Tensor, emit(aten.mul.Tensor, a, c), emit(aten.mul.Tensor, b, d))
            im = emit(aten.add.Tensor, emit(aten.mul.Tensor, a, d), emit(aten.mul.Tensor, b, c))
            new = emit(aten.cat.default, [emit(aten.unsqueeze.default, re, -1), emit(aten.unsqueeze.default, im, -1)],
                       -1)
        if tuple(new.meta["val"].shape) != tuple(vr.meta["val"].shape) or new.meta["val"].dtype != vr.meta["val"].dtype:
            continue  # a broadcast the real form does not reproduce: leave it (restore drops the new nodes)
        vr.replace_all_uses_with(new)
        out.rewrites.append(_Rewrite(vr, new))


def _is_complex_mul(p) -> bool:
    """``p`` multiplies two complex tensors of one precision: complex64 (fp32 parts), or complex128, whose float64
    form the RoPE evaluator then reports ("computed in float64") as for any float64 RoPE (complex32 has no mul on
    CPU and is left as it is)."""
    if not isinstance(p, Node) or p.op != "call_function" or p.target is not aten.mul.Tensor or p.kwargs:
        return False
    vals = [x.meta.get("val") if isinstance(x, Node) else None for x in (p, *p.args[:2])]
    return (all(isinstance(v, torch.Tensor) for v in vals) and vals[0].dtype in (torch.complex64, torch.complex128)
            and all(v.dtype == vals[0].dtype for v in vals))


# views keyed by their op and arguments (squeeze.dims is not: as before these sets came from one table)
_VIEW_OPS = ops_with(OpRole.RESHAPE, OpRole.UNIT_DIM, OpRole.PERMUTE, OpRole.BROADCAST, OpRole.SELECTION,
                     OpRole.ALIAS) - {aten.squeeze.dims}


def _view_key(n):
    """``n`` itself, or for a view the same key as another view made by the same op with the same arguments of the
    same tensor (a table reshaped once per RoPE call is one table: its parts are made once, and q's and k's RoPE
    read the same cos/sin nodes)."""
    if isinstance(n, Node) and n.op == "call_function" and n.target in _VIEW_OPS and not n.kwargs and n.args:
        return (n.target, _view_key(n.args[0]), tuple(tuple(a) if isinstance(a, list) else a for a in n.args[1:]))
    return n


def _parts(emit: Emitter, z: Node) -> tuple[Node, Node]:
    """The real and imaginary parts of complex ``z``: the real pairs it was viewed from, or a real view of it."""
    if z.target is aten.view_as_complex.default and isinstance(z.args[0], Node):
        pairs, table = z.args[0], False
    else:
        pairs, table = emit(aten.view_as_real.default, z), True
    parts = emit(aten.select.int, pairs, -1, 0), emit(aten.select.int, pairs, -1, 1)
    if table:  # a complex tensor of its own (``freqs_cis``), not real pairs viewed as complex: a table to the evaluator
        for n in (pairs, *parts):
            n.meta[COMPLEX_TABLE] = True
    return parts
