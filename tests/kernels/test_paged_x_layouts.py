"""The 5-D cache layouts of AMD's fused kernels (aiter ``fused_qk_rope_reshape_and_cache``, ``flash_layout=False``):

    paged_x            k [num_blocks, Hkv, D // x, bs, x]   v [num_blocks, Hkv, D, bs]
    paged_x_shuffled   k [num_blocks, Hkv, D // x, bs, x]   v [num_blocks, Hkv, bs // x, D, x]

with x = 16 bytes / element size. Every test runs the kernel (the interpreter on CPU) on poisoned caches and
outputs and checks against the float64 reference: the elements the slots address (worked out here from the layout's
address formula, independently of the op) close to the reference's, every other element of the caches bit for bit
as before (padding slots included), and the buffers around cache views untouched. A second, independent check of
the address maths reads the 5-D caches back by explicit indexing (``k_cache[blk, h, d // x, off, d % x]``) and
compares them with the same call's result in the flash layout (``[num_blocks, bs, Hkv, D]``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

from fx_fusion.kernels.ops import rope_kv_store
from fx_fusion.kernels.rope_kv_cache import FP8_DTYPES, launch, prepare, reference
from tests.kernels.test_launch import kernel_nodes, trace, traced_kernels, ttir_analysis  # noqa: F401 (fixtures)
from tests.kernels.test_op import OP, assert_rejected, op_args, randomize_caches
from tests.kernels.test_rope_kv_cache import (
    TOLERANCES,
    assert_outside_views_unchanged,
    base_of,
    exact_fp8_casts_in_interpreter,  # noqa: F401  (autouse fixture, applies to this module too)
    make_qkv,
    make_rotary,
)

X_LAYOUTS = ("paged_x", "paged_x_shuffled")
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def x_of(dtype: torch.dtype) -> int:
    """Cache elements per 16 bytes: 8 for bf16/fp16, 16 for fp8/uint8, 4 for fp32."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def x_cache_shapes(layout: str, *, num_blocks: int, bs: int, Hkv: int, D: int, x: int) -> tuple[tuple, tuple]:
    k = (num_blocks, Hkv, D // x, bs, x)
    v = (num_blocks, Hkv, D, bs) if layout == "paged_x" else (num_blocks, Hkv, bs // x, D, x)
    return k, v


def poison(t: torch.Tensor) -> None:
    """NaN for float tensors, random bytes for fp8 and uint8 pools."""
    if t.dtype in FP8_DTYPES or t.dtype == torch.uint8:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=t.device))
    else:
        t.fill_(float("nan"))


def make_x_caches(layout: str, *, num_blocks: int, bs: int, Hkv: int, D: int, dtype, device, form: str = "contiguous"):
    """Poisoned (k_cache, v_cache) in one of these memory forms:

    "contiguous"   two tensors
    "sliced"       views into larger buffers: one block before and after, one more head, a longer last dim
    "head_major"   the head axis stored outermost ([Hkv, num_blocks, ...] seen as [num_blocks, Hkv, ...])
    """
    caches = []
    for shape in x_cache_shapes(layout, num_blocks=num_blocks, bs=bs, Hkv=Hkv, D=D, x=x_of(dtype)):
        if form == "contiguous":
            buf = torch.empty(shape, dtype=dtype, device=device)
            cache = buf
        elif form == "sliced":
            buf = torch.empty((shape[0] + 2, shape[1] + 1, *shape[2:-1], shape[-1] + 3), dtype=dtype, device=device)
            cache = buf[1:shape[0] + 1, 1:, ..., :shape[-1]]
        elif form == "head_major":
            buf = torch.empty((shape[1], shape[0], *shape[2:]), dtype=dtype, device=device)
            cache = buf.transpose(0, 1)
        else:
            raise AssertionError(form)
        poison(buf)
        caches.append(cache)
    return tuple(caches)


