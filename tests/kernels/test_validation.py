"""Argument checks of ``torch.ops.fx_fusion.rope_kv_store`` and its Python wrapper that guard against
silently wrong results: inputs aliasing the caches, an ambiguous rotary table width, empty head
dims, caches that eager mode refuses to write. Every rejected call leaves the caches byte-identical.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fx_fusion import kernels
from fx_fusion.kernels.rope_kv_cache import prepare, reference
from tests.kernels.test_op import OP, assert_rejected, op_args, valid_token_problem
from tests.kernels.test_rope_kv_cache import (
    MAX_POSITION,
    TOLERANCES,
    addressed_rows,
    as_bytes,
    assert_cache,
    make_args,
)

# --------------------------------------------------------------------------------------------------
# q, k, v overlapping the caches
# --------------------------------------------------------------------------------------------------


def _alias(name: str, cache: str, rows: slice = slice(0, 5)):
    """Replace ``name`` by rows of ``cache`` (as [T, Hkv, D]) and reverse the slots so each token's
    store overwrites another token's input: a result that depends on program order."""
    def change(a: dict) -> None:
        a[name] = a[cache][rows]
        a["slot_mapping"] = torch.arange(4, -1, -1)
    return change


ALIASES = {
    "k-in-k_cache": (_alias("k", "k_cache"), r"^k overlaps k_cache"),
    "v-in-v_cache": (_alias("v", "v_cache"), r"^v overlaps v_cache"),
    "k-in-v_cache": (_alias("k", "v_cache"), r"^k overlaps v_cache"),
    "v-in-k_cache": (_alias("v", "k_cache"), r"^v overlaps k_cache"),
    # q has 4 heads, the cache 2: two cache rows per token, rows 0..9 of the cache
    "q-in-k_cache": (lambda a: a.update(q=a["k_cache"][:10].reshape(5, 4, 32)), r"^q overlaps k_cache"),
    # partial overlap: k's last row is the cache's first
    "k-straddles-k_cache": (None, r"^k overlaps k_cache"),
}


def _straddling(a: dict) -> None:
    """k_cache = buf[4:], k = buf[:5]: one shared row, reached through different offsets."""
    buf = torch.empty(4 + a["k_cache"].shape[0], *a["k_cache"].shape[1:], dtype=a["k_cache"].dtype)
    buf.copy_(torch.randn(buf.shape).to(buf.dtype))
    a["k_cache"] = buf[4:]
    a["k"] = buf[:5]


@pytest.mark.parametrize("change,match", ALIASES.values(), ids=ALIASES.keys())
def test_inputs_overlapping_the_caches_rejected(change, match):
    args = valid_token_problem()
    (change or _straddling)(args)
    assert_rejected(args, ValueError, match)


@pytest.mark.parametrize("change,match", ALIASES.values(), ids=ALIASES.keys())
def test_overlap_rejected_at_trace_time(change, match):
    """The fake implementation sees the same overlap (shared fake storage), without data pointers."""
    args = valid_token_problem()
    (change or _straddling)(args)
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for n, x in args.items()}
        with pytest.raises(ValueError, match=match):
            OP(*op_args(fake))


def test_disjoint_views_of_one_buffer_accepted(device):
    """k and v read from rows of one buffer the caches also live in, but rows the op never writes."""
    args = make_args(device, T=5, Hq=4, Hkv=2, D=32, qkv="3d", dtype=torch.float32)
    n = args["k_cache"].shape[0]
    buf = torch.randn(2 * n + 10, 2, 32, device=device)
    args["k_cache"], args["v_cache"] = buf[:n].fill_(float("nan")), buf[n:2 * n].fill_(float("nan"))
    args["k"], args["v"] = buf[2 * n:2 * n + 5], buf[2 * n + 5:]
    check_against_reference(args, lambda: OP(*op_args(args)))


def test_interleaved_kv_cache_accepted(device):
    """vLLM-style ``kv[:, 0]`` / ``kv[:, 1]`` caches share a storage with each other: that is fine."""
    args = make_args(device, T=5, Hq=4, Hkv=2, D=32, qkv="3d", dtype=torch.float32)
    kv = torch.full((args["k_cache"].shape[0], 2, 2, 32), float("nan"), device=device)
    args["k_cache"], args["v_cache"] = kv[:, 0], kv[:, 1]
    check_against_reference(args, lambda: OP(*op_args(args)))


