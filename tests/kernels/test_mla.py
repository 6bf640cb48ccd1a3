"""``torch.ops.fx_fusion.mla_rope_store``: the MLA kernel against its float64 reference and against eager model code.

Every test builds fresh random inputs (in the forms models pass them: splits of one projection's output), a
poisoned cache (NaN, or random bytes for fp8 and uint8 pools) and compares:

* q_out / k_pe_out (NaN-filled before the launch) with the reference, within the output dtype's tolerance;
* the cache rows the slots address (worked out here, independently of the reference) with the reference's, and
  every other row byte-identical to before the call;
* in ``test_eager_*``: q_out and the whole cache byte for byte with eager model code (DeepSeek's RoPE in fp32,
  ``torch.cat``, ``pool[loc] = ...`` with eager's fp8 cast as SGLang and vLLM write it).

On CPU the kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``, set by the conftest).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fx_fusion import kernels
from fx_fusion.kernels import mla, mla_op
from fx_fusion.kernels.options import FP8_DTYPES, MlaOptions
from tests.kernels.test_rope_kv_cache import INTERPRETED, TOLERANCES, as_bytes, rope_angles

OP = torch.ops.fx_fusion.mla_rope_store
MAX_POSITION = 256
TENSORS = ("q_pe", "q_nope", "k_pe", "kv_c", "kv_cache", "slot_mapping", "cos", "sin", "positions", "k_scale",
           "k_pe_cache")


# --------------------------------------------------------------------------------------------------
# Building problems
# --------------------------------------------------------------------------------------------------


def poison(t: torch.Tensor) -> None:
    if t.dtype in FP8_DTYPES or t.dtype == torch.uint8:
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=t.device))
    else:
        t.fill_(float("nan"))


def make_mla(device, *, T=5, Hq=3, L=24, LQ=16, R=8, dtype=torch.bfloat16, layout="token", head_axis=True,
             block_size=4, n_slots=24, cache_dtype=None, table="packed", is_neox=True, k_pe_3d=False,
             strided_cache=False, slots=None, **options) -> dict:
    """The op's arguments by name, inputs as views of one projection each (q: ``[T, Hq, LQ + R]`` split; kv_c and
    k_pe: a ``[T, L + R + 8]`` projection split, as DeepSeek's kv_a_proj output), slots distinct in [0, n_slots)
    unless given (a token layout's cache has ``n_slots`` rows, a paged one ``n_slots / block_size`` blocks)."""
    q = torch.randn(T, Hq, LQ + R, dtype=dtype, device=device)
    q_nope, q_pe = q.split([LQ, R], dim=-1) if LQ else (None, q)
    kv = torch.randn(T, L + R + 8, dtype=dtype, device=device)
    kv_c, k_pe, _ = kv.split([L, R, 8], dim=-1)
    if k_pe_3d:
        kv_c, k_pe = kv_c.unsqueeze(1), k_pe.unsqueeze(1)
    rows = (n_slots,) if layout == "token" else (n_slots // block_size, block_size)
    shape = (*rows, 1, L + R) if head_axis else (*rows, L + R)
    cache_dtype = cache_dtype or dtype
    if strided_cache:  # one layer of a stacked two-layer buffer, rows padded: every stride differs from contiguous
        buf = torch.empty((2, *shape[:-1], L + R + 4), dtype=cache_dtype, device=device)
        poison(buf)
        kv_cache = buf[1, ..., : L + R]
    else:
        kv_cache = torch.empty(shape, dtype=cache_dtype, device=device)
        poison(kv_cache)
    if slots is None:
        slots = torch.randperm(n_slots, device=device)[:T]
    slot_mapping = torch.as_tensor(slots, dtype=torch.int64, device=device)
    positions = torch.randint(0, MAX_POSITION, (T,), device=device)
    ang = rope_angles(torch.arange(MAX_POSITION, device=device), R // 2)
    if table == "packed":  # SGLang's cos_sin_cache halves
        csc = torch.cat([ang.cos(), ang.sin()], dim=-1).float()
        cos, sin = csc[:, : R // 2], csc[:, R // 2:]
    elif table == "per_element":  # [P, R] tables, one value per feature
        rep = (lambda a: torch.cat([a, a], -1)) if is_neox else (lambda a: a.repeat_interleave(2, -1))
        cos, sin = rep(ang.cos()).float(), rep(ang.sin()).float()
    elif table == "per_token":  # HF-style per-token rows [T, R / 2], no positions
        cos, sin = ang.cos()[positions].float(), ang.sin()[positions].float()
        positions = None
    else:
        raise AssertionError(table)
    return dict(q_pe=q_pe, q_nope=q_nope, k_pe=k_pe, kv_c=kv_c, kv_cache=kv_cache, slot_mapping=slot_mapping,
                cos=cos, sin=sin, positions=positions, k_scale=None, is_neox=is_neox, layout=layout, **options)


def split(args: dict) -> tuple[dict, dict]:
    return {n: args.get(n) for n in TENSORS}, {n: v for n, v in args.items() if n not in TENSORS}


def addressed(p: mla.MlaProblem) -> torch.Tensor:
    """[num_slots] bool: the rows the call writes (worked out here from the slots and the options)."""
    slots = p.slot_mapping[0].long().tolist()
    out = torch.zeros(p.num_slots, dtype=torch.bool)
    for s in slots:
        if s < 0 and p.options.negative_wraps:
            s += p.num_slots
        if 0 <= s < p.num_slots:
            out[s] = True
    return out


def flat_rows(p: mla.MlaProblem, cache: torch.Tensor) -> torch.Tensor:
    rows = cache.squeeze(-2) if cache.dim() == p.cache_rows.dim() + 1 else cache
    return rows.reshape(p.num_slots, rows.shape[-1])


def run(args: dict, **config) -> tuple:
    """Run the op (or, with ``config``, ``mla.launch`` with those block sizes) and check it against the float64
    reference: outputs, addressed rows, untouched rows byte-identical. Returns (problem, q_out, k_out)."""
    tensors, options = split(args)
    p = mla.prepare_mla(**tensors, **options)
    before = p.kv_cache.clone()
    ref = mla.reference_problem(p)
    q_ref, k_ref = mla.reference(ref, compute_dtype=torch.float64)
    if config:
        q_out, k_out = mla.outputs(p)
        q_out.fill_(float("nan")), k_out.fill_(float("nan"))
        mla.launch(p, q_out, k_out if p.options.return_k else None, **config)
    else:
        q_out, k_out = OP(**tensors, **MlaOptions(**options).op_arguments())
    atol, rtol = TOLERANCES[p.q_pe.dtype]
    assert q_out.shape == p.q_out_shape and q_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol, msg=lambda m: f"q_out: {m}")
    if p.q_nope is not None:  # copied, not computed
        assert torch.equal(as_bytes(q_out[..., : p.q_nope_dim]), as_bytes(p.q_nope))
    if p.options.return_k:
        assert k_out.shape == p.k_pe_shape
        torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol, msg=lambda m: f"k_out: {m}")
    else:
        assert k_out.shape == (0,)
    rows = addressed(p)
    got, want, old = flat_rows(p, p.kv_cache), flat_rows(p, ref.kv_cache), flat_rows(p, before)
    assert torch.equal(as_bytes(got[~rows]), as_bytes(old[~rows])), "a row no slot addresses was written"
    stored = p.stored_dtype
    if stored in FP8_DTYPES:
        got_v, want_v = got[rows].view(stored).float(), want[rows].view(stored).float()
        c_atol, c_rtol = TOLERANCES[stored]
    else:
        got_v, want_v = got[rows].double(), want[rows].double()
        c_atol, c_rtol = atol, rtol
    torch.testing.assert_close(got_v, want_v, atol=c_atol, rtol=c_rtol, msg=lambda m: f"kv_cache: {m}")
    return p, q_out, k_out


# --------------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------------

CASES = {
    # id: make_mla keyword arguments
    "token-neox-bf16": dict(),
    "paged-gptj-fp32-no-q_nope": dict(layout="paged", is_neox=False, dtype=torch.float32, LQ=0, return_k=True),
    "token-2d-cache-gptj-fp16-k3d": dict(head_axis=False, is_neox=False, dtype=torch.float16, k_pe_3d=True,
                                         return_k=True),
    "paged-2d-cache-neox-bf16-return-k": dict(layout="paged", head_axis=False, return_k=True),
    "per-element-table-gptj": dict(table="per_element", is_neox=False, dtype=torch.float32),
    "per-token-table": dict(table="per_token", layout="paged"),
    "table-dtype-bf16": dict(table_dtype=torch.bfloat16, dtype=torch.float32),
    "strided-cache-paged": dict(layout="paged", strided_cache=True, return_k=True),
    # padding (-1) and out-of-range slots skipped; slots 3 -> 4 -> 7 -> 8 cross blocks of 4
    "paged-padding-across-blocks": dict(layout="paged", T=7, slots=[3, -1, 4, 7, 8, 99, -5]),
    "token-negative-wraps": dict(T=4, slots=[-1, 2, -24, 21], negative_wraps=True),  # rows 23, 2, 0, 21: distinct
    "T0": dict(T=0, return_k=True),
    "T1-lq-ne-l": dict(T=1, L=40, LQ=12),
    "fp8-cache-saturating": dict(cache_dtype=torch.float8_e4m3fn, k_scale=0.01, layout="paged"),
    "fp8-e5m2-cache": dict(cache_dtype=torch.float8_e5m2, k_scale=0.5, dtype=torch.float32),
}
QUICK = ("token-neox-bf16", "paged-gptj-fp32-no-q_nope", "paged-padding-across-blocks", "fp8-cache-saturating")


@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=() if i in QUICK else pytest.mark.full)
                                  for i, c in CASES.items()])
