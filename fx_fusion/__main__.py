"""``python -m fx_fusion inspect DIR``: one table of every candidate site in a dump directory.

A dump directory (``options={"dump_dir": DIR}``, see ``fx_fusion/dump.py``) holds one
``graph_NNN.report.json`` per compiled graph. This command prints one row per site (graph, cache layout,
RoPE style, rotary dim, token count, fused or not, the layer's module path, the model source line, the reason
when not fused, or what of a fused site stays outside the op) and the totals. With ``--draw``, also a picture of each site before (and, when fused, after) the pass
in ``DIR/pictures`` (see ``fx_fusion/draw.py``), whose paths it prints. Exit code 0, or 2 when DIR holds
no reports, a report or graph file is malformed, links outside DIR, or no picture can be drawn.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import MappingProxyType

from fx_fusion.report import shorten_source

COLUMNS = ("graph", "layout", "style", "rot", "tokens", "fused", "layer", "source", "reason")


class ReportError(ValueError):
    """A report file that cannot be read or does not hold what ``fx_fusion/dump.py`` writes."""


_STRING = ((str,), "a string")
_OPTIONAL_STRING = ((str, type(None)), "a string or null")
_OPTIONAL_INT = ((int, type(None)), "an integer or null")
_BOOL = ((bool,), "true or false")
SITE_FIELDS = MappingProxyType({
    "store": _STRING,
    "source": _OPTIONAL_STRING,
    "fused": _BOOL,
    "reason": _OPTIONAL_STRING,
    "disabled": _BOOL,
    "layout": _OPTIONAL_STRING,
    "style": _OPTIONAL_STRING,
    "rotary_dim": _OPTIONAL_INT,
    "head_dim": _OPTIONAL_INT,
    "num_tokens": ((str, int, type(None)), "a string, an integer or null"),
    "nodes": ((dict,), "an object of node names"),
    "layer": _OPTIONAL_STRING,
    "notes": ((list,), "a list of strings"),
})
"""The JSON types of a site's fields (``patterns.Site.as_dict``); ``fused`` is required, the rest optional."""


def load_reports(directory: str | Path) -> list[dict]:
    """The parsed ``graph_*.report.json`` files of ``directory``, in compilation order.

    Raises ``ReportError`` naming the file (and the site and field) for a report that is unreadable,
    not JSON, not UTF-8 or whose fields have the wrong types.
    """
    directory = Path(directory)
    return [load_report(path, directory) for path in sorted(directory.glob("graph_*.report.json"))]


GRAPH_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A report's ``graph``: the stem of its files in the directory (``graph_000``), never a path."""