def crossing_slots(T: int, *, num_blocks: int, bs: int, device) -> torch.Tensor:
    """[T] int64 slots, shuffled: a run of 5 consecutive slots across the first block boundary, distinct random
    slots elsewhere, and two padding entries (-1)."""
    run = torch.arange(bs - 2, bs + 3)
    others = torch.randperm(num_blocks * bs)
    others = others[~torch.isin(others, run)][:T - run.numel()]
    slots = torch.cat([run, others])
    slots[[1, -1]] = -1
    return slots[torch.randperm(T)].to(device)


def make_x_args(device, layout: str, *, T=11, Hq=4, Hkv=2, D=64, rot=None, dtype=torch.bfloat16, cache_dtype=None,
                is_neox=True, bs=16, num_blocks=4, form="contiguous", table="packed") -> dict:
    """Keyword arguments for ``prepare`` (and ``op_args``): q/k/v slices of one fused projection, poisoned caches in
    ``layout``, slots crossing a block boundary with padding."""
    rot = D if rot is None else rot
    q, k, v = make_qkv("fused2d", batch=1, T=T, Hq=Hq, Hkv=Hkv, D=D, sequence=False, dtype=dtype, device=device)
    k_cache, v_cache = make_x_caches(layout, num_blocks=num_blocks, bs=bs, Hkv=Hkv, D=D, dtype=cache_dtype or dtype,
                                     device=device, form=form)
    cos, sin, positions = make_rotary(table, T=T, batch=1, sequence=False, rot=rot, is_neox=is_neox, dtype=dtype,
                                      table_dtype=torch.float32, pos_dtype=torch.int64, device=device)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                slot_mapping=crossing_slots(T, num_blocks=num_blocks, bs=bs, device=device), cos=cos, sin=sin,
                positions=positions, swa_table=None, k_scale=None, v_scale=None, q_scale=None, is_neox=is_neox,
                rotary_dim=rot, layout=layout)


# --------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------


def stored_blocks(slot_mapping: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token index, block, offset in the block) of every token whose slot is stored (not padding)."""
    slots = slot_mapping.reshape(-1).long()
    tokens = (slots >= 0).nonzero().reshape(-1)
    return tokens, slots[tokens] // bs, slots[tokens] % bs


def element_index(layout: str, which: str, blk, off, Hkv: int, D: int, x: int) -> tuple:
    """Index tensors ([N, Hkv, D] each) of element (token n, head h, feature d) in a 5-D cache, from the layout's
    definition (written out here, apart from the op's strides and splits)."""
    n = blk.numel()
    B = blk.reshape(n, 1, 1).expand(n, Hkv, D)
    O = off.reshape(n, 1, 1).expand(n, Hkv, D)
    H = torch.arange(Hkv, device=blk.device).reshape(1, Hkv, 1).expand(n, Hkv, D)
    F = torch.arange(D, device=blk.device).reshape(1, 1, D).expand(n, Hkv, D)
    if which == "k":
        return B, H, F // x, O, F % x
    if layout == "paged_x":
        return B, H, F, O
    return B, H, O // x, F, O % x


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(BITS[x.element_size()])


def values(x: torch.Tensor, fp8_dtype) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.view(fp8_dtype).float()
    return x.float() if x.dtype in FP8_DTYPES else x.double()


def assert_x_cache(name: str, which: str, p, got, before, want) -> None:
    """The elements the stored tokens address close to ``want``; every other element bit for bit ``before``."""
    layout = p.options.layout.value
    Hkv, D, x, bs = p.k.shape[2], p.q.shape[-1], p.x, p.block_size
    _, blk, off = stored_blocks(p.slot_mapping, bs)
    written = torch.zeros(got.shape, dtype=torch.bool, device=got.device)
    written[element_index(layout, which, blk, off, Hkv, D, x)] = True
    assert int(written.sum()) == blk.numel() * Hkv * D  # distinct slots address distinct elements
    changed = bits(got) != bits(before)
    assert not (changed & ~written).any(), (f"{name}: {int((changed & ~written).sum())} elements no token addresses "
                                            f"were written")
    stored = p.options.fp8_dtype or got.dtype
    atol, rtol = TOLERANCES[stored]
    fp8 = p.options.fp8_dtype
    torch.testing.assert_close(values(got, fp8)[written], values(want, fp8)[written], atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}, written elements: {m}")


def run_and_check(args: dict, *, return_k: bool = True, run=None, **config):
    """Prepare, launch on poisoned outputs, compare outputs and whole caches with the float64 reference.

    ``run(p) -> (q_out, k_out)``: another way to run the problem (its outputs poisoned by it)."""
    p = prepare(**args)
    before = (p.k_cache.clone(), p.v_cache.clone())
    snapshots = {id(base_of(c)): base_of(c).clone() for c in (p.k_cache, p.v_cache) if c._base is not None}
    ref = dataclasses.replace(p, k_cache=p.k_cache.clone(), v_cache=p.v_cache.clone())
    q_ref, k_ref = reference(ref, return_k, compute_dtype=torch.float64)
    if run is None:
        q_out = torch.full(p.q_shape, float("nan"), dtype=p.q.dtype, device=p.q.device)
        k_out = torch.full(p.k_shape, float("nan"), dtype=p.k.dtype, device=p.k.device) if return_k else None
        launch(p, q_out, k_out, **config)
    else:
        q_out, k_out = run(p)
    atol, rtol = TOLERANCES[p.q.dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol, msg=lambda m: f"q_out: {m}")
    if return_k:
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol, msg=lambda m: f"k_out: {m}")
    assert_x_cache("k_cache", "k", p, p.k_cache, before[0], ref.k_cache)
    assert_x_cache("v_cache", "v", p, p.v_cache, before[1], ref.v_cache)
    assert_outside_views_unchanged([p.k_cache, p.v_cache], snapshots)
    return p


