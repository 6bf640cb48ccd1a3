"""``torch.ops.fx_fusion.rope_kv_store``: registration, schema, opcheck, fake implementation, Python
wrapper, and the argument checks (every rejected call must leave the caches byte-identical).

On CPU the op's default implementation runs the Triton kernel through the interpreter (the conftest
sets ``TRITON_INTERPRET=1`` before the kernels are imported).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fx_fusion import kernels
from fx_fusion.kernels import launch as kernel_launch
from fx_fusion.kernels import rope_kv_kernel
from fx_fusion.kernels.rope_kv_cache import CacheLayout, RopeKVOptions, prepare, reference
from tests.kernels.test_rope_kv_cache import (
    INTERPRETED,
    KernelSpy,
    MAX_POSITION,
    TOLERANCES,
    addressed_rows,
    as_bytes,
    assert_cache,
    assert_outside_views_unchanged,
    base_of,
    exact_fp8_casts_in_interpreter,  # noqa: F401  (autouse fixture, applies to this module too)
    make_args,
    slots_per_row,
)

OP = torch.ops.fx_fusion.rope_kv_store
ARG_ORDER = ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "cos", "sin", "positions", "swa_table",
             "k_scale", "v_scale", "is_neox", "rotary_dim", "layout", "return_k", "validate",
             "negative_wraps", "table_dtype", "fp8_dtype", "quant_dtype", "scale_mul", "clamp", "check_slots",
             "check_positions", "q_fp8_dtype", "q_quant_dtype", "q_scale_mul", "q_clamp", "q_norm", "k_norm",
             "norm_eps", "norm_offset", "norm_round", "scale_round", "q_scale_round", "norm_full_width",
             "norm_after_rope", "q_scale", "q_norm_weight", "k_norm_weight")


def op_args(args: dict, *, return_k: bool = False, validate: bool = False, negative_wraps: bool = False) -> tuple:
    """The op's positional arguments from ``make_args``'s keyword arguments."""
    defaults = dict(RopeKVOptions().op_arguments(), q_scale=None, q_norm_weight=None, k_norm_weight=None)
    full = dict(defaults, **args, return_k=return_k, validate=validate, negative_wraps=negative_wraps)
    full["layout"] = CacheLayout(full["layout"]).value if isinstance(full["layout"], CacheLayout) else full["layout"]
    return tuple(full[name] for name in ARG_ORDER)


def randomize_caches(args: dict) -> dict:
    """Finite random cache contents (opcheck compares results and does not expect NaN)."""
    for name in ("k_cache", "v_cache"):
        c = args[name]
        c.copy_(torch.randn(c.shape, device=c.device).to(c.dtype))
    return args


def check_op(args: dict, *, return_k: bool = True, validate: bool = False) -> tuple:
    """Call the op and compare outputs and whole caches (buffers around cache views too) with the reference."""
    p = prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    snapshots = {id(base_of(c)): base_of(c).clone() for c in (p.k_cache, p.v_cache) if c._base is not None}
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, k_ref = reference(ref, return_k, compute_dtype=torch.float64)
    q_out, k_out = OP(*op_args(args, return_k=return_k, validate=validate,
                               negative_wraps=args.get("negative_wraps", False)))
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol)
    if return_k:
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol)
    else:
        assert k_out.shape == (0,)
    addressed = addressed_rows(p)
    assert_cache("k_cache", p.k_cache, before[0], ref.k_cache, addressed, p.options.layout)
    assert_cache("v_cache", p.v_cache, before[1], ref.v_cache, addressed, p.options.layout)
    assert_outside_views_unchanged([p.k_cache, p.v_cache], snapshots)
    return p, q_out, k_out


# --------------------------------------------------------------------------------------------------
# Registration and schema
# --------------------------------------------------------------------------------------------------


def test_registered():
    assert hasattr(torch.ops.fx_fusion, "rope_kv_store")
    assert isinstance(OP.default, torch._ops.OpOverload)
    name = "fx_fusion::rope_kv_store"
    for key in ("CompositeExplicitAutograd", "Meta"):  # one eager kernel for every device, fake
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), key
    assert [a.name for a in OP.default._schema.arguments] == list(ARG_ORDER)


def test_schema_mutates_only_the_caches():
    schema = OP.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    aliased = {a.name for a in schema.arguments if a.alias_info is not None}
    assert written == aliased == {"k_cache", "v_cache"}
    assert schema.is_mutable
    assert len(schema.returns) == 2 and all(r.alias_info is None for r in schema.returns)  # fresh outputs


@pytest.mark.parametrize("op", ["rope_kv_store", "mla_rope_store"])
def test_written_arguments_have_no_default(op):
    """torch 2.11's in-place bookkeeping of a custom op (``ADInplaceOrView``) indexes the written arguments by
    position, and the dispatcher leaves out trailing arguments equal to their defaults: a written argument with a
    default (the MLA op's ``k_pe_cache=None`` once was) fails every call that leaves it at its default with an
    ``IndexError`` there. torch 2.13 handles it, so this schema check is what CI can test."""
    schema = getattr(torch.ops.fx_fusion, op).default._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written and not [a.name for a in written if a.has_default_value()]


@pytest.mark.skipif(not INTERPRETED, reason="checks the CPU implementation under the interpreter")
def test_cpu_implementation_runs_the_kernel(monkeypatch):
    """Under the interpreter the CPU kernel is the Triton kernel, not the torch fallback."""
    spy = KernelSpy(rope_kv_kernel._rope_kv_store_kernel.arg_names)
    monkeypatch.setattr(kernel_launch, "_rope_kv_store_kernel", spy)
    OP(*op_args(make_args("cpu", T=3)))
    assert len(spy.launches) == 1


# --------------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------------

ALL_TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPCHECK_CASES = {
    # id: (make_args keyword arguments, extra arguments, return_k, test_utils)
    "token-fp16-packed": (dict(layout="token"), {}, False, ALL_TEST_UTILS),
    "paged-fp32-hf-gptj": (dict(layout="paged", dtype=torch.float32, table="hf", is_neox=False, qkv="3d"), {}, True,
                           ALL_TEST_UTILS),
    "sequence-bf16-partial": (dict(layout="sequence", batch=2, dtype=torch.bfloat16, rot=32), {}, True,
                              ALL_TEST_UTILS),
    # test_schema compares inputs before and after the call with arithmetic that CPU torch lacks for
    # fp8 ("mul_cpu_reduced_float" not implemented for Float8_e4m3fn): the other three apply.
    "token-fp8-scales-swa": (dict(layout="token", cache_dtype=torch.float8_e4m3fn, spare_rows=12),
                             dict(k_scale=0.5, v_scale=2.0, swa=True), False, ALL_TEST_UTILS[1:]),
}


QUICK_OPCHECK = ("token-fp16-packed", "token-fp8-scales-swa")  # the other layouts in the full suite


@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=() if i in QUICK_OPCHECK else pytest.mark.full)
                                  for i, c in OPCHECK_CASES.items()])
def test_opcheck(device, case):
    """opcheck's default test_utils (all four) on representative samples.

    The op has no autograd formula and the samples require no grad, so test_autograd_registration
    only checks that nothing claims one.
    """
    kw, extra, return_k, test_utils = case
    args = randomize_caches(make_args(device, T=3, Hq=4, Hkv=2, D=64, **kw))
    if "k_scale" in extra:
        args["k_scale"] = torch.tensor([extra["k_scale"]], device=device)
        args["v_scale"] = torch.tensor([extra["v_scale"]], device=device)
    if extra.get("swa"):
        n_slots = slots_per_row(prepare(**args))
        args["swa_table"] = torch.randperm(n_slots, device=device)[:8]
        args["slot_mapping"] = torch.tensor([5, -1, 2], device=device)
    torch.library.opcheck(OP.default, op_args(args, return_k=return_k), test_utils=test_utils)


# --------------------------------------------------------------------------------------------------
# Fake implementation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_k", [True, False])
@pytest.mark.parametrize("layout,qkv", [("token", "fused2d"), ("paged", "3d"), ("sequence", "transposed")])
def test_fake_shapes(layout, qkv, return_k):
    """Under FakeTensorMode the op returns q-shaped and k-shaped (or empty) outputs; validate is skipped."""
    real = make_args("cpu", T=5, Hq=6, Hkv=2, D=32, layout=layout, batch=2 if layout == "sequence" else 1, qkv=qkv)
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for n, x in real.items()}
        q_out, k_out = OP(*op_args(fake, return_k=return_k, validate=True))
    assert q_out.shape == real["q"].shape and q_out.dtype == real["q"].dtype and q_out.device == real["q"].device
    assert k_out.shape == (real["k"].shape if return_k else (0,)) and k_out.dtype == real["k"].dtype


def test_meta_device_shapes():
    """The Meta kernel: every tensor on the meta device."""
    args = {n: x.to("meta") if isinstance(x, torch.Tensor) else x
            for n, x in make_args("cpu", T=4, Hq=8, Hkv=2, D=48, rot=16, qkv="3d").items()}
    q_out, k_out = OP(*op_args(args, return_k=True))
    assert q_out.device.type == "meta" and q_out.shape == (4, 8, 48) and k_out.shape == (4, 2, 48)


def test_fake_rejects_bad_arguments():
    """The fake implementation runs the same argument checks, so a bad call fails at trace time."""
    real = make_args("cpu", T=4)
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for n, x in real.items()}
        fake["rotary_dim"] = 7
        with pytest.raises(ValueError, match="rotary_dim"):
            OP(*op_args(fake))


# --------------------------------------------------------------------------------------------------
# Python wrapper
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_k", [True, False])
@pytest.mark.parametrize("layout", [CacheLayout.TOKEN, "paged", CacheLayout.SEQUENCE])
@pytest.mark.parametrize("rot", [64, 32], ids=["full", "partial"])
def test_wrapper_cos_sin_cache(device, rot, layout, return_k):
    """``fx_fusion.kernels.rope_kv_store(..., cos_sin_cache=, positions=)``: rotary_dim from the table's width."""
    layout_name = CacheLayout(layout).value
    batch = 2 if layout_name == "sequence" else 1
    args = make_args(device, T=6, Hq=4, Hkv=2, D=64, rot=rot, layout=layout_name, batch=batch, is_neox=False)
    csc = torch.randn(MAX_POSITION, rot, device=device)
    args.update(cos=csc[:, : rot // 2], sin=csc[:, rot // 2:])
    p = prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, k_ref = reference(ref, return_k)
    q_out, k_out = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                         args["slot_mapping"], cos_sin_cache=csc, positions=args["positions"],
                                         is_neox=False, layout=layout, return_k=return_k)
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol)
    if return_k:
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol)
    else:
        assert k_out is None
    addressed = addressed_rows(p)
    assert_cache("k_cache", p.k_cache, before[0], ref.k_cache, addressed, p.options.layout)
    assert_cache("v_cache", p.v_cache, before[1], ref.v_cache, addressed, p.options.layout)


