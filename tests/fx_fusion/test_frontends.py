"""The ways in: ``backend="fx_fusion"`` (import or entry point), ``options=``/``mode=``, ``@fx_fusion.compile``,
``FusionConfig`` validation, the pass's ``uuid()`` and the FX graph cache, ``install()`` and the counters.

Whether a compile fused is read from ``torch._dynamo.utils.counters["fx_fusion"]`` and from Inductor's
output code (``GraphLowering.save_output_code``, the hook ``run_and_get_code`` uses), so these tests go
through the public entry points without patching the pass.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import fx_fusion
import fx_fusion.backend as fx_backend
from fx_fusion import CacheLayout, FusionConfig, OnUnfusable, RopeKVFusionPass, RopeStyle
from fx_fusion.fusion_pass import ComposedPass, install
from fx_fusion.patterns import FUSED_OP
from tests.attention_blocks import make_block, prefill_inputs

REPO = Path(__file__).resolve().parents[2]
FUSED_CALL = "torch.ops.fx_fusion.rope_kv_store.default("


@pytest.fixture
def fresh():
    """No autograd, no FX graph cache (a hit would skip the pass), fresh Dynamo and counters."""
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        yield counters["fx_fusion"]
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def block():
    return make_block("sglang")


def fused_delta(stats, before: dict) -> tuple[int, int]:
    return (stats["rope_kv_store_fused"] - before.get("rope_kv_store_fused", 0),
            stats["rope_kv_store_not_fused"] - before.get("rope_kv_store_not_fused", 0))


class CacheSalt(CustomGraphPass):
    """A no-op pre pass with a fresh ``uuid()``: FX graph cache keys no earlier run can have written.

    (Cheaper than a fresh cache directory, which would also recompile every C++ kernel.)
    """

    def __init__(self):
        self.salt = uuid.uuid4().hex

    def __call__(self, graph):
        pass

    def uuid(self):
        return self.salt


class CountingPass(CustomGraphPass):
    """A user's own post-grad pass: counts calls and whether our fused op was already in the graph."""

    def __init__(self, tag: str = "user"):
        self.tag, self.calls, self.saw_fused = tag, 0, []

    def __call__(self, graph):
        self.calls += 1
        self.saw_fused.append(any(n.op == "call_function" and n.args and n.args[0] is FUSED_OP for n in graph.nodes))

    def uuid(self):
        return f"counting-pass-{self.tag}"


# ------------------------------------------------------------------------------------------------
# backend="fx_fusion"
# ------------------------------------------------------------------------------------------------


def test_backend_by_name_after_import(block, fresh, codes):
    assert "fx_fusion" in torch._dynamo.list_backends()
    out = torch.compile(block, backend="fx_fusion")(*prefill_inputs(block))
    assert out.shape == (5, block.hidden_size)
    assert fresh["graphs"] == 1 and fresh["rope_kv_store_fused"] == 1 and fresh["rope_kv_store_not_fused"] == 0
    assert fresh["pass_us"] > 0
    assert len(codes) == 1 and codes[0].count(FUSED_CALL) == 1


def _installed_entry_points():
    return [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "fx_fusion"]


def test_entry_point_is_installed():
    eps = _installed_entry_points()
    if not eps:
        pytest.skip("the fx-fusion package is not installed (running from a source tree without `pip install -e .`)")
    (ep,) = eps
    assert ep.value == "fx_fusion.backend:fx_fusion_backend"
    assert ep.load() is fx_backend.fx_fusion_backend


def _declared_entry_point_dist(root: Path) -> Path:
    """A ``.dist-info`` holding the ``torch_dynamo_backends`` entry point that pyproject.toml declares."""
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    lines = "".join(f"{k} = {v}\n" for k, v in declared["torch_dynamo_backends"].items())
    dist = root / "fx_fusion_source_tree-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fx-fusion-source-tree\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[torch_dynamo_backends]\n{lines}")
    return root


