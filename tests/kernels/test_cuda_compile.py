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

CI compiles a sixth of the grid (``-m slow``: all of it).

QK-norm and fp8 q, which the grid does not hold either, and the MLA kernel: ``test_hip_compile.NORM_CONFIGS`` and
``MLA_CONFIGS`` compiled for sm_90 with the installed Triton, each checked for no spills and no stack frame (local
memory) in ``ptxas -v``'s report; its registers give the occupancy (``sm90_occupancy``). A ``-k`` selection compiles
only the selected configurations.

    python tests/kernels/test_cuda_compile.py            # compile the grid, print failures (no pytest)
    python tests/kernels/test_cuda_compile.py --configs --table   # SM90_CONFIGS' registers, spills, occupancy
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from tests.kernels.test_hip_compile import MLA_CONFIGS, NORM_CONFIGS, selected_configs  # noqa: E402

# compiled for sm_90 and checked for spills and local memory: QK-norm and fp8 q, and the MLA kernel's configurations
SM90_CONFIGS = NORM_CONFIGS + MLA_CONFIGS

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
CI_STRIDE = 6  # CI compiles every sixth case of the grid (case index 102, the known failure, among them)


def compile_grid(ci_share: bool = False) -> dict:
    """{"triton": version, "cases": N, "configs": distinct specialisations, "failures": [(case, error)]}.

    ``ci_share``: every ``CI_STRIDE``-th case only, case 103 among them (the whole grid is the slow test)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.gpu import memcheck_kernel as grid
    from tests.kernels.test_hip_compile import _specialise

    cases = grid.grid(smoke=False)
    kept = {seed for seed in range(len(cases)) if not ci_share or seed % CI_STRIDE == 0}
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


def sm90_occupancy(regs: int, num_warps: int, shared: int = 0) -> int:
    """Resident warps per SM on sm_90 (at most 64) of a kernel using ``regs`` registers per thread, as the CUDA
    occupancy calculator counts them: 64K registers per SM, allocated per warp in units of 256 (``regs * 32`` rounded
    up to 256), whole blocks of ``num_warps`` warps, at most 32 blocks and 64 warps per SM, and 228 KiB of shared
    memory per SM with 1 KiB reserved per block."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(65536 // per_warp // num_warps, 32, 64 // num_warps)
    if shared:
        blocks = min(blocks, 228 * 1024 // (shared + 1024))
    return blocks * num_warps


def _ptxas_stats(log: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v``'s report of the kernel."""
    used = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if used is None or frame is None:
        raise RuntimeError(f"no register or stack frame report in ptxas' output:\n{log}")
    return dict(regs=int(used.group(1)), stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                spill_loads=int(frame.group(3)))


def compile_configurations(names=None) -> dict:
    """{config name: ptxas' registers, stack and spill bytes, shared memory, warps, occupancy and the compile's wall
    time} for ``test_hip_compile.NORM_CONFIGS`` (those named in ``names``; None: all), launched as on an NVIDIA GPU:
    the launcher records the fp8 casts' codes of a CUDA device (on CPU tensors it would give the CPU's)."""
    import time

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fx_fusion.kernels import launch as launch_module
    from tests.kernels.test_hip_compile import _specialise, launcher, record_launch

    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed
    triton.knobs.compilation.always_compile = True  # (a cached kernel would skip ptxas)
    eager_fp8_cast, by_conversion = launch_module.eager_fp8_cast, launch_module._by_conversion
    out = {}
    for cfg in (c for c in SM90_CONFIGS if names is None or c.name in names):
        launch = launcher(cfg)
        launch_module.eager_fp8_cast = lambda device, dtype: eager_fp8_cast(torch.device("cuda"), dtype)
        launch_module._by_conversion = lambda code, device: 4 if code == 2 else code  # as on an sm_90 GPU
        try:
            fn, arguments, options = record_launch(launch)
        finally:
            launch_module.eager_fp8_cast, launch_module._by_conversion = eager_fp8_cast, by_conversion
        log = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, *_specialise(fn, arguments)), target=GPUTarget(*TARGET),
                                      options=options)
        seconds = time.perf_counter() - start
        stats = _ptxas_stats(log.getvalue())
        warps = compiled.metadata.num_warps
        out[cfg.name] = stats | dict(shared=compiled.metadata.shared, num_warps=warps, seconds=seconds,
                                     occupancy=sm90_occupancy(stats["regs"], warps, compiled.metadata.shared),
                                     fp8_cvt=compiled.asm["ptx"].count("cvt.rn.satfinite.e4m3x2"),
                                     sass=sass_instructions(compiled.asm["cubin"]))
    return out


def sass_instructions(cubin: bytes) -> int | None:
    """Machine instructions in the kernel (every path counted once, not as executed), from the disassembler Triton
    ships (``cuobjdump``); None where it is missing. A static count: the same code path per element in two builds
    compares, a branch taken or not does not show."""
    try:
        from triton.tools.disasm import get_sass

        sass = get_sass(cubin)
    except Exception:  # noqa: BLE001 (a Triton without its CUDA tools: the column stays empty)
        return None
    return sum(1 for line in sass.splitlines() if re.match(r"^\S*\t(@!?U?P\w+\s+)?[A-Z]", line))


