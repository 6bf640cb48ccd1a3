"""``torch.ops.fx_fusion.mla_rope_store``: the MLA sibling of ``rope_kv_store`` (``ops``), and its public wrapper.

The op mutates only ``kv_cache`` (and ``k_pe_cache`` when given); q_out (``[T, Hq, LQ + R]``: q_nope then the
rotated q_pe) and, when asked, the rotated k_pe come back as fresh tensors. Implementations, as
``rope_kv_store``'s: the Triton kernel on CUDA (and on CPU through the interpreter with ``TRITON_INTERPRET=1``), otherwise on CPU the float reference in fp32; a fake
implementation with the same checks; under torch.compile on CUDA (``validate=False``) the breakdown into the
kernel's ``wrap_triton`` launch, elsewhere the op stays opaque.

The op's arguments are the tensors of ``_tensor_arguments``, then one per ``MlaOptions`` field (the schema is
built by ``ops.op_signature``, as ``rope_kv_store``'s is).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from fx_fusion.kernels.launch import interpreted
from fx_fusion.kernels.mla import MlaProblem, launch, launch_traceable, outputs, prepare_mla, reference
from fx_fusion.kernels.ops import (bind, break_down_when_compiled, op_signature, register_autograd_checks,
                                   split_rotary_table, tensor_names)
from fx_fusion.kernels.options import CacheLayout, MlaOptions, make_mla_options
from fx_fusion.kernels.problem import check_index_ranges


def _tensor_arguments(
    q_pe: torch.Tensor, q_nope: torch.Tensor | None, k_pe: torch.Tensor, kv_c: torch.Tensor, kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
    k_scale: torch.Tensor | None, k_pe_cache: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's tensor arguments and its returns; its other arguments are ``MlaOptions``'s fields.

    ``k_pe_cache`` has no default although it may be None: torch 2.11's in-place bookkeeping of a custom op indexes
    the mutated arguments by position, and the dispatcher leaves out trailing arguments equal to their defaults,
    so a call without a second cache failed there with an ``IndexError`` (torch 2.13 handles it)."""


_SIGNATURE = op_signature(_tensor_arguments, MlaOptions)
_TENSORS = tensor_names(_SIGNATURE, MlaOptions)


def _problem(args: dict) -> MlaProblem:
    """The checked problem from the op's arguments by name."""
    options = MlaOptions(**{name: value for name, value in args.items() if name not in _TENSORS})
    return prepare_mla(**{name: args[name] for name in _TENSORS}, options=options)


