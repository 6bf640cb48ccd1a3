"""``FusionConfig.key()`` and ``pattern_options()`` follow the dataclass fields, so no field can be forgotten."""

from __future__ import annotations

import dataclasses

import pytest

from fx_fusion import CacheLayout, FusionConfig, RopeKVFusionPass, RopeStyle
from fx_fusion.patterns import FusionOptions

# one value per field that differs from the default; a new field must be added here (test below)
OTHER_VALUES = {
    "layouts": {"token"},
    "styles": {"gptj"},
    "min_tokens": 2,
    "max_tokens": 64,
    "dump_dir": "somewhere",
    "on_unfusable": "raise",
    "validate": True,
}
NOT_IN_KEY = {"dump_dir"}  # changes no compiled code (see the comment on the field)


def field_names(cls=FusionConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_every_field_has_a_test_value():
    assert set(OTHER_VALUES) == set(field_names())


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_each_field_is_in_the_key_unless_declared_out(name):
    base = FusionConfig()
    changed = dataclasses.replace(base, **{name: OTHER_VALUES[name]})
    assert changed != base
    if name in NOT_IN_KEY:
        assert changed.key() == base.key() and f"{name}=" not in base.key()
        assert RopeKVFusionPass(changed).uuid() == RopeKVFusionPass(base).uuid()
    else:
        assert changed.key() != base.key() and f"{name}=" in base.key()
        assert RopeKVFusionPass(changed).uuid() != RopeKVFusionPass(base).uuid()


def test_key_names_every_field_in_order():
    names = [part.split("=", 1)[0] for part in FusionConfig().key().split(";")]
    assert names == [n for n in field_names() if n not in NOT_IN_KEY]


def test_equal_configs_give_equal_keys():
    a = FusionConfig(layouts=["paged", "token"], styles="neox", min_tokens=3, on_unfusable="raise")
    b = FusionConfig(layouts={CacheLayout.TOKEN, CacheLayout.PAGED}, styles=[RopeStyle.NEOX], min_tokens=3,
                     on_unfusable="raise", dump_dir="elsewhere")
    assert a.key() == b.key()
    assert FusionConfig().key() == FusionConfig().key()
    assert "layouts=['paged', 'token']" in a.key()  # canonical: enum values, sorted


def test_a_field_added_by_a_subclass_is_in_the_key():
    @dataclasses.dataclass(frozen=True)
    class Extended(FusionConfig):
        block_size: int = 16

    assert "block_size=16" in Extended().key()
    assert Extended(block_size=32).key() != Extended().key()
    assert Extended().key().startswith(FusionConfig().key())


def test_a_field_added_by_make_dataclass_is_in_the_key():
    Extended = dataclasses.make_dataclass("Extended", [("fast_math", bool, False)], bases=(FusionConfig,),
                                          frozen=True)
    assert "fast_math=False" in Extended().key()
    assert Extended(fast_math=True).key() != Extended().key()
    # the pass hashes the key: its uuid follows
    assert RopeKVFusionPass(Extended(fast_math=True)).uuid() != RopeKVFusionPass(Extended()).uuid()


def test_a_field_can_opt_out_of_the_key():
    Extended = dataclasses.make_dataclass(
        "Extended", [("log_dir", str, dataclasses.field(default="a", metadata={"in_key": False}))],
        bases=(FusionConfig,), frozen=True)
    assert Extended(log_dir="b").key() == Extended().key() == FusionConfig().key()


def test_a_value_without_a_stable_form_is_rejected():
    Extended = dataclasses.make_dataclass("Extended", [("hook", object, None)], bases=(FusionConfig,), frozen=True)
    assert "hook=None" in Extended().key()
    with pytest.raises(TypeError, match="FusionConfig.hook: cannot put a object into the cache key"):
        Extended(hook=object()).key()


def test_pattern_options_mirror_the_fields_by_name():
    config = FusionConfig(layouts={"paged"}, styles={"gptj"}, min_tokens=4, max_tokens=9, validate=True)
    options = config.pattern_options()
    assert isinstance(options, FusionOptions)
    for f in dataclasses.fields(FusionOptions):
        assert getattr(options, f.name) == getattr(config, f.name), f.name


def test_every_pattern_option_has_a_config_field():
    """An option the patterns read but the config lacks would silently stay at its default."""
    assert {f.name for f in dataclasses.fields(FusionOptions)} <= set(field_names())


def test_fields_without_a_pattern_option_are_not_passed():
    Extended = dataclasses.make_dataclass("Extended", [("fast_math", bool, False)], bases=(FusionConfig,),
                                          frozen=True)
    assert Extended(fast_math=True, min_tokens=5).pattern_options() == FusionConfig(min_tokens=5).pattern_options()
