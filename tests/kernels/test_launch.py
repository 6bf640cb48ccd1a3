"""The kernel's launch interface: run-time arguments, fp8 NaN and scales, and the traceable launcher.

``launch_traceable`` is traced with ``make_fx(torch.func.functionalize(...))`` as a graph pass traces it:
the graph must hold ``triton_kernel_wrapper_functional`` (Inductor's user-kernel op) and no fx_fusion op,
and running it must match the float64 reference (outputs poisoned, whole caches compared).

On CPU: ``wrap_triton`` only traces real ``@triton.jit`` functions, and the interpreter's are not, so
the graph is traced from a copy of the launch module whose kernel comes from a copy of the kernel module
loaded with the interpreter off; to run the graph, the kernel it names is swapped for the interpreted one
(same source).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types

import pytest
import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch.fx.experimental.proxy_tensor import make_fx

from fx_fusion.kernels import casts
from fx_fusion.kernels import launch as kernel_launch
from fx_fusion.kernels import rope_kv_cache as rkc
from fx_fusion.kernels import rope_kv_kernel
from tests.kernels.test_rope_kv_cache import (
    INTERPRETED,
    TOLERANCES,
    KernelSpy,
    addressed_rows,
    assert_cache,
    exact_fp8_casts_in_interpreter,  # noqa: F401  (autouse fixture, applies to this module too)
    make_args,
)

# --------------------------------------------------------------------------------------------------
# Run-time arguments
# --------------------------------------------------------------------------------------------------


CONSTEXPRS = kernel_launch._constexpr_names(rope_kv_kernel._rope_kv_store_kernel)


COMMON_CASES = {
    # id: (make_args keyword arguments, return_k): SGLang/vLLM decode and prefill, HF StaticCache (one
    # sequence: a batch of B > 1 adds up to 6 batch strides, which involve the sequence length)
    "sglang-token": (dict(layout="token", table="packed"), False),
    "vllm-paged": (dict(layout="paged", table="packed"), False),
    "hf-sequence": (dict(layout="sequence", batch=1, table="hf"), False),
    "hf-sequence-return-k": (dict(layout="sequence", batch=1, table="hf_b1"), True),
}


@pytest.mark.parametrize("case", COMMON_CASES.values(), ids=COMMON_CASES.keys())
def test_at_most_16_run_time_arguments(device, monkeypatch, case):
    """Sizes, strides that do not involve the token count, flags and block sizes are constexprs."""
    kw, return_k = case
    spy = KernelSpy(rope_kv_kernel._rope_kv_store_kernel.arg_names)
    monkeypatch.setattr(kernel_launch, "_rope_kv_store_kernel", spy)
    p = rkc.prepare(**make_args(device, T=5, Hq=8, Hkv=2, D=64, **kw))
    q_out = torch.empty(p.q_shape, dtype=p.q.dtype, device=device)
    rkc.launch(p, q_out, torch.empty(p.k_shape, dtype=p.k.dtype, device=device) if return_k else None)
    (_, args), = spy.launches
    run_time = {n for n, x in args.items() if x is not None and n not in CONSTEXPRS
                and n not in ("num_warps", "num_stages")}
    assert len(run_time) <= 16, sorted(run_time)
    assert "T" in run_time and {"q_ptr", "k_cache_ptr", "slot_ptr"} <= run_time
    assert ("k_out_ptr" in run_time) == return_k


# --------------------------------------------------------------------------------------------------
# fp8: NaN stays NaN; scales act as in eager (x / scale).clamp(-max, max).to(fp8)
# --------------------------------------------------------------------------------------------------


def eager_quant(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_keeps_nan(device, cache_dtype):
    """A NaN in v (and so in rotated k) is stored as NaN, not saturated to -max (regression)."""
    args = make_args(device, T=4, Hq=2, Hkv=1, D=16, dtype=torch.float32, cache_dtype=cache_dtype, qkv="3d")
    args["v"][1, 0, 3] = float("nan")
    args["k"][2, 0, 0] = float("nan")
    p = rkc.prepare(**args)
    rkc.launch(p, torch.empty(p.q_shape, device=device), None)
    slots = p.slot_mapping.reshape(-1)
    v_row, k_row = p.v_cache[slots[1], 0].float(), p.k_cache[slots[2], 0].float()
    assert torch.isnan(v_row[3]), f"v NaN stored as {v_row[3].item()}"
    assert torch.isnan(v_row[torch.arange(16, device=device) != 3]).sum() == 0
    # NeoX pairs (0, 8): a NaN at feature 0 makes both rotated features NaN
    assert torch.isnan(k_row[0]) and torch.isnan(k_row[8]), f"k NaN stored as {k_row[[0, 8]].tolist()}"


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan")], ids=["zero", "negative", "inf", "nan"])
def test_fp8_scale_edge_cases_follow_eager(device, scale):
    """Scale 0, negative or non-finite: the stored v equals eager (v / scale).clamp(-max, max).to(fp8)."""
    cache_dtype = torch.float8_e4m3fn
    args = make_args(device, T=3, Hq=2, Hkv=1, D=16, dtype=torch.float32, cache_dtype=cache_dtype, qkv="3d")
    args["v"][0, 0, :2] = 0.0  # 0 / 0 = NaN with a zero scale
    args["v_scale"] = torch.tensor([scale], device=device)
    p = rkc.prepare(**args)
    rkc.launch(p, torch.empty(p.q_shape, device=device), None)
    got = p.v_cache[p.slot_mapping.reshape(-1)][:, 0].float()
    want = eager_quant(args["v"][:, 0], scale, cache_dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


# --------------------------------------------------------------------------------------------------
# The traceable launcher
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced_kernels():
    """(module to trace with, interpreted kernel to run the graph with or None on a GPU)."""
    if not INTERPRETED:
        yield rkc, None
        return
    copies = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # Triton reads it when @triton.jit runs
        for layer in (casts, rope_kv_kernel, kernel_launch):
            name = f"fx_fusion_{layer.__name__.rpartition('.')[2]}_jit"
            spec = importlib.util.spec_from_file_location(name, layer.__file__)
            copies[layer] = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, name, copies[layer])
            if layer is rope_kv_kernel:  # the kernel imports the helpers it calls: the compiled copies
                mp.setitem(sys.modules, casts.__name__, copies[casts])
            spec.loader.exec_module(copies[layer])
    jit_kernel = copies[rope_kv_kernel]._rope_kv_store_kernel
    assert isinstance(jit_kernel, triton.runtime.JITFunction)
    launcher = copies[kernel_launch]
    launcher._rope_kv_store_kernel = jit_kernel  # its import got the interpreted one; launches look it up here
    yield (types.SimpleNamespace(prepare=rkc.prepare, reference=rkc.reference, NotTraceable=launcher.NotTraceable,
                                 launch_traceable=launcher.launch_traceable), rope_kv_kernel._rope_kv_store_kernel)


def trace(module, args: dict, return_k: bool, tracing_mode: str) -> torch.fx.GraphModule:
    """make_fx(functionalize(prepare -> launch_traceable)) over the tensors of ``args``, on fake tensors."""
    names = [n for n, x in args.items() if isinstance(x, torch.Tensor)]
    static = {n: x for n, x in args.items() if n not in names}

    def fn(*tensors):
        p = module.prepare(**dict(zip(names, tensors)), **static)
        return module.launch_traceable(p, return_k)

    return make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode=tracing_mode)(
        *(args[n] for n in names))


def run_graph(gm, module, interpreted, monkeypatch, args: dict, return_k: bool):
    """Run the traced graph on real tensors (empty outputs poisoned with NaN); compare with the reference."""
    if interpreted is not None:  # (the table holds the kernel wrapped in a one-config autotuner: num_warps)
        (node,) = kernel_nodes(gm)
        monkeypatch.setitem(kernel_side_table.id_to_kernel, node.kwargs["kernel_idx"], interpreted)
    p = module.prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, k_ref = module.reference(ref, return_k, compute_dtype=torch.float64)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)  # torch.empty fills NaN: poisoned outputs
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        q_out, k_out = gm(*(x for x in args.values() if isinstance(x, torch.Tensor)))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol, msg=lambda m: f"q_out: {m}")
    if return_k:
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol, msg=lambda m: f"k_out: {m}")
    else:
        assert k_out.shape == (0,)
    # addressed_rows and assert_cache know this module's layouts by value
    p_here = rkc.prepare(**dict(args, layout=p.options.layout.value))
    addressed = addressed_rows(p_here)
    assert_cache("k_cache", p.k_cache, before[0], ref.k_cache, addressed, p_here.options.layout)
    assert_cache("v_cache", p.v_cache, before[1], ref.v_cache, addressed, p_here.options.layout)


def kernel_nodes(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__name__", "") == "triton_kernel_wrapper_functional"]


TRACE_CASES = {
    # id: (make_args keyword arguments, return_k)
    "token-packed-fused2d": (dict(layout="token", table="packed"), False),
    "paged-hf-gptj-return-k": (dict(layout="paged", table="hf", is_neox=False, qkv="3d"), True),
    "sequence-b2-partial": (dict(layout="sequence", batch=2, table="hf", rot=32), True),
    "token-fp8-swa": (dict(layout="token", cache_dtype=torch.float8_e4m3fn, spare_rows=12), False),
}


def case_args(device, kw: dict, T: int) -> dict:
    """A problem of T tokens; the caches keep 24 rows whatever T (cache sizes are constexprs)."""
    args = make_args(device, T=T, Hq=4, Hkv=2, D=64, **{"spare_rows": 24 - T, **kw})
    if kw.get("cache_dtype") is not None:
        args["k_scale"] = torch.tensor([0.5], device=device)
        args["v_scale"] = torch.tensor([2.0], device=device)
        n_rows = args["k_cache"].shape[0]
        args["swa_table"] = torch.randperm(n_rows, device=device)
        args["slot_mapping"] = torch.randperm(n_rows, device=device)[:T]
        args["slot_mapping"][0] = -1
    return args


@pytest.mark.parametrize("case", TRACE_CASES.values(), ids=TRACE_CASES.keys())
def test_traced_graph_holds_the_kernel_op(device, traced_kernels, case):
    """Fake tensors in, Inductor's functional user-kernel op out; no fx_fusion op, no aliasing outputs."""
    module, _ = traced_kernels
    kw, return_k = case
    gm = trace(module, case_args(device, kw, T=5), return_k, "fake")
    (node,) = kernel_nodes(gm)
    assert "fx_fusion" not in gm.code
    kernel_args = node.kwargs["kwargs"]
    assert ("k_out_ptr" in kernel_args) == return_k  # not passed when not returned: no alias of q_out


