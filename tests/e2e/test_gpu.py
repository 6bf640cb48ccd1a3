"""On a CUDA device: the fused op under CUDA graphs, with dynamic token counts, and through every surface form.

Blocks from ``tests/attention_blocks.py`` are moved to the GPU and compiled with the fx_fusion backend; an
eager deep copy runs the same steps, and outputs and every cache buffer (untouched rows included: caches
start random) are compared after each step.

* ``test_cuda_graph_replay``: ``mode="reduce-overhead"``; one compile, then several replays of one CUDA
  graph with changing slots and positions (the caches are module buffers: static, written in place).
* ``test_dynamic_token_count``: T = 1, 7, 64, 1000 prefill steps with the token dim dynamic
  (``mark_dynamic`` or ``dynamic=True``); at most two compiles (T = 1 and one for T >= 2), each fused.
* ``test_forms_match_eager``: sglang / vllm / hf / gptfast blocks, prefill then decode: the Triton
  kernel (not the CPU reference) runs inside Inductor's code and matches eager.

Skipped without CUDA. About 30 small compiles: well under 3 minutes on one H100.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fx_fusion
from fx_fusion import FusionConfig
from tests.attention_blocks import make_block, make_inputs, prefill_inputs, token_slots

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
BF16 = torch.bfloat16
# (atol, rtol). Outputs: the compiled block keeps fp32 intermediates where eager rounds after every op.
# Caches: the fused kernel rounds one fp32 RoPE result, eager may round twice (one bf16 ulp apart).
OUTPUT_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), BF16: (6e-2, 5e-2)}
CACHE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), BF16: (1e-2, 1.6e-2)}
FUSED_CALL = "torch.ops.fx_fusion.rope_kv_store.default("


@pytest.fixture(autouse=True)
def inference():
    """No autograd, no FX graph cache (a hit would skip the pass), a fresh Dynamo per test."""
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def snapshot() -> dict[str, int]:
    fx = counters["fx_fusion"]
    return {"compiles": counters["stats"]["unique_graphs"], "pass_runs": fx["graphs"],
            "fused": fx["rope_kv_store_fused"], "not_fused": fx["rope_kv_store_not_fused"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "non_static_inputs": counters["inductor"]["cudagraph_recorded_non_static_inputs"]}


def delta(before: dict[str, int]) -> dict[str, int]:
    now = snapshot()
    return {k: now[k] - before[k] for k in now}


def to_device(inputs) -> tuple:
    return tuple(x.to(DEVICE) for x in inputs)


def caches(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "cache" in n or "buffer" in n}


def assert_close(actual, expected, tol, what: str) -> None:
    atol, rtol = tol[expected.dtype] if expected.is_floating_point() else (0, 0)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_step(out, expected, model, eager, what: str) -> None:
    assert_close(out, expected, OUTPUT_TOL, f"{what} output")
    mine, ref = caches(model), caches(eager)
    assert mine.keys() == ref.keys() and mine
    for name in ref:
        assert_close(mine[name], ref[name], CACHE_TOL, f"{what} buffer {name}")


def assert_every_graph_fused(d: dict[str, int], sites_per_graph: int = 1) -> None:
    assert d["compiles"] >= 1, "nothing compiled"
    assert d["pass_runs"] == d["compiles"], f"the fusion pass ran {d['pass_runs']} times for {d['compiles']} graphs"
    assert d["not_fused"] == 0, f"{d['not_fused']} sites left unfused"
    assert d["fused"] == sites_per_graph * d["compiles"], f"{d['fused']} fused sites in {d['compiles']} graphs"


def cudagraph_state() -> str | None:
    """What the CUDA-graph tree manager of this device did last (WARMUP, RECORDING, EXECUTION), if readable."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        return None if manager is None else manager.path_state.name
    except (ImportError, AttributeError):  # internals moved: the equality checks still stand
        return None


# ------------------------------------------------------------------------------------------------
# (i) CUDA-graph capture and replay
# ------------------------------------------------------------------------------------------------

KV_LEN = 64  # positions the sglang block's attention reads back (fixed, so every step has the same shapes)