def test_matches_reference(device, case):
    case = dict(case)
    k_scale = case.pop("k_scale", None)
    args = make_mla(device, **case)
    if k_scale is not None:
        args["k_scale"] = torch.tensor([k_scale], device=device)
    run(args)


@pytest.mark.parametrize("Hq, LQ", [pytest.param(16, 512, id="decode-hq16"), pytest.param(16, 128, id="prefill-hq16"),
                                    pytest.param(128, 512, id="decode-hq128", marks=pytest.mark.full)])
def test_deepseek_v3_shapes(device, Hq, LQ):
    """L = 512, R = 64 (rows of 576), qk_nope 128 (prefill) or the absorbed 512 (decode)."""
    run(make_mla(device, T=3, Hq=Hq, L=512, LQ=LQ, R=64, layout="paged", block_size=16, n_slots=64, return_k=True))


def test_many_programs_with_tails(device):
    """Small tiles: many q and kv programs, the last ones partly masked (T * Hq and T not multiples of the tile)."""
    run(make_mla(device, T=13, Hq=3, n_slots=32, return_k=True), BLOCK_RQ=4, BLOCK_RKV=2)
    run(make_mla(device, T=5, Hq=1, LQ=0, layout="paged"), BLOCK_RQ=1, BLOCK_RKV=1)


