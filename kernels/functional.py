"""The fused op as functional code for a graph pass to trace: the one way from a pass to the kernel.

``rope_kv_store_functional`` returns ``(q_out, k_out, new k buffer, new v buffer)`` in one of two forms (and
``mla_rope_store_functional``, the MLA op's, ``(q_out, k_pe_out, new kv_cache, new k_pe_cache or None)``):

    kernel=True   the kernel's launch through ``wrap_triton`` (``launch.launch_traceable``: the same breakdown
                  AOTAutograd does for the op, see ``ops.py``), functionalized. The traced graph holds
                  ``triton_kernel_wrapper_functional``, which Inductor re-inplaces and launches from its generated
                  code: no Python dispatch and no argument checks on the hot path (they ran once, on the fake
                  tensors). Raises ``NotTraceable`` where the launch would pin a symbolic size.
    kernel=False  the op itself, functionalized (``auto_functionalized``): on CPU (Inductor launches no user
                  Triton kernel there), with ``validate`` (a device sync) and where the launch cannot be traced.

``routes`` says which forms to try for a device, best first. The caches may be views of buffers (``k_views``,
``v_views``: ``(op, args)`` from the buffer down, e.g. a stacked ``kv[0, i]``): the kernel then gets the buffers
and the views' offsets in them, and the op is functionalized over the buffers (``auto_functionalized_v2``), so
either way Inductor writes the buffers in place (a written view of a graph input would be cloned instead).
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch.fx import Node

from fx_fusion.kernels.launch import NotTraceable, launch_traceable
from fx_fusion.kernels.mla import launch_traceable as mla_launch_traceable
from fx_fusion.kernels.mla import prepare_mla
from fx_fusion.kernels.mla_kernel import _mla_rope_store_kernel
from fx_fusion.kernels.options import MlaOptions, RopeKVOptions
from fx_fusion.kernels.problem import prepare
from fx_fusion.kernels.rope_kv_kernel import _rope_kv_store_kernel

FUSED_OP = torch.ops.fx_fusion.rope_kv_store.default
MLA_OP = torch.ops.fx_fusion.mla_rope_store.default  # registered by fx_fusion.kernels.mla_op (the package imports it)
__all__ = ["FUSED_OP", "MLA_OP", "NotTraceable", "is_fused_node", "mla_rope_store_functional",
           "rope_kv_store_functional", "routes"]


def routes(device: torch.device, validate: bool) -> tuple[bool, ...]:
    """The ``kernel`` values to try for tensors on ``device``, best first."""
    return (True, False) if device.type == "cuda" and not validate else (False,)


def rope_kv_store_functional(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale, v_scale,
                             q_scale, options: RopeKVOptions, *, kernel: bool, k_views: tuple | None = None,
                             v_views: tuple | None = None, q_norm_weight=None, k_norm_weight=None):
    """The op on caches ``k_buffer``/``v_buffer`` (or on views of them) in functional form; see the module docstring.

    ``v_buffer`` None: both cache views are of ``k_buffer``. ``options``: the op's non-tensor arguments."""
    tensors = (q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale, v_scale, q_scale,
               q_norm_weight, k_norm_weight)
    if k_views is None and v_views is None:
        if kernel:
            return torch.func.functionalize(_kernel, remove="mutations")(*tensors, options=options)
        return auto_functionalized(FUSED_OP, q=q, k=k, v=v, k_cache=k_buffer, v_cache=v_buffer,
                                   slot_mapping=slot_mapping, cos=cos, sin=sin, positions=positions, swa_table=None,
                                   k_scale=k_scale, v_scale=v_scale, q_scale=q_scale, q_norm_weight=q_norm_weight,
                                   k_norm_weight=k_norm_weight, **options.op_arguments())
    views = dict(k_views=k_views or (), v_views=v_views or ())
    if kernel:
        return torch.func.functionalize(_kernel, remove="mutations")(*tensors, options=options, **views)
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize

    def mutate(*tensors):
        return _op_on_views(*tensors, options=options, **views)
    return dispatch_functionalize(mutate, FunctionalTensorMode())(*tensors)