# --------------------------------------------------------------------------------------------------
# Against the float64 reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rot", [None, 32], ids=["full", "partial"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_layouts(device, layout, dtype, is_neox, rot):
    """Both layouts x bf16 (x = 8) / fp32 (x = 4) x NeoX / GPT-J x full / partial rotary, GQA 6/2 heads."""
    args = make_x_args(device, layout, T=13, Hq=6, Hkv=2, D=64, rot=rot, dtype=dtype, is_neox=is_neox)
    run_and_check(args)


@pytest.mark.parametrize("form", ["sliced", "head_major"])
@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_non_contiguous_caches(device, layout, form):
    """Caches that are slices of larger buffers, or stored head-major: any strides; nothing outside the views."""
    args = make_x_args(device, layout, T=9, Hq=4, Hkv=2, D=80, rot=48, dtype=torch.float16, form=form,
                       is_neox=form == "sliced", table="hf")
    run_and_check(args)


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_many_programs(device, layout):
    """T = 37 over small tiles (several programs, a partial last one), 5 blocks of 8 slots (bf16: x = 8)."""
    args = make_x_args(device, layout, T=37, Hq=4, Hkv=2, D=32, dtype=torch.bfloat16, bs=8, num_blocks=5)
    run_and_check(args, BLOCK_RQ=16, BLOCK_RKV=8)


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_fp8_cache(device, layout):
    """float8_e4m3fn caches (x = 16) with k and v scales: quant(x) = saturate(x / scale)."""
    args = make_x_args(device, layout, T=11, Hq=4, Hkv=2, D=64, rot=32, dtype=torch.bfloat16,
                       cache_dtype=torch.float8_e4m3fn, is_neox=False)
    args.update(k_scale=torch.tensor([0.05], device=device), v_scale=torch.tensor([4.0], device=device))
    run_and_check(args)


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_uint8_pool_eager_fp8(device, layout):
    """uint8 pools holding e4m3fn bits (SGLang's fp8 pools, x = 16), written as eager's fp8 store computes them."""
    args = make_x_args(device, layout, T=11, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16, cache_dtype=torch.uint8)
    args.update(k_scale=torch.tensor([0.05], device=device), v_scale=torch.tensor([4.0], device=device),
                fp8_dtype=torch.float8_e4m3fn, quant_dtype=torch.bfloat16)
    run_and_check(args)


