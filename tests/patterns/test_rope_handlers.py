"""The RoPE evaluator's handlers, one aten op at a time.

Each test builds a one-op FX graph over fake tensors (placeholders are leaves), runs the op's
registered handler alone through a ``Step`` and checks the ``Value`` it returns: which leaf feature
each output feature is, with which coefficient, and how the prefix dims map. ``None`` means "not
evaluable here" (the node becomes a leaf). Symbolic sizes come from a ``ShapeEnv``: a handler given
one where it needs an int must return ``None`` or raise ``NotRope``, never anything else, and must not
install a guard.
"""

from __future__ import annotations

import operator

import pytest
import torch

from fx_fusion.patterns import evaluator, scales
from fx_fusion.patterns.evaluator import Evaluator, Step
from fx_fusion.patterns.polynomial import NotRope, Value
from tests.patterns.test_rope_soundness import Graph

aten, prims = torch.ops.aten, torch.ops.prims
F32, BF16 = torch.float32, torch.bfloat16


def run_handler(node: torch.fx.Node, r: int = 1, result: bool = False) -> tuple[Value | None, Evaluator]:
    """The node's registered handler alone; its inputs evaluate to leaves."""
    ev = Evaluator()
    return evaluator._HANDLERS[node.target](Step(ev, node, r, 0, result)), ev


def features(ev: Evaluator, v: Value) -> list[dict]:
    """Each output feature as {((leaf name, leaf feature), ...): coefficient}."""
    return [{tuple((ev.leaves[lid].node.name, f) for lid, f in m): c for m, c in p.items()} for p in v.feats]


def picks(name: str, index) -> list[dict]:
    return [{((name, i),): 1.0} for i in index]


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


def test_every_op_of_the_rope_spellings_has_a_handler():
    expected = {prims.convert_element_type.default, aten._to_copy.default, aten.clone.default, aten.alias.default,
                aten.neg.default, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.sub.Tensor,
                aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.select.int, aten.slice.Tensor,
                operator.getitem, aten.cat.default, aten.reshape.default, aten.view.default,
                aten._unsafe_view.default, aten.expand.default}
    assert set(evaluator._HANDLERS) == expected


def test_registering_an_op_twice_is_refused():
    with pytest.raises(RuntimeError, match="already has the evaluator _neg"):
        evaluator._evaluates(aten.neg.default)(lambda s: None)
    assert evaluator._HANDLERS[aten.neg.default] is evaluator._neg


def test_an_op_without_a_handler_is_a_leaf():
    g = Graph()
    x = g.input("x", 3, 8)
    n = g.op(aten.exp.default, x)
    ev = Evaluator()
    v = ev.evaluate(n, 1)
    assert features(ev, v) == picks(n.name, range(8))


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------


def test_neg_and_a_mul_by_one_scale_every_feature():
    g = Graph()
    x = g.input("x", 3, 4)
    v, ev = run_handler(g.op(aten.neg.default, x))
    assert features(ev, v) == [{(("x", i),): -1.0} for i in range(4)]
    v, ev = run_handler(g.op(aten.mul.Tensor, x, -1))
    assert features(ev, v) == [{(("x", i),): -1.0} for i in range(4)]
    v, ev = run_handler(g.op(aten.mul.Tensor, 1.0, x))
    assert features(ev, v) == picks("x", range(4))


def scalar(g: Graph) -> torch.fx.Node:
    """A 0-d fp32 tensor node."""
    return g.op(aten.select.int, g.input("s", 1), 0, 0)


def test_a_scaled_selection_is_a_leaf():
    """``cos * attention_scaling`` (a number, or a 0-d tensor: one scale for the whole tensor) of a tensor
    read as it is: a tensor of its own, which the op reads as the graph computes it."""
    g = Graph()
    x, s = g.input("x", 3, 4), scalar(g)
    half = g.op(aten.slice.Tensor, x, 1, 0, 2)
    for n in (g.op(aten.mul.Tensor, x, 0.5), g.op(aten.mul.Tensor, 2, half), g.op(aten.mul.Tensor, x, s),
              g.op(aten.mul.Tensor, s, half)):
        assert run_handler(n)[0] is None, n


def test_a_scale_of_products_is_a_coefficient():
    """``(x * c) * 0.5``: the scale stays in the polynomial (``match_rope`` refuses it with the reason)."""
    g = Graph()
    x, c, s = g.input("x", 3, 2), g.input("c", 3, 2), scalar(g)
    xc = g.op(aten.mul.Tensor, x, c)
    v, ev = run_handler(g.op(aten.mul.Tensor, xc, 0.5))
    assert features(ev, v) == [{(("x", i), ("c", i)): 0.5} for i in range(2)]
    assert run_handler(g.op(aten.mul.Tensor, xc, s))[0] is None  # a 0-d tensor scale: no coefficient


