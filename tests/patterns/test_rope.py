"""``fx_fusion.patterns.rope.match_rope`` on post-grad-like aten graphs.

Each case is a small function written the way model code spells RoPE. It is traced to aten with
Inductor's decompositions (``make_fx``, fake tensors: the graph the post-grad pass sees, minus
Inductor's own rewrites), and ``match_rope`` runs on the node returned. A positive case must match
with the expected style, rotary and head dims, rotated tensor and tables, and the match must *describe
the computation*: rebuilding the RoPE from the match (x, the table values it names, the pairing of the
style) must reproduce the traced function's output on real inputs. A negative case must raise
``NotRope``.

The last test runs the recogniser on the real post-grad graphs of the attention blocks.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from fx_fusion.patterns.kv_store import match_store, walk_views
from fx_fusion.patterns.polynomial import NotRope
from fx_fusion.patterns.rope import RopeMatch, RopeStyle, TableRef, match_rope
from tests.attention_blocks import (gptfast_apply_rotary_emb, make_block, prefill_inputs, rotate_every_two,
                                    rotate_half, token_pool_apply_rotary)

T, H, D = 5, 4, 16

# ------------------------------------------------------------------------------------------------
# Tracing and checking
# ------------------------------------------------------------------------------------------------


def trace(fn, *args, mode: str = "fake") -> torch.fx.GraphModule:
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode=mode)(*args)


def output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    (out,) = gm.graph.find_nodes(op="output")
    return out.args[0]


def node_values(gm: torch.fx.GraphModule, *args) -> dict[torch.fx.Node, torch.Tensor]:
    """Run the graph on real inputs and keep every node's value."""
    values = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Keep(gm).run(*args)
    return values


def table_values(ref: TableRef, values, x_prefix: int, count: int) -> torch.Tensor:
    """The ``count`` table values ``ref`` names, laid out to broadcast against x: [*x_prefix dims, count]."""
    leaf = values[ref.leaf.node]
    n_prefix = leaf.dim() - ref.leaf.rank
    picked = leaf.reshape(*leaf.shape[:n_prefix], -1)[..., ref.offset + ref.stride * torch.arange(count)]
    kept = [j for j in range(n_prefix) if ref.dims[j] is not None]  # the others have size 1
    picked = picked.reshape([leaf.shape[j] for j in kept] + [count])
    order = sorted(range(len(kept)), key=lambda i: ref.dims[kept[i]])
    picked = picked.permute(*order, len(kept))
    shape = [1] * x_prefix + [count]
    for j in kept:
        shape[ref.dims[j]] = leaf.shape[j]
    return picked.reshape(shape)


def rebuild(m: RopeMatch, values) -> torch.Tensor:
    """RoPE from the match's description alone, in float64."""
    x = values[m.x].double()
    half, prefix = m.rotary_dim // 2, x.dim() - 1
    per = m.rotary_dim if m.cos.per_element else half
    cos = table_values(m.cos, values, prefix, per).double()
    sin = table_values(m.sin, values, prefix, per).double() * (-1.0 if m.sin.negated else 1.0)
    if m.style is RopeStyle.NEOX:
        e1, e2 = torch.arange(half), torch.arange(half) + half
    else:
        e1, e2 = 2 * torch.arange(half), 2 * torch.arange(half) + 1
    c1, c2 = (cos[..., e1], cos[..., e2]) if m.cos.per_element else (cos, cos)
    s1, s2 = (sin[..., e1], sin[..., e2]) if m.sin.per_element else (sin, sin)
    out = x.clone()
    out[..., e1] = x[..., e1] * c1 - x[..., e2] * s1
    out[..., e2] = x[..., e2] * c2 + x[..., e1] * s2
    return out


def check_match(fn, args, *, style, rotary_dim=D, head_dim=D, x_arg=0, per_element=None, same_leaf=False):
    gm = trace(fn, *args)
    m = match_rope(output_node(gm))
    assert (m.style, m.rotary_dim, m.head_dim) == (RopeStyle(style), rotary_dim, head_dim)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert m.x is placeholders[x_arg], f"rotated {m.x}, expected {placeholders[x_arg]}"
    if per_element is not None:
        assert m.cos.per_element == m.sin.per_element == per_element
    if same_leaf:  # cos and sin are two slices of one table
        assert m.cos.leaf == m.sin.leaf and m.cos.offset != m.sin.offset
    values = node_values(gm, *args)
    expected = values[output_node(gm)]
    torch.testing.assert_close(rebuild(m, values).to(expected.dtype), expected, atol=1e-2 if expected.dtype
                               == torch.bfloat16 else 1e-5, rtol=1.6e-2 if expected.dtype == torch.bfloat16 else 1e-5)
    return m