# --------------------------------------------------------------------------------------------------
# The address maths, checked apart from the reference: read back by explicit indexing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_reads_back_as_the_flash_layout(device, layout, cache_dtype):
    """The same call written in the 5-D layout and in the flash layout ``[num_blocks, bs, Hkv, D]``: reading
    ``k_cache[blk, h, d // x, off, d % x]`` (and v's element likewise) gives the flash cache's rows bit for bit."""
    dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    num_blocks, bs, Hkv, D = 3, 16, 2, 64
    args = make_x_args(device, layout, T=10, Hq=4, Hkv=Hkv, D=D, rot=48, dtype=dtype, cache_dtype=cache_dtype,
                       bs=bs, num_blocks=num_blocks, is_neox=False)
    if cache_dtype in FP8_DTYPES:
        args.update(k_scale=torch.tensor([0.5], device=device), v_scale=torch.tensor([2.0], device=device))
    flash = [torch.empty((num_blocks, bs, Hkv, D), dtype=cache_dtype, device=device) for _ in range(2)]
    for c in flash:
        poison(c)
    for cache_args in (args, dict(args, k_cache=flash[0], v_cache=flash[1], layout="paged")):
        p = prepare(**cache_args)
        launch(p, torch.empty(p.q_shape, dtype=p.q.dtype, device=device), None)

    x = x_of(cache_dtype)
    tokens, blk, off = stored_blocks(args["slot_mapping"], bs)
    assert tokens.numel() == 8 and (blk.unique().numel() > 1)
    for which, cache, flash_cache in (("k", args["k_cache"], flash[0]), ("v", args["v_cache"], flash[1])):
        read = cache[element_index(layout, which, blk, off, Hkv, D, x)]  # [N, Hkv, D]
        want = flash_cache[blk, off]
        assert not want.float().isnan().any()
        assert torch.equal(bits(read), bits(want)), f"{which}_cache read back differs from the flash layout"


# --------------------------------------------------------------------------------------------------
# The launch traced for Inductor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_traced_launch(device, traced_kernels, ttir_analysis, monkeypatch, layout):
    """The launch as the graph pass and the op's breakdown trace it (functionalized ``wrap_triton``): Inductor's
    analysis of the kernel's TTIR finds only the outputs and the caches written (a write found in an input would
    make Inductor copy it), and the traced graph writes what the reference does."""
    module, interpreted = traced_kernels
    args = make_x_args(device, layout, T=7, Hq=4, Hkv=2, D=64, rot=32, dtype=torch.bfloat16, is_neox=False)
    gm = trace(module, args, True, "fake")
    (node,) = kernel_nodes(gm)
    assert set(node.kwargs["tensors_to_clone"]) == {"q_out_ptr", "k_out_ptr", "k_cache_ptr", "v_cache_ptr"}
    if interpreted is not None:  # (the table holds the compiled kernel in a one-config autotuner)
        monkeypatch.setitem(kernel_side_table.id_to_kernel, node.kwargs["kernel_idx"], interpreted)

    def run(p):
        deterministic = torch.are_deterministic_algorithms_enabled()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True)  # torch.empty fills NaN: poisoned outputs
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            return gm(*(x for x in args.values() if isinstance(x, torch.Tensor)))
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.utils.deterministic.fill_uninitialized_memory = fill

    run_and_check(args, run=run)


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_op_inside_torch_compile(device, layout):
    """The op called inside compiled code (on CUDA broken down into the kernel's launch, elsewhere kept): the
    reference's result, whole caches compared."""
    args = make_x_args(device, layout, T=6, Hq=4, Hkv=2, D=64, dtype=torch.float32)
    names = ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "cos", "sin", "positions")

    def step(q, k, v, k_cache, v_cache, slots, cos, sin, positions):
        q_out, _ = OP(q, k, v, k_cache, v_cache, slots, cos, sin, positions, None, None, None, True, 64, layout)
        return q_out * 2

    def run(p):
        torch._dynamo.reset()
        try:
            with torch._inductor.config.patch(fx_graph_cache=False):
                out = torch.compile(step, fullgraph=True)(*(args[n] for n in names))
        finally:
            torch._dynamo.reset()
        return out / 2, None

    run_and_check(args, return_k=False, run=run)


