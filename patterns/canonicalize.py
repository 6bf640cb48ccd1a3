"""Canonicalisation before matching: reduce spellings to the forms the matchers know, one rule per spelling.

``canonicalize(graph)`` runs ``RULES`` in order on the functional post-grad graph, before
``fuse_rope_kv_stores`` looks for sites. Each rule is a function ``rule(graph) -> int`` (how many nodes it
changed) that leaves the graph computing the same values; adding a spelling is one rule and one line in
``RULES``.

``merge_value_equal``: the same value computed twice becomes one node. Model code that calls one RoPE module
for q and again for k gathers its table twice, and torchtune's ``KVCache.update`` slices ``cache_pos[:seq_len]``
once for the k store and once for the v store; the matchers compare nodes by identity (the v store must use
the k store's slots, q's RoPE the k RoPE's cos/sin), so the two copies must be one node::

    i1 = aten.index.Tensor(table, [pos])    ... q's RoPE reads i1          i1 = aten.index.Tensor(table, [pos])
    i2 = aten.index.Tensor(table, [pos])    ... k's RoPE reads i2    ->    ... q's and k's RoPE read i1
    s1 = aten.slice.Tensor(cache_pos, 0, 0, S); s2 = (the same)            s1 = ...; both stores index with s1

Two nodes are merged when they are pure (an ``OpOverload`` whose schema writes nothing, not seeded-random,
not an uninitialised allocation, not impure for FX), have the same target, the same arguments after their
own inputs were merged, the same kwargs and the same value metadata (dtype, device, sizes, strides), and no
mutation of what they read lies between them. Value numbering goes once over the graph in topological order
(one hash per node); each in-place write in the graph (``index_put_``, ``copy_``, any op whose schema writes an
argument, or an op the rule does not know, such as a mutating higher-order op) starts a new epoch for the
storage it writes, found through the views (schema alias info) down to the tensor that owns it, and a read's
key holds the epochs of its inputs: a read after the write never equals one before it. A write into a graph
input (or by an op of unknown effect) starts a new epoch for every input, since inputs may alias each other.
Never merged either: a node whose own fresh storage is written in place anywhere (the two would share it),
is the destination of a functional write (``index_put(dest, ...)``, ``slice_scatter``, ``copy``, a
functionalized custom op's base: Inductor writes each destination in place, and two caches allocated alike must
stay two), or is returned by the graph, itself or through a view (two outputs would alias).

Only groups with a member the pass looks at are merged: nodes within ``SCOPE_DEPTH`` inputs of a store
(``index_put``, ``copy``, an engine's store op); the rest of the graph is left to Inductor.

The other rules reduce slice writes: ``merge_row_halves`` (``mla_halves.py``) makes a cache row written in two
feature halves one row store, and ``assemble_as_cat`` (``slice_writes.py``) makes a buffer of the graph's own,
written slice by slice over its whole last dim, the cat of what was written.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2
from torch.fx import Graph, Node

from fx_fusion.patterns.engine_store import engine_store_op
from fx_fusion.patterns.evaluator import Evaluator
from fx_fusion.patterns.fx_utils import within
from fx_fusion.patterns.mla_halves import merge_row_halves
from fx_fusion.patterns.slice_writes import assemble_as_cat

aten = torch.ops.aten

Rule = Callable[[Graph], int]

_STORES = (aten.index_put.default, aten.copy.default)
"""Where the pass starts looking (its candidate sites, with engines' store ops), and so where the merge scope
starts. Not the graph's epilogue ``copy_`` into its inputs, nor a fused op: in a fused graph nothing is merged
again, so the pass stays a no-op on its own output."""

SCOPE_DEPTH = Evaluator().max_depth + 16
"""How many inputs back from a store a node may lie and still be merged: the RoPE evaluator's depth below a
RoPE output, plus views between the RoPE and the store and the table's gather."""

_UNINITIALISED = frozenset({aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                            aten.new_empty.default, aten.new_empty_strided.default, aten.empty_permuted.default})
"""Pure by schema, but two of them are not one value (their contents are whatever memory held)."""

_FUNCTIONAL_WRITES = frozenset({
    aten.index_put, aten._unsafe_index_put, aten.index_copy, aten.index_add, aten.index_fill, aten.scatter,
    aten.scatter_add, aten.scatter_reduce, aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter,
    aten.as_strided_scatter, aten.masked_scatter, aten.copy})
"""Functional writes: ``op(dest, ...)`` is ``dest`` with some elements replaced. Two equal tensors that are each
such a destination (two caches allocated alike, ``zeros_like(k_cache)`` and ``zeros_like(v_cache)``) stay two:
Inductor writes each destination in place, and the pass takes one for the k cache and the other for v."""

_FUNCTIONAL_CALLS = frozenset({operator.getitem, auto_functionalized, auto_functionalized_v2})
"""Calls that are no ``OpOverload`` but write none of their inputs (functionalized custom ops, tuple items)."""


def _pure_op(t, n: Node) -> bool:
    """Whether calls of ``t`` (an ``OpOverload``, judged once per op) are pure: nothing written, not random, not
    an uninitialised allocation, no side effect FX knows of."""
    if not isinstance(t, torch._ops.OpOverload) or t in _UNINITIALISED:
        return False
    return not (t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags or n.is_impure())


def _arg_values(n: Node, schema_args) -> list:
    """The value bound to each schema argument of ``n`` (positional or keyword), in schema order."""
    out = []
    for i, a in enumerate(schema_args):
        if i < len(n.args) and not a.kwarg_only:
            out.append(n.args[i])
        else:
            out.append(n.kwargs.get(a.name, a.default_value if a.has_default_value() else None))
    return out


def _nodes_in(x) -> list[Node]:
    if isinstance(x, Node):
        return [x]
    if isinstance(x, (list, tuple)):
        return [n for item in x for n in _nodes_in(item)]
    return []


def _aliased_schema_arg(t) -> tuple[int, str] | None:
    """Position and name of the argument whose storage a call of ``t`` returns (a view, an in-place op's ``self``,
    an ``out=``), if any."""
    ret = t._schema.returns[0].alias_info if t._schema.returns else None
    if ret is None:
        return None
    sets = set(ret.before_set)
    for i, a in enumerate(t._schema.arguments):
        info = a.alias_info
        # a list of views (``split``: ``Tensor(a -> *) self -> Tensor(a)[]``) shows on the argument as ``-> *``
        if info is not None and (set(info.before_set) & sets or (not sets and "*" in info.after_set)):
            return (-1 if a.kwarg_only else i), a.name
    return None


def _aliased_input(n: Node, cache: dict) -> Node | None:
    """The input whose storage ``n``'s result shares (a view, an in-place op's ``self``, an ``out=``, an item of
    ``split``/``unbind``), if any. ``cache`` keeps ``_aliased_schema_arg`` per op."""
    t = n.target
    if n.op != "call_function":
        return None
    if t is operator.getitem and n.args and isinstance(n.args[0], Node):
        return n.args[0] if _aliased_input(n.args[0], cache) is not None else None
    if not isinstance(t, torch._ops.OpOverload):
        return None
    if t not in cache:
        cache[t] = _aliased_schema_arg(t)
    where = cache[t]
    if where is None:
        return None
    i, name = where
    value = n.args[i] if 0 <= i < len(n.args) else n.kwargs.get(name)
    return value if isinstance(value, Node) else None


def _writes(n: Node) -> list[Node] | None:
    """The inputs ``n`` writes in place: ``[]`` for none, ``None`` when unknown (treated as writing anything)."""
    if n.op in ("placeholder", "get_attr", "output"):
        return []
    if n.op != "call_function":  # a module or method call (not in post-grad graphs): anything
        return None
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        if not t._schema.is_mutable:
            return []
        return [m for a, v in zip(t._schema.arguments, _arg_values(n, t._schema.arguments))
                if a.alias_info is not None and a.alias_info.is_write for m in _nodes_in(v)]
    if t in _FUNCTIONAL_CALLS or t is torch.ops.higher_order.triton_kernel_wrapper_functional:
        return []
    return None


def _hashable(x):
    """A hashable key for an argument (nodes by their value number); ``KeyError`` if it has none."""
    if isinstance(x, Node):
        raise AssertionError("nodes are keyed by the caller")
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", type(x).__name__, x.node.expr)
    if isinstance(x, bool) or x is None or isinstance(x, (int, str, torch.dtype, torch.device, torch.layout,
                                                         torch.memory_format)):
        return (type(x).__name__, x)
    if isinstance(x, float):
        return ("float", x.hex())  # -0.0 and 0.0 are different arguments
    raise KeyError(type(x).__name__)


def _size_key(s):
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _meta_key(val: torch.Tensor) -> tuple:
    return (val.dtype, val.device, tuple(_size_key(s) for s in val.shape), tuple(_size_key(s) for s in val.stride()),
            _size_key(val.storage_offset()))


def _scope(graph: Graph, depth: int) -> set[Node]:
    """Nodes at most ``depth`` inputs back from a store (one breadth-first walk from all stores at once)."""
    frontier = [n for t in _STORES for n in graph.find_nodes(op="call_function", target=t)]
    frontier += [n for n in graph.find_nodes(op="call_function", target=auto_functionalized_v2)
                 if engine_store_op(n) is not None]
    return set(frontier) | set(within(frontier, depth, lambda n: n.all_input_nodes))


def _storage_owners(nodes: list[Node]) -> tuple[dict[Node, Node], set[Node], set[Node], dict]:
    """The tensor that owns each node's storage (through views and in-place results); the owners never merged
    (written in place, functionally written, or returned); the graph's outputs themselves; and each node that
    writes in place, with what it writes (``None``: unknown, anything)."""
    owner: dict[Node, Node] = {}
    written: set[Node] = set()  # owners written in place, functionally written, or returned: never merged
    returned: set[Node] = set()  # the graph's outputs themselves (views included): never merged
    writes: dict[Node, list[Node] | None] = {}
    aliases: dict = {}
    for n in nodes:
        src = _aliased_input(n, aliases)
        owner[n] = owner.get(src, src) if src is not None else n
        w = _writes(n)
        if w != []:
            writes[n] = w
            written.update(owner.get(m, m) for m in (w if w is not None else n.all_input_nodes))
        if n.op == "call_function" and (
                getattr(n.target, "overloadpacket", None) in _FUNCTIONAL_WRITES and n.args
                and isinstance(n.args[0], Node)):
            written.add(owner[n.args[0]])  # a destination (see _FUNCTIONAL_WRITES)
        elif n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload) and (
                n.target is not operator.getitem):
            written.update(owner.get(m, m) for m in n.all_input_nodes)  # a higher-order op may write what it gets
        if n.op == "output":  # two outputs sharing one storage would alias, which the caller does not expect
            returned = set(n.all_input_nodes)
            written.update(owner.get(m, m) for m in returned)
    return owner, written, returned, writes