class _CudaTarget:
    """Stands in for Triton's CUDA driver where there is no GPU: only the target, which is all that
    Inductor's analysis of the kernel's writes needs (it builds the kernel's TTIR for that target)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda", 0)


@pytest.fixture
def ttir_analysis():
    """Inductor's written-argument analysis, runnable without a GPU (on a GPU: the real driver)."""
    from triton.runtime import driver

    if torch.cuda.is_available():
        yield
        return
    previous = driver._active  # (reset_active() would look for a real driver, and there is none)
    driver.set_active(_CudaTarget())
    try:
        yield
    finally:
        driver._active = previous


@pytest.mark.parametrize("case", TRACE_CASES.values(), ids=TRACE_CASES.keys())
def test_kernel_writes_only_outputs_and_caches(device, traced_kernels, ttir_analysis, case):
    """Inductor decides from the kernel's TTIR which arguments it writes, following store addresses back
    through calls to every argument of the call. A write found in q, k, v, the tables or the indices
    would make Inductor copy them (and the graph pass falls back to the op): only outputs and caches."""
    module, _ = traced_kernels
    kw, return_k = case
    gm = trace(module, case_args(device, kw, T=5), return_k, "fake")
    (node,) = kernel_nodes(gm)
    written = set(node.kwargs["tensors_to_clone"])
    assert written <= {"q_out_ptr", "k_out_ptr", "k_cache_ptr", "v_cache_ptr"}, sorted(written)
    assert {"q_out_ptr", "k_cache_ptr", "v_cache_ptr"} <= written, sorted(written)


