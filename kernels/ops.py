"""``torch.ops.fx_fusion.rope_kv_store``: the custom op the graph pass emits (the only thing it imports).

The op mutates only the two caches; q (and k, when asked) come back as fresh tensors. It never
mutates q/k in place: an in-place op on views of a fused qkv projection is miscompiled by Inductor's
re-inplacing (it cloned k from the wrong storage offset), so the functional form is the safe one.

Implementations:
    CUDA (HIP shares it)  the Triton kernel
    CPU                   the Triton kernel through the interpreter when ``TRITON_INTERPRET=1``,
                          otherwise the plain-torch reference in fp32 (same maths as the kernel)
    Meta / fake           shapes only, with the same argument checks
    torch.compile         like ``torch.library.triton_op``: on CUDA, with ``validate=False``, AOTAutograd
                          breaks the op down into its kernel launch (``triton_kernel_wrapper_functional``),
                          which Inductor launches from its generated code. Elsewhere (CPU, the
                          interpreter, ``validate=True``: a device sync) the op stays opaque.

``_launch_traceable`` is that breakdown as a function of the op's arguments (``launch.launch_traceable``, which the
graph pass reaches through ``functional.py``).

The op's arguments are the tensors of ``_tensor_arguments``, one per ``RopeKVOptions`` field, then the tensors added
later (``_later_tensor_arguments``, so that positional callers keep working) (``_SIGNATURE``, from which
``custom_op`` infers the schema); its implementations read the fields as one ``RopeKVOptions``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import typing

import torch
from torch._library.autograd import make_autograd_impl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from fx_fusion.kernels.launch import NotTraceable, interpreted, launch, launch_traceable
from fx_fusion.kernels.options import RopeKVOptions, field_types, make_options, op_value
from fx_fusion.kernels.problem import (CacheLayout, RopeKVProblem, cache_head_dim, check_index_ranges,
                                       check_writable, default_rotary_dim, prepare)
from fx_fusion.kernels.reference import reference


def _tensor_arguments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor | None, swa_table: torch.Tensor | None,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's tensor arguments and its returns; its other arguments are ``RopeKVOptions``'s fields."""


def _later_tensor_arguments(q_scale: torch.Tensor | None = None, q_norm_weight: torch.Tensor | None = None,
                            k_norm_weight: torch.Tensor | None = None):
    """Tensor arguments added after the options, last, so that callers passing options by position keep working
    (``q_scale``: fp8 q's scale; ``q_norm_weight``/``k_norm_weight``: QK-norm's weights)."""


# a RopeKVOptions field's type -> the type custom_op's schema inference takes (and how a value is passed)
_SCHEMA_TYPES = {bool: bool, int: int, float: float, str: str, CacheLayout: str, torch.dtype: torch.dtype,
                 tuple[float, float]: list[float]}


def _schema_type(owner: str, name: str, hint) -> typing.Any:
    """The op's parameter annotation for field ``name`` of type ``hint`` (of the options class ``owner``);
    ``TypeError`` for a type without one."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional and len(args) == 2 else hint
    if base not in _SCHEMA_TYPES:
        raise TypeError(f"{owner}.{name} has type {hint}, which has no schema type (known: "
                        f"{', '.join(map(str, _SCHEMA_TYPES))}, each optionally | None)")
    # typing.Optional: the spelling infer_schema's table is keyed on
    return typing.Optional[_SCHEMA_TYPES[base]] if optional else _SCHEMA_TYPES[base]


def op_signature(tensors, options_cls, later_tensors=None) -> inspect.Signature:
    """An op's one signature, from which ``custom_op`` infers its schema: the parameters of ``tensors`` (a function
    whose signature lists the op's tensor arguments and whose return annotation is the op's), then one argument per
    field of the options dataclass ``options_cls`` (its default, its type), then the parameters of
    ``later_tensors`` (tensors added after the options), if given."""
    fields = field_types(options_cls)
    return inspect.signature(tensors).replace(parameters=[
        *inspect.signature(tensors).parameters.values(),
        *(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=op_value(f.default),
                            annotation=_schema_type(options_cls.__name__, f.name, fields[f.name]))
          for f in dataclasses.fields(options_cls)),
        *(inspect.signature(later_tensors).parameters.values() if later_tensors is not None else ()),
    ])


def tensor_names(signature: inspect.Signature, options_cls) -> tuple[str, ...]:
    """The names of an ``op_signature``'s tensor arguments (every parameter that is not an options field)."""
    fields = field_types(options_cls)
    return tuple(name for name in signature.parameters if name not in fields)


def bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """An op's arguments by name, defaults applied."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


# the op's one signature: the tensors, then one argument per RopeKVOptions field (its default, its type)
_SIGNATURE = op_signature(_tensor_arguments, RopeKVOptions, _later_tensor_arguments)
_TENSORS = tensor_names(_SIGNATURE, RopeKVOptions)


def _rope_kv_store(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager implementation on every device; see the module docstring and ``RopeKVOptions`` for the options.
    ``k_out`` is empty unless ``return_k``. ``check_slots``/``check_positions``: ``IndexError`` on CPU (checked
    on the host, before anything is written), a device-side assertion on CUDA (in the kernel; no sync)."""
    p = _problem(_bind(args, kwargs))
    o = p.options
    if o.validate:  # everything the checks below would check, and more
        check_index_ranges(p)
    elif p.q.device.type == "cpu" and (o.check_slots or o.check_positions):
        check_index_ranges(p, slots=o.check_slots, positions=o.check_positions, error=IndexError)
    if p.q.device.type == "cpu" and not interpreted():
        q_out, k_out = reference(p, o.return_k, compute_dtype=torch.float32)
        return q_out, (k_out if o.return_k else p.k.new_empty((0,)))
    q_out, k_out = _outputs(p)
    with torch.cuda.device(p.q.device) if p.q.is_cuda else contextlib.nullcontext():
        launch(p, q_out, k_out if o.return_k else None)
    return q_out, k_out


_rope_kv_store.__signature__ = _SIGNATURE  # what custom_op infers the schema from


