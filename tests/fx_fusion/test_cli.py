"""``python -m fx_fusion inspect DIR`` on bad reports: one ``error: <file>: ...`` line and exit code 2, never a
traceback. (The table itself is tested in tests/e2e/test_examples.py and tests/fx_fusion/test_dump.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
