"""One analysis of the fused kernel per configuration, where Inductor would make one per call site.

Inductor decides which arguments a user Triton kernel reads and writes from the kernel's TTIR: at every launch it
lowers (``ir.UserDefinedTritonKernel``) and at every functionalized launch it traces, it generates the TTIR afresh
(``triton_kernel_wrap.identify_accessed_tensors``; ``identify_mutated_tensors`` in older torch). A model fused at
every layer launches the same kernel with the same configuration once per layer: 36 TTIR generations for a
36-layer model, each tens of milliseconds.

``install`` wraps those functions so that the fused kernel's analysis is kept per configuration: the kernel, the
constexpr values and, for the other arguments, what Triton specialises the TTIR on (a tensor's dtype, a number's
value, a symbolic size's expression, the same whether the pass traces it as a ``SymInt`` or Inductor lowers it
as a sympy expression). Every other kernel passes through untouched. Where the torch in use has neither
function (its internals moved), nothing is installed and Inductor analyses as it always did.
"""

from __future__ import annotations

import copy
import functools

import sympy
import torch

_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")


def install(kernel) -> bool:
    """Keep ``kernel``'s analyses (a ``triton.JITFunction``); returns whether a wrapper is in place."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:
        return False
    installed = False
    for name in _NAMES:
        analyse = getattr(wrap, name, None)
        if analyse is None:
            continue
        if not hasattr(analyse, "_fx_fusion_kernels"):
            analyse = _wrap(analyse)
            setattr(wrap, name, analyse)
        analyse._fx_fusion_kernels.add(kernel)
        installed = True
    return installed


def _wrap(analyse):
    cache: dict = {}

    @functools.wraps(analyse)
    def cached(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        ours = cached._fx_fusion_kernels
        fn = kernel if kernel in ours else getattr(kernel, "fn", None)  # an Autotuner's JITFunction
        if fn not in ours or args or kw or tma_descriptor_metadata:
            return analyse(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        try:
            key = (fn, tuple((name, _describe(value)) for name, value in sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return analyse(kernel, kwargs, tma_descriptor_metadata)
        if key not in cache:
            cache[key] = analyse(kernel, kwargs, tma_descriptor_metadata)
        return copy.deepcopy(cache[key])

    cached._fx_fusion_kernels = set()
    cached._fx_fusion_cache = cache
    return cached


def _describe(value):
    """What the TTIR of a launch may depend on in one argument."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return type(value).__name__, value
    if isinstance(value, torch.Tensor):  # fake or real
        return "tensor", value.dtype
    get_dtype = getattr(value, "get_dtype", None)  # Inductor's buffers (TensorBox)
    if callable(get_dtype):
        return "tensor", get_dtype()
    if isinstance(value, (torch.SymInt, sympy.Basic)):  # traced, then lowered: one size, two spellings
        return "size", str(value.node.expr if isinstance(value, torch.SymInt) else value)
    return type(value).__name__, str(value)