# --------------------------------------------------------------------------------------------------
# The op: wrapper, opcheck, argument checks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_wrapper_and_op(device, layout):
    """``rope_kv_store`` (cos_sin_cache, layout by name) writes what the kernel's direct launch writes."""
    args = make_x_args(device, layout, T=7, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16)
    direct = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    p = prepare(**direct)
    q_want = torch.empty(p.q_shape, dtype=p.q.dtype, device=device)
    launch(p, q_want, None)
    table = torch.cat([args["cos"], args["sin"]], dim=-1)
    q_out, k_out = rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"],
                                 args["slot_mapping"], cos_sin_cache=table, positions=args["positions"], layout=layout)
    assert k_out is None
    assert torch.equal(bits(q_out), bits(q_want))
    for name in ("k_cache", "v_cache"):
        assert torch.equal(bits(args[name]), bits(direct[name])), name


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_wrapper_default_rotary_dim_reads_head_dim_from_the_5d_cache(device, layout):
    """``rotary_dim=None``: the wrapper tells cos's width apart by the caches' head_dim, which the 5-D k_cache holds
    as ``(D // x) * x``, not in its last dim (x)."""
    args = make_x_args(device, layout, T=5, Hq=4, Hkv=2, D=64, rot=32, dtype=torch.bfloat16)  # cos: 16 columns
    before = [bits(args[n]).clone() for n in ("k_cache", "v_cache")]
    with pytest.raises(ValueError, match=r"^rotary_dim is needed"):  # 16 is rotary_dim 16 or 32 for D = 64
        rope_kv_store(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"], args["slot_mapping"],
                      cos=args["cos"], sin=args["sin"], positions=args["positions"], layout=layout)
    assert all(torch.equal(bits(args[n]), b) for n, b in zip(("k_cache", "v_cache"), before))
    # 48 columns: only rotary_dim 48 fits D = 64; the same as saying it
    args = make_x_args(device, layout, T=5, Hq=4, Hkv=2, D=64, rot=48, dtype=torch.bfloat16, table="hf")
    said = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    common = dict(cos=args["cos"], sin=args["sin"], layout=layout)
    tensors = ("q", "k", "v", "k_cache", "v_cache", "slot_mapping")
    q1, _ = rope_kv_store(*(args[n] for n in tensors), **common)
    q2, _ = rope_kv_store(*(said[n] for n in tensors), rotary_dim=48, **common)
    assert torch.equal(bits(q1), bits(q2))
    assert torch.equal(bits(args["k_cache"]), bits(said["k_cache"]))


@pytest.mark.parametrize("layout", X_LAYOUTS)
def test_opcheck(device, layout):
    """opcheck: schema (only the caches mutated), autograd registration, fake tensors, AOT dispatch."""
    args = randomize_caches(make_x_args(device, layout, T=5, Hq=4, Hkv=2, D=32, dtype=torch.float32, bs=8,
                                        num_blocks=3))
    torch.library.opcheck(OP.default, op_args(args, return_k=True))