def test_reference_is_eager_deepseek_rope(device):
    """The float64 reference itself against the rotary written as DeepSeek's model code writes it (HF:
    rotate_half on de-interleaved features for GPT-J pairs) — so the tests above do not rest on it alone."""
    for is_neox in (True, False):
        args = make_mla(device, dtype=torch.float32, is_neox=is_neox, return_k=True)
        tensors, options = split(args)
        p = mla.prepare_mla(**tensors, **options)
        q_ref, k_ref = mla.reference(mla.reference_problem(p))
        half = p.rotary_dim // 2
        ang = rope_angles(args["positions"], half)
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

        def rope(x):  # x [T, H, R]
            if not is_neox:  # DeepSeek's HF code: (a0 b0 a1 b1 ...) -> (a0 a1 ... b0 b1 ...), then NeoX
                x = x.unflatten(-1, (half, 2)).transpose(-1, -2).flatten(-2)
            rot = torch.cat([-x[..., half:], x[..., :half]], -1)
            out = x * cos[:, None] + rot * sin[:, None]
            return out if is_neox else out.unflatten(-1, (2, half)).transpose(-1, -2).flatten(-2)

        q_want = torch.cat([p.q_nope.double(), rope(p.q_pe.double())], -1)
        torch.testing.assert_close(q_ref.double(), q_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_ref.double(), rope(p.k_pe[:, None].double())[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not INTERPRETED, reason="the CPU fallback runs only without the interpreter")
def test_cpu_fallback_without_interpreter_matches_kernel(monkeypatch):
    """On CPU without the interpreter the op computes the reference in fp32: the kernel's results, to rounding."""
    args = make_mla("cpu", layout="paged", return_k=True, slots=[1, -1, 5, 6, 30])
    tensors, options = split(args)
    copy = dict(tensors, kv_cache=tensors["kv_cache"].clone())
    q1, k1 = OP(**tensors, **MlaOptions(**options).op_arguments())
    monkeypatch.setattr(mla_op, "interpreted", lambda: False)
    q2, k2 = OP(**copy, **MlaOptions(**options).op_arguments())
    torch.testing.assert_close(q1, q2, atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(k1, k2, atol=1e-2, rtol=1.6e-2)
    same_nan = tensors["kv_cache"].isnan() == copy["kv_cache"].isnan()
    assert same_nan.all()
    torch.testing.assert_close(tensors["kv_cache"].nan_to_num(), copy["kv_cache"].nan_to_num(), atol=1e-2, rtol=1.6e-2)


# --------------------------------------------------------------------------------------------------
# Byte for byte against eager model code
# --------------------------------------------------------------------------------------------------


def eager_rope_fp32(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """RoPE of x [T, H, R] computed in fp32 (a model that upcasts), rounded to x's dtype once."""
    xf, c, s = x.float(), cos_half[:, None].float(), sin_half[:, None].float()
    if is_neox:
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], -1).flatten(-2).to(x.dtype)


EAGER_CASES = {
    # id: (make_mla keyword arguments, the store as eager writes it: "sglang" (uint8 pool, in-place div_: the
    # quotient in the model dtype), "vllm" ((row / k_scale).to(fp8), a [1] fp32 scale: an fp32 quotient),
    # "clamp_mul" ((row * inv).clamp(-448, 448).to(fp8), a 0-d scale: a bf16 product), "plain" (no quantisation:
    # a bf16 cache); k_scale)
    "sglang-uint8-pool": (dict(), "sglang", 0.02),
    "sglang-uint8-pool-deepseek": (dict(T=4, Hq=16, L=512, LQ=512, R=64, n_slots=16), "sglang", 0.01),
    "vllm-fp8-paged-gptj": (dict(layout="paged", head_axis=False, is_neox=False), "vllm", 0.005),
    "clamp-mul-fp8-e4m3": (dict(layout="paged"), "clamp_mul", 0.004),
    "plain-bf16": (dict(LQ=0), "plain", None),
}
EAGER_QUICK = ("sglang-uint8-pool", "vllm-fp8-paged-gptj", "plain-bf16")


@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=() if i in EAGER_QUICK else pytest.mark.full)
                                  for i, c in EAGER_CASES.items()])