def _kernel(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale, v_scale, q_scale,
            q_norm_weight, k_norm_weight, *,
            options: RopeKVOptions, k_views: tuple | None = None, v_views: tuple | None = None):
    """The launch, writing the buffers in place (``validate`` is never asked of it: see ``routes``)."""
    v_base = k_buffer if v_buffer is None else v_buffer
    k_cache, v_cache = _replay(k_buffer, k_views), _replay(v_base, v_views)
    p = prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, None, k_scale, v_scale, q_scale,
                q_norm_weight, k_norm_weight, options=options)
    buffers = None if k_views is None else (k_buffer, v_buffer)
    q_out, k_out = launch_traceable(p, options.return_k, buffers=buffers)
    return q_out, k_out, k_buffer, v_base


def _op_on_views(q, k, v, k_buffer, v_buffer, slot_mapping, cos, sin, positions, k_scale, v_scale, q_scale,
                 q_norm_weight, k_norm_weight, *,
                 options: RopeKVOptions, k_views: tuple, v_views: tuple):
    v_base = k_buffer if v_buffer is None else v_buffer
    k_cache, v_cache = _replay(k_buffer, k_views), _replay(v_base, v_views)
    q_out, k_out = FUSED_OP(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table=None,
                            k_scale=k_scale, v_scale=v_scale, q_scale=q_scale, q_norm_weight=q_norm_weight,
                            k_norm_weight=k_norm_weight, **options.op_arguments())
    return q_out, k_out, k_buffer, v_base


def mla_rope_store_functional(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin, positions, k_scale,
                              options: MlaOptions, *, kernel: bool, k_pe_cache=None):
    """``torch.ops.fx_fusion.mla_rope_store`` in functional form: ``(q_out, k_pe_out, new kv_cache, new k_pe_cache
    or None)``, as the kernel's traced launch (``kernel=True``) or the op (``auto_functionalized``); see the module
    docstring."""
    if kernel:
        return torch.func.functionalize(_mla_kernel, remove="mutations")(
            q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin, positions, k_scale, k_pe_cache,
            options=options)
    out = auto_functionalized(MLA_OP, q_pe=q_pe, q_nope=q_nope, k_pe=k_pe, kv_c=kv_c, kv_cache=kv_cache,
                              slot_mapping=slot_mapping, cos=cos, sin=sin, positions=positions, k_scale=k_scale,
                              k_pe_cache=k_pe_cache, **options.op_arguments())
    return out[0], out[1], out[2], (out[3] if k_pe_cache is not None else None)


def _mla_kernel(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin, positions, k_scale, k_pe_cache, *,
                options: MlaOptions):
    """The MLA launch, writing the cache(s) in place."""
    p = prepare_mla(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, cos, sin, positions, k_scale, k_pe_cache,
                    options=options)
    q_out, k_out = mla_launch_traceable(p)
    return q_out, k_out, kv_cache, k_pe_cache


def _replay(x: torch.Tensor, views: tuple | None) -> torch.Tensor:
    for op, args in views or ():
        x = op(x, *args)
    return x


def is_fused_node(n: Node) -> bool:
    """Whether ``n`` is what a fused site became: the op or the MLA op (``auto_functionalized`` or direct), or the
    launch of its kernel (``triton_kernel_wrapper_functional``/``_mutation`` on CUDA)."""
    if n.op != "call_function":
        return False
    if n.target in (FUSED_OP, MLA_OP) or (n.args and n.args[0] in (FUSED_OP, MLA_OP)):
        return True
    if "triton_kernel_wrapper" not in getattr(n.target, "__name__", ""):
        return False
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
    while kernel is not None and kernel not in (_rope_kv_store_kernel, _mla_rope_store_kernel):
        kernel = getattr(kernel, "fn", None)  # an Autotuner holds the JITFunction
    return kernel is not None
