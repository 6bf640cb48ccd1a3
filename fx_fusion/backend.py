"""``torch.compile(model, backend="fx_fusion")``: Inductor with the fusion pass installed.

Registered with Dynamo on ``import fx_fusion`` and, through the ``torch_dynamo_backends`` entry point,
as soon as the package is installed. ``options={...}`` may mix ``FusionConfig`` fields with Inductor
config patches; ``mode=`` maps to Inductor's mode options as with the default backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import torch

from fx_fusion.config import FusionConfig, split_options
from fx_fusion.fusion_pass import RopeKVFusionPass, install


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
    patches["post_grad_custom_post_pass"] = install(RopeKVFusionPass(config), patches.get(
        "post_grad_custom_post_pass", torch._inductor.config.post_grad_custom_post_pass))
    caches_off = contextlib.nullcontext()
    if config.dump_dir is not None:
        # a cache hit skips post-grad passes, and so would skip the dump the user asked for
        patches["fx_graph_cache"] = False
        caches_off = torch._functorch.config.patch(enable_autograd_cache=False)
    with caches_off:
        return compile_fx(gm, example_inputs, config_patches=patches)


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