@pytest.mark.parametrize("case", TRACE_CASES.values(), ids=TRACE_CASES.keys())
def test_traced_graph_matches_reference(device, traced_kernels, monkeypatch, case):
    module, interpreted = traced_kernels
    kw, return_k = case
    args = case_args(device, kw, T=5)
    gm = trace(module, args, return_k, "fake")
    run_graph(gm, module, interpreted, monkeypatch, args, return_k)


def trace_dynamic_tokens(module, args: dict, return_k: bool, T: int) -> torch.fx.GraphModule:
    """Like ``trace``, with only the token dims symbolic (as in a graph compiled with a dynamic token dim).

    Dims of size ``T`` are dynamic, every other size and stride is static. Inputs are made contiguous
    (a view's sizes would come from its static base)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    names = [n for n, x in args.items() if isinstance(x, torch.Tensor)]
    static = {n: x for n, x in args.items() if n not in names}
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(x: torch.Tensor) -> torch.Tensor:
        dims = [DimDynamic.DYNAMIC if s == T else DimDynamic.STATIC for s in x.shape]
        return mode.from_tensor(x.contiguous(), symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    def fn(*tensors):
        p = module.prepare(**dict(zip(names, tensors)), **static)
        return module.launch_traceable(p, return_k)

    fakes = [fake(args[n]) for n in names]
    with mode:
        return make_fx(torch.func.functionalize(fn, remove="mutations"))(*fakes)


@pytest.mark.parametrize("case", ["token-packed-fused2d", "sequence-b2-partial"])
def test_symbolic_token_count_is_not_specialised(device, traced_kernels, monkeypatch, case):
    """Traced with a symbolic T (7), the graph computes the grid from T and runs right for T = 13 and 2."""
    module, interpreted = traced_kernels
    kw, return_k = TRACE_CASES[case]
    gm = trace_dynamic_tokens(module, case_args(device, kw, T=7), return_k, T=7)
    (node,) = kernel_nodes(gm)
    assert isinstance(node.kwargs["kwargs"]["T"], torch.fx.Node), "T was specialised to a constant"
    assert isinstance(node.kwargs["grid"][0][0], torch.fx.Node), "the grid was specialised to a constant"
    for T in (13, 2):
        args = {n: x.contiguous() if isinstance(x, torch.Tensor) else x for n, x in case_args(device, kw, T=T).items()}
        run_graph(gm, module, interpreted, monkeypatch, args, return_k)


def test_symbolic_constexpr_is_not_traceable(device, traced_kernels):
    """A size the kernel takes as a constexpr (here every size: all symbolic) is never pinned by the trace:
    ``launch_traceable`` raises ``NotTraceable`` naming it, and the graph pass launches the op instead."""
    module, _ = traced_kernels
    kw, return_k = TRACE_CASES["token-packed-fused2d"]
    with pytest.raises(module.NotTraceable, match=r"HQ.*compile-time constants"):
        trace(module, case_args(device, kw, T=7), return_k, "symbolic")


@pytest.mark.parametrize("case", TRACE_CASES.values(), ids=TRACE_CASES.keys())
def test_another_site_of_a_shared_launch_gets_what_fake_tensor_prop_gives(device, traced_kernels, ttir_analysis,
                                                                            case):
    """The graph pass shares one traced launch between sites (``patterns/splice.py``): another site's values are the
    launch's outputs made anew (not run again) and views of its own tensors, with the metadata and the aliasing that
    running every node again (``FakeTensorProp``) gives."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from fx_fusion.patterns.splice import _run_again, fresh_nodes
    from tests.patterns.test_splice import aliasing

    module, _ = traced_kernels
    kw, return_k = case
    gm = trace(module, case_args(device, kw, T=5), return_k, "fake")
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")])
    fresh = fresh_nodes(gm, mode)
    assert kernel_nodes(gm)[0] in fresh  # the launch's written tensors: copies of their own
    vals = [mode.from_tensor(x) for x in case_args(device, kw, T=5).values() if isinstance(x, torch.Tensor)]
    _run_again(gm, fresh, vals, mode)
    made = aliasing(vals, gm)
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*vals)
    assert made == aliasing(vals, gm)


