"""Pictures of each site before and after the pass, drawn from a dump directory's networkx exports.

``python -m fx_fusion inspect DIR --draw`` calls ``draw_reports``; ``examples/inspect_dump.py`` shows one site.
A picture holds only the part of the graph the pass looked at: before, the site's RoPE and stores with
everything feeding them back to the qkv projection; after, the fused op call with its inputs back to the
projection and its users. Colours and labels are those of the dump's DOT files (``fx_fusion/dump.py``).

Renderers: ``dot`` (graphviz's program, SVG), ``matplotlib`` (PNG, the ``viz`` extra), ``text`` (one line
per node). Each picture's DOT source is written next to it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import networkx as nx

from fx_fusion.dump import fill_colour, node_label, to_dot

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


def projection_of(g: nx.DiGraph, node: str) -> str | None:
    """The matmul nearest above ``node`` (the qkv projection), ``None`` when there is none."""
    mms = [a for a in nx.ancestors(g, node) if str(g.nodes[a].get("target", "")).split(".")[0] in _PROJECTIONS]
    return max(mms, key=lambda a: len(nx.ancestors(g, a)), default=None)


def _above(g: nx.DiGraph, node: str) -> set[str]:
    """``node``'s ancestors back to its projection (the projection kept, what feeds it dropped)."""
    proj = projection_of(g, node)
    return nx.ancestors(g, node) - (nx.ancestors(g, proj) if proj is not None else set())


def region_before(g: nx.DiGraph, site: dict) -> nx.DiGraph:
    """The site's RoPE and store nodes (its ``nodes`` roles, else its ``store``) and what feeds them."""
    ends = [n for n in (site.get("nodes") or {}).values() if n in g] or [n for n in [site.get("store")] if n in g]
    if not ends:
        raise DrawError(f"none of the site's nodes ({site.get('nodes') or site.get('store')}) is in the graph")
    return g.subgraph(set(ends).union(*(_above(g, e) for e in ends))).copy()


def region_after(g: nx.DiGraph, fused: str) -> nx.DiGraph:
    """The fused op call ``fused``, its inputs back to the projection, its users and theirs."""
    keep = {fused} | _above(g, fused)
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


def as_text(g: nx.DiGraph) -> str:
    """One line per node in topological order: name, target, shape, inputs (a set: see the .py for the call)."""
    lines = []
    for n in nx.topological_sort(g):
        a = g.nodes[n]
        mark = "  <== fused op" if a.get("fused_op") else {"fused": "  <== site", "unfused": "  <== site (not fused)"}.get(
            a.get("site") or "", "")
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
    path = Path(directory) / f"{graph}.{tag}.graphml"
    try:
        return nx.read_graphml(path)
    except FileNotFoundError:
        raise DrawError(f"{path}: missing (the pictures are drawn from the dump's graphml files)") from None
    except Exception as e:  # networkx raises assorted parser errors (ElementTree, KeyError, NetworkXError)
        raise DrawError(f"{path}: not a readable graphml file ({type(e).__name__}: {e})") from None


def draw_site(directory: Path, graph: str, index: int, site: dict, renderer: str, out_dir: Path,
              before: nx.DiGraph | None = None, after: nx.DiGraph | None = None) -> list[Path]:
    """Pictures of site ``index`` of ``graph``: ``before`` always, ``after`` when it was fused."""
    before = before if before is not None else read_graph(directory, graph, "before")
    stem = out_dir / f"{graph}.site{index}"
    label = f"{graph} site {index}"
    try:
        pictures = [render(region_before(before, site), stem.with_name(stem.name + ".before"),
                           f"{label} before the fx_fusion pass", renderer)]
    except DrawError as e:
        raise DrawError(f"{graph} site {index}: {e}") from None
    if site.get("fused"):
        after = after if after is not None else read_graph(directory, graph, "after")
        fused = fused_node_of(before, after, site)
        if fused is None:
            raise DrawError(f"{graph} site {index}: no fused op call in {graph}.after.graphml reads its caches")
        pictures.append(render(region_after(after, fused), stem.with_name(stem.name + ".after"),
                               f"{label} after the fx_fusion pass", renderer))
    return pictures


def draw_reports(directory: str | Path, reports: list[dict], renderer: str, out_dir: str | Path | None = None) -> list[Path]:
    """Pictures of every site of ``reports`` (``python -m fx_fusion inspect`` loads them), in ``DIR/pictures``."""
    directory = Path(directory)
    out_dir = Path(out_dir) if out_dir is not None else directory / "pictures"
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = []
    for report in reports:
        if not report["sites"]:
            continue
        before = read_graph(directory, report["graph"], "before")
        after = read_graph(directory, report["graph"], "after") if any(s.get("fused") for s in report["sites"]) else None
        for index, site in enumerate(report["sites"]):
            pictures += draw_site(directory, report["graph"], index, site, renderer, out_dir, before, after)
    return pictures
