"""The one configuration of the pass: frozen, typed, hashable (it is part of the pass's ``uuid()``)."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
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

    dump_dir: str | None = None
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
        return FusionOptions(self.layouts, self.styles, self.min_tokens, self.max_tokens, self.validate)

    def key(self) -> str:
        """A stable string naming every setting that changes the compiled graph."""
        parts = [
            f"layouts={sorted(x.value for x in self.layouts)}",
            f"styles={sorted(x.value for x in self.styles)}",
            f"min_tokens={self.min_tokens}",
            f"max_tokens={self.max_tokens}",
            f"on_unfusable={self.on_unfusable.value}",
            f"validate={self.validate}",
        ]
        return ";".join(parts)


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``options`` into ``FusionConfig`` fields and the rest (Inductor config patches)."""
    names = {f.name for f in dataclasses.fields(FusionConfig)}
    ours = {k: v for k, v in options.items() if k in names}
    return ours, {k: v for k, v in options.items() if k not in names}


def _iterable(name: str, value: Any):
    if isinstance(value, (str, enum.Enum)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a collection of names, got {value!r}") from None
