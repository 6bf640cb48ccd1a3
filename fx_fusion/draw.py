"""Pictures of each site before and after the pass, drawn from a dump directory's networkx exports.

``python -m fx_fusion inspect DIR --draw`` calls ``draw_reports``; ``examples/inspect_dump.py`` shows one site.
A picture holds only the part of the graph the pass looked at: before, the site's RoPE and stores with
everything feeding them back to the qkv projection; after, the fused op call with its inputs back to the
projection and its users. Colours and labels are those of the dump's DOT files (``fx_fusion/dump.py``).

Renderers: ``dot`` (graphviz's program, SVG), ``matplotlib`` (PNG, the ``viz`` extra), ``text`` (one line
per node). Each picture's DOT source is written next to it.
"""

from __future__ import annotations

import heapq
import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import MappingProxyType

import networkx as nx

from fx_fusion.dump import fill_colour, node_label, reason_nodes, to_dot

RENDERERS = ("dot", "matplotlib", "text")
_PROJECTIONS = ("mm", "addmm", "bmm")  # ops that end a picture upwards (the qkv projection)


class DrawError(RuntimeError):
    """A picture that cannot be drawn: a renderer or a dump file is missing, or ``dot`` failed."""


def renderer_missing(renderer: str) -> str | None:
    """Why ``renderer`` cannot run here, or ``None`` when it can."""
    if renderer == "dot" and shutil.which("dot") is None:
        return "graphviz's `dot` program is not on PATH (install graphviz)"
    if renderer == "matplotlib" and importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install 'fx-fusion[viz]')"
    if renderer not in RENDERERS:
        return f"unknown renderer {renderer!r} (expected one of {', '.join(RENDERERS)})"
    return None


def pick_renderer(requested: str = "auto") -> str:
    """``requested``, or for ``auto`` the first of ``dot``, ``matplotlib`` that runs here.

    Raises ``DrawError`` saying what to install when none does (``text`` is never picked by ``auto``:
    asking for pictures and getting text would be a surprise; ask for it by name).
    """
    candidates = ("dot", "matplotlib") if requested == "auto" else (requested,)
    problems = [renderer_missing(r) for r in candidates]
    for renderer, problem in zip(candidates, problems):
        if problem is None:
            return renderer
    raise DrawError("no renderer for pictures: " + "; ".join(problems) +
                    ("; --renderer text writes text pictures" if requested == "auto" else ""))


# ---- the part of a graph a picture shows ---------------------------------------------------------


def positions(g: nx.DiGraph) -> dict[str, int]:
    """Each node's place in a topological order of ``g`` (one pass over the graph)."""
    return {n: i for i, n in enumerate(nx.topological_sort(g))}


def _is_projection(attrs: dict) -> bool:
    return str(attrs.get("target", "")).split(".")[0] in _PROJECTIONS


def _above(g: nx.DiGraph, node: str, order: dict[str, int] | None = None) -> set[str]:
    """What feeds ``node`` back to its projection: its ancestors that come after the matmul nearest above it
    (the qkv projection: of the matmuls it depends on, the last in topological order), the projection, and
    the direct inputs of those nodes (cache, slots, positions, tables); nothing that feeds the projection.

    One sweep up from ``node`` in reverse topological order (``order``, from ``positions(g)``, computed once
    per graph): the first matmul it meets is the nearest, and every node still waiting then is an input that
    comes before it. The work is the size of the picture, whatever the depth of the model (ranking every
    matmul above a site by its own ancestors, as this once did, was cubic in the number of layers). Without
    a matmul above, every ancestor.
    """
    order = order if order is not None else positions(g)
    waiting, seen, region = [(-order[node], node)], {node}, set()
    while waiting:
        _, n = heapq.heappop(waiting)
        if n != node:
            region.add(n)
            if _is_projection(g.nodes[n]):
                return region | {m for _, m in waiting}
        for p in g.predecessors(n):
            if p not in seen:
                seen.add(p)
                heapq.heappush(waiting, (-order[p], p))
    return region


def projection_of(g: nx.DiGraph, node: str, order: dict[str, int] | None = None) -> str | None:
    """The matmul nearest above ``node`` (the qkv projection), ``None`` when there is none."""
    order = order if order is not None else positions(g)
    above = [n for n in _above(g, node, order) if _is_projection(g.nodes[n])]
    return max(above, key=order.__getitem__, default=None)


def site_ends(g: nx.DiGraph, site: dict) -> list[str]:
    """The nodes of ``g`` a picture of ``site`` starts from: its roles' nodes and its store; for a site left
    unfused, also the nodes its reason names (``fx_fusion.dump.reason_nodes``)."""
    names = [*(site.get("nodes") or {}).values(), site.get("store")]
    if not site.get("fused"):
        names += reason_nodes(site.get("reason"), g)
    return [n for n in dict.fromkeys(names) if isinstance(n, str) and n in g]


