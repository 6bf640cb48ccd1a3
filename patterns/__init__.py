"""Pattern/replacement definitions the pass applies (they import only ``kernels``)."""

from fx_fusion.patterns.rope import RopeStyle
from fx_fusion.patterns.rope_kv_store import FUSED_OP, FusionOptions, Site, fuse_rope_kv_stores, is_fused_node

__all__ = ["FUSED_OP", "FusionOptions", "RopeStyle", "Site", "fuse_rope_kv_stores", "is_fused_node"]