def test_eager_store_byte_exact(device, case):
    """The cache and q_out bit for bit what eager model code writes (SGLang: ``pool[loc] = cat([kv_c, k_pe],
    -1).view(-1, 1, L + R)`` after an in-place ``div_(k_scale)`` and ``.to(fp8).view(uint8)``; vLLM: ``(row /
    k_scale).to(fp8)``), with values pushed past the fp8 range."""
    kw, spelling, scale = case
    fp8 = torch.float8_e4m3fn
    cache_dtype = {"sglang": torch.uint8, "plain": None}.get(spelling, fp8)
    options = {"sglang": dict(fp8_dtype=fp8, quant_dtype=torch.bfloat16), "vllm": dict(quant_dtype=torch.float32),
               "clamp_mul": dict(quant_dtype=torch.bfloat16, scale_mul=True, clamp=(-448.0, 448.0)),
               "plain": {}}[spelling]
    args = make_mla(device, cache_dtype=cache_dtype, **kw, **options)
    args["kv_c"].mul_(8)  # past 448 * scale for a few values
    if scale is not None:
        args["k_scale"] = torch.tensor(1 / scale if spelling == "clamp_mul" else scale, device=device)
        if spelling == "vllm":
            args["k_scale"] = args["k_scale"].reshape(1)
    tensors, opts = split(args)
    p = mla.prepare_mla(**tensors, **opts)
    pool = p.kv_cache.clone()

    # eager
    pos = args["positions"]
    c, s = args["cos"][pos], args["sin"][pos]
    q_rot = eager_rope_fp32(p.q_pe, c, s, args["is_neox"])
    k_rot = eager_rope_fp32(p.k_pe[:, None], c, s, args["is_neox"])[:, 0]
    row = torch.cat([p.kv_c, k_rot], -1)
    k_scale = args["k_scale"]
    if spelling == "sglang":
        row = row.clone().div_(k_scale).to(fp8).view(torch.uint8)
    elif spelling == "vllm":
        row = (row / k_scale).to(fp8)
    elif spelling == "clamp_mul":
        row = (row * k_scale).clamp(-448, 448).to(fp8)
    loc = args["slot_mapping"]
    if args["layout"] == "paged":
        bs = pool.shape[1]
        pool[loc // bs, loc % bs] = row.view(len(loc), *pool.shape[2:])
    else:
        pool[loc] = row.view(-1, *pool.shape[1:])
    q_eager = torch.cat([p.q_nope, q_rot], -1) if p.q_nope is not None else q_rot

    if device.type == "cuda" and spelling in ("sglang", "clamp_mul"):
        # eager CUDA reads a 0-d CUDA scale rounded to the quotient's dtype (``patterns/quant.py::scale_rounding``):
        # the op rounds it as it loads it, as the graph pass asks of it
        opts = dict(opts, scale_round=True)
    q_out, _ = OP(**tensors, **MlaOptions(**opts).op_arguments())
    assert torch.equal(as_bytes(q_out), as_bytes(q_eager))
    assert torch.equal(as_bytes(p.kv_cache), as_bytes(pool))
    if scale is not None:  # the values did cross the fp8 range (saturated to 448)
        assert (pool.view(torch.uint8) & 0x7F == 0x7E).any()


# --------------------------------------------------------------------------------------------------
# The op: registration, opcheck, torch.compile, the wrapper
# --------------------------------------------------------------------------------------------------


def test_registered_schema():
    schema = OP.default._schema
    assert [a.name for a in schema.arguments] == [*TENSORS, *(f.name for f in dataclasses.fields(MlaOptions))]
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"kv_cache", "k_pe_cache"} and len(schema.returns) == 2


def finite_cache(args: dict) -> dict:
    c = args["kv_cache"]
    c.copy_(torch.randn(c.shape, device=c.device).to(c.dtype))
    return args


@pytest.mark.parametrize("kw", [pytest.param(dict(dtype=torch.float32, return_k=True), id="token-fp32-q_nope"),
                                pytest.param(dict(layout="paged", LQ=0, k_pe_3d=True), id="paged-bf16-no-q_nope",
                                             marks=pytest.mark.full)])
def test_opcheck(device, kw):
    tensors, options = split(finite_cache(make_mla(device, T=3, **kw)))
    args = tuple(tensors[n] for n in TENSORS)
    torch.library.opcheck(OP.default, args, MlaOptions(**options).op_arguments())


def test_torch_compile_fullgraph(device, codes):
    """A small function calling the wrapper compiles without a graph break; on CPU the op stays opaque."""
    args = make_mla(device, layout="paged", return_k=True)
    tensors, _ = split(args)
    csc = torch.cat([args["cos"], args["sin"]], -1)

    def fn(q_pe, q_nope, k_pe, kv_c, kv_cache, slot_mapping, positions):
        q_out, k_out = kernels.mla_rope_store(q_pe, k_pe, kv_c, kv_cache, slot_mapping, q_nope=q_nope,
                                              cos_sin_cache=csc, positions=positions, layout="paged",
                                              return_k=True)
        return q_out * 2, k_out

    inputs = [tensors[n] for n in ("q_pe", "q_nope", "k_pe", "kv_c", "kv_cache", "slot_mapping", "positions")]
    eager_inputs = [x.clone() for x in inputs]
    want = fn(*eager_inputs)
    got = torch.compile(fn, fullgraph=True)(*inputs)
    for g, w in zip(got, want):
        assert torch.equal(as_bytes(g), as_bytes(w))
    assert torch.equal(as_bytes(inputs[4]), as_bytes(eager_inputs[4]))
    if device.type == "cpu":
        assert any("fx_fusion.mla_rope_store" in code for code in codes)


def test_wrapper_per_token_cos_sin_and_check_bounds(device):
    args = make_mla(device, table="per_token")
    tensors, _ = split(args)
    q1, k1 = kernels.mla_rope_store(tensors["q_pe"], tensors["k_pe"], tensors["kv_c"], tensors["kv_cache"].clone(),
                                    tensors["slot_mapping"], q_nope=tensors["q_nope"], cos=args["cos"],
                                    sin=args["sin"], check_bounds=True)
    assert k1 is None
    q2, _ = run(args)[1:]
    assert torch.equal(as_bytes(q1), as_bytes(q2))


# --------------------------------------------------------------------------------------------------
# Bad arguments: each named, nothing written
# --------------------------------------------------------------------------------------------------


def _set(name, value):
    def change(a):
        a[name] = value(a) if callable(value) else value
    return change