def test_wrapper_cos_sin_per_token(device):
    """``cos=``/``sin=`` per-token HF values; rotary_dim from cos's width."""
    args = make_args(device, T=5, D=32, table="hf", qkv="3d")
    p = prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, _ = reference(ref, False)
    q_out, k_out = kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                         args["slot_mapping"], cos=args["cos"], sin=args["sin"])
    torch.testing.assert_close(q_out, q_ref, atol=1e-3, rtol=1e-3)
    assert k_out is None
    assert_cache("k_cache", p.k_cache, before[0], ref.k_cache, addressed_rows(p), p.options.layout)
    assert_cache("v_cache", p.v_cache, before[1], ref.v_cache, addressed_rows(p), p.options.layout)


# --------------------------------------------------------------------------------------------------
# Argument checks: each bad call raises, names the argument, and writes nothing
# --------------------------------------------------------------------------------------------------


def _replace(**changes):
    return lambda a: a.update({n: (f(a) if callable(f) else f) for n, f in changes.items()})


META = torch.device("meta")
BAD_ARGUMENTS = {
    # id: (change to the valid token-layout fp16 problem, exception, match: the argument's name, not the wording)
    # dtypes
    "q-int32": (_replace(q=lambda a: a["q"].to(torch.int32)), TypeError, r"^q\b"),
    "q-float64": (_replace(q=lambda a: a["q"].double()), TypeError, r"^q\b"),
    "k-dtype": (_replace(k=lambda a: a["k"].float()), TypeError, r"^k\b"),
    "v-dtype": (_replace(v=lambda a: a["v"].bfloat16()), TypeError, r"^v\b"),
    "k_cache-dtype": (_replace(k_cache=lambda a: a["k_cache"].float()), TypeError, r"^k_cache\b"),
    "k_cache-int8": (_replace(k_cache=lambda a: a["k_cache"].to(torch.int8)), TypeError, r"^k_cache\b"),
    "v_cache-dtype": (_replace(v_cache=lambda a: a["v_cache"].float()), TypeError, r"^v_cache\b"),
    "slot_mapping-float": (_replace(slot_mapping=lambda a: a["slot_mapping"].float()), TypeError,
                           r"^slot_mapping\b"),
    "slot_mapping-int16": (_replace(slot_mapping=lambda a: a["slot_mapping"].short()), TypeError,
                           r"^slot_mapping\b"),
    "positions-float": (_replace(positions=lambda a: a["positions"].float()), TypeError, r"^positions\b"),
    "cos-int": (_replace(cos=lambda a: a["cos"].to(torch.int32)), TypeError, r"^cos\b"),
    "cos-float64": (_replace(cos=lambda a: a["cos"].double()), TypeError, r"^cos\b"),
    "sin-float64": (_replace(sin=lambda a: a["sin"].double()), TypeError, r"^sin\b"),
    "swa_table-float": (_replace(swa_table=lambda a: torch.arange(8.0)), TypeError, r"^swa_table\b"),
    "k_scale-fp64": (_replace(k_scale=lambda a: torch.ones(1, dtype=torch.float64)), TypeError,
                     r"^k_scale\b"),
    # devices (meta stands in for a second device)
    "q-device": (_replace(q=lambda a: a["q"].to(META)), ValueError, r"\bq is on meta"),
    "k-device": (_replace(k=lambda a: a["k"].to(META)), ValueError, r"^k\b"),
    "v-device": (_replace(v=lambda a: a["v"].to(META)), ValueError, r"^v\b"),
    "k_cache-device": (_replace(k_cache=lambda a: a["k_cache"].to(META)), ValueError, r"^k_cache\b"),
    "v_cache-device": (_replace(v_cache=lambda a: a["v_cache"].to(META)), ValueError, r"^v_cache\b"),
    "slot_mapping-device": (_replace(slot_mapping=lambda a: a["slot_mapping"].to(META)), ValueError,
                            r"^slot_mapping\b"),
    "positions-device": (_replace(positions=lambda a: a["positions"].to(META)), ValueError, r"^positions\b"),
    "cos-device": (_replace(cos=lambda a: a["cos"].to(META)), ValueError, r"^cos\b"),
    "swa_table-device": (_replace(swa_table=lambda a: torch.arange(8, device=META)), ValueError,
                         r"^swa_table\b"),
    # shapes
    "k-fewer-tokens": (_replace(k=lambda a: a["k"][:-1]), ValueError, r"^k\b"),
    "v-fewer-tokens": (_replace(v=lambda a: a["v"][:-1]), ValueError, r"^v\b"),
    "k-heads": (_replace(k=lambda a: a["k"][:, :1]), ValueError, r"^k\b"),
    "q-heads-not-multiple": (_replace(q=lambda a: a["q"][:, :3]), ValueError, r"^q\b"),
    "q-2d-not-multiple": (_replace(q=lambda a: a["q"].flatten(1)[:, :-8]), ValueError, r"^q\b"),
    "q-4d": (_replace(q=lambda a: a["q"][None]), ValueError, r"^q\b"),
    "cache-head_dim": (_replace(k_cache=lambda a: a["k_cache"][..., :16], v_cache=lambda a: a["v_cache"][..., :16]),
                       ValueError, r"the caches have 16"),  # the message names q and the caches
    "k_cache-ndim": (_replace(k_cache=lambda a: a["k_cache"][None], v_cache=lambda a: a["v_cache"][None]),
                     ValueError, r"^k_cache\b"),
    "v_cache-shape": (_replace(v_cache=lambda a: a["v_cache"][:-1]), ValueError, r"^v_cache\b"),
    "slot_mapping-length": (_replace(slot_mapping=lambda a: torch.arange(6)), ValueError,
                            r"^slot_mapping\b"),
    "slot_mapping-2d": (_replace(slot_mapping=lambda a: a["slot_mapping"][None]), ValueError,
                        r"^slot_mapping\b"),
    "positions-length": (_replace(positions=lambda a: a["positions"][:-1]), ValueError, r"^positions\b"),
    "swa_table-2d": (_replace(swa_table=lambda a: torch.arange(8)[None]), ValueError, r"^swa_table\b"),
    "k_scale-two-values": (_replace(k_cache=lambda a: a["k_cache"].to(torch.float8_e4m3fn),
                                    v_cache=lambda a: a["v_cache"].to(torch.float8_e4m3fn),
                                    k_scale=lambda a: torch.ones(2)), ValueError, r"^k_scale\b"),
    # rotary
    "rotary_dim-odd": (_replace(rotary_dim=31), ValueError, r"^rotary_dim\b"),
    "rotary_dim-too-large": (_replace(rotary_dim=64), ValueError, r"^rotary_dim\b"),
    "rotary_dim-zero": (_replace(rotary_dim=0), ValueError, r"^rotary_dim\b"),
    "cos-features": (_replace(cos=lambda a: a["cos"][:, :5], sin=lambda a: a["sin"][:, :5]), ValueError,
                     r"^cos\b"),
    "sin-shape": (_replace(sin=lambda a: a["sin"][:-1]), ValueError, r"^sin\b"),
    "cos-3d-with-positions": (_replace(cos=lambda a: a["cos"][None], sin=lambda a: a["sin"][None]), ValueError,
                              r"^cos\b"),
    "cos-per-token-rows": (_replace(positions=None, cos=lambda a: a["cos"][:6], sin=lambda a: a["sin"][:6]),
                           ValueError, r"^cos\b"),
    # fp8 scales, layout
    "k_scale-not-fp8": (_replace(k_scale=lambda a: torch.ones(1)), ValueError, r"^k_scale\b"),
    "v_scale-not-fp8": (_replace(v_scale=lambda a: torch.ones(1)), ValueError, r"^v_scale\b"),
    "layout-unknown": (_replace(layout="blocked"), ValueError, r"^layout\b"),
    "layout-paged-3d-cache": (_replace(layout="paged"), ValueError, r"^k_cache\b"),
    "layout-sequence-3d-q": (_replace(layout="sequence", k_cache=lambda a: a["k_cache"][None].transpose(1, 2),
                                      v_cache=lambda a: a["v_cache"][None].transpose(1, 2)), ValueError,
                             r"^q\b"),
    # non-tensor arguments that reach the op's Python code (the dispatcher passes None through)
    "q-none": (_replace(q=None), TypeError, r"^q\b"),
    "k_cache-none": (_replace(k_cache=None), TypeError, r"^k_cache\b"),
    "slot_mapping-none": (_replace(slot_mapping=None), TypeError, r"^slot_mapping\b"),
    "cos-none": (_replace(cos=None), TypeError, r"^cos\b"),
}

