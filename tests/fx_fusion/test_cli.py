"""``python -m fx_fusion inspect DIR`` on bad reports: one ``error: <file>: ...`` line and exit code 2, never a
traceback. (The table itself is tested in tests/e2e/test_examples.py and tests/fx_fusion/test_dump.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from fx_fusion.__main__ import main

REPO = Path(__file__).resolve().parents[2]
GOOD_SITE = {"store": "index_put", "source": "model.py, line 3, in f: c[loc] = k", "fused": True, "reason": None,
             "disabled": False, "layout": "token", "style": "neox", "rotary_dim": 64, "head_dim": 128,
             "num_tokens": "7", "nodes": {"k_store": "index_put"}}


def site(**fields) -> dict:
    return {**GOOD_SITE, **fields}


BAD_REPORTS = [
    ({"sites": [{"fused": False, "source": 5}]}, "site 0: source must be a string or null, got 5"),
    ({"sites": [1, 2]}, "site 0: expected an object, got 1"),
    ({"sites": [site(), "x"]}, 'site 1: expected an object, got "x"'),
    ({"sites": [site(fused="yes")]}, 'site 0: fused must be true or false, got "yes"'),
    ({"sites": [site(fused=1)]}, "site 0: fused must be true or false, got 1"),
    ({"sites": [{"source": "a.py"}]}, "site 0: fused is missing"),
    ({"sites": [site(rotary_dim="64")]}, 'site 0: rotary_dim must be an integer or null, got "64"'),
    ({"sites": [site(head_dim=True)]}, "site 0: head_dim must be an integer or null, got true"),
    ({"sites": [site(num_tokens=[5])]}, "site 0: num_tokens must be a string, an integer or null, got an array"),
    ({"sites": [site(reason={"why": 1})]}, "site 0: reason must be a string or null, got an object"),
    ({"sites": [site(layout=3)]}, "site 0: layout must be a string or null, got 3"),
    ({"sites": [site(disabled=None)]}, "site 0: disabled must be true or false, got null"),
    ({"sites": [site(nodes=["a"])]}, "site 0: nodes must be an object of node names, got an array"),
    ({"sites": [site(nodes={"k_store": 4})]}, "site 0: nodes must map roles to node names (strings), got 'k_store': 4"),
    ({"sites": [site(notes="the norm")]}, 'site 0: notes must be a list of strings, got "the norm"'),
    ({"graph": 7, "sites": []}, "graph must be a string, got 7"),
    ({"sites": {}}, "expected an object with a 'sites' list, got an object"),
    ([], "expected an object with a 'sites' list, got an array"),
]


@pytest.mark.parametrize("report, message", BAD_REPORTS, ids=[m for _, m in BAD_REPORTS])
def test_mistyped_report_names_file_site_and_field(tmp_path, capsys, report, message):
    path = tmp_path / "graph_000.report.json"
    path.write_text(json.dumps(report))
    assert main(["inspect", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path}: {message}\n" and captured.out == ""


def test_a_bad_report_among_good_ones_is_named(tmp_path, capsys):
    (tmp_path / "graph_000.report.json").write_text(json.dumps({"sites": [site()]}))
    (tmp_path / "graph_001.report.json").write_text(json.dumps({"sites": [site(), site(style=2)]}))
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'graph_001.report.json'}: site 1: style must be a string or null, got 2\n"


def test_good_report_with_optional_fields_left_out(tmp_path, capsys):
    (tmp_path / "graph_000.report.json").write_text(json.dumps({"sites": [{"fused": False, "num_tokens": 3}]}))
    assert main(["inspect", str(tmp_path)]) == 0
    assert "graphs: 1  sites: 1  fused: 0  not fused: 1" in capsys.readouterr().out


def test_a_fused_sites_notes_are_in_the_table(tmp_path, capsys):
    """What of a fused site stays outside the op (here a QK-norm) is said where an unfused site gives its reason."""
    note = "k's QK-norm stays a kernel of its own: mul_9 also reads convert_element_type_3, a value of the norm"
    (tmp_path / "graph_000.report.json").write_text(json.dumps({"sites": [site(notes=[note]), site()]}))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("note: k's QK-norm stays a kernel of its own") == 1, out


def test_non_utf8_report_names_the_file(tmp_path, capsys):
    path = tmp_path / "graph_000.report.json"
    path.write_bytes(b'{"sites": [], "graph": "\xff\xfe"}')
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not UTF-8 text (") and err.count("\n") == 1


@pytest.mark.parametrize("content", [b'{"sites": [{"fused": false, "source": 5}]}', b"\xff\xfe{}"])
def test_no_traceback_from_the_command(tmp_path, content):
    path = tmp_path / "graph_000.report.json"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "fx_fusion", "inspect", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {path}: ") and proc.stdout == ""


# ---- bad dump directories: one `error:` line, exit code 2, nothing read or written outside DIR ---------


def small_graph(cycle: bool = False) -> nx.DiGraph:
    g = nx.DiGraph()
    for name, target in (("cache", "cache"), ("mm", "mm.default"), ("rope", "add.Tensor"), ("st", "index_put.default")):
        g.add_node(name, op="placeholder" if name == "cache" else "call_function", target=target, shape="", dtype="",
                   fused_op=False, site="")
    g.add_edges_from([("mm", "rope"), ("rope", "st"), ("cache", "st")])
    if cycle:
        g.add_edge("st", "mm")
    return g


def write_dump_files(directory: Path, graph: str = "graph_000", cycle: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    unfused = site(fused=False, reason="no v store", nodes={"k_store": "st"}, store="st")
    (directory / "graph_000.report.json").write_text(json.dumps({"graph": graph, "sites": [unfused]}))
    nx.write_graphml(small_graph(cycle), directory / "graph_000.before.graphml")


def run_inspect(capsys, *args) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_a_good_small_dump_draws(tmp_path, capsys):
    write_dump_files(tmp_path / "dump")
    code, out, err = run_inspect(capsys, tmp_path / "dump", "--draw", "--renderer", "text")
    assert (code, err) == (0, "") and (tmp_path / "dump" / "pictures" / "graph_000.site0.before.txt").exists()


def test_pictures_is_a_file(tmp_path, capsys):
    write_dump_files(tmp_path)
    (tmp_path / "pictures").write_text("mine")
    code, _, err = run_inspect(capsys, tmp_path, "--draw", "--renderer", "text")
    assert code == 2 and err == f"error: --draw: {tmp_path / 'pictures'} is not a directory (pictures go there)\n"
    assert (tmp_path / "pictures").read_text() == "mine"


@pytest.mark.parametrize("graph", ["sub/graph_000", "../x", "..", ".", "", "/etc/passwd", "a\\b", "graph\x00"])
def test_a_graph_name_that_is_a_path_is_refused(tmp_path, capsys, graph):
    """The report's "graph" names files of DIR (graph.before.graphml) and pictures: never a path."""
    outside, dump = tmp_path / "outside", tmp_path / "dump"
    outside.mkdir()
    nx.write_graphml(small_graph(), outside / "x.before.graphml")  # what "../x" would read
    (dump / "sub").mkdir(parents=True)
    nx.write_graphml(small_graph(), dump / "sub" / "graph_000.before.graphml")
    write_dump_files(dump, graph=graph)
    before = files_under(tmp_path)
    code, out, err = run_inspect(capsys, dump, "--draw", "--renderer", "text")
    assert code == 2 and out == ""
    assert err == (f"error: {dump / 'graph_000.report.json'}: graph must be a file name stem like "
                   f"'graph_000' (no path), got {json.dumps(graph)}\n")
    assert files_under(tmp_path) == before


