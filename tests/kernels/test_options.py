"""``RopeKVOptions``: the one description of the op's non-tensor options.

The op's schema is built from its fields (names, order, defaults); ``prepare`` and the public wrapper take them by
keyword (an unknown name is a ``TypeError`` naming it); the values reach the kernel's problem unchanged, called
eagerly and through ``torch.compile`` on CPU; the dataclass is frozen and hashable.
"""

from __future__ import annotations

import dataclasses
import enum

import pytest
import torch

from fx_fusion import kernels
from fx_fusion.kernels import ops
from fx_fusion.kernels.options import CacheLayout, RopeKVOptions
from fx_fusion.kernels.problem import prepare
from fx_fusion.kernels.reference import reference
from tests.kernels.test_op import ARG_ORDER
from tests.kernels.test_rope_kv_cache import TOLERANCES, as_bytes, make_args

OP = torch.ops.fx_fusion.rope_kv_store
TENSORS = ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "cos", "sin", "positions", "swa_table", "k_scale",
           "v_scale")
LATER_TENSORS = ("q_scale", "q_norm_weight", "k_norm_weight")  # added after the options, last: callers passing options by position keep working
FIELDS = dataclasses.fields(RopeKVOptions)


# --------------------------------------------------------------------------------------------------
# The schema is the fields
# --------------------------------------------------------------------------------------------------


def test_schema_is_the_tensors_then_exactly_the_fields():
    """Names and order: the tensors, then one argument per field in field order (the op's argument order, which
    callers by position rely on, is ``ARG_ORDER``); defaults: the fields' (an enum's value)."""
    arguments = OP.default._schema.arguments
    assert [a.name for a in arguments] == [*TENSORS, *(f.name for f in FIELDS), *LATER_TENSORS] == list(ARG_ORDER)
    assert not any(a.has_default_value() for a in arguments[:len(TENSORS)])
    for arg, field in zip(arguments[len(TENSORS):len(TENSORS) + len(FIELDS)], FIELDS, strict=True):
        want = field.default.value if isinstance(field.default, enum.Enum) else field.default
        assert arg.has_default_value(), arg.name
        assert arg.default_value == want and type(arg.default_value) is type(want), (arg.name, arg.default_value)
        assert not arg.kwarg_only, arg.name


def test_schema_types_follow_the_field_types():
    types = {a.name: str(a.type) for a in OP.default._schema.arguments[len(TENSORS):-len(LATER_TENSORS)]}
    assert types == {
        "is_neox": "bool", "rotary_dim": "Optional[int]", "layout": "str", "return_k": "bool", "validate": "bool",
        "negative_wraps": "bool", "table_dtype": "Optional[int]", "fp8_dtype": "Optional[int]",
        "quant_dtype": "Optional[int]", "scale_mul": "bool", "clamp": "Optional[List[float]]",
        "check_slots": "bool", "check_positions": "bool", "q_fp8_dtype": "Optional[int]",
        "q_quant_dtype": "Optional[int]", "q_scale_mul": "bool", "q_clamp": "Optional[List[float]]",
        "q_norm": "bool", "k_norm": "bool", "norm_eps": "float", "norm_offset": "float", "norm_round": "bool",
        "scale_round": "bool", "q_scale_round": "bool", "norm_full_width": "bool", "norm_after_rope": "bool",
    }


# --------------------------------------------------------------------------------------------------
# Each field's own checks
# --------------------------------------------------------------------------------------------------


def test_defaults():
    o = RopeKVOptions()
    assert o.is_neox is True and o.rotary_dim is None and o.layout is CacheLayout.TOKEN
    assert not any(getattr(o, name) for name in ("return_k", "validate", "negative_wraps", "scale_mul",
                                                 "check_slots", "check_positions"))
    assert o.table_dtype is o.fp8_dtype is o.quant_dtype is o.clamp is None


def test_values_are_normalised():
    o = RopeKVOptions(layout="paged", clamp=[-2, 448], is_neox=0, return_k=1)
    assert o.layout is CacheLayout.PAGED
    assert o.clamp == (-2.0, 448.0) and type(o.clamp) is tuple and all(type(c) is float for c in o.clamp)
    assert o.is_neox is False and o.return_k is True