def is_inside(path: Path, directory: Path) -> bool:
    """Whether ``path``, links followed, lies in ``directory`` (links followed too)."""
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def load_report(path: Path, directory: Path | None = None) -> dict:
    """One report; with ``directory``, a report that is a link to a file outside it is refused."""
    if directory is not None and not is_inside(path, directory):
        raise ReportError(f"{path}: a link to a file outside {directory}")
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text ({e})") from None
    except RecursionError:
        raise ReportError(f"{path}: nested too deeply to read") from None
    except (OSError, ValueError) as e:  # JSONDecodeError, and int() of a number too long to convert
        raise ReportError(f"{path}: not a readable report ({e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("sites"), list):
        raise ReportError(f"{path}: expected an object with a 'sites' list, got {_describe(report)}")
    report.setdefault("graph", path.name.split(".")[0])
    if not isinstance(report["graph"], str):
        raise ReportError(f"{path}: graph must be a string, got {_describe(report['graph'])}")
    if not GRAPH_NAME.fullmatch(report["graph"]):  # it names files of the directory: never a path out of it
        raise ReportError(f"{path}: graph must be a file name stem like 'graph_000' (no path), "
                          f"got {_describe(report['graph'])}")
    for i, site in enumerate(report["sites"]):
        problem = _site_problem(site)
        if problem:
            raise ReportError(f"{path}: site {i}: {problem}")
    return report


def _site_problem(site) -> str | None:
    if not isinstance(site, dict):
        return f"expected an object, got {_describe(site)}"
    if "fused" not in site:
        return "fused is missing"
    for name, (types, expected) in SITE_FIELDS.items():
        value = site.get(name)
        if name in site and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return f"{name} must be {expected}, got {_describe(value)}"
    bad = [(k, v) for k, v in site.get("nodes", {}).items() if not isinstance(v, str)]
    if bad:
        return f"nodes must map roles to node names (strings), got {bad[0][0]!r}: {_describe(bad[0][1])}"
    return None


def _describe(value) -> str:
    """A JSON value for an error message: ``5``, ``"text"``, ``true``, ``null``, ``an object``, ``an array``."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def site_rows(reports: list[dict], source_width: int = 60) -> list[tuple[str, ...]]:
    rows = []
    for report in reports:
        for site in report["sites"]:
            rows.append((
                str(report["graph"]),
                str(site.get("layout") or "-"),
                str(site.get("style") or "-"),
                str(site.get("rotary_dim") if site.get("rotary_dim") is not None else "-"),
                str(site.get("num_tokens") or "-"),
                "yes" if site.get("fused") else "no",
                str(site.get("layer") or "-"),
                shorten_source(site.get("source"), source_width),
                _notes(site) if site.get("fused") else str(site.get("reason") or "-"),
            ))
    return rows


def _notes(site: dict) -> str:
    """What of a fused site stays outside the op (a QK-norm, fp8 q), or nothing."""
    notes = [str(n) for n in site.get("notes") or ()]
    return f"note: {'; '.join(notes)}" if notes else ""


def format_table(reports: list[dict], source_width: int = 60) -> str:
    """The site table and totals as text."""
    rows = site_rows(reports, source_width)
    lines = []
    if rows:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines += [fmt(COLUMNS), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
    empty = [str(r["graph"]) for r in reports if not r["sites"]]
    if empty:
        lines.append(f"graphs without candidate sites: {', '.join(empty)}")
    fused = sum(r[5] == "yes" for r in rows)
    lines.append(f"graphs: {len(reports)}  sites: {len(rows)}  fused: {fused}  not fused: {len(rows) - fused}")
    return "\n".join(lines) + "\n"


def _inspect(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return 2
    try:
        reports = load_reports(directory)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not reports:
        print(f"error: no graph_*.report.json in {directory} (compile with options={{'dump_dir': "
              f"'{directory}'}} to write them)", file=sys.stderr)
        return 2
    renderer = None
    if args.draw:
        from fx_fusion import draw

        try:
            renderer = draw.pick_renderer(args.renderer)
        except draw.DrawError as e:
            print(f"error: --draw: {e}", file=sys.stderr)
            return 2
    sys.stdout.write(format_table(reports, args.source_width))
    if renderer is not None:
        try:
            pictures = draw.draw_reports(directory, reports, renderer)
        except OSError as e:  # a file system refusal the checks did not foresee (permissions, a full disk)
            print(f"error: --draw: {e}", file=sys.stderr)
            return 2
        except draw.DrawError as e:
            print(f"error: --draw: {e}", file=sys.stderr)
            return 2
        print(f"pictures ({renderer}):" if pictures else "pictures: none (no sites)")
        for path in pictures:
            print(f"  {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fx_fusion", description="fx_fusion tools")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise the site reports of a dump directory",
                                  description=__doc__.splitlines()[0])
    inspect.add_argument("dir", help="a dump directory (FusionConfig.dump_dir)")
    inspect.add_argument("--source-width", type=int, default=60, metavar="N",
                         help="cut source lines to N characters (default 60)")
    inspect.add_argument("--draw", action="store_true",
                         help="draw each site before/after the pass into DIR/pictures and print the paths")
    inspect.add_argument("--renderer", default="auto", choices=["auto", "dot", "matplotlib", "text"],
                         help="with --draw: graphviz dot (SVG), matplotlib (PNG) or text; auto: dot, else "
                              "matplotlib, else an error")
    inspect.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