def test_a_report_linked_from_outside_dir_is_refused(tmp_path, capsys):
    outside, dump = tmp_path / "outside", tmp_path / "dump"
    write_dump_files(outside)
    dump.mkdir()
    (dump / "graph_000.report.json").symlink_to(outside / "graph_000.report.json")
    code, out, err = run_inspect(capsys, dump)
    assert code == 2 and out == ""
    assert err == f"error: {dump / 'graph_000.report.json'}: a link to a file outside {dump}\n"


def test_a_graph_linked_from_outside_dir_is_refused(tmp_path, capsys):
    outside, dump = tmp_path / "outside", tmp_path / "dump"
    write_dump_files(outside)
    write_dump_files(dump)
    (dump / "graph_000.before.graphml").unlink()
    (dump / "graph_000.before.graphml").symlink_to(outside / "graph_000.before.graphml")
    code, _, err = run_inspect(capsys, dump, "--draw", "--renderer", "text")
    assert code == 2 and err == f"error: --draw: {dump / 'graph_000.before.graphml'}: a link to a file outside {dump}\n"


def test_pictures_linked_outside_dir_are_refused(tmp_path, capsys):
    outside, dump = tmp_path / "outside", tmp_path / "dump"
    outside.mkdir()
    write_dump_files(dump)
    (dump / "pictures").symlink_to(outside, target_is_directory=True)
    code, _, err = run_inspect(capsys, dump, "--draw", "--renderer", "text")
    assert code == 2 and err == f"error: --draw: {dump / 'pictures'} is a link to a folder outside {dump}\n"
    assert list(outside.iterdir()) == []