def test_fake_shapes():
    """The fake implementation checks the 5-D caches as the real one does, and gives q/k's shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for layout in X_LAYOUTS:
        args = make_x_args("cpu", layout, T=5, Hq=4, Hkv=2, D=32, dtype=torch.float32, bs=8, num_blocks=3)
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args(args, return_k=True)]
            q_out, k_out = OP(*fake)
        assert q_out.shape == args["q"].shape and k_out.shape == args["k"].shape


def _with(layout: str, **changes):
    """A change to a valid bf16 problem (Hkv 2, D 64, 4 blocks of 16 slots, x = 8) in ``layout``."""
    def change(args):
        for name, value in changes.items():
            args[name] = value(args) if callable(value) else value
        return args
    return layout, change


def _nan(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype)


BAD_CACHES = {
    # id: ((layout, change), match: the argument's name first)
    "k-x-of-fp32": (_with("paged_x", k_cache=_nan(4, 2, 16, 16, 4)), r"^k_cache must be \[num_blocks, Hkv, D // x, "
                                                                       r"block_size, x\] .* x = 16 bytes / element "
                                                                       r"size = 8 for torch.bfloat16"),
    "k-4d": (_with("paged_x", k_cache=_nan(4, 16, 2, 64)), r"^k_cache must have 5 dims"),
    "v-flash": (_with("paged_x", v_cache=_nan(4, 16, 2, 64)), r"^v_cache must have shape \(4, 2, 64, 16\)"),
    "v-blocks": (_with("paged_x", v_cache=_nan(5, 2, 64, 16)), r"^v_cache must have shape \(4, 2, 64, 16\)"),
    "v-heads": (_with("paged_x_shuffled", v_cache=_nan(4, 1, 2, 64, 8)),
                r"^v_cache must have shape \(4, 2, 2, 64, 8\)"),
    "v-d-not-multiple": (_with("paged_x", v_cache=_nan(4, 2, 60, 16)), r"^v_cache has head_dim D = 60 .* not a "
                                                                        r"multiple of x = 8"),
    "k-d-mismatch": (_with("paged_x", k_cache=_nan(4, 2, 4, 16, 8)), r"^v_cache must have shape \(4, 2, 32, 16\) .* "
                                                                      r"k_cache of shape \(4, 2, 4, 16, 8\) "
                                                                      r"\(D = 32\), got \(4, 2, 64, 16\)"),
    "v-4d-for-shuffled": (_with("paged_x_shuffled", v_cache=_nan(4, 2, 64, 16)), r"^v_cache must have 5 dims"),
    "v-shuffled-for-paged-x": (_with("paged_x", v_cache=_nan(4, 2, 2, 64, 8)), r"^v_cache must have 4 dims"),
    "shuffled-block-size-12": (_with("paged_x_shuffled", k_cache=_nan(4, 2, 8, 12, 8), v_cache=_nan(4, 2, 1, 64, 8)),
                               r"^k_cache has block_size 12 .* not a multiple of x = 8"),
    "v-dtype": (_with("paged_x", v_cache=_nan(4, 2, 64, 16, dtype=torch.float16)), r"^v_cache must have dtype"),
    "q-head-dim": (_with("paged_x", k_cache=_nan(4, 2, 4, 16, 8), v_cache=_nan(4, 2, 32, 16),
                         **{n: (lambda a, n=n: a[n].unflatten(-1, (-1, 64))) for n in ("q", "k", "v")}),
                   r"^q has head_dim 64, but the caches have 32"),
}


@pytest.mark.parametrize("case,match", BAD_CACHES.values(), ids=BAD_CACHES.keys())
def test_bad_caches_are_rejected_before_anything_is_written(case, match):
    """Each bad shape, x or dtype: a ValueError/TypeError naming the argument, and no cache written."""
    layout, change = case
    args = change(make_x_args("cpu", layout, T=5, Hq=4, Hkv=2, D=64, dtype=torch.bfloat16))
    exc = TypeError if "dtype" in match else ValueError
    assert_rejected(args, exc, match)
