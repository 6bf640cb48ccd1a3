"""``write_dump`` numbers graphs after the ``graph_NNN.report.json`` files already there, whatever else the
directory holds."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch

from fx_fusion.dump import GraphSnapshot, write_dump


def snapshot() -> GraphSnapshot:
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("x"))
    return GraphSnapshot.of(graph)


@pytest.mark.parametrize("other", ["graph_latest.report.json", "graph_.report.json", "graph_1x.report.json",
                                   "graph_007.report.json.bak", "graph_-3.report.json", "graph_0a1.report.json"])
def test_other_files_named_like_reports_are_left_alone(tmp_path, other):
    (tmp_path / other).write_text("not ours")
    (tmp_path / "graph_004.report.json").write_text("{}")
    stem = write_dump(str(tmp_path), snapshot(), snapshot(), [])
    assert stem.name == "graph_005"
    assert json.loads((tmp_path / "graph_005.report.json").read_text())["graph"] == "graph_005"
    assert (tmp_path / other).read_text() == "not ours"
    assert isinstance(nx.read_graphml(tmp_path / "graph_005.before.graphml"), nx.DiGraph)


def test_an_empty_directory_starts_at_zero(tmp_path):
    assert write_dump(str(tmp_path / "new"), snapshot(), snapshot(), []).name == "graph_000"
