"""Graph dumps: before/after code, a site report, and networkx exports (GraphML, DOT) with fused nodes marked.

Layout of a dump directory, one set per compiled graph (``NNN`` = order of compilation)::

    graph_NNN.before.py / graph_NNN.after.py   readable post-grad graphs
    graph_NNN.report.json / .txt               every candidate site: source line, fused or why not
    graph_NNN.before.graphml / .dot            the graph through networkx (fused sites' nodes marked)
    graph_NNN.after.graphml / .dot             (fused op calls marked)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch

from fx_fusion.patterns import FUSED_OP, Site


@dataclass
class GraphSnapshot:
    code: str
    nx_graph: nx.DiGraph

    @classmethod
    def of(cls, graph: torch.fx.Graph) -> "GraphSnapshot":
        return cls(graph.python_code("self").src, to_networkx(graph))


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """One node per FX node (op, target, shape, dtype), one edge per use."""
    g = nx.DiGraph()
    for n in graph.nodes:
        val = n.meta.get("val")
        g.add_node(n.name, op=n.op, target=_target_name(n), shape=str(tuple(val.shape)) if isinstance(
            val, torch.Tensor) else "", dtype=str(val.dtype) if isinstance(val, torch.Tensor) else "",
                   fused_op=_is_fused_call(n), site="")
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def _target_name(n: torch.fx.Node) -> str:
    if n.op != "call_function":
        return str(n.target)
    if _is_fused_call(n):
        return "fx_fusion.rope_kv_store"
    return getattr(n.target, "__name__", str(n.target)).replace("<", "").replace(">", "")


def _is_fused_call(n: torch.fx.Node) -> bool:
    return n.op == "call_function" and (n.target is FUSED_OP or (bool(n.args) and n.args[0] is FUSED_OP))


def to_dot(g: nx.DiGraph, name: str) -> str:
    """Graphviz DOT text; fused op calls filled green, nodes of fused sites orange, unfused sites grey."""
    colours = {"fused": "orange", "unfused": "lightgrey"}
    lines = [f'digraph "{name}" {{', "  node [shape=box, fontsize=10];"]
    for node, attrs in g.nodes(data=True):
        label = f"{node}\\n{attrs['target']}\\n{attrs['shape']} {attrs['dtype']}".strip()
        style = ""
        if attrs.get("fused_op"):
            style = ', style=filled, fillcolor="palegreen"'
        elif attrs.get("site") in colours:
            style = f', style=filled, fillcolor="{colours[attrs["site"]]}"'
        lines.append(f'  "{node}" [label="{label}"{style}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in g.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mark_sites(g: nx.DiGraph, sites: list[Site]) -> None:
    for s in sites:
        for name in s.nodes.values():
            if name in g:
                g.nodes[name]["site"] = "fused" if s.fused else "unfused"


def _next_index(root: Path) -> int:
    taken = [int(p.name.split("_")[1].split(".")[0]) for p in root.glob("graph_*.report.json")]
    return max(taken, default=-1) + 1


def report_text(sites: list[Site]) -> str:
    if not sites:
        return "no RoPE -> KV-cache store sites\n"
    rows = [f"{'fused' if s.fused else 'NOT fused'}: {s.layout}/{s.style} rot={s.rotary_dim} "
            f"tokens={s.num_tokens} at {s.source}" + ("" if s.fused else f"\n    reason: {s.reason}")
            for s in sites]
    return "\n".join(rows) + "\n"


def write_dump(dump_dir: str, before: GraphSnapshot, after: GraphSnapshot, sites: list[Site]) -> Path:
    root = Path(dump_dir)
    root.mkdir(parents=True, exist_ok=True)
    stem = root / f"graph_{_next_index(root):03d}"
    _mark_sites(before.nx_graph, sites)
    _mark_sites(after.nx_graph, sites)
    Path(f"{stem}.before.py").write_text(before.code)
    Path(f"{stem}.after.py").write_text(after.code)
    for tag, snap in (("before", before), ("after", after)):
        nx.write_graphml(snap.nx_graph, f"{stem}.{tag}.graphml")
        Path(f"{stem}.{tag}.dot").write_text(to_dot(snap.nx_graph, f"{stem.name}.{tag}"))
    Path(f"{stem}.report.txt").write_text(report_text(sites))
    report = {"graph": stem.name, "pid": os.getpid(), "sites": [s.as_dict() for s in sites]}
    Path(f"{stem}.report.json").write_text(json.dumps(report, indent=2))
    return stem
