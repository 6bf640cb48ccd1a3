"""Never silent: the WARNING line after a graph with a site left unfused, the per-site lines of
``TORCH_LOGS=fx_fusion``, each site's layer, ``fx_fusion.collect_reports()``, and training-graph compiles.

Each test reads what a user would: the ``fx_fusion`` logger's records (caplog), a subprocess's stderr, the
reports handed to code.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fx_fusion
from fx_fusion.report import AUTOGRAD_REASON, module_path
from tests.attention_blocks import Perturbation, make_block, make_inputs

REPO = Path(__file__).resolve().parents[2]
NOT_A_ROPE = Perturbation(cos_scale=1.5)  # a scale on one table only: not a rotation (README "Not matched")


class Decoder(nn.Module):
    """SGLang blocks one after another, as ``model.layers.N``; each block has its own caches."""

    def __init__(self, *perturbs: Perturbation, form: str = "sglang"):
        super().__init__()
        self.layers = nn.ModuleList([make_block(form, seed=i, perturb=p) for i, p in enumerate(perturbs)])

    def forward(self, positions, hidden, loc, kv_loc):
        for layer in self.layers:
            hidden = hidden + layer(positions, hidden, loc, kv_loc)
        return hidden


class Model(nn.Module):
    def __init__(self, *perturbs: Perturbation):
        super().__init__()
        self.model = Decoder(*perturbs)

    def forward(self, *args):
        return self.model(*args)


def caches(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers() if name.endswith(("k_buffer", "v_buffer"))}


def run(model: nn.Module, steps=((5, 0),), grad: bool = False, **options):
    """Compile ``model`` with fx_fusion and run ``steps`` ((tokens, past), ...); check every output and whole
    cache against eager on a copy; return the reports of the graphs compiled."""
    import copy

    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    context = torch.enable_grad() if grad else torch.no_grad()
    with context, torch._inductor.config.patch(fx_graph_cache=False), fx_fusion.collect_reports() as reports:
        compiled = fx_fusion.compile(model, **options)
        for tokens, past in steps:
            args = make_inputs(model.model.layers[0], tokens, past=past, seed=tokens + past)
            torch.testing.assert_close(compiled(*args), eager(*args), rtol=1e-5, atol=1e-5)
            for (name, got), want in zip(caches(model).items(), caches(eager).values()):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    torch._dynamo.reset()
    return reports


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fx_fusion" and r.levelno >= logging.WARNING]


def test_one_warning_line_for_a_graph_with_an_unfusable_site(caplog):
    with caplog.at_level(logging.INFO, logger="fx_fusion"):
        (report,) = run(Model(Perturbation(), NOT_A_ROPE, Perturbation()))
    (line,) = warnings_of(caplog)
    assert line.startswith("fx_fusion: graph 0/0: 2 of 3 RoPE -> KV-cache store sites fused, 1 NOT fused; "
                           "first: model.layers.1 (attention_blocks.py:")
    assert "stores a RoPE-like value that is not a RoPE the fused op computes" in line
    assert "TORCH_LOGS=fx_fusion" in line and "dump_dir" in line and "fx_fusion.collect_reports()" in line
    assert line == report.summary() and len(report.unfused) == 1


def test_no_warning_when_every_site_fused(caplog):
    with caplog.at_level(logging.INFO, logger="fx_fusion"):
        (report,) = run(Model(Perturbation(), Perturbation()))
    assert warnings_of(caplog) == []
    infos = [r.getMessage() for r in caplog.records if r.name == "fx_fusion" and r.levelno == logging.INFO]
    assert "fx_fusion: graph 0/0: 2 of 2 RoPE -> KV-cache store sites fused" in infos
    assert [s.layer for s in report.fused] == ["model.layers.0", "model.layers.1"]


def test_the_default_logging_shows_the_warning_and_nothing_else():
    """No logging set up at all (a new user's script): the WARNING line reaches stderr, the INFO lines do not."""
    script = textwrap.dedent("""
        import torch, fx_fusion
        from tests.fx_fusion.test_report import Model, NOT_A_ROPE, Perturbation
        from tests.attention_blocks import make_inputs
        for perturbs in ((Perturbation(),), (NOT_A_ROPE,)):
            m = Model(*perturbs)
            torch._dynamo.reset()
            with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
                torch.compile(m, backend="fx_fusion")(*make_inputs(m.model.layers[0], 5))
    """)
    err = _python(script, {})
    lines = [line for line in err.splitlines() if "fx_fusion" in line]
    assert len(lines) == 1 and "0 of 1 RoPE -> KV-cache store sites fused, 1 NOT fused" in lines[0], err


def test_sites_left_out_by_the_config_do_not_warn(caplog):
    """min_tokens=2 turns the decode step's site off: the user's choice, counted at INFO, no WARNING."""
    with caplog.at_level(logging.INFO, logger="fx_fusion"):
        prefill, decode = run(Model(Perturbation()), steps=((5, 0), (1, 5)), min_tokens=2)
    assert warnings_of(caplog) == []
    assert decode.summary() == "fx_fusion: graph 0/1: 0 of 1 RoPE -> KV-cache store sites fused, 1 left out by the config"
    assert decode.disabled[0].reason.startswith("1 tokens is outside [2, None]") and not decode.unfused
    assert [len(prefill.fused), len(decode.fused)] == [1, 0]


def test_collect_reports_hands_every_site_to_code():
    with fx_fusion.collect_reports() as outer:
        reports = run(Model(NOT_A_ROPE, Perturbation()))
    assert outer == reports and len(reports) == 1 and isinstance(reports[0], fx_fusion.GraphReport)
    sites = reports[0].sites
    assert [(s.layer, s.fused) for s in sites] == [("model.layers.1", True), ("model.layers.0", False)] or \
        sorted((s.layer, s.fused) for s in sites) == [("model.layers.0", False), ("model.layers.1", True)]
    (unfused,) = reports[0].unfused
    assert unfused.layer == "model.layers.0" and "attention_blocks.py" in unfused.source and unfused.reason
    # outside the block nothing is collected
    after = run(Model(Perturbation()))
    assert len(after) == 1 and len(outer) == 1


def test_the_layer_is_in_the_dump_and_the_inspect_table(tmp_path, capsys):
    import json

    from fx_fusion.__main__ import main

    run(Model(Perturbation(), NOT_A_ROPE), dump_dir=tmp_path)
    report = json.loads((tmp_path / "graph_000.report.json").read_text())
    assert sorted(s["layer"] for s in report["sites"]) == ["model.layers.0", "model.layers.1"]
    assert "in model.layers.1 at" in (tmp_path / "graph_000.report.txt").read_text()
    assert main(["inspect", str(tmp_path), "--draw", "--renderer", "text"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("graph_000")]
    assert sorted((r[5], r[6]) for r in rows) == [("no", "model.layers.1"), ("yes", "model.layers.0")]
    unfused_index = [s["fused"] for s in report["sites"]].index(False)
    picture = (tmp_path / "pictures" / f"graph_000.site{unfused_index}.before.txt").read_text()
    assert picture.startswith(f"graph_000 site {unfused_index} (model.layers.1) before the fx_fusion pass")
    store = report["sites"][unfused_index]["store"]
    (store_line,) = [line for line in picture.splitlines() if line.split()[0] == store]
    assert store_line.endswith("<== site (not fused)")


def test_torch_logs_prints_one_line_per_site():
    script = textwrap.dedent("""
        import torch, fx_fusion
        from tests.fx_fusion.test_report import Model, NOT_A_ROPE, Perturbation
        from tests.attention_blocks import make_inputs
        m = Model(Perturbation(), NOT_A_ROPE, Perturbation())
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
            torch.compile(m, backend="fx_fusion")(*make_inputs(m.model.layers[0], 5))
    """)
    runs = [_start_python(script, {"TORCH_LOGS": setting}) for setting in ("fx_fusion", "+fx_fusion")]  # at once
    for run in runs:
        err = _finish(run)
        sites = [line for line in err.splitlines() if " site " in line and "fx_fusion: graph 0/0 site" in line]
        assert len(sites) == 3, err
        assert sum("NOT fused: model.layers.1 " in line for line in sites) == 1
        assert sum("/3 fused: model.layers." in line for line in sites) == 2
        assert sum("2 of 3 RoPE -> KV-cache store sites fused, 1 NOT fused" in line for line in err.splitlines()) == 1


def _python(script: str, env: dict[str, str]) -> str:
    return _finish(_start_python(script, env))


def _start_python(script: str, env: dict[str, str]) -> subprocess.Popen:
    import os

    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), **env})