# --------------------------------------------------------------------------------------------------
# rotary_dim from the table's width
# --------------------------------------------------------------------------------------------------


def _wrapper_call(args: dict, **kw):
    return kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                 args["slot_mapping"], **kw)


def check_against_reference(args: dict, call, rotary_dim: int | None = None) -> None:
    """``call()`` (the op or the wrapper on ``args``): its q_out and both whole caches against the float64
    reference (computed with ``rotary_dim`` when given)."""
    p = prepare(**(args if rotary_dim is None else dict(args, rotary_dim=rotary_dim)))
    before = (p.k_cache.clone(), p.v_cache.clone())
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, _ = reference(ref, False)
    q_out, _ = call()
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref.to(q_out.dtype), atol=atol, rtol=rtol)
    assert_cache("k_cache", p.k_cache.detach(), before[0], ref.k_cache, addressed_rows(p), p.options.layout)
    assert_cache("v_cache", p.v_cache.detach(), before[1], ref.v_cache, addressed_rows(p), p.options.layout)


def _check_wrapper(args: dict, ref_rotary_dim: int, **kw) -> None:
    """The wrapper's q_out and caches against the float64 reference computed with ``ref_rotary_dim``."""
    check_against_reference(args, lambda: _wrapper_call(args, **kw), rotary_dim=ref_rotary_dim)


def test_wrapper_per_pair_tables_need_rotary_dim(device):
    """cos/sin halves of a cos_sin_cache ([P, R/2]) are ambiguous without rotary_dim: R/2 could also be
    a per-feature table for a partial rotary dim R/2. The wrapper asks instead of guessing R/2."""
    args = make_args(device, T=5, Hq=4, Hkv=2, D=64, qkv="3d", is_neox=False)
    assert args["cos"].shape[-1] == 32  # per pair
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(ValueError, match=r"^rotary_dim\b.*cos has 32 features"):
        _wrapper_call(args, cos=args["cos"], sin=args["sin"], positions=args["positions"], is_neox=False)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])
    _check_wrapper(args, 64, cos=args["cos"], sin=args["sin"], positions=args["positions"], is_neox=False,
                   rotary_dim=64)


def test_prepare_per_pair_tables_need_rotary_dim():
    args = dict(valid_token_problem(), rotary_dim=None)
    with pytest.raises(ValueError, match=r"^rotary_dim\b"):
        prepare(**args)


@pytest.mark.parametrize("D,rot", [(64, 64), (80, 48)], ids=["full", "partial-wider-than-half"])
def test_rotary_dim_inferred_when_unambiguous(device, D, rot):
    """Per-feature tables wider than half the head dim can only be per feature: rotary_dim = width."""
    args = make_args(device, T=5, Hq=4, Hkv=2, D=D, rot=rot, qkv="3d", table="hf")
    assert args["cos"].shape[-1] == rot
    assert prepare(**dict(args, rotary_dim=None)).options.rotary_dim == rot
    _check_wrapper(args, rot, cos=args["cos"], sin=args["sin"])


def test_wrapper_cos_sin_cache_wider_than_rotary_dim(device):
    args = make_args(device, T=5, Hq=4, Hkv=2, D=64, rot=32, qkv="3d")
    csc = torch.randn(MAX_POSITION, 64, device=device)
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(ValueError, match=r"^cos_sin_cache has 64 columns.*rotary_dim=32"):
        _wrapper_call(args, cos_sin_cache=csc, positions=args["positions"], rotary_dim=32)
    with pytest.raises(ValueError, match=r"^cos_sin_cache has 63 columns"):
        _wrapper_call(args, cos_sin_cache=csc[:, :63], positions=args["positions"])
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])
    # the matching width with an explicit rotary_dim is accepted
    args.update(cos=csc[:, :16], sin=csc[:, 16:32])
    _check_wrapper(args, 32, cos_sin_cache=csc[:, :32], positions=args["positions"], rotary_dim=32)