SUBPROCESS_COMPILE = textwrap.dedent("""
    import json, sys
    import torch
    from tests.attention_blocks import make_block, prefill_inputs

    assert "fx_fusion" not in sys.modules, "imported before the compile"
    block = make_block("sglang")
    with torch.no_grad():
        out = torch.compile(block, backend="fx_fusion")(*prefill_inputs(block))
    from torch._dynamo.utils import counters
    print("RESULT " + json.dumps({"counters": dict(counters["fx_fusion"]), "loaded": "fx_fusion" in sys.modules,
                                  "shape": list(out.shape)}))
""")


@pytest.mark.full  # a subprocess or a property run: the full suite only (README's quick command skips it)
def test_backend_by_name_without_import_through_the_entry_point(tmp_path):
    """A fresh interpreter that never imports fx_fusion: Dynamo finds the backend by its entry point.

    When the package is not installed, the entry point declared in pyproject.toml is exposed through a
    ``.dist-info`` on PYTHONPATH (what ``pip install -e .`` would write), so the declared target is tested.
    """
    path = [str(REPO)]
    if not _installed_entry_points():
        path.insert(0, str(_declared_entry_point_dist(tmp_path / "site")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]),
           # a cache hit would skip the pass and its counters
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS_COMPILE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["loaded"] and result["shape"] == [5, 64]
    assert result["counters"]["graphs"] == 1 and result["counters"]["rope_kv_store_fused"] == 1


def test_options_mix_config_fields_and_inductor_keys(block, fresh, codes, tmp_path):
    user_pre_pass = CountingPass("pre")
    options = {"min_tokens": 8, "styles": ["neox"], "dump_dir": str(tmp_path),  # FusionConfig fields
               "post_grad_custom_pre_pass": user_pre_pass}  # an Inductor key
    torch.compile(block, backend="fx_fusion", options=options)(*prefill_inputs(block))
    assert user_pre_pass.calls == 1
    assert fresh["graphs"] == 1 and fresh["rope_kv_store_not_fused"] == 1 and FUSED_CALL not in codes[0]
    (report,) = tmp_path.glob("graph_*.report.json")
    (site,) = json.loads(report.read_text())["sites"]
    assert "5 tokens is outside [8, None]" in site["reason"]
    assert torch._inductor.config.post_grad_custom_pre_pass is None  # patched for that compile only


def test_unknown_option_is_an_error_not_ignored(block, fresh):
    with pytest.raises(Exception, match="min_tokenz"):
        torch.compile(block, backend="fx_fusion", options={"min_tokenz": 8})(*prefill_inputs(block))


