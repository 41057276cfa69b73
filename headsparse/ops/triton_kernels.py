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

As in the tutorial, each kernel offsets its pointers once to its (batch, head):
the helpers take those base pointers (``q_base``, ``k_base``, ``m_base`` for
the mask, ``lse_base`` ...) plus the strides of the sequence and head-dim axes,
never the batch and head indices. k and v share one layout (the launchers
make it so), so they share their strides. Causal masks are aligned
bottom-right: query i sees key j iff j <= i + seq_kv - seq_q.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADD = 2

# How tl.dot multiplies: the native path (tensor cores; fp16/bf16), full fp32 products for fp32 inputs (no TF32),
# or upcasting to fp32 first (the CPU interpreter multiplies bf16 bit patterns wrongly in tl.dot).
DOT_NATIVE = 0
DOT_IEEE = 1
DOT_UPCAST = 2


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    if DOT_MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT_MODE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_tile(base, rows, offs_d, stride_s, stride_d, n_rows, HEAD_DIM: tl.constexpr):
    """Rows ``rows`` of one head's (S, D) slice; rows >= n_rows and columns >= HEAD_DIM read as 0."""
    msk = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d, mask=msk, other=0.0)


@triton.jit
def _masked_scores(s, offs_m, offs_n, m_base, stride_mq, stride_mk, seq_q, seq_kv,
                   CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Apply bounds, causal and padding masks to base-2 scores s (BLOCK_M, BLOCK_N).

    ``m_base`` points at this (batch, head)'s (Sq, Skv) slice of the mask. Each part is compiled in only when
    needed: tiles strictly below the causal diagonal skip the causal test, and shapes that are multiples of the
    block sizes skip the bounds test.
    """
    if CHECK_BOUNDS or CAUSAL or MASK_KIND != 0:
        in_bounds = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_kv)
        valid = in_bounds
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (seq_kv - seq_q))
        if MASK_KIND != 0:
            m_ptrs = m_base + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk
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
def _kv_tile_scores(q, k_base, v_base, stride_kvs, stride_kvd, start_n, offs_m, offs_d,
                    m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr):
    """Load the key block at ``start_n`` and its values; return (k, v, masked base-2 scores of q against it)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, offs_d, stride_kvs, stride_kvd, seq_kv, HEAD_DIM)
    v = _load_tile(v_base, offs_n, offs_d, stride_kvs, stride_kvd, seq_kv, HEAD_DIM)
    s = _dot(q, tl.trans(k), DOT_MODE) * qk_scale
    s = _masked_scores(s, offs_m, offs_n, m_base, stride_mq, stride_mk, seq_q, seq_kv, CHECK_BOUNDS, CAUSAL,
                       MASK_KIND)
    return k, v, s


