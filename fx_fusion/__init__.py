"""fx_fusion: fuse rotary embedding -> reshape -> KV-cache store in unmodified model code.

The data flow, one file per arrow::

    model code
      -> Dynamo FX graph                      (torch.compile(..., backend="fx_fusion"): fx_fusion/backend.py)
      -> AOTAutograd functional aten graph    (Inductor's compile_fx)
      -> our post-grad pass                   (fx_fusion/fusion_pass.py: RopeKVFusionPass)
      -> canonicalisation                     (patterns/canonicalize.py, complex_rope.py: spellings reduced)
      -> finding sites                        (patterns/find.py: stores kv_store.py + engine_store.py, RoPE
                                              rope.py + evaluator.py, fp8 quant.py; views and casts:
                                              fx_utils.py's OP_ROLES)
      -> planning each site                   (patterns/plan.py: can_fuse, should_fuse)
      -> rewriting it                         (patterns/rewrite.py: replacement.py traced once per signature
                                              and spliced in, splice.py)
      -> the kernel's launch, or the op       (kernels/functional.py: launched by Inductor on CUDA, else the op)
      -> Triton kernel                        (kernels/rope_kv_kernel.py; host side: problem.py checks,
                                              launch.py launches, reference.py in plain torch)

Entry points: ``torch.compile(model, backend="fx_fusion", options={...})``, ``@fx_fusion.compile``,
and ``RopeKVFusionPass`` for engines that run their own torch.compile.
"""

from fx_fusion.backend import make_backend, prefer_static_launch, register
from fx_fusion.config import FusionConfig, OnUnfusable, RopeStyle
from fx_fusion.decorator import compile
from fx_fusion.fusion_pass import RopeKVFusionPass, UnfusableSiteError, install
from fx_fusion.report import GraphReport, collect_reports
from fx_fusion.kernels.problem import CacheLayout

register()
prefer_static_launch()

__all__ = [
    "CacheLayout", "FusionConfig", "GraphReport", "OnUnfusable", "RopeKVFusionPass", "RopeStyle",
    "UnfusableSiteError", "collect_reports", "compile", "install", "make_backend",
]
