"""``inspect --draw`` does work linear in the graph's size: one topological order per graph, then per site
work of the size of its picture, however deep the model.

Counted, not timed: every walk up a graph goes through ``predecessors`` (networkx's own ``ancestors`` does
too), so the calls per site must not grow with the layers. Drawing by ranking every matmul above a site by
its own ancestors (what this replaced) walked the whole graph once per matmul above each site: cubic overall.
"""

from __future__ import annotations

import json

import networkx as nx
import pytest

from fx_fusion import draw


class CountingDiGraph(nx.DiGraph):
    calls = 0

    def predecessors(self, n):
        CountingDiGraph.calls += 1
        return super().predecessors(n)


def layered_graph(layers: int) -> tuple[nx.DiGraph, list[dict]]:
    """A decoder as the dump's graphml holds it: per layer a qkv matmul, RoPE, k/v stores into the layer's
    caches, attention reading the stored cache, the output projection feeding the next layer."""
    g = CountingDiGraph()

    def node(name, target, op="call_function", *inputs):
        g.add_node(name, op=op, target=target, shape="", dtype="", fused_op=False, site="")
        g.add_edges_from((i, name) for i in inputs)

    node("hidden_0", "hidden", "placeholder")
    node("positions", "positions", "placeholder")
    node("slots", "slots", "placeholder")
    node("table", "cos_sin_cache", "placeholder")
    node("cos_sin", "index_select.default", "call_function", "table", "positions")
    sites = []
    for i in range(layers):
        h = f"hidden_{i}"
        node(f"w_{i}", "w", "placeholder")
        node(f"k_cache_{i}", "k_cache", "placeholder")
        node(f"v_cache_{i}", "v_cache", "placeholder")
        node(f"mm_{i}", "mm.default", "call_function", h, f"w_{i}")
        node(f"split_{i}", "split_with_sizes.default", "call_function", f"mm_{i}")
        for x in ("q", "k", "v"):
            node(f"{x}_{i}", "getitem", "call_function", f"split_{i}")
        for x in ("q", "k"):
            node(f"{x}_mul_{i}", "mul.Tensor", "call_function", f"{x}_{i}", "cos_sin")
            node(f"{x}_rope_{i}", "add.Tensor", "call_function", f"{x}_mul_{i}", f"{x}_{i}")
        node(f"k_store_{i}", "index_put.default", "call_function", f"k_cache_{i}", "slots", f"k_rope_{i}")
        node(f"v_store_{i}", "index_put.default", "call_function", f"v_cache_{i}", "slots", f"v_{i}")
        node(f"attn_{i}", "sdpa", "call_function", f"q_rope_{i}", f"k_store_{i}", f"v_store_{i}")
        node(f"o_proj_{i}", "mm.default", "call_function", f"attn_{i}", f"w_{i}")
        node(f"hidden_{i + 1}", "add.Tensor", "call_function", h, f"o_proj_{i}")
        sites.append({"fused": False, "store": f"k_store_{i}", "reason": f"no v store for k_store_{i}",
                      "nodes": {"q_rope": f"q_rope_{i}", "k_rope": f"k_rope_{i}", "k_store": f"k_store_{i}",
                                "v_store": f"v_store_{i}"}})
    node("output", "output", "output", f"hidden_{layers}")
    return g, sites


def region_calls(layers: int) -> tuple[list[int], list[nx.DiGraph]]:
    """``predecessors`` calls of each site's region (the graph ordered once beforehand), and the regions."""
    g, sites = layered_graph(layers)
    order = draw.positions(g)
    calls, regions = [], []
    for site in sites:
        CountingDiGraph.calls = 0
        regions.append(draw.region_before(g, site, order))
        calls.append(CountingDiGraph.calls)
    return calls, regions


def test_region_work_per_site_does_not_depend_on_depth():
    shallow, _ = region_calls(4)
    deep, regions = region_calls(48)
    # every layer's picture costs the same, in a 4- or a 48-layer model: the work is the picture's size
    assert set(shallow) == set(deep) and len(set(deep)) == 1
    assert deep[0] <= 4 * len(regions[-1])
    last = regions[-1]
    assert "mm_47" in last and "mm_46" not in last and "hidden_47" not in last and last.in_degree("mm_47") == 0
    assert {"k_cache_47", "k_mul_47", "v_47", "slots", "cos_sin"} <= set(last)  # the inputs of the site
    assert len(last) == len(regions[0])


@pytest.mark.parametrize("layers", [4, 16, 48])
def test_regions_hold_one_layer(layers):
    _, regions = region_calls(layers)
    assert all(f"k_store_{i}" in r and f"mm_{i}" in r and len(r) == len(regions[0]) for i, r in enumerate(regions))


def test_draw_reports_reads_and_orders_each_graph_once(tmp_path, monkeypatch):
    g, sites = layered_graph(24)
    read, ordered = [], []
    monkeypatch.setattr(draw, "read_graph", lambda directory, graph, tag: read.append((graph, tag)) or g)
    real_positions = draw.positions
    monkeypatch.setattr(draw, "positions", lambda graph: ordered.append(graph) or real_positions(graph))
    CountingDiGraph.calls = 0
    pictures = draw.draw_reports(tmp_path, [{"graph": "graph_000", "sites": sites}], "text")
    assert len(pictures) == len(sites) and read == [("graph_000", "before")] and len(ordered) == 1
    assert CountingDiGraph.calls <= 100 * len(sites)  # a layer's worth per site, not the graph's
    text = pictures[-1].read_text()
    assert "k_store_23" in text and "mm_22" not in text
    json.dumps([str(p) for p in pictures])