def _mla_rope_store(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager implementation on every device (see the module docstring and ``MlaOptions``). ``check_slots`` /
    ``check_positions``: ``IndexError`` on CPU, checked before anything is written; a device assertion on CUDA."""
    p = _problem(bind(_SIGNATURE, args, kwargs))
    o = p.options
    cpu = p.q_pe.device.type == "cpu"
    if o.validate:
        check_index_ranges(p)
    elif cpu and (o.check_slots or o.check_positions):
        check_index_ranges(p, slots=o.check_slots, positions=o.check_positions, error=IndexError)
    if cpu and not interpreted():
        q_out, k_out = reference(p, compute_dtype=torch.float32)
        return q_out, (k_out if o.return_k else p.k_pe.new_empty((0,)))
    q_out, k_out = outputs(p)
    with torch.cuda.device(p.q_pe.device) if p.q_pe.is_cuda else contextlib.nullcontext():
        launch(p, q_out, k_out if o.return_k else None)
    return q_out, k_out


_mla_rope_store.__signature__ = _SIGNATURE  # what custom_op infers the schema from

mla_rope_store_op = torch.library.custom_op("fx_fusion::mla_rope_store", _mla_rope_store,
                                            mutates_args=("kv_cache", "k_pe_cache"))


@mla_rope_store_op.register_fake
def _(*args, **kwargs):
    return outputs(_problem(bind(_SIGNATURE, args, kwargs)))  # the same checks; validate needs data: skipped


def _launch_traceable(**arguments) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's arguments -> ``(q_out, k_pe_out)`` through ``wrap_triton`` (checks the arguments first)."""
    return launch_traceable(_problem(arguments))


mla_rope_store_op.register_torch_dispatch(
    FunctionalTensorMode, break_down_when_compiled(_SIGNATURE, "q_pe", ("kv_cache", "k_pe_cache"), _launch_traceable))
register_autograd_checks(mla_rope_store_op, "mla_rope_store", _SIGNATURE, ("kv_cache", "k_pe_cache"))


def mla_rope_store(
    q_pe: torch.Tensor, k_pe: torch.Tensor, kv_c: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    *, q_nope: torch.Tensor | None = None, cos_sin_cache: torch.Tensor | None = None,
    positions: torch.Tensor | None = None, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    layout: CacheLayout | str = CacheLayout.TOKEN, k_scale: torch.Tensor | None = None,
    k_pe_cache: torch.Tensor | None = None, check_bounds: bool = False, **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q_pe and k_pe (DeepSeek MLA's rope parts), store ``[kv_c | rope(k_pe)]`` in ``kv_cache`` at each
    token's slot; return ``(q_out, rotated k_pe or None)``, q_out ``[T, Hq, LQ + R]`` = ``[q_nope | rope(q_pe)]``
    (``rope(q_pe)`` alone without q_nope).

    q_pe ``[T, Hq, R]``, q_nope ``[T, Hq, LQ]``, k_pe ``[T, R]`` or ``[T, 1, R]``, kv_c ``[T, L]`` or ``[T, 1, L]``
    (views with any strides); kv_cache ``[num_slots, (1,) L + R]`` (``layout="token"``) or ``[num_blocks,
    block_size, (1,) L + R]`` (``"paged"``). The rotary table, slots, positions and fp8 stores are those of
    ``rope_kv_store`` (read its docstring): ``cos_sin_cache [max_pos, R]`` with ``positions``, or ``cos``/``sin``;
    ``k_scale`` for an fp8 cache; ``check_bounds`` sets ``check_slots`` and ``check_positions``.

    ``k_pe_cache``: the rotated k_pe goes there (rows of R) and kv_cache holds kv_c alone (rows of L), both of
    ``layout``, one slot each per token (transformers' DeepseekV3). ``layout="sequence"``: HF's StaticCache
    ``[B, 1, S_max, W]``, ``slot_mapping`` its ``cache_position [S]``, and q_pe ``[B, S, Hq, R]``, q_nope ``[B, S,
    Hq, LQ]``, k_pe ``[B, S, (1,) R]``, kv_c ``[B, S, (1,) L]`` (any strides: HF's ``[B, H, S, D]`` transposed).
    ``deinterleave=True`` (with ``is_neox=False``): pairs (2i, 2i + 1) rotated and written at (i, i + R/2).

    ``**options``: the other ``MlaOptions`` fields (``is_neox``, ``return_k``, ``validate``, ``negative_wraps``,
    ``table_dtype``, ``fp8_dtype``, ``quant_dtype``, ``scale_mul``, ``clamp``, ...); another name is a
    ``TypeError`` naming it.
    """
    opts = make_mla_options(layout=layout, **options)
    if check_bounds:
        opts = dataclasses.replace(opts, check_slots=True, check_positions=True)
    rot = q_pe.shape[-1] if isinstance(q_pe, torch.Tensor) and q_pe.dim() > 0 else None
    cos, sin, _ = split_rotary_table(cos_sin_cache, cos, sin, positions, rot, rotary_name="q_pe's R")
    q_out, k_out = torch.ops.fx_fusion.mla_rope_store(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin,
                                                      positions, k_scale, k_pe_cache, **opts.op_arguments())
    return q_out, (k_out if opts.return_k else None)