def region_before(g: nx.DiGraph, site: dict, order: dict[str, int] | None = None) -> nx.DiGraph:
    """The site's RoPE and store nodes (``site_ends``) and what feeds them back to the projection."""
    ends = site_ends(g, site)
    if not ends:
        raise DrawError(f"none of the site's nodes ({site.get('nodes') or site.get('store')}) is in the graph")
    order = order if order is not None else positions(g)
    return g.subgraph(set(ends).union(*(_above(g, e, order) for e in ends))).copy()


def region_after(g: nx.DiGraph, fused: str, order: dict[str, int] | None = None) -> nx.DiGraph:
    """The fused op call ``fused``, its inputs back to the projection, its users and theirs."""
    keep = {fused} | _above(g, fused, order)
    for user in g.successors(fused):
        keep |= {user, *g.successors(user)}
    return g.subgraph(keep).copy()


def fused_node_of(before: nx.DiGraph, after: nx.DiGraph, site: dict) -> str | None:
    """The fused op call that replaced a fused ``site``: the one reading the same caches as its stores."""
    fused = [n for n, a in after.nodes(data=True) if a.get("fused_op")]
    stores = [site["nodes"][r] for r in ("k_store", "v_store") if r in site.get("nodes", {})]
    inputs = {p for s in stores if s in before for p in before.predecessors(s)
              if before.nodes[p].get("op") in ("placeholder", "get_attr")}
    shared = {n: len(inputs & set(after.predecessors(n))) for n in fused}
    best = max(shared.values(), default=0)
    winners = [n for n, count in shared.items() if count == best]
    if best > 0 and len(winners) == 1:
        return winners[0]
    return fused[0] if len(fused) == 1 and not inputs else None


# ---- renderers ---------------------------------------------------------------------------------

TEXT_MARKS = MappingProxyType({"fused": "  <== site", "unfused": "  <== site (not fused)",
                               "unfused_reason": "  <== why the site was not fused"})
"""The text renderer's mark of a node, by its ``site`` attribute (the colours of ``fx_fusion.dump.FILL_COLOURS``)."""


def as_text(g: nx.DiGraph) -> str:
    """One line per node in topological order: name, target, shape, inputs (a set: see the .py for the call)."""
    lines = []
    for n in nx.topological_sort(g):
        a = g.nodes[n]
        mark = "  <== fused op" if a.get("fused_op") else TEXT_MARKS.get(a.get("site") or "", "")
        inputs = ", ".join(sorted(g.predecessors(n)))
        lines.append(f"  {n:<22} {a.get('target', ''):<24} {a.get('shape', ''):<12}"
                     f"{' <- ' + inputs if inputs else ''}{mark}")
    return "\n".join(lines) + "\n"


