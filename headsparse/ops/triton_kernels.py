"""Triton kernels for head-sparse attention, FlashAttention-2 style.

One kernel per pass, each readable on its own:

* ``_attn_fwd``: online softmax over key blocks; writes O and the log-sum-exp
  (base 2) for the program's query head. The grid covers active heads only.
* ``_attn_bwd_preprocess``: delta = rowsum(O * dO); optionally adds each
  (batch, head)'s sum of delta into a statistics buffer (the head-gate gradient).
* ``_attn_bwd_dkdv``: one program per (key block, KV head); loops over the
  query heads of that KV head that need a gradient (a CSR list, so ragged GQA
  groups work) and over query blocks. No atomics.
* ``_attn_bwd_dq``: one program per (query block, query head).

The backward kernels see compact tensors that hold only the heads in the
backward, so their grids never visit a head without a gradient.
Scores are kept in base 2 (``qk_scale`` = scale * log2(e)), as in the Triton
fused-attention tutorial, so the inner loops use ``exp2``.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADD = 2


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # UPCAST: the CPU interpreter multiplies bf16 bit patterns wrongly in tl.dot.
    # IEEE: fp32 inputs get full fp32 products instead of TF32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(base, rows, offs_d, stride_s, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of one head's (S, D) slice; rows >= n_rows and columns >= HEAD_DIM read as 0."""
    msk = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d, mask=msk, other=0.0)


