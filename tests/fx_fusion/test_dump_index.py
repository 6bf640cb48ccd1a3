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


def test_an_unfused_site_marks_its_store_and_the_node_its_reason_names():
    from fx_fusion.dump import FILL_COLOURS, _mark_sites, fill_colour, reason_nodes
    from fx_fusion.patterns import Site

    g = nx.DiGraph()
    g.add_nodes_from(["index_put", "index_put_1", "mul_3", "mul", "arg3_1", "view_2"])
    reason = "stores a RoPE-like value that is not a RoPE: mul_3 is scaled (aten.index_put.default, mul) of arg3_1."
    assert reason_nodes(reason, g) == ["mul_3", "arg3_1"]  # not the op's name, not a bare word
    _mark_sites(g, [Site(store="index_put_1", source="m.py", reason=reason),
                    Site(store="index_put", source="m.py", fused=True, nodes={"k_store": "index_put", "v_store": "view_2"})])
    assert {n: fill_colour(a) for n, a in g.nodes(data=True)} == {
        "index_put": FILL_COLOURS["fused"], "view_2": FILL_COLOURS["fused"], "index_put_1": FILL_COLOURS["unfused"],
        "mul_3": FILL_COLOURS["unfused_reason"], "arg3_1": FILL_COLOURS["unfused_reason"], "mul": None}
    assert len(set(FILL_COLOURS.values())) == len(FILL_COLOURS)