def test_table_scales_are_seen_through_views_and_casts():
    g = Graph()
    c, s = g.input("c", 3, 4), scalar(g)
    scaled = g.op(aten.mul.Tensor, g.op(aten.mul.Tensor, c, 2.0), 1.5)
    cast = g.op(prims.convert_element_type.default, g.op(aten.unsqueeze.default, scaled, 1), BF16)
    assert scales.table_scales(cast) == (1.5, 2.0)
    assert scales.table_scales(g.op(aten.mul.Tensor, c, 1.0)) == ()
    s1, s2 = (g.op(prims.convert_element_type.default, s, BF16) for _ in range(2))
    assert scales.table_scales(g.op(aten.mul.Tensor, c, s1)) == scales.table_scales(g.op(aten.mul.Tensor, s2, c))


def test_mul_of_two_tensors_broadcasts_features_and_prefix():
    """x [T, H, 2] * cos [T, 1, 1]: each feature is x[f] * cos[0]; the token dim is indexed by both."""
    g = Graph()
    x, c = g.input("x", 5, 4, 2), g.input("c", 5, 1, 1)
    v, ev = run_handler(g.op(aten.mul.Tensor, x, c))
    assert features(ev, v) == [{(("x", 0), ("c", 0)): 1.0}, {(("x", 1), ("c", 0)): 1.0}]
    assert v.prefix == (5, 4) and v.trail == (2,)
    xid, cid = ev._leaf_ids[evaluator.Leaf(x, 1)], ev._leaf_ids[evaluator.Leaf(c, 1)]
    assert v.embed == (frozenset({(xid, 0), (cid, 0)}), frozenset({(xid, 1)}))


def test_products_of_three_factors_are_refused():
    g = Graph()
    x, c = g.input("x", 3, 2), g.input("c", 3, 2)
    xc = g.op(aten.mul.Tensor, x, c)
    with pytest.raises(NotRope, match="more than two factors"):
        run_handler(g.op(aten.mul.Tensor, xc, c))  # the operand xc is evaluated, not a leaf


@pytest.mark.parametrize("target, sign", [(aten.add.Tensor, 1.0), (aten.sub.Tensor, -1.0)])
def test_add_and_sub(target, sign):
    g = Graph()
    x, y, c = g.input("x", 3, 2), g.input("y", 3, 2), g.input("c", 3, 2)
    v, ev = run_handler(g.op(target, g.op(aten.mul.Tensor, x, c), g.op(aten.mul.Tensor, y, c)))
    got = [{frozenset(m): c for m, c in p.items()} for p in features(ev, v)]
    assert got == [{frozenset({("c", i), ("x", i)}): 1.0, frozenset({("c", i), ("y", i)}): sign} for i in range(2)]


@pytest.mark.parametrize("target", [aten.add.Tensor, aten.sub.Tensor])
def test_a_sum_of_two_tensors_is_a_leaf(target):
    """No RoPE adds plain tensors (it adds products with cos and sin): the sum is the tensor rotated (a residual,
    a norm's bias), not two tensors rotated alike."""
    g = Graph()
    x, y = g.input("x", 3, 2), g.input("y", 3, 2)
    assert run_handler(g.op(target, x, y))[0] is None


def test_add_with_alpha_or_a_scalar_is_not_evaluated():
    g = Graph()
    x, y = g.input("x", 3, 2), g.input("y", 3, 2)
    assert run_handler(g.op(aten.add.Tensor, x, y, alpha=2))[0] is None
    assert run_handler(g.op(aten.add.Tensor, x, 1.0))[0] is None


# ------------------------------------------------------------------------------------------------
# Views and selections
# ------------------------------------------------------------------------------------------------


def test_slice_of_features_and_of_a_whole_prefix_dim():
    g = Graph()
    x = g.input("x", 3, 8)
    v, ev = run_handler(g.op(aten.slice.Tensor, x, -1, 1, 8, 3))
    assert features(ev, v) == picks("x", [1, 4, 7])
    v, ev = run_handler(g.op(aten.slice.Tensor, x, 0, 0, 2**63 - 1))
    assert features(ev, v) == picks("x", range(8)) and v.prefix == (3,)
    assert run_handler(g.op(aten.slice.Tensor, x, 0, 1, 3))[0] is None  # part of the token dim