def decode_step(block, past: int, step: int) -> tuple:
    """Fixed-shape decode inputs whose slots and positions change with ``past``."""
    g = torch.Generator().manual_seed(1000 + step)
    if block.form == "sglang":
        positions = torch.arange(past, past + 4)  # four new tokens a step
        hidden = torch.randn(4, block.hidden_size, generator=g).to(block.dtype)
        return to_device((positions, hidden, token_slots(block, positions), token_slots(block, torch.arange(KV_LEN))))
    batch = block.k_cache.shape[0]
    hidden = torch.randn(batch, 1, block.hidden_size, generator=g).to(block.dtype)
    position_ids = torch.full((batch, 1), past, dtype=torch.int64)
    return to_device((hidden, position_ids, torch.tensor([past])))


GRAPH_BLOCKS = [
    pytest.param("sglang", dict(num_slots=256), id="sglang"),
    pytest.param("hf", dict(batch=2, max_seq=KV_LEN, cache_update="setitem"), id="hf-setitem"),
    pytest.param("hf", dict(batch=2, max_seq=KV_LEN, cache_update="index_copy", style="gptj"), id="hf-index_copy"),
]


@pytest.mark.parametrize("form, kw", GRAPH_BLOCKS)
def test_cuda_graph_replay(form, kw, codes):
    block = make_block(form, num_heads=8, num_kv_heads=2, head_dim=64, dtype=BF16, max_pos=KV_LEN, **kw).to(DEVICE)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend="fx_fusion", mode="reduce-overhead")
    before = snapshot()
    states = []
    for step, past in enumerate(range(10, 40, 5)):  # 6 steps: warm-up, recording, then replays
        inputs = decode_step(block, past, step)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*inputs).clone()  # a replay's output lives in the graph's pool: copy it out
        states.append(cudagraph_state())
        check_step(out, eager(*inputs), block, eager, f"step {step} (past {past})")
    d = delta(before)
    assert d["compiles"] == 1, f"{d['compiles']} compiles for one input shape"
    assert_every_graph_fused(d)
    assert d["cudagraph_skips"] == 0, "Inductor skipped CUDA graphs (TORCH_LOGS=perf_hints says why)"
    # the caches are module buffers: static inputs, written in place, never copied in on replay
    n_inputs = len(inputs)
    assert d["non_static_inputs"] <= n_inputs, f"{d['non_static_inputs']} non-static inputs for {n_inputs} args"
    if states[-1] is not None:
        assert states[-3:] == ["EXECUTION"] * 3, f"the last steps did not replay a CUDA graph: {states}"
    # the graph that is captured launches the kernel itself: no Python op in the recorded region
    assert len(codes) == 1 and direct_launches(codes[0]) == 1 and "torch.ops.fx_fusion" not in codes[0]


# ------------------------------------------------------------------------------------------------
# (ii) dynamic token count
# ------------------------------------------------------------------------------------------------

TOKEN_DIMS = {"sglang": (0, 0, 0, 0), "hf": (1, 1, 0)}  # token dim of each forward argument
DYNAMIC_BLOCKS = {"sglang": dict(num_slots=2048, max_pos=1024), "hf": dict(max_seq=1024, cache_update="setitem")}


@pytest.mark.parametrize("how", ["mark_dynamic", "dynamic=True"])
@pytest.mark.parametrize("form", ["sglang", "hf"])
def test_dynamic_token_count(form, how, codes):
    block = make_block(form, num_heads=8, num_kv_heads=2, head_dim=64, dtype=BF16, **DYNAMIC_BLOCKS[form]).to(DEVICE)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend="fx_fusion", dynamic=True if how == "dynamic=True" else None)
    before = snapshot()
    after_first_dynamic = None
    for t in (1, 7, 64, 1000):
        inputs = to_device(prefill_inputs(block, num_tokens=t, seed=t))
        if how == "mark_dynamic" and t > 1:  # a size-1 dim cannot be marked: Dynamo specialises it
            for x, dim in zip(inputs, TOKEN_DIMS[form]):
                torch._dynamo.mark_dynamic(x, dim)
        check_step(compiled(*inputs), eager(*inputs), block, eager, f"T={t}")
        if t == 7:
            after_first_dynamic = delta(before)["compiles"]
    d = delta(before)
    # T = 1 may get a graph of its own (size-1 specialisation); every T >= 2 shares one: <= 2 in all
    assert d["compiles"] <= 2, f"{d['compiles']} compiles for T = 1, 7, 64, 1000"
    assert d["compiles"] == after_first_dynamic, "T = 64 or 1000 recompiled after T = 7"
    assert_every_graph_fused(d)
    # with a symbolic T too, Inductor launches the kernel (T and the batch strides are its run-time values)
    assert codes and all(direct_launches(code) == 1 for code in codes)