@pytest.fixture
def compile_fx_calls(monkeypatch):
    """Record what the backend hands to Inductor's ``compile_fx``, then compile for real."""
    from torch._inductor import compile_fx as compile_fx_module

    calls, real, depth = [], compile_fx_module.compile_fx, [0]

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        if depth[0] == 0:  # compile_fx calls itself once the patches are applied
            calls.append(dict(config_patches or {}))
        depth[0] += 1
        try:
            return real(gm, example_inputs, config_patches=config_patches, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    return calls


def _tiny_graph():
    gm = torch.fx.symbolic_trace(lambda x: (torch.sin(x) + 1,))
    return gm, [torch.randn(8)]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs", "default"])
def test_backend_maps_mode_to_inductor_options(mode, compile_fx_calls, fresh):
    gm, inputs = _tiny_graph()
    compiled = fx_fusion.make_backend(FusionConfig(min_tokens=3))(gm, inputs, mode=mode)
    (out,) = compiled(*inputs)
    torch.testing.assert_close(out, torch.sin(inputs[0]) + 1)
    (patches,) = compile_fx_calls
    for key, value in torch._inductor.list_mode_options(mode).items():
        assert patches[key] == value, key
    installed = patches["post_grad_custom_post_pass"]
    assert isinstance(installed, RopeKVFusionPass) and installed.config.min_tokens == 3


def test_backend_options_override_the_base_config(compile_fx_calls, fresh):
    gm, inputs = _tiny_graph()
    backend = fx_fusion.make_backend(FusionConfig(min_tokens=3, validate=True), {"max_autotune": False})
    backend(gm, inputs, options={"min_tokens": 2, "layouts": "paged", "comment_origin": True})
    (patches,) = compile_fx_calls
    config = patches["post_grad_custom_post_pass"].config
    assert (config.min_tokens, config.validate, config.layouts) == (2, True, frozenset({CacheLayout.PAGED}))
    assert patches["max_autotune"] is False and patches["comment_origin"] is True


@pytest.fixture
def static_launch_state(monkeypatch):
    """The backend's import-time state and the variable, restored after the test."""
    monkeypatch.setattr(fx_backend, "_static_launch_default", fx_backend._static_launch_default)
    monkeypatch.setattr(fx_backend, "_workers_lack_static_launch", False)
    monkeypatch.setenv(fx_backend.STATIC_LAUNCH_ENV, "unset by the test")  # restored (or removed) afterwards
    monkeypatch.delenv(fx_backend.STATIC_LAUNCH_ENV)
    monkeypatch.setattr(fx_backend, "_compile_workers_started", lambda: False)
    return monkeypatch


def test_backend_turns_static_launch_on(compile_fx_calls, fresh, static_launch_state):
    """Inductor launches the fused kernel through its static launcher (see ``fx_fusion.backend``)."""
    fx_backend.prefer_static_launch()
    assert os.environ[fx_backend.STATIC_LAUNCH_ENV] == "1", "the compile workers read it from the environment"
    gm, inputs = _tiny_graph()
    fx_fusion.make_backend()(gm, inputs)
    (patches,) = compile_fx_calls
    assert patches[fx_backend.STATIC_LAUNCH] is True


@pytest.mark.parametrize("env, options", [("0", None), (None, {fx_backend.STATIC_LAUNCH: False})],
                         ids=["environment", "options"])
def test_static_launch_can_be_turned_off(compile_fx_calls, fresh, static_launch_state, env, options):
    if env is not None:
        static_launch_state.setenv(fx_backend.STATIC_LAUNCH_ENV, env)
    fx_backend.prefer_static_launch()
    assert os.environ[fx_backend.STATIC_LAUNCH_ENV] == (env or "1"), "a value the user set is left alone"
    gm, inputs = _tiny_graph()
    fx_fusion.make_backend()(gm, inputs, options=options)
    (patches,) = compile_fx_calls
    assert patches[fx_backend.STATIC_LAUNCH] is False


@pytest.mark.parametrize("set_by_user", [False, True])
def test_workers_started_before_the_import_are_warned_about_once(static_launch_state, caplog, set_by_user):
    if set_by_user:  # then the workers started with it: nothing to warn about
        static_launch_state.setenv(fx_backend.STATIC_LAUNCH_ENV, "1")
    static_launch_state.setattr(fx_backend, "_compile_workers_started", lambda: True)
    fx_backend.prefer_static_launch()
    cpu, gpu = [torch.empty(1)], [torch.empty(1, device="meta")]  # not on the CPU: a kernel would be launched
    with caplog.at_level("WARNING", logger="fx_fusion"):
        fx_backend.static_launch({}, cpu)
        assert not caplog.records, "no kernel launch on the CPU: nothing to warn about"
        for _ in range(2):
            fx_backend.static_launch({}, gpu)
    assert len(caplog.records) == (0 if set_by_user else 1)
    assert all("Triton's launcher" in r.getMessage() for r in caplog.records)


def test_torch_compile_passes_mode_to_the_backend(block, compile_fx_calls, fresh, codes):
    """``torch.compile(m, backend="fx_fusion", mode=...)`` reaches the backend (cudagraphs are skipped on CPU)."""
    torch.compile(block, backend="fx_fusion", mode="reduce-overhead")(*prefill_inputs(block))
    (patches,) = compile_fx_calls
    assert patches["triton.cudagraphs"] is True
    assert fresh["rope_kv_store_fused"] == 1 and codes[0].count(FUSED_CALL) == 1


# ------------------------------------------------------------------------------------------------
# @fx_fusion.compile
# ------------------------------------------------------------------------------------------------


def test_decorator_bare(block, fresh, codes):
    @fx_fusion.compile
    def step(*args):
        return block(*args)

    step(*prefill_inputs(block))
    assert fresh["rope_kv_store_fused"] == 1 and codes[0].count(FUSED_CALL) == 1


def test_decorator_with_config_fields(block, fresh, codes, tmp_path):
    @fx_fusion.compile(dump_dir=tmp_path / "dumps", min_tokens=2)
    def step(*args):
        return block(*args)

    step(*prefill_inputs(block))  # 5 tokens: fused
    step(*prefill_inputs(block, num_tokens=1))  # 1 token: below min_tokens
    assert (fresh["rope_kv_store_fused"], fresh["rope_kv_store_not_fused"]) == (1, 1)
    reports = sorted((tmp_path / "dumps").glob("graph_*.report.json"))
    assert len(reports) == 2
    sites = [json.loads(p.read_text())["sites"][0] for p in reports]
    assert sites[0]["fused"] and not sites[1]["fused"] and "1 tokens is outside [2, None]" in sites[1]["reason"]


def test_compile_function_form_with_torch_compile_kwargs(fresh, codes):
    """``fx_fusion.compile(model, dynamic=True, fullgraph=True)``: one graph for every token count."""
    block = make_block("hf")
    compiled = fx_fusion.compile(block, dynamic=True, fullgraph=True, config=FusionConfig(on_unfusable="raise"))
    for t in (3, 5):
        compiled(*prefill_inputs(block, num_tokens=t))
    assert counters["stats"]["unique_graphs"] == 1 and len(codes) == 1 and codes[0].count(FUSED_CALL) == 1
    assert fresh["rope_kv_store_fused"] == 1


def test_compile_fullgraph_reaches_torch_compile(fresh):
    def breaks(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    with pytest.raises(torch._dynamo.exc.Unsupported):
        fx_fusion.compile(breaks, fullgraph=True)(torch.randn(3))
    torch._dynamo.reset()
    torch.testing.assert_close(fx_fusion.compile(breaks)(torch.ones(3)), torch.full((3,), 4.0))


def test_compile_config_and_keywords_combine(compile_fx_calls, fresh):
    base = FusionConfig(min_tokens=4, styles={"gptj"})
    fn = fx_fusion.compile(lambda x: x.cos(), config=base, max_tokens=9, options={"comment_origin": True})
    fn(torch.randn(4))
    (patches,) = compile_fx_calls
    config = patches["post_grad_custom_post_pass"].config
    assert (config.min_tokens, config.max_tokens, config.styles) == (4, 9, frozenset({RopeStyle.GPTJ}))
    assert patches["comment_origin"] is True


# ------------------------------------------------------------------------------------------------
# FusionConfig and uuid()
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(min_tokens=-1), ValueError, "min_tokens must be >= 0, got -1"),
    (dict(min_tokens="4"), TypeError, "min_tokens must be an int, got '4'"),
    (dict(min_tokens=True), TypeError, "min_tokens must be an int, got True"),
    (dict(max_tokens=2.5), TypeError, "max_tokens must be an int or None, got 2.5"),
    (dict(min_tokens=8, max_tokens=4), ValueError, r"max_tokens \(4\) is below min_tokens \(8\)"),
    (dict(layouts={"token", "ragged"}), ValueError, "ragged"),
    (dict(styles=42), TypeError, "styles must be a collection of RopeStyle values"),
    (dict(styles={"rotate"}), ValueError, "rotate"),
    (dict(on_unfusable="explode"), ValueError, "explode"),
])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusionConfig(**kwargs)


