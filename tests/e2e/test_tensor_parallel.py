"""Tensor parallel on CPU: two gloo ranks under torchrun, both ways of writing the split, every layer fused.

``examples/tensor_parallel.py`` runs as a user runs it (``torchrun --nproc-per-node 2``). Each rank compiles
its shard with ``backend="fx_fusion"`` and compares its logits, tokens and whole KV pool (pre-filled with
random values) against the same shard run eagerly and against its heads of the unsharded model; here the
test also reads every rank's site reports from the dump directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
WORLD, LAYERS = 2, 2
TIMEOUT_S = 420

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(tmp_path: Path, *args: str) -> str:
    """Run the example on ``WORLD`` local ranks; every process is killed if it overruns ``TIMEOUT_S``.

    The rendezvous store binds port 0 on 127.0.0.1 (the OS picks a free port, no race with other runs) and
    the ranks share it for their process group.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the example must set it itself on CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--nnodes=1",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=0",
           str(ROOT / "examples" / "tensor_parallel.py"), "--device", "cpu", "--layers", str(LAYERS),
           "--dump-dir", str(tmp_path / "dump"), *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group: the ranks die with it
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{out[-6000:]}"
    return out


def test_tensor_parallel_both_variants(tmp_path):
    out = torchrun(tmp_path, "--variant", "both")
    assert f"OK: all {WORLD} ranks fused {LAYERS} of {LAYERS} layers in every graph and match eager (both)" in out
    for variant in ("plain", "dtensor"):
        for rank in range(WORLD):
            assert re.search(rf"^\[rank {rank}\] {variant}: fused sites per graph \[{LAYERS}, {LAYERS}\] "
                             rf"\(of {LAYERS} layers\), all_reduce nodes per graph \[{2 * LAYERS}, {2 * LAYERS}\]",
                             out, re.M), out
            assert re.search(rf"^\[rank {rank}\] {variant}: OK: tokens, logits and this rank's KV pool match",
                             out, re.M), out
            # the pass's own reports: a prefill and a decode graph per rank, one fused site per layer in each
            reports = sorted((tmp_path / "dump" / variant / f"rank{rank}").glob("graph_*.report.json"))
            assert [p.name for p in reports] == ["graph_000.report.json", "graph_001.report.json"], reports
            for path in reports:
                sites = json.loads(path.read_text())["sites"]
                assert len(sites) == LAYERS and all(s["fused"] for s in sites), (path, sites)
                assert {(s["layout"], s["style"], s["rotary_dim"]) for s in sites} == {("token", "neox", 16)}
                after = path.with_name(path.name.replace(".report.json", ".after.py")).read_text()
                # the collectives are in the graph the pass rewrote, between the fused layers
                assert after.count("_c10d_functional.all_reduce.default(") == 2 * LAYERS
                assert after.count("_c10d_functional.wait_tensor.default(") == 2 * LAYERS
    assert "MISMATCH" not in out and "NOT fused" not in out