# ------------------------------------------------------------------------------------------------
# (iii) every surface form through the compiled graph, on CUDA
# ------------------------------------------------------------------------------------------------

FORM_CASES = [
    pytest.param("sglang", dict(dtype=BF16), id="sglang-neox-bf16"),
    pytest.param("sglang", dict(style="gptj", rot_dim=32, dtype=torch.float32), id="sglang-gptj-partial-fp32"),
    pytest.param("vllm", dict(dtype=BF16, num_blocks=8, block_size=16), id="vllm-neox-bf16"),
    pytest.param("vllm", dict(flat_store=True, style="gptj", dtype=torch.float16, num_blocks=8, block_size=16),
                 id="vllm-flat-gptj-fp16"),
    pytest.param("hf", dict(dtype=BF16, cache_update="index_copy"), id="hf-index_copy-bf16"),
    pytest.param("hf", dict(rot_dim=32, dtype=torch.float32, cache_update="setitem"), id="hf-partial-fp32"),
    pytest.param("gptfast", dict(dtype=BF16), id="gptfast-bf16"),
    pytest.param("gptfast", dict(dtype=torch.float32), id="gptfast-fp32"),
]


@pytest.mark.parametrize("form, kw", FORM_CASES)
def test_forms_match_eager(form, kw, codes):
    block = make_block(form, num_heads=8, num_kv_heads=2, head_dim=64, **kw).to(DEVICE)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend=fx_fusion.make_backend(FusionConfig(on_unfusable="raise")))
    before = snapshot()
    steps = [make_inputs(block, 5, past=0), make_inputs(block, 1, past=5), make_inputs(block, 1, past=6)]
    for i, inputs in enumerate(steps):
        inputs = to_device(inputs)
        check_step(compiled(*inputs), eager(*inputs), block, eager, f"step {i}")
    assert_every_graph_fused(delta(before))
    assert codes and all(direct_launches(code) == 1 and "torch.ops.fx_fusion" not in code for code in codes), \
        "the output code does not launch the fused kernel itself, once per graph"
    assert all(b.device.type == DEVICE for b in caches(block).values())


@pytest.mark.parametrize("keep", [slice(-64, None), slice(100, 164)], ids=["last", "middle"])
def test_prefill_longer_than_the_window(keep, codes):
    """A 300-token first step into a sliding window of 64 keeps 64 of its tokens (``keys.copy_(k[:, :, keep])``; HF
    keeps the last): the kernel, launched from Inductor's code, stores those tokens and writes no row for the
    others (tokens run in parallel here, so a second write to a row would race). Then two decode steps roll the
    window. Outputs and the whole caches (random to start with) equal to eager, every graph fused."""
    from tests.cache_blocks import HIDDEN, WindowBlock

    torch.manual_seed(0)
    model = WindowBlock(window=64, dtype=BF16, keep=keep, allocate_batch=1).to(DEVICE).eval()
    model.keys, model.values = model.keys.to(DEVICE), model.values.to(DEVICE)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=fx_fusion.make_backend(FusionConfig(on_unfusable="raise")))
    before = snapshot()
    g = torch.Generator().manual_seed(1)
    past = 0
    for n in (300, 1, 1):
        hidden = torch.randn(1, n, HIDDEN, generator=g).to(BF16).to(DEVICE)
        position_ids = torch.arange(past, past + n, device=DEVICE)[None]
        past += n
        assert_close(compiled(hidden, position_ids), eager(hidden, position_ids), OUTPUT_TOL, f"output at {past}")
        for name in ("keys", "values"):
            assert_close(getattr(model, name), getattr(eager, name), CACHE_TOL, f"{name} at {past} tokens")
    assert_every_graph_fused(delta(before))
    assert codes and all(direct_launches(code) == 1 and "torch.ops.fx_fusion" not in code for code in codes)


