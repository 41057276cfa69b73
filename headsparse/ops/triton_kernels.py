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
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply bounds, causal and padding masks to base-2 scores s (BLOCK_M, BLOCK_N)."""
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
            s = s + tl.load(m_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


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
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_programs_h
    p = pid % num_programs_h
    hq = tl.load(HEADS + p)
    hk = tl.load(KV_HEADS + p)
    hm = tl.load(M_HEADS + p)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = seq_kv
    if CAUSAL:  # key blocks past the last visible key of this query block are skipped
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, offs_d, stride_ks, stride_kd, seq_kv, HEAD_DIM)
        v = _load_tile(v_base, offs_n, offs_d, stride_vs, stride_vd, seq_kv, HEAD_DIM)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = _masked_scores(s, offs_m, offs_n, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                           seq_q, seq_kv, causal_offset, CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_ij = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p_ij, 1)
        acc = acc * alpha[:, None] + _dot(p_ij.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(empty, float("inf"), m_fin + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & d_ok)
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
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, M, QH_PTR, QH_IDX, M_HEADS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_db, stride_dh, stride_ds, stride_dd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, num_kv_heads, seq_q, seq_kv, causal_offset, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    start_n = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_kv_heads
    r = pid % num_kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_mask = (offs_n[:, None] < seq_kv) & d_ok
    k = _load_tile(K + b * stride_kb + r * stride_kh, offs_n, offs_d, stride_ks, stride_kd, seq_kv, HEAD_DIM)
    v = _load_tile(V + b * stride_vb + r * stride_vh, offs_n, offs_d, stride_vs, stride_vd, seq_kv, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query rows before this key block's first visible row see none of it
        lo = tl.maximum(0, start_n * BLOCK_N - causal_offset) // BLOCK_M * BLOCK_M
    j0 = tl.load(QH_PTR + r)
    j1 = tl.load(QH_PTR + r + 1)
    for j in range(j0, j1):
        g = tl.load(QH_IDX + j)
        hm = tl.load(M_HEADS + g)
        q_base = Q + b * stride_qb + g * stride_qh
        do_base = DO + b * stride_db + g * stride_dh
        row_base = (b * num_q_heads + g) * seq_q
        for start_m in range(lo, seq_q, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seq_q
            q = _load_tile(q_base, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
            do = _load_tile(do_base, offs_m, offs_d, stride_ds, stride_dd, seq_q, HEAD_DIM)
            lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
            s = _masked_scores(s, offs_m, offs_n, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                               seq_q, seq_kv, causal_offset, CAUSAL, MASK_KIND)
            p = tl.exp2(s - lse[:, None])  # rows with nothing to attend have lse = +inf, so p = 0
            dv += _dot(tl.trans(p).to(do.dtype), do, UPCAST, IEEE)
            dp = _dot(do, tl.trans(v), UPCAST, IEEE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds).to(q.dtype), q, UPCAST, IEEE)
    dk = dk * sm_scale
    # DK and DV are fresh contiguous (B, R, Skv, D) buffers.
    base = (b * num_kv_heads + r) * seq_kv * HEAD_DIM
    ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


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
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_q_heads
    g = pid % num_q_heads
    r = tl.load(KV_POS + g)
    hm = tl.load(M_HEADS + g)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    row_ok = offs_m < seq_q
    q = _load_tile(Q + b * stride_qb + g * stride_qh, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
    do = _load_tile(DO + b * stride_db + g * stride_dh, offs_m, offs_d, stride_ds, stride_dd, seq_q, HEAD_DIM)
    lse = tl.load(LSE + pid * seq_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid * seq_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + r * stride_kh
    v_base = V + b * stride_vb + r * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = seq_kv
    if CAUSAL:
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, offs_d, stride_ks, stride_kd, seq_kv, HEAD_DIM)
        v = _load_tile(v_base, offs_n, offs_d, stride_vs, stride_vd, seq_kv, HEAD_DIM)
        s = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = _masked_scores(s, offs_m, offs_n, M, hm, b, stride_mb, stride_mh, stride_mq, stride_mk,
                           seq_q, seq_kv, causal_offset, CAUSAL, MASK_KIND)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, IEEE)
    dq = dq * sm_scale
    # DQ is a fresh contiguous (B, G, Sq, D) buffer.
    ptrs = pid * seq_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok)
