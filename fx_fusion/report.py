"""What the pass tells the user about each compiled graph, so that a site left unfused is never silent.

- By default, one WARNING line through the ``fx_fusion`` logger after a graph with a candidate site left
  unfused (counts, the first reason, its layer, how to see more); an INFO line when every site fused.
  Sites the config turned off (``Site.disabled``: layouts, styles, token thresholds) are the user's choice:
  they are counted in the line but never make it a WARNING.
- ``TORCH_LOGS="fx_fusion"`` (or ``+fx_fusion``, or ``torch._logging.set_logs(modules={"fx_fusion": logging.INFO})``)
  prints one INFO line per site as well; each of those records carries its ``Site`` as
  ``record.fx_fusion_site``. torch reads ``TORCH_LOGS`` when it is imported, before any package can register
  a name with ``torch._logging``; it accepts the name of any importable module, so ``fx_fusion`` works as it
  is (no registration, which could not be seen by then anyway).
- ``fx_fusion.collect_reports()`` hands the reports of the graphs compiled inside a ``with`` block to code.
- Each site names its layer by module path (``model.layers.3.self_attn``), from the store node's
  ``nn_module_stack`` meta, which survives to the post-grad graph (torch 2.11 and 2.13).
- A graph compiled with autograd enabled applies its cache writes outside the graph (AOTAutograd returns the
  new cache and copies it back at run time): its sites get ``AUTOGRAD_REASON``, which says what to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from fx_fusion.patterns import Site

log = logging.getLogger("fx_fusion")

AUTOGRAD_REASON = ("compiled with autograd enabled: the cache writes happen outside the graph; compile under "
                   "torch.no_grad() or torch.inference_mode() to fuse")
"""The reason of a site whose cache AOTAutograd writes outside the compiled graph (a training graph)."""

SEE_MORE = ("every site: TORCH_LOGS=fx_fusion; with graphs and pictures: options={'dump_dir': DIR}, then "
            "python -m fx_fusion inspect DIR --draw; in code: fx_fusion.collect_reports()")
"""The end of the WARNING line: where to see more."""


@dataclass(frozen=True)
class GraphReport:
    """The candidate sites of one compiled graph (``compile_id``: Dynamo's ``frame/compile``, as in TORCH_LOGS)."""

    compile_id: str | None
    sites: tuple[Site, ...]

    @property
    def fused(self) -> list[Site]:
        return [s for s in self.sites if s.fused]

    @property
    def unfused(self) -> list[Site]:
        """Sites left unfused that the config did not turn off: each is a reason to warn."""
        return [s for s in self.sites if not s.fused and not s.disabled]

    @property
    def disabled(self) -> list[Site]:
        """Sites the config turned off (layouts, styles, token thresholds)."""
        return [s for s in self.sites if not s.fused and s.disabled]

    def summary(self) -> str:
        """The line logged for this graph (WARNING when ``unfused`` is not empty, else INFO)."""
        where = f"graph {self.compile_id}" if self.compile_id else "a graph"
        counts = f"{len(self.fused)} of {len(self.sites)} RoPE -> KV-cache store sites fused"
        if self.disabled:
            counts += f", {len(self.disabled)} left out by the config"
        if not self.unfused:
            return f"fx_fusion: {where}: {counts}"
        first = next((s for s in self.unfused if s.reason == AUTOGRAD_REASON), self.unfused[0])
        return (f"fx_fusion: {where}: {counts}, {len(self.unfused)} NOT fused; first: {first.layer or '-'} "
                f"({shorten_source(first.source, 80)}): {first.reason}. To see more: {SEE_MORE}")


_COLLECTING: contextvars.ContextVar[tuple] = contextvars.ContextVar("fx_fusion_collecting", default=())


@contextlib.contextmanager
def collect_reports() -> Iterator[list[GraphReport]]:
    """The report of every graph the pass sees inside the block, in order of compilation::

        with fx_fusion.collect_reports() as reports:
            compiled(*inputs)          # compiles
        for site in reports[-1].sites:
            print(site.layer, site.fused, site.reason)

    A graph served from Inductor's caches runs no pass, so it adds no report: turn the caches off
    (``options={"fx_graph_cache": False}``, or a ``dump_dir``) to see every graph. Blocks may nest.
    """
    reports: list[GraphReport] = []
    token = _COLLECTING.set(_COLLECTING.get() + (reports,))
    try:
        yield reports
    finally:
        _COLLECTING.reset(token)


def report_graph(sites: list[Site]) -> GraphReport:
    """Log ``sites`` (one INFO line each, then the graph's summary) and hand them to ``collect_reports`` blocks."""
    report = GraphReport(_compile_id(), tuple(sites))
    for reports in _COLLECTING.get():
        reports.append(report)
    if not sites:
        log.debug("fx_fusion: %s: no RoPE -> KV-cache store sites", report.compile_id or "a graph")
        return report
    for i, s in enumerate(sites):
        state = "fused" if s.fused else "left out by the config" if s.disabled else "NOT fused"
        log.info("fx_fusion: graph %s site %d/%d %s: %s %s/%s rot=%s tokens=%s at %s%s", report.compile_id or "-",
                 i + 1, len(sites), state, s.layer or "-", s.layout or "-", s.style or "-", s.rotary_dim,
                 s.num_tokens or "-", shorten_source(s.source, 100),
                 f"; {'; '.join(s.notes)}" if s.fused and s.notes else "" if s.fused else f": {s.reason}",
                 extra={"fx_fusion_site": s})  # the Site itself, for a handler that wants more than text
    log.log(logging.WARNING if report.unfused else logging.INFO, "%s", report.summary())
    return report


def _compile_id() -> str | None:
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001 (an internal that moved: the id is only a label)
        return None
    return str(cid) if cid is not None else None


def shorten_source(source: str | None, width: int) -> str:
    """``/long/path/file.py, line 12, in fn: code`` -> ``file.py:12 code``, cut to ``width`` characters."""
    if not source:
        return "-"
    where, _, code = source.partition(": ")
    parts = [p.strip() for p in where.split(",")]
    text = source
    if len(parts) >= 2 and parts[1].startswith("line "):
        text = f"{Path(parts[0]).name}:{parts[1][5:]} {code}".strip()
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


# ---- the layer of a site ----------------------------------------------------------------------------

_ROOT = re.compile(r"^[LG]\[(['\"])(?P<name>[^'\"]+)\1\]")
_ITEM = re.compile(r"\._modules\[(['\"])(?P<a>[^'\"]+)\1\]|\[(['\"]?)(?P<b>[^'\"\]]+)\3\]")


def module_path(stack: Mapping | None) -> str | None:
    """The innermost module of a node's ``nn_module_stack`` as a path from the compiled module:
    ``L['self'].model.layers[3].self_attn`` -> ``model.layers.3.self_attn``; a function's argument keeps its
    name (``L['model'].layers.0`` -> ``model.layers.0``); the compiled module itself is named by its class."""
    if not stack:
        return None
    path, cls = list(stack.values())[-1][:2]
    root = _ROOT.match(str(path))
    if root is None:
        return str(path)
    rest = _ITEM.sub(lambda m: "." + (m.group("a") or m.group("b")), str(path)[root.end():]).lstrip(".")
    prefix = "" if root.group("name") == "self" else root.group("name")
    joined = ".".join(x for x in (prefix, rest) if x)
    return joined or getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1])


