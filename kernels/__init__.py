"""Triton kernels, their launchers and float references, and the custom ops that wrap them."""

from fx_fusion.kernels.ops import rope_kv_store
from fx_fusion.kernels.problem import CacheLayout

__all__ = ["CacheLayout", "rope_kv_store"]