def test_slice_of_one_head_of_a_wider_last_dim_is_a_leaf():
    """GPT-NeoX's per-head fused qkv: a head_dim-wide slice of [.., 3 * head_dim] is a tensor to rotate."""
    g = Graph()
    x = g.input("x", 3, 24)
    n = g.op(aten.slice.Tensor, x, -1, 0, 8)
    ev = Evaluator(head_dim=8)
    assert evaluator._slice(Step(ev, n, 1, 0, False)) is None


def test_select_of_a_feature_dim():
    """gpt-fast's pairs: x [T, 4, 2] select(-1, 1) is features 1, 3, 5, 7 of the pair-major x."""
    g = Graph()
    x = g.input("x", 3, 4, 2)
    v, ev = run_handler(g.op(aten.select.int, x, -1, 1))
    assert features(ev, v) == picks("x", [1, 3, 5, 7]) and v.trail == (4,)
    assert run_handler(g.op(aten.select.int, x, 0, 1))[0] is None  # a token


def test_split_parts():
    g = Graph()
    x = g.input("x", 3, 8)
    parts = g.op(aten.split.Tensor, x, 3, -1)
    v, ev = run_handler(g.op(operator.getitem, parts, 2))
    assert features(ev, v) == picks("x", [6, 7])
    parts = g.op(aten.split_with_sizes.default, x, [2, 6], -1)
    v, ev = run_handler(g.op(operator.getitem, parts, 1))
    assert features(ev, v) == picks("x", range(2, 8))


def test_cat_of_features():
    g = Graph()
    x, y = g.input("x", 3, 2), g.input("y", 3, 1)
    v, ev = run_handler(g.op(aten.cat.default, [y, x], -1))
    assert features(ev, v) == picks("y", [0]) + picks("x", [0, 1])


def test_unsqueeze_squeeze_expand():
    g = Graph()
    x = g.input("x", 3, 4)
    v, ev = run_handler(g.op(aten.unsqueeze.default, x, 1))
    assert v.prefix == (3, 1) and features(ev, v) == picks("x", range(4))
    v, ev = run_handler(g.op(aten.unsqueeze.default, x, -1), r=2)  # a new size-1 feature dim
    assert v.trail == (4, 1) and features(ev, v) == picks("x", range(4))
    u = g.op(aten.unsqueeze.default, x, 1)
    v, ev = run_handler(g.op(aten.squeeze.dim, u, 1))
    assert v.prefix == (3,)
    one = g.input("one", 3, 1)
    v, ev = run_handler(g.op(aten.expand.default, one, [2, 3, 4]))
    assert v.prefix == (2, 3) and features(ev, v) == picks("one", [0] * 4)


def test_reshape_regroups_features_and_keeps_the_prefix():
    g = Graph()
    x = g.input("x", 3, 4, 2)
    v, ev = run_handler(g.op(aten.reshape.default, x, [3, 8]))
    assert v.trail == (8,) and features(ev, v) == picks("x", range(8))
    assert run_handler(g.op(aten.reshape.default, x, [4, 3, 2]))[0] is None  # moves data between tokens/heads


def test_reshape_that_swaps_a_symbolic_and_a_static_dim_is_not_a_view():
    """[s0, 8, D] -> [8, s0, D] keeps neither leading dim: the sizes must be known equal, not merely maybe."""
    g = Graph()
    x = g.input("x", 5, 8, 4, dynamic=(0,))
    s0 = x.meta["val"].shape[0]
    n = g.op(aten.reshape.default, x, [8, s0, 4])
    guards = g.guards()
    assert run_handler(n)[0] is None
    kept = g.op(aten.reshape.default, x, [s0, 8, 2, 2])
    v, ev = run_handler(kept, r=2)
    assert v.prefix == (s0, 8) and v.trail == (2, 2)
    assert g.guards() == guards


# ------------------------------------------------------------------------------------------------
# Casts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src, dst", [(BF16, F32), (torch.float16, torch.float64), (F32, torch.float64), (F32, F32)])
def test_exact_casts_are_looked_through(src, dst):
    g = Graph()
    x = g.input("x", 3, 4, dtype=src)
    for n in (g.op(prims.convert_element_type.default, x, dst), g.op(aten._to_copy.default, x, dtype=dst)):
        for result in (False, True):
            v, ev = run_handler(n, result=result)
            assert features(ev, v) == picks("x", range(4)) and v.rounding == ()


@pytest.mark.parametrize("src, dst", [(F32, BF16), (F32, torch.int32), (torch.int32, F32), (F32, torch.float8_e4m3fn),
                                      (torch.float8_e4m3fn, F32), (torch.float16, BF16)])