def test_config_canonical_values():
    c = FusionConfig(layouts="token", styles=["neox", RopeStyle.GPTJ], on_unfusable="raise", dump_dir=Path("d"))
    assert c.layouts == frozenset({CacheLayout.TOKEN})
    assert c.styles == frozenset(RopeStyle)
    assert c.on_unfusable is OnUnfusable.RAISE and c.dump_dir == "d"
    assert c == FusionConfig(layouts=[CacheLayout.TOKEN], on_unfusable=OnUnfusable.RAISE, dump_dir="d")
    assert hash(c) == hash(dataclasses.replace(c))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.min_tokens = 3


def test_uuid_is_stable_and_changes_with_every_compile_setting():
    base = FusionConfig()
    uuid = RopeKVFusionPass(base).uuid()
    assert uuid and uuid == RopeKVFusionPass(FusionConfig()).uuid() == RopeKVFusionPass(base).uuid()
    changed = [dict(layouts={"token"}), dict(styles={"gptj"}), dict(min_tokens=2), dict(max_tokens=64),
               dict(on_unfusable="raise"), dict(validate=True)]
    uuids = {RopeKVFusionPass(dataclasses.replace(base, **kw)).uuid() for kw in changed}
    assert len(uuids) == len(changed) and uuid not in uuids
    # the same settings spelled differently are the same config
    assert RopeKVFusionPass(FusionConfig(layouts=["paged", "token", "sequence"])).uuid() == uuid
    # dump_dir does not change the compiled graph (and a dump turns the caches off instead)
    assert RopeKVFusionPass(FusionConfig(dump_dir="somewhere")).uuid() == uuid


