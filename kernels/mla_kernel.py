"""Fused MLA (multi-head latent attention, DeepSeek-V2/V3) RoPE + cache store: the Triton kernel
(``_mla_rope_store_kernel``).

One launch does, for every token t (``rope`` on the R = rope_dim features of one row, as in ``rope_kv_kernel``):

    kv_cache[slot(t)] = quant([kv_c[t] | rope(k_pe[t])])          (one row of L + R features, e.g. 512 + 64)
    q_out[t, h]       = [q_nope[t, h] | rope(q_pe[t, h])]         (every q head; just rope(q_pe[t, h]) without q_nope)
    k_pe_out[t]       = rope(k_pe[t])                             (when asked)

or, with a second cache ``k_pe_cache`` (transformers' DeepseekV3 caches the latent and the rotated k_pe apart),
``kv_cache[slot(t)] = quant(kv_c[t])`` and ``k_pe_cache[slot(t)] = quant(rope(k_pe[t]))``.

so the model's ``torch.cat`` of q and of the cache row, and the separate RoPE, disappear. kv_c passes through
(quantised as the rotated part is), q_nope is copied unchanged. ``rope``, its NeoX / GPT-J pairing, the cos/sin
tables (``[P, R']`` indexed by ``positions``, or per-token rows ``[T, R']``; R' = R or R / 2; ``table_dtype``
rounding) and ``quant`` (fp8 caches: ``saturate(x / scale)``, or eager's fp8 store bit for bit with
``quant_dtype``, uint8 pools of fp8 bits) are the existing kernel's, through its own helpers: the rotated values
are rounded to the model dtype before an eager fp8 store exactly as there.

``DEINTERLEAVE`` (HF's ``apply_rotary_pos_emb_interleave``): the pairs are GPT-J's (2i, 2i + 1) on input, and the
rotated pair is written de-interleaved, at features (i, i + R/2) of q_out's rope part, the cache and k_pe_out.

Layouts (any strides; inputs ``[T, ...]`` with token strides, e.g. views of ``q.split`` / ``kv_a_proj(x).split``):
    q_pe ``[T, HQ, R]``, q_nope ``[T, HQ, LQ]`` or none, q_out ``[T, HQ, LQ + R]`` (LQ = 0 without q_nope),
    k_pe ``[T, R]``, kv_c ``[T, L]`` (a ``[T, 1, ...]`` input is seen as ``[T, ...]``), k_pe_out ``[T, R]``;
    the sequence layout has a batch dim in front: ``[B, S, ...]`` for each (``[B, S, 1, ...]`` for k_pe, kv_c);
    cache rows (the head axis of 1, if any, dropped; W = L + R, or L for kv_cache and R for k_pe_cache):
      token     ``[num_slots, W]``                element (slot, d) at ``slot, d``
      paged     ``[num_blocks, block_size, W]``   element (slot, d) at ``slot // bs, slot % bs, d``
      sequence  ``[B, 1, S_max, W]``              element (b, slot, d) at ``b, 0, slot, d``  (HF StaticCache)
    The sequence layout's slot of token (b, s) is ``slot_mapping[s]`` (HF's ``cache_position``), as the k/v op's.

Slots follow ``rope_kv_kernel``'s conventions: ``slot_mapping[t]`` negative is padding (no store; q is still
written), or counts from the end with ``NEGATIVE_WRAPS``; slots and positions outside the cache or table are never
dereferenced (skipped / clamped), or fail a device-side assertion with ``CHECK_SLOTS`` / ``CHECK_POSITIONS``.

The host side (checks, launch configuration, arguments, float reference) is ``mla.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fx_fusion.kernels.casts import _cache_value, _to
from fx_fusion.kernels.rope_kv_kernel import _load_pairs, _offset, _pair_features, _rope_pairs, _table_rows, _token_rows


@triton.jit
def _rope_out_features(i, e1, e2, HALF: tl.constexpr, DEINTERLEAVE: tl.constexpr):
    """Where the rotated pair (e1, e2) is written: at (e1, e2), or de-interleaved at (i, i + HALF)."""
    if DEINTERLEAVE:
        o1 = i
        o2 = i + HALF
    else:
        o1 = e1
        o2 = e2
    return o1, o2


@triton.jit
def _mla_rope_store_kernel(
    # q_pe [B, S, HQ, R]; q_nope [B, S, HQ, LQ] or None; q_out [B, S, HQ, LQ + R]; k_pe [B, S, R]; kv_c [B, S, L];
    # k_out [B, S, R] or None. Element (b, s, h, d) of tensor x sits at b*x_sb + s*x_ss + h*x_sh + d*x_sd
    # (flat layouts: B = 1, S = T, every x_sb None).
    q_pe_ptr, q_nope_ptr, q_out_ptr, k_pe_ptr, kv_c_ptr, k_out_ptr,
    # kv_cache rows: element (b, slot, d) at b*kc_sb + blk*kc_sblk + off*kc_sslot + d*kc_sd, blk = slot //
    # CACHE_BLOCK_SIZE, off = slot % CACHE_BLOCK_SIZE (token: kc_sblk = stride(0), kc_sslot = 0; paged: strides 0
    # and 1; sequence [B, S_max, W]: kc_sb = stride(0), kc_sblk = stride(1), kc_sslot = 0; kc_sb None but for
    # the sequence layout). k_pe_cache (or None: the rotated k_pe goes to kv_cache's features L..L+R) likewise
    # with kp_*.
    kv_cache_ptr, k_pe_cache_ptr,
    slot_ptr, pos_ptr,               # slot_mapping [S] (per token, or the sequence layout's cache_position);
                                     # positions [B or 1, S] or None
    cos_ptr, sin_ptr,                # tables [N_POSITIONS, R'] (with positions) or per-token [B or 1, S, R']
    k_scale_ptr,                     # one fp32, bf16 or fp16 value, or None
    T,                               # tokens: B * S
    # Run-time strides: the batch strides (None where the batch index is always 0 or the tensor is broadcast),
    # the inputs' token strides (views the caller made, e.g. of a projection's output) and q's head strides (a
    # view's strides can be symbolic under torch.compile; the absorbed q_nope, a permute of a bmm's [HQ, T, LQ]
    # output, has a head stride of T * LQ).
    qpe_sb, qnope_sb, qo_sb, kpe_sb, kvc_sb, ko_sb, kc_sb, kp_sb, pos_sb, cos_sb, sin_sb,
    qpe_ss, qnope_ss, kpe_ss, kvc_ss, qpe_sh, qnope_sh,
    # Every other stride and size is fixed for a compiled graph: constexprs.
    qpe_sd: tl.constexpr, qnope_sd: tl.constexpr,
    qo_ss: tl.constexpr, qo_sh: tl.constexpr, qo_sd: tl.constexpr,
    kpe_sd: tl.constexpr, kvc_sd: tl.constexpr, ko_ss: tl.constexpr, ko_sd: tl.constexpr,
    kc_sblk: tl.constexpr, kc_sslot: tl.constexpr, kc_sd: tl.constexpr,
    kp_sblk: tl.constexpr, kp_sslot: tl.constexpr, kp_sd: tl.constexpr,
    slot_ss: tl.constexpr, pos_ss: tl.constexpr,
    cos_sr: tl.constexpr, cos_sd: tl.constexpr, sin_sr: tl.constexpr, sin_sd: tl.constexpr,  # row: table row or token
    B: tl.constexpr, HQ: tl.constexpr, LQ: tl.constexpr, L: tl.constexpr, R: tl.constexpr,
    N_SLOTS: tl.constexpr, N_POSITIONS: tl.constexpr, CACHE_BLOCK_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,           # largest finite value of an fp8 cache dtype; None for other caches
    # the cache's values (casts.py's _cache_value): FP8_CAST 0 (x / scale saturated, or x), else eager's
    # fp8 store; X_ROUND/Q_ROUND as ROUND_TABLE; CLAMP_LO/HI float or None
    FP8_CAST: tl.constexpr, X_ROUND: tl.constexpr, Q_ROUND: tl.constexpr, SCALE_MUL: tl.constexpr,
    CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr,
    S_ROUND: tl.constexpr,           # the loaded k_scale rounded first: _round's codes (0: as it is)
    IS_NEOX: tl.constexpr, COS_PER_ELEMENT: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
    DEINTERLEAVE: tl.constexpr,      # GPT-J pairs (2i, 2i + 1) in, written at (i, i + R/2) (HF DeepSeek)
    CHECK_SLOTS: tl.constexpr, CHECK_POSITIONS: tl.constexpr,
    ROUND_TABLE: tl.constexpr,       # round cos/sin to 0: nothing, 1: bf16, 2: fp16
    BLOCK_RQ: tl.constexpr, BLOCK_RKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_LQ: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # The first cdiv(T * HQ, BLOCK_RQ) programs each write BLOCK_RQ (token, q-head) rows of q_out. The others each
    # write BLOCK_RKV tokens' cache rows (and k_out rows).
    # out = x * cos + rotate(x) * sin on the R rope features; q_nope and kv_c pass through.
    pid = tl.program_id(0).to(tl.int64)
    n_q_programs = (T * HQ + BLOCK_RQ - 1) // BLOCK_RQ
    if pid < n_q_programs:
        qb, qs, qh, qmask = _token_rows(pid, BLOCK_RQ, HQ, T, B)
        qcos_row, qsin_row, qbad = _table_rows(qb, qs, qmask, pos_ptr, pos_sb, pos_ss, N_POSITIONS, cos_sb, cos_sr,
                                               sin_sb, sin_sr, NEGATIVE_WRAPS, CHECK_POSITIONS)
        q_row = _offset(qb, qs, qh, qpe_sb, qpe_ss, qpe_sh)
        qo_row = _offset(qb, qs, qh, qo_sb, qo_ss, qo_sh)
        qi, qe1, qe2 = _pair_features(BLOCK_HALF, R // 2, IS_NEOX)
        qm = qmask[:, None] & (qi < R // 2)[None, :]
        qx1, qx2 = _load_pairs(q_pe_ptr, q_row, qpe_sd, qm, qe1, qe2)
        qo1, qo2 = _rope_pairs(qx1, qx2, cos_ptr, sin_ptr, qcos_row, qsin_row, cos_sd, sin_sd,
                               qm, qi, qe1, qe2, COS_PER_ELEMENT, ROUND_TABLE)
        qf1, qf2 = _rope_out_features(qi, qe1, qe2, R // 2, DEINTERLEAVE)
        qout_ty = q_out_ptr.dtype.element_ty
        tl.store(q_out_ptr + qo_row[:, None] + ((LQ + qf1) * qo_sd)[None, :], _to(qo1, qout_ty), mask=qm)
        tl.store(q_out_ptr + qo_row[:, None] + ((LQ + qf2) * qo_sd)[None, :], _to(qo2, qout_ty), mask=qm)
        if q_nope_ptr is not None:  # copied as it is (same dtype)
            qd = tl.arange(0, BLOCK_LQ)
            qnm = qmask[:, None] & (qd < LQ)[None, :]
            qn_row = _offset(qb, qs, qh, qnope_sb, qnope_ss, qnope_sh)
            qn = tl.load(q_nope_ptr + qn_row[:, None] + (qd * qnope_sd)[None, :], mask=qnm)
            tl.store(q_out_ptr + qo_row[:, None] + (qd * qo_sd)[None, :], qn, mask=qnm)
        if CHECK_POSITIONS:  # last: its barrier does not hold up the work (a bad position was clamped)
            tl.device_assert(~qbad, "position out of range of the rotary table")
    else:
        b, s, _, mask = _token_rows(pid - n_q_programs, BLOCK_RKV, 1, T, B)
        cos_row, sin_row, _ = _table_rows(b, s, mask, pos_ptr, pos_sb, pos_ss, N_POSITIONS, cos_sb, cos_sr,
                                          sin_sb, sin_sr, NEGATIVE_WRAPS, False)  # checked by the q programs
        # slot of token (b, s): negative (padding) or outside the cache means no store
        slot = tl.load(slot_ptr + s * slot_ss, mask=mask, other=-1).to(tl.int64)
        if NEGATIVE_WRAPS:
            slot = tl.where(slot < 0, slot + N_SLOTS, slot)
        bad = mask & False  # with CHECK_SLOTS: rows whose slot is out of range (without wraps, negative is padding)
        if CHECK_SLOTS:
            bad = mask & ((slot < 0) | (slot >= N_SLOTS)) if NEGATIVE_WRAPS else mask & (slot >= N_SLOTS)
        store = mask & (slot >= 0) & (slot < N_SLOTS)
        slot = tl.minimum(tl.maximum(slot, 0), N_SLOTS - 1)  # rows not stored still address inside the cache
        blk = slot // CACHE_BLOCK_SIZE
        off = slot - blk * CACHE_BLOCK_SIZE
        kc_row = _offset(b, blk, off, kc_sb, kc_sblk, kc_sslot)
        kc_ty = kv_cache_ptr.dtype.element_ty

        d = tl.arange(0, BLOCK_L)
        cm = store[:, None] & (d < L)[None, :]
        c = tl.load(kv_c_ptr + _offset(b, s, 0, kvc_sb, kvc_ss, 0)[:, None] + (d * kvc_sd)[None, :], mask=cm,
                    other=0.0).to(tl.float32)
        tl.store(kv_cache_ptr + kc_row[:, None] + (d * kc_sd)[None, :],
                 _cache_value(c, k_scale_ptr, kc_ty, FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL,
                              CLAMP_LO, CLAMP_HI, S_ROUND), mask=cm)

        i, e1, e2 = _pair_features(BLOCK_HALF, R // 2, IS_NEOX)
        m = mask[:, None] & (i < R // 2)[None, :]
        x1, x2 = _load_pairs(k_pe_ptr, _offset(b, s, 0, kpe_sb, kpe_ss, 0), kpe_sd, m, e1, e2)
        o1, o2 = _rope_pairs(x1, x2, cos_ptr, sin_ptr, cos_row, sin_row, cos_sd, sin_sd,
                             m, i, e1, e2, COS_PER_ELEMENT, ROUND_TABLE)
        f1, f2 = _rope_out_features(i, e1, e2, R // 2, DEINTERLEAVE)
        sm = m & store[:, None]
        v1 = _cache_value(o1, k_scale_ptr, kc_ty, FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL, CLAMP_LO, CLAMP_HI,
                          S_ROUND)
        v2 = _cache_value(o2, k_scale_ptr, kc_ty, FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL, CLAMP_LO, CLAMP_HI,
                          S_ROUND)
        if k_pe_cache_ptr is None:  # one row [kv_c | rope(k_pe)]
            tl.store(kv_cache_ptr + kc_row[:, None] + ((L + f1) * kc_sd)[None, :], v1, mask=sm)
            tl.store(kv_cache_ptr + kc_row[:, None] + ((L + f2) * kc_sd)[None, :], v2, mask=sm)
        else:  # the rotated k_pe in its own cache, at the same slot
            kp_row = _offset(b, blk, off, kp_sb, kp_sblk, kp_sslot)
            tl.store(k_pe_cache_ptr + kp_row[:, None] + (f1 * kp_sd)[None, :], v1, mask=sm)
            tl.store(k_pe_cache_ptr + kp_row[:, None] + (f2 * kp_sd)[None, :], v2, mask=sm)
        if k_out_ptr is not None:
            ko_ty = k_out_ptr.dtype.element_ty
            ko_row = _offset(b, s, 0, ko_sb, ko_ss, 0)
            tl.store(k_out_ptr + ko_row[:, None] + (f1 * ko_sd)[None, :], _to(o1, ko_ty), mask=m)
            tl.store(k_out_ptr + ko_row[:, None] + (f2 * ko_sd)[None, :], _to(o2, ko_ty), mask=m)
        if CHECK_SLOTS:  # last: its barrier does not hold up the stores (a bad slot's row was not stored)
            tl.device_assert(~bad, "slot out of range of the cache")