# --------------------------------------------------------------------------------------------------
# The public op inside compiled code
# --------------------------------------------------------------------------------------------------


def test_op_runs_inside_torch_compile(device):
    """A direct call inside compiled code: on CUDA broken down into the kernel launch, elsewhere kept; same result."""
    args = case_args(device, dict(layout="token", table="packed", dtype=torch.float32), T=6)
    p = rkc.prepare(**args)
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, _ = rkc.reference(ref, False, compute_dtype=torch.float64)
    before = (p.k_cache.clone(), p.v_cache.clone())

    def step(q, k, v, k_cache, v_cache, slots, cos, sin, positions):
        q_out, _ = torch.ops.fx_fusion.rope_kv_store(q, k, v, k_cache, v_cache, slots, cos, sin, positions, None,
                                                     None, None, True, 64, "token", False, False)
        return q_out * 2

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(step, fullgraph=True)(*(args[n] for n in ("q", "k", "v", "k_cache", "v_cache",
                                                                        "slot_mapping", "cos", "sin", "positions")))
    torch._dynamo.reset()
    torch.testing.assert_close(out, 2 * q_ref, atol=1e-5, rtol=1e-5)
    addressed = addressed_rows(p)
    assert_cache("k_cache", p.k_cache, before[0], ref.k_cache, addressed, p.options.layout)
    assert_cache("v_cache", p.v_cache, before[1], ref.v_cache, addressed, p.options.layout)