BAD = {
    # id: (change to make_mla's arguments, exception, message)
    "q_pe-2d": (_set("q_pe", lambda a: a["q_pe"][:, 0]), ValueError, r"^q_pe must have 3 dims"),
    "q_pe-int": (_set("q_pe", lambda a: a["q_pe"].to(torch.int32)), TypeError, r"^q_pe must have dtype"),
    "q_pe-odd-R": (_set("q_pe", lambda a: a["q_pe"][..., :7]), ValueError, r"^q_pe must be \[T, Hq, R\]"),
    "q_nope-heads": (_set("q_nope", lambda a: a["q_nope"][:, :2]), ValueError, r"^q_nope must be \[T, Hq, LQ\]"),
    "q_nope-dtype": (_set("q_nope", lambda a: a["q_nope"].half()), TypeError, r"^q_nope must have dtype"),
    "k_pe-width": (_set("k_pe", lambda a: a["k_pe"][:, :6]), ValueError, r"^k_pe must have 5 tokens of R = 8"),
    "k_pe-heads": (_set("k_pe", lambda a: a["k_pe"][:, None].expand(5, 2, 8)), ValueError,
                   r"^k_pe must be \[T, R\] or \[T, 1, R\]"),
    "kv_c-tokens": (_set("kv_c", lambda a: a["kv_c"][:4]), ValueError, r"^kv_c must have 5 tokens"),
    "kv_c-device": (_set("kv_c", lambda a: a["kv_c"].to("meta")), ValueError, r"^kv_c is on meta"),
    "kv_cache-width": (_set("kv_cache", lambda a: a["kv_cache"][..., :30]), ValueError,
                       r"^kv_cache has rows of 30 features .* expected L \+ R = 24 \+ 8 = 32"),
    "kv_cache-heads": (_set("kv_cache", lambda a: a["kv_cache"].expand(24, 2, 32)), ValueError,
                       r"^kv_cache has 2 heads"),
    "kv_cache-dtype": (_set("kv_cache", lambda a: a["kv_cache"].half()), TypeError, r"^kv_cache must have dtype"),
    "kv_cache-dims-for-paged": (lambda a: a.update(layout="paged", kv_cache=a["kv_cache"][:, 0]), ValueError,
                                r"^kv_cache must have 3 or 4 dims"),
    "uint8-without-fp8_dtype": (_set("kv_cache", lambda a: a["kv_cache"].view(torch.uint8)[..., :32]), TypeError,
                                r"^kv_cache must have dtype"),
    "fp8_dtype-without-quant_dtype": (lambda a: a.update(kv_cache=a["kv_cache"].view(torch.uint8)[..., :32],
                                                         fp8_dtype=torch.float8_e4m3fn),
                                      ValueError, r"^fp8_dtype .* without quant_dtype"),
    "slot_mapping-float": (_set("slot_mapping", lambda a: a["slot_mapping"].float()), TypeError,
                           r"^slot_mapping must have dtype"),
    "slot_mapping-length": (_set("slot_mapping", lambda a: a["slot_mapping"][:4]), ValueError,
                            r"^slot_mapping must have shape \[5\]"),
    "positions-float": (_set("positions", lambda a: a["positions"].float()), TypeError, r"^positions must have dtype"),
    "cos-width": (lambda a: a.update(cos=a["cos"][:, :3], sin=a["sin"][:, :3]), ValueError, r"^cos has 3 features"),
    "sin-shape": (_set("sin", lambda a: a["sin"][:10]), ValueError, r"^sin has shape"),
    "cos-per-token-rows": (_set("positions", None), ValueError, r"^cos without positions must hold one row per token"),
    "k_scale-bf16-cache": (_set("k_scale", lambda a: torch.ones(1)), ValueError,
                           r"^k_scale is given, but the caches are torch.bfloat16"),
    "k_scale-two": (lambda a: a.update(kv_cache=torch.zeros(24, 1, 32, dtype=torch.float8_e4m3fn),
                                       k_scale=torch.ones(2)), ValueError, r"^k_scale must hold one"),
    "layout-paged_x": (_set("layout", "paged_x"), ValueError,
                       r"^layout must be one of \['token', 'paged', 'sequence'\]"),
    "clamp-without-quant": (_set("clamp", (-1.0, 1.0)), ValueError, r"^clamp is given without quant_dtype"),
    "kv_c-overlaps-cache": (_set("kv_c", lambda a: a["kv_cache"][:5, 0, :24]), ValueError,
                            r"^kv_c overlaps kv_cache"),
    "validate-slot": (lambda a: a.update(validate=True, slot_mapping=torch.tensor([0, 1, 2, 3, 24])), ValueError,
                      r"slot_mapping has slots outside the token cache's 24 slots"),
    "validate-position": (lambda a: a.update(validate=True, positions=torch.tensor([0, 1, 2, 3, MAX_POSITION])),
                          ValueError, r"^positions must lie in \[0, 256\)"),
    "check_slots": (lambda a: a.update(check_slots=True, slot_mapping=torch.tensor([0, 1, 2, 3, 24])), IndexError,
                    r"slot_mapping has slots outside"),
}
BAD_QUICK = ("q_pe-2d", "k_pe-width", "kv_cache-width", "slot_mapping-length", "kv_c-overlaps-cache", "check_slots")


@pytest.mark.parametrize("change, exc, match", [
    pytest.param(*c, id=i, marks=() if i in BAD_QUICK else pytest.mark.full) for i, c in BAD.items()])
def test_bad_argument(change, exc, match):
    """Through the op: the error names the argument, and the cache is byte-identical afterwards."""
    args = make_mla("cpu")
    change(args)
    cache = args["kv_cache"]
    before = as_bytes(cache).clone()
    tensors, options = split(args)
    with pytest.raises(exc, match=match):
        OP(**tensors, **MlaOptions(**options).op_arguments())
    assert torch.equal(as_bytes(cache), before)


def test_wrapper_bad_arguments_name_them():
    args = make_mla("cpu")
    tensors, _ = split(args)
    before = as_bytes(tensors["kv_cache"]).clone()
    common = (tensors["q_pe"], tensors["k_pe"], tensors["kv_c"], tensors["kv_cache"], tensors["slot_mapping"])
    with pytest.raises(ValueError, match=r"^cos_sin_cache has 6 columns, expected q_pe's R=8"):
        kernels.mla_rope_store(*common, cos_sin_cache=torch.randn(16, 6), positions=args["positions"])
    with pytest.raises(TypeError, match=r"^'rotary_dim' is not an option of the fused MLA RoPE \+ cache store"):
        kernels.mla_rope_store(*common, cos=args["cos"], sin=args["sin"], positions=args["positions"], rotary_dim=8)
    with pytest.raises(ValueError, match=r"^give the rotary table"):
        kernels.mla_rope_store(*common)
    assert torch.equal(as_bytes(tensors["kv_cache"]), before)