def layer_of(node: torch.fx.Node | None) -> str | None:
    """``node``'s module path, else that of the first input that has one (a ``copy_`` back into a cache
    carries no module stack; the value it copies does)."""
    if node is None:
        return None
    for n in (node, *node.all_input_nodes):
        path = module_path(n.meta.get("nn_module_stack"))
        if path:
            return path
    return None


# ---- training graphs --------------------------------------------------------------------------------


def inputs_written_outside(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The placeholders whose data AOTAutograd mutates outside this graph: with autograd enabled, a write into
    an input (a KV cache) that autograd can see is returned by the forward graph and copied back at run time
    (``MutationType.MUTATED_OUT_GRAPH``), so no in-graph store is left to fuse. Empty where the compile's
    metadata is not at hand (a graph compiled outside AOTAutograd)."""
    try:
        from torch._functorch._aot_autograd.schemas import MutationType
        from torch._guards import TracingContext

        infos = TracingContext.try_get().fw_metadata.input_info
    except Exception:  # noqa: BLE001 (no tracing context, or internals that moved: nothing to say)
        return set()
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(infos):  # not the forward graph these inputs describe (the backward)
        return set()
    return {p for p, info in zip(placeholders, infos)
            if info.mutates_data and info.mutation_type == MutationType.MUTATED_OUT_GRAPH}


def explain_autograd(sites: list[Site], nodes: Mapping[str, torch.fx.Node], outside: set[torch.fx.Node]) -> None:
    """Give ``AUTOGRAD_REASON`` to each unfused site (not turned off by the config) whose store writes into an
    input mutated outside the graph: whatever else its matcher said, that is why it cannot fuse."""
    if not outside:
        return
    for s in sites:
        if not s.fused and not s.disabled and _base_input(nodes.get(s.store)) in outside:
            s.reason = AUTOGRAD_REASON


def _base_input(node: torch.fx.Node | None, depth: int = 8) -> torch.fx.Node | None:
    """The placeholder a store writes into: its first argument, through selects and views."""
    for _ in range(depth):
        if node is None or node.op == "placeholder":
            return node
        first = node.args[0] if node.args else None
        node = first if isinstance(first, torch.fx.Node) else None
    return None
