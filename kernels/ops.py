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

``rope_kv_store_functional`` is that breakdown as a plain function of the op's arguments, for a graph
pass to trace (see ``launch.launch_traceable``).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch._library.autograd import make_autograd_impl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from fx_fusion.kernels.launch import NotTraceable, interpreted, launch, launch_traceable
from fx_fusion.kernels.problem import (CacheLayout, RopeKVProblem, check_index_ranges, check_writable,
                                       default_rotary_dim, prepare)
from fx_fusion.kernels.reference import reference


def _rope_kv_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor | None, swa_table: torch.Tensor | None,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    is_neox: bool, rotary_dim: int, layout: str, return_k: bool, validate: bool, negative_wraps: bool = False,
    table_dtype: torch.dtype | None = None, fp8_dtype: torch.dtype | None = None,
    quant_dtype: torch.dtype | None = None, scale_mul: bool = False, clamp: list[float] | None = None,
    check_slots: bool = False, check_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager implementation on every device; see the module docstring. ``k_out`` is empty unless ``return_k``.

    ``table_dtype`` (bf16 or fp16): cos/sin are rounded to it before the multiply, as a model that casts
    an fp32 table to its dtype first does. ``quant_dtype`` (with ``scale_mul``, ``clamp``): fp8 stores
    exactly as eager's ``(x / scale).clamp(lo, hi).to(fp8)`` in ``quant_dtype`` on this device;
    ``fp8_dtype``: the format uint8 caches hold (see ``rope_kv_kernel``). ``check_slots``/``check_positions``:
    an index outside the cache or table fails the call as eager indexing does, instead of being skipped or
    clamped: ``IndexError`` on CPU (checked on the host, before anything is written), a device-side assertion
    on CUDA (in the kernel; no sync)."""
    p, return_k, validate = _problem(locals())
    if validate:  # everything the checks below would check, and more
        check_index_ranges(p)
    elif p.q.device.type == "cpu" and (p.check_slots or p.check_positions):
        check_index_ranges(p, slots=p.check_slots, positions=p.check_positions, error=IndexError)
    if p.q.device.type == "cpu" and not interpreted():
        q_out, k_out = reference(p, return_k, compute_dtype=torch.float32)
        return q_out, (k_out if return_k else p.k.new_empty((0,)))
    q_out, k_out = _outputs(p, return_k)
    with torch.cuda.device(p.q.device) if p.q.is_cuda else contextlib.nullcontext():
        launch(p, q_out, k_out if return_k else None)
    return q_out, k_out


def _outputs(p: RopeKVProblem, return_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ``(q_out, k_out)``; ``k_out`` is empty unless ``return_k``."""
    return p.q.new_empty(p.q_shape), p.k.new_empty(p.k_shape if return_k else (0,))


_SIGNATURE = inspect.signature(_rope_kv_store)  # the op's one signature: everything below binds to it


def _problem(args: dict) -> tuple[RopeKVProblem, bool, bool]:
    """(checked problem, return_k, validate) from the op's arguments by name."""
    args = dict(args)
    return_k, validate = args.pop("return_k"), args.pop("validate")
    return prepare(**args), return_k, validate


def _bind(args: tuple, kwargs: dict) -> dict:
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


rope_kv_store_op = torch.library.custom_op("fx_fusion::rope_kv_store", _rope_kv_store,
                                           mutates_args=("k_cache", "v_cache"))


@rope_kv_store_op.register_fake
def _(*args, **kwargs):
    p, return_k, _ = _problem(_bind(args, kwargs))  # the same checks; validate needs data: skipped
    return _outputs(p, return_k)