def test_fake_tensors_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = make_mla("cpu", LQ=12, return_k=True, k_pe_3d=True)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        tensors = {n: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for n, x in split(args)[0].items()}
        q_out, k_out = OP(**tensors, **MlaOptions(**split(args)[1]).op_arguments())
        assert q_out.shape == (5, 3, 20) and k_out.shape == (5, 1, 8)
        with pytest.raises(ValueError, match=r"^kv_cache has rows of"):
            OP(**dict(tensors, kv_cache=tensors["kv_cache"][..., :31]), **MlaOptions().op_arguments())


def test_launch_config_gpu_tiles(monkeypatch):
    """Off the interpreter: about 2K elements a program at large T, down to one row a program for decode."""
    monkeypatch.setattr("fx_fusion.kernels.mla.interpreted", lambda: False)
    big = mla.prepare_mla(**split(make_mla("cpu", T=8192, Hq=16, L=512, LQ=512, R=64, n_slots=8192))[0])
    cfg = mla.launch_config(big)
    assert (cfg["BLOCK_L"], cfg["BLOCK_LQ"], cfg["BLOCK_HALF"]) == (512, 512, 32)
    assert cfg["BLOCK_RQ"] * 576 <= 4096 and cfg["BLOCK_RKV"] * 576 <= 4096 and cfg["BLOCK_RQ"] >= 2
    small = mla.prepare_mla(**split(make_mla("cpu", T=1, Hq=16, L=512, LQ=512, R=64, n_slots=8))[0])
    assert mla.launch_config(small)["BLOCK_RQ"] == mla.launch_config(small)["BLOCK_RKV"] == 1


def test_a_dynamic_token_count_pins_no_constexpr():
    """Under torch.compile with a dynamic token count every size and stride the kernel takes as a constexpr stays a
    plain int, for the inputs the absorbed decode passes (q_pe a slice of q's projection, q_nope a permute of the
    ``[Hq, T, LQ]`` bmm output, whose head stride is T * LQ): the launch traces instead of leaving the op opaque
    (a symbolic q_pe head stride once did: 370 us a call on the H200's host). Sizes are made symbolic as Dynamo
    makes a dynamic dimension: T in every input, each its own symbol."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from fx_fusion.kernels.launch import _constexpr_names
    from fx_fusion.kernels.mla_kernel import _mla_rope_store_kernel

    tensors, options = split(make_mla("cpu", T=6, Hq=4, L=32, LQ=32, R=8))
    tensors["q_nope"] = torch.randn(4, 6, 32, dtype=torch.bfloat16).transpose(0, 1)  # [T, Hq, LQ], head stride T*LQ
    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(name, x):
        if not isinstance(x, torch.Tensor):
            return x
        token_dims = {"q_pe": (0,), "q_nope": (0,), "k_pe": (0,), "kv_c": (0,), "slot_mapping": (0,),
                      "positions": (0,)}.get(name, ())
        dims = [DimDynamic.DYNAMIC if d in token_dims else DimDynamic.STATIC for d in range(x.dim())]
        base = x._base if x._base is not None else x
        if x._base is not None:  # a view: its base's token dim is symbolic too (dim 0 of every base here but
            # q_nope's, whose base is [Hq, T, LQ])
            base_dims = [DimDynamic.DYNAMIC if (d == 1 if name == "q_nope" else d == 0) and token_dims
                         else DimDynamic.STATIC for d in range(base.dim())]
            context = StatelessSymbolicContext(dynamic_sizes=dims, view_base_context=StatelessSymbolicContext(
                dynamic_sizes=base_dims))
        else:
            context = StatelessSymbolicContext(dynamic_sizes=dims)
        return mode.from_tensor(x, symbolic_context=context)

    with mode:
        fakes = {name: fake(name, x) for name, x in tensors.items()}
        assert isinstance(fakes["q_nope"].stride(1), torch.SymInt) and isinstance(fakes["q_pe"].shape[0],
                                                                                   torch.SymInt)
        p = mla.prepare_mla(**fakes, options=MlaOptions(**options))
        q_out, k_out = mla.outputs(p)
        grid, arguments = mla.kernel_arguments(p, q_out, None)
    symbolic = sorted(name for name in _constexpr_names(_mla_rope_store_kernel)
                      if isinstance(arguments.get(name), torch.SymInt))
    assert symbolic == [], f"constexprs symbolic under a dynamic token count: {symbolic}"
    assert isinstance(arguments["T"], torch.SymInt) and isinstance(arguments["qnope_sh"], torch.SymInt)


# --------------------------------------------------------------------------------------------------
# transformers DeepseekV3's caches: the sequence layout, a second cache for the rotated k_pe, de-interleaving
# --------------------------------------------------------------------------------------------------


def make_hf_mla(device, *, B=2, S=3, past=4, Hq=3, L=24, LQ=16, R=8, s_max=10, dtype=torch.float32,
                two_caches=True, deinterleave=True, is_neox=False, table="per_token", k_pe_4d=True, **options):
    """The op's arguments as transformers' DeepseekV3Attention has them: q ``[B, Hq, S, LQ + R]`` split and seen as
    ``[B, S, Hq, ...]`` (strided views), kv_c / k_pe split from one ``[B, S, L + R]`` projection, caches ``[B, 1,
    s_max, L]`` and ``[B, 1, s_max, R]`` (one ``[.., L + R]`` cache without ``two_caches``) of random values, slots
    ``cache_position = past + arange(S)``; cos/sin per token ``[B, S, R / 2]`` (``table="per_token"``) or a ``[P, R /
    2]`` table with positions ``[B, S]`` (``"positions"``)."""
    q = torch.randn(B, Hq, S, LQ + R, dtype=dtype, device=device)
    q_nope, q_pe = (x.transpose(1, 2) for x in q.split([LQ, R], dim=-1))
    kv_c, k_pe = torch.randn(B, S, L + R, dtype=dtype, device=device).split([L, R], dim=-1)
    if k_pe_4d:
        kv_c, k_pe = kv_c.unsqueeze(2), k_pe.unsqueeze(2)
    kv_cache = torch.randn(B, 1, s_max, L if two_caches else L + R, dtype=dtype, device=device)
    k_pe_cache = torch.randn(B, 1, s_max, R, dtype=dtype, device=device) if two_caches else None
    slot_mapping = torch.arange(past, past + S, device=device)
    positions = torch.randint(0, MAX_POSITION, (B, S), device=device)
    ang = rope_angles(torch.arange(MAX_POSITION, device=device), R // 2)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    if table == "per_token":
        cos, sin, positions = cos[positions], sin[positions], positions
        pos_arg = None
    else:
        pos_arg = positions
    return dict(q_pe=q_pe, q_nope=q_nope, k_pe=k_pe, kv_c=kv_c, kv_cache=kv_cache, slot_mapping=slot_mapping,
                cos=cos, sin=sin, positions=pos_arg, k_scale=None, k_pe_cache=k_pe_cache, layout="sequence",
                is_neox=is_neox, deinterleave=deinterleave, **options), positions


def hf_rope64(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor, is_neox: bool,
              deinterleave: bool) -> torch.Tensor:
    """RoPE in float64 as transformers writes it: ``apply_rotary_pos_emb_interleave`` (de-interleaving), NeoX's
    ``rotate_half``, or GPT-J's interleaved pairs kept in place. x ``[..., R]``, tables ``[..., R / 2]``."""
    x, c, s = x.double(), cos_half.double(), sin_half.double()
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    if is_neox or deinterleave:
        return torch.cat([o1, o2], dim=-1)
    return torch.stack([o1, o2], dim=-1).flatten(-2)


