"""``torch.compile(model, backend="fx_fusion")``: Inductor with the fusion pass installed.

Registered with Dynamo on ``import fx_fusion`` and, through the ``torch_dynamo_backends`` entry point,
as soon as the package is installed. ``options={...}`` may mix ``FusionConfig`` fields with Inductor
config patches; ``mode=`` maps to Inductor's mode options as with the default backend.

The backend also has Inductor launch the fused kernel through its static launcher, as it launches its own
kernels (``prefer_static_launch``, ``static_launch``): without CUDA graphs, Triton's own launcher costs
enough host time per call to make a fused model slower than stock torch.compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Mapping

import torch

from fx_fusion.config import FusionConfig, split_options
from fx_fusion.fusion_pass import RopeKVFusionPass, install

log = logging.getLogger("fx_fusion")

STATIC_LAUNCH = "static_launch_user_defined_triton_kernels"
STATIC_LAUNCH_ENV = "TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS"


def make_backend(config: FusionConfig | None = None, inductor_options: Mapping[str, Any] | None = None):
    """A Dynamo backend compiling with Inductor and the fusion pass configured by ``config``."""
    base_config = config or FusionConfig()
    base_options = dict(inductor_options or {})

    def backend(gm: torch.fx.GraphModule, example_inputs, *, mode: str | None = None,
                options: Mapping[str, Any] | None = None):
        config, patches = base_config, dict(base_options)
        if options:
            ours, rest = split_options(options)
            config = dataclasses.replace(base_config, **ours)
            patches.update(rest)
        if mode is not None:
            patches = {**torch._inductor.list_mode_options(mode), **patches}
        return compile_with_pass(gm, example_inputs, config, patches)

    backend.__name__ = "fx_fusion"
    return backend


def compile_with_pass(gm, example_inputs, config: FusionConfig, patches: Mapping[str, Any] | None = None):
    """``compile_fx`` with the fusion pass composed into ``post_grad_custom_post_pass``."""
    from torch._inductor.compile_fx import compile_fx

    patches = dict(patches or {})
    static_launch(patches, example_inputs)
    patches["post_grad_custom_post_pass"] = install(RopeKVFusionPass(config), patches.get(
        "post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass))
    caches_off = contextlib.nullcontext()
    if config.dump_dir is not None:
        # a cache hit skips post-grad passes, and so would skip the dump the user asked for
        patches["fx_graph_cache"] = False
        caches_off = torch._functorch.config.patch(enable_autograd_cache=False)
    with caches_off:
        return compile_fx(gm, example_inputs, config_patches=patches)


def prefer_static_launch() -> None:
    """On ``import fx_fusion``: have Inductor's compile workers launch user-defined Triton kernels (the fused
    kernel is one) through its static launcher, unless the environment already says otherwise.

    Inductor decides a kernel's launcher where it compiles it: in this process, under the compile's config
    patches (``static_launch``), or in its compile worker processes, which read their config from the
    environment they were started with and get only ``use_static_triton_launcher`` from this process. So
    torch's own variable is set here, before the first compile starts the workers. It then holds for every
    user-defined kernel the workers compile, ours or not, and in processes started from this one; kernels the static launcher cannot launch (launch
    attributes, unsupported argument types) fall back to Triton's launcher, and results are the same either
    way. Set it to 0 before the import to keep Triton's launcher. (The one place the package touches the
    environment: it hands torch's setting to torch's workers, it configures nothing of ours.)
    """
    global _static_launch_default, _workers_lack_static_launch
    set_by_user = STATIC_LAUNCH_ENV in os.environ
    _static_launch_default = os.environ.setdefault(STATIC_LAUNCH_ENV, "1") == "1"
    _workers_lack_static_launch = not set_by_user and _compile_workers_started()


_static_launch_default = True  # the variable's value at import (ours, "1", unless the user set it)
_workers_lack_static_launch = False  # the workers were already running when the import set the variable


def static_launch(patches: dict[str, Any], example_inputs) -> None:
    """Turn Inductor's static launch of user-defined Triton kernels on for this compile, unless ``patches``
    or the environment variable turn it off; warn once if the compile workers cannot follow."""
    global _workers_lack_static_launch
    if not hasattr(torch._inductor.config, STATIC_LAUNCH):
        return
    wanted = patches.setdefault(STATIC_LAUNCH, _static_launch_default)
    if wanted and _workers_lack_static_launch and any(
            isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs):
        _workers_lack_static_launch = False
        log.warning("Inductor's compile workers were started before fx_fusion was imported: fused kernels "
                    "compiled there use Triton's launcher, which costs more host time per call without CUDA "
                    "graphs. Import fx_fusion (or set %s=1) before the first torch.compile.", STATIC_LAUNCH_ENV)


def _compile_workers_started() -> bool:
    try:
        from torch._inductor.async_compile import AsyncCompile

        return AsyncCompile.process_pool.cache_info().currsize > 0
    except (ImportError, AttributeError):  # internals moved: we cannot tell, and say nothing
        return False


fx_fusion_backend = make_backend()
"""The backend behind ``backend="fx_fusion"`` (default config; ``options=`` overrides fields)."""


def register() -> None:
    """Register ``"fx_fusion"`` with Dynamo on ``import fx_fusion``.

    Skipped when already registered, and when Dynamo itself is loading our ``torch_dynamo_backends``
    entry point (it registers the loaded function right after this import).
    """
    from torch._dynamo.backends import registry

    if "fx_fusion" in registry._COMPILER_FNS or registry._BACKENDS.get("fx_fusion") is not None:
        return
    registry.register_backend(fx_fusion_backend, name="fx_fusion")
