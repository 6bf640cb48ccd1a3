"""What the pass reports per candidate site (``Site``), the two ways a site is left alone (``Unfusable``,
``Disabled``), and the options it is run with (``FusionOptions``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch.fx import Node

from fx_fusion.kernels.problem import CacheLayout
from fx_fusion.patterns.rope import RopeStyle

log = logging.getLogger("fx_fusion")


@dataclass(frozen=True)
class FusionOptions:
    """What the pass asks of this pattern (a plain mirror of the user's config; patterns never import it)."""

    layouts: frozenset = frozenset(CacheLayout)
    styles: frozenset = frozenset(RopeStyle)
    min_tokens: int = 1
    max_tokens: int | None = None
    validate: bool = False


@dataclass
class Site:
    """One candidate: a KV-cache store of a RoPE output, fused or not (and why)."""

    store: str  # name of the k-store node
    source: str  # model source line, from the node's stack trace
    fused: bool = False
    reason: str | None = None
    disabled: bool = False  # not fused because the options said so (not because it was unsafe)
    layout: str | None = None
    style: str | None = None
    rotary_dim: int | None = None
    head_dim: int | None = None
    num_tokens: str | None = None
    nodes: dict = field(default_factory=dict)  # role -> node name (before) / new node name (after)
    layer: str | None = None  # module path of the store (``model.layers.3.self_attn``), set by the pass
    notes: list = field(default_factory=list)  # what of a fused site stays outside the op, and why

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Unfusable(Exception):
    """A site that must stay as it is; the message is the reason."""


class Disabled(Unfusable):
    """A site that could be fused but the options say not to (layout/style off, token thresholds)."""


def internal_error(node: Node, err: Exception) -> Site:
    log.debug("fx_fusion: internal error at %s", node.name, exc_info=err)
    return Site(store=node.name, source=source_line(node), reason=f"internal error: {type(err).__name__}: {err}")


def source_line(node: Node) -> str:
    """``file:line code`` of the innermost model frame in the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) else ""
            where = lines[i].replace("File ", "").replace('"', "")
            return f"{where}: {code}".strip()
    return "<no stack trace>"