def markdown_table(stats: dict) -> str:
    lines = ["| config | registers | stack frame | spill stores / loads | shared | warps | warps per SM (of 64) "
             "| SASS instructions | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for cfg in SM90_CONFIGS:
        if (s := stats.get(cfg.name)) is not None:
            lines.append(f"| {cfg.name} | {s['regs']} | {s['stack']} | {s['spill_stores']} / {s['spill_loads']} | "
                         f"{s['shared']} | {s['num_warps']} | {s['occupancy']} | {s['sass']} | {s['seconds']:.1f} |")
    return "\n".join(lines)


def _tritons() -> list[str | None]:
    """None (the installed Triton), then each folder of ``FX_FUSION_EXTRA_TRITON`` holding a ``triton``."""
    extra = [p for p in os.environ.get("FX_FUSION_EXTRA_TRITON", "").split(os.pathsep) if p]
    return [None, *(p for p in extra if (Path(p) / "triton").is_dir())]


def _run_subprocesses(tmp: Path, triton_paths: list, ci_share: bool) -> list[dict]:
    """``compile_grid()`` in one subprocess per Triton, all at once (compiling is one core's work each)."""
    runs = []
    for i, triton_path in enumerate(triton_paths):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp / f"triton-cache-{i}")
        if triton_path is not None:
            env["PYTHONPATH"] = os.pathsep.join([triton_path, str(ROOT), env.get("PYTHONPATH", "")])
        out = tmp / f"result-{i}.pkl"
        share_arg = ["--ci-share"] if ci_share else []
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *share_arg, "--pickle", str(out)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs.append((proc, out))
    results = []
    for proc, out in runs:
        log, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the compile run failed:\n{log[-6000:]}")
        results.append(pickle.loads(out.read_bytes()))
    return results


@pytest.mark.parametrize("ci_share", [pytest.param(True, id="ci-share"),
                                      pytest.param(False, id="all", marks=pytest.mark.slow)])
def test_memcheck_grid_compiles_for_sm90(tmp_path, ci_share):
    """CI compiles a sixth of the grid (every sixth case, case 103 among them: about half a minute on two
    cores); ``-m slow`` all of it."""
    from tests.kernels.test_hip_compile import unavailable_reason

    reason = unavailable_reason("nvidia")
    if reason:
        pytest.skip(reason)
    results = _run_subprocesses(tmp_path, _tritons(), ci_share)
    failures = []
    for result in results:
        print(f"Triton {result['triton']}: {result['configs']} distinct configurations of {result['cases']} cases")
        assert result["cases"] == (144 // CI_STRIDE if ci_share else 144), result
        assert result["configs"] > (30 if ci_share else 50), result
        failures += [f"Triton {result['triton']}, {case}: {error}" for case, error in result["failures"]]
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def sm90_stats(tmp_path_factory, request) -> dict:
    from tests.kernels.test_hip_compile import unavailable_reason

    reason = unavailable_reason("nvidia")
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    out = tmp / "stats.pkl"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--configs", "--pickle", str(out),
                           *(selected_configs(request) or ())], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling for sm_90 failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return pickle.loads(out.read_bytes())


@pytest.mark.parametrize("cfg", SM90_CONFIGS, ids=[c.name for c in SM90_CONFIGS])
def test_no_spills_no_local_memory_sm90(sm90_stats, cfg):
    s = sm90_stats[cfg.name]
    print(f"{cfg.name} sm_90: {s}")
    assert s["spill_stores"] == 0 and s["spill_loads"] == 0, s
    assert s["stack"] == 0, s
    assert 0 < s["regs"] <= 255 and s["occupancy"] > 0, s


EAGER_FP8_CONFIGS = [c for c in SM90_CONFIGS if getattr(c, "q_fp8", False) or getattr(c, "cache", None) == "uint8"]


@pytest.mark.parametrize("cfg", EAGER_FP8_CONFIGS, ids=[c.name for c in EAGER_FP8_CONFIGS])
def test_eager_fp8_casts_use_the_conversion_instruction_sm90(sm90_stats, cfg):
    """On sm_89 and later the launcher asks for eager's e4m3fn bits from the conversion instruction (FP8_CAST 4,
    ``launch._by_conversion``), not from integer arithmetic; the GPU rounding tests check its bits."""
    assert sm90_stats[cfg.name]["fp8_cvt"] > 0, sm90_stats[cfg.name]


def test_sm90_occupancy():
    """The calculator's counts: 32 registers fill the SM, 48 leave 10 blocks of 4 warps, 255 one block; shared
    memory limits the blocks too."""
    assert sm90_occupancy(32, 4) == 64
    assert sm90_occupancy(40, 4) == 48  # 1280 registers a warp: 51 warps, 12 blocks
    assert sm90_occupancy(48, 4) == 40
    assert sm90_occupancy(255, 4) == 8
    assert sm90_occupancy(32, 4, shared=56 * 1024) == 16  # 228 KiB / 57 KiB: 4 blocks
    assert sm90_occupancy(16, 1) == 32  # 32 blocks at most


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the kernel must be a JITFunction")
    os.environ["TRITON_INTERPRET"] = "0"  # the memcheck script sets it to 1 on machines without a GPU
    sys.path.insert(0, str(ROOT))
    if "--configs" in sys.argv:  # --configs (--table | --pickle OUT) [configuration names]
        args = [a for a in sys.argv[1:] if a != "--configs"]
        if args[:1] == ["--table"]:
            print(markdown_table(compile_configurations(args[1:] or None)))
        elif args[:1] == ["--pickle"] and len(args) >= 2:
            Path(args[1]).write_bytes(pickle.dumps(compile_configurations(args[2:] or None)))
        else:
            sys.exit(f"usage: {sys.argv[0]} --configs (--table | --pickle OUT) [names]")
        sys.exit(0)
    ci_share = "--ci-share" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--ci-share"]
    result = compile_grid(ci_share)
    if len(args) == 2 and args[0] == "--pickle":
        Path(args[1]).write_bytes(pickle.dumps(result))
    else:
        print(f"Triton {result['triton']}: {result['configs']} configurations of {result['cases']} cases, "
              f"{len(result['failures'])} failed")
        for case, error in result["failures"]:
            print(f"  {case}: {error}")
        sys.exit(1 if result["failures"] else 0)