@pytest.mark.parametrize("layout", ["paged", "token", "split"])
def test_stacked_buffer_written_in_place(layout, codes):
    """Stacked caches (``kv[0, i][slot // bs, slot % bs] = k``, nano-vllm; ``kv[0, i][slot] = k``; ``k_cache[i][slot]
    = k``): the kernel, launched from Inductor's code once per layer, writes the caller's buffers (no buffer-sized
    copy), and the whole buffers equal eager's after a prefill and two decode steps."""
    import re

    from tests.cache_blocks import StackedBlock, pool_steps

    torch.manual_seed(0)
    model = StackedBlock(layout, layers=2).to(DEVICE).eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=fx_fusion.make_backend(FusionConfig(on_unfusable="raise")))
    before = snapshot()
    for i, step in enumerate(pool_steps()):
        inputs = to_device(step)
        check_step(compiled(*inputs), eager(*inputs), model, eager, f"step {i}")
    assert_every_graph_fused(delta(before), sites_per_graph=model.layers)
    # the sizes of the written buffers (cos_sin_cache, read only, is no cache: a q-sized temporary may match it)
    numels = {b.numel() for name, b in caches(model).items() if name != "cos_sin_cache"}
    assert codes
    for code in codes:
        assert direct_launches(code) == model.layers and "torch.ops.fx_fusion" not in code
        body = code[code.index("def call("):]
        for shape in re.findall(r"empty_strided\w*\(\(([^)]*)\)", body):
            dims = [int(d) for d in shape.split(",") if d.strip().isdigit()]
            assert not dims or torch.Size(dims).numel() not in numels, f"a buffer-sized ({shape}) temporary"


def direct_launches(code: str, kernel: str = "_rope_kv_store_kernel") -> int:
    """Launches of the fused kernel (``kernel``) from Inductor's output code (``<name>.run(``; Inductor numbers the
    name)."""
    import re

    names = set(re.findall(rf"^(\w+) = async_compile\.triton\('{kernel}'", code, re.M))
    return sum(code.count(f"{name}.run(") for name in names)


