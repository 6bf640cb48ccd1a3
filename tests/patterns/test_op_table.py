"""The table of views and casts (``fx_utils.OP_ROLES``) and the sets each matcher derives from it.

A new view or cast is one line of the table; these tests pin what the matchers read from it, so an edit that
changes what one matcher follows shows up here, and check that the RoPE evaluator sees through what it should.
"""

from __future__ import annotations

import operator

import pytest
import torch

from fx_fusion.patterns import complex_rope, evaluator, find, kv_store, quant, scales
from fx_fusion.patterns.fx_utils import OP_ROLES, RESHAPES, SCATTER_OF, OpRole, ops_with

aten = torch.ops.aten
prims = torch.ops.prims

CASTS = {prims.convert_element_type.default, aten._to_copy.default}
WALKED = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.clone.default, aten.alias.default}


def test_every_op_has_a_role_and_every_role_an_op():
    assert all(roles and all(isinstance(r, OpRole) for r in roles) for roles in OP_ROLES.values())
    assert {r for roles in OP_ROLES.values() for r in roles} == set(OpRole)
    assert all(isinstance(op, torch._ops.OpOverload) or op is operator.getitem for op in OP_ROLES)


def test_ops_with_is_the_union_of_the_roles():
    assert ops_with(OpRole.RESHAPE) == RESHAPES == {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
    assert ops_with(OpRole.RESHAPE, OpRole.CAST) == RESHAPES | CASTS
    assert ops_with(OpRole.CAST, OpRole.CAST) == CASTS


@pytest.mark.parametrize("roles, error, message", [
    ((), ValueError, "at least one OpRole, got none"),
    (("cast",), TypeError, "OpRole members, got 'cast' \\(str\\)"),
    ((OpRole.CAST, aten.clone.default), TypeError, "got <OpOverload.*aten.clone.* \\(OpOverload\\)"),
])
def test_ops_with_refuses_anything_but_roles(roles, error, message):
    with pytest.raises(error, match=message):
        ops_with(*roles)


def test_each_selection_is_scattered_back_by_its_scatter():
    assert set(SCATTER_OF) == ops_with(OpRole.SELECTION)
    assert kv_store._VIEWS == {aten.select.int: aten.select_scatter.default,
                               aten.slice.Tensor: aten.slice_scatter.default}


def test_the_evaluator_sees_through_every_view_cast_and_rope_op_it_should():
    """Views of the features, selections, copies, casts and the RoPE arithmetic each have a handler; a permute
    (features never move between dims in a RoPE) and a split (evaluated through the item taken) have none."""
    seen_through = ops_with(OpRole.RESHAPE, OpRole.UNIT_DIM, OpRole.BROADCAST, OpRole.SELECTION, OpRole.ALIAS,
                            OpRole.CLONE, OpRole.CAST, OpRole.ARITHMETIC) | {operator.getitem}
    assert seen_through <= set(evaluator._HANDLERS)
    not_seen_through = ops_with(OpRole.PERMUTE, OpRole.DIVIDE, OpRole.CLAMP) | {aten.split.Tensor,
                                                                               aten.split_with_sizes.default}
    assert not not_seen_through & set(evaluator._HANDLERS)
    assert set(evaluator._HANDLERS) - set(OP_ROLES) == {aten.mul.Scalar}
    assert {op for op in RESHAPES if evaluator._HANDLERS[op] is not evaluator._reshape} == set()
    assert {op for op in CASTS if evaluator._HANDLERS[op] is not evaluator._cast} == set()


def test_what_each_matcher_follows():
    """Each matcher's set, as it was before the table (a change here changes what a matcher follows)."""
    views = WALKED | {aten.expand.default}
    assert scales._TABLE_VIEWS == views | CASTS | {aten.slice.Tensor, aten.select.int, operator.getitem,
                                                      aten.split.Tensor, aten.split_with_sizes.default}
    assert scales._COPIES_AND_CASTS == {aten.clone.default, aten.alias.default} | CASTS
    assert kv_store._WALKED == WALKED
    # a table's view key: no clone, no split, and squeeze.dims is not keyed (as before the table)
    assert complex_rope._VIEW_OPS == views - {aten.clone.default, aten.squeeze.dims} | {aten.slice.Tensor,
                                                                                         aten.select.int}
    assert quant._CONVERT == CASTS
    assert quant._CLAMPS == {aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default}
    arithmetic = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.neg.default, aten.cat.default} | CASTS
    assert find._ARITHMETIC == arithmetic
    assert find._QUANTISING == arithmetic | {aten.div.Tensor} | quant._CLAMPS
    assert find._VIEWS_AND_CASTS == views | CASTS