def test_fx_graph_cache_does_not_serve_one_config_to_another(block, codes):
    """With the FX graph cache on: config A fuses, config B disables the layout; each gets its own graph."""
    a = fx_fusion.make_backend(FusionConfig())
    b = fx_fusion.make_backend(FusionConfig(layouts={"paged", "sequence"}))
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True, post_grad_custom_pre_pass=CacheSalt()):
        for backend in (a, b, a, b):
            torch._dynamo.reset()
            torch.compile(block, backend=backend)(*prefill_inputs(block))
    torch._dynamo.reset()
    assert [c.count(FUSED_CALL) for c in codes] == [1, 0, 1, 0]
    assert counters["fx_fusion"]["graphs"] == 2  # the second A and B were cache hits: the pass did not run
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    assert hits >= 2, "the cache was never hit: this test proves nothing"


def test_two_models_with_different_configs_do_not_share_state(fresh, codes):
    fused_block, plain_block = make_block("sglang", seed=0), make_block("sglang", seed=0)
    fused = fx_fusion.compile(fused_block)
    plain = fx_fusion.compile(plain_block, layouts={"paged"})
    inputs = prefill_inputs(fused_block)
    outputs = [fused(*inputs), plain(*inputs), fused(*inputs)]
    assert [c.count(FUSED_CALL) for c in codes] == [1, 0]  # the third call reuses the first graph
    assert (fresh["rope_kv_store_fused"], fresh["rope_kv_store_not_fused"]) == (1, 1)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused_block.k_buffer, plain_block.k_buffer, atol=1e-5, rtol=1e-5)
    assert torch._inductor.config.post_grad_custom_post_pass is None


# ------------------------------------------------------------------------------------------------
# install()
# ------------------------------------------------------------------------------------------------


def test_install_composes_and_replaces():
    ours, newer, user = RopeKVFusionPass(), RopeKVFusionPass(FusionConfig(min_tokens=2)), CountingPass()
    assert install(ours) is ours and install(ours, None) is ours
    assert install(newer, ours) is newer  # an older fx_fusion pass is replaced
    composed = install(ours, user)
    assert isinstance(composed, ComposedPass) and (composed.first, composed.second) == (user, ours)
    again = install(newer, composed)  # re-installing keeps the user's pass and replaces ours
    assert (again.first, again.second) == (user, newer)
    assert composed.uuid() and composed.uuid() != again.uuid()
    assert composed.uuid() != ComposedPass(CountingPass("other"), ours).uuid()
    assert ComposedPass(lambda graph: None, ours).uuid() is None  # unhashable user pass: cache bypassed


def test_backend_runs_a_users_post_pass_before_ours(block, fresh, codes):
    user = CountingPass()
    with torch._inductor.config.patch(post_grad_custom_post_pass=user):
        torch.compile(block, backend="fx_fusion")(*prefill_inputs(block))
        assert torch._inductor.config.post_grad_custom_post_pass is user
    assert user.calls == 1 and user.saw_fused == [False]
    assert fresh["rope_kv_store_fused"] == 1 and codes[0].count(FUSED_CALL) == 1
