"""``torch.ops.fx_fusion.rope_kv_store``: the custom op the graph pass emits (the only thing it imports).

The op mutates only the two caches; q (and k, when asked) come back as fresh tensors. It never
mutates q/k in place: an in-place op on views of a fused qkv projection is miscompiled by Inductor's
re-inplacing (it cloned k from the wrong storage offset), so the functional form is the safe one.

Implementations:
    CUDA (HIP shares it)  the Triton kernel
    CPU                   the Triton kernel through the interpreter when ``TRITON_INTERPRET=1``,
                          otherwise the plain-torch reference in fp32 (same maths as the kernel)
    Meta / fake           shapes only, with the same argument checks
"""

from __future__ import annotations

import torch

from fx_fusion.kernels import rope_kv_cache as _impl
from fx_fusion.kernels.rope_kv_cache import CacheLayout

_INTERPRETED = type(_impl._rope_kv_store_kernel).__name__ == "InterpretedFunction"


def _outputs(p: _impl.RopeKVProblem, return_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = p.q.new_empty(p.q_shape)
    k_out = p.k.new_empty(p.k_shape) if return_k else p.k.new_empty((0,))
    return q_out, k_out


def _prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
             is_neox, rotary_dim, layout, negative_wraps):
    return _impl.prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table,
                         k_scale, v_scale, is_neox=is_neox, rotary_dim=rotary_dim, layout=layout,
                         negative_wraps=negative_wraps)


@torch.library.custom_op("fx_fusion::rope_kv_store", mutates_args=("k_cache", "v_cache"))
def rope_kv_store_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    positions: torch.Tensor | None, swa_table: torch.Tensor | None,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    is_neox: bool, rotary_dim: int, layout: str, return_k: bool, validate: bool, negative_wraps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default (CPU) implementation; see the module docstring. ``k_out`` is empty unless ``return_k``."""
    p = _prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
                 is_neox, rotary_dim, layout, negative_wraps)
    if validate:
        _impl.check_index_ranges(p)
    if _INTERPRETED:
        q_out, k_out = _outputs(p, return_k)
        _impl.launch(p, q_out, k_out if return_k else None)
        return q_out, k_out
    q_out, k_out = _impl.reference(p, return_k, compute_dtype=torch.float32)
    return q_out, (k_out if return_k else p.k.new_empty((0,)))


@rope_kv_store_op.register_kernel("cuda")
def _(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
      is_neox, rotary_dim, layout, return_k, validate, negative_wraps=False):
    p = _prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
                 is_neox, rotary_dim, layout, negative_wraps)
    if validate:
        _impl.check_index_ranges(p)
    q_out, k_out = _outputs(p, return_k)
    with torch.cuda.device(q.device):
        _impl.launch(p, q_out, k_out if return_k else None)
    return q_out, k_out


@rope_kv_store_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
      is_neox, rotary_dim, layout, return_k, validate, negative_wraps=False):
    p = _prepare(q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
                 is_neox, rotary_dim, layout, negative_wraps)
    return _outputs(p, return_k)


def rope_kv_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, *,
    cos_sin_cache: torch.Tensor | None = None, positions: torch.Tensor | None = None,
    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
    is_neox: bool = True, rotary_dim: int | None = None, layout: CacheLayout | str = CacheLayout.TOKEN,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    swa_table: torch.Tensor | None = None, return_k: bool = False, validate: bool = False,
    negative_wraps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k, store rotated k and raw v in the caches; return ``(q_out, k_out or None)``.

    Give the rotary table either as ``cos_sin_cache [max_pos, rotary_dim]`` (cos half then sin half,
    as SGLang and vLLM build it) with ``positions``, or as ``cos``/``sin`` (per-token values as HF
    computes them, or tables with ``positions``). ``rotary_dim`` defaults to the ``cos_sin_cache``'s
    width (a given one must equal it). With ``cos``/``sin`` of width ``W`` it defaults to ``W`` only
    when ``2 W > head_dim``; otherwise ``W`` could be one value per feature or one per pair
    (``cos_sin_cache`` halves, ``freqs_cis``), and ``rotary_dim`` is required (``ValueError``).
    ``validate=True`` also checks that every slot and position lies inside its cache or table, which
    costs a device sync; it is off by default so the op can run inside CUDA graphs, and the kernel
    never touches memory outside the tensors either way (out-of-range slots are skipped, positions
    clamped to the table). ``negative_wraps=True`` makes negative slots and positions count from the
    end, as ``cache[slot] = k`` does, instead of skipping.
    """
    if cos_sin_cache is not None:
        if cos is not None or sin is not None:
            raise ValueError("give either cos_sin_cache or cos/sin, not both")
        if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2:
            raise ValueError(f"cos_sin_cache must be a [max_position, rotary_dim] tensor, got "
                             f"{getattr(cos_sin_cache, 'shape', type(cos_sin_cache).__name__)}")
        if positions is None:
            raise ValueError("cos_sin_cache needs positions")
        width = cos_sin_cache.shape[-1]
        if width % 2 or (rotary_dim is not None and width != rotary_dim):
            want = "an even number" if rotary_dim is None else f"rotary_dim={rotary_dim}"
            raise ValueError(f"cos_sin_cache has {width} columns, expected {want} (a cos half and a sin half of "
                             f"rotary_dim / 2 columns each)")
        cos, sin = cos_sin_cache[:, : width // 2], cos_sin_cache[:, width // 2:]
        rotary_dim = width
    elif cos is None or sin is None:
        raise ValueError("give the rotary table as cos_sin_cache (with positions) or as cos and sin")
    layout = layout.value if isinstance(layout, CacheLayout) else layout  # prepare() names a bad layout
    if rotary_dim is None and isinstance(cos, torch.Tensor):
        if isinstance(k_cache, torch.Tensor) and k_cache.dim() > 0:
            rotary_dim = _impl.default_rotary_dim(cos, k_cache.shape[-1])
        else:
            rotary_dim = cos.shape[-1]  # placeholder: the op rejects k_cache, naming it
    if not torch.compiler.is_compiling():  # Dynamo would break the graph on is_inference()
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if isinstance(cache, torch.Tensor):  # here grad mode is the caller's; inside the op it is not
                _impl.check_writable(name, cache)
    q_out, k_out = torch.ops.fx_fusion.rope_kv_store(
        q, k, v, k_cache, v_cache, slot_mapping, cos, sin, positions, swa_table, k_scale, v_scale,
        is_neox, rotary_dim, layout, return_k, validate, negative_wraps)
    return q_out, (k_out if return_k else None)