VALIDATE_ERRORS = {
    # id: (change, match): rejected only with validate=True (a device sync)
    "slot-beyond-cache": (_replace(slot_mapping=lambda a: a["slot_mapping"].index_fill(0, torch.tensor([2]), 12)),
                          r"^slot_mapping\b"),
    "position-beyond-table": (_replace(positions=lambda a: a["positions"].index_fill(0, torch.tensor([1]),
                                                                                   MAX_POSITION)),
                              r"^positions\b"),
    "position-negative": (_replace(positions=lambda a: a["positions"].index_fill(0, torch.tensor([4]), -1)),
                          r"^positions\b"),
    "swa-loc-beyond-cache": (_replace(swa_table=lambda a: torch.tensor([0, 1, 2, 3, 4, 5, 6, 40]),
                                      slot_mapping=lambda a: torch.tensor([7, 0, 1, -1, 2])),
                             r"^swa_table\b"),
    "slot-beyond-swa-table": (_replace(swa_table=lambda a: torch.arange(8), slot_mapping=lambda a: torch.tensor(
        [0, 8, 1, 2, 3])), r"^slot_mapping\b"),
}


def valid_token_problem() -> dict:
    """T = 5 tokens, Hq = 4, Hkv = 2, D = 32, 12 cache rows (fp16, token layout, packed table)."""
    return make_args("cpu", T=5, Hq=4, Hkv=2, D=32, qkv="3d", spare_rows=7)


