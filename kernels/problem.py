"""The fused RoPE + KV-cache store's host side: the argument checks, and the problem they describe.

``prepare`` checks every argument (no device sync) and returns a ``RopeKVProblem``: q/k/v (and the per-token
index tensors) seen as ``[B, S, H, D]`` (``[B or 1, S]``) views, with the options the kernel is specialised on
(``RopeKVOptions``, ``options.py``).
The other checks are for the op and the graph pass: ``check_index_ranges`` (syncs the device),
``check_writable`` (eager's refusals to write a cache) and ``default_rotary_dim``; what eager's fp8 casts do on
each device is ``fp8_rules.py``. The maths, layouts and slot conventions are described in ``rope_kv_kernel``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.fx.experimental.symbolic_shapes import guard_int

# CacheLayout and the dtype sets live with the options they describe; imported from here too
from fx_fusion.kernels.fp8_rules import eager_fp8_cast, exactly_representable
from fx_fusion.kernels.options import (FP8_DTYPES, MODEL_DTYPES, TABLE_DTYPES, CacheLayout,  # noqa: F401
                                       RopeKVOptions, make_options)

INDEX_DTYPES = (torch.int32, torch.int64)
# the 5-D key layouts: k_cache [num_blocks, Hkv, D // x, block_size, x], x = X_BYTES / element size
X_LAYOUTS = (CacheLayout.PAGED_X, CacheLayout.PAGED_X_SHUFFLED)
X_BYTES = 16
# k_scale/v_scale: one value, read exactly (as fp32) by the kernel
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RopeKVProblem:
    """Validated arguments, with q/k/v (and outputs) seen as ``[B, S, H, D]`` views."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # seen as [B or 1, S]
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None  # seen as [B or 1, S]
    swa_table: torch.Tensor | None
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    options: RopeKVOptions  # rotary_dim resolved (an int)
    q_shape: torch.Size  # as given, for the outputs
    k_shape: torch.Size
    q_scale: torch.Tensor | None = None  # fp8 q (``options.q_fp8_dtype``): one value, or None
    q_norm_weight: torch.Tensor | None = None  # QK-norm weights ([D]), or None
    k_norm_weight: torch.Tensor | None = None

    @property
    def q_out_dtype(self) -> torch.dtype:
        """q_out's dtype: q's, or the fp8 format of fp8 q."""
        return self.options.q_fp8_dtype or self.q.dtype

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype of the cache's values (``fp8_dtype`` for uint8 pools)."""
        return self.options.fp8_dtype or self.k_cache.dtype

    @property
    def num_tokens(self) -> int:
        return self.q.shape[0] * self.q.shape[1]

    @property
    def num_slots(self) -> int:
        """Slots a cache row can be addressed by: valid slots are ``0 <= slot < num_slots``."""
        c, layout = self.k_cache, self.options.layout
        if layout in X_LAYOUTS:  # [num_blocks, Hkv, D // x, block_size, x]
            return c.shape[0] * c.shape[3]
        return c.shape[0] * c.shape[1] if layout is CacheLayout.PAGED else (
            c.shape[2] if layout is CacheLayout.SEQUENCE else c.shape[0])

    @property
    def block_size(self) -> int:
        """Slots per cache block (1 for the token and sequence layouts)."""
        layout = self.options.layout
        if layout in X_LAYOUTS:
            return self.k_cache.shape[3]
        return self.k_cache.shape[1] if layout is CacheLayout.PAGED else 1

    @property
    def x(self) -> int | None:
        """The 5-D layouts' x (cache elements per 16 bytes, k_cache's last dim as ``prepare`` checked; an int even
        where the shape is symbolic); None for the others."""
        return X_BYTES // self.k_cache.element_size() if self.options.layout in X_LAYOUTS else None

    @property
    def cos_per_element(self) -> bool:
        return self.cos.shape[-1] == self.options.rotary_dim


