"""The fused kernel compiles for NVIDIA (sm_90) in every configuration the GPU memcheck grid launches.

Triton compiles for CUDA targets without a GPU, so this runs in CI. A subprocess (without
``TRITON_INTERPRET``, so that ``@triton.jit`` yields a real ``JITFunction``) builds every case of
``tests/gpu/memcheck_kernel.py``'s full grid on CPU tensors, runs the real launcher with ``JITFunction.run``
patched to record the launch, specialises the arguments as a launch would (``test_hip_compile._specialise``)
and compiles each distinct specialisation for ``GPUTarget("cuda", 90, 32)``, through ptxas; every fourth case
also with the index checks the graph pass emits (``check_slots``/``check_positions``), compiled with assertions
as Inductor compiles the kernel it launches on CUDA. The grid holds the token, paged and sequence layouts; the
5-D ``paged_x`` layouts are compiled in ``test_hip_compile``'s configurations of them.

A configuration once failed to compile on the GPU machine's Triton (3.6: ``TritonGPURemoveLayoutConversions``
mis-assigned the layouts of the store mask; memcheck case 103) while the GPU tests and the memcheck smoke run
passed. Triton versions differ here: besides the installed Triton, the test compiles with every Triton
installed in the folders named by ``FX_FUSION_EXTRA_TRITON`` (``os.pathsep``-separated; ``.ci/run`` puts the
GPU machine's version there).

CI compiles a third of the grid (``-m slow``: all of it).

    python tests/kernels/test_cuda_compile.py            # compile the grid, print failures (no pytest)
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET = ("cuda", 90, 32)


def _record(case, seed: int, checked: bool = False):
    """(kernel, bound arguments, launch options) of the launcher's one launch for a memcheck case."""
    import torch

    from fx_fusion.kernels import rope_kv_cache as rkc
    from tests.gpu import memcheck_kernel as grid
    from tests.kernels.test_hip_compile import record_launch

    a = grid.build(case, "cpu", seed)
    p = rkc.prepare(a["q"], a["k"], a["v"], a["k_cache"], a["v_cache"], a["slot_mapping"], a["cos"], a["sin"],
                    a["positions"], a["swa_table"], a["k_scale"], a["v_scale"], is_neox=case.neox,
                    rotary_dim=case.rotary_dim, layout=case.layout, negative_wraps="wraps" in case.features,
                    check_slots=checked, check_positions=checked)
    q_out = torch.empty(p.q_shape, dtype=case.dtype)
    k_out = torch.empty(p.k_shape, dtype=case.dtype) if "return_k" in case.features else None
    return record_launch(lambda: rkc.launch(p, q_out, k_out))


# memcheck case 103 (index 102): the configuration Triton 3.6 once failed to compile
_KNOWN_FAILURE = 102


