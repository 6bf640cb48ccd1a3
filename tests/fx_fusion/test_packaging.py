"""What ``pip install fx-fusion`` puts on ``sys.path``: one top-level package, ``fx_fusion``.

The repository keeps ``kernels/`` and ``patterns/`` as top-level folders; they install as
``fx_fusion.kernels`` and ``fx_fusion.patterns``. Top-level ``kernels`` and ``patterns`` are unrelated
PyPI packages (Hugging Face's kernel hub, which transformers imports when present, is ``kernels``):
installing beside them must not overwrite their files or shadow them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    setuptools = pytest.importorskip("setuptools")
    # setuptools >= 70.1 builds wheels by itself: use it as installed; else pip fetches a build backend
    own = tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fx_fusion", "kernels", "patterns"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *(["--no-build-isolation"] * own), "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("fx_fusion-*.whl")
    return path


def test_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fx_fusion"}, sorted(top)
    for module in ("fx_fusion/__init__.py", "fx_fusion/kernels/__init__.py", "fx_fusion/kernels/ops.py",
                   "fx_fusion/kernels/rope_kv_cache.py", "fx_fusion/kernels/rope_kv_kernel.py",
                   "fx_fusion/kernels/problem.py", "fx_fusion/kernels/launch.py", "fx_fusion/kernels/reference.py",
                   "fx_fusion/patterns/__init__.py", "fx_fusion/patterns/rope_kv_store.py"):
        assert module in names, module
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level is not None:
        with zipfile.ZipFile(wheel) as zf:
            assert zf.read(top_level).decode().split() == ["fx_fusion"]


def test_wheel_carries_the_license_and_the_tested_ranges(wheel):
    """The LICENSE file the metadata names ships in the wheel; torch and triton are bounded by the tested ranges."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
        licenses = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
        assert licenses and zf.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
    assert "Apache-2.0" in text
    requires = {line.split(":", 1)[1].strip().replace(" ", "") for line in text.splitlines()
                if line.startswith("Requires-Dist:")}
    assert {"torch<2.14,>=2.11", "triton<3.10,>=3.6"} <= requires, sorted(requires)


def test_installed_wheel_imports_only_under_fx_fusion(wheel, tmp_path):
    """Installed alone (outside the checkout), the wheel gives fx_fusion.kernels/.patterns and no top-level ones."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import importlib.util, fx_fusion, fx_fusion.kernels, fx_fusion.patterns, torch\n"
        "from fx_fusion.fusion_pass import _source_hash\n"
        "assert fx_fusion.__file__.startswith(SITE), fx_fusion.__file__\n"
        "assert fx_fusion.kernels.__file__.startswith(SITE), fx_fusion.kernels.__file__\n"
        # no top-level kernels/patterns from the wheel (transformers 5.x installs a PyPI 'kernels' of its own)
        "for name in ('kernels', 'patterns'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    assert spec is None or not (spec.origin or '').startswith(SITE), spec\n"
        "assert hasattr(torch.ops.fx_fusion, 'rope_kv_store')\n"
        "_source_hash()\n"
        "print('ok')\n"
    )
    # -S: no site-packages processing, so the checkout's editable install (a .pth finder) is not active;
    # the dependencies come from site-packages given as a plain path, after the wheel's target
    import torch

    deps = str(Path(torch.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), deps]), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-S", "-c", f"SITE = {str(site)!r}\n" + code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