def tables(rows=T, n=D, lead=(), dtype=torch.float32):
    """Random cos/sin of shape [*lead, rows, 1, n] (broadcast over heads)."""
    return torch.randn(*lead, rows, 1, n, dtype=dtype), torch.randn(*lead, rows, 1, n, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# NeoX spellings
# ------------------------------------------------------------------------------------------------


def neox_chunk(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def neox_split(x, cos, sin):
    x1, x2 = torch.split(x, x.shape[-1] // 2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def neox_slices(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - sin * x2, cos * x2 + x1 * sin), dim=-1)


def neox_rotate_half(x, cos, sin):
    return x * cos + rotate_half(x) * sin


@pytest.mark.parametrize("fn", [neox_chunk, neox_split, neox_slices], ids=lambda f: f.__name__)
def test_neox_halves(fn):
    cos, sin = tables(n=D // 2)
    check_match(fn, (torch.randn(T, H, D), cos, sin), style="neox", per_element=False)


def test_neox_rotate_half_neg_cat():
    cos, sin = tables()
    check_match(neox_rotate_half, (torch.randn(T, H, D), cos, sin), style="neox", per_element=True)


def test_neox_hf_layout_heads_before_tokens():
    """HF: x [B, H, S, D], cos/sin [B, S, D] unsqueezed at dim 1; the tables follow x's dims 0 and 2."""

    def fn(x, cos, sin):
        return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)

    cos, sin = torch.randn(2, T, D), torch.randn(2, T, D)
    m = check_match(fn, (torch.randn(2, H, T, D), cos, sin), style="neox", per_element=True)
    assert m.cos.dims == m.sin.dims == (0, 2)


def test_neox_token_pool_cos_sin_cache():
    """SGLang/vLLM: one gathered [T, R] table, cos in its first half, sin in its second."""

    def fn(x, cache, positions):
        cos, sin = cache[positions].chunk(2, dim=-1)
        return token_pool_apply_rotary(x, cos, sin, "neox", upcast=False)

    args = (torch.randn(T, H, D), torch.randn(64, D), torch.randint(0, 64, (T,)))
    m = check_match(fn, args, style="neox", per_element=False, same_leaf=True)
    assert (m.cos.offset, m.sin.offset, m.cos.stride) == (0, D // 2, 1)
    assert m.cos.leaf.node.target is torch.ops.aten.index.Tensor  # the gather by positions


# ------------------------------------------------------------------------------------------------
# GPT-J and gpt-fast spellings
# ------------------------------------------------------------------------------------------------


def test_gptj_strided_slices_stack_flatten():
    cos, sin = tables(n=D // 2)
    check_match(lambda x, c, s: token_pool_apply_rotary(x, c.squeeze(1), s.squeeze(1), "gptj", upcast=False),
                (torch.randn(T, H, D), cos, sin), style="gptj", per_element=False)


def test_gptj_rotate_every_two():
    """HF GPT-J: cos/sin duplicated per pair (repeat_interleave) and rotate_every_two."""

    def fn(x, freqs):
        cos, sin = freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)
        return x * cos[:, None] + rotate_every_two(x) * sin[:, None]

    m = check_match(fn, (torch.randn(T, H, D), torch.randn(T, D // 2)), style="gptj")
    assert m.cos.leaf.node is not m.sin.leaf.node


def test_gptj_rotate_every_two_given_tables():
    cos, sin = tables()
    check_match(lambda x, c, s: x * c + rotate_every_two(x) * s, (torch.randn(T, H, D), cos, sin),
                style="gptj", per_element=True)


def test_gptfast_reshape_pairs_select():
    """gpt-fast: x [B, S, H, D] upcast, viewed [..., D/2, 2], freqs_cis [S, D/2, 2] (cos, sin) by select."""
    x, freqs = torch.randn(1, T, H, D, dtype=torch.bfloat16), torch.randn(T, D // 2, 2, dtype=torch.bfloat16)
    m = check_match(gptfast_apply_rotary_emb, (x, freqs), style="gptj", per_element=False, same_leaf=True)
    assert (m.cos.offset, m.cos.stride, m.sin.offset, m.sin.stride) == (0, 2, 1, 2)


# ------------------------------------------------------------------------------------------------
# Partial rotary, upcasts, dynamic token counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_partial_rotary_passes_the_tail_through(style):
    rot = 8

    def fn(x, cos, sin):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat((token_pool_apply_rotary(x_rot, cos, sin, style, upcast=False), x_pass), dim=-1)

    cos, sin = torch.randn(T, rot // 2), torch.randn(T, rot // 2)
    check_match(fn, (torch.randn(T, H, D), cos, sin), style=style, rotary_dim=rot, head_dim=D)


def test_partial_rotary_hf_gpt_neox():
    rot = 8

    def fn(x, cos, sin):
        x_embed = x[..., :rot] * cos + rotate_half(x[..., :rot]) * sin
        return torch.cat([x_embed, x[..., rot:]], dim=-1)

    cos, sin = tables(n=rot)
    check_match(fn, (torch.randn(T, H, D), cos, sin), style="neox", rotary_dim=rot, per_element=True)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_fp32_upcast_and_cast_back(style):
    """``x.float()`` ... ``.to(bf16)``: the rotated tensor is the bf16 input, the root the cast back."""
    cos, sin = torch.randn(T, D // 2), torch.randn(T, D // 2)
    gm_args = (torch.randn(T, H, D, dtype=torch.bfloat16), cos, sin)
    m = check_match(lambda x, c, s: token_pool_apply_rotary(x, c, s, style, upcast=True), gm_args, style=style)
    assert m.x.meta["val"].dtype == torch.bfloat16 and m.root.meta["val"].dtype == torch.bfloat16


def test_cos_and_sin_swapped_consistently_is_still_an_exact_rotation():
    """``x * sin + rotate_half(x) * cos`` rotates by other angles, but it is a rotation: the match names the
    ``sin`` argument as its cos table, so the fused op would compute exactly what the graph computes."""
    cos, sin = tables()
    fn = lambda x, c, s: x * s + rotate_half(x) * c  # noqa: E731
    m = check_match(fn, (torch.randn(T, H, D), cos, sin), style="neox")
    _, c, s = trace(fn, torch.randn(T, H, D), cos, sin).graph.find_nodes(op="placeholder")
    assert (m.cos.leaf.node.name, m.sin.leaf.node.name) == (s.name, c.name)


def mirrored(x, cos, sin):
    """nanochat: the rotation by -theta."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


@pytest.mark.parametrize("fn, n", [
    (mirrored, D // 2), (lambda x, c, s: x * c + torch.cat((x[..., D // 2:], -x[..., :D // 2]), -1) * s, D)],
    ids=["nanochat", "hf-nanochat-rotate-half"])
def test_the_mirrored_rotation_is_the_rope_with_sin_negated(fn, n):
    """Both signs flipped (every pair): a rotation by -theta, matched as the RoPE with sin read negated (``rebuild``
    applies it: the match reproduces the graph's values)."""
    cos, sin = tables(n=n)
    m = check_match(fn, (torch.randn(T, H, D), cos, sin), style="neox")
    assert m.sin.negated and not m.cos.negated


# ------------------------------------------------------------------------------------------------
# Not RoPE
# ------------------------------------------------------------------------------------------------


def wrong_sign_one_half(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos - x1 * sin), dim=-1)


def swapped_in_one_half(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * sin + x1 * cos), dim=-1)


def x_times_x(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * x1 - x2 * sin, x2 * x2 + x1 * sin), dim=-1)


def x_squared_only(x, cos, sin):
    return x * x


def missing_term(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos), dim=-1)


def missing_rotation(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos, x2 * cos), dim=-1)


def other_tensor_in_one_term(x, cos, sin, y):
    x1, x2 = x.chunk(2, dim=-1)
    y1, _ = y.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + y1 * sin), dim=-1)


def other_table_in_one_term(x, cos, sin, cos2):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos2 + x1 * sin), dim=-1)


def mismatched_pairs(x, cos, sin):
    x1, x2, x3, x4 = x.chunk(4, dim=-1)  # pairs (i, i + D/4): neither NeoX nor GPT-J
    a, b = torch.cat((x1, x3), -1), torch.cat((x2, x4), -1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def scaled_rotation(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, (x2 * cos + x1 * sin) * 2), dim=-1)


def table_per_head(x, cos, sin, y):
    """cos varies per head ([T, H, D/2], like x): which of x and y is rotated is ambiguous."""
    x1, x2 = x.chunk(2, dim=-1)
    c = y[..., : x.shape[-1] // 2]
    return torch.cat((x1 * c - x2 * sin, x2 * c + x1 * sin), dim=-1)


@pytest.mark.parametrize("fn, reason", [
    (wrong_sign_one_half, "wrong signs"),
    (swapped_in_one_half, "cos values come from several tensors"),
    (x_times_x, "not x times a table"),
    (x_squared_only, "not paired like NeoX or GPT-J"),
    (missing_term, "not a two-term rotation"),
    (missing_rotation, "not paired like NeoX or GPT-J"),
    (other_tensor_in_one_term, "not x times a table"),  # x, read at two features, is the rotated tensor
    (other_table_in_one_term, "cos values come from several tensors"),
    (mismatched_pairs, "not paired like NeoX or GPT-J"),
    (scaled_rotation, "scaled by 2 after the multiply"),
], ids=lambda v: v.__name__ if callable(v) else "")
def test_not_rope(fn, reason):
    cos, sin = tables(n=D // 2)
    extra = {"y": torch.randn(T, H, D), "cos2": torch.randn(T, 1, D // 2)}
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    args = (torch.randn(T, H, D), cos, sin, *(extra[n] for n in names[3:]))
    with pytest.raises(NotRope, match=reason):
        match_rope(output_node(trace(fn, *args)))


def test_a_table_varying_per_head_is_read_as_the_table():
    """cos a slice of another ``[T, H, D]`` tensor: x and it index the same dims, but only x is read at two features
    of one output feature (x and its partner), so x is the rotated tensor and y the cos table (``plan.can_fuse``
    then refuses a table that varies per head: ``tests/patterns/test_pass_soundness.py``)."""
    cos, sin = tables(n=D // 2)
    x, y = torch.randn(T, H, D), torch.randn(T, H, D)
    gm = trace(table_per_head, x, cos, sin, y)
    m = match_rope(output_node(gm))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert m.x is placeholders[0] and m.cos.leaf.node is not placeholders[0]


# ------------------------------------------------------------------------------------------------
# Real post-grad graphs of the attention blocks
# ------------------------------------------------------------------------------------------------


class CaptureGraph(torch._inductor.custom_graph_pass.CustomGraphPass):
    """A post-grad pass that only looks: it runs the recogniser on every stored value."""

    def __init__(self):
        self.matches = []

    def __call__(self, graph):
        for n in graph.find_nodes(op="call_function", target=torch.ops.aten.index_put.default):
            st = match_store(n)
            root, _, _ = walk_views(st.value, st.value_roles)
            try:
                self.matches.append(match_rope(root))
            except NotRope:
                self.matches.append(None)

    def uuid(self):
        return "test_rope.CaptureGraph"


@pytest.mark.parametrize("form, kw, dynamic", [
    ("sglang", dict(style="gptj", upcast=True, dtype=torch.bfloat16), False),
    ("vllm", dict(rot_dim=8), False),
    ("hf", dict(qk_norm=True), False),
    ("hf", dict(style="gptj"), True),
    ("gptfast", {}, False),
], ids=["sglang-gptj-bf16", "vllm-partial", "hf-qk_norm", "hf-gptj-dynamic", "gptfast"])
def test_post_grad_graphs_of_the_blocks(form, kw, dynamic):
    """Of the two stores in each block's post-grad graph, the k store is a RoPE and the v store is not.

    ``dynamic=True`` makes the token dims symbolic (head and feature dims of module buffers stay static).
    """
    block = make_block(form, **kw)
    capture = CaptureGraph()
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, post_grad_custom_post_pass=capture):
        torch.compile(block, dynamic=dynamic)(*prefill_inputs(block))
    torch._dynamo.reset()
    assert len(capture.matches) == 2 and capture.matches[1] is None
    k = capture.matches[0]
    assert k is not None
    assert (k.style.value, k.rotary_dim, k.head_dim) == (block.style, block.rot_dim, block.head_dim)
    assert k.x.meta["val"].dtype == block.dtype
    assert any(not isinstance(size, int) for size in k.root.meta["val"].shape) == dynamic


# ------------------------------------------------------------------------------------------------
# Static shapes: the token count is never taken for a feature dim
# ------------------------------------------------------------------------------------------------


def test_static_token_counts_do_not_become_features(monkeypatch):
    """A static-shape prefill: x comes from a ``[tokens, heads * head_dim]`` matmul. Evaluated with
    ``r = 2`` (heads x head_dim as features, as ``rope_like`` tries), the matmul's output would have
    tokens x width features, one polynomial each (a 2048-token prefill of gpt-oss: 8 M, minutes per
    compile). The evaluator refuses such a node at once; the RoPE above it is still found."""
    from math import prod

    from fx_fusion.patterns.evaluator import Evaluator
    from fx_fusion.patterns.rope import rope_like

    tokens, heads = 600, 16

    def prefill(h, w, cos, sin):
        return neox_chunk((h @ w).view(tokens, heads, D), cos, sin)

    sizes = []
    leaf = Evaluator.leaf

    def recording_leaf(self, node, r):
        shape = node.meta["val"].shape
        sizes.append(prod(shape[len(shape) - r:]))
        return leaf(self, node, r)

    monkeypatch.setattr(Evaluator, "leaf", recording_leaf)
    cos, sin = tables(rows=tokens, n=D // 2)
    gm = trace(prefill, torch.randn(tokens, 64), torch.randn(64, heads * D), cos, sin)
    m = match_rope(output_node(gm))
    assert (m.style, m.rotary_dim) == (RopeStyle.NEOX, D)
    assert rope_like(output_node(gm)) == 1
    (mm,) = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.mm.default)
    ev = Evaluator()
    with pytest.raises(NotRope, match="features"):
        ev.evaluate(mm, 2)  # [tokens, heads * D] with both dims as features
    assert tokens * heads * D > ev.max_features and max(sizes) <= ev.max_features, sizes
