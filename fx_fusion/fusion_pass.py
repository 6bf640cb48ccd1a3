"""The post-grad Inductor pass: ``RopeKVFusionPass``, a ``CustomGraphPass`` with a cache-safe ``uuid()``."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from fx_fusion.config import FusionConfig, OnUnfusable
from fx_fusion.patterns import Site, fuse_rope_kv_stores
from fx_fusion.report import explain_autograd, inputs_written_outside, layer_of, report_graph

log = logging.getLogger("fx_fusion")


class UnfusableSiteError(RuntimeError):
    """Raised for a site that cannot be fused safely when ``on_unfusable="raise"``."""


@functools.cache
def _source_hash() -> bytes:
    """Hash of the pass, its patterns and kernels: a change to any of them changes ``uuid()``.

    The folders are found through the packages themselves (``fx_fusion.kernels`` and
    ``fx_fusion.patterns`` live outside ``fx_fusion/`` in a checkout), so only our own files count.
    """
    import fx_fusion.kernels
    import fx_fusion.patterns

    folders = {Path(folder) for pkg in (fx_fusion, fx_fusion.kernels, fx_fusion.patterns) for folder in pkg.__path__}
    files = sorted(str(p) for folder in folders for p in folder.glob("*.py"))
    return get_hash_for_files(tuple(files))


class RopeKVFusionPass(CustomGraphPass):
    """Fuse RoPE -> reshape -> KV-cache store into ``torch.ops.fx_fusion.rope_kv_store``.

    Install as ``torch._inductor.config.post_grad_custom_post_pass`` (see ``install``), or let the
    ``fx_fusion`` backend / ``@fx_fusion.compile`` do it. Running it twice is a no-op: a fused graph
    has no stores of RoPE outputs left.
    """

    def __init__(self, config: FusionConfig | None = None):
        self.config = config or FusionConfig()
        self.last_sites: list[Site] = []  # sites of the last graph this pass object saw

    def __call__(self, graph: torch.fx.Graph) -> None:
        from torch._dynamo.utils import counters

        start = time.perf_counter()
        before = self._snapshot(graph) if self.config.dump_dir else None
        nodes = {n.name: n for n in graph.nodes}  # the sites name their stores; the rewrite removes some
        outside = inputs_written_outside(graph)
        sites = fuse_rope_kv_stores(graph, self.config.pattern_options())
        for site in sites:
            site.layer = layer_of(nodes.get(site.store))
        explain_autograd(sites, nodes, outside)
        self.last_sites = sites
        stats = counters["fx_fusion"]
        stats["graphs"] += 1
        stats["pass_us"] += int(1e6 * (time.perf_counter() - start))
        for site in sites:
            stats["rope_kv_store_fused" if site.fused else "rope_kv_store_not_fused"] += 1
        report_graph(sites)
        if before is not None:
            from fx_fusion.dump import write_dump

            write_dump(self.config.dump_dir, before, self._snapshot(graph), sites)
        unsafe = [s for s in sites if not s.fused and not s.disabled]
        if unsafe and self.config.on_unfusable is OnUnfusable.RAISE:
            raise UnfusableSiteError("; ".join(f"{s.layer or '-'} ({s.source}): {s.reason}" for s in unsafe))

    @staticmethod
    def _snapshot(graph: torch.fx.Graph):
        from fx_fusion.dump import GraphSnapshot

        return GraphSnapshot.of(graph)

    def uuid(self) -> str:
        return hashlib.sha256(_source_hash() + self.config.key().encode()).hexdigest()


class ComposedPass(CustomGraphPass):
    """Run a pass the user already installed, then ours (Inductor 2.11 takes one pass per hook)."""

    def __init__(self, first, second: CustomGraphPass):
        self.first, self.second = first, second

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self):
        first = self.first.uuid() if hasattr(self.first, "uuid") else None
        if first is None:
            return None  # an unhashable user pass: Inductor bypasses the FX graph cache
        return hashlib.sha256(f"{first}|{self.second.uuid()}".encode()).hexdigest()


def install(fusion_pass: RopeKVFusionPass, existing=None):
    """What to set as ``post_grad_custom_post_pass``: ours, after ``existing`` (minus any older fx_fusion pass)."""
    while isinstance(existing, ComposedPass) and isinstance(existing.second, RopeKVFusionPass):
        existing = existing.first
    if existing is None or isinstance(existing, RopeKVFusionPass):
        return fusion_pass
    return ComposedPass(existing, fusion_pass)