def merge_value_equal(graph: Graph, depth: int = SCOPE_DEPTH) -> int:
    """Merge value-equal pure nodes within ``depth`` of a store (see the module docstring); how many were removed."""
    nodes = list(graph.nodes)
    owner, written, returned, writes = _storage_owners(nodes)
    inputs_epoch = 0  # bumped by every write into a graph input (inputs may alias each other) or of unknown effect
    epoch: dict[Node, int] = {}  # owner computed in the graph -> writes into it so far
    number: dict[Node, Node] = {}  # node -> the first node computing the same value
    # (target, args, kwargs, epochs) -> the nodes with that key, told apart by their value's metadata, which is
    # read only for keys seen twice (most nodes are unique)
    table: dict[tuple, list[Node]] = {}
    metas: dict[Node, tuple] = {}
    pure: dict = {}
    groups: dict[Node, list[Node]] = {}
    for n in nodes:
        first = n
        t = n.target
        if n.op == "call_function" and n not in returned and not (owner[n] is n and n in written) and isinstance(
                n.meta.get("val"), torch.Tensor):
            if t not in pure:
                pure[t] = _pure_op(t, n)
            if pure[t]:
                try:
                    key = (t, _key(n.args, number), _key(n.kwargs, number),
                           tuple((inputs_epoch, epoch.get(owner[a], 0)) if owner[a].op == "call_function"
                                 else inputs_epoch for a in n.all_input_nodes))
                except KeyError:
                    key = None
                if key is not None:
                    same = table.setdefault(key, [])
                    if same:
                        meta = _meta_key(n.meta["val"])
                        for m in same:
                            if m not in metas:
                                metas[m] = _meta_key(m.meta["val"])
                            if metas[m] == meta:
                                first = m
                                break
                        metas[n] = meta
                    if first is n:
                        same.append(n)
                    else:
                        groups.setdefault(first, [first]).append(n)
        number[n] = first
        if n in writes:
            w = writes[n]
            if w is None or any(owner.get(m, m).op != "call_function" for m in w):
                inputs_epoch += 1
            for m in (w if w is not None else n.all_input_nodes):
                o = owner.get(m, m)
                epoch[o] = epoch.get(o, 0) + 1
    if not groups:
        return 0
    scope = _scope(graph, depth)
    merged = []
    for first, members in groups.items():
        if any(m in scope for m in members):
            for dup in members[1:]:
                dup.replace_all_uses_with(first)
                merged.append(dup)
    for dup in reversed(merged):  # none is used any more: each one's users now read its group's first node
        graph.erase_node(dup)
    return len(merged)