def test_a_graph_with_a_cycle(tmp_path, capsys):
    write_dump_files(tmp_path, cycle=True)
    code, _, err = run_inspect(capsys, tmp_path, "--draw", "--renderer", "text")
    path = tmp_path / "graph_000.before.graphml"
    assert code == 2 and err.startswith(f"error: --draw: {path}: the graph has a cycle (") and err.count("\n") == 1


def test_a_deeply_nested_report(tmp_path, capsys):
    path = tmp_path / "graph_000.report.json"
    path.write_text('{"sites": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, out, err = run_inspect(capsys, tmp_path)
    assert (code, out) == (2, "") and err == f"error: {path}: nested too deeply to read\n"


def test_a_5000_digit_integer(tmp_path, capsys):
    path = tmp_path / "graph_000.report.json"
    path.write_text('{"sites": [{"fused": false, "rotary_dim": ' + "9" * 5000 + "}]}")
    code, out, err = run_inspect(capsys, tmp_path)
    assert (code, out) == (2, "") and err.startswith(f"error: {path}: not a readable report (") and err.count("\n") == 1


def test_a_5000_digit_integer_in_a_graph(tmp_path, capsys):
    write_dump_files(tmp_path)
    g = small_graph()
    g.nodes["st"]["depth"] = 7777  # written as a "long" attribute
    path = tmp_path / "graph_000.before.graphml"
    nx.write_graphml(g, path)
    path.write_text(path.read_text().replace(">7777<", ">" + "9" * 5000 + "<"))
    code, _, err = run_inspect(capsys, tmp_path, "--draw", "--renderer", "text")
    assert code == 2 and err.startswith(f"error: --draw: {path}: not a readable graphml file (") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["nested", "dotdot"])
def test_bad_dumps_through_the_command(tmp_path, case):
    """The same through ``python -m fx_fusion``: exit code 2, one `error:` line, no traceback."""
    write_dump_files(tmp_path, graph="../x" if case == "dotdot" else "graph_000", cycle=case == "cycle")
    if case == "pictures_file":
        (tmp_path / "pictures").write_text("mine")
    if case == "nested":
        (tmp_path / "graph_000.report.json").write_text('{"sites": ' + "[" * 100_000 + "]" * 100_000 + "}")
    if case == "digits":
        (tmp_path / "graph_000.report.json").write_text('{"sites": [{"fused": ' + "1" * 5000 + "}]}")
    proc = subprocess.run([sys.executable, "-m", "fx_fusion", "inspect", str(tmp_path), "--draw", "--renderer", "text"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
