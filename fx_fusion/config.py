"""The one configuration of the pass: frozen, typed, hashable (it is part of the pass's ``uuid()``)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Mapping

from fx_fusion.kernels.rope_kv_cache import CacheLayout
from fx_fusion.patterns import FusionOptions, RopeStyle


class OnUnfusable(str, enum.Enum):
    """What to do with a candidate site that cannot be fused safely."""

    FALLBACK = "fallback"  # leave it as it is and report why
    RAISE = "raise"  # raise ``UnfusableSiteError`` (useful in tests and when adopting a new model)


@dataclass(frozen=True)
class FusionConfig:
    """Configuration of the RoPE -> reshape -> KV-cache store fusion."""

    layouts: frozenset[CacheLayout] = frozenset(CacheLayout)
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
        # accept plain strings and iterables from ``options={...}``; store canonical, hashable values
        object.__setattr__(self, "layouts", frozenset(CacheLayout(x) for x in _iterable("layouts", self.layouts)))
        object.__setattr__(self, "styles", frozenset(RopeStyle(x) for x in _iterable("styles", self.styles)))
        object.__setattr__(self, "on_unfusable", OnUnfusable(self.on_unfusable))
        for name in ("min_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens})")
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", str(self.dump_dir))

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


def _iterable(name: str, value: Any):
    if isinstance(value, (str, enum.Enum)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a collection of names, got {value!r}") from None