def _finish(proc: subprocess.Popen) -> str:
    """The script's stderr, once it has ended (within 10 minutes) with status 0."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


@pytest.mark.parametrize("stack, path", [
    ({"a": ("L['self'].model.layers[3].self_attn", object)}, "model.layers.3.self_attn"),
    ({"a": ("L['self'].model", object), "b": ("L['self'].model.layers.0", object)}, "model.layers.0"),
    ({"a": ("L['self']._modules['layers']._modules['12']", object)}, "layers.12"),
    ({"a": ("L['model'].layers['2'].attn", object)}, "model.layers.2.attn"),
    ({"a": ("L['self']", nn.Linear)}, "Linear"),
    ({"a": ("getattr(L['self'], 'x')", object)}, "getattr(L['self'], 'x')"),
    ({}, None),
    (None, None),
])
def test_module_path(stack, path):
    assert module_path(stack) == path


# ---- training-graph compiles ---------------------------------------------------------------------


def test_a_training_graph_says_how_to_fuse(caplog):
    """Parameters require grad and no torch.no_grad(): AOTAutograd writes the caches outside the graph (the
    forward returns the new caches and its runtime wrapper copies them back), so nothing can be fused there.
    One WARNING line with the sentence that says what to do; outputs and caches equal eager (fp32, CPU)."""
    model = Model(Perturbation(), Perturbation())
    assert all(p.requires_grad for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="fx_fusion"):
        (report,) = run(model, steps=((5, 0), (1, 5)), grad=True, dynamic=False)[:1]
    assert all(s.reason == AUTOGRAD_REASON and not s.fused for s in report.sites) and len(report.sites) == 2
    assert sorted(s.layer for s in report.sites) == ["model.layers.0", "model.layers.1"]
    lines = warnings_of(caplog)
    assert len(lines) >= 1 and all(AUTOGRAD_REASON in line for line in lines)
    assert lines[0].startswith("fx_fusion: graph 0/0: 0 of 2 RoPE -> KV-cache store sites fused, 2 NOT fused")
    assert sum(line.startswith("fx_fusion: graph 0/0:") for line in lines) == 1  # once per compiled graph


def test_a_training_graph_with_no_grad_inside_still_fuses():
    """The same model under torch.no_grad(): the writes are in the graph and fuse."""
    (report,) = run(Model(Perturbation(), Perturbation()))
    assert len(report.fused) == 2
