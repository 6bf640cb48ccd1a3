"""``patterns/slice_writes.py``: a buffer written slice by slice over its whole last dim becomes the cat of the writes,
and nothing else does. Each case traces a function as AOTAutograd does (functionalized, views kept, fake values),
runs the rule, and compares the rewritten graph's result with the function's own, bit for bit, on fresh random
values."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fx_fusion.patterns.slice_writes import assemble_as_cat

aten = torch.ops.aten
T, H, L, R = 5, 3, 8, 4


def traced(fn, *args) -> torch.fx.GraphModule:
    return make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode="fake")(*args)


def rewrite(fn, *args) -> tuple[int, torch.fx.GraphModule]:
    """(writes replaced, the rewritten graph); the graph's result equals ``fn``'s, bit for bit."""
    gm = traced(fn, *args)
    changed = assemble_as_cat(gm.graph)
    gm.graph.lint()
    gm.recompile()
    want, got = fn(*[a.clone() for a in args]), gm(*[a.clone() for a in args])
    for w, g in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        assert w.dtype == g.dtype and w.shape == g.shape and torch.equal(w, g)
    return changed, gm


def count(gm, target) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=target))


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(T, H, L, generator=g, dtype=dtype), torch.randn(T, H, R, generator=g, dtype=dtype),
            torch.randn(T, L + R, generator=g, dtype=dtype)]


def sglang_q(q_nope, q_pe, latent):
    """forward_absorb's q: a new buffer, written in two slices."""
    q = q_nope.new_empty(T, H, L + R)
    q[..., :L] = q_nope * 2
    q[..., L:] = q_pe + 1
    return q


def sglang_latent(q_nope, q_pe, latent):
    """forward_absorb's latent row: the projection's output, written in place through an unsqueezed view."""
    x = (latent * 1.5).unsqueeze(1)
    x[..., :L] = q_nope[:, :1] - 1
    x[..., L:] = q_pe[:, :1] * 3
    return x


def tail_first(q_nope, q_pe, latent):
    q = torch.empty(T, H, L + R)
    q[..., L:] = q_pe
    q[..., :L] = q_nope
    return q


def three_writes(q_nope, q_pe, latent):
    q = torch.empty(T, H, L + R)
    q[..., :2] = q_nope[..., :2]
    q[..., 2:L] = q_nope[..., 2:] * 2
    q[..., L:] = q_pe
    return q


def broadcast_and_cast(q_nope, q_pe, latent):
    """SGLang's prefill k: the one rotated k_pe head broadcast over the heads; a bf16 value into an fp32 buffer."""
    k = torch.empty(T, H, L + R)
    k[..., :L] = q_nope.to(torch.bfloat16)
    k[..., L:] = q_pe[:, :1]
    return k


@pytest.mark.parametrize("fn, writes", [(sglang_q, 2), (sglang_latent, 2), (tail_first, 2), (three_writes, 3),
                                        (broadcast_and_cast, 2)])
def test_buffers_written_whole_become_cats(fn, writes):
    changed, gm = rewrite(fn, *inputs())
    assert changed == writes
    assert count(gm, aten.slice_scatter.default) == 0 and count(gm, aten.copy.default) == 0
    assert count(gm, aten.cat.default) == 1


def partial(q_nope, q_pe, latent):
    """A buffer whose head keeps its own values (SGLang's prefill q: only the rotated tail is written)."""
    q = torch.cat([q_nope, q_pe], -1) * 2
    q[..., L:] = q_pe
    return q


def read_between(q_nope, q_pe, latent):
    q = torch.empty(T, H, L + R).fill_(7.0)
    q[..., :L] = q_nope
    seen = q.sum(-1)  # the buffer with its tail not written yet
    q[..., L:] = q_pe
    return q, seen


def overlapping(q_nope, q_pe, latent):
    q = torch.empty(T, H, L + R)
    q[..., :L + 1] = torch.cat([q_nope, q_pe[..., :1]], -1)
    q[..., L:] = q_pe
    return q


def other_dim(q_nope, q_pe, latent):
    q = torch.empty(T, H + 1, L)
    q[:, :H] = q_nope
    q[:, H:] = q_nope[:, :1] * 2
    return q


def into_an_input(q_nope, q_pe, latent):
    """A graph input written in two slices (a cache's two halves: ``mla_halves.py``'s, never this rule's)."""
    latent[:, :L] = q_nope[:, 0] * 2
    latent[:, L:] = q_pe[:, 0]
    return latent * 1


@pytest.mark.parametrize("fn", [partial, read_between, overlapping, other_dim, into_an_input])
def test_other_writes_stay(fn):
    changed, gm = rewrite(fn, *inputs())
    assert changed == 0
    assert count(gm, aten.slice_scatter.default) >= 1