def _key(x, number: dict[Node, Node]):
    """A hashable key for an argument: a node by its value number, a size by its expression, a constant typed."""
    tx = type(x)
    if tx is Node:
        val = x.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return _hashable(val)  # a size computed by a node: the same expression is the same value
        return number[x]
    if tx is int or tx is bool or tx is str or x is None:
        return (tx, x)
    if tx is list or tx is tuple:
        return (tx,) + tuple(_key(i, number) for i in x)
    if tx is dict or tx is torch.fx.immutable_collections.immutable_dict:
        return (dict,) + tuple((k, _key(v, number)) for k, v in sorted(x.items()))
    if tx is torch.fx.immutable_collections.immutable_list:
        return (list,) + tuple(_key(i, number) for i in x)
    return _hashable(x)


RULES: list[Rule] = [
    # a rule that spells a form out into nodes the matchers know belongs before the merge, so its nodes merge too
    merge_value_equal,
    merge_row_halves,  # after the merge: the two halves must index the same rows (one slot node)
    assemble_as_cat,  # buffers written slice by slice (SGLang's MLA q and latent row); never a cache's halves
]


def canonicalize(graph: Graph) -> dict[str, int]:
    """Run ``RULES`` in order; how many nodes each changed (by rule name, also counted in
    ``torch._dynamo.utils.counters["fx_fusion"]["canonicalize.<rule>"]``)."""
    from torch._dynamo.utils import counters

    changed = {}
    for rule in RULES:
        changed[rule.__name__] = rule(graph)
        counters["fx_fusion"][f"canonicalize.{rule.__name__}"] += changed[rule.__name__]
    return changed
