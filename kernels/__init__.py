"""Triton kernels, their launchers and float references, and the custom ops that wrap them."""

from fx_fusion.kernels.mla_op import mla_rope_store
from fx_fusion.kernels.ops import rope_kv_store
from fx_fusion.kernels.options import CacheLayout, MlaOptions, RopeKVOptions

__all__ = ["CacheLayout", "MlaOptions", "RopeKVOptions", "mla_rope_store", "rope_kv_store"]