# ------------------------------------------------------------------------------------------------
# (iv) the public op called inside compiled code: Inductor launches the kernel itself
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, None, True], ids=["static", "automatic", "all-dynamic"])
def test_direct_op_call_is_launched_by_inductor(codes, dynamic):
    """``torch.ops.fx_fusion.rope_kv_store`` in user code compiled by stock Inductor: the output code launches
    our Triton kernel directly (``.run(``), with no call of the custom op, and matches eager.

    ``dynamic=None`` (the default) makes the token count dynamic once it changes. With ``dynamic=True``
    every size is symbolic, head counts and strides too, which the kernel takes as constants: the op
    stays opaque there (no guard pins them), and the result must still match."""
    from fx_fusion.kernels import rope_kv_store

    n_q, n_kv, d, slots, max_pos = 8, 2, 64, 64, 128
    k_cache = torch.randn(slots, n_kv, d, dtype=BF16, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    csc = torch.randn(max_pos, d, device=DEVICE)

    def step(qkv, loc, pos, k_cache, v_cache):
        q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
        q_out, _ = rope_kv_store(q, k, v, k_cache, v_cache, loc, cos_sin_cache=csc, positions=pos)
        return q_out

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for t in (5, 9, 33):
        qkv = torch.randn(t, (n_q + 2 * n_kv) * d, dtype=BF16, device=DEVICE)
        loc = torch.randperm(slots, device=DEVICE)[:t]
        pos = torch.randint(0, max_pos, (t,), device=DEVICE)
        kc, vc = k_cache.clone(), v_cache.clone()
        expected = step(qkv, loc, pos, kc, vc)
        out = compiled(qkv, loc, pos, k_cache, v_cache)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the same kernel on both sides
        torch.testing.assert_close(k_cache, kc, atol=0, rtol=0)
        torch.testing.assert_close(v_cache, vc, atol=0, rtol=0)
    assert codes, "nothing compiled"
    if dynamic is True:
        return
    for code in codes:
        assert "torch.ops.fx_fusion" not in code, "the op is still called through the dispatcher"
        assert direct_launches(code) == 1, "no direct launch of our kernel"
    if dynamic is None:
        assert len(codes) <= 2, f"{len(codes)} compiles for T = 5, 9, 33 with a dynamic token count"


# ------------------------------------------------------------------------------------------------
# (v) Inductor's static launcher launches the fused kernel, in this process and in its compile workers
# ------------------------------------------------------------------------------------------------

STATIC_LAUNCH_SCRIPT = r"""
import json, time
import torch
import fx_fusion
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.codecache import PyCodeCache
from tests.attention_blocks import make_block, prefill_inputs

def launchers():
    kinds = []
    for module in list(PyCodeCache.modules) + list(getattr(PyCodeCache, "modules_no_attr", {}).values()):
        for name in dir(module):
            if name.startswith("_rope_kv_store_kernel"):
                kinds += [type(r).__name__ for r in getattr(module, name).compile_results]
    return kinds

workers_up = getattr(AsyncCompile, "use_process_pool", lambda: False)
seen = []
with torch.no_grad():
    for i, form in enumerate(("sglang", "vllm")):  # two kernels: the second compiles once the workers are up
        if i:
            deadline = time.monotonic() + 90
            while not workers_up() and time.monotonic() < deadline:
                time.sleep(0.5)
            seen.append(workers_up())
        block = make_block(form, num_heads=8, num_kv_heads=2, head_dim=64).to("cuda")
        inputs = tuple(x.to("cuda") for x in prefill_inputs(block))
        out = torch.compile(block, backend="fx_fusion")(*inputs)
        torch.testing.assert_close(out, make_block(form, num_heads=8, num_kv_heads=2, head_dim=64).to("cuda")(*inputs),
                                   atol=6e-2, rtol=5e-2)
print(json.dumps({"launchers": launchers(), "workers": seen}))
"""


def test_fused_kernel_is_launched_statically(tmp_path):
    """A fresh process compiling with ``backend="fx_fusion"`` (nothing set by the user): every compiled fused
    kernel is a ``StaticTritonCompileResult``, the first compiled here before the workers are up, the second
    (once they are, if the machine gives Inductor several compile threads) in a worker."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fx_fusion.backend import STATIC_LAUNCH_ENV

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != STATIC_LAUNCH_ENV}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path), PYTHONPATH=str(repo))
    done = subprocess.run([sys.executable, "-c", STATIC_LAUNCH_SCRIPT], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["launchers"]) >= 2, result
    assert set(result["launchers"]) == {"StaticTritonCompileResult"}, result


# ------------------------------------------------------------------------------------------------
# Out-of-range slots and positions: the compiled call fails as stock torch.compile's does
# ------------------------------------------------------------------------------------------------

OUT_OF_RANGE_SCRIPT = r"""
import sys
import torch
import fx_fusion
from tests.attention_blocks import make_block, make_inputs

backend, what = sys.argv[1], sys.argv[2]
block = make_block("sglang", num_slots=64).to("cuda")
f = torch.compile(block, backend=backend)
inputs = [x.to("cuda") for x in make_inputs(block, 3, past=2)]
with torch.no_grad():
    f(*inputs)
    inputs[2] = inputs[2].clone()
    inputs[2][1] = -1  # the last row, as eager indexes
    f(*inputs)
    torch.cuda.synchronize()
    print("in range: ok", flush=True)
    if what == "slot":
        inputs[2][1] = block.k_buffer.shape[0]
    else:
        inputs[0] = inputs[0].clone()
        inputs[0][1] = block.cos_sin_cache.shape[0]
    f(*inputs)
    torch.cuda.synchronize()
    print("out of range: no error", flush=True)
"""


@pytest.mark.parametrize("what", ["slot", "position"])
def test_out_of_range_fails_as_stock(what):
    """Stock and fx_fusion, each in a fresh process (a device-side assertion ends the CUDA context): slot ``-1`` (the
    last row, as eager indexes) runs on both; then an out-of-range slot or position fails both with a device-side
    assertion."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    for backend in ("inductor", "fx_fusion"):
        done = subprocess.run([sys.executable, "-c", OUT_OF_RANGE_SCRIPT, backend, what], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)
        out = done.stdout + done.stderr
        assert "in range: ok" in done.stdout, (backend, out[-3000:])
        assert done.returncode != 0 and "no error" not in done.stdout, (backend, out[-3000:])
        assert "device-side assert" in out or "Assertion" in out, (backend, out[-3000:])


# ------------------------------------------------------------------------------------------------
# QK-norm in the launch
# ------------------------------------------------------------------------------------------------

QK_NORM_CASES = [
    pytest.param("vllm-qwen3", BF16, id="vllm-qwen3-bf16"),
    pytest.param("sglang-qwen3", BF16, id="sglang-qwen3-bf16"),
    pytest.param("gemma3", BF16, id="gemma3-bf16"),
    pytest.param("vllm-qwen3", torch.float32, id="vllm-qwen3-fp32"),
    pytest.param("olmo2", BF16, id="olmo2-bf16"),  # one norm over all of a token's heads (norm_full_width)
    pytest.param("olmo2", torch.float32, id="olmo2-fp32"),
    # the norm after the RoPE (norm_after_rope): tests/patterns/test_qk_norm_after_rope.py's blocks
    pytest.param("after:hunyuan", BF16, id="hunyuan-bf16"),
    pytest.param("after:llama4", BF16, id="llama4-bf16"),
    pytest.param("after:hunyuan", torch.float32, id="hunyuan-fp32"),
]


@pytest.mark.parametrize("form, dtype", QK_NORM_CASES)
def test_qk_norm_is_applied_by_the_launch(form, dtype, codes):
    """Qwen3 / Gemma 3 / OLMo 2 token-pool blocks (``tests/patterns/test_qk_norm_fusion.py``), and HunYuan / Llama 4
    ones normalising after the RoPE (``tests/patterns/test_qk_norm_after_rope.py``), on the GPU: one direct launch
    per graph applies both norms, the RoPE and the store (no norm kernel is left: no ``libdevice.rsqrt`` in the
    code), outputs and caches equal to eager (bf16: a normalised value may be one step from eager's)."""
    from tests.patterns.test_qk_norm_after_rope import PostNormBlock
    from tests.patterns.test_qk_norm_fusion import NORM_CACHE_TOL, QKNormBlock

    after, form = form.startswith("after:"), form.removeprefix("after:")
    block = (PostNormBlock if after else QKNormBlock)(form=form, dtype=dtype, num_heads=8, num_kv_heads=2,
                                                      head_dim=128).eval().to(DEVICE)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend=fx_fusion.make_backend(FusionConfig(on_unfusable="raise")))
    before = snapshot()
    steps = [make_inputs(block, 5, past=0), make_inputs(block, 1, past=5), make_inputs(block, 1, past=6)]
    for i, inputs in enumerate(steps):
        inputs = to_device(inputs)
        assert_close(compiled(*inputs), eager(*inputs), OUTPUT_TOL, f"step {i} output")
        for name, ref in caches(eager).items():
            assert_close(caches(block)[name], ref, NORM_CACHE_TOL, f"step {i} buffer {name}")
    assert_every_graph_fused(delta(before))
    assert codes and all(direct_launches(code) == 1 and "torch.ops.fx_fusion" not in code
                         and "libdevice.rsqrt" not in code for code in codes), \
        "a norm kernel is left, or the fused kernel is not launched once per graph"


