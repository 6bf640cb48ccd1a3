"""Graph dumps: before/after code, a site report, and networkx exports (GraphML, DOT) with fused nodes marked.

Layout of a dump directory, one set per compiled graph (``NNN`` = order of compilation)::

    graph_NNN.before.py / graph_NNN.after.py   readable post-grad graphs
    graph_NNN.report.json / .txt               every candidate site: source line, fused or why not
    graph_NNN.before.graphml / .dot            the graph through networkx (fused sites' nodes marked)
    graph_NNN.after.graphml / .dot             (fused op calls marked)
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import networkx as nx
import torch

from fx_fusion.patterns import Site, is_fused_node

log = logging.getLogger("fx_fusion")


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
                   fused_op=is_fused_node(n), site="")
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def _target_name(n: torch.fx.Node) -> str:
    if n.op != "call_function":
        return str(n.target)
    if is_fused_node(n):
        return "fx_fusion.rope_kv_store"
    return getattr(n.target, "__name__", str(n.target)).replace("<", "").replace(">", "")


FILL_COLOURS = MappingProxyType({"fused_op": "palegreen", "fused": "orange", "unfused": "lightcoral",
                                 "unfused_reason": "gold"})
"""Fill colour of a fused op call, of the nodes of a fused site, of the nodes (the store among them) of a site
left unfused, and of the node the reason of an unfused site names (``reason_nodes``)."""


def fill_colour(attrs: dict) -> str | None:
    """The fill colour of a node of ``to_networkx``'s graph, ``None`` for a node outside every site."""
    if attrs.get("fused_op"):
        return FILL_COLOURS["fused_op"]
    return FILL_COLOURS.get(attrs.get("site") or "")


def node_label(node: str, attrs: dict) -> str:
    """``name``, ``target`` and ``shape dtype`` on three lines (empty lines left out)."""
    shape = f"{attrs.get('shape', '')} {attrs.get('dtype', '')}".strip()
    return "\n".join(x for x in (node, attrs.get("target", ""), shape) if x)


def dot_graph(g: nx.DiGraph, name: str) -> nx.DiGraph:
    """A copy of ``g`` holding only Graphviz attributes: boxes labelled by ``node_label``, filled by ``fill_colour``."""
    d = nx.DiGraph(name=name)
    d.graph["node"] = {"shape": "box", "fontsize": "10"}
    for node, attrs in g.nodes(data=True):
        dot_attrs = {"label": node_label(node, attrs)}
        colour = fill_colour(attrs)
        if colour is not None:
            dot_attrs.update(style="filled", fillcolor=colour)
        d.add_node(node, **dot_attrs)
    d.add_edges_from(g.edges)
    return d


def to_dot(g: nx.DiGraph, name: str) -> str:
    """Graphviz DOT text of ``dot_graph(g, name)``: fused op calls green, fused sites orange, unfused grey.

    Written by networkx through pydot (the ``viz`` extra); without pydot by ``_dot_text``, a small writer
    of the same graph, so a dump never depends on an optional package.
    """
    d = dot_graph(g, name)
    try:
        return nx.nx_pydot.to_pydot(d).to_string()
    except ImportError:
        return _dot_text(d)


def _dot_text(d: nx.DiGraph) -> str:
    """DOT for a ``dot_graph``: its node defaults, nodes with their attributes, edges."""

    def attr_list(attrs: dict) -> str:
        return ", ".join(f"{k}={_dot_id(str(v))}" for k, v in attrs.items())

    lines = [f"strict digraph {_dot_id(d.name)} {{"]
    if d.graph.get("node"):
        lines.append(f"node [{attr_list(d.graph['node'])}];")
    for node, attrs in d.nodes(data=True):
        lines.append(f"{_dot_id(node)} [{attr_list(attrs)}];" if attrs else f"{_dot_id(node)};")
    lines += [f"{_dot_id(a)} -> {_dot_id(b)};" for a, b in d.edges]
    return "\n".join(lines) + "\n}\n"


def _dot_id(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


_WORD = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?!\w|\.\w|\()")  # a name, not an op's (aten.mul.Tensor, f(...))


def reason_nodes(reason: str | None, graph) -> list[str]:
    """The nodes of ``graph`` (anything supporting ``in``) that ``reason`` names, as the matchers write them
    (``the stored k mul_3 is ...``). Only names with a digit or an underscore count (``arg3_1``, ``index_put_2``):
    a bare ``mul`` or ``cat`` is as likely an English word or an op's name as the first node of its kind."""
    if not reason:
        return []
    words = dict.fromkeys(_WORD.findall(reason))
    return [w for w in words if ("_" in w or any(c.isdigit() for c in w)) and w in graph]


def _mark_sites(g: nx.DiGraph, sites: list[Site]) -> None:
    """``site`` of each node of a site: ``fused``, ``unfused`` (its roles' nodes and its store) or
    ``unfused_reason`` (what the reason of an unfused site names); see ``FILL_COLOURS``."""
    for s in sites:
        mark = "fused" if s.fused else "unfused"
        for name in (*s.nodes.values(), s.store):
            if name in g:
                g.nodes[name]["site"] = mark
    for s in sites:
        if not s.fused:
            for name in reason_nodes(s.reason, g):
                if not g.nodes[name].get("site"):
                    g.nodes[name]["site"] = "unfused_reason"


_REPORT_NAME = re.compile(r"graph_(\d+)\.report\.json")
"""The name of a report ``write_dump`` writes; other files of the directory, however named, are not ours."""


def _next_index(root: Path) -> int:
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _REPORT_NAME.fullmatch(p.name))]
    return max(taken, default=-1) + 1


def report_text(sites: list[Site]) -> str:
    if not sites:
        return "no RoPE -> KV-cache store sites\n"
    rows = [f"{'fused' if s.fused else 'NOT fused'}: {s.layout}/{s.style} rot={s.rotary_dim} "
            f"tokens={s.num_tokens} in {s.layer or '-'} at {s.source}"
            + ("" if s.fused else f"\n    reason: {s.reason}") for s in sites]
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
    log.info("dumped %s.* (%d sites)", stem, len(sites))
    return stem