@triton.jit
def _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                 m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, lo, hi,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr):
    """Online softmax over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _kv_tile_scores(q, k_base, v_base, stride_kvs, stride_kvd, start_n, offs_m, offs_d,
                                  m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale,
                                  HEAD_DIM, BLOCK_N, CHECK_BOUNDS, CAUSAL, MASK_KIND, DOT_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p_ij = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p_ij, 1)
        acc = acc * alpha[:, None] + _dot(p_ij.to(v.dtype), v, DOT_MODE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, M, Q_IDX, KV_IDX, M_IDX,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kvb, stride_kvh, stride_kvs, stride_kvd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_programs_h, seq_q, seq_kv, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_programs_h
    p = pid % num_programs_h
    hq = tl.load(Q_IDX + p)
    hk = tl.load(KV_IDX + p)
    hm = tl.load(M_IDX + p)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + hq * stride_qh, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
    k_base = K + b * stride_kvb + hk * stride_kvh
    v_base = V + b * stride_kvb + hk * stride_kvh
    m_base = M + b * stride_mb + hm * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Key blocks past the last visible key of this query block are skipped; the blocks every row
        # sees whole run without the causal test, and only the diagonal band pays for it.
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + seq_kv - seq_q)
        full = _causal_full_kv_end(start_m, seq_kv - seq_q, hi, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                                     m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, 0, full,
                                     HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, DOT_MODE)
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                                     m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, full, hi,
                                     HEAD_DIM, BLOCK_N, CHECK_BOUNDS, True, MASK_KIND, DOT_MODE)
    else:
        acc, l_i, m_i = _fwd_kv_loop(acc, l_i, m_i, q, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                                     m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, 0, seq_kv,
                                     HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, DOT_MODE)

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
    stride_dob, stride_doh, stride_dos, stride_dod,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_STATS: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_heads
    h = pid % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_os, stride_od, seq_q,
                   HEAD_DIM).to(tl.float32)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dos, stride_dod, seq_q,
                    HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + pid * seq_q + offs_m, delta, mask=offs_m < seq_q)
    if HAS_STATS:  # head-gate gradient: sum over tokens of <O, dO>
        tl.atomic_add(STATS + pid, tl.sum(delta, 0))


@triton.jit
def _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd, stride_dos, stride_dod,
                 offs_n, offs_d, m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, lo, hi,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_q
        q = _load_tile(q_base, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
        do = _load_tile(do_base, offs_m, offs_d, stride_dos, stride_dod, seq_q, HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s = _dot(q, tl.trans(k), DOT_MODE) * qk_scale
        s = _masked_scores(s, offs_m, offs_n, m_base, stride_mq, stride_mk, seq_q, seq_kv, CHECK_BOUNDS, CAUSAL,
                           MASK_KIND)
        p = tl.exp2(s - lse[:, None])  # rows with nothing to attend have lse = +inf, so p = 0
        dv += _dot(tl.trans(p).to(do.dtype), do, DOT_MODE)
        dp = _dot(do, tl.trans(v), DOT_MODE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, DOT_MODE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, M, QH_PTR, QH_IDX, M_IDX,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kvb, stride_kvh, stride_kvs, stride_kvd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, num_kv_heads, seq_q, seq_kv, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    start_n = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_kv_heads
    r = pid % num_kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < seq_kv) & (offs_d[None, :] < HEAD_DIM)
    k = _load_tile(K + b * stride_kvb + r * stride_kvh, offs_n, offs_d, stride_kvs, stride_kvd, seq_kv, HEAD_DIM)
    v = _load_tile(V + b * stride_kvb + r * stride_kvh, offs_n, offs_d, stride_kvs, stride_kvd, seq_kv, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    causal_offset = seq_kv - seq_q
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
        m_base = M + b * stride_mb + tl.load(M_IDX + g) * stride_mh
        q_base = Q + b * stride_qb + g * stride_qh
        do_base = DO + b * stride_dob + g * stride_doh
        lse_base = LSE + (b * num_q_heads + g) * seq_q
        delta_base = DELTA + (b * num_q_heads + g) * seq_q
        if CAUSAL:
            dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd,
                                  stride_dos, stride_dod, offs_n, offs_d, m_base, stride_mq, stride_mk,
                                  seq_q, seq_kv, qk_scale, lo, full,
                                  HEAD_DIM, BLOCK_M, CHECK_BOUNDS, True, MASK_KIND, DOT_MODE)
        dk, dv = _dkdv_q_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_qd,
                              stride_dos, stride_dod, offs_n, offs_d, m_base, stride_mq, stride_mk,
                              seq_q, seq_kv, qk_scale, full, seq_q,
                              HEAD_DIM, BLOCK_M, CHECK_BOUNDS, False, MASK_KIND, DOT_MODE)
    dk = dk * sm_scale
    # DK and DV are fresh contiguous (B, R, Skv, D) buffers.
    base = (b * num_kv_heads + r) * seq_kv * HEAD_DIM
    ptrs = base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, lo, hi,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _kv_tile_scores(q, k_base, v_base, stride_kvs, stride_kvd, start_n, offs_m, offs_d,
                                  m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale,
                                  HEAD_DIM, BLOCK_N, CHECK_BOUNDS, CAUSAL, MASK_KIND, DOT_MODE)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_MODE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_MODE)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, M, KV_POS, M_IDX,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kvb, stride_kvh, stride_kvs, stride_kvd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_mb, stride_mh, stride_mq, stride_mk,
    num_q_heads, seq_q, seq_kv, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DOT_MODE: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // num_q_heads
    g = pid % num_q_heads
    r = tl.load(KV_POS + g)
    m_base = M + b * stride_mb + tl.load(M_IDX + g) * stride_mh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q = _load_tile(Q + b * stride_qb + g * stride_qh, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + g * stride_doh, offs_m, offs_d, stride_dos, stride_dod, seq_q, HEAD_DIM)
    lse = tl.load(LSE + pid * seq_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid * seq_q + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kvb + r * stride_kvh
    v_base = V + b * stride_kvb + r * stride_kvh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # same split of the key loop as the forward
        hi = tl.minimum(seq_kv, (start_m + 1) * BLOCK_M + seq_kv - seq_q)
        full = _causal_full_kv_end(start_m, seq_kv - seq_q, hi, BLOCK_M, BLOCK_N)
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                         m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, 0, full,
                         HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, DOT_MODE)
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                         m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, full, hi,
                         HEAD_DIM, BLOCK_N, CHECK_BOUNDS, True, MASK_KIND, DOT_MODE)
    else:
        dq = _dq_kv_loop(dq, q, do, lse, delta, k_base, v_base, stride_kvs, stride_kvd, offs_m, offs_d,
                         m_base, stride_mq, stride_mk, seq_q, seq_kv, qk_scale, 0, seq_kv,
                         HEAD_DIM, BLOCK_N, CHECK_BOUNDS, False, MASK_KIND, DOT_MODE)
    dq = dq * sm_scale
    # DQ is a fresh contiguous (B, G, Sq, D) buffer.
    ptrs = pid * seq_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