def test_other_casts_start_a_leaf_or_round_the_result(src, dst):
    g = Graph()
    x = g.input("x", 3, 4, dtype=src)
    computed = g.op(aten.mul.Tensor, x, x)
    n = g.op(prims.convert_element_type.default, computed, dst)
    assert run_handler(n)[0] is None  # below arithmetic, rounding a computed tensor: the cast is a leaf
    v, ev = run_handler(n, result=True)  # the result itself: recorded for match_rope, evaluated through
    assert v.rounding == ((src, dst),)
    assert features(ev, v) == [{(("x", i), ("x", i)): 1.0} for i in range(4)]


@pytest.mark.parametrize("dst", [BF16, torch.float16], ids=str)
def test_a_stored_table_rounded_is_read_rounded(dst):
    """fp32 -> bf16/fp16 of an input (or rows gathered from one): the same features of that input, read
    rounded (a leaf with ``round_to``), so two casts of one table are one table."""
    g = Graph()
    x = g.input("x", 3, 4)
    casts = [g.op(prims.convert_element_type.default, x, dst) for _ in range(2)]
    leaves = set()
    for n in casts:
        v, ev = run_handler(n)
        assert features(ev, v) == picks("x", range(4)) and v.rounding == ()
        (leaf,) = {ev.leaves[lid] for p in v.feats for ((lid, _),) in p}
        assert leaf.node is x and leaf.round_to == dst
        leaves.add(leaf)
    assert len(leaves) == 1  # the two casts read one table


@pytest.mark.parametrize("src, dst", [(F32, torch.int32), (F32, torch.float8_e4m3fn), (torch.float16, BF16)])
def test_other_roundings_of_a_stored_table_are_leaves(src, dst):
    g = Graph()
    x = g.input("x", 3, 4, dtype=src)
    assert run_handler(g.op(prims.convert_element_type.default, x, dst))[0] is None


def test_to_copy_with_more_than_a_dtype_is_a_leaf():
    g = Graph()
    x = g.input("x", 3, 4)
    assert run_handler(g.op(aten._to_copy.default, x, dtype=F32, memory_format=torch.contiguous_format))[0] is None


# ------------------------------------------------------------------------------------------------
# Symbolic sizes: None or NotRope, never another exception, never a guard
# ------------------------------------------------------------------------------------------------


def _symbolic_cases():
    """(graph, node, r) for ops whose sizes, bounds or indices are symbolic."""
    g = Graph()
    d = g.input("d", 5, 16, dynamic=(0, 1))  # symbolic feature size
    n = g.input("n", 5, 3, dynamic=(0,))  # static features, symbolic token count
    s = n.meta["val"].shape[0]
    yield g, g.op(aten.slice.Tensor, d, -1, 0, 8), 1
    yield g, g.op(aten.neg.default, d), 1
    yield g, g.op(aten.mul.Tensor, d, d), 1
    yield g, g.op(aten.cat.default, [d, d], -1), 1
    yield g, g.op(operator.getitem, g.op(aten.split.Tensor, d, 8, -1), 0), 1
    yield g, g.op(aten.reshape.default, d, [d.meta["val"].shape[0], 2, -1]), 2
    yield g, g.op(aten.expand.default, g.op(aten.unsqueeze.default, d, 1), [-1, 4, -1]), 1
    yield g, g.op(prims.convert_element_type.default, d, BF16), 1
    w = g.input("w", 5, 8, 8, dynamic=(0,))
    yield g, g.op(aten.slice.Tensor, w, -1, 0, s), 1  # a symbolic bound on a static dim
    yield g, g.op(aten.slice.Tensor, w, 0, 0, s), 1  # a symbolic bound on the token dim
    yield g, g.op(aten.select.int, w, -1, s), 1  # a symbolic index
    yield g, g.op(operator.getitem, g.op(aten.split_with_sizes.default, w, [s, 8 - s], -1), 0), 1
    yield g, g.op(operator.getitem, g.op(aten.split.Tensor, w, s, -1), 0), 1
    yield g, g.op(aten.expand.default, g.op(aten.unsqueeze.default, n, -1), [-1, -1, s]), 1


@pytest.mark.parametrize("case", range(14))
def test_symbolic_sizes_give_a_leaf_or_not_rope(case):
    g, node, r = list(_symbolic_cases())[case]
    guards = g.guards()
    for result in (False, True):
        try:
            run_handler(node, r=r, result=result)
        except NotRope:
            pass
    ev = Evaluator()
    try:
        ev.evaluate(node, r)
    except NotRope:
        pass
    assert g.guards() == guards, f"{node.format_node()} installed a guard"
