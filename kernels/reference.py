"""The float reference of the fused RoPE + KV-cache store, in plain torch: the definition the kernel is tested
against, and the op's implementation on CPU without the Triton interpreter. The contract it computes is described
in ``rope_kv_kernel``.
"""

from __future__ import annotations

import torch

from fx_fusion.kernels.problem import FP8_DTYPES, CacheLayout, RopeKVProblem


def reference(p: RopeKVProblem, return_k: bool, compute_dtype: torch.dtype = torch.float64):
    """Same contract as the kernel, computed in ``compute_dtype``; writes the caches, returns (q_out, k_out)."""
    o = p.options
    first, second, c1, c2, s1, s2 = _rotary_values(p, compute_dtype)

    def rope(x: torch.Tensor) -> torch.Tensor:
        out = x.to(compute_dtype, copy=True)  # never alias the input; the tail passes through
        x1, x2 = out[..., first].clone(), out[..., second].clone()
        out[..., first] = x1 * c1 - x2 * s1
        out[..., second] = x2 * c2 + x1 * s2
        return out

    def rope_and_norm(x: torch.Tensor, norm: bool, weight: torch.Tensor | None) -> torch.Tensor:
        if not norm:
            return rope(x)
        if o.norm_after_rope:  # the norm of the rotated head, rounded to x's dtype as the model stores it
            return _rms_norm(rope(x).to(x.dtype), weight, o, compute_dtype)
        return rope(_rms_norm(x, weight, o, compute_dtype))

    q_rot = rope_and_norm(p.q, o.q_norm, p.q_norm_weight)
    k_rot = rope_and_norm(p.k, o.k_norm, p.k_norm_weight)

    store, b_idx, s_sel = _stored_tokens(p)

    def put(cache: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None, is_k: bool) -> None:
        x = cache_values(x[store], cache.dtype, p.stored_dtype, scale, o, p.k.dtype, compute_dtype)  # [N, H, D]
        blk, off = s_sel // p.block_size, s_sel % p.block_size
        if o.layout is CacheLayout.TOKEN:
            cache[s_sel] = x
        elif o.layout is CacheLayout.PAGED:
            cache[blk, off] = x
        elif o.layout is CacheLayout.SEQUENCE:
            cache[b_idx, :, s_sel] = x
        elif is_k:  # 5-D k [num_blocks, Hkv, D // x, bs, x]: rows [N, Hkv, D] as [N, Hkv, D // x, x]
            cache[blk, :, :, off, :] = x.unflatten(-1, (-1, p.x))
        elif o.layout is CacheLayout.PAGED_X:  # v [num_blocks, Hkv, D, bs]
            cache[blk, :, :, off] = x
        else:  # shuffled v [num_blocks, Hkv, bs // x, D, x]
            cache[blk, :, off // p.x, :, off % p.x] = x

    put(p.k_cache, k_rot, p.k_scale, True)
    put(p.v_cache, p.v.to(compute_dtype), p.v_scale, False)
    # contiguous, as the kernel's outputs are (the op's fake promises their strides; q_rot has q's, any order)
    q_out = q_rot.to(p.q.dtype)
    if o.q_fp8_dtype is not None:
        q_out = _fp8_q(q_out, p)
    q_out = q_out.reshape(p.q_shape).contiguous()
    k_out = k_rot.to(p.k.dtype).reshape(p.k_shape).contiguous() if return_k else None
    return q_out, k_out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, o, compute_dtype: torch.dtype) -> torch.Tensor:
    """QK-norm of each head (x [..., H, D]: the last dim; ``norm_full_width``: the last two, weight [H * D]) in
    ``compute_dtype``, rounded to x's dtype where the model rounds."""
    y = x.to(compute_dtype)
    dims = (-2, -1) if o.norm_full_width else (-1,)
    y = y * torch.rsqrt(y.pow(2).mean(dims, keepdim=True) + o.norm_eps)
    if o.norm_round:
        y = y.to(x.dtype).to(compute_dtype)
    if weight is not None:
        y = y * (weight.to(compute_dtype).view(x.shape[-2:] if o.norm_full_width else x.shape[-1:]) + o.norm_offset)
    return y.to(x.dtype)


def _fp8_q(q: torch.Tensor, p: RopeKVProblem) -> torch.Tensor:
    """fp8 q from the rotated q in q's dtype, with eager's own ops and dtypes (the cast follows this device's rule)."""
    o = p.options
    x = q.float()
    quotient = o.q_quant_dtype or p.q.dtype
    if p.q_scale is not None:
        scale = p.q_scale.to(quotient) if o.q_scale_round else p.q_scale  # read as eager on CUDA reads it
        scale = scale.float().reshape(())
        x = x * scale if o.q_scale_mul else x / scale
    x = x.to(quotient)
    if o.q_clamp is not None:
        x = x.float().clamp(*o.q_clamp).to(quotient)
    return x.to(o.q_fp8_dtype)


