"""Fused rotary embedding + KV-cache store: the public module of the kernel's layers.

One file per layer, imported by the rest of the package directly:

    rope_kv_kernel.py  the Triton kernel; its docstring describes the maths, layouts and slot conventions
    casts.py           the kernels' roundings and eager's fp8 quantisation, bit for bit (shared with the MLA kernel)
    options.py         RopeKVOptions: the op's non-tensor options, described once (the op's schema comes from it),
                       CacheLayout and the dtype sets they take
    problem.py         RopeKVProblem, prepare and the host-side checks
    fp8_rules.py       what eager's fp8 casts do on each device (the fp8 stores are checked against it)
    launch.py          the launch configuration, the kernel's arguments, launch and launch_traceable
    reference.py       the float reference in plain torch
    ops.py             the custom op; functional.py: the op and its launch in functional form, for the graph pass

The MLA sibling op (``mla_rope_store``) has its own: mla_kernel.py (kernel), mla.py (checks, launch, reference),
mla_op.py (the op).

This module re-exports their public names under the names they always had here (tests and
``benchmarks/bench_kernel.py`` use them; the benchmark's ``--baseline`` loads an older single-file copy of
this module by path and calls the same names).
"""

from __future__ import annotations

from fx_fusion.kernels.launch import NotTraceable, kernel_arguments, launch, launch_config, launch_traceable
from fx_fusion.kernels.options import RopeKVOptions
from fx_fusion.kernels.problem import (FP8_DTYPES, INDEX_DTYPES, MODEL_DTYPES, SCALE_DTYPES, TABLE_DTYPES,
                                       CacheLayout, RopeKVProblem, check_index_ranges, check_writable,
                                       default_rotary_dim, eager_fp8_cast, exactly_representable, prepare)
from fx_fusion.kernels.reference import reference

__all__ = [
    "FP8_DTYPES", "INDEX_DTYPES", "MODEL_DTYPES", "SCALE_DTYPES", "TABLE_DTYPES", "CacheLayout", "NotTraceable",
    "RopeKVOptions", "RopeKVProblem", "check_index_ranges", "check_writable", "default_rotary_dim", "eager_fp8_cast",
    "exactly_representable", "kernel_arguments", "launch", "launch_config", "launch_traceable", "prepare",
    "reference",
]
