"""Attention blocks whose KV cache is not a plain graph input: test fixtures for the fusion pass.

    block                    cache                                         store, as the source writes it
    StackedBlock             one buffer for all layers, ``[2, L, ...]``    ``kv[0, i][slot // bs, slot % bs] = k`` (nano-vllm)
                             or one per k / v, ``[L, slots, Hkv, D]``      ``k_cache[i][slot] = k``
    EngineStoreBlock         ``[slots, Hkv, D]`` pools                     ``torch.ops.sglang.store_cache(k rows, ...)``
    WindowBlock              allocated inside the first compiled call      ``index_copy_`` until the window is full, then
                             (HF ``StaticSlidingWindowLayer``)             ``roll(-1)``, ``new[:, :, [-1]] = k``, ``copy_``

Buffers that exist before the call start random (a store to a wrong row shows); a cache allocated inside the
graph is zeros, as the source allocates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.attention_blocks import (HFRotaryEmbedding, cos_sin_table, hf_apply_rotary_pos_emb, repeat_kv,
                                    token_pool_rotary)

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64


def _store_cache_impl(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      indices: torch.Tensor, *, row_bytes: int = 0, v_row_bytes: int = 0, num_split: int = 0,
                      size_limit: int = 0, reserved_skip_index: int = 0) -> None:
    """SGLang's ``store_cache`` (sglang 0.5.23, ``sglang/kernels/ops/kvcache/kvcache.py`` and its kernel
    ``elementwise/kvcache.cuh``) on CPU: row ``indices[t]`` of ``k_cache``/``v_cache`` (``[rows, Hkv*D]``) gets row t
    of k/v, but for an index equal to ``reserved_skip_index`` (< 0: none), which is not written; every index must
    lie in ``[0, size_limit)`` (<= 0: k_cache's rows), where the kernel's device-side assert fails (here a
    ``RuntimeError``); a ``row_bytes``/``v_row_bytes`` other than the rows' width (0: inferred) and a ``num_split``
    other than 1, or 2/4 on rows of a multiple of 256/512 bytes (<= 0: chosen), are rejected."""
    widths = (k.shape[-1] * k.element_size(), v.shape[-1] * v.element_size())
    for name, value, width in (("row_bytes", row_bytes, widths[0]), ("v_row_bytes", v_row_bytes, widths[1])):
        if value > 0 and value != width:
            raise RuntimeError(f"store_cache: {name}={value}, but the rows are {width} bytes")
    if num_split > 0 and not (num_split == 1 or (num_split in (2, 4) and all(w % (128 * num_split) == 0
                                                                               for w in widths))):
        raise RuntimeError(f"store_cache: unsupported num_split {num_split} for rows of {widths} bytes")
    limit = size_limit if size_limit > 0 else k_cache.shape[0]
    outside = (indices < 0) | (indices >= limit)
    if bool(outside.any()):
        raise RuntimeError(f"store_cache: index {int(indices[outside][0])} is outside [0, {limit})")
    written = indices != reserved_skip_index if reserved_skip_index >= 0 else torch.ones_like(indices, dtype=bool)
    k_cache[indices[written]] = k[written]
    v_cache[indices[written]] = v[written]


STORE_CACHE_V0 = "store_cache.v0(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor indices, " \
                 "SymInt row_bytes=0) -> ()"
"""The schema before the keywords (sgl-kernel's ``store_cache`` with the CUDA build's ``row_bytes``): every index
written, none checked. Registered as the overload ``torch.ops.sglang.store_cache.v0``."""


def store_cache_op(schema: str = "current"):
    """SGLang's ``torch.ops.sglang.store_cache`` if it is loaded, else a plain-torch one of its schema,
    ``sglang::store_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor indices, *,
    SymInt row_bytes=0, SymInt v_row_bytes=0, SymInt num_split=0, SymInt size_limit=0, SymInt reserved_skip_index=0)
    -> ()`` (k, v, caches as ``[rows, Hkv*D]``; ``_store_cache_impl``). ``schema="v0"``: the overload of the older
    schema (``STORE_CACHE_V0``)."""
    if not hasattr(torch.ops.sglang, "store_cache"):
        torch.library.custom_op("sglang::store_cache", _store_cache_impl, mutates_args=("k_cache", "v_cache"))
    if schema == "current":
        return torch.ops.sglang.store_cache
    if schema != "v0":
        raise ValueError(f"schema must be 'current' or 'v0', got {schema!r}")
    if "v0" not in torch.ops.sglang.store_cache.overloads():
        lib = torch.library.Library("sglang", "FRAGMENT")
        lib.define(STORE_CACHE_V0)

        def v0(k, v, k_cache, v_cache, indices, row_bytes=0):
            k_cache[indices] = k
            v_cache[indices] = v

        lib.impl("store_cache.v0", v0, "CompositeExplicitAutograd")
        torch.library.register_fake("sglang::store_cache.v0", lambda *args, **kwargs: None, lib=lib)
        _LIBRARIES.append(lib)  # the definition lives as long as its Library object
    return torch.ops.sglang.store_cache.v0


_LIBRARIES: list = []


def pool_steps(num_slots: int = 64, seed: int = 0) -> list[tuple]:
    """Inputs of a prefill of 5 tokens, then two decode steps, at scattered pool rows (row of position p: 63 - 3p),
    for the token-pool blocks: (positions, hidden, slots, kv_slots)."""
    g = torch.Generator().manual_seed(seed)
    rows = lambda positions: (num_slots - 1 - 3 * positions) % num_slots  # noqa: E731
    steps = []
    for past, n in ((0, 5), (5, 1), (6, 1)):
        positions = torch.arange(past, past + n)
        steps.append((positions, torch.randn(n, HIDDEN, generator=g), rows(positions), rows(torch.arange(past + n))))
    return steps


def padded_pool_steps(num_slots: int = 64, seed: int = 0, pad: int = 2) -> list[tuple]:
    """``pool_steps`` and one more decode step padded as SGLang pads a batch to a CUDA-graph size: ``pad`` tokens at
    position 0 whose ``loc`` is the padding slot 0."""
    steps = pool_steps(num_slots, seed)
    positions, hidden, slots, kv_slots = steps[-1]
    g = torch.Generator().manual_seed(seed + 1)
    past = int(positions[-1]) + 1
    positions = torch.cat((torch.tensor([past]), torch.zeros(pad, dtype=torch.int64)))
    slots = torch.cat(((num_slots - 1 - 3 * positions[:1]) % num_slots, torch.zeros(pad, dtype=torch.int64)))
    kv_slots = (num_slots - 1 - 3 * torch.arange(past + 1)) % num_slots
    return steps + [(positions, torch.randn(1 + pad, HIDDEN, generator=g), slots, kv_slots)]


class _TokenPoolLayers(nn.Module):
    """L layers of an SGLang/vLLM-style attention (fused qkv, ``forward_native`` RoPE) sharing one table."""

    def __init__(self, layers: int, max_pos: int = 64, v_head_dim: int = HEAD_DIM):
        super().__init__()
        self.layers, self.v_head_dim = layers, v_head_dim
        self.qkv = nn.ModuleList(nn.Linear(HIDDEN, (HEADS + KV_HEADS) * HEAD_DIM + KV_HEADS * v_head_dim, bias=False)
                                 for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(HEADS * v_head_dim, HIDDEN, bias=False) for _ in range(layers))
        self.register_buffer("cos_sin_cache", cos_sin_table(max_pos, HEAD_DIM))

    def qkv_of(self, i, positions, hidden):
        q, k, v = self.qkv[i](hidden).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * self.v_head_dim], -1)
        q, k = token_pool_rotary(positions, q, k, self.cos_sin_cache, HEAD_DIM, HEAD_DIM, "neox", False, False)
        return q, k.view(-1, KV_HEADS, HEAD_DIM), v.view(-1, KV_HEADS, self.v_head_dim)

    def attend(self, i, q, k_rows, v_rows, positions):
        t = q.shape[0]
        q = q.view(t, HEADS, HEAD_DIM).transpose(0, 1)
        k = repeat_kv(k_rows.transpose(0, 1)[None], HEADS // KV_HEADS)[0]
        v = repeat_kv(v_rows.transpose(0, 1)[None], HEADS // KV_HEADS)[0]
        mask = torch.arange(k.shape[1], device=positions.device)[None, :] <= positions[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o[i](out.transpose(0, 1).reshape(t, -1))


class StackedBlock(_TokenPoolLayers):
    """Every layer's cache is a view of a stacked buffer.

    layout="paged": ``kv [2, L, blocks, bs, Hkv, D]``, layer i writes ``kv[0, i][slot // bs, slot % bs] = k`` and
    ``kv[1, i][...] = v`` (nano-vllm); "token": ``kv [2, L, slots, Hkv, D]``, ``kv[0, i][slot] = k``;
    "split": ``k_cache, v_cache [L, slots, Hkv, D]``, ``k_cache[i][slot] = k``.
    ``read_between``: read the buffer between the k and the v store (then the pass must not fuse).
    forward(positions [T], hidden [T, HIDDEN], slots [T], kv_slots [Tk]) with slots as pool rows.
    """

    def __init__(self, layout: str = "paged", layers: int = 3, num_slots: int = 64, block_size: int = 8,
                 read_between: bool = False):
        super().__init__(layers)
        self.layout, self.block_size, self.read_between = layout, block_size, read_between
        rows = (num_slots // block_size, block_size) if layout == "paged" else (num_slots,)
        if layout == "split":
            self.register_buffer("k_cache", torch.randn(layers, *rows, KV_HEADS, HEAD_DIM))
            self.register_buffer("v_cache", torch.randn(layers, *rows, KV_HEADS, HEAD_DIM))
        else:
            self.register_buffer("kv_cache", torch.randn(2, layers, *rows, KV_HEADS, HEAD_DIM))

    def caches(self, i):
        if self.layout == "split":
            return self.k_cache[i], self.v_cache[i]
        return self.kv_cache[0, i], self.kv_cache[1, i]

    def forward(self, positions, hidden, slots, kv_slots):
        extra = hidden.new_zeros(())
        for i in range(self.layers):
            q, k, v = self.qkv_of(i, positions, hidden)
            k_cache, v_cache = self.caches(i)
            if self.layout == "paged":
                k_cache[slots // self.block_size, slots % self.block_size] = k
                if self.read_between:
                    extra = extra + self.kv_cache.sum()
                v_cache[slots // self.block_size, slots % self.block_size] = v
                k_cache, v_cache = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
            else:
                k_cache[slots] = k
                if self.read_between:
                    extra = extra + (self.kv_cache if self.layout == "token" else self.k_cache).sum()
                v_cache[slots] = v
            hidden = hidden + self.attend(i, q, k_cache[kv_slots], v_cache[kv_slots], positions)
        return hidden + extra


class EngineStoreBlock(_TokenPoolLayers):
    """SGLang on CUDA: ``set_kv_buffer`` stores through ``torch.ops.sglang.store_cache`` on row views, as
    ``_set_kv_buffer_impl`` calls it: ``store_cache(k2d, v2d, k_buffer2d, v_buffer2d, loc, row_bytes=...,
    v_row_bytes=..., size_limit=<pool rows>)``, ``reserved_skip_index`` left at 0 (the padding slot).

    ``store_kw`` replaces or adds keywords of the call (``None`` drops one); ``schema="v0"``: the older op, called
    with ``row_bytes`` only. ``v_head_dim``: v's head_dim (SGLang's asymmetric pools, ``head_dim != v_head_dim``).
    Pools start random in ``dtype``, slot 0 (SGLang's padding slot) filled with ``PADDING_ROW``.
    forward(positions [T], hidden [T, HIDDEN], loc [T], kv_loc [Tk]); one ``k_buffer{i}``/``v_buffer{i}`` per layer.
    """

    def __init__(self, layers: int = 2, num_slots: int = 64, dtype: torch.dtype = torch.float32,
                 store_kw: dict | None = None, schema: str = "current", v_head_dim: int = HEAD_DIM):
        super().__init__(layers, v_head_dim=v_head_dim)
        for i in range(layers):
            for name, dim in ((f"k_buffer{i}", HEAD_DIM), (f"v_buffer{i}", v_head_dim)):
                pool = torch.randn(num_slots, KV_HEADS, dim)
                pool[0] = PADDING_ROW
                self.register_buffer(name, pool)
        self.to(dtype)
        self.store_cache = store_cache_op(schema)
        row, v_row, size = KV_HEADS * HEAD_DIM, KV_HEADS * v_head_dim, self.k_buffer0.element_size()
        kw = dict(row_bytes=row * size) if schema == "v0" else dict(row_bytes=row * size, v_row_bytes=v_row * size,
                                                                    size_limit=num_slots)
        kw.update(store_kw or {})
        self.store_kw = {name: value for name, value in kw.items() if value is not None}

    def forward(self, positions, hidden, loc, kv_loc):
        row, v_row = KV_HEADS * HEAD_DIM, KV_HEADS * self.v_head_dim
        for i in range(self.layers):
            q, k, v = self.qkv_of(i, positions, hidden)
            k_buffer, v_buffer = getattr(self, f"k_buffer{i}"), getattr(self, f"v_buffer{i}")
            self.store_cache(k.view(-1, row), v.view(-1, v_row), k_buffer.view(-1, row), v_buffer.view(-1, v_row),
                             loc, **self.store_kw)
            hidden = hidden + self.attend(i, q, k_buffer[kv_loc], v_buffer[kv_loc], positions)
        return hidden


PADDING_ROW = 1234.5
"""The value of ``EngineStoreBlock``'s slot 0 before any step (a write there shows)."""


class WindowBlock(nn.Module):
    """HF attention with a ``StaticSlidingWindowLayer``-style cache that allocates itself on the first call.

    ``keys``/``values`` ``[B, Hkv, window, D]`` are created with ``torch.zeros`` inside the first forward (so inside
    the compiled prefill; ``allocate_batch`` creates them in ``__init__`` instead, so they are graph inputs), written
    with ``index_copy_`` until the window is full, then rolled: ``new = keys.roll(-1, dims=-2)``,
    ``new[:, :, tensor([-1])] = k``, ``keys.copy_(new)``. A first step longer than the window keeps tokens
    ``keep`` of it (HF: the last ``window``), ``keys.copy_(k[:, :, keep])``, and attends over all of its k and v;
    a multi-token step that fills a window holding tokens keeps the last ``window`` rows of ``cat(cached, k)``
    (HF's other two branches). The filled length is a Python int, as in HF (one graph per step kind).
    forward(hidden [B, S, HIDDEN], position_ids [B, S]).
    """

    def __init__(self, window: int = 6, dtype=torch.float32, keep: slice | None = None,
                 allocate_batch: int | None = None):
        super().__init__()
        self.window, self.length, self.keys, self.values = window, 0, None, None
        self.keep = slice(-window, None) if keep is None else keep
        if allocate_batch is not None:
            shape = (allocate_batch, KV_HEADS, window, HEAD_DIM)
            self.keys, self.values = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False, dtype=dtype)
        self.rotary_emb = HFRotaryEmbedding(HEAD_DIM, "neox")

    def update(self, k, v):
        if self.keys is None:
            shape = (k.shape[0], KV_HEADS, self.window, HEAD_DIM)
            self.keys = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values = torch.zeros(shape, dtype=v.dtype, device=v.device)
        n, full = k.shape[-2], self.length >= self.window
        if full and n == 1:
            new_keys, new_values = self.keys.roll(-1, dims=-2), self.values.roll(-1, dims=-2)
            index = torch.tensor([-1], dtype=torch.int64, device=k.device)
            new_keys[:, :, index] = k
            new_values[:, :, index] = v
            self.keys.copy_(new_keys)
            self.values.copy_(new_values)
        elif self.length + n <= self.window:
            position = torch.arange(n, device=k.device) + self.length
            self.keys.index_copy_(2, position, k)
            self.values.index_copy_(2, position, v)
        else:
            if self.length == 0:
                full_keys, full_values, keep = k, v, self.keep
            else:
                cached = slice(1, None) if full else slice(None, self.length)  # as HF's layer keeps them
                full_keys = torch.cat((self.keys[:, :, cached], k), dim=-2)
                full_values = torch.cat((self.values[:, :, cached], v), dim=-2)
                keep = slice(-self.window, None)
            self.keys.copy_(full_keys[:, :, keep])
            self.values.copy_(full_values[:, :, keep])
            self.length += n
            return full_keys, full_values
        self.length += n
        return self.keys, self.values

    def forward(self, hidden, position_ids):
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).view(b, s, -1, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(hidden).view(b, s, -1, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(hidden).view(b, s, -1, HEAD_DIM).transpose(1, 2)
        cos, sin = self.rotary_emb(v, position_ids)
        q, k = hf_apply_rotary_pos_emb(q, k, cos, sin, "neox", False)
        keys, values = self.update(k, v)
        keys, values = repeat_kv(keys, HEADS // KV_HEADS), repeat_kv(values, HEADS // KV_HEADS)
        out = F.scaled_dot_product_attention(q, keys, values)  # every cached row (zeros included): a fixture
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