def assert_rejected(args: dict, exc, match: str, *, validate: bool = False) -> None:
    caches = {n: (x, as_bytes(x).clone()) for n, x in args.items()
              if n.endswith("cache") and isinstance(x, torch.Tensor) and x.device.type != "meta"}
    with pytest.raises(exc, match=match):
        OP(*op_args(args, validate=validate))
    for name, (cache, before) in caches.items():
        assert torch.equal(as_bytes(cache), before), f"{name} changed by a rejected call"


@pytest.mark.parametrize("change,exc,match", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument(change, exc, match):
    args = valid_token_problem()
    originals = (args["k_cache"], args["v_cache"], as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    change(args)
    assert_rejected(args, exc, match)
    assert torch.equal(as_bytes(originals[0]), originals[2]) and torch.equal(as_bytes(originals[1]), originals[3])


@pytest.mark.parametrize("change,match", VALIDATE_ERRORS.values(), ids=VALIDATE_ERRORS.keys())
def test_validate_rejects_out_of_range(change, match):
    args = valid_token_problem()
    change(args)
    assert_rejected(args, ValueError, match, validate=True)


def test_validate_accepts_negative_slots(device):
    """Negative slots (at either level) mean "no store" and are valid input."""
    args = make_args(device, T=5, Hq=4, Hkv=2, D=32, qkv="3d", spare_rows=7)
    args.update(swa_table=torch.tensor([3, -1, 5, 7, 0, 11, 2, 9], device=device),
                slot_mapping=torch.tensor([0, -1, 1, 5, -4], device=device))
    check_op(args, validate=True)


@pytest.mark.parametrize("argument", ["q", "positions", "rotary_dim", "layout"])
def test_wrong_python_type_rejected_by_the_dispatcher(argument):
    """A list for a tensor, a float for an int, an int for a str never reach the op's Python code: the
    dispatcher's schema parser raises RuntimeError (not TypeError) naming the argument. Caches stay
    untouched."""
    args = valid_token_problem()
    args[argument] = {"rotary_dim": 2.5, "layout": 3}.get(argument, [1, 2, 3])
    assert_rejected(args, RuntimeError, rf"argument '{argument}'")


WRAPPER_ERRORS = {
    "cos_sin_cache-and-cos": (dict(cos_sin_cache=True, cos=True, sin=True), r"either cos_sin_cache or cos/sin"),
    "cos_sin_cache-no-positions": (dict(cos_sin_cache=True, positions=None), r"^cos_sin_cache needs positions"),
    "cos_sin_cache-3d": (dict(cos_sin_cache="3d"), r"^cos_sin_cache must be a \[max_position, rotary_dim\] tensor"),
    "cos_sin_cache-list": (dict(cos_sin_cache="list"), r"^cos_sin_cache must be a .* got list"),
    "no-table": (dict(), r"as cos_sin_cache \(with positions\) or as cos and sin"),
    "cos-without-sin": (dict(cos=True), r"as cos_sin_cache \(with positions\) or as cos and sin"),
}


@pytest.mark.parametrize("change,match", WRAPPER_ERRORS.values(), ids=WRAPPER_ERRORS.keys())
def test_wrapper_bad_table(change, match):
    args = valid_token_problem()
    csc = torch.cat([args["cos"], args["sin"]], dim=-1)
    table = {True: csc, "3d": csc[None], "list": csc.tolist()}
    kw = dict(positions=args["positions"])
    for name, value in change.items():
        kw[name] = None if value is None else (table[value] if name == "cos_sin_cache" else args[name])
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(ValueError, match=match):
        kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                              args["slot_mapping"], **kw)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])