# ------------------------------------------------------------------------------------------------
# MLA latent pools
# ------------------------------------------------------------------------------------------------

MLA_CASES = [
    pytest.param(dict(), None, id="absorb-bf16"),
    pytest.param(dict(fp8="uint8", scale_tensor=True), None, id="absorb-uint8-pool"),
    pytest.param(dict(), "reduce-overhead", id="absorb-bf16-cuda-graphs"),
    pytest.param(dict(path="prefill", store="view_cat"), None, id="prefill"),
    pytest.param(dict(store="latent", absorb_q="buffer"), None, id="sglang-buffers"),  # slice writes made cats
]


@pytest.mark.parametrize("kw, mode", MLA_CASES)
def test_mla_latent_store_is_launched_by_inductor(kw, mode, codes):
    """SGLang-style MLA blocks (``tests/mla_models.py``) in bf16 on the GPU, prefill then two decode steps (the
    second graph with a dynamic token count): every graph launches the MLA kernel once from Inductor's code, with
    no ``torch.ops.fx_fusion`` call (under CUDA graphs too); outputs and the whole pool as eager's within bf16
    tolerance (fp8: one e4m3 step of the dequantised values), rows no slot addresses untouched."""
    from tests.mla_models import make_mla_block, mla_steps

    block = make_mla_block(dtype=BF16, **kw).to(DEVICE)
    eager = copy.deepcopy(block)
    start = block.kv_pool.clone()
    compiled = torch.compile(block, backend=fx_fusion.make_backend(FusionConfig(on_unfusable="raise")), mode=mode)
    before = snapshot()
    steps = mla_steps(block) if kw.get("path") != "prefill" else [mla_steps(block, prefill=n, decode=())[0]
                                                                     for n in (5, 3)]
    written = torch.zeros(block.kv_pool.shape[0], dtype=torch.bool, device=DEVICE)
    for i, args in enumerate(steps):
        args = to_device(args)
        if mode is not None:
            torch.compiler.cudagraph_mark_step_begin()
        out, expected = compiled(*args), eager(*args)
        for got, want in zip(out, expected):
            assert_close(got.clone(), want, OUTPUT_TOL, f"step {i} output")
        written[args[2]] = True
        pool, ref = block.kv_pool, eager.kv_pool
        if pool.dtype == torch.uint8:
            pool, ref = (x.view(torch.float8_e4m3fn).float() for x in (pool, ref))
            assert ((pool - ref).abs() <= ref.abs() * 2.0 ** -3 + 2.0 ** -9).all(), f"step {i} pool"
        else:
            assert_close(pool, ref, CACHE_TOL, f"step {i} pool")
    assert torch.equal(block.kv_pool[~written], start[~written]), "a row no slot addresses was written"
    assert_every_graph_fused(delta(before))
    assert codes and all(direct_launches(code, "_mla_rope_store_kernel") == 1 and "torch.ops.fx_fusion" not in code
                         for code in codes), "the MLA kernel is not launched once per graph by Inductor's code"


