"""The examples run as a user runs them (a fresh process, CPU, default sizes) and say what they should."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, *args: str, timeout: float, tmp_path: Path) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the example must set it itself on CPU
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--device", "cpu",
                           "--dump-dir", str(tmp_path / "dump"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out[-4000:]}"
    return out


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", timeout=240, tmp_path=tmp_path)
    assert "OK: tokens, logits and KV pools match eager; 2 of 2 layers fused in each of 2 graphs" in out
    assert len(re.findall(r"^fused: token/neox rot=16 tokens=8 ", out, re.M)) == 2  # prefill, per layer
    assert len(re.findall(r"^fused: token/neox rot=16 tokens=1 ", out, re.M)) == 2  # decode, per layer
    assert "NOT fused" not in out
    assert sorted(p.name for p in (tmp_path / "dump").glob("*.report.json")) == [
        "graph_000.report.json", "graph_001.report.json"]


def test_hf_llama(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("hf_llama.py", timeout=300, tmp_path=tmp_path)
    eager = re.search(r"^eager tokens:\s+(\[.*\])", out, re.M)
    compiled = re.search(r"^compiled tokens:\s+(\[.*\])", out, re.M)
    generated = re.search(r"^generate \(compiled decode\) tokens:\s+(\[.*\])", out, re.M)
    assert eager and compiled and generated, out
    assert eager.group(1) == compiled.group(1) == generated.group(1)
    # part 1: prefill + decode graphs, part 2: generate's decode graph; every layer fused in each
    assert out.count("graphs: 2  sites: 4  fused: 4  not fused: 0") == 1
    assert out.count("graphs: 1  sites: 2  fused: 2  not fused: 0") == 1
    assert "OK: tokens equal eager generation" in out


def test_inspect_dump(tmp_path):
    out = run_example("inspect_dump.py", "--renderer", "text", timeout=240, tmp_path=tmp_path)
    assert "compiled output and k_buffer equal eager: True" in out
    assert "graphs: 1  sites: 1  fused: 1  not fused: 0" in out  # the `inspect` table
    assert re.search(r"fused: \['auto_functionalized\w*'\]", out)
    assert "<== fused op" in out and "<== site" in out  # the text pictures, before and after
    assert "OK: 1 fused op in graph_000" in out
    pictures = tmp_path / "dump" / "pictures"
    assert sorted(p.name for p in pictures.iterdir()) == [
        f"graph_000.site0.{tag}.{ext}" for tag in ("after", "before") for ext in ("dot", "txt")]
    assert f"after: -> {pictures / 'graph_000.site0.after.txt'}" in out
    assert "digraph" in (pictures / "graph_000.site0.before.dot").read_text()
    assert "fx_fusion.rope_kv_store" in (pictures / "graph_000.site0.after.dot").read_text()


def _site(fused: bool, **kw) -> dict:
    site = {"store": "index_put", "source": "/a/long/path/model.py, line 42, in forward: self.k_cache[loc] = k",
            "fused": fused, "reason": None if fused else "no matching v store (same slots, same cache shape)",
            "disabled": False, "layout": "token", "style": "neox", "rotary_dim": 64, "head_dim": 128,
            "num_tokens": "dynamic", "nodes": {}}
    site.update(kw)
    return site


def test_inspect_cli(tmp_path, capsys):
    """`python -m fx_fusion inspect DIR`: one row per site, totals; exit code 2 without reports."""
    from fx_fusion.__main__ import main

    reports = {"graph_000": [_site(True), _site(False, layout="paged", num_tokens="7")],
               "graph_001": [], "graph_002": [_site(True, style="gptj", rotary_dim=32)]}
    for graph, sites in reports.items():
        (tmp_path / f"{graph}.report.json").write_text(json.dumps({"graph": graph, "pid": 1, "sites": sites}))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("graph_")]
    assert [r[:6] for r in rows] == [["graph_000", "token", "neox", "64", "dynamic", "yes"],
                                     ["graph_000", "paged", "neox", "64", "7", "no"],
                                     ["graph_002", "token", "gptj", "32", "dynamic", "yes"]]
    assert "model.py:42 self.k_cache[loc] = k" in out and "/a/long/path" not in out
    assert "no matching v store (same slots, same cache shape)" in out
    assert "graphs without candidate sites: graph_001" in out
    assert "graphs: 3  sites: 3  fused: 2  not fused: 1" in out

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "fx_fusion", "inspect", str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no graph_*.report.json" in proc.stderr
