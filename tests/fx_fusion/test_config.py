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


# ---- every field is checked when the config is made ------------------------------------------
# (field, value, error, message): the message names the field, what was expected and what arrived

BAD_VALUES = [
    ("validate", "false", TypeError, "validate must be True or False, got 'false' (str)"),
    ("validate", "no", TypeError, "validate must be True or False, got 'no' (str)"),
    ("validate", 1, TypeError, "validate must be True or False, got 1 (int)"),
    ("validate", None, TypeError, "validate must be True or False, got None (NoneType)"),
    ("min_tokens", None, TypeError, "min_tokens must be an int, got None (NoneType)"),
    ("min_tokens", "4", TypeError, "min_tokens must be an int, got '4' (str)"),
    ("min_tokens", True, TypeError, "min_tokens must be an int, got True (bool)"),
    ("min_tokens", 2.0, TypeError, "min_tokens must be an int, got 2.0 (float)"),
    ("min_tokens", -1, ValueError, "min_tokens must be >= 0, got -1"),
    ("max_tokens", 2.5, TypeError, "max_tokens must be an int or None, got 2.5 (float)"),
    ("max_tokens", False, TypeError, "max_tokens must be an int or None, got False (bool)"),
    ("max_tokens", "64", TypeError, "max_tokens must be an int or None, got '64' (str)"),
    ("max_tokens", -2, ValueError, "max_tokens must be >= 0, got -2"),
    ("layouts", 5, TypeError, "layouts must be a collection of CacheLayout values ('token', 'paged', 'sequence'), got 5 (int)"),
    ("layouts", None, TypeError, "layouts must be a collection of CacheLayout values ('token', 'paged', 'sequence'), got None (NoneType)"),
    ("layouts", {"token", "ragged"}, ValueError, "layouts: 'ragged' is not a CacheLayout (expected one of 'token', 'paged', 'sequence')"),
    ("layouts", [3], TypeError, "layouts: expected CacheLayout values ('token', 'paged', 'sequence'), got 3 (int)"),
    ("layouts", [b"token"], TypeError, "layouts: expected CacheLayout values ('token', 'paged', 'sequence'), got b'token' (bytes)"),
    # the op's 5-D layouts: no store the pass matches has them
    ("layouts", ["token", "paged_x"], ValueError, "layouts: 'paged_x' is not a CacheLayout this option takes (expected one of 'token', 'paged', 'sequence')"),
    ("styles", 42, TypeError, "styles must be a collection of RopeStyle values ('neox', 'gptj'), got 42 (int)"),
    ("styles", {"rotate"}, ValueError, "styles: 'rotate' is not a RopeStyle (expected one of 'neox', 'gptj')"),
    ("styles", [None], TypeError, "styles: expected RopeStyle values ('neox', 'gptj'), got None (NoneType)"),
    ("styles", ["token"], ValueError, "styles: 'token' is not a RopeStyle (expected one of 'neox', 'gptj')"),
    ("on_unfusable", "explode", ValueError, "on_unfusable: 'explode' is not an OnUnfusable (expected one of 'fallback', 'raise')"),
    ("on_unfusable", True, TypeError, "on_unfusable must be an OnUnfusable value ('fallback', 'raise'), got True (bool)"),
    ("on_unfusable", None, TypeError, "on_unfusable must be an OnUnfusable value ('fallback', 'raise'), got None (NoneType)"),
    ("dump_dir", 3, TypeError, "dump_dir must be a str, an os.PathLike or None, got 3 (int)"),
    ("dump_dir", b"dumps", TypeError, "dump_dir must be a str, an os.PathLike or None, got b'dumps' (bytes)"),
    ("dump_dir", True, TypeError, "dump_dir must be a str, an os.PathLike or None, got True (bool)"),
    ("dump_dir", "", ValueError, "dump_dir must name a directory, got ''"),
]


def test_every_field_has_bad_values():
    assert {name for name, *_ in BAD_VALUES} == set(field_names())


@pytest.mark.parametrize("name, value, error, message", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, *_ in BAD_VALUES])
def test_bad_values_are_refused_when_the_config_is_made(name, value, error, message):
    with pytest.raises(error) as info:
        FusionConfig(**{name: value})
    assert str(info.value) == f"FusionConfig.{message}"


@pytest.mark.parametrize("name, value, error, message", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, *_ in BAD_VALUES])
def test_bad_values_are_refused_through_replace_and_options(name, value, error, message):
    """``options={...}`` and ``@fx_fusion.compile(**fields)`` build the config with ``dataclasses.replace``."""
    import fx_fusion

    with pytest.raises(error, match="^FusionConfig." + name):
        dataclasses.replace(FusionConfig(), **{name: value})
    with pytest.raises(error, match="^FusionConfig." + name):
        fx_fusion.compile(lambda x: x, **{name: value})


def test_good_values_of_every_kind():
    import os
    from pathlib import Path

    from fx_fusion import OnUnfusable

    class Where(os.PathLike):
        def __fspath__(self):
            return "there"

    assert FusionConfig(dump_dir=Where()).dump_dir == "there"
    assert FusionConfig(dump_dir=Path("a") / "b").dump_dir == str(Path("a") / "b")
    assert FusionConfig(validate=True).validate is True
    assert FusionConfig(min_tokens=0, max_tokens=0).max_tokens == 0
    assert FusionConfig(layouts=(), styles=frozenset()).layouts == frozenset()
    assert FusionConfig(on_unfusable=OnUnfusable.RAISE).on_unfusable is OnUnfusable.RAISE
    assert FusionConfig(layouts=iter(["paged"])).layouts == frozenset({CacheLayout.PAGED})