def compile_grid(third: bool = False) -> dict:
    """{"triton": version, "cases": N, "configs": distinct specialisations, "failures": [(case, error)]}.

    ``third``: every third case only, case 103 among them (CI's share; the whole grid is the slow test)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.gpu import memcheck_kernel as grid
    from tests.kernels.test_hip_compile import _specialise

    cases = grid.grid(smoke=False)
    kept = {seed for seed in range(len(cases)) if not third or seed % 3 == 0}
    assert _KNOWN_FAILURE in kept
    seen, failures = set(), []
    # every case as the op launches it, and every fourth also with the index checks the graph pass emits, compiled
    # with assertions as Inductor compiles its launches on CUDA (``debug``, no overflow checks)
    runs = [(seed, case, False) for seed, case in enumerate(cases)]  # the seeds the memcheck script gives them
    runs += [(seed, case, True) for seed, case in enumerate(cases) if seed % 4 == 0]
    def compile_once(name: str, fn, arguments: dict, options: dict) -> None:
        signature, constexprs, attrs = _specialise(fn, arguments)
        key = repr((sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                    sorted(attrs.items()), sorted(options.items())))
        if key in seen:
            return
        seen.add(key)
        try:
            triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGET), options=options)
        except Exception as e:  # noqa: BLE001 (every failure is reported, with its case)
            lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [repr(e)]
            failures.append((name, lines[0][:400]))

    for seed, case, checked in runs:
        if seed not in kept:
            continue
        fn, arguments, options = _record(case, seed, checked)
        if checked:
            options = dict(options, debug=True, sanitize_overflow=False)
        compile_once(f"case {seed + 1}{' (checked)' if checked else ''}: {case.describe()}", fn, arguments, options)
    # the 5-D layouts (paged_x*), which the memcheck grid does not hold: test_hip_compile's configurations of them
    from fx_fusion.kernels import rope_kv_cache as rkc
    from tests.kernels.test_hip_compile import CONFIGS, _make_args, record_launch

    for cfg in (c for c in CONFIGS if c.layout.startswith("paged_x")):
        p, q_out, k_out = _make_args(cfg)
        compile_once(f"test_hip_compile configuration {cfg.name}", *record_launch(lambda: rkc.launch(p, q_out, k_out)))
    return {"triton": triton.__version__, "cases": len(kept), "configs": len(seen), "failures": failures}


def _tritons() -> list[str | None]:
    """None (the installed Triton), then each folder of ``FX_FUSION_EXTRA_TRITON`` holding a ``triton``."""
    extra = [p for p in os.environ.get("FX_FUSION_EXTRA_TRITON", "").split(os.pathsep) if p]
    return [None, *(p for p in extra if (Path(p) / "triton").is_dir())]


def _run_subprocesses(tmp: Path, triton_paths: list, third: bool) -> list[dict]:
    """``compile_grid()`` in one subprocess per Triton, all at once (compiling is one core's work each)."""
    runs = []
    for i, triton_path in enumerate(triton_paths):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp / f"triton-cache-{i}")
        if triton_path is not None:
            env["PYTHONPATH"] = os.pathsep.join([triton_path, str(ROOT), env.get("PYTHONPATH", "")])
        out = tmp / f"result-{i}.pkl"
        third_arg = ["--third"] if third else []
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *third_arg, "--pickle", str(out)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs.append((proc, out))
    results = []
    for proc, out in runs:
        log, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the compile run failed:\n{log[-6000:]}")
        results.append(pickle.loads(out.read_bytes()))
    return results


@pytest.mark.parametrize("third", [pytest.param(True, id="third"),
                                   pytest.param(False, id="all", marks=pytest.mark.slow)])
def test_memcheck_grid_compiles_for_sm90(tmp_path, third):
    """CI compiles a third of the grid (every third case, case 103 among them: about a minute on two cores);
    ``-m slow`` all of it."""
    from tests.kernels.test_hip_compile import unavailable_reason

    reason = unavailable_reason("nvidia")
    if reason:
        pytest.skip(reason)
    results = _run_subprocesses(tmp_path, _tritons(), third)
    failures = []
    for result in results:
        print(f"Triton {result['triton']}: {result['configs']} distinct configurations of {result['cases']} cases")
        assert result["cases"] == (48 if third else 144) and result["configs"] > (20 if third else 50), result
        failures += [f"Triton {result['triton']}, {case}: {error}" for case, error in result["failures"]]
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the kernel must be a JITFunction")
    os.environ["TRITON_INTERPRET"] = "0"  # the memcheck script sets it to 1 on machines without a GPU
    sys.path.insert(0, str(ROOT))
    third = "--third" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--third"]
    result = compile_grid(third)
    if len(args) == 2 and args[0] == "--pickle":
        Path(args[1]).write_bytes(pickle.dumps(result))
    else:
        print(f"Triton {result['triton']}: {result['configs']} configurations of {result['cases']} cases, "
              f"{len(result['failures'])} failed")
        for case, error in result["failures"]:
            print(f"  {case}: {error}")
        sys.exit(1 if result["failures"] else 0)
