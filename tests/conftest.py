"""Shared fixtures: a device, a seed per test, and the Triton interpreter on machines without a GPU.

``TRITON_INTERPRET`` must be set before the kernels module is imported (Triton reads it when the
``@triton.jit`` decorator runs), so it is set here, at collection time, when no CUDA device exists.
"""

import importlib
import importlib.util
import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch._inductor.graph import GraphLowering

ROOT = Path(__file__).resolve().parent.parent


def _import_installed(name: str) -> None:
    """Import the installed top-level package ``name``, not the repository's folder of that name.

    The repository's ``kernels/`` folder (installed as ``fx_fusion.kernels``) has the name of the PyPI package
    ``kernels``, which transformers 5.x depends on and imports; with the repository root on ``sys.path`` (``python
    -m pytest`` puts it there, and the tests import ``tests.*``), ``import kernels`` would find the folder. Importing
    the installed package first, with the root off the path, puts it in ``sys.modules`` for everyone after.
    """
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
    try:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    finally:
        sys.path[:] = saved


_import_installed("kernels")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Floating-point contraction (a * b + c as one FMA) in kernels Triton compiles (the GPU, and the sm_90 / gfx9
# compile tests): on, as every Triton up to 3.9 does by default and as the GPU results in README's "Exactness"
# were measured. Triton 3.10 turns the default off; pinned here so the tests see one behaviour. The interpreter
# never contracts (CPU results are eager's).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

HAS_GPU = torch.cuda.is_available()

# README's quick command (``-m "not slow and not full"``, a few minutes on two cores) runs the kernel, op and pass
# unit tests; these modules run in the full suite only (each a minute or more there: model zoos, every cache
# form, compile grids for sm_90 and gfx9, property tests, the examples, packaging).
FULL_ONLY = frozenset({
    "e2e/test_examples.py", "e2e/test_hf_models.py", "e2e/test_tensor_parallel.py",
    "fx_fusion/test_cli.py", "fx_fusion/test_packaging.py", "fx_fusion/test_report.py",
    "kernels/test_cuda_compile.py", "kernels/test_hip_compile.py",
    "patterns/test_cache_forms.py", "patterns/test_fp8_store.py", "patterns/test_near_miss_properties.py",
    "patterns/test_reference_forms.py", "patterns/test_regressions.py", "patterns/test_scaled_tables.py",
})
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.relative_to(TESTS).as_posix() in FULL_ONLY:
            item.add_marker(pytest.mark.full)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def codes(monkeypatch) -> list[str]:
    """Inductor's output code of every graph compiled (or loaded from the FX graph cache) during the test.

    The hook ``run_and_get_code`` uses, without its ``torch._dynamo.reset()`` (which would recompile
    every step and hide recompilations).
    """
    out: list[str] = []
    monkeypatch.setattr(GraphLowering, "save_output_code", out.append)
    return out