def _expect_tensor(name: str, x, *, dtypes=None, ndims=None, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if ndims is not None and x.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, but q is on {device}")


def _as_bshd(name: str, x: torch.Tensor, layout: CacheLayout, head_dim: int) -> torch.Tensor:
    """View q/k/v as [B, S, H, D] without copying (flat layouts: B = 1, S = T)."""
    if layout is CacheLayout.SEQUENCE:
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, S, H, D] for the sequence layout, got shape {tuple(x.shape)}")
        if x.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]}, but the caches have {head_dim}")
        return x
    if x.dim() == 2:
        if x.shape[-1] % head_dim != 0:
            raise ValueError(f"{name} is [T, H*D] with H*D = {x.shape[-1]}, not a multiple of the caches' "
                             f"head_dim {head_dim}")
        x = x.unflatten(-1, (x.shape[-1] // head_dim, head_dim))
    elif x.dim() == 3:
        if x.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {x.shape[-1]}, but the caches have {head_dim}")
    else:
        raise ValueError(f"{name} must be [T, H*D] or [T, H, D] for the {layout.value} layout, "
                         f"got shape {tuple(x.shape)}")
    return x.unsqueeze(0)


def _as_bs(name: str, x: torch.Tensor, batch: int, seq: int, *, per_batch: bool) -> torch.Tensor:
    """View a per-token index tensor as [B or 1, S]."""
    if x.dim() == 1 and x.shape[0] == seq:
        return x.unsqueeze(0)
    if per_batch and x.dim() == 2 and x.shape[1] == seq and x.shape[0] in (1, batch):
        return x
    want = f"[{seq}]" + (f" or [{batch}, {seq}]" if per_batch else "")
    raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


def _byte_span(x: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte offsets that a non-empty tensor's elements occupy in its storage."""
    size = x.element_size()
    start = x.storage_offset() * size
    last = sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))
    return start, start + (last + 1) * size


def _check_no_overlap(inputs: dict[str, torch.Tensor], caches: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` if an input shares memory with a cache the op writes.

    The kernel reads every input while other programs write the caches, so the result would depend on
    the order programs run in (a race on a GPU). Two tensors overlap when they share a storage and
    their byte ranges intersect; this works on fake tensors too (their storages are shared the same
    way) and needs no device sync. Views that interleave without touching the same element (one
    buffer strided between an input and a cache) are conservatively counted as overlapping.
    """
    input_storages = [(name, x, x.untyped_storage()) for name, x in inputs.items()]
    for cache_name, cache in caches.items():
        storage = cache.untyped_storage()
        for name, x, x_storage in input_storages:
            if x_storage is not storage or x.numel() == 0 or cache.numel() == 0:
                continue
            (a0, a1), (b0, b1) = _byte_span(x), _byte_span(cache)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{name} overlaps {cache_name} in memory (bytes [{a0}, {a1}) and [{b0}, {b1}) of "
                                 f"one storage): the op writes {cache_name} while it reads {name}; pass a copy")


def check_writable(name: str, cache: torch.Tensor) -> None:
    """Raise ``RuntimeError`` where eager ``cache[slot] = x`` would: an inference tensor outside inference
    mode, or a cache that requires grad while grad mode is on (the op has no autograd formula).

    Skipped for fake and functional tensors: when a graph is traced, the grad and inference modes it
    will run under are not those of the tracing, so only the real kernels check. The op's kernels run
    below custom_op's autograd layer, which turns grad mode off whenever an input requires grad: there
    only the inference check can fire, and the op's own autograd kernel (``ops._autograd_checked``)
    makes the grad check, where the caller's grad mode is still in force.
    """
    if not (cache.is_inference() or cache.requires_grad) or isinstance(cache, (FakeTensor, FunctionalTensor)):
        return
    if cache.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"{name} is an inference tensor (created under torch.inference_mode()), which cannot be "
                           f"written outside inference mode; call the op under torch.inference_mode() or pass "
                           f"{name}.clone()")
    if cache.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{name} requires grad, and the op writes it in place without recording the write for "
                           f"autograd; call it under torch.no_grad() or torch.inference_mode(), or pass "
                           f"{name}.detach()")


def default_rotary_dim(cos: torch.Tensor, head_dim: int) -> int:
    """``rotary_dim`` implied by a cos table's width ``W``, where only one reading is possible.

    ``W`` is either ``rotary_dim`` (one value per feature) or ``rotary_dim / 2`` (one per pair). When
    ``2 W > head_dim`` only the first fits; otherwise both do (a ``cos_sin_cache`` half of a full
    rotary dim looks like an HF table of a half-width partial rotary) and ``ValueError`` asks for it.
    """
    width = cos.shape[-1]
    if 2 * width > head_dim:
        return width
    raise ValueError(f"rotary_dim is needed: cos has {width} features, which is either rotary_dim={width} "
                     f"(one value per feature) or rotary_dim={2 * width} (one per pair) for head_dim {head_dim}")


def prepare(
    q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions=None, swa_table=None,
    k_scale=None, v_scale=None, q_scale=None, q_norm_weight=None, k_norm_weight=None, *,
    options: RopeKVOptions | None = None, **kwargs,
) -> RopeKVProblem:
    """Check every argument (no device sync) and describe the problem as [B, S, H, D] views.

    The options are ``options`` with the ``RopeKVOptions`` fields named in ``kwargs`` replaced (``TypeError``
    naming an unknown name); ``rotary_dim=None`` takes it from cos's width where that is unambiguous
    (``default_rotary_dim``), and the problem's ``options`` hold it resolved. Raises ``TypeError``/``ValueError``
    naming the argument, what was expected and what arrived, and ``RuntimeError`` for caches that eager mode
    would refuse to write (real tensors only).
    """
    o = make_options(options, **kwargs)
    layout = o.layout
    _expect_tensor("q", q, dtypes=MODEL_DTYPES)
    dev = q.device
    _expect_tensor("k", k, dtypes=(q.dtype,), device=dev)
    _expect_tensor("v", v, dtypes=(q.dtype,), device=dev)
    n_kv, head_dim, cache_batch = _check_caches(k_cache, v_cache, layout, q.dtype, dev, o.fp8_dtype, o.quant_dtype)
    q4, k4, v4 = _check_qkv(q, k, v, layout, n_kv, head_dim, cache_batch)
    batch, seq = q4.shape[:2]

    _expect_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, device=dev)
    slots = _as_bs("slot_mapping", slot_mapping, batch, seq, per_batch=False)

    rotary_dim, pos2 = _check_rotary(cos, sin, positions, o.rotary_dim, head_dim, batch, seq, dev)

    if swa_table is not None:
        _expect_tensor("swa_table", swa_table, dtypes=INDEX_DTYPES, ndims=(1,), device=dev)
    _check_scales(k_scale, v_scale, k_cache.dtype, o.fp8_dtype, dev)
    _check_eager_fp8(dev, o.fp8_dtype or k_cache.dtype, o.quant_dtype, o.scale_mul, o.clamp)
    _check_fp8_q(q_scale, o, q.dtype, dev)
    _check_norm("q", o.q_norm, q_norm_weight, head_dim, q4.shape[2], o.norm_full_width, dev)
    _check_norm("k", o.k_norm, k_norm_weight, head_dim, k4.shape[2], o.norm_full_width, dev)
    _check_no_overlap({"q": q, "k": k, "v": v}, {"k_cache": k_cache, "v_cache": v_cache})
    check_writable("k_cache", k_cache)
    check_writable("v_cache", v_cache)
    if not (isinstance(o.rotary_dim, int) and o.rotary_dim == rotary_dim):  # None, or a SymInt made static
        o = dataclasses.replace(o, rotary_dim=rotary_dim)
    return RopeKVProblem(q4, k4, v4, k_cache, v_cache, slots, cos, sin, pos2, swa_table, k_scale, v_scale, o,
                         q.shape, k.shape, q_scale, q_norm_weight, k_norm_weight)


def _check_norm(x: str, norm: bool, weight, head_dim: int, heads: int, full_width: bool, dev: torch.device) -> None:
    """QK-norm of ``x`` (q or k): its weight a contiguous ``[head_dim]`` tensor (``[heads * head_dim]`` with
    ``full_width``) of a model dtype, or None, given only with the norm on; a full-width norm needs a power-of-two
    head count (the kernel sums a token's heads as one block)."""
    if norm and full_width and isinstance(heads, int) and heads & (heads - 1):
        raise ValueError(f"norm_full_width needs a power-of-two number of {x} heads, got {heads}")
    if weight is None:
        return
    name = f"{x}_norm_weight"
    if not norm:
        raise ValueError(f"{name} is given but {x}_norm is False (the weight of a norm the op does not apply)")
    _expect_tensor(name, weight, dtypes=MODEL_DTYPES, ndims=(1,), device=dev)
    width, what = (heads * head_dim, f"{x}'s heads * head_dim") if full_width else (head_dim, "head_dim")
    if weight.shape[0] != width or not weight.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [{width}] tensor ({what}), got shape "
                         f"{tuple(weight.shape)} with strides {weight.stride()}")


# dims of (k_cache, v_cache) per layout
_CACHE_NDIMS = {CacheLayout.TOKEN: (3, 3), CacheLayout.PAGED: (4, 4), CacheLayout.SEQUENCE: (4, 4),
                CacheLayout.PAGED_X: (5, 4), CacheLayout.PAGED_X_SHUFFLED: (5, 5)}


def check_cache_dtype(name: str, cache, ndims: tuple[int, ...], dtype: torch.dtype, dev: torch.device, fp8_dtype,
                      quant_dtype) -> None:
    """A cache's type, dims and device, and its dtype: the model's ``dtype``, an fp8 format, or uint8 holding
    ``fp8_dtype`` bits (which only eager fp8 stores, ``quant_dtype``, write); float8_e4m3fnuz only on HIP."""
    cache_dtypes = (torch.uint8,) if fp8_dtype is not None else (dtype, *FP8_DTYPES)
    _expect_tensor(name, cache, dtypes=cache_dtypes, ndims=ndims, device=dev)
    if fp8_dtype is not None and quant_dtype is None:
        raise ValueError(f"fp8_dtype ({fp8_dtype}) is given without quant_dtype: uint8 caches are written only "
                         "by eager fp8 stores")
    if cache.dtype == torch.float8_e4m3fnuz and dev.type == "cuda" and torch.version.hip is None:
        raise TypeError(f"{name} is float8_e4m3fnuz, which only HIP (AMD) GPUs store; use float8_e4m3fn on CUDA")


def _check_caches(k_cache, v_cache, layout: CacheLayout, dtype: torch.dtype, dev: torch.device, fp8_dtype,
                  quant_dtype) -> tuple[int, int, int | None]:
    """Check the caches (and ``fp8_dtype``); returns (kv heads, head_dim, batch of a sequence cache or None)."""
    k_ndim, v_ndim = _CACHE_NDIMS[layout]
    check_cache_dtype("k_cache", k_cache, (k_ndim,), dtype, dev, fp8_dtype, quant_dtype)
    _expect_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), ndims=(v_ndim,), device=dev)
    cache_batch = None
    if layout in X_LAYOUTS:
        n_kv, head_dim = _check_x_caches(k_cache, v_cache, layout)
    elif v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)}, but k_cache has {tuple(k_cache.shape)}")
    elif layout is CacheLayout.SEQUENCE:
        cache_batch, n_kv, _, head_dim = k_cache.shape
    else:
        n_kv, head_dim = k_cache.shape[-2:]
    if n_kv == 0 or head_dim == 0:
        raise ValueError(f"k_cache must have at least one kv head and a head_dim above 0, got shape "
                         f"{tuple(k_cache.shape)} ({n_kv} kv heads, head_dim {head_dim})")
    return n_kv, head_dim, cache_batch


def _check_x_caches(k_cache, v_cache, layout: CacheLayout) -> tuple[int, int]:
    """The 5-D layouts' caches against each other; returns (kv heads, head_dim).

    k_cache ``[num_blocks, Hkv, D // x, block_size, x]`` with x = 16 bytes / element size; v_cache
    ``[num_blocks, Hkv, D, block_size]`` (paged_x) or ``[num_blocks, Hkv, block_size // x, D, x]``
    (paged_x_shuffled), its shape the one k_cache implies.
    """
    x = X_BYTES // k_cache.element_size()
    k_shape, v_shape = tuple(k_cache.shape), tuple(v_cache.shape)
    if k_shape[4] != x:
        raise ValueError(f"k_cache must be [num_blocks, Hkv, D // x, block_size, x] for the {layout.value} layout, "
                         f"with x = {X_BYTES} bytes / element size = {x} for {k_cache.dtype}, got shape {k_shape}")
    num_blocks, n_kv, d_blocks, block_size, _ = k_shape
    head_dim = d_blocks * x
    shuffled = layout is CacheLayout.PAGED_X_SHUFFLED
    if shuffled and block_size % x:
        raise ValueError(f"k_cache has block_size {block_size} (shape {k_shape}), which is not a multiple of x = {x}: "
                         f"the {layout.value} v_cache splits each block into block_size // x groups of x slots")
    if shuffled:
        want_v, d_axis = (num_blocks, n_kv, block_size // x, head_dim, x), 3
        v_form = "[num_blocks, Hkv, block_size // x, D, x]"
    else:
        want_v, d_axis, v_form = (num_blocks, n_kv, head_dim, block_size), 2, "[num_blocks, Hkv, D, block_size]"
    if v_shape != want_v:
        v_dim = v_shape[d_axis]
        if v_dim % x and v_shape[:d_axis] + v_shape[d_axis + 1:] == want_v[:d_axis] + want_v[d_axis + 1:]:
            raise ValueError(f"v_cache has head_dim D = {v_dim} (shape {v_shape}, {v_form}), which is not a multiple "
                             f"of x = {x}: the {layout.value} k_cache holds D // x blocks of x {k_cache.dtype} "
                             "elements")
        raise ValueError(f"v_cache must have shape {want_v} ({v_form}) for the {layout.value} layout with k_cache of "
                         f"shape {k_shape} (D = {head_dim}), got {v_shape}")
    return n_kv, head_dim


def cache_head_dim(k_cache: torch.Tensor, layout: CacheLayout | str) -> int:
    """The head_dim a k_cache of ``layout`` holds (its last dim, or ``(D // x) * x`` for the 5-D layouts)."""
    if CacheLayout(layout) in X_LAYOUTS and k_cache.dim() == 5:
        return k_cache.shape[2] * k_cache.shape[4]
    return k_cache.shape[-1]


def _check_qkv(q, k, v, layout: CacheLayout, n_kv: int, head_dim: int, cache_batch: int | None) -> tuple:
    """q, k, v seen as [B, S, H, D] views, checked against each other and the caches."""
    q4 = _as_bshd("q", q, layout, head_dim)
    k4 = _as_bshd("k", k, layout, head_dim)
    v4 = _as_bshd("v", v, layout, head_dim)
    batch = q4.shape[0]
    for name, x in (("k", k4), ("v", v4)):
        if x.shape[:2] != q4.shape[:2]:
            raise ValueError(f"{name} has {tuple(x.shape[:2])} (batch, tokens), but q has {tuple(q4.shape[:2])}")
        if x.shape[2] != n_kv:
            raise ValueError(f"{name} has {x.shape[2]} heads, but the caches have {n_kv}")
    if q4.shape[2] == 0 or q4.shape[2] % n_kv != 0:
        raise ValueError(f"q has {q4.shape[2]} heads, expected a positive multiple of the {n_kv} kv heads")
    if layout is CacheLayout.SEQUENCE and cache_batch != batch:
        raise ValueError(f"k_cache has batch {cache_batch}, but q has batch {batch}")
    return q4, k4, v4


def _check_rotary(cos, sin, positions, rotary_dim, head_dim: int, batch: int, seq: int,
                  dev: torch.device) -> tuple:
    """Check cos, sin, positions and rotary_dim; returns (rotary_dim, positions seen as [B or 1, S] or None)."""
    for name, x in (("cos", cos), ("sin", sin)):
        _expect_tensor(name, x, dtypes=MODEL_DTYPES, device=dev)
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)}, but cos has {tuple(cos.shape)}")
    if rotary_dim is None:
        rotary_dim = default_rotary_dim(cos, head_dim)
    if isinstance(rotary_dim, torch.SymInt):  # traced with dynamic=True: a kernel constant, one per graph
        rotary_dim = guard_int(rotary_dim)
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be an even int in [2, head_dim={head_dim}], got {rotary_dim!r}")
    if cos.shape[-1] not in (rotary_dim, rotary_dim // 2):
        raise ValueError(f"cos has {cos.shape[-1]} features, expected rotary_dim={rotary_dim} (one per feature) "
                         f"or {rotary_dim // 2} (one per pair)")
    pos2 = None
    if positions is not None:
        _expect_tensor("positions", positions, dtypes=INDEX_DTYPES, device=dev)
        pos2 = _as_bs("positions", positions, batch, seq, per_batch=True)
        if cos.dim() != 2:
            raise ValueError(f"cos indexed by positions must be a [max_position, R] table, got {tuple(cos.shape)}")
    else:
        # per-token values: [S, R'] or [B or 1, S, R'], seen as [B or 1, S, R']
        if cos.dim() == 2:
            ok = cos.shape[0] == seq
        else:
            ok = cos.dim() == 3 and cos.shape[0] in (1, batch) and cos.shape[1] == seq
        if not ok:
            raise ValueError(f"cos without positions must hold one row per token, shape [{seq}, R] or "
                             f"[{batch}, {seq}, R], got {tuple(cos.shape)}")
    return rotary_dim, pos2


def _check_scales(k_scale, v_scale, cache_dtype: torch.dtype, fp8_dtype, dev: torch.device) -> None:
    """k_scale and v_scale: one value each, and only for fp8 caches (or uint8 ones with ``fp8_dtype``)."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            continue
        _expect_tensor(name, scale, dtypes=SCALE_DTYPES, device=dev)
        if scale.numel() != 1:
            raise ValueError(f"{name} must hold one per-tensor scale, got shape {tuple(scale.shape)}")
        if cache_dtype not in FP8_DTYPES and fp8_dtype is None:
            raise ValueError(f"{name} is given, but the caches are {cache_dtype}, not fp8")


def _check_eager_fp8(dev: torch.device, stored: torch.dtype, quant_dtype, scale_mul: bool, clamp) -> None:
    """Check the eager-fp8-store options against each other and the caches (``RopeKVOptions`` checked each one:
    ``clamp`` is None or ``(lo, hi)`` floats)."""
    if quant_dtype is None:
        for name, given in (("scale_mul", scale_mul), ("clamp", clamp is not None)):
            if given:
                raise ValueError(f"{name} is given without quant_dtype (it describes an eager fp8 store)")
        return
    if stored not in FP8_DTYPES:
        raise ValueError(f"quant_dtype is given, but the caches are {stored}, not fp8 (or uint8 with fp8_dtype)")
    try:
        eager_fp8_cast(dev, stored)
    except ValueError as e:
        raise ValueError(f"quant_dtype: {e}") from None
    if clamp is not None and not all(exactly_representable(c, quant_dtype) for c in clamp):
        raise ValueError(f"clamp bounds must be exact {quant_dtype} values (the model clamps in that dtype), "
                         f"got {clamp!r}")


def _check_fp8_q(q_scale, o: RopeKVOptions, dtype: torch.dtype, dev: torch.device) -> None:
    """fp8 q: ``q_scale`` (one value, or None) and the ``q_*`` options, which need ``q_fp8_dtype``."""
    if o.q_fp8_dtype is None:
        given = {"q_scale": q_scale is not None, "q_quant_dtype": o.q_quant_dtype is not None,
                 "q_scale_mul": o.q_scale_mul, "q_clamp": o.q_clamp is not None}
        for name in (name for name, is_given in given.items() if is_given):
            raise ValueError(f"{name} is given without q_fp8_dtype (it describes q's fp8 quantisation)")
        return
    try:
        eager_fp8_cast(dev, o.q_fp8_dtype)
    except ValueError as e:
        raise ValueError(f"q_fp8_dtype: {e}") from None
    if q_scale is not None:
        _expect_tensor("q_scale", q_scale, dtypes=SCALE_DTYPES, device=dev)
        if q_scale.numel() != 1:
            raise ValueError(f"q_scale must hold one per-tensor scale, got shape {tuple(q_scale.shape)}")
    elif o.q_scale_mul:
        raise ValueError("q_scale_mul is given without q_scale")
    quotient = o.q_quant_dtype or dtype
    if o.q_clamp is not None and not all(exactly_representable(c, quotient) for c in o.q_clamp):
        raise ValueError(f"q_clamp bounds must be exact {quotient} values (the model clamps in that dtype), "
                         f"got {o.q_clamp!r}")


def check_index_ranges(p: RopeKVProblem, *, slots: bool = True, positions: bool = True,
                       error: type[Exception] = ValueError) -> None:
    """Raise ``error`` if a slot or position lies outside its cache or table (syncs the device).

    Negative entries are allowed (they skip the store, or count from the end with ``negative_wraps``).
    ``slots``/``positions``: which to check. The kernel's ``CHECK_SLOTS``/``CHECK_POSITIONS`` assert the same.
    """
    if slots:
        _check_slot_ranges(p, error)
    if positions and p.positions is not None:
        low = -p.cos.shape[0] if p.options.negative_wraps else 0
        bad = (p.positions < low) | (p.positions >= p.cos.shape[0])
        if bool(bad.any()):
            raise error(f"positions must lie in [{low}, {p.cos.shape[0]}) (the rotary table's rows), "
                        f"got {int(p.positions[bad][0])}")


def _check_slot_ranges(p: RopeKVProblem, error: type[Exception]) -> None:
    slots = p.slot_mapping.long()
    if p.swa_table is not None:
        n_swa = p.swa_table.shape[0]
        low = -n_swa if p.options.negative_wraps else None
        bad = (slots >= n_swa) | ((slots < low) if low is not None else torch.zeros_like(slots, dtype=torch.bool))
        if bool(bad.any()):
            raise error(f"slot_mapping has entries outside swa_table's {n_swa} rows, e.g. {int(slots[bad][0])}")
        wrapped = torch.where(slots < 0, slots + n_swa, slots) if p.options.negative_wraps else slots
        slots = torch.where(wrapped >= 0, p.swa_table[wrapped.clamp(min=0)].long(), -1)
    bad = slots >= p.num_slots
    if p.options.negative_wraps:
        bad |= slots < -p.num_slots
    if bool(bad.any()):
        where = "swa_table maps to" if p.swa_table is not None else "slot_mapping has"
        raise error(f"{where} slots outside the {p.options.layout.value} cache's {p.num_slots} slots, "
                    f"e.g. {int(slots[bad][0])}")
