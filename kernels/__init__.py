"""Triton kernels, their launchers and float references, and the custom ops that wrap them."""

from fx_fusion.kernels.ops import rope_kv_store
from fx_fusion.kernels.options import CacheLayout, RopeKVOptions

__all__ = ["CacheLayout", "RopeKVOptions", "rope_kv_store"]