def draw_matplotlib(g: nx.DiGraph, path: Path, title: str) -> None:
    """A layered PNG, inputs at the top (no pyplot: nothing global is changed)."""
    from matplotlib.figure import Figure

    depth = {n: d for d, layer in enumerate(nx.topological_generations(g)) for n in layer}
    layered = nx.DiGraph(g.edges)
    layered.add_nodes_from((n, {"depth": depth[n]}) for n in g)
    pos = nx.multipartite_layout(layered, subset_key="depth", align="horizontal", scale=4)
    pos = {n: (x, -y) for n, (x, y) in pos.items()}
    fig = Figure(figsize=(12, max(4, 0.7 * (max(depth.values(), default=0) + 1))))
    ax = fig.subplots()
    nx.draw_networkx(g, pos, ax=ax, node_color=[fill_colour(g.nodes[n]) or "white" for n in g], edgecolors="grey",
                     node_shape="s", node_size=500, font_size=6, arrowsize=8,
                     labels={n: "\n".join(node_label(n, g.nodes[n]).split("\n")[:2]) for n in g})
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(g: nx.DiGraph, stem: Path, title: str, renderer: str) -> Path:
    """Write ``stem.dot`` and the picture (``stem.svg``, ``.png`` or ``.txt``); return the picture's path."""
    dot_path = stem.with_name(stem.name + ".dot")
    for suffix in (".dot", ".svg", ".png", ".txt"):
        if stem.with_name(stem.name + suffix).is_symlink():
            raise DrawError(f"{stem.with_name(stem.name + suffix)} is a link (pictures are never written through one)")
    dot_path.write_text(to_dot(g, title))
    if renderer == "dot":
        out = stem.with_name(stem.name + ".svg")
        proc = subprocess.run(["dot", "-Tsvg", str(dot_path), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DrawError(f"dot failed on {dot_path} (exit code {proc.returncode}): {proc.stderr.strip()}")
    elif renderer == "matplotlib":
        out = stem.with_name(stem.name + ".png")
        draw_matplotlib(g, out, title)
    elif renderer == "text":
        out = stem.with_name(stem.name + ".txt")
        out.write_text(f"{title}\n{as_text(g)}")
    else:
        raise DrawError(renderer_missing(renderer) or f"unknown renderer {renderer!r}")
    return out


# ---- a dump directory ----------------------------------------------------------------------------


def read_graph(directory: Path, graph: str, tag: str) -> nx.DiGraph:
    """``DIR/graph.tag.graphml``: a file of ``directory`` (not a link out of it) holding an acyclic graph."""
    path = Path(directory) / f"{graph}.{tag}.graphml"
    if path.is_symlink() and not path.resolve().is_relative_to(Path(directory).resolve()):
        raise DrawError(f"{path}: a link to a file outside {directory}")
    try:
        g = nx.read_graphml(path)
    except FileNotFoundError:
        raise DrawError(f"{path}: missing (the pictures are drawn from the dump's graphml files)") from None
    except Exception as e:  # networkx raises assorted parser errors (ElementTree, KeyError, NetworkXError, int())
        raise DrawError(f"{path}: not a readable graphml file ({type(e).__name__}: {e})") from None
    if not isinstance(g, nx.DiGraph):
        raise DrawError(f"{path}: not a directed graph (the dump writes one)")
    if nx.is_directed_acyclic_graph(g):  # one topological sort (find_cycle walks every edge's DFS: slow)
        return g
    cycle = nx.find_cycle(g)
    raise DrawError(f"{path}: the graph has a cycle ({' -> '.join(a for a, _ in cycle[:6])}"
                    f"{' -> ...' if len(cycle) > 6 else ''}); an FX graph never does")


def picture_title(graph: str, index: int, site: dict) -> str:
    """``graph_000 site 3 (model.layers.3.self_attn)``: the layer when the report names it."""
    layer = site.get("layer")
    return f"{graph} site {index}" + (f" ({layer})" if layer else "")


def draw_site(directory: Path, graph: str, index: int, site: dict, renderer: str, out_dir: Path,
              before: nx.DiGraph | None = None, after: nx.DiGraph | None = None,
              orders: tuple[dict | None, dict | None] = (None, None)) -> list[Path]:
    """Pictures of site ``index`` of ``graph``: ``before`` always, ``after`` when it was fused.

    ``orders``: ``positions()`` of ``before`` and ``after`` when the caller has them (one per graph, not per site).
    """
    before = before if before is not None else read_graph(directory, graph, "before")
    stem = out_dir / f"{graph}.site{index}"
    label = picture_title(graph, index, site)
    try:
        pictures = [render(region_before(before, site, orders[0]), stem.with_name(stem.name + ".before"),
                           f"{label} before the fx_fusion pass", renderer)]
    except DrawError as e:
        raise DrawError(f"{graph} site {index}: {e}") from None
    if site.get("fused"):
        after = after if after is not None else read_graph(directory, graph, "after")
        fused = fused_node_of(before, after, site)
        if fused is None:
            raise DrawError(f"{graph} site {index}: no fused op call in {graph}.after.graphml reads its caches")
        pictures.append(render(region_after(after, fused, orders[1]), stem.with_name(stem.name + ".after"),
                               f"{label} after the fx_fusion pass", renderer))
    return pictures


def picture_dir(directory: Path, out_dir: Path | None = None) -> Path:
    """Where pictures go: ``out_dir``, or ``DIR/pictures``, which must be a folder of ``DIR`` (made if missing)."""
    if out_dir is None:
        out_dir = directory / "pictures"
        if out_dir.is_symlink() and not out_dir.resolve().is_relative_to(directory.resolve()):
            raise DrawError(f"{out_dir} is a link to a folder outside {directory}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DrawError(f"{out_dir} is not a directory (pictures go there)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DrawError(f"{out_dir}: cannot make the pictures' folder ({e})") from None
    return out_dir


def draw_reports(directory: str | Path, reports: list[dict], renderer: str, out_dir: str | Path | None = None) -> list[Path]:
    """Pictures of every site of ``reports`` (``python -m fx_fusion inspect`` loads them), in ``DIR/pictures``.

    Each graph is read, checked and ordered once; each site's picture then costs about its own size (see
    ``_above``), so the whole run is linear in the size of the dump, however deep the model.
    """
    directory = Path(directory)
    out_dir = picture_dir(directory, Path(out_dir) if out_dir is not None else None)
    pictures = []
    for report in reports:
        if not report["sites"]:
            continue
        before = read_graph(directory, report["graph"], "before")
        after = read_graph(directory, report["graph"], "after") if any(s.get("fused") for s in report["sites"]) else None
        orders = (positions(before), positions(after) if after is not None else None)
        for index, site in enumerate(report["sites"]):
            pictures += draw_site(directory, report["graph"], index, site, renderer, out_dir, before, after, orders)
    return pictures