def test_wrapper_unknown_layout_names_the_argument():
    args = valid_token_problem()
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(ValueError, match="layout"):
        kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                              args["slot_mapping"], cos=args["cos"], sin=args["sin"], positions=args["positions"],
                              rotary_dim=args["rotary_dim"], layout="blocked")
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])


# --------------------------------------------------------------------------------------------------
# validate=False: out-of-range indices are skipped or clamped, never dereferenced
# --------------------------------------------------------------------------------------------------


def guarded_caches(layout: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches shaped like ``like``, views into NaN buffers with guard rows before and after them."""
    shape = tuple(like.shape)
    if layout == "token":
        padded, view = (shape[0] + 6, *shape[1:]), (slice(3, -3),)
    elif layout == "paged":
        padded, view = (shape[0] + 2, *shape[1:]), (slice(1, -1),)
    else:
        padded, view = (*shape[:2], shape[2] + 8, shape[3]), (slice(None), slice(None), slice(4, -4))
    bufs = [torch.full(padded, float("nan"), dtype=like.dtype, device=like.device) for _ in range(2)]
    return tuple(b[view] for b in bufs)


@pytest.mark.parametrize("layout", ["token", "paged", "sequence"])
def test_out_of_range_slots_skipped_without_validate(device, layout):
    """Slots past the cache (just past, far past) are skipped: the guard rows around the cache stay intact."""
    batch = 2 if layout == "sequence" else 1
    args = make_args(device, T=8, Hq=4, Hkv=2, D=32, layout=layout, batch=batch, dtype=torch.float32)
    args["k_cache"], args["v_cache"] = guarded_caches(layout, args["k_cache"])
    n_slots = slots_per_row(prepare(**args))
    slots = args["slot_mapping"].clone()
    slots[[1, 3, 4, 6]] = torch.tensor([n_slots, n_slots + 1, n_slots + 3, 2**40], device=device)
    args["slot_mapping"] = slots
    p, *_ = check_op(args)
    assert int(addressed_rows(p).sum()) == 4 * batch


def test_out_of_range_swa_entries_skipped_without_validate(device):
    args = make_args(device, T=6, Hq=4, Hkv=2, D=32, dtype=torch.float32)
    args["k_cache"], args["v_cache"] = guarded_caches("token", args["k_cache"])
    n_slots = slots_per_row(prepare(**args))
    args["swa_table"] = torch.tensor([0, n_slots, 2, n_slots + 3, 4, -1], device=device)
    # entries 1 and 3 map past the cache, 5 is negative; locs 6 and 100 lie past the table
    args["slot_mapping"] = torch.tensor([0, 1, 2, 3, 6, 100], device=device)
    p, *_ = check_op(args)
    assert int(addressed_rows(p).sum()) == 2


def test_out_of_range_positions_clamped_without_validate(device):
    """Positions outside the table read its first or last row (documented), never outside it."""
    args = make_args(device, T=4, Hq=2, Hkv=1, D=32, dtype=torch.float32)
    bad = torch.tensor([-5, MAX_POSITION, MAX_POSITION + 1000, 7], device=device)
    clamped = bad.clamp(0, MAX_POSITION - 1)
    q_bad, _ = OP(*op_args(dict(args, positions=bad)))
    q_clamped, _ = OP(*op_args(dict(args, positions=clamped)))
    assert torch.equal(q_bad, q_clamped)
