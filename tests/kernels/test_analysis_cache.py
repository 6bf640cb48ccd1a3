"""kernels/analysis_cache.py: Inductor's analysis of the fused kernel is made once per configuration, and every
other kernel is analysed as before."""

from __future__ import annotations

import pytest
import torch
from torch._higher_order_ops import triton_kernel_wrap as wrap

from fx_fusion.kernels import analysis_cache
from fx_fusion.kernels.rope_kv_kernel import _rope_kv_store_kernel


@pytest.fixture
def calls(monkeypatch):
    """The analysis replaced by one that records its calls, then wrapped by ``install``."""
    made = []

    def analyse(kernel, kwargs, tma_descriptor_metadata):
        made.append((kernel, dict(kwargs)))
        return {"writes": [name for name in kwargs if name.endswith("cache_ptr")]}

    for name in analysis_cache._NAMES:
        monkeypatch.setattr(wrap, name, analyse, raising=False)
    assert analysis_cache.install(_rope_kv_store_kernel)
    return made


def _kwargs(**changes):
    kw = dict(k_cache_ptr=torch.empty(4, 2, dtype=torch.bfloat16), q_ptr=torch.empty(3, dtype=torch.bfloat16),
              k_out_ptr=None, T=5, q_sh=64, BLOCK_RQ=32)
    return {**kw, **changes}


def test_one_analysis_per_configuration(calls):
    analyse = wrap.identify_accessed_tensors
    first = analyse(_rope_kv_store_kernel, _kwargs(), {})
    again = analyse(_rope_kv_store_kernel, _kwargs(k_cache_ptr=torch.empty(8, 2, dtype=torch.bfloat16)), {})
    assert len(calls) == 1 and again == first and again is not first  # a copy: callers may change it
    # what the TTIR depends on: a constexpr, None against a tensor, a dtype, a number
    for change in (dict(BLOCK_RQ=16), dict(k_out_ptr=torch.empty(3)), dict(q_ptr=torch.empty(3)), dict(T=1)):
        analyse(_rope_kv_store_kernel, _kwargs(**change), {})
    assert len(calls) == 5


def test_other_kernels_pass_through(calls):
    analyse = wrap.identify_accessed_tensors
    other = object()
    for _ in range(2):
        analyse(other, _kwargs(), {})
    analyse(_rope_kv_store_kernel, _kwargs(), {"k_cache_ptr": ("stable", ())})  # TMA descriptors: not kept
    analyse(_rope_kv_store_kernel, _kwargs(), {"k_cache_ptr": ("stable", ())})
    assert len(calls) == 4


def test_install_wraps_once(calls):
    analyse = wrap.identify_accessed_tensors
    assert analysis_cache.install(_rope_kv_store_kernel)
    assert wrap.identify_accessed_tensors is analyse


def test_a_symbolic_size_traced_and_lowered_is_one_configuration(calls):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    size = env.create_unbacked_symint()  # a SymInt, as the pass's trace holds a symbolic token count
    analyse = wrap.identify_accessed_tensors
    analyse(_rope_kv_store_kernel, _kwargs(T=size), {})
    analyse(_rope_kv_store_kernel, _kwargs(T=size.node.expr), {})  # as Inductor lowers it
    assert len(calls) == 1