def _outputs(p: RopeKVProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(q_out, k_out)``; ``k_out`` is empty unless ``return_k``."""
    return (p.q.new_empty(p.q_shape, dtype=p.q_out_dtype),
            p.k.new_empty(p.k_shape if p.options.return_k else (0,)))


def _problem(args: dict) -> RopeKVProblem:
    """The checked problem from the op's arguments by name."""
    options = RopeKVOptions(**{name: value for name, value in args.items() if name not in _TENSORS})
    return prepare(**{name: args[name] for name in _TENSORS}, options=options)


def _bind(args: tuple, kwargs: dict) -> dict:
    return bind(_SIGNATURE, args, kwargs)


rope_kv_store_op = torch.library.custom_op("fx_fusion::rope_kv_store", _rope_kv_store,
                                           mutates_args=("k_cache", "v_cache"))


@rope_kv_store_op.register_fake
def _(*args, **kwargs):
    return _outputs(_problem(_bind(args, kwargs)))  # the same checks; validate needs data: skipped


def _launch_traceable(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's arguments -> ``(q_out, k_out)`` through ``wrap_triton``: the op broken down into its launch.

    Checks the arguments (``prepare``) when called, so on fake tensors at trace time; never validates
    slot ranges (that needs the data).
    """
    p = _problem(_bind(args, kwargs))
    return launch_traceable(p, p.options.return_k)


def break_down_when_compiled(signature: inspect.Signature, first: str, cache_names: tuple[str, ...],
                             launch_traceable_fn):
    """An op's FunctionalTensorMode handler: under AOTAutograd's functionalization, launch through ``wrap_triton``
    (``launch_traceable_fn(**arguments)``) where Inductor can own the launch: tensors on CUDA (``first``: the
    argument whose device decides), no ``validate``, no interpreter, no cache (``cache_names``) that is a view."""

    def handler(mode, op, types, args, kwargs):
        bound = bind(signature, args, kwargs)
        x = bound[first]
        # a cache that is a view (``kv[0, i]`` of a stacked buffer) stays with the op: auto_functionalized_v2 writes
        # its base in place, where the functional launch would clone the view and scatter it back
        traceable = (
            isinstance(x, torch.Tensor) and x.device.type == "cuda" and not bound["validate"] and not interpreted()
            and all(t in (torch.Tensor, FunctionalTensor) or issubclass(t, FakeTensor) for t in types)
            and not any(isinstance(bound[c], torch.Tensor) and bound[c]._is_view() for c in cache_names)
        )
        if traceable:
            try:
                with mode:
                    return launch_traceable_fn(**bound)
            except NotTraceable:  # a symbolic size the kernel takes as a constant: the op stays opaque
                pass
        return mode.__torch_dispatch__(op, types, args, kwargs)
    return handler


_break_down_when_compiled = break_down_when_compiled(_SIGNATURE, "q", ("k_cache", "v_cache"), _launch_traceable)
rope_kv_store_op.register_torch_dispatch(FunctionalTensorMode, _break_down_when_compiled)


def _autograd_checked(generated, signature: inspect.Signature, cache_names: tuple[str, ...]):
    """custom_op's autograd kernel, preceded by eager's in-place checks on the caches (``cache_names``).

    Only this layer sees the caller's grad mode: custom_op runs the kernels below it with grad mode off
    whenever an input requires grad. So a leaf cache that requires grad is rejected here, before
    anything is written, as ``cache[slot] = x`` rejects it; everything else goes on to custom_op's
    own autograd kernel (which raises in backward: the op has no formula).
    """
    caches = [(i, name) for i, name in enumerate(signature.parameters) if name in cache_names]

    def autograd_kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled():
            for i, name in caches:  # the dispatcher passes every argument but keyword-only ones by position
                x = args[i] if i < len(args) else kwargs.get(name)  # (trailing defaults may be left out)
                if isinstance(x, torch.Tensor):
                    check_writable(name, x)
        return generated(keyset, *args, **kwargs)
    return autograd_kernel


def register_autograd_checks(op, name: str, signature: inspect.Signature, cache_names: tuple[str, ...]) -> None:
    """Install ``_autograd_checked`` for custom op ``op`` (``fx_fusion::name``).

    On the backend autograd keys: a kernel registered there takes precedence over custom_op's, which sits on
    the Autograd alias key (and which torch < 2.13 does not let Python override)."""
    for key in ("AutogradCPU", "AutogradCUDA"):  # CUDA covers HIP
        op._lib.impl(name, _autograd_checked(make_autograd_impl(op._opoverload, op), signature, cache_names),
                     key, with_keyset=True)


register_autograd_checks(rope_kv_store_op, "rope_kv_store", _SIGNATURE, ("k_cache", "v_cache"))


def split_rotary_table(cos_sin_cache, cos, sin, positions, rotary_dim: int | None,
                       rotary_name: str = "rotary_dim") -> tuple:
    """The public wrappers' rotary table: ``(cos, sin, rotary_dim)`` from either ``cos_sin_cache [max_pos,
    rotary_dim]`` (cos half then sin half; needs ``positions``; its width is ``rotary_dim``, which a given one must
    equal) or ``cos``/``sin`` (returned as given). ``rotary_name``: how messages name the expected width."""
    if cos_sin_cache is not None:
        if cos is not None or sin is not None:
            raise ValueError("give either cos_sin_cache or cos/sin, not both")
        if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2:
            raise ValueError(f"cos_sin_cache must be a [max_position, rotary_dim] tensor, got "
                             f"{getattr(cos_sin_cache, 'shape', type(cos_sin_cache).__name__)}")
        if positions is None:
            raise ValueError("cos_sin_cache needs positions")
        width = cos_sin_cache.shape[-1]
        if width % 2 or (rotary_dim is not None and width != rotary_dim):
            want = "an even number" if rotary_dim is None else f"{rotary_name}={rotary_dim}"
            raise ValueError(f"cos_sin_cache has {width} columns, expected {want} (a cos half and a sin half of "
                             f"rotary_dim / 2 columns each)")
        return cos_sin_cache[:, : width // 2], cos_sin_cache[:, width // 2:], width
    if cos is None or sin is None:
        raise ValueError("give the rotary table as cos_sin_cache (with positions) or as cos and sin")
    return cos, sin, rotary_dim


def rope_kv_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, *,
    cos_sin_cache: torch.Tensor | None = None, positions: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    rotary_dim: int | None = None, layout: CacheLayout | str = CacheLayout.TOKEN,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    swa_table: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, check_bounds: bool = False,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k, store rotated k and raw v in the caches; return ``(q_out, k_out or None)``.

    ``**options``: every ``RopeKVOptions`` field but ``rotary_dim`` and ``layout`` (named here), with its
    default and meaning there: ``is_neox``, ``return_k``, ``validate``, ``negative_wraps``, ``table_dtype``,
    the fp8 fields, ``check_slots``, ``check_positions``, and any field added later. Another name is a
    ``TypeError`` naming it.

    Give the rotary table either as ``cos_sin_cache [max_pos, rotary_dim]`` (cos half then sin half,
    as SGLang and vLLM build it) with ``positions``, or as ``cos``/``sin`` (per-token values as HF
    computes them, or tables with ``positions``). ``rotary_dim`` defaults to the ``cos_sin_cache``'s
    width (a given one must equal it). With ``cos``/``sin`` of width ``W`` it defaults to ``W`` only
    when ``2 W > head_dim``; otherwise ``W`` could be one value per feature or one per pair
    (``cos_sin_cache`` halves, ``freqs_cis``), and ``rotary_dim`` is required (``ValueError``).
    ``validate=True`` also checks that every slot and position lies inside its cache or table, which
    costs a device sync; it is off by default so the op can run inside CUDA graphs, and the kernel
    never touches memory outside the tensors either way (out-of-range slots are skipped, positions
    clamped to the table). ``negative_wraps=True`` makes negative slots and positions count from the
    end, as ``cache[slot] = k`` does, instead of skipping. ``check_bounds=True`` (``check_slots`` and
    ``check_positions``) makes an out-of-range slot or position fail the call without a sync, as eager
    indexing does (what the graph pass emits): ``IndexError`` on CPU, before anything is written; on CUDA a
    device-side assertion (which, as any, ends the CUDA context); on HIP nothing (as Inductor's kernels there:
    skipped and clamped). Negative slots without ``negative_wraps`` stay padding.

    fp8 caches: ``k_scale``/``v_scale`` (fp32, one element) divide before the cast, which saturates. With
    ``quant_dtype`` the store is instead bit for bit what eager computes for ``(x / k_scale).to(fp8)``
    with ``x / k_scale`` in ``quant_dtype`` (``x * k_scale`` with ``scale_mul``), after the optional
    ``clamp=(lo, hi)``, with the overflow rule of eager's cast on this device; the caches may then be
    uint8 pools holding ``fp8_dtype`` bits.

    fp8 q (for fp8 attention): with ``q_fp8_dtype``, q_out is ``(q_rot / q_scale).to(q_fp8_dtype)`` as eager
    computes it from the rotated q in q's dtype: the quotient in ``q_quant_dtype`` (default q's dtype; ``q_rot *
    q_scale`` with ``q_scale_mul``), the optional ``q_clamp=(lo, hi)``, this device's cast; no ``q_scale``: the
    cast alone. A Python-number ``q_scale`` is taken as its fp32 value (the op divides by it correctly rounded).

    QK-norm: with ``q_norm``/``k_norm`` each q/k head is first normalised as an RMSNorm does (``norm_eps``,
    ``norm_offset``, ``norm_round``: see ``RopeKVOptions``), with weight ``q_norm_weight``/``k_norm_weight``
    (``[head_dim]``, contiguous, a model dtype) or none; with ``norm_after_rope`` the rotated head is normalised
    instead (the RoPE's result rounded to q's dtype, then the norm), as HunYuan and Llama 4 do.
    """
    opts = make_options(layout=layout, **options)
    if check_bounds:
        opts = dataclasses.replace(opts, check_slots=True, check_positions=True)
    cos, sin, rotary_dim = split_rotary_table(cos_sin_cache, cos, sin, positions, rotary_dim)
    if rotary_dim is None and isinstance(cos, torch.Tensor):
        if isinstance(k_cache, torch.Tensor) and k_cache.dim() > 0:
            rotary_dim = default_rotary_dim(cos, cache_head_dim(k_cache, opts.layout))
        else:
            rotary_dim = cos.shape[-1]  # placeholder: the op rejects k_cache, naming it
    opts = dataclasses.replace(opts, rotary_dim=rotary_dim)
    if isinstance(q_scale, (int, float)) and not isinstance(q_scale, bool):  # as vLLM passes a static scale
        device = q.device if isinstance(q, torch.Tensor) else None
        q_scale = torch.full((1,), float(q_scale), dtype=torch.float32, device=device)
    elif q_scale is not None and not isinstance(q_scale, torch.Tensor):
        raise TypeError(f"q_scale must be a torch.Tensor, a Python number or None, got {type(q_scale).__name__}")
    q_out, k_out = torch.ops.fx_fusion.rope_kv_store(
        q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
        **opts.op_arguments(), q_scale=q_scale, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    return q_out, (k_out if opts.return_k else None)