# --------------------------------------------------------------------------------------------------
# Empty head dims
# --------------------------------------------------------------------------------------------------

EMPTY = {
    "zero-kv-heads": (lambda a: a.update(k=a["k"][:, :0], v=a["v"][:, :0], k_cache=a["k_cache"][:, :0],
                                         v_cache=a["v_cache"][:, :0]), r"^k_cache\b.*kv head"),
    "zero-head_dim-2d-q": (lambda a: a.update(q=a["q"].flatten(1), k=a["k"].flatten(1), v=a["v"].flatten(1),
                                              k_cache=a["k_cache"][..., :0], v_cache=a["v_cache"][..., :0]),
                           r"^k_cache\b.*head_dim"),
    "zero-head_dim-3d-q": (lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0],
                                              k_cache=a["k_cache"][..., :0], v_cache=a["v_cache"][..., :0]),
                           r"^k_cache\b.*head_dim"),
    "zero-q-heads": (lambda a: a.update(q=a["q"][:, :0]), r"^q has 0 heads"),
}


@pytest.mark.parametrize("change,match", EMPTY.values(), ids=EMPTY.keys())
def test_empty_heads_rejected(change, match):
    args = valid_token_problem()
    change(args)
    assert_rejected(args, ValueError, match)


# --------------------------------------------------------------------------------------------------
# Caches eager mode refuses to write
# --------------------------------------------------------------------------------------------------


def test_inference_cache_outside_inference_mode_rejected():
    args = valid_token_problem()
    with torch.inference_mode():
        args["k_cache"] = args["k_cache"].clone()
    assert args["k_cache"].is_inference()
    with pytest.raises(RuntimeError, match="inference tensor"):  # what eager does
        args["k_cache"][0] = 1.0
    assert_rejected(args, RuntimeError, r"^k_cache is an inference tensor")


def test_inference_cache_inside_inference_mode_accepted():
    args = valid_token_problem()
    with torch.inference_mode():
        args["k_cache"], args["v_cache"] = args["k_cache"].clone(), args["v_cache"].clone()
        check_against_reference(args, lambda: OP(*op_args(args)))


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
@pytest.mark.parametrize("view", [False, True], ids=["leaf", "view-of-leaf"])
def test_cache_requiring_grad_rejected_by_the_wrapper(which, view):
    args = valid_token_problem()
    leaf = args[which].clone().requires_grad_()
    args[which] = leaf[:] if view else leaf
    with pytest.raises(RuntimeError, match="requires grad"):  # what eager does
        args[which][0] = 1.0
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(RuntimeError, match=rf"^{which} requires grad"):
        _wrapper_call(args, cos=args["cos"], sin=args["sin"], positions=args["positions"], rotary_dim=32)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])
    with pytest.raises(RuntimeError, match=rf"^{which} requires grad"):
        prepare(**args)


@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
def test_cache_requiring_grad_rejected_by_the_op(name):
    """A direct op call, as eager ``cache[slot] = x`` with grad on: raised before anything is written."""
    args = valid_token_problem()
    args[name] = args[name].clone().requires_grad_()
    assert_rejected(args, RuntimeError, rf"^{name} requires grad")


def test_q_requiring_grad_keeps_autograd_honest():
    """The cache check must not cut q off from autograd: backward raises (no formula) instead of a silent zero."""
    args = valid_token_problem()
    args["q"] = args["q"].clone().requires_grad_()
    q_out, _ = OP(*op_args(args))
    assert q_out.requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula"):
        q_out.sum().backward()


def test_cache_requiring_grad_accepted_under_no_grad():
    """Eager writes a leaf that requires grad under ``torch.no_grad()``; so does the op."""
    args = valid_token_problem()
    args["k_cache"].requires_grad_()
    with torch.no_grad():
        check_against_reference(args, lambda: OP(*op_args(args)))


def test_fake_does_not_check_writability():
    """At trace time the run's grad/inference mode is not known yet: only the real kernels check."""
    args = valid_token_problem()
    args["k_cache"].requires_grad_()
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for n, x in args.items()}
        q_out, _ = OP(*op_args(fake))
    assert q_out.shape == args["q"].shape