BAD_OPTIONS = {
    # id: (keyword arguments, exception, match: the field's name first)
    "layout-unknown": (dict(layout="blocked"), ValueError,
                       r"^layout must be one of \['token', 'paged', 'sequence', 'paged_x', 'paged_x_shuffled'\], "
                       r"got 'blocked'"),
    "layout-int": (dict(layout=3), ValueError, r"^layout\b"),
    "is_neox-str": (dict(is_neox="no"), TypeError, r"^is_neox must be a bool, got 'no' \(str\)"),
    "validate-none": (dict(validate=None), TypeError, r"^validate must be a bool"),
    "check_slots-2": (dict(check_slots=2), TypeError, r"^check_slots must be a bool"),
    "table_dtype-fp8": (dict(table_dtype=torch.float8_e4m3fn), ValueError, r"^table_dtype must be one of"),
    "fp8_dtype-bf16": (dict(fp8_dtype=torch.bfloat16), ValueError, r"^fp8_dtype must be None or one of"),
    "quant_dtype-fp64": (dict(quant_dtype=torch.float64), ValueError, r"^quant_dtype must be None or one of"),
    "clamp-three": (dict(clamp=(1.0, 2.0, 3.0)), ValueError, r"^clamp must be None or two numbers"),
    "clamp-bool": (dict(clamp=(True, 2.0)), ValueError, r"^clamp must be None or two numbers"),
    "clamp-reversed": (dict(clamp=(2.0, 1.0)), ValueError, r"^clamp must have lo <= hi"),
    "clamp-nan": (dict(clamp=(float("nan"), 1.0)), ValueError, r"^clamp must have lo <= hi"),
}


