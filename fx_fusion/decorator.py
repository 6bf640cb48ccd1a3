"""``@fx_fusion.compile``: torch.compile with the fusion pass, as a decorator or a function."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from fx_fusion.backend import make_backend
from fx_fusion.config import FusionConfig, split_options


def compile(model: Callable | None = None, /, *, config: FusionConfig | None = None, **kwargs: Any):
    """Compile ``model`` (a module or function) with Inductor and the RoPE/KV-cache fusion pass.

    Usable as ``@fx_fusion.compile``, ``@fx_fusion.compile(dump_dir="dumps", min_tokens=2)`` or
    ``fx_fusion.compile(model)``. Keywords naming ``FusionConfig`` fields configure the pass (on top
    of ``config`` if given); ``options=`` holds Inductor config patches; every other keyword
    (``dynamic``, ``fullgraph``, ``mode``, ...) goes to ``torch.compile``.
    """
    ours, torch_kwargs = split_options(kwargs)
    config = dataclasses.replace(config or FusionConfig(), **ours)
    backend = make_backend(config, torch_kwargs.pop("options", None))

    def wrap(fn: Callable):
        return torch.compile(fn, backend=backend, **torch_kwargs)

    return wrap if model is None else wrap(model)
