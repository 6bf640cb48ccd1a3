"""What eager's fp8 casts do on each device, and which floats a dtype holds exactly: the rules the kernels' eager fp8
stores (``casts.py``) are checked against, by the op (``problem.py``, ``mla.py``) and by the graph pass before it
fuses an fp8 store (``patterns/quant.py``, ``patterns/plan.py``)."""

from __future__ import annotations

import math
import struct

import torch

# fp8 formats eager fp8 stores can write, by the kernel's FP8_CAST code of their overflow rule on a device
_EAGER_FP8_CAST = {
    # torch 2.13 on CPU: e4m3fn saturates (inf too) to +-448; e5m2 rounds to nearest even, overflows to inf
    "cpu": {torch.float8_e4m3fn: 1, torch.float8_e5m2: 3},
    # NVIDIA (measured on an H200, torch 2.11): e4m3fn rounds (448, 464] to 448 (464 is a tie, to even) and
    # gives NaN past it; e5m2 as on CPU
    "cuda": {torch.float8_e4m3fn: 2, torch.float8_e5m2: 3},
}


def eager_fp8_cast(device: torch.device, dtype: torch.dtype) -> int:
    """The kernel's ``FP8_CAST`` code for eager's ``x.to(dtype)`` on ``device``, or ``ValueError`` saying
    why it is not known (HIP: not measured; ``float8_e4m3fnuz``: no measured device stores it)."""
    kind = device.type
    if kind == "cuda" and torch.version.hip is not None:
        raise ValueError(f"eager's {dtype} cast on HIP (AMD) GPUs has not been measured, so the kernel "
                         "cannot promise to round and overflow as it does")
    rules = _EAGER_FP8_CAST.get(kind)
    if rules is None:
        raise ValueError(f"eager's {dtype} cast on {kind} devices has not been measured")
    if dtype not in rules:
        raise ValueError(f"eager's {dtype} cast on {kind} has not been measured (known: "
                         f"{', '.join(str(d) for d in rules)})")
    return rules[dtype]


def exactly_representable(x: float, dtype: torch.dtype) -> bool:
    """Whether the Python float ``x`` is a value of ``dtype`` (fp32, bf16, fp16; infinities are), computed
    without tensors (this runs under fake modes)."""
    if math.isnan(x):
        return False
    if math.isinf(x):
        return True
    try:
        f32 = struct.unpack("<f", struct.pack("<f", x))[0]
        if dtype is torch.float16:
            return struct.unpack("<e", struct.pack("<e", x))[0] == x
    except OverflowError:
        return False
    if f32 != x:
        return False
    low_bits = struct.unpack("<I", struct.pack("<f", x))[0] & 0xFFFF  # what bf16 drops of an fp32
    return dtype is torch.float32 or (dtype is torch.bfloat16 and low_bits == 0)