@triton.jit
def _masked_scores(s, offs_m, offs_n, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                   seq_q, seq_kv, causal_offset,
                   CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply bounds, causal and padding masks to base-2 scores s (BLOCK_M, BLOCK_N).

    Each part is compiled in only when needed: tiles strictly below the causal
    diagonal skip the causal test, and shapes that are multiples of the block
    sizes skip the bounds test.
    """
    if CHECK_BOUNDS or CAUSAL or MASK_KIND != 0:
        in_bounds = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_kv)
        valid = in_bounds
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        if MASK_KIND != 0:
            m_ptrs = (M + b * stride_mb + hm * stride_mh
                      + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk)
            if MASK_KIND == 1:
                keep = tl.load(m_ptrs, mask=in_bounds, other=0)
                valid = valid & (keep != 0)
            else:
                madd = tl.load(m_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
                s = s + madd * 1.4426950408889634
                valid = valid & (madd != float("-inf"))  # masks the key even where the score is NaN
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _causal_full_kv_end(start_m, causal_offset, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the key blocks that every row of query block ``start_m`` sees whole (no causal mask needed)."""
    first_row_sees = tl.maximum(start_m * BLOCK_M + causal_offset + 1, 0)
    return tl.minimum(first_row_sees // BLOCK_N * BLOCK_N, hi)


@triton.jit
def _kv_tile_scores(q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n, offs_m, offs_d,
                    M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk, seq_q, seq_kv, causal_offset, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Load the key block at ``start_n`` and its values; return (k, v, masked base-2 scores of q against it)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, offs_d, stride_ks, stride_kd, seq_kv, HEAD_DIM)
    v = _load_tile(v_base, offs_n, offs_d, stride_vs, stride_vd, seq_kv, HEAD_DIM)
    s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
    s = _masked_scores(s, offs_m, offs_n, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                       seq_q, seq_kv, causal_offset, CHECK_BOUNDS, CAUSAL, MASK_KIND)
    return k, v, s


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                 offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                 seq_q, seq_kv, causal_offset, qk_scale, lo, hi,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _kv_tile_scores(q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n, offs_m,
                                  offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk, seq_q, seq_kv,
                                  causal_offset, qk_scale, HEAD_DIM, BLOCK_N, CHECK_BOUNDS, CAUSAL, MASK_KIND,
                                  UPCAST, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_ij = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p_ij, 1)
        acc = acc * alpha[:, None] + _dot(p_ij.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, M, HEADS, KV_HEADS, M_HEADS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_programs_h, seq_q, seq_kv, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_programs_h
    p = pid % num_programs_h
    hq = tl.load(HEADS + p)
    hk = tl.load(KV_HEADS + p)
    hm = tl.load(M_HEADS + p)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Key blocks past the last visible key of this query block are skipped; the blocks every row
        # sees whole run without the causal test, and only the diagonal band pays for it.
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + causal_offset)
        full = _causal_full_kv_end(start_m, causal_offset, hi, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                     offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                                     seq_q, seq_kv, causal_offset, qk_scale, 0, full,
                                     HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, UPCAST, IEEE)
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                     offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                                     seq_q, seq_kv, causal_offset, qk_scale, full, hi,
                                     HEAD_DIM, BLOCK_N, CHECK_BOUNDS, True, MASK_KIND, UPCAST, IEEE)
    else:
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                                     offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                                     seq_q, seq_kv, causal_offset, qk_scale, 0, seq_kv,
                                     HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, UPCAST, IEEE)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], 0.0, out)  # 0 * NaN/inf in v must not reach a row with nothing to attend
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(empty, float("inf"), m_fin + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, STATS,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_db, stride_dh, stride_ds, stride_dd,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_STATS: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_heads
    h = pid % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd,
                 mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + pid * seq_q + offs_m, delta, mask=offs_m < seq_q)
    if HAS_STATS:  # head-gate gradient: sum over tokens of <O, dO>
        tl.atomic_add(STATS + pid, tl.sum(delta, 0))


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, stride_qs, stride_qd, stride_ds, stride_dd,
                 offs_n, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                 seq_q, seq_kv, causal_offset, qk_scale, lo, hi,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_q
        q = _load_tile(q_base, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
        do = _load_tile(do_base, offs_m, offs_d, stride_ds, stride_dd, seq_q, HEAD_DIM)
        lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = _masked_scores(s, offs_m, offs_n, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                           seq_q, seq_kv, causal_offset, CHECK_BOUNDS, CAUSAL, MASK_KIND)
        p = tl.exp2(s - lse[:, None])  # rows with nothing to attend have lse = +inf, so p = 0
        dv += _dot(tl.trans(p).to(do.dtype), do, UPCAST, IEEE)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, M, QH_PTR, QH_IDX, M_HEADS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, num_kv_heads, seq_q, seq_kv, causal_offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    start_n = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_kv_heads
    r = pid % num_kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seq_kv) & (offs_d[None, :] < HEAD_DIM)
    k = _load_tile(K + b * stride_kb + r * stride_kh, offs_n, offs_d, stride_ks, stride_kd, seq_kv, HEAD_DIM)
    v = _load_tile(V + b * stride_vb + r * stride_vh, offs_n, offs_d, stride_vs, stride_vd, seq_kv, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    full = 0
    if CAUSAL:
        # Query blocks before the first row that sees this key block are skipped; from ``full`` on,
        # every row sees the whole key block and the causal test is compiled out.
        lo = tl.maximum(0, start_n * BLOCK_N - causal_offset) // BLOCK_M * BLOCK_M
        last_key = start_n * BLOCK_N + BLOCK_N - 1
        full = tl.minimum(tl.maximum(last_key - causal_offset + BLOCK_M - 1, lo) // BLOCK_M * BLOCK_M, seq_q)
        full = tl.maximum(full, lo)
    j0 = tl.load(QH_PTR + r)
    j1 = tl.load(QH_PTR + r + 1)
    for j in range(j0, j1):  # the query heads of this KV head that are in the backward
        g = tl.load(QH_IDX + j)
        hm = tl.load(M_HEADS + g)
        q_base = Q + b * stride_qb + g * stride_qh
        do_base = DO + b * stride_db + g * stride_dh
        row_base = (b * num_q_heads + g) * seq_q
        if CAUSAL:
            dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, stride_qs, stride_qd,
                                  stride_ds, stride_dd, offs_n, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq,
                                  stride_mk, seq_q, seq_kv, causal_offset, qk_scale, lo, full,
                                  HEAD_DIM, BLOCK_M, CHECK_BOUNDS, True, MASK_KIND, UPCAST, IEEE)
        dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, LSE, DELTA, row_base, stride_qs, stride_qd,
                              stride_ds, stride_dd, offs_n, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq,
                              stride_mk, seq_q, seq_kv, causal_offset, qk_scale, full, seq_q,
                              HEAD_DIM, BLOCK_M, CHECK_BOUNDS, False, MASK_KIND, UPCAST, IEEE)
    dk = dk * sm_scale
    # DK and DV are fresh contiguous (B, R, Skv, D) buffers.
    base = (b * num_kv_heads + r) * seq_kv * HEAD_DIM
    ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                seq_q, seq_kv, causal_offset, qk_scale, lo, hi,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _kv_tile_scores(q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, start_n, offs_m,
                                  offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk, seq_q, seq_kv,
                                  causal_offset, qk_scale, HEAD_DIM, BLOCK_N, CHECK_BOUNDS, CAUSAL, MASK_KIND,
                                  UPCAST, IEEE)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, M, KV_POS, M_HEADS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, seq_q, seq_kv, causal_offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_q_heads
    g = pid % num_q_heads
    r = tl.load(KV_POS + g)
    hm = tl.load(M_HEADS + g)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q = _load_tile(Q + b * stride_qb + g * stride_qh, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
    do = _load_tile(DO + b * stride_db + g * stride_dh, offs_m, offs_d, stride_ds, stride_dd, seq_q, HEAD_DIM)
    lse = tl.load(LSE + pid * seq_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid * seq_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + r * stride_kh
    v_base = V + b * stride_vb + r * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # same split of the key loop as the forward
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + causal_offset)
        full = _causal_full_kv_end(start_m, causal_offset, hi, BLOCK_M, BLOCK_N)
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                         offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                         seq_q, seq_kv, causal_offset, qk_scale, 0, full,
                         HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, UPCAST, IEEE)
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                         offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                         seq_q, seq_kv, causal_offset, qk_scale, full, hi,
                         HEAD_DIM, BLOCK_N, CHECK_BOUNDS, True, MASK_KIND, UPCAST, IEEE)
    else:
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                         offs_m, offs_d, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                         seq_q, seq_kv, causal_offset, qk_scale, 0, seq_kv,
                         HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, UPCAST, IEEE)
    dq = dq * sm_scale
    # DQ is a fresh contiguous (B, G, Sq, D) buffer.
    ptrs = pid * seq_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
