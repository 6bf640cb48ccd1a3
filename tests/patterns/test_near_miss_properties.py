"""Soundness of the pass on *near misses*: attention blocks whose RoPE -> KV-store chain is perturbed.

Each example takes a generated block (tests/attention_blocks.py, a store of q/k/v given as graph inputs, or
Meta's Llama reference spellings: a complex RoPE, caches written through slices with a Python start) and
perturbs its chain (``Perturbation``): a cast round trip through int32, float8_e4m3fn, float16, bfloat16 or
float32 at one point (q or k before the RoPE, cos or sin, the rotated q or k; for a complex RoPE cos and sin
are the table's real and imaginary parts, and the whole complex table is one more point), a scale on one
table or different scales on both (or one scale on both: fused), one table row for every token
(``csc[5:6]``, ``csc[pos[:1]]``, ``freqs_cis[start:start + 1]``), a RoPE computed in float64; with T in
{0, 1, 3} tokens (1 or 3 for the model forms), static or ``dynamic=True`` shapes, and for Meta's forms a
start position of 2 or 9 and a third mode, ``dynamic="tokens"``: dynamic=True with q/k/v's batch, head and
feature dims marked static, so that the token count and the start are symbolic, as in a decoder recompiled
for a new prompt length. Meta's forms (``MetaBlock``): "complex", ``view_as_real(view_as_complex(x) *
freqs_cis)`` stored through a slice, ``cache[:B, start:start + T] = k`` into ``[B + 1, S_max, Hkv, D]`` or
``[B + 1, Hkv, S_max, D]``, or through gpt-fast's ``cache[:, :, pos] = k``; "slice", a real RoPE stored
through a slice. For every example:

* ``torch.compile(block, backend="fx_fusion")`` compiles and runs (never raises);
* outputs and whole caches equal eager's. Elements eager leaves untouched stay bit-identical; the rest
  match within the dtype's tolerance. When the perturbation is large (int32, fp8, scales, table rows, an
  fp16/bf16 rounding of fp32 maths), the test first checks that the *unperturbed* block's eager result
  fails that same comparison: a fusion that dropped the perturbation would fail it too;
* every compiled graph with a cache store of a RoPE-like value has one report entry for it, fused or
  with a reason; a store of a rotated k whose values a cast changed is never fused (the fused op stores
  the exact rotation), nor is a RoPE computed in float64; different scales on cos and sin are never fused
  in a real RoPE (not a rotation times one factor). A complex RoPE multiplies by the table's real and
  imaginary parts whatever they are, as the op multiplies by cos and sin: differently scaled parts may be
  fused (they are, today), and only equality with eager and the report entry are required there.

fp8 stores (``test_fp8_store_in_any_operand_order_is_exact_or_reported``): each spelling of
``tests/fp8_blocks.py`` (the scale divided, multiplied as a reciprocal after or before k, clamped), each scale
form and dtype, scales that are not bf16 values: caches equal eager's byte for byte, one report entry per store.

A complex128 RoPE (Meta's spelling computed in float64) has a test of its own
(``test_complex128_rope_store_is_reported``): reported, as a float64 RoPE, and equal to eager.

Inductor drops fp32 -> fp16 -> fp32 round trips inside its kernels unless ``emulate_precision_casts`` is
on; these tests turn it on, so eager is the exact reference for compiled code with or without the pass.

CI runs the explicit examples (one per known bug) and a few derandomised ones; set
``FX_FUSION_HYPOTHESIS_PROFILE=large`` for a longer run. Run with ``-s`` to see the example counts.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fx_fusion
import fx_fusion.backend as fx_backend
from fx_fusion import RopeKVFusionPass
from tests.attention_blocks import (CAST_POINTS, COMPLEX_CAST_POINT, TABLE_ROWS, Perturbation, cos_sin_table,
                                    make_block, make_inputs, token_pool_apply_rotary, token_pool_rotary)
from tests.reference_blocks import precompute_freqs_cis

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("near-miss-ci", max_examples=3, derandomize=True, database=None, **_COMMON)
settings.register_profile("near-miss-large", max_examples=150, **_COMMON)
PROFILE = settings.get_profile(
    "near-miss-large" if os.environ.get("FX_FUSION_HYPOTHESIS_PROFILE") == "large" else "near-miss-ci")

F32, BF16, F16, I32, FP8 = torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.float8_e4m3fn
TOL = {F32: 1e-5, BF16: 3e-2}  # atol = rtol, as in test_pass_properties.py
PAST = 2  # cached tokens before the step: positions start at 2, where cos != 1 and sin != 0

POISONED = ("k_buffer", "v_buffer", "k_cache", "v_cache")  # the KV caches (cos_sin_cache is also a buffer)
PASSED: collections.Counter = collections.Counter()  # printed by the last test of this file


# ------------------------------------------------------------------------------------------------
# A store of q/k/v given as graph inputs (with dynamic=True every size of them is symbolic)
# ------------------------------------------------------------------------------------------------


class InputsBlock(nn.Module):
    """SGLang-style ``k_buffer[loc] = rope(k)`` where q, k, v are forward arguments, not a projection.

    flat=False: q, k, v are [T, H, D], rotated as they are (this also runs with T = 0); flat=True: they are
    [T, H*D], rotated by ``token_pool_rotary`` (which views them as [T, -1, D]: T > 0 only).
    """

    form = "inputs"

    def __init__(self, *, num_heads=4, num_kv_heads=2, head_dim=16, rot_dim=None, style="neox", dtype=F32,
                 upcast=False, num_slots=32, flat=False, perturb=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rot_dim, self.style, self.dtype, self.upcast = rot_dim or head_dim, style, dtype, upcast
        self.flat, self.perturb = flat, perturb or Perturbation()
        self.register_buffer("cos_sin_cache", cos_sin_table(64, self.rot_dim))
        shape = (num_slots, num_kv_heads, head_dim)
        self.register_buffer("k_buffer", torch.randn(shape, dtype=dtype))
        self.register_buffer("v_buffer", torch.randn(shape, dtype=dtype))

    def caches(self) -> dict[str, torch.Tensor]:
        return {"k_buffer": self.k_buffer, "v_buffer": self.v_buffer}

    def forward(self, positions, q, k, v, loc):
        if self.flat:
            q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.rot_dim, self.style,
                                     self.upcast, False, self.perturb)
            self.k_buffer[loc] = k.view(-1, self.num_kv_heads, self.head_dim)
            self.v_buffer[loc] = v.view(-1, self.num_kv_heads, self.head_dim)
            return q
        p, rot = self.perturb, self.rot_dim
        cos, sin = p.tables(*p.rows(self.cos_sin_cache, positions).chunk(2, dim=-1))
        out = []
        for name, x in (("q", q), ("k", k)):
            x = p.at(name, x)
            if p.compute is None:
                x_rot = token_pool_apply_rotary(x[..., :rot], cos, sin, self.style, self.upcast)
            else:  # e.g. an fp32 model computing its RoPE in float64 and rounding once
                x_rot = token_pool_apply_rotary(x[..., :rot].to(p.compute), cos.to(p.compute), sin.to(p.compute),
                                                self.style, False).to(x.dtype)
            out.append(p.at(f"{name}_rot", torch.cat((x_rot, x[..., rot:]), dim=-1)))
        self.k_buffer[loc] = out[1]
        self.v_buffer[loc] = v
        return out[0]


# ------------------------------------------------------------------------------------------------
# Meta's Llama reference: a complex RoPE, caches written through slices with a Python start
# ------------------------------------------------------------------------------------------------


class MetaBlock(nn.Module):
    """The RoPE and cache stores of Meta's Llama reference attention, q, k, v ``[B, T, H, D]`` forward arguments.

    form "complex": ``view_as_complex(x.float().reshape(..., -1, 2)) * freqs_cis`` -> ``view_as_real`` ->
    ``flatten(3)`` -> ``type_as(x)`` with ``freqs_cis = polar(ones, freqs)`` a complex64 buffer (GPT-J pairs, the
    whole head). form "slice": the real rotation of SGLang's ``cos_sin_cache`` rows (any style, partial rotary).
    store="slice": ``cache[:B, start:start + T] = k`` into ``[B + 1, S_max, Hkv, D]`` (cache_layout "bshd") or
    ``cache[:B, :, start:start + T] = k.transpose(1, 2)`` into ``[B + 1, Hkv, S_max, D]`` ("bhsd"), ``start`` a
    Python int and the table rows ``table[start:start + T]``; store="index" (form "complex" only): gpt-fast's
    ``cache[:, :, pos] = k.transpose(1, 2)`` into ``[B, Hkv, S_max, D]``, the rows ``table[pos]``.
    forward(xq, xk, xv, at) with ``at`` the start (an int) or the positions (a tensor); returns the rotated q.

    The perturbation's table points, for the complex table: equal scales multiply it (``freqs_cis * s``); unequal
    ones, and casts at "cos" / "sin", change its real / imaginary part (``view_as_real``, ``stack``,
    ``view_as_complex``); a cast at "table" rounds both parts; compute=float64 is a complex128 product.
    """

    def __init__(self, *, form="complex", num_heads=4, num_kv_heads=2, head_dim=16, rot_dim=None, style="gptj",
                 dtype=F32, upcast=False, store="slice", cache_layout="bshd", batch=2, max_seq=16, perturb=None):
        super().__init__()
        if form not in META_FORMS:
            raise ValueError(f"form must be one of {META_FORMS}, got {form!r}")
        if store not in ("slice", "index") or (store == "index" and (form, cache_layout) != ("complex", "bhsd")):
            raise ValueError(f"store must be 'slice', or 'index' in a complex block's 'bhsd' cache, got {store!r} "
                             f"in a {form!r} block's {cache_layout!r} cache")
        self.form, self.store, self.cache_layout = form, store, cache_layout
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rot_dim, self.style, self.dtype, self.upcast = rot_dim or head_dim, style, dtype, upcast
        self.batch, self.perturb = batch, perturb or Perturbation()
        if form == "complex":
            if (self.style, self.rot_dim) != ("gptj", head_dim):
                raise ValueError(f"a complex RoPE rotates the whole head in GPT-J pairs, got style {style!r}, "
                                 f"rot_dim {self.rot_dim} of {head_dim}")
            self.register_buffer("freqs_cis", precompute_freqs_cis(head_dim, 64))
        else:
            self.register_buffer("cos_sin_cache", cos_sin_table(64, self.rot_dim))
        rows = batch if store == "index" else batch + 1  # a slice store leaves the last batch row alone
        shape = (rows, max_seq, num_kv_heads, head_dim) if cache_layout == "bshd" else (
            rows, num_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.randn(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.randn(shape, dtype=dtype))

    def caches(self) -> dict[str, torch.Tensor]:
        return {"k_cache": self.k_cache, "v_cache": self.v_cache}

    def _rows(self, table, at, seqlen):
        p = self.perturb
        if p.table_row == "slice" or self.store == "index":
            return p.rows(table, at)
        return table[at:at + 1] if p.table_row == "index" else table[at:at + seqlen]

    def _complex_rope(self, xq, xk, rows):
        p = self.perturb
        if p.cos_scale != p.sin_scale or (p.cast is not None and p.cast_at in ("cos", "sin")):
            parts = torch.view_as_real(rows)
            rows = torch.view_as_complex(torch.stack(p.tables(parts[..., 0], parts[..., 1]), dim=-1))
        elif p.cos_scale != 1.0:  # one factor on the table (YaRN's attention scaling)
            rows = rows * p.cos_scale
        if p.cast is not None and p.cast_at == COMPLEX_CAST_POINT:
            rows = torch.view_as_complex(torch.view_as_real(rows).to(p.cast).to(F32))
        real = p.compute or F32
        if p.compute is not None:
            rows = rows.to(torch.complex128)
        rows = rows.view(1, rows.shape[0], 1, -1)  # reshape_for_broadcast; one row broadcasts over the tokens
        out = []
        for x in (xq, xk):
            x_ = torch.view_as_complex(x.to(real).reshape(*x.shape[:-1], -1, 2))
            out.append(torch.view_as_real(x_ * rows).flatten(3).type_as(x))
        return out

    def _real_rope(self, xq, xk, rows):
        p, rot = self.perturb, self.rot_dim
        cos, sin = p.tables(*rows.chunk(2, dim=-1))
        out = []
        for x in (xq, xk):
            if p.compute is None:
                x_rot = token_pool_apply_rotary(x[..., :rot], cos, sin, self.style, self.upcast)
            else:
                x_rot = token_pool_apply_rotary(x[..., :rot].to(p.compute), cos.to(p.compute), sin.to(p.compute),
                                                self.style, False).to(x.dtype)
            out.append(torch.cat((x_rot, x[..., rot:]), dim=-1))
        return out

    def forward(self, xq, xk, xv, at):
        bsz, seqlen = xq.shape[:2]
        p = self.perturb
        xq, xk = p.at("q", xq), p.at("k", xk)
        if self.form == "complex":
            xq, xk = self._complex_rope(xq, xk, self._rows(self.freqs_cis, at, seqlen))
        else:
            xq, xk = self._real_rope(xq, xk, self._rows(self.cos_sin_cache, at, seqlen))
        xq, xk = p.at("q_rot", xq), p.at("k_rot", xk)
        if self.store == "index":
            self.k_cache[:, :, at] = xk.transpose(1, 2)
            self.v_cache[:, :, at] = xv.transpose(1, 2)
        elif self.cache_layout == "bshd":
            self.k_cache[:bsz, at:at + seqlen] = xk
            self.v_cache[:bsz, at:at + seqlen] = xv
        else:
            self.k_cache[:bsz, :, at:at + seqlen] = xk.transpose(1, 2)
            self.v_cache[:bsz, :, at:at + seqlen] = xv.transpose(1, 2)
        return xq


META_FORMS = ("complex", "slice")


def build(form: str, kw: dict, perturb: Perturbation | None) -> nn.Module:
    if form in ("inputs", *META_FORMS):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            if form == "inputs":
                return InputsBlock(perturb=perturb, **kw)
            return MetaBlock(form=form, perturb=perturb, **kw)
    return make_block(form, perturb=perturb, **kw)


def step_inputs(block: nn.Module, tokens: int, start: int = PAST) -> tuple:
    if block.form in META_FORMS:
        g = torch.Generator().manual_seed(tokens)
        xq = torch.randn(block.batch, tokens, block.num_heads, block.head_dim, generator=g).to(block.dtype)
        xk, xv = (torch.randn(block.batch, tokens, block.num_kv_heads, block.head_dim, generator=g).to(block.dtype)
                  for _ in "kv")
        return xq, xk, xv, (start if block.store == "slice" else torch.arange(start, start + tokens))
    if block.form != "inputs":
        return make_inputs(block, tokens, past=PAST)
    g = torch.Generator().manual_seed(tokens)
    positions = torch.arange(PAST, PAST + tokens)
    q = torch.randn(tokens, block.num_heads, block.head_dim, generator=g).to(block.dtype)
    k, v = (torch.randn(tokens, block.num_kv_heads, block.head_dim, generator=g).to(block.dtype) for _ in "kv")
    if block.flat:
        q, k, v = (x.flatten(1) for x in (q, k, v))
    return positions, q, k, v, (block.k_buffer.shape[0] - 1 - 2 * positions) % block.k_buffer.shape[0]


# ------------------------------------------------------------------------------------------------
# Examples
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    form: str
    kw: dict
    perturb: Perturbation
    tokens: int = 3
    dynamic: bool | str = False  # "tokens" (MetaBlock): dynamic=True, q/k/v's batch, head and feature dims static
    start: int = PAST  # the first position (MetaBlock; the other blocks' steps start at PAST)

    @property
    def dtype(self) -> torch.dtype:
        return self.kw.get("dtype", F32)

    def lossy_cast(self) -> bool:
        """The cast round trip changes some value (it is not the identity on the tensor's dtype)."""
        cast = self.perturb.cast
        if cast is None:
            return False
        at = self.dtype if self.perturb.cast_at in ("q", "k", "q_rot", "k_rot") else self.table_dtype
        return cast != at and not (cast == F32 and at in (F16, BF16))

    @property
    def table_dtype(self) -> torch.dtype:
        """dtype of cos/sin where the cast applies: fp32 tables, gpt-fast's in the model dtype, HF's cast to it."""
        return self.dtype if self.form in ("gptfast", "hf") else F32

    def large(self) -> bool:
        """The perturbation changes the result by more than the tolerance (checked in the test)."""
        p = self.perturb
        if self.tokens == 0 or (p.table_row == "index" and self.tokens == 1):
            return False  # nothing computed, or the first position is the only position
        if p.table_row is not None or p.cos_scale != 1.0 or p.sin_scale != 1.0 or p.cast in (I32,):
            return True
        if p.compute is not None:
            return False  # one rounding of fp64 maths is within any tolerance of fp32 maths
        if p.cast == FP8:
            return self.dtype == F32
        return self.lossy_cast() and self.dtype == F32


@st.composite
def cases(draw) -> Case:
    form = draw(st.sampled_from(["sglang", "vllm", "hf", "gptfast", "inputs", *META_FORMS]))
    heads = draw(st.sampled_from([(4, 2), (4, 1), (2, 2)]))
    whole_head = form in ("gptfast", "complex")  # interleaved pairs over the whole head
    kw = dict(num_heads=heads[0], num_kv_heads=heads[1], head_dim=16,
              style="gptj" if whole_head else draw(st.sampled_from(["neox", "gptj"])),
              rot_dim=16 if whole_head else draw(st.sampled_from([16, 8])))
    if draw(st.booleans()):
        kw.update(dtype=BF16)
        if form != "complex":  # Meta's complex RoPE always computes in fp32
            kw.update(upcast=draw(st.booleans()))
    if form in META_FORMS:
        store = draw(st.sampled_from(["slice", "index"])) if form == "complex" else "slice"
        kw.update(store=store, cache_layout="bhsd" if store == "index" else draw(st.sampled_from(["bshd", "bhsd"])))
    # a complex128 RoPE is not generated: its store gets no report entry (test_complex128_rope_is_reported below)
    kind = draw(st.sampled_from(["cast", "cast", "cast", "scale", "scales", "same-scale", "row"]
                                + (["fp64"] if form in ("inputs", "slice") else [])))
    if kind == "cast":
        points = (*CAST_POINTS, COMPLEX_CAST_POINT) if form == "complex" else CAST_POINTS
        perturb = Perturbation(cast=draw(st.sampled_from([I32, FP8, F16, BF16, F32])),
                               cast_at=draw(st.sampled_from(points)))
    elif kind == "scale":
        perturb = Perturbation(**{draw(st.sampled_from(["cos_scale", "sin_scale"])): 2.0})
    elif kind == "scales":
        perturb = Perturbation(cos_scale=draw(st.sampled_from([2.0, 0.5])), sin_scale=draw(st.sampled_from([3.0, -1.0])))
    elif kind == "same-scale":  # YaRN-like: one factor on both tables (a RoPE; fused, exactly)
        scale = draw(st.sampled_from([1.1386, 0.5, 3.0]))
        perturb = Perturbation(cos_scale=scale, sin_scale=scale)
    elif kind == "fp64":  # computed in float64, rounded once: not the op's fp32 maths (reported)
        perturb = Perturbation(compute=torch.float64)
    else:
        perturb = Perturbation(table_row=draw(st.sampled_from(TABLE_ROWS)))
    # the model forms view [.., H*D] as [.., -1, D] (or D as [-1, 2]), which eager cannot do for T = 0
    tokens = draw(st.sampled_from([0, 1, 3] if form == "inputs" else [1, 3]))
    if form == "inputs":
        kw["flat"] = tokens > 0 and draw(st.booleans())
    if form in META_FORMS:
        return Case(form, kw, perturb, tokens, draw(st.sampled_from([False, True, "tokens"])),
                    draw(st.sampled_from([PAST, 9])))
    return Case(form, kw, perturb, tokens, draw(st.booleans()))


# the known bugs, always run
BUG_DYNAMIC_INPUTS = Case("inputs", dict(flat=True), Perturbation(), tokens=3, dynamic=True)  # 1. (no perturbation)
BUG_CASTS = [
    Case("sglang", {}, Perturbation(cast=I32, cast_at="k_rot")),  # 2. stored k truncated
    Case("sglang", {}, Perturbation(cast=FP8, cast_at="k_rot")),
    Case("hf", {}, Perturbation(cast=F16, cast_at="k_rot")),
    Case("hf", {}, Perturbation(cast=I32, cast_at="q_rot")),  # 2. same for q
    Case("vllm", {}, Perturbation(cast=FP8, cast_at="cos")),  # 2. fp8-rounded cos / sin
    Case("gptfast", {}, Perturbation(cast=FP8, cast_at="sin")),
    Case("hf", {}, Perturbation(cast=I32, cast_at="k")),  # 2. truncation of k before the RoPE
]
BUG_ROWS = [Case("sglang", {}, Perturbation(table_row="slice")),  # 3. csc[5:6] with T = 3
            Case("sglang", {}, Perturbation(table_row="index"))]  # 3. csc[pos[:1]]
# a scale on one table only, or different scales on cos and sin: not a RoPE (reported, never fused);
# one scale on both (YaRN): fused, exactly
UNEQUAL_SCALES = [Case("sglang", {}, Perturbation(cos_scale=2.0)),
                  Case("hf", {}, Perturbation(cos_scale=2.0, sin_scale=3.0)),
                  Case("inputs", {}, Perturbation(sin_scale=2.0), dynamic=True),
                  Case("vllm", dict(dtype=BF16), Perturbation(cos_scale=1.1386, sin_scale=1.1386)),
                  Case("hf", {}, Perturbation(cos_scale=1.1386, sin_scale=1.1386), dynamic=True)]
# found by the large profile: with dynamic=True the head count of flat graph inputs is symbolic, the
# evaluator cannot follow the reshape back to [T, H*D], and the rounded k store still needs its report entry
FOUND = [Case("inputs", dict(num_heads=4, num_kv_heads=2, head_dim=16, style="neox", rot_dim=16, dtype=BF16,
                             upcast=False, flat=True), Perturbation(cast=F16, cast_at="k_rot"), tokens=3,
              dynamic=True),
         Case("inputs", dict(num_heads=4, num_kv_heads=2, head_dim=16, style="gptj", rot_dim=16, flat=True),
              Perturbation(table_row="slice"), tokens=3, dynamic=True)]  # was reported twice


# an fp32 (or bf16) model computing its RoPE in float64: fused, 305 of 1024 cache elements were 1 ulp off eager
FP64 = [Case("inputs", {}, Perturbation(compute=torch.float64)),
        Case("inputs", dict(dtype=BF16), Perturbation(compute=torch.float64)),
        Case("inputs", dict(dtype=BF16, flat=True), Perturbation(compute=torch.float64), dynamic=True)]


# Meta's spellings, one example per kind of perturbation. A complex RoPE (here into slice stores, but one): a lossy
# cast of the stored k is reported; a rounded table, a table scaled (equally or not: the complex product multiplies
# by its real and imaginary parts, as the op multiplies by cos and sin) and one row for every token are fused, equal
# to eager; with "tokens" the start is symbolic (fused).
COMPLEX = [Case("complex", {}, Perturbation(cast=BF16, cast_at="k_rot"), tokens=3, start=9),
           Case("complex", dict(store="index", cache_layout="bhsd"), Perturbation(cast=FP8, cast_at="table"),
                tokens=1, start=9),
           Case("complex", dict(cache_layout="bhsd", dtype=BF16), Perturbation(cos_scale=2.0, sin_scale=3.0),
                tokens=3, dynamic="tokens"),
           Case("complex", {}, Perturbation(cos_scale=1.1386, sin_scale=1.1386), tokens=1, start=9),
           Case("complex", {}, Perturbation(table_row="index"), tokens=3, start=9)]
# a real RoPE into slice stores: as into the other stores (a scale on one table and float64 maths reported)
SLICE_STORES = [Case("slice", dict(style="neox", rot_dim=8), Perturbation(cast=I32, cast_at="k_rot"), tokens=1,
                     start=9),
                Case("slice", dict(cache_layout="bhsd"), Perturbation(cos_scale=2.0), tokens=3),
                Case("slice", dict(dtype=BF16, upcast=True), Perturbation(cos_scale=1.1386, sin_scale=1.1386),
                     tokens=3, start=9, dynamic="tokens"),
                Case("slice", dict(style="neox", cache_layout="bhsd"), Perturbation(table_row="slice"), tokens=3),
                Case("slice", {}, Perturbation(compute=torch.float64), tokens=1, start=9, dynamic=True)]


def _with_examples(test):
    for case in reversed([BUG_DYNAMIC_INPUTS, *BUG_CASTS, *BUG_ROWS, *UNEQUAL_SCALES, *FOUND, *FP64, *COMPLEX,
                          *SLICE_STORES]):
        test = example(case=case)(test)
    return test


# ------------------------------------------------------------------------------------------------
# The property
# ------------------------------------------------------------------------------------------------


class _RecordingPass(RopeKVFusionPass):
    """The backend's pass, recording per graph: index_put nodes before the pass, and the sites reported."""

    graphs: list = []

    def __call__(self, graph):
        stores = sum(len(graph.find_nodes(op="call_function", target=t))
                     for t in (torch.ops.aten.index_put.default, torch.ops.aten.copy.default))  # copy: slice stores
        super().__call__(graph)
        _RecordingPass.graphs.append((stores, list(self.last_sites)))


def _run(block: nn.Module, inputs: tuple, compiled=None):
    out = (block if compiled is None else compiled)(*inputs)
    return out, {name: c.clone() for name, c in block.caches().items()}


def _differs(a: dict, b: dict, tol: float) -> list[str]:
    """Names of the tensors of ``a`` that are not close to ``b``'s at ``tol``."""
    return [n for n in a if not torch.allclose(a[n].float(), b[n].float(), atol=tol, rtol=tol, equal_nan=True)]


@settings(PROFILE)
@given(case=cases())
@_with_examples
def test_near_miss_is_fused_exactly_or_reported(case: Case):
    check(case)


def check(case: Case):
    what = repr(case)
    torch._dynamo.reset()
    _RecordingPass.graphs = []
    tol = TOL[case.dtype]
    block = build(case.form, case.kw, case.perturb)
    eager, plain, poisoned = (build(case.form, case.kw, p) for p in (case.perturb, None, case.perturb))
    for m in (eager, plain, poisoned):
        m.load_state_dict(block.state_dict())
    initial = {n: c.clone() for n, c in block.caches().items()}
    for name, c in poisoned.caches().items():
        if name in POISONED:
            c.fill_(float("nan"))  # after eager, NaN marks what the step does not write
    inputs = step_inputs(block, case.tokens, case.start)

    with (mock.patch.object(fx_backend, "RopeKVFusionPass", _RecordingPass), torch.no_grad(),
          torch._inductor.config.patch(fx_graph_cache=False, emulate_precision_casts=True)):
        if case.dynamic == "tokens":  # a decoder recompiled for a new prompt length and start: T and start symbolic
            for x in inputs[:3]:
                for dim in (0, 2, 3):
                    torch._dynamo.mark_static(x, dim)
        compiled = torch.compile(block, backend="fx_fusion", dynamic=bool(case.dynamic) or None)
        got_out, got = _run(block, inputs, compiled)  # compiling never raises
        want_out, want = _run(eager, inputs)
        plain_out, plain_caches = _run(plain, inputs)
        _, poisoned_caches = _run(poisoned, inputs)

    got["output"], want["output"], plain_caches["output"] = got_out, want_out, plain_out
    if case.large():
        # the perturbation is visible at this tolerance: dropping it (a wrong fusion) fails the check below
        assert _differs(plain_caches, want, tol), f"{what}: the perturbation does not change eager's result"
    for name, c in initial.items():
        untouched = poisoned_caches[name].isnan() if name in POISONED else torch.ones_like(c, dtype=torch.bool)
        assert torch.equal(got[name][untouched], c[untouched]), f"{what}: {name} changed where eager writes nothing"
    bad = _differs(got, want, tol)
    sites = [s for _, graph_sites in _RecordingPass.graphs for s in graph_sites]
    assert not bad, f"{what}: {bad} differ from eager; sites: {[(s.fused, s.reason) for s in sites]}"

    assert _RecordingPass.graphs, f"{what}: the fusion pass never ran"
    for stores, graph_sites in _RecordingPass.graphs:
        # each block stores one rotated k and one v per graph: one report entry per k store
        assert len(graph_sites) == stores // 2, f"{what}: {stores} stores, report {graph_sites}"
        for s in graph_sites:
            assert s.fused or s.reason, f"{what}: site {s.store} neither fused nor given a reason"
            if case.perturb.cast_at == "k_rot" and case.lossy_cast():
                assert not s.fused, f"{what}: a store of a rotated k changed by a cast was fused"
            if case.perturb.compute is torch.float64:
                assert not s.fused, f"{what}: a float64 RoPE was fused"
            if case.perturb.cos_scale != case.perturb.sin_scale and case.form != "complex":
                # not a rotation times one factor: never fused, whether the scale is a constant or (with
                # dynamic=True) a graph input, and reported with the reason (a complex table's parts scaled
                # differently are still a table the complex product multiplies by, as the op does: either way)
                assert not s.fused, f"{what}: cos and sin scaled differently, yet fused"
    torch._dynamo.reset()
    PASSED["examples"] += 1
    PASSED["with a fused site"] += any(s.fused for s in sites)
    PASSED["with an unfused, reported site"] += any(not s.fused for s in sites)
    PASSED["with a perturbation checked visible"] += case.large()


# found by the property: a complex RoPE computed in complex128 (the model's q/k and the table cast up, the product
# rounded once back) got no report entry: the canonicalisation took complex64 products only, and the RoPE evaluator
# reads no complex op, so the store was neither a site nor a near miss. Now rewritten to its float64 form, reported
# as the real float64 spelling is ("computed in float64"); results equal eager's
COMPLEX128 = Case("complex", {}, Perturbation(compute=torch.float64), tokens=3, start=9)


def test_complex128_rope_store_is_reported():
    check(COMPLEX128)


# fp8 stores in each operand order and scale form (``tests/fp8_blocks.py``: the scale divided, multiplied as a
# reciprocal after or *before* k, clamped; a Python number, a 0-d or [1] buffer in fp32/bf16/fp16, one per head), with
# scales that are not bf16 values: the caches are eager's byte for byte (fused or not), and every store has one entry
FP8_SCALE_VALUES = (0.37, 0.0234, 0.3, 1.7)


@st.composite
def fp8_cases(draw) -> dict:
    from tests.fp8_blocks import SCALES, SPELLINGS

    kw = dict(spelling=draw(st.sampled_from(SPELLINGS)), scale=draw(st.sampled_from(SCALES)),
              dtype=draw(st.sampled_from([BF16, F16, F32])),
              fp8=draw(st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2])),
              k_scale=draw(st.sampled_from(FP8_SCALE_VALUES)), v_scale=draw(st.sampled_from(FP8_SCALE_VALUES)))
    if kw["scale"] != "float":
        kw["scale_dtype"] = draw(st.sampled_from([F32, BF16, F16]))
    return kw