@pytest.mark.parametrize("interleave, version", [(True, 3), (False, 3), (None, 2)],
                         ids=["interleave", "rotate_half", "v2-complex"])
def test_deepseek_v3_two_caches_are_written_by_the_launch(interleave, version, codes):
    """transformers' DeepseekV3ForCausalLM (and DeepseekV2ForCausalLM, its RoPE a complex multiply; tiny, random
    weights, bf16) on the GPU, a prefill and two decode steps: every graph launches the MLA kernel once per layer
    from Inductor's code (no ``torch.ops.fx_fusion`` call), the latent and the rotated k_pe in the layer's two
    caches; logits and both caches of every layer as eager's."""
    from tests.mla_models import build_deepseek_v3, hf_steps, new_latent_cache, run_hf_steps

    model, config = build_deepseek_v3(interleave, BF16, device=DEVICE, version=version)
    steps = [ids.to(DEVICE) for ids in hf_steps(config)]
    ref, cache = (new_latent_cache(config, dtype=BF16, device=DEVICE) for _ in range(2))
    expected = run_hf_steps(model, ref, steps)
    compiled = torch.compile(model.forward, backend=fx_fusion.make_backend(FusionConfig(on_unfusable="raise")))
    before = snapshot()
    actual = run_hf_steps(compiled, cache, steps)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2, msg=lambda m: f"step {i} logits: {m}")
    for i, (layer, ref_layer) in enumerate(zip(cache.layers, ref.layers)):  # tests/e2e/test_hf_models.py's tolerance
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=2e-2, rtol=2e-2, msg=lambda m: f"layer {i}: {m}")
        torch.testing.assert_close(layer.values, ref_layer.values, atol=2e-2, rtol=2e-2,
                                   msg=lambda m: f"layer {i} k_pe: {m}")
    layers = config.num_hidden_layers
    assert_every_graph_fused(delta(before), sites_per_graph=layers)
    assert codes and all(direct_launches(code, "_mla_rope_store_kernel") == layers and "torch.ops.fx_fusion" not in code
                         for code in codes), "the MLA kernel is not launched once per layer by Inductor's code"
