"""How the op rounds, on every implementation it has on CPU: bf16 outputs to nearest even, NaN kept in fp8
caches, and outputs with the strides the fake implementation promises.

Each test here failed before its fix: the Triton interpreter truncates fp32 -> bf16 conversions (GPUs round
to nearest even), its fp8 conversion stored NaN as 384, and the fp32 reference path returned q_out with q's
strides while the fake promised contiguous ones (a stride assertion inside compiled code).
"""

from __future__ import annotations

import pytest
import torch
import triton

from fx_fusion.kernels import rope_kv_store
from tests.kernels.test_rope_kv_cache import INTERPRETED

T, HQ, HKV, D = 37, 4, 2, 64


def _rotated_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX RoPE in fp32, in the kernel's order of operations (``x1 * c - x2 * s``, ``x2 * c + x1 * s``)."""
    x1, x2 = x[..., : D // 2].float(), x[..., D // 2:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


@pytest.fixture
def reference_path():
    """The op's CPU implementation without the interpreter: the fp32 reference."""
    # Not monkeypatch.setattr: its undo assigns the old value back, and an assigned knob no longer reads
    # TRITON_INTERPRET, so the interpreter would stay on for the rest of the session (test_launch loads a copy
    # of the kernel module with TRITON_INTERPRET=0 and would still get interpreted kernels). scope() restores the
    # knob to unset and the variable to its value.
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        yield


@pytest.mark.skipif(not INTERPRETED, reason="the Triton interpreter's conversions (CPU only)")
def test_bf16_outputs_round_to_nearest_even_in_the_interpreter():
    q, k, v = (torch.randn(T, h, D).to(torch.bfloat16) for h in (HQ, HKV, HKV))
    table = torch.randn(64, D)  # fp32 cos | sin halves, per pair
    positions = torch.randint(0, 64, (T,))
    k_cache = torch.full((T + 5, HKV, D), float("nan"), dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    slots = torch.randperm(T + 5)[:T]
    q_out, k_out = rope_kv_store(q, k, v, k_cache, v_cache, slots, cos_sin_cache=table, positions=positions,
                                 return_k=True)
    cos, sin = table[positions, None, : D // 2], table[positions, None, D // 2:]
    want_q = _rotated_fp32(q, cos, sin).to(torch.bfloat16)  # torch rounds to nearest even
    want_k = _rotated_fp32(k, cos, sin).to(torch.bfloat16)
    for name, got, want in (("q_out", q_out, want_q), ("k_out", k_out, want_k), ("k_cache", k_cache[slots], want_k)):
        differ = (got.view(torch.int16) != want.view(torch.int16)).sum().item()
        assert differ == 0, f"{name}: {differ} of {got.numel()} elements differ from round-to-nearest-even"
    assert torch.equal(v_cache[slots].view(torch.int16), v.view(torch.int16))


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_default_fp8_store_keeps_nan(fmt, path, request):
    """The op's default fp8 store (scales, no ``quant_dtype``) keeps NaN, as ``x.to(fp8)`` does."""
    if path == "reference":
        request.getfixturevalue("reference_path")
    q, k, v = (torch.randn(T, h, D) for h in (HQ, HKV, HKV))
    k[3, 1, 5] = v[0, 0, 0] = v[7, 1, 63] = float("nan")
    k_cache = torch.randint(0, 0x70, (T + 5, HKV, D), dtype=torch.uint8).view(fmt)
    v_cache = k_cache.clone()
    slots = torch.randperm(T + 5)[:T]
    rope_kv_store(q, k, v, k_cache, v_cache, slots, cos_sin_cache=torch.randn(64, D),
                  positions=torch.randint(0, 64, (T,)), k_scale=torch.tensor([0.5]), v_scale=torch.tensor([2.0]))
    kc, vc = k_cache[slots].float(), v_cache[slots].float()
    assert kc[3, 1].isnan().sum() == 2  # the NaN feature and its NeoX partner
    assert vc[0, 0, 0].isnan() and vc[7, 1, 63].isnan()
    assert vc.isnan().sum() == 2 and kc.isnan().sum() == 2
    # everything else is the saturating cast of the quotient (at most one code off the float64 reference)
    finite = ~vc.isnan()
    want = (v.double() / 2.0).clamp(-torch.finfo(fmt).max, torch.finfo(fmt).max).to(fmt).float()
    assert torch.allclose(vc[finite], want[finite], rtol=0.26, atol=2.0 ** -15)


@pytest.mark.parametrize("layout", ["token", "sequence"])
def test_reference_outputs_have_the_fake_strides(layout, reference_path):
    """q held as a permuted tensor (HF's ``[B, H, S, D]`` seen as ``[B, S, H, D]``): the outputs of the
    reference path are contiguous, as the fake implementation (and the kernel path) allocates them."""
    if layout == "sequence":
        q = torch.randn(2, HQ, T, D).transpose(1, 2)  # [B, S, H, D] with [B, H, S, D] memory
        k, v = (torch.randn(2, HKV, T, D).transpose(1, 2) for _ in range(2))
        k_cache = torch.randn(2, HKV, T + 3, D)
        slots = torch.arange(T)
    else:
        q = torch.randn(HQ, T, D).transpose(0, 1)
        k, v = (torch.randn(HKV, T, D).transpose(0, 1) for _ in range(2))
        k_cache = torch.randn(T + 3, HKV, D)
        slots = torch.randperm(T + 3)[:T]
    args = (q, k, v, k_cache, k_cache.clone(), slots, torch.randn(64, D // 2), torch.randn(64, D // 2),
            torch.randint(0, 64, (T,)), None, None, None, True, D, layout, True, False)
    q_out, k_out = torch.ops.fx_fusion.rope_kv_store(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk = torch.ops.fx_fusion.rope_kv_store(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                     for a in args))
    assert q_out.stride() == fq.stride() == torch.empty(q.shape).stride()
    assert k_out.stride() == fk.stride()


def test_reference_path_is_what_the_tests_take(reference_path):
    """The fixture above really selects the fp32 reference (else the stride test would test the kernel)."""
    from fx_fusion.kernels import ops

    assert not ops.interpreted()