@pytest.mark.parametrize("kwargs, exc, match", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_option_names_the_field(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RopeKVOptions(**kwargs)


def test_frozen_and_hashable():
    o = RopeKVOptions(layout="paged", clamp=[-2, 2], table_dtype=torch.bfloat16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.is_neox = False
    same = RopeKVOptions(layout=CacheLayout.PAGED, clamp=(-2.0, 2.0), table_dtype=torch.bfloat16)
    assert o == same and hash(o) == hash(same) and {o: 1}[same] == 1
    assert o != dataclasses.replace(same, is_neox=False)
    with pytest.raises(ValueError, match=r"^layout\b"):  # replace checks too
        dataclasses.replace(o, layout="blocked")


# --------------------------------------------------------------------------------------------------
# By keyword: prepare and the wrapper; unknown names
# --------------------------------------------------------------------------------------------------


def small_args() -> dict:
    return make_args("cpu", T=5, Hq=4, Hkv=2, D=32, rot=16, dtype=torch.float32, qkv="3d")


def test_prepare_takes_options_and_keywords():
    args = small_args()
    tensors = {n: args[n] for n in TENSORS}
    base = RopeKVOptions(is_neox=False, layout="token", negative_wraps=True)
    p = prepare(**tensors, options=base, rotary_dim=16, check_slots=True)
    assert p.options == dataclasses.replace(base, rotary_dim=16, check_slots=True)
    assert base.rotary_dim is None  # not changed in place
    hf = make_args("cpu", T=5, Hq=4, Hkv=2, D=32, dtype=torch.float32, qkv="3d", table="hf")
    p = prepare(**dict(hf, rotary_dim=None))  # resolved from cos's width (32 features, one per feature)
    assert hf["cos"].shape[-1] == 32 and p.options == RopeKVOptions(rotary_dim=32)
    with pytest.raises(TypeError, match=r"^options must be a RopeKVOptions or None, got dict"):
        prepare(**tensors, options={"is_neox": False})


@pytest.mark.parametrize("call", ["prepare", "wrapper"])
def test_unknown_option_is_a_type_error_naming_it(call):
    args = small_args()
    before = (as_bytes(args["k_cache"]).clone(), as_bytes(args["v_cache"]).clone())
    with pytest.raises(TypeError, match=r"^'unknown_option' is not an option of the fused RoPE \+ KV-cache store"):
        if call == "prepare":
            prepare(**args, unknown_option=1e-6)
        else:
            kernels.rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                  args["slot_mapping"], cos=args["cos"], sin=args["sin"], positions=args["positions"],
                                  rotary_dim=16, unknown_option=1e-6)
    assert torch.equal(as_bytes(args["k_cache"]), before[0]) and torch.equal(as_bytes(args["v_cache"]), before[1])


# --------------------------------------------------------------------------------------------------
# Round trip: every option reaches the kernel's problem unchanged
# --------------------------------------------------------------------------------------------------


def every_option_set() -> tuple[dict, RopeKVOptions]:
    """A paged fp32 problem with uint8 caches holding e4m3fn bits, and options each set away from its default."""
    args = make_args("cpu", T=5, Hq=4, Hkv=2, D=32, rot=16, layout="paged", dtype=torch.float32, qkv="3d",
                     is_neox=False)
    for name in ("k_cache", "v_cache"):
        args[name] = torch.randint(0, 256, args[name].shape, dtype=torch.uint8)
    args.update(k_scale=torch.tensor([0.5]), v_scale=torch.tensor([2.0]), q_scale=torch.tensor([0.25]),
                q_norm_weight=torch.randn(4 * 32), k_norm_weight=torch.randn(2 * 32))  # full width: [H * D]
    options = RopeKVOptions(is_neox=False, rotary_dim=16, layout="paged", return_k=True, validate=True,
                            negative_wraps=True, table_dtype=torch.bfloat16, fp8_dtype=torch.float8_e4m3fn,
                            quant_dtype=torch.float32, scale_mul=True, clamp=(-448.0, 448.0), check_slots=True,
                            check_positions=True, q_fp8_dtype=torch.float8_e5m2, q_quant_dtype=torch.bfloat16,
                            q_scale_mul=True, q_clamp=(-1024.0, 1024.0), q_norm=True, k_norm=True, norm_eps=1e-5,
                            norm_offset=1.0, norm_round=True, scale_round=True, q_scale_round=True,
                            norm_full_width=True, norm_after_rope=True)
    assert all(getattr(options, f.name) != f.default for f in FIELDS)
    return {n: args[n] for n in (*TENSORS, *LATER_TENSORS)}, options


def op_keywords(options: RopeKVOptions) -> dict:
    """The op's keyword arguments for ``options``, written out as a caller writes them (strings, lists)."""
    kw = {f.name: getattr(options, f.name) for f in FIELDS}
    return dict(kw, layout=options.layout.value, clamp=list(options.clamp), q_clamp=list(options.q_clamp))


@pytest.fixture
def seen(monkeypatch) -> list:
    """The options of every problem the op prepares (fake and real), in order."""
    problems = []

    def spy(*args, **kwargs):
        p = prepare(*args, **kwargs)
        problems.append(p)
        return p

    monkeypatch.setattr(ops, "prepare", spy)
    return problems


def check_outputs(tensors: dict, options: RopeKVOptions, q_out: torch.Tensor, k_out: torch.Tensor,
                  before: tuple) -> None:
    """q_out and k_out against the reference of the same options, on the caches as they were."""
    ref = prepare(**dict(tensors, k_cache=before[0].clone(), v_cache=before[1].clone()), options=options)
    q_ref, k_ref = reference(ref, True, compute_dtype=torch.float64)
    atol, rtol = TOLERANCES[torch.float32]
    assert q_out.dtype == q_ref.dtype == (options.q_fp8_dtype or tensors["q"].dtype)
    # fp8 q: one code apart at most where the fp32 rotation and the float64 one round apart
    torch.testing.assert_close(q_out.float(), q_ref.float(), atol=2.0 ** -16, rtol=0.25)
    torch.testing.assert_close(k_out, k_ref.float(), atol=atol, rtol=rtol)
    assert not torch.equal(q_out.float(), tensors["q"])  # rotated


@pytest.mark.parametrize("positional", [False, True], ids=["keywords", "positional"])
def test_options_round_trip_through_the_op(seen, positional):
    tensors, options = every_option_set()
    before = (tensors["k_cache"].clone(), tensors["v_cache"].clone())
    kw = op_keywords(options)
    first, later = [tensors[n] for n in TENSORS], [tensors[n] for n in LATER_TENSORS]
    if positional:
        q_out, k_out = OP(*first, *kw.values(), *later)
    else:
        q_out, k_out = OP(*first, **kw, **{n: tensors[n] for n in LATER_TENSORS})
    assert [p.options for p in seen] == [options]
    check_outputs(tensors, options, q_out, k_out, before)


def test_options_round_trip_through_torch_compile(seen):
    tensors, options = every_option_set()
    before = (tensors["k_cache"].clone(), tensors["v_cache"].clone())
    kw = op_keywords(options)

    def fn(*ts):
        q_out, k_out = OP(*ts[:len(TENSORS)], **kw, **dict(zip(LATER_TENSORS, ts[len(TENSORS):])))
        return q_out * 1, k_out * 1

    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            q_out, k_out = torch.compile(fn, fullgraph=True)(*tensors.values())
    finally:
        torch._dynamo.reset()
    real = [p for p in seen if not isinstance(p.q, torch._subclasses.FakeTensor)]
    assert len(real) == 1 and len(seen) > 1, "the op ran on fake tensors at compile time, then once on real ones"
    assert all(p.options == options for p in seen), [p.options for p in seen if p.options != options]
    check_outputs(tensors, options, q_out, k_out, before)


def test_wrapper_forwards_its_options(seen):
    tensors, options = every_option_set()
    before = (tensors["k_cache"].clone(), tensors["v_cache"].clone())
    t = dict(tensors)
    q_out, k_out = kernels.rope_kv_store(
        t["q"], t["k"], t["v"], t["k_cache"], t["v_cache"], t["slot_mapping"], cos=t["cos"], sin=t["sin"],
        positions=t["positions"], k_scale=t["k_scale"], v_scale=t["v_scale"], q_scale=t["q_scale"], rotary_dim=16,
        layout="paged", q_norm_weight=t["q_norm_weight"], k_norm_weight=t["k_norm_weight"],
        check_bounds=True, **{n: v for n, v in op_keywords(options).items()
                              if n not in ("rotary_dim", "layout", "check_slots", "check_positions")})
    assert [p.options for p in seen] == [options]
    check_outputs(tensors, options, q_out, k_out, before)