def rope_kv_store_functional(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's arguments -> ``(q_out, k_out)`` through ``wrap_triton``: the op broken down into its launch.

    Checks the arguments (``prepare``) when called, so on fake tensors at trace time; never validates
    slot ranges (that needs the data).
    """
    p, return_k, _ = _problem(_bind(args, kwargs))
    return launch_traceable(p, return_k)


def _break_down_when_compiled(mode, op, types, args, kwargs):
    """Under AOTAutograd's functionalization: launch through ``wrap_triton`` where Inductor can own the launch."""
    bound = _bind(args, kwargs)
    q = bound["q"]
    # a cache that is a view (``kv[0, i]`` of a stacked buffer) stays with the op: auto_functionalized_v2 writes
    # its base in place, where the functional launch would clone the view and scatter it back
    traceable = (
        isinstance(q, torch.Tensor) and q.device.type == "cuda" and not bound["validate"] and not interpreted()
        and all(t in (torch.Tensor, FunctionalTensor) or issubclass(t, FakeTensor) for t in types)
        and not any(isinstance(c, torch.Tensor) and c._is_view() for c in (bound["k_cache"], bound["v_cache"]))
    )
    if traceable:
        try:
            with mode:
                return rope_kv_store_functional(**bound)
        except NotTraceable:  # a symbolic size the kernel takes as a constant: the op stays opaque
            pass
    return mode.__torch_dispatch__(op, types, args, kwargs)


rope_kv_store_op.register_torch_dispatch(FunctionalTensorMode, _break_down_when_compiled)


def _autograd_checked(generated):
    """custom_op's autograd kernel, preceded by eager's in-place checks on the caches.

    Only this layer sees the caller's grad mode: custom_op runs the kernels below it with grad mode off
    whenever an input requires grad. So a leaf cache that requires grad is rejected here, before
    anything is written, as ``cache[slot] = x`` rejects it; everything else goes on to custom_op's
    own autograd kernel (which raises in backward: the op has no formula).
    """
    caches = [(i, name) for i, name in enumerate(_SIGNATURE.parameters) if name in ("k_cache", "v_cache")]

    def autograd_kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled():
            for i, name in caches:  # the dispatcher passes every argument but keyword-only ones by position
                if isinstance(args[i], torch.Tensor):
                    check_writable(name, args[i])
        return generated(keyset, *args, **kwargs)
    return autograd_kernel


# On the backend autograd keys: a kernel registered there takes precedence over custom_op's, which sits on
# the Autograd alias key (and which torch < 2.13 does not let Python override).
for _key in ("AutogradCPU", "AutogradCUDA"):  # CUDA covers HIP
    rope_kv_store_op._lib.impl(
        "rope_kv_store", _autograd_checked(make_autograd_impl(rope_kv_store_op._opoverload, rope_kv_store_op)),
        _key, with_keyset=True)


def rope_kv_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, *,
    cos_sin_cache: torch.Tensor | None = None, positions: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    is_neox: bool = True, rotary_dim: int | None = None, layout: CacheLayout | str = CacheLayout.TOKEN,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    swa_table: torch.Tensor | None = None, return_k: bool = False, validate: bool = False,
    negative_wraps: bool = False, table_dtype: torch.dtype | None = None,
    fp8_dtype: torch.dtype | None = None, quant_dtype: torch.dtype | None = None, scale_mul: bool = False,
    clamp: list[float] | None = None, check_bounds: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k, store rotated k and raw v in the caches; return ``(q_out, k_out or None)``.

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
    end, as ``cache[slot] = k`` does, instead of skipping. ``check_bounds=True`` makes an out-of-range slot or
    position fail the call without a sync, as eager indexing does (what the graph pass emits): ``IndexError``
    on CPU, before anything is written; on CUDA a device-side assertion (which, as any, ends the CUDA context);
    on HIP nothing (as Inductor's kernels there: skipped and clamped). Negative slots without
    ``negative_wraps`` stay padding.

    fp8 caches: ``k_scale``/``v_scale`` (fp32, one element) divide before the cast, which saturates. With
    ``quant_dtype`` the store is instead bit for bit what eager computes for ``(x / k_scale).to(fp8)``
    with ``x / k_scale`` in ``quant_dtype`` (``x * k_scale`` with ``scale_mul``), after the optional
    ``clamp=(lo, hi)``, with the overflow rule of eager's cast on this device; the caches may then be
    uint8 pools holding ``fp8_dtype`` bits.
    """
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
            want = "an even number" if rotary_dim is None else f"rotary_dim={rotary_dim}"
            raise ValueError(f"cos_sin_cache has {width} columns, expected {want} (a cos half and a sin half of "
                             f"rotary_dim / 2 columns each)")
        cos, sin = cos_sin_cache[:, : width // 2], cos_sin_cache[:, width // 2:]
        rotary_dim = width
    elif cos is None or sin is None:
        raise ValueError("give the rotary table as cos_sin_cache (with positions) or as cos and sin")
    layout = layout.value if isinstance(layout, CacheLayout) else layout  # prepare() names a bad layout
    if rotary_dim is None and isinstance(cos, torch.Tensor):
        if isinstance(k_cache, torch.Tensor) and k_cache.dim() > 0:
            rotary_dim = default_rotary_dim(cos, k_cache.shape[-1])
        else:
            rotary_dim = cos.shape[-1]  # placeholder: the op rejects k_cache, naming it
    q_out, k_out = torch.ops.fx_fusion.rope_kv_store(
        q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
        is_neox, rotary_dim, layout, return_k, validate, negative_wraps, table_dtype, fp8_dtype, quant_dtype,
        scale_mul, None if clamp is None else [float(c) for c in clamp], check_slots=check_bounds,
        check_positions=check_bounds)
    return q_out, (k_out if return_k else None)