@settings(PROFILE)
@example(kw=dict(spelling="scale_first", scale="0d", dtype=BF16, fp8=torch.float8_e4m3fn, k_scale=0.0234,
                 v_scale=0.3, scale_dtype=F32))  # row 1 of the soundness issue: the scale written first
@example(kw=dict(spelling="scale_first", scale="1el", dtype=F16, fp8=torch.float8_e5m2, k_scale=0.37, v_scale=1.7,
                 scale_dtype=BF16))
@example(kw=dict(spelling="reciprocal", scale="per_head", dtype=BF16, fp8=torch.float8_e4m3fn, k_scale=0.3,
                 v_scale=0.37, scale_dtype=F32))  # one scale per head: reported
@given(kw=fp8_cases())
def test_fp8_store_in_any_operand_order_is_exact_or_reported(kw):
    from tests.fp8_blocks import Fp8Model
    from tests.patterns.test_fp8_store import run

    torch._dynamo.reset()
    _RecordingPass.graphs = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Fp8Model(layers=1, **kw)
    with (mock.patch.object(fx_backend, "RopeKVFusionPass", _RecordingPass), torch.no_grad(),
          torch._inductor.config.patch(fx_graph_cache=False, emulate_precision_casts=True)):
        run(model, config=fx_fusion.FusionConfig(), steps=((5, 0), (1, 1)))  # whole caches as bytes, each step
    sites = [s for _, graph_sites in _RecordingPass.graphs for s in graph_sites]
    assert sites and all(s.fused or s.reason for s in sites), f"{kw}: {[(s.fused, s.reason) for s in sites]}"
    if kw["scale"] == "per_head":
        assert not any(s.fused for s in sites), f"{kw}: one scale per head, yet fused"
    torch._dynamo.reset()
    PASSED["fp8 examples"] += 1
    PASSED["fp8 examples fused"] += any(s.fused for s in sites)


@pytest.fixture(scope="module", autouse=True)
def _print_example_counts():
    """After this file's tests: how many examples passed (run pytest with -s to see it)."""
    yield
    print(f"\nnear-miss properties: {PASSED['examples']} examples passed ({dict(PASSED)})")
