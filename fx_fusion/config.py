"""The one configuration of the pass: frozen, typed, hashable (it is part of the pass's ``uuid()``)."""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from fx_fusion.kernels.problem import CacheLayout
from fx_fusion.patterns import FusionOptions, RopeStyle


# the cache layouts the pass finds stores in (the op also writes the 5-D paged_x layouts, which no matched store has)
PASS_LAYOUTS = (CacheLayout.TOKEN, CacheLayout.PAGED, CacheLayout.SEQUENCE)


class OnUnfusable(str, enum.Enum):
    """What to do with a candidate site that cannot be fused safely."""

    FALLBACK = "fallback"  # leave it as it is and report why
    RAISE = "raise"  # raise ``UnfusableSiteError`` (useful in tests and when adopting a new model)


@dataclass(frozen=True)
class FusionConfig:
    """Configuration of the RoPE -> reshape -> KV-cache store fusion."""

    layouts: frozenset[CacheLayout] = frozenset(PASS_LAYOUTS)
    """Cache layouts to fuse: ``token`` (SGLang pools), ``paged`` (vLLM), ``sequence`` (HF StaticCache, gpt-fast)."""

    styles: frozenset[RopeStyle] = frozenset(RopeStyle)
    """RoPE styles to fuse."""

    min_tokens: int = 1
    """Fuse only sites whose token count (B*S) is at least this; sites with a dynamic count always qualify."""

    max_tokens: int | None = None
    """Fuse only sites whose token count is at most this (``None``: no limit); dynamic counts qualify."""

    # Not part of key(): a dump changes no compiled code, so a graph compiled with and without one may share
    # a cache entry. A cache hit skips the pass and so the dump, whatever the key says (a new dump_dir
    # would only miss once); the backend turns the caches off while dumping instead.
    dump_dir: str | None = field(default=None, metadata={"in_key": False})
    """Write graphs before/after, the site report and networkx exports of every compiled graph here."""

    on_unfusable: OnUnfusable = OnUnfusable.FALLBACK
    """Leave unfusable sites alone and report them (``fallback``) or raise (``raise``)."""

    validate: bool = False
    """Make the fused op check slot/position ranges at run time (a device sync per call; breaks CUDA graphs)."""

    def __post_init__(self) -> None:
        # Every field is checked here, so a bad value fails where it was written, naming the field, and not
        # later inside the pass. Plain strings and iterables (``options={...}``) become canonical, hashable
        # values. ``dataclasses.replace`` (how ``options=`` and keywords are applied) runs this again.
        object.__setattr__(self, "layouts", _enum_set("layouts", CacheLayout, self.layouts, PASS_LAYOUTS))
        object.__setattr__(self, "styles", _enum_set("styles", RopeStyle, self.styles))
        object.__setattr__(self, "min_tokens", _count("min_tokens", self.min_tokens, optional=False))
        object.__setattr__(self, "max_tokens", _count("max_tokens", self.max_tokens, optional=True))
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"FusionConfig.max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens})")
        object.__setattr__(self, "dump_dir", _directory("dump_dir", self.dump_dir))
        object.__setattr__(self, "on_unfusable", _enum_value("on_unfusable", OnUnfusable, self.on_unfusable))
        if not isinstance(self.validate, bool):
            raise TypeError(f"FusionConfig.validate must be True or False, got {_shown(self.validate)}")

    def pattern_options(self) -> FusionOptions:
        """The fields the patterns read, matched by name with ``FusionOptions``' fields (the rest is ours)."""
        wanted = {f.name for f in dataclasses.fields(FusionOptions)}
        return FusionOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in wanted})

    def key(self) -> str:
        """A stable string of every field that may change the compiled graph: all of them, in declaration order,
        except those declared with ``metadata={"in_key": False}``.

        Part of the pass's ``uuid()`` (the FX graph cache key), so a field added later is covered unless it
        opts out. Values are canonical (enums by value, sets sorted), so equal configs give equal keys.
        """
        return ";".join(f"{f.name}={_key_value(f.name, getattr(self, f.name))!r}"
                        for f in dataclasses.fields(self) if f.metadata.get("in_key", True))


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``options`` into ``FusionConfig`` fields and the rest (Inductor config patches)."""
    names = {f.name for f in dataclasses.fields(FusionConfig)}
    ours = {k: v for k, v in options.items() if k in names}
    return ours, {k: v for k, v in options.items() if k not in names}


def _key_value(name: str, value: Any) -> Any:
    """``value`` as plain, ordered Python data whose ``repr`` is the same in every process."""
    if isinstance(value, enum.Enum):
        return _key_value(name, value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted((_key_value(name, x) for x in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_key_value(name, x) for x in value]
    raise TypeError(f"FusionConfig.{name}: cannot put a {type(value).__name__} into the cache key; "
                    f"expected None, bool, int, float, str, an enum or a collection of them")


def _shown(value: Any) -> str:
    """``value`` and its type for an error message: ``'false' (str)``."""
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__})"


def _expected(members) -> str:
    return ", ".join(repr(m.value) for m in members)


def _enum_value(name: str, cls: type[enum.Enum], value: Any, members=None, *, element: bool = False) -> enum.Enum:
    """``value`` (a member of ``cls`` or its value) as a member; TypeError for a non-string, ValueError for
    a string that names no member (or a member outside ``members``, when given)."""
    members = tuple(cls) if members is None else members
    if not isinstance(value, (str, cls)):
        expected = _expected(members)
        raise TypeError(f"FusionConfig.{name}: expected {cls.__name__} values ({expected}), got {_shown(value)}"
                        if element else
                        f"FusionConfig.{name} must be an {cls.__name__} value ({expected}), got {_shown(value)}")
    try:
        member = cls(value)
    except ValueError:
        member = None
    if member not in members:
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        what = f"{article} {cls.__name__}" if member is None else f"{article} {cls.__name__} this option takes"
        shown = value.value if isinstance(value, enum.Enum) else value
        raise ValueError(f"FusionConfig.{name}: {shown!r} is not {what} (expected one of {_expected(members)})")
    return member


def _enum_set(name: str, cls: type[enum.Enum], value: Any, members=None) -> frozenset:
    """A collection of members or values of ``cls`` (one string alone counts as a collection of one); ``members``:
    the members allowed (default: all)."""
    if isinstance(value, (str, enum.Enum)):
        items = (value,)
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise TypeError(f"FusionConfig.{name} must be a collection of {cls.__name__} values "
                            f"({_expected(tuple(cls) if members is None else members)}), got {_shown(value)}") from None
    return frozenset(_enum_value(name, cls, x, members, element=True) for x in items)


def _count(name: str, value: Any, *, optional: bool) -> int | None:
    """A token count: a non-negative int (``None`` too when ``optional``); bool is refused, not read as 0/1."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"FusionConfig.{name} must be an int{' or None' if optional else ''}, got {_shown(value)}")
    if value < 0:
        raise ValueError(f"FusionConfig.{name} must be >= 0, got {value}")
    return int(value)


def _directory(name: str, value: Any) -> str | None:
    """A directory as ``str``: from a ``str`` or an ``os.PathLike`` of one; ``None`` stays ``None``."""
    if value is None:
        return None
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str):
        raise TypeError(f"FusionConfig.{name} must be a str, an os.PathLike or None, got {_shown(value)}")
    if not path:
        raise ValueError(f"FusionConfig.{name} must name a directory, got ''")
    return path