def cache_values(x: torch.Tensor, cache_dtype: torch.dtype, stored_dtype: torch.dtype, scale: torch.Tensor | None,
                 o, model_dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.Tensor:
    """Values ``x`` (in ``compute_dtype``) as a cache of ``cache_dtype`` stores them (``stored_dtype``: the fp8
    format a uint8 pool holds): with ``o.quant_dtype`` eager's fp8 store from x rounded to ``model_dtype``, else
    ``saturate(x / scale)`` for fp8 caches and ``x`` rounded for others (``o``: the op's options; ``scale_round``:
    the scale is first rounded to ``quant_dtype``)."""
    if o.quant_dtype is not None:  # eager's own ops, in its dtypes (the cast follows this device's rule)
        x = x.to(model_dtype).float()
        if scale is not None:
            scale = (scale.to(o.quant_dtype) if o.scale_round else scale).float().reshape(())
            x = x * scale if o.scale_mul else x / scale
        x = x.to(o.quant_dtype)
        if o.clamp is not None:
            x = x.float().clamp(*o.clamp).to(o.quant_dtype)
        return x.to(stored_dtype).view(cache_dtype)
    if scale is not None:
        x = x / scale.to(compute_dtype)
    if cache_dtype in FP8_DTYPES:
        fmax = torch.finfo(cache_dtype).max
        x = x.clamp(-fmax, fmax)
    return x.to(cache_dtype)


def _rotary_values(p: RopeKVProblem, compute_dtype: torch.dtype) -> tuple:
    """(first, second, c1, c2, s1, s2): the features each pair rotates, and the cos/sin values that multiply
    them, per token as ``[B or 1, S, 1, R']`` tensors in ``compute_dtype``."""
    o = p.options
    return rotary_values(p.cos, p.sin, p.positions, o.rotary_dim, o, compute_dtype)


def rotary_values(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None, rot: int, o,
                  compute_dtype: torch.dtype) -> tuple:
    """``_rotary_values`` of tables ``cos``/``sin`` (``positions`` seen as ``[B or 1, S]``, or None: per-token
    rows) for ``rot`` rotated features, with the options ``o`` (``is_neox``, ``negative_wraps``,
    ``table_dtype``)."""
    half = rot // 2

    def table(c: torch.Tensor) -> torch.Tensor:  # -> [B or 1, S, 1, R'] per token
        if positions is not None:
            pos = positions.long()
            pos = torch.where(pos < 0, pos + c.shape[0], pos) if o.negative_wraps else pos
            return c[pos.clamp(0, c.shape[0] - 1)].unsqueeze(2)
        return (c if c.dim() == 3 else c.unsqueeze(0)).unsqueeze(2)

    per_element = cos.shape[-1] == rot
    cos, sin = table(cos), table(sin)
    if o.table_dtype is not None:  # the model's cast of the table before the multiply
        cos, sin = cos.to(o.table_dtype), sin.to(o.table_dtype)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    if o.is_neox:
        first, second = torch.arange(half), torch.arange(half) + half
    else:
        first, second = torch.arange(0, rot, 2), torch.arange(1, rot, 2)
    first, second = first.to(cos.device), second.to(cos.device)
    if per_element:
        c1, c2, s1, s2 = cos[..., first], cos[..., second], sin[..., first], sin[..., second]
    else:
        c1 = c2 = cos
        s1 = s2 = sin
    return first, second, c1, c2, s1, s2


def _stored_tokens(p: RopeKVProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(store [B, S]: whether token (b, s) is stored, the batch index and the cache slot of each stored token),
    slots resolved as the kernel resolves them (swa_table, negative_wraps, out-of-range slots skipped)."""
    batch, seq = p.q.shape[:2]
    slots = p.slot_mapping.long().expand(batch, seq)
    valid = torch.ones_like(slots, dtype=torch.bool)
    if p.swa_table is not None:
        n_swa = p.swa_table.shape[0]
        if p.options.negative_wraps:
            slots = torch.where(slots < 0, slots + n_swa, slots)
        valid = (slots >= 0) & (slots < n_swa)
        slots = p.swa_table[slots.clamp(0, n_swa - 1)].long()
    if p.options.negative_wraps:
        slots = torch.where(slots < 0, slots + p.num_slots, slots)
    store = valid & (slots >= 0) & (slots < p.num_slots)
    b_idx = torch.arange(batch, device=slots.device)[:, None].expand(batch, seq)[store]
    s_sel = slots[store]
    return store, b_idx, s_sel
