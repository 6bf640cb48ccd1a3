"""The fused ops' non-tensor options, each described once: ``RopeKVOptions`` (``rope_kv_store``) and ``MlaOptions``
(``mla_rope_store``, the MLA sibling; a field of the same name means the same, and one normaliser checks both).

Everything else derives from this dataclass: the custom op's schema (one argument per field, in field order,
``ops``), ``prepare``'s keyword arguments and ``RopeKVProblem.options`` (``problem``), and the public wrapper's
``**options``. A new option is a field here, its use (kernel, launch, reference) and the place the graph pass
sets it. A field's type must map to a schema type (``ops._SCHEMA_TYPES``: bool, int, float, str, CacheLayout,
torch.dtype, tuple of floats, each optionally ``| None``).

``__post_init__`` normalises and checks what a field's value says on its own (layout strings to ``CacheLayout``,
``clamp`` to a tuple of two floats, bools, dtypes out of their sets, and an option that needs another one to mean
anything: ``scale_round`` without ``quant_dtype``); checks against the tensors are ``prepare``'s.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import typing

import torch


class CacheLayout(str, enum.Enum):
    """How a KV cache is laid out; the value is what the custom op's ``layout`` argument takes."""

    TOKEN = "token"
    PAGED = "paged"
    SEQUENCE = "sequence"
    # AMD's (aiter ``fused_qk_rope_reshape_and_cache`` with ``flash_layout=False``): k ``[num_blocks, Hkv, D // x,
    # block_size, x]``, x = 16 bytes / element size; v ``[num_blocks, Hkv, D, block_size]`` (vLLM's non-flash v), or
    # the "shuffled" v ``[num_blocks, Hkv, block_size // x, D, x]``. The op writes them; the graph pass finds none.
    PAGED_X = "paged_x"
    PAGED_X_SHUFFLED = "paged_x_shuffled"


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz)
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp8 q: the formats whose bits the kernel computes as eager's cast rounds them (``fp8_rules.eager_fp8_cast``)
Q_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# what cos/sin may be rounded to before the multiply (``table_dtype``), by the kernel's ROUND_TABLE code
TABLE_DTYPES = (None, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class RopeKVOptions:
    """The op's options; the field order is the op's argument order (after the tensors)."""

    # NeoX pairing (feature i with i + rotary_dim / 2) if True, else GPT-J (feature 2i with 2i + 1)
    is_neox: bool = True
    # features rotated (even, <= head_dim; the rest pass through); None: cos's width, where unambiguous
    # (``problem.default_rotary_dim``). ``RopeKVProblem.options`` holds it resolved.
    rotary_dim: int | None = None
    # the caches' layout (a string is converted; the op takes the value)
    layout: CacheLayout = CacheLayout.TOKEN
    # also return the rotated k (else the op's k_out is empty and the wrapper returns None)
    return_k: bool = False
    # check that every slot and position lies inside its cache or table (a device sync)
    validate: bool = False
    # negative slots/positions count from the end (as ``cache[slot] = k`` does) instead of skipping
    negative_wraps: bool = False
    # cos/sin are rounded to this dtype (bf16 or fp16) before the multiply, as a model casting its table does
    table_dtype: torch.dtype | None = None
    # the fp8 format whose bits uint8 caches hold (with quant_dtype)
    fp8_dtype: torch.dtype | None = None
    # eager fp8 stores: the dtype of ``x / scale`` (see ``fp8_rules.eager_fp8_cast``)
    quant_dtype: torch.dtype | None = None
    # eager fp8 stores: ``x * scale`` instead of ``x / scale``
    scale_mul: bool = False
    # eager fp8 stores: (lo, hi) of the model's clamp before the cast
    clamp: tuple[float, float] | None = None
    # an out-of-range slot fails the call (``problem.check_index_ranges``) instead of being skipped
    check_slots: bool = False
    # an out-of-range position fails the call instead of being clamped
    check_positions: bool = False
    # fp8 q (for an fp8 attention kernel): q_out holds ``fp8(clamp(round_QQ(q_rot / q_scale)))`` in this format,
    # as eager computes it from the rotated q in q's dtype (``q_scale``: the op's tensor argument, or none)
    q_fp8_dtype: torch.dtype | None = None
    # the dtype of eager's ``q_rot / q_scale`` (None: q's dtype)
    q_quant_dtype: torch.dtype | None = None
    # ``q_rot * q_scale`` instead of ``q_rot / q_scale``
    q_scale_mul: bool = False
    # (lo, hi) of the model's clamp before q's cast
    q_clamp: tuple[float, float] | None = None
    # QK-norm (Qwen3, Gemma 3, OLMo 2's per-head form): RMSNorm of each head's features of q / k before the RoPE,
    # ``y = x * rsqrt(mean(x^2) + norm_eps)``, rounded to x's dtype first with ``norm_round`` (HF Llama / Qwen3),
    # times ``w + norm_offset`` (Gemma: 1.0), rounded to x's dtype (w: the op's q_norm_weight / k_norm_weight or
    # none)
    q_norm: bool = False
    k_norm: bool = False
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    norm_round: bool = False
    # eager fp8 stores: k_scale and v_scale are read rounded to ``quant_dtype`` (as eager on CUDA reads a 0-d scale
    # tensor, ``patterns/quant.py: scale_rounding``), so the caller need not convert them (needs ``quant_dtype``)
    scale_round: bool = False
    # fp8 q: q_scale is read rounded to the quotient's dtype (``q_quant_dtype``, or q's dtype); needs ``q_fp8_dtype``
    q_scale_round: bool = False
    # QK-norm over all of a token's heads (OLMo 2: RMSNorm of the whole q / k projection, H * D features, before
    # the head split), weights ``[H * D]``; needs ``q_norm`` or ``k_norm`` and a power-of-two head count
    norm_full_width: bool = False
    # the QK-norm is applied to the rotated head instead (HunYuan, Llama 4: RoPE, then the norm), to the RoPE's
    # result rounded to x's dtype; needs ``q_norm`` or ``k_norm``
    norm_after_rope: bool = False

    def __post_init__(self):
        _normalise(self)

    def op_arguments(self) -> dict:
        """The fields as the op's keyword arguments (an enum as its value, a tuple as a list)."""
        return {f.name: op_value(getattr(self, f.name)) for f in dataclasses.fields(self)}


# the layouts an MLA cache may have (one latent "head" of L + R features per slot)
MLA_LAYOUTS = (CacheLayout.TOKEN, CacheLayout.PAGED, CacheLayout.SEQUENCE)


@dataclasses.dataclass(frozen=True)
class MlaOptions:
    """The MLA op's options (``torch.ops.fx_fusion.mla_rope_store``); the field order is the op's argument order
    (after the tensors). Each field means what the ``RopeKVOptions`` field of its name means, for the one cache
    ``kv_cache`` (and ``k_pe`` in place of k); the rotary width is k_pe's, so there is no ``rotary_dim``."""

    # NeoX pairing (feature i with i + R / 2) if True, else GPT-J (feature 2i with 2i + 1)
    is_neox: bool = True
    # the caches' layout: token [num_slots, (1,) W], paged [num_blocks, block_size, (1,) W] or sequence
    # [B, 1, S_max, W] (HF StaticCache, slots = cache_position; q_pe, k_pe, kv_c then [B, S, ...]); W = L + R, or
    # L for kv_cache and R for k_pe_cache when the op gets both
    layout: CacheLayout = CacheLayout.TOKEN
    # also return the rotated k_pe (else the op's k_pe_out is empty and the wrapper returns None)
    return_k: bool = False
    # check that every slot and position lies inside the cache or table (a device sync)
    validate: bool = False
    # negative slots/positions count from the end (as ``cache[slot] = row`` does) instead of skipping
    negative_wraps: bool = False
    # cos/sin are rounded to this dtype (bf16 or fp16) before the multiply
    table_dtype: torch.dtype | None = None
    # the fp8 format whose bits a uint8 kv_cache holds (with quant_dtype)
    fp8_dtype: torch.dtype | None = None
    # eager fp8 stores: the dtype of ``row / k_scale`` (see ``fp8_rules.eager_fp8_cast``)
    quant_dtype: torch.dtype | None = None
    # eager fp8 stores: ``row * k_scale`` instead of ``row / k_scale``
    scale_mul: bool = False
    # eager fp8 stores: (lo, hi) of the model's clamp before the cast
    clamp: tuple[float, float] | None = None
    # an out-of-range slot fails the call instead of being skipped
    check_slots: bool = False
    # an out-of-range position fails the call instead of being clamped
    check_positions: bool = False
    # eager fp8 stores: k_scale is read rounded to ``quant_dtype`` (needs ``quant_dtype``)
    scale_round: bool = False
    # GPT-J pairs (2i, 2i + 1) rotated and written de-interleaved, at (i, i + R/2) (HF DeepSeek's
    # apply_rotary_pos_emb_interleave); needs is_neox=False
    deinterleave: bool = False

    def __post_init__(self):
        _normalise(self)
        if self.layout not in MLA_LAYOUTS:
            raise ValueError(f"layout must be one of {[m.value for m in MLA_LAYOUTS]} for the MLA cache, "
                             f"got {self.layout.value!r}")

    def op_arguments(self) -> dict:
        """The fields as the op's keyword arguments (an enum as its value, a tuple as a list)."""
        return {f.name: op_value(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _normalise(options) -> None:
    """Normalise and check, in place (a frozen dataclass), the fields of ``options`` that its class has, each by
    what its value says on its own; shared by ``RopeKVOptions`` and ``MlaOptions`` (a field of the same name means
    the same in both)."""
    names, bools = _FIELD_NAMES[type(options)], _BOOL_FIELDS[type(options)]  # (plain lookups: Dynamo traces this)

    def has(name: str) -> bool:
        return name in names

    for name in bools:
        value = getattr(options, name)
        if value is not True and value is not False:
            if not (isinstance(value, int) and value in (0, 1)):
                raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
            object.__setattr__(options, name, bool(value))
    if has("layout") and not isinstance(options.layout, CacheLayout):
        try:
            object.__setattr__(options, "layout", CacheLayout(options.layout))
        except ValueError:
            raise ValueError(f"layout must be one of {[m.value for m in CacheLayout]}, "
                             f"got {options.layout!r}") from None
    if has("table_dtype") and options.table_dtype not in TABLE_DTYPES:
        raise ValueError(f"table_dtype must be one of {[str(d) for d in TABLE_DTYPES]}, got {options.table_dtype!r}")
    if has("fp8_dtype") and options.fp8_dtype is not None and options.fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be None or one of {[str(d) for d in FP8_DTYPES]} (the format a uint8 "
                         f"cache holds), got {options.fp8_dtype!r}")
    if has("quant_dtype") and options.quant_dtype is not None and options.quant_dtype not in MODEL_DTYPES:
        raise ValueError(f"quant_dtype must be None or one of {[str(d) for d in MODEL_DTYPES]}, "
                         f"got {options.quant_dtype!r}")
    for name in (n for n in ("clamp", "q_clamp") if has(n)):
        if getattr(options, name) is not None:
            object.__setattr__(options, name, _clamp_pair(getattr(options, name), name))
    if has("q_fp8_dtype") and options.q_fp8_dtype is not None and options.q_fp8_dtype not in Q_FP8_DTYPES:
        raise ValueError(f"q_fp8_dtype must be None or one of {[str(d) for d in Q_FP8_DTYPES]}, "
                         f"got {options.q_fp8_dtype!r}")
    for name in (n for n in ("norm_eps", "norm_offset") if has(n)):
        value = getattr(options, name)
        # no math.isfinite: Dynamo, tracing the wrapper inside a compiled function, refuses it
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or abs(value) > sys.float_info.max or value != value:
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(options, name, float(value))
    if has("norm_eps") and options.norm_eps < 0:
        raise ValueError(f"norm_eps must be >= 0, got {options.norm_eps!r}")
    if has("q_quant_dtype") and options.q_quant_dtype is not None and options.q_quant_dtype not in MODEL_DTYPES:
        raise ValueError(f"q_quant_dtype must be None or one of {[str(d) for d in MODEL_DTYPES]}, "
                         f"got {options.q_quant_dtype!r}")
    # the scale roundings name the dtype they round to through another field: without it they mean nothing
    if has("scale_round") and options.scale_round and options.quant_dtype is None:
        raise ValueError("scale_round is given without quant_dtype (the dtype the scales are rounded to, of an eager "
                         "fp8 store)")
    if has("q_scale_round") and options.q_scale_round and options.q_fp8_dtype is None:
        raise ValueError("q_scale_round is given without q_fp8_dtype (it rounds q_scale, of q's fp8 quantisation)")
    if has("norm_full_width") and options.norm_full_width and not (options.q_norm or options.k_norm):
        raise ValueError("norm_full_width is given without q_norm or k_norm (it says how wide the QK-norm is)")
    if has("norm_after_rope") and options.norm_after_rope and not (options.q_norm or options.k_norm):
        raise ValueError("norm_after_rope is given without q_norm or k_norm (it says where the QK-norm is applied)")


def op_value(value):
    """A ``RopeKVOptions`` value as the op takes it (an enum's value, a tuple as a list)."""
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


def _clamp_pair(clamp, name: str) -> tuple[float, float]:
    if not isinstance(clamp, (list, tuple)) or len(clamp) != 2 or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in clamp):
        raise ValueError(f"{name} must be None or two numbers (lo, hi), got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo <= hi:
        raise ValueError(f"{name} must have lo <= hi (no NaN), got {clamp!r}")
    return lo, hi


_FIELD_TYPES = {cls: typing.get_type_hints(cls) for cls in (RopeKVOptions, MlaOptions)}
_FIELD_NAMES = {cls: tuple(types) for cls, types in _FIELD_TYPES.items()}
_BOOL_FIELDS = {cls: tuple(name for name, hint in types.items() if hint is bool) for cls, types in _FIELD_TYPES.items()}


def field_types(cls) -> dict[str, typing.Any]:
    """An options dataclass's fields: name -> type, in field order."""
    return _FIELD_TYPES[cls]


FIELD_TYPES: dict[str, typing.Any] = field_types(RopeKVOptions)  # name -> type, in field order


def make_options(options: RopeKVOptions | None = None, /, **kwargs) -> RopeKVOptions:
    """``options`` (default: the defaults) with the fields named in ``kwargs`` replaced; ``TypeError`` naming an
    unknown name."""
    return _make(RopeKVOptions, "the fused RoPE + KV-cache store", options, kwargs)


def make_mla_options(options: MlaOptions | None = None, /, **kwargs) -> MlaOptions:
    """``make_options`` for ``MlaOptions``."""
    return _make(MlaOptions, "the fused MLA RoPE + cache store", options, kwargs)


def _make(cls, what: str, options, kwargs: dict):
    fields = field_types(cls)
    unknown = [name for name in kwargs if name not in fields]
    if unknown:
        raise TypeError(f"{unknown[0]!r} is not an option of {what} (options: {', '.join(fields)})")
    if options is None:
        return cls(**kwargs)
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__} or None, got {type(options).__name__}")
    return dataclasses.replace(options, **kwargs) if kwargs else options
