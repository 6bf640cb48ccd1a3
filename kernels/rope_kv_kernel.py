"""Fused rotary embedding + KV-cache store: the Triton kernel (``_rope_kv_store_kernel``) and its helpers.

One launch does what attention layers otherwise do in three memory-bound steps:

    q_out            = rope(q)                 (or fp8 q: eager's fp8 quantisation of it, below)
    k_cache[slot(t)] = quant(rope(k))        (and k_out = rope(k) when asked)
    v_cache[slot(t)] = quant(v)

where ``rope(x) = x * cos + rotate(x) * sin`` on the first ``rotary_dim`` features of every head
(the tail passes through unchanged), ``rotate`` pairs features as NeoX halves (i, i + R/2) or GPT-J
neighbours (2i, 2i + 1), and ``quant(x) = saturate(x / scale)`` for fp8 caches (rounded to nearest
even, NaN kept), the identity otherwise. Maths is fp32 whatever the storage dtypes; every rounding to
bf16 or fp8 is to nearest even, computed by the kernel itself where Triton's interpreter would differ.

With ``quant_dtype`` the fp8 store is instead what eager model code computes, bit for bit, and fp8 q is the
same function of the rotated q with q's own scale: ``casts.py`` (``_eager_fp8``).

Tokens are addressed as ``(b, s)``: q, k, v are ``[T, H*D]``, ``[T, H, D]`` (flat layouts, ``B = 1``)
or ``[B, S, H, D]`` (sequence layout), with any strides (slices of a fused qkv projection work
without copies).

Cache layouts (``problem.CacheLayout``), with any strides; element ``(slot, h, d)`` of token ``(b, s)`` at:
    token     ``[num_slots, Hkv, D]``               ``slot, h, d``                  (SGLang token pool)
    paged     ``[num_blocks, block_size, Hkv, D]``  ``slot // bs, slot % bs, h, d`` (vLLM flash layout)
    sequence  ``[B, Hkv, max_seq, D]``              ``b, h, slot, d``               (HF StaticCache, gpt-fast)
    paged_x, paged_x_shuffled: k and v differ (AMD, aiter's ``flash_layout=False``; x = 16 bytes / element size:
              8 for bf16/fp16, 16 for fp8/uint8, 4 for fp32; blk = slot // bs, off = slot % bs)
      k       ``[num_blocks, Hkv, D // x, bs, x]``    ``blk, h, d // x, off, d % x``
      v       ``[num_blocks, Hkv, D, bs]``            ``blk, h, d, off``                (paged_x; vLLM non-flash v)
      v       ``[num_blocks, Hkv, bs // x, D, x]``    ``blk, h, off // x, d, off % x``  (paged_x_shuffled)
One address formula covers them all (the kernel's signature): a cache's strides, and for the 5-D layouts a split
of the feature index (k: ``KC_D_SPLIT = x``, ``kc_sd_hi`` the stride of ``d // x``, ``kc_sd`` of ``d % x``) or of
the slot's offset in its block (shuffled v: ``VC_SLOT_SPLIT = x``, ``vc_sslot_hi`` and ``vc_sslot``), addressed as
``(i // x) * s_hi + (i % x) * s`` (``_split_offset``); the splits (``KC_SLOT_SPLIT``, ``KC_D_SPLIT``,
``VC_SLOT_SPLIT``, ``VC_D_SPLIT``) and the ``*_hi`` strides are None for the other layouts: no division there.

The slot of token ``(b, s)`` is ``slot_mapping[s]`` (``[T]`` for flat layouts, the ``cache_position``
``[S]`` for the sequence layout), optionally sent through a second table (``slot = swa_table[slot]``,
SGLang's sliding-window pool). A negative entry at either level skips that token's k/v store; q is
still rotated. With ``negative_wraps`` a negative final slot or position instead counts from the end,
as torch indexing does (``cache[slot] = k``): the graph pass uses this to keep eager semantics.
Slots and positions outside the cache or table are never dereferenced; with ``CHECK_SLOTS``/``CHECK_POSITIONS``
they fail a device-side assertion instead (compiled in only with assertions on: ``launch._assertions``).

Rotary tables: ``cos`` and ``sin`` are either tables ``[P, R']`` indexed by ``positions``
(SGLang/vLLM ``cos_sin_cache`` split into halves, gpt-fast ``freqs_cis[..., 0]``), or per-token values
(HF ``cos, sin`` of shape ``[T, R']``, ``[B, S, R']`` or ``[1, S, R']``). ``R'`` is ``R`` (one value per
feature, as HF computes them) or ``R/2`` (one per pair).

The host side is ``problem.py`` (checks), ``launch.py`` (configuration, arguments) and ``reference.py``
(the same contract in plain torch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fx_fusion.kernels.casts import _cache_value, _q_value, _round, _to


@triton.jit
def _pair_features(BLOCK_HALF: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """Pair index i and its two feature indices (e1, e2): NeoX (i, i + HALF), GPT-J (2i, 2i + 1)."""
    i = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        e1 = i
        e2 = i + HALF
    else:
        e1 = 2 * i
        e2 = 2 * i + 1
    return i, e1, e2


@triton.jit
def _load_pairs(x_ptr, x_row, X_SD: tl.constexpr, m, e1, e2):
    """The values at features (e1, e2) of BLOCK_R rows (x row offsets [BLOCK_R]), in fp32; 0 where masked."""
    x1 = tl.load(x_ptr + x_row[:, None] + (e1 * X_SD)[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + (e2 * X_SD)[None, :], mask=m, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _rope_pairs(
    x1, x2,                                  # [BLOCK_R, BLOCK_HALF] fp32: the values at features (e1, e2)
    cos_ptr, sin_ptr, cos_row, sin_row, COS_SD: tl.constexpr, SIN_SD: tl.constexpr,
    m, i, e1, e2,                            # [BLOCK_R, BLOCK_HALF] mask; pair index and its features
    COS_PER_ELEMENT: tl.constexpr, ROUND_TABLE: tl.constexpr,
):
    """Rotate BLOCK_R rows; returns (o1, o2) in fp32, the values at features (e1, e2).

    # o1 = x1 * c1 - x2 * s1 ;  o2 = x2 * c2 + x1 * s2   (pairs: NeoX (i, i+HALF), GPT-J (2i, 2i+1))

    Only values come back: every address a store uses is computed in the kernel from index math and
    loaded values, so Inductor's analysis of which arguments the kernel writes (it follows store
    addresses back through calls to every argument of the call) sees that x, cos and sin are only read.
    ROUND_TABLE: 0, or 1 / 2 to round the cos/sin values to bf16 / fp16 first, as a model that casts its
    fp32 table to the model dtype before the multiply (SGLang, vLLM ``forward_native``) does.
    """
    if COS_PER_ELEMENT:
        c1 = tl.load(cos_ptr + cos_row[:, None] + (e1 * COS_SD)[None, :], mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cos_row[:, None] + (e2 * COS_SD)[None, :], mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + sin_row[:, None] + (e1 * SIN_SD)[None, :], mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + sin_row[:, None] + (e2 * SIN_SD)[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        c1 = tl.load(cos_ptr + cos_row[:, None] + (i * COS_SD)[None, :], mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + sin_row[:, None] + (i * SIN_SD)[None, :], mask=m, other=0.0).to(tl.float32)
        c2 = c1
        s2 = s1
    c1, c2, s1, s2 = _round(c1, ROUND_TABLE), _round(c2, ROUND_TABLE), _round(s1, ROUND_TABLE), _round(s2, ROUND_TABLE)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rms_scale(x1, x2, xt, D: tl.constexpr, EPS: tl.constexpr, HEADS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per row: 1 / sqrt(mean(x^2) + EPS) over the head's D features (pairs x1, x2 [BLOCK_R, BLOCK_HALF] and the
    tail xt [BLOCK_R, BLOCK_TAIL], or None; masked values 0), in fp32, sqrt and division correctly rounded (as
    eager's rsqrt on CPU). The sum's order is the kernel's own (eager's differs at the level of fp32 rounding).
    HEADS > 1 (OLMo 2's norm over the whole projection): the mean over the HEADS * D features of each token, whose
    heads are HEADS consecutive rows (the launch makes every program's rows whole tokens)."""
    # tl.reduce with a combine of our own, not tl.sum: Triton's library @jit functions run in its interpreter only
    # when TRITON_INTERPRET was set before Triton was imported (a process that imported Inductor first fails)
    ss = tl.reduce(x1 * x1, 1, _add) + tl.reduce(x2 * x2, 1, _add)
    if xt is not None:
        ss += tl.reduce(xt * xt, 1, _add)
    if HEADS > 1:
        tokens = tl.reduce(tl.reshape(ss, (BLOCK_R // HEADS, HEADS)), 1, _add)
        ss = tl.reshape(tl.broadcast_to(tokens[:, None], (BLOCK_R // HEADS, HEADS)), (BLOCK_R,))
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, D * HEADS) + EPS))


@triton.jit
def _rms_apply(x, r, w_ptr, w_row, feat, fmask, ty, OFFSET: tl.constexpr, ROUND: tl.constexpr):
    """x [BLOCK_R, F] normalised by r [BLOCK_R] as the model's RMSNorm rounds it: ``x * r``, rounded to ty first
    with ROUND, times ``w[w_row + feat] + OFFSET`` (w read in its dtype, the sum in fp32; no w: no multiply; w_row:
    each row's offset into a full-width weight, head * D, or None), rounded to ty; returned in fp32."""
    x = x * r[:, None]
    if ROUND:
        x = _to(x, ty).to(tl.float32)
    if w_ptr is not None:
        if w_row is None:
            w = tl.load(w_ptr + feat, mask=fmask, other=0.0).to(tl.float32)[None, :]
        else:
            w = tl.load(w_ptr + w_row[:, None] + feat[None, :], mask=fmask[None, :], other=0.0).to(tl.float32)
        if OFFSET != 0.0:
            w = w + OFFSET
        x = x * w
    return _to(x, ty).to(tl.float32)


@triton.jit
def _qk_norm(x1, x2, xt, w_ptr, h, i, e1, e2, ty, ROT: tl.constexpr, D: tl.constexpr, EPS: tl.constexpr,
             OFFSET: tl.constexpr, ROUND: tl.constexpr, FULL: tl.constexpr, HEADS: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """QK-norm of BLOCK_R head rows (heads h) held as the pairs (x1, x2) at features (e1, e2) and the tail xt
    (features ROT..D, where ROT < D; else any tensor, returned as it is), all fp32: ``_rms_scale`` then ``_rms_apply``;
    FULL: one norm over a token's HEADS heads, weights [HEADS * D]. Returns (x1, x2, xt), in fp32, rounded to ty.
    (Never None in the result: Triton 3.6 cannot return one in a tuple.)"""
    w_row = h * D if FULL else None
    if ROT < D:
        r = _rms_scale(x1, x2, xt, D, EPS, HEADS if FULL else 1, BLOCK_R)
        tail = ROT + tl.arange(0, BLOCK_TAIL)
        xt = _rms_apply(xt, r, w_ptr, w_row, tail, tail < D, ty, OFFSET, ROUND)
    else:
        r = _rms_scale(x1, x2, None, D, EPS, HEADS if FULL else 1, BLOCK_R)
    x1 = _rms_apply(x1, r, w_ptr, w_row, e1, i < ROT // 2, ty, OFFSET, ROUND)
    x2 = _rms_apply(x2, r, w_ptr, w_row, e2, i < ROT // 2, ty, OFFSET, ROUND)
    return x1, x2, xt


@triton.jit
def _offset(b, s, h, sb, ss, SH: tl.constexpr):
    """b * sb + s * ss + h * SH; ``sb`` is None where the batch index is always 0 (or broadcast)."""
    off = s * ss + h * SH
    if sb is not None:
        off += b * sb
    return off


@triton.jit
def _split_offset(i, SPLIT: tl.constexpr, s_hi: tl.constexpr, s: tl.constexpr):
    """i * s, or for a split index (SPLIT not None) (i // SPLIT) * s_hi + (i % SPLIT) * s (the 5-D layouts)."""
    if SPLIT is None:
        off = i * s
    else:
        off = (i // SPLIT) * s_hi + (i % SPLIT) * s
    return off


@triton.jit
def _token_rows(pid, BLOCK_R: tl.constexpr, N_HEADS: tl.constexpr, T, B: tl.constexpr):
    """Rows pid*BLOCK_R.. of the (token, head) grid: their (b, s, h) and mask (index math only)."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    t = rows // N_HEADS
    h = rows - t * N_HEADS
    mask = t < T
    if B == 1:
        b = 0
        s = t
    else:
        seq = T // B
        b = t // seq
        s = t - b * seq
    return b, s, h, mask


@triton.jit
def _table_rows(
    b, s, mask, pos_ptr, pos_sb, POS_SS: tl.constexpr, N_POSITIONS: tl.constexpr,
    cos_sb, COS_SR: tl.constexpr, sin_sb, SIN_SR: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
    CHECK: tl.constexpr,
):
    """cos/sin row offsets of tokens (b, s): the table row of their position, or their own row; and, with CHECK,
    which tokens' positions lie outside the table (none without CHECK or positions)."""
    bad = mask & False
    if pos_ptr is not None:
        pos = tl.load(pos_ptr + _offset(b, s, 0, pos_sb, POS_SS, 0), mask=mask, other=0).to(tl.int64)
        if NEGATIVE_WRAPS:
            pos = tl.where(pos < 0, pos + N_POSITIONS, pos)
        if CHECK:
            bad = mask & ((pos < 0) | (pos >= N_POSITIONS))
        pos = tl.minimum(tl.maximum(pos, 0), N_POSITIONS - 1)  # never read outside the table
        cos_row = pos * COS_SR
        sin_row = pos * SIN_SR
    else:
        cos_row = _offset(b, s, 0, cos_sb, COS_SR, 0)
        sin_row = _offset(b, s, 0, sin_sb, SIN_SR, 0)
    return cos_row, sin_row, bad


@triton.jit
def _rope_kv_store_kernel(
    # q [B, S, HQ, D]; k, v [B, S, HKV, D]; q_out [B, S, HQ, D]; k_out [B, S, HKV, D] or None.
    # Element (b, s, h, d) of tensor x sits at b*x_sb + s*x_ss + h*x_sh + d*x_sd.
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr,
    # caches (parameters kc_* and KC_* of k_cache, vc_* and VC_* of v_cache):
    #         element (b, slot, h, d) at b*sb + blk*sblk + split(off, SLOT_SPLIT, sslot_hi, sslot) + h*sh
    #         + split(d, D_SPLIT, sd_hi, sd), blk = slot // CACHE_BLOCK_SIZE, off = slot % CACHE_BLOCK_SIZE, where
    #         split(i, X, s_hi, s) = (i // X)*s_hi + (i % X)*s, or i*s when X is None; sblk: the stride between
    #         blocks, sslot: between the slots of one block (token: sblk = stride(0), sslot = 0; paged:
    #         sblk = stride(0), sslot = stride(1); sequence: sb = stride(0), sblk = stride(2), sslot = 0; paged_x k
    #         [nb, Hkv, D // x, bs, x]: sblk, sh, sd_hi, sslot, sd = stride(0..4), D_SPLIT = x; paged_x v
    #         [nb, Hkv, D, bs]: sblk, sh, sd, sslot = stride(0..3); shuffled v [nb, Hkv, bs // x, D, x]: sblk, sh,
    #         sslot_hi, sd, sslot = stride(0..4), SLOT_SPLIT = x; the splits and *_hi are None for other layouts)
    k_cache_ptr, v_cache_ptr,
    # or, for caches that are views of larger buffers (one stacked buffer for every layer), the buffers and the
    # views' element offsets in them; v_cache_ptr None: v's view is of k's buffer. None offsets: the caches.
    kc_off, vc_off,
    slot_ptr, swa_ptr, pos_ptr,      # slot_mapping [B or 1, S]; swa_table [N_SWA] or None; positions [B or 1, S] or None
    cos_ptr, sin_ptr,                # tables [N_POSITIONS, R'] (with positions) or per-token [B or 1, S, R']
    k_scale_ptr, v_scale_ptr,        # one fp32, bf16 or fp16 value each, or None
    q_scale_ptr,                     # fp8 q: one fp32, bf16 or fp16 value, or None
    q_norm_w_ptr, k_norm_w_ptr,      # QK-norm weights [D] (contiguous), or None (no weight, or no norm)
    T,                               # tokens: B * S
    # Run-time strides, those that may involve the token count: the batch strides (S * ...; None where the
    # batch index is always 0 (B = 1) or the tensor is broadcast), and the token strides of q, k, v (views
    # the caller made, e.g. of a fused qkv input whose sizes are all dynamic).
    q_sb, k_sb, v_sb, qo_sb, ko_sb, slot_sb, pos_sb, cos_sb, sin_sb,
    q_ss, k_ss, v_ss,
    # Every other stride and size is fixed for a compiled graph: constexprs.
    q_sh: tl.constexpr, q_sd: tl.constexpr,
    k_sh: tl.constexpr, k_sd: tl.constexpr,
    v_sh: tl.constexpr, v_sd: tl.constexpr,
    qo_ss: tl.constexpr, qo_sh: tl.constexpr, qo_sd: tl.constexpr,
    ko_ss: tl.constexpr, ko_sh: tl.constexpr, ko_sd: tl.constexpr,
    kc_sb: tl.constexpr, kc_sblk: tl.constexpr, kc_sslot: tl.constexpr, kc_sh: tl.constexpr, kc_sd: tl.constexpr,
    vc_sb: tl.constexpr, vc_sblk: tl.constexpr, vc_sslot: tl.constexpr, vc_sh: tl.constexpr, vc_sd: tl.constexpr,
    kc_sslot_hi: tl.constexpr, kc_sd_hi: tl.constexpr, vc_sslot_hi: tl.constexpr, vc_sd_hi: tl.constexpr,
    KC_SLOT_SPLIT: tl.constexpr, KC_D_SPLIT: tl.constexpr, VC_SLOT_SPLIT: tl.constexpr, VC_D_SPLIT: tl.constexpr,
    slot_ss: tl.constexpr, pos_ss: tl.constexpr,
    cos_sr: tl.constexpr, cos_sd: tl.constexpr, sin_sr: tl.constexpr, sin_sd: tl.constexpr,  # row: table row or token
    B: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
    N_SLOTS: tl.constexpr, N_SWA: tl.constexpr, N_POSITIONS: tl.constexpr, CACHE_BLOCK_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,           # largest finite value of an fp8 cache dtype; None for other caches
    # eager fp8 stores (quant_dtype given; see casts._eager_fp8): FP8_CAST 0: off, 1: e4m3fn saturating, 2: e4m3fn
    # NaN from 464 (4: the same, by the GPU's conversion), 3: e5m2 inf from 61440; X_ROUND/Q_ROUND as ROUND_TABLE;
    # CLAMP_LO/HI float or None
    FP8_CAST: tl.constexpr, X_ROUND: tl.constexpr, Q_ROUND: tl.constexpr, SCALE_MUL: tl.constexpr,
    CLAMP_LO: tl.constexpr, CLAMP_HI: tl.constexpr,
    # fp8 q: q_out holds _eager_fp8 of the rotated q (codes as above: Q_X_ROUND rounds to q's dtype, Q_QROUND to
    # the quotient's); Q_FP8_CAST 0: q_out in q's dtype
    Q_FP8_CAST: tl.constexpr, Q_X_ROUND: tl.constexpr, Q_QROUND: tl.constexpr, Q_SCALE_MUL: tl.constexpr,
    Q_CLAMP_LO: tl.constexpr, Q_CLAMP_HI: tl.constexpr,
    # the loaded k_scale / v_scale (S_ROUND) and q_scale (Q_S_ROUND) rounded first: _round's codes (0: as they are)
    S_ROUND: tl.constexpr, Q_S_ROUND: tl.constexpr,
    # QK-norm: RMSNorm of each q (Q_NORM) / k (K_NORM) head before the RoPE (_rms_scale, _rms_apply), eps NORM_EPS,
    # weight offset NORM_OFFSET (Gemma's 1 + w), NORM_ROUND: the normalised value rounded to x's dtype before the
    # weight multiply (HF Llama / Qwen3); NORM_FULL: over all of a token's heads (OLMo 2), weights [H * D]
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, NORM_EPS: tl.constexpr, NORM_OFFSET: tl.constexpr,
    NORM_ROUND: tl.constexpr, NORM_FULL: tl.constexpr,
    NORM_AFTER: tl.constexpr,        # the QK-norm of the rotated head instead (HunYuan, Llama 4), of the RoPE's
    #                                  result rounded to x's dtype
    IS_NEOX: tl.constexpr, COS_PER_ELEMENT: tl.constexpr, NEGATIVE_WRAPS: tl.constexpr,
    # out-of-range slots (after NEGATIVE_WRAPS; negative ones without it are padding) and positions fail a
    # device-side assertion instead of being skipped or clamped, where the kernel is compiled with assertions
    # (Inductor's launches on CUDA, ``launch`` on CUDA with a check on)
    CHECK_SLOTS: tl.constexpr, CHECK_POSITIONS: tl.constexpr,
    ROUND_TABLE: tl.constexpr,       # round cos/sin to 0: nothing, 1: bf16, 2: fp16 (see _rope_pairs)
    BLOCK_RQ: tl.constexpr, BLOCK_RKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The first cdiv(T * HQ, BLOCK_RQ) programs each rotate BLOCK_RQ (token, q-head) rows. The others each
    # rotate BLOCK_RKV (token, kv-head) rows of k and store them, and the same rows of v, into the caches.
    # out = x * cos + rotate(x) * sin on features [0, ROT); features [ROT, D) pass through.
    # (The q branch's names start with q: Triton requires a name set in both branches to have one type,
    # and the two branches' blocks differ in size.)
    pid = tl.program_id(0).to(tl.int64)
    n_q_programs = (T * HQ + BLOCK_RQ - 1) // BLOCK_RQ
    if pid < n_q_programs:
        qb, qs, qh, qmask = _token_rows(pid, BLOCK_RQ, HQ, T, B)
        qcos_row, qsin_row, qbad = _table_rows(qb, qs, qmask, pos_ptr, pos_sb, pos_ss, N_POSITIONS, cos_sb, cos_sr,
                                         sin_sb, sin_sr, NEGATIVE_WRAPS, CHECK_POSITIONS)
        q_row = _offset(qb, qs, qh, q_sb, q_ss, q_sh)
        qo_row = _offset(qb, qs, qh, qo_sb, qo_ss, qo_sh)
        qi, qe1, qe2 = _pair_features(BLOCK_HALF, ROT // 2, IS_NEOX)
        qm = qmask[:, None] & (qi < ROT // 2)[None, :]
        qx1, qx2 = _load_pairs(q_ptr, q_row, q_sd, qm, qe1, qe2)
        qx = None  # the tail (features ROT..D), passed through
        if ROT < D:
            qtail = ROT + tl.arange(0, BLOCK_TAIL)
            qtm = qmask[:, None] & (qtail < D)[None, :]
            qx = tl.load(q_ptr + q_row[:, None] + (qtail * q_sd)[None, :], mask=qtm, other=0.0)
            if Q_NORM:
                qx = qx.to(tl.float32)
        q_ty = q_ptr.dtype.element_ty
        if Q_NORM and not NORM_AFTER:
            qx1, qx2, qxt = _qk_norm(qx1, qx2, qx if ROT < D else qx1, q_norm_w_ptr, qh, qi, qe1, qe2, q_ty, ROT, D,
                                     NORM_EPS, NORM_OFFSET, NORM_ROUND, NORM_FULL, HQ, BLOCK_RQ, BLOCK_TAIL)
            if ROT < D:
                qx = qxt
        qo1, qo2 = _rope_pairs(qx1, qx2, cos_ptr, sin_ptr, qcos_row, qsin_row, cos_sd, sin_sd,
                               qm, qi, qe1, qe2, COS_PER_ELEMENT, ROUND_TABLE)
        if Q_NORM and NORM_AFTER:  # the norm of the rotated head, as the model stores it (in q's dtype)
            qo1, qo2 = _to(qo1, q_ty).to(tl.float32), _to(qo2, q_ty).to(tl.float32)
            qo1, qo2, qxt = _qk_norm(qo1, qo2, qx if ROT < D else qo1, q_norm_w_ptr, qh, qi, qe1, qe2, q_ty, ROT, D,
                                     NORM_EPS, NORM_OFFSET, NORM_ROUND, NORM_FULL, HQ, BLOCK_RQ, BLOCK_TAIL)
            if ROT < D:
                qx = qxt
        qout_ty = q_out_ptr.dtype.element_ty
        tl.store(q_out_ptr + qo_row[:, None] + (qe1 * qo_sd)[None, :],
                 _q_value(qo1, q_scale_ptr, qout_ty, Q_FP8_CAST, Q_X_ROUND, Q_QROUND, Q_SCALE_MUL, Q_CLAMP_LO,
                          Q_CLAMP_HI, Q_S_ROUND), mask=qm)
        tl.store(q_out_ptr + qo_row[:, None] + (qe2 * qo_sd)[None, :],
                 _q_value(qo2, q_scale_ptr, qout_ty, Q_FP8_CAST, Q_X_ROUND, Q_QROUND, Q_SCALE_MUL, Q_CLAMP_LO,
                          Q_CLAMP_HI, Q_S_ROUND), mask=qm)
        if ROT < D:
            if Q_FP8_CAST != 0:
                qx = _q_value(qx.to(tl.float32), q_scale_ptr, qout_ty, Q_FP8_CAST, Q_X_ROUND, Q_QROUND, Q_SCALE_MUL,
                              Q_CLAMP_LO, Q_CLAMP_HI, Q_S_ROUND)
            tl.store(q_out_ptr + qo_row[:, None] + (qtail * qo_sd)[None, :], qx, mask=qtm)
        if CHECK_POSITIONS:  # last: its barrier does not hold up the work (a bad position was clamped)
            tl.device_assert(~qbad, "position out of range of the rotary table")
    else:
        b, s, h, mask = _token_rows(pid - n_q_programs, BLOCK_RKV, HKV, T, B)
        cos_row, sin_row, _ = _table_rows(b, s, mask, pos_ptr, pos_sb, pos_ss, N_POSITIONS, cos_sb, cos_sr,
                                       sin_sb, sin_sr, NEGATIVE_WRAPS, False)  # checked by the q programs
        d = tl.arange(0, BLOCK_D)
        vm = mask[:, None] & (d < D)[None, :]
        v = tl.load(v_ptr + _offset(b, s, h, v_sb, v_ss, v_sh)[:, None] + (d * v_sd)[None, :], mask=vm)
        v = v.to(tl.float32)
        # slot of token (b, s): negative at either level, or outside the cache, means no store
        slot = tl.load(slot_ptr + _offset(b, s, 0, slot_sb, slot_ss, 0), mask=mask, other=-1).to(tl.int64)
        store = mask
        bad = mask & False  # with CHECK_SLOTS: rows whose slot is out of range (without wraps, negative is padding)
        if swa_ptr is not None:
            if NEGATIVE_WRAPS:
                slot = tl.where(slot < 0, slot + N_SWA, slot)
            in_swa = (slot >= 0) & (slot < N_SWA)
            if CHECK_SLOTS:
                bad = store & ~in_swa if NEGATIVE_WRAPS else store & (slot >= N_SWA)
            store = store & in_swa
            slot = tl.load(swa_ptr + tl.minimum(tl.maximum(slot, 0), N_SWA - 1), mask=in_swa, other=-1).to(tl.int64)
        if NEGATIVE_WRAPS:
            slot = tl.where(slot < 0, slot + N_SLOTS, slot)
        if CHECK_SLOTS:
            bad = bad | (store & ((slot < 0) | (slot >= N_SLOTS)) if NEGATIVE_WRAPS else store & (slot >= N_SLOTS))
        store = store & (slot >= 0) & (slot < N_SLOTS)
        # the tokens not stored address a row inside the cache (clamped, not selected by ``store``: Triton 3.6
        # mis-assigns layouts to ``store`` for some shapes when it picks the slot, and fails to compile; memcheck
        # grid case 103, sequence D 64 rot 32 64/8 heads with a sliding-window table; tests/kernels/test_cuda_compile.py)
        slot = tl.minimum(tl.maximum(slot, 0), N_SLOTS - 1)
        blk = slot // CACHE_BLOCK_SIZE
        off = slot - blk * CACHE_BLOCK_SIZE
        kc_row = _offset(b, blk, h, kc_sb, kc_sblk, kc_sh) + _split_offset(off, KC_SLOT_SPLIT, kc_sslot_hi, kc_sslot)
        vc_row = _offset(b, blk, h, vc_sb, vc_sblk, vc_sh) + _split_offset(off, VC_SLOT_SPLIT, vc_sslot_hi, vc_sslot)
        kc_base = k_cache_ptr
        if kc_off is not None:
            kc_base += kc_off
        if v_cache_ptr is None:
            vc_base = k_cache_ptr
        else:
            vc_base = v_cache_ptr
        if vc_off is not None:
            vc_base += vc_off
        k_row = _offset(b, s, h, k_sb, k_ss, k_sh)

        i, e1, e2 = _pair_features(BLOCK_HALF, ROT // 2, IS_NEOX)
        m = mask[:, None] & (i < ROT // 2)[None, :]
        x1, x2 = _load_pairs(k_ptr, k_row, k_sd, m, e1, e2)
        x = None  # the tail (features ROT..D), passed through
        if ROT < D:
            tail = ROT + tl.arange(0, BLOCK_TAIL)
            tm = mask[:, None] & (tail < D)[None, :]
            x = tl.load(k_ptr + k_row[:, None] + (tail * k_sd)[None, :], mask=tm, other=0.0)
            if K_NORM:
                x = x.to(tl.float32)
        k_ty = k_ptr.dtype.element_ty
        if K_NORM and not NORM_AFTER:
            x1, x2, xt = _qk_norm(x1, x2, x if ROT < D else x1, k_norm_w_ptr, h, i, e1, e2, k_ty, ROT, D, NORM_EPS,
                                  NORM_OFFSET, NORM_ROUND, NORM_FULL, HKV, BLOCK_RKV, BLOCK_TAIL)
            if ROT < D:
                x = xt
        o1, o2 = _rope_pairs(x1, x2, cos_ptr, sin_ptr, cos_row, sin_row, cos_sd, sin_sd,
                             m, i, e1, e2, COS_PER_ELEMENT, ROUND_TABLE)
        if K_NORM and NORM_AFTER:  # the norm of the rotated head, as the model stores it (in k's dtype)
            o1, o2 = _to(o1, k_ty).to(tl.float32), _to(o2, k_ty).to(tl.float32)
            o1, o2, xt = _qk_norm(o1, o2, x if ROT < D else o1, k_norm_w_ptr, h, i, e1, e2, k_ty, ROT, D, NORM_EPS,
                                  NORM_OFFSET, NORM_ROUND, NORM_FULL, HKV, BLOCK_RKV, BLOCK_TAIL)
            if ROT < D:
                x = xt
        kc_ty = k_cache_ptr.dtype.element_ty
        sm = m & store[:, None]
        tl.store(kc_base + kc_row[:, None] + _split_offset(e1, KC_D_SPLIT, kc_sd_hi, kc_sd)[None, :],
                 _cache_value(o1, k_scale_ptr, kc_ty, FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL,
                              CLAMP_LO, CLAMP_HI, S_ROUND), mask=sm)
        tl.store(kc_base + kc_row[:, None] + _split_offset(e2, KC_D_SPLIT, kc_sd_hi, kc_sd)[None, :],
                 _cache_value(o2, k_scale_ptr, kc_ty, FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL,
                              CLAMP_LO, CLAMP_HI, S_ROUND), mask=sm)
        if k_out_ptr is not None:
            ko_row = _offset(b, s, h, ko_sb, ko_ss, ko_sh)
            ko_ty = k_out_ptr.dtype.element_ty
            tl.store(k_out_ptr + ko_row[:, None] + (e1 * ko_sd)[None, :], _to(o1, ko_ty), mask=m)
            tl.store(k_out_ptr + ko_row[:, None] + (e2 * ko_sd)[None, :], _to(o2, ko_ty), mask=m)
        if ROT < D:
            tl.store(kc_base + kc_row[:, None] + _split_offset(tail, KC_D_SPLIT, kc_sd_hi, kc_sd)[None, :],
                     _cache_value(x.to(tl.float32), k_scale_ptr, kc_ty,
                                  FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND, SCALE_MUL, CLAMP_LO, CLAMP_HI, S_ROUND),
                     mask=tm & store[:, None])
            if k_out_ptr is not None:
                tl.store(k_out_ptr + ko_row[:, None] + (tail * ko_sd)[None, :], x, mask=tm)

        tl.store(vc_base + vc_row[:, None] + _split_offset(d, VC_D_SPLIT, vc_sd_hi, vc_sd)[None, :],
                 _cache_value(v, v_scale_ptr, kc_ty, FP8_MAX, FP8_CAST, X_ROUND, Q_ROUND,
                              SCALE_MUL, CLAMP_LO, CLAMP_HI, S_ROUND), mask=vm & store[:, None])
        if CHECK_SLOTS:  # last: its barrier does not hold up the stores (a bad slot's row was not stored)
            tl.device_assert(~bad, "slot out of range of swa_table or the cache")