def test_the_launch_counts_as_a_fused_node(device, traced_kernels, monkeypatch):
    """Dumps and pictures mark the kernel's launch as the fused op (``is_fused_node``), as they mark the op."""
    from fx_fusion.patterns import is_fused_node

    module, _ = traced_kernels
    kw, return_k = TRACE_CASES["token-packed-fused2d"]
    gm = trace(module, case_args(device, kw, T=5), return_k, "fake")
    (node,) = kernel_nodes(gm)
    monkeypatch.setitem(kernel_side_table.id_to_kernel, node.kwargs["kernel_idx"], rope_kv_kernel._rope_kv_store_kernel)
    assert is_fused_node(node)
    assert not any(is_fused_node(n) for n in gm.graph.nodes if n is not node)


@pytest.mark.parametrize("buffers", ["one", "two"])
def test_traced_launch_writes_the_buffers_of_view_caches(device, traced_kernels, ttir_analysis, monkeypatch,
                                                        buffers):
    """Caches that are views of stacked buffers (layer 1 of ``kv [2, 3, ...]``, or of ``k, v [3, ...]``), launched
    with ``buffers``: the traced kernel writes the buffers, graph inputs Inductor can update in place, and nothing
    else of the inputs; one buffer is passed once (two written arguments aliasing it would be cloned apart).
    The graph run on real tensors writes the views as the reference does and leaves the rest of the buffers."""
    module, interpreted = traced_kernels
    args = case_args(device, dict(layout="paged", table="hf", qkv="3d"), T=5)
    shape, dtype = args["k_cache"].shape, args["k_cache"].dtype
    if buffers == "one":
        bufs = [torch.randn((2, 3, *shape), dtype=dtype, device=device)]
        views = lambda b: (b[0][0, 1], b[0][1, 1])  # noqa: E731
    else:
        bufs = [torch.randn((3, *shape), dtype=dtype, device=device) for _ in range(2)]
        views = lambda b: (b[0][1], b[1][1])  # noqa: E731
    names = [n for n, x in args.items() if isinstance(x, torch.Tensor) and n not in ("k_cache", "v_cache")]
    static = {n: x for n, x in args.items() if not isinstance(x, torch.Tensor)}

    def fn(*tensors):
        given, bs = dict(zip(names, tensors[:len(names)])), list(tensors[len(names):])
        k_cache, v_cache = views(bs)
        p = module.prepare(**given, k_cache=k_cache, v_cache=v_cache, **static)
        return module.launch_traceable(p, False, buffers=(bs[0], bs[1] if len(bs) > 1 else None))

    inputs = [args[n] for n in names] + bufs
    gm = make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode="fake")(*inputs)
    (node,) = kernel_nodes(gm)
    assert set(node.kwargs["tensors_to_clone"]) == (
        {"q_out_ptr", "k_cache_ptr"} | ({"v_cache_ptr"} if buffers == "two" else set()))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    written = {n.args[0] for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)}
    assert written == set(placeholders[len(names):]), written

    k_cache, v_cache = views(bufs)
    p = rkc.prepare(**{n: args[n] for n in names}, k_cache=k_cache, v_cache=v_cache, **static)
    ref = dataclasses.replace(p, k_cache=k_cache.clone(), v_cache=v_cache.clone())
    q_ref, _ = rkc.reference(ref, False, compute_dtype=torch.float64)
    want = [b.clone() for b in bufs]
    want_views = views(want)
    want_views[0].copy_(ref.k_cache)
    want_views[1].copy_(ref.v_cache)
    if interpreted is not None:
        monkeypatch.setitem(kernel_side_table.id_to_kernel, node.kwargs["kernel_idx"], interpreted)
    q_out, _ = gm(*inputs)
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol)
    for got, expected in zip(bufs, want):
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