def check_hf(args: dict, positions: torch.Tensor) -> None:
    """The op against transformers' maths in float64 (every element of q_out / k_out), the rows at cache_position
    against it, every other row of both caches byte-identical; ``mla.reference`` against the same float64 values;
    and ``mla.launch`` into NaN-poisoned outputs (fresh caches) against the op's results."""
    tensors, options = split(args)
    o = MlaOptions(**options)
    caches = [c for c in (args["kv_cache"], args["k_pe_cache"]) if c is not None]
    before = [c.clone() for c in caches]
    p = mla.prepare_mla(**tensors, options=o)
    ref = mla.reference_problem(p)
    q_ref, k_ref = mla.reference(ref, compute_dtype=torch.float64)
    q_out, k_out = OP(**tensors, **o.op_arguments())

    ang = rope_angles(torch.arange(MAX_POSITION), p.rotary_dim // 2).to(args["cos"].device)
    c = ang.cos().to(args["cos"].dtype)[positions][:, :, None]  # [B, S, 1, R / 2], as the op reads them
    s = ang.sin().to(args["cos"].dtype)[positions][:, :, None]
    q_want = hf_rope64(args["q_pe"], c, s, o.is_neox, o.deinterleave)
    if args["q_nope"] is not None:
        q_want = torch.cat([args["q_nope"].double(), q_want], -1)
    k_want = hf_rope64(p.k_pe[:, :, None], c, s, o.is_neox, o.deinterleave)[:, :, 0]  # [B, S, R]
    atol, rtol = TOLERANCES[p.q_pe.dtype]
    for name, got in (("op", q_out), ("reference", q_ref)):
        torch.testing.assert_close(got.double(), q_want, atol=atol, rtol=rtol, msg=lambda m: f"{name} q_out: {m}")
    assert q_out.shape == (*args["q_pe"].shape[:-1], q_want.shape[-1]) and q_out.is_contiguous()
    if o.return_k:
        for name, got in (("op", k_out), ("reference", k_ref)):
            torch.testing.assert_close(got.reshape(k_want.shape).double(), k_want, atol=atol, rtol=rtol,
                                       msg=lambda m: f"{name} k_out: {m}")
    latent = p.kv_c.double()
    rows_want = [latent, k_want] if args["k_pe_cache"] is not None else [torch.cat([latent, k_want], -1)]
    written = p.slot_mapping[0].long()
    untouched = [i for i in range(p.num_slots) if i not in written.tolist()]
    assert untouched
    for i, (cache, old, want) in enumerate(zip(caches, before, rows_want)):
        ref_cache = (ref.kv_cache, ref.k_pe_cache)[i]
        for name, got in (("op", cache), ("reference", ref_cache)):
            torch.testing.assert_close(got[:, 0, written].double(), want, atol=atol, rtol=rtol,
                                       msg=lambda m: f"{name} cache {i} rows: {m}")
        assert torch.equal(as_bytes(cache[:, :, untouched]), as_bytes(old[:, :, untouched])), "untouched row written"
    q_nan, k_nan = mla.outputs(p)
    q_nan.fill_(float("nan")), k_nan.fill_(float("nan"))
    mla.launch(mla.reference_problem(p), q_nan, k_nan if o.return_k else None)
    assert torch.equal(as_bytes(q_nan), as_bytes(q_out))
    if o.return_k:
        assert torch.equal(as_bytes(k_nan), as_bytes(k_out))


HF_CASES = {
    "interleave-two-caches-fp32": dict(),
    "interleave-two-caches-bf16": dict(dtype=torch.bfloat16),
    "neox-two-caches-fp32": dict(is_neox=True, deinterleave=False),
    "neox-two-caches-bf16-return-k-3d": dict(is_neox=True, deinterleave=False, dtype=torch.bfloat16, return_k=True,
                                             k_pe_4d=False),
    "interleave-one-cache-table-positions": dict(two_caches=False, table="positions", return_k=True),
    "gptj-kept-interleaved-two-caches": dict(deinterleave=False),
    "batch1-decode": dict(B=1, S=1, past=9),
    "no-q_nope-batch3": dict(B=3, LQ=0),
}
HF_QUICK = ("interleave-two-caches-fp32", "neox-two-caches-bf16-return-k-3d", "interleave-one-cache-table-positions")


@pytest.mark.parametrize("case", [pytest.param(c, id=i, marks=() if i in HF_QUICK else pytest.mark.full)
                                  for i, c in HF_CASES.items()])
def test_hf_sequence_layout_matches_float64(device, case):
    case = dict(case)
    no_q_nope = case.pop("LQ", None) == 0
    args, positions = make_hf_mla(device, **case)
    if no_q_nope:
        args["q_nope"] = None
    check_hf(args, positions)


HF_BAD = {
    # id: (change to make_hf_mla's arguments, exception, message)
    "k_pe_cache-width": (_set("k_pe_cache", lambda a: a["k_pe_cache"][..., :6]), ValueError,
                         r"^k_pe_cache has rows of 6 features .* expected R = 8"),
    "k_pe_cache-slots": (_set("k_pe_cache", lambda a: a["k_pe_cache"][:, :, :9]), ValueError,
                         r"^k_pe_cache has \(2, 9\) slots"),
    "k_pe_cache-dtype": (_set("k_pe_cache", lambda a: a["k_pe_cache"].double()), TypeError,
                         r"^k_pe_cache must have dtype"),
    "k_pe_cache-heads": (_set("k_pe_cache", lambda a: a["k_pe_cache"].expand(2, 2, 10, 8).clone()), ValueError,
                         r"^k_pe_cache has 2 heads"),
    "kv_cache-with-k_pe-width": (_set("kv_cache", lambda a: torch.randn(2, 1, 10, 32)), ValueError,
                                 r"^kv_cache has rows of 32 features .* expected L = 24"),
    "kv_cache-batch": (_set("kv_cache", lambda a: a["kv_cache"][:1]), ValueError, r"^k_pe_cache has \(2, 10\) slots"),
    "both-caches-batch": (lambda a: a.update(kv_cache=a["kv_cache"][:1], k_pe_cache=a["k_pe_cache"][:1]),
                          ValueError, r"^kv_cache has batch 1 .* but q_pe has batch 2"),
    "q_pe-3d-for-sequence": (_set("q_pe", lambda a: a["q_pe"][0]), ValueError, r"^q_pe must have 4 dims"),
    "k_pe-two-heads": (_set("k_pe", lambda a: a["k_pe"].expand(2, 3, 2, 8)), ValueError,
                       r"^k_pe must be \[B, S, R\] or \[B, S, 1, R\]"),
    "slot_mapping-per-batch": (_set("slot_mapping", lambda a: a["slot_mapping"].expand(2, 3)), ValueError,
                               r"^slot_mapping must have shape \[3\]"),
    "deinterleave-neox": (_set("is_neox", True), ValueError, r"^deinterleave=True .* needs is_neox=False"),
    "deinterleave-not-bool": (_set("deinterleave", 2), TypeError, r"^deinterleave must be a bool"),
    "k_pe_cache-overlaps-kv_cache": (lambda a: a.update(k_pe_cache=a["kv_cache"][..., :8]), ValueError,
                                     r"k_pe_cache .*kv_cache|kv_cache .*k_pe_cache"),
    "k_pe-overlaps-k_pe_cache": (_set("k_pe", lambda a: a["k_pe_cache"][:, 0, :3, None]), ValueError,
                                 r"k_pe .*k_pe_cache"),
}
HF_BAD_QUICK = ("k_pe_cache-width", "both-caches-batch", "deinterleave-neox", "k_pe_cache-overlaps-kv_cache")


@pytest.mark.parametrize("change, exc, match", [
    pytest.param(*c, id=i, marks=() if i in HF_BAD_QUICK else pytest.mark.full) for i, c in HF_BAD.items()])
def test_hf_bad_argument(change, exc, match):
    """Through the op: the error names the argument, and both caches are byte-identical afterwards."""
    args, _ = make_hf_mla("cpu")
    change(args)
    caches = [args["kv_cache"], args["k_pe_cache"]]
    before = [as_bytes(c).clone() for c in caches]
    tensors, options = split(args)
    with pytest.raises(exc, match=match):
        OP(**tensors, **MlaOptions(**options).op_arguments())
    for c, b in zip(caches, before):
        assert torch.equal(as_bytes(c), b)


@pytest.mark.parametrize("two_caches", [True, pytest.param(False, marks=pytest.mark.full)])
def test_hf_opcheck(device, two_caches):
    """opcheck (schema, fake tensors, the mutation of both caches) on the sequence layout."""
    args, _ = make_hf_mla(device, B=2, S=2, two_caches=two_caches, return_k=True)
    tensors, options = split(args)
    torch.library.opcheck(OP.default, tuple(tensors[n] for n in TENSORS), MlaOptions(**options).op_arguments())
