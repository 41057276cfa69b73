"""The ``torch`` backend: head-sparse attention in plain PyTorch, any device.

It follows the same contract as the compiled and Triton kernels (see
``headsparse.ops.kernel_api``): the forward runs only the listed query heads;
the backward receives compact tensors that hold only the heads that need a
gradient, recomputes the probabilities from the saved log-sum-exp, and returns
compact gradients. Arithmetic is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch

# Bound on one chunk's score matrix, so that long sequences do not allocate
# B * H * Sq * Skv floats at once.
_MAX_SCORE_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_scores(q, k, mask, causal: bool, scale: float):
    """Scaled scores q k^T with the padding and causal masks applied (-inf = masked)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(s.dtype)
    if causal:
        sq, skv = s.shape[-2], s.shape[-1]
        rows = torch.arange(sq, device=s.device)[:, None]
        cols = torch.arange(skv, device=s.device)[None, :]
        s = s.masked_fill(cols > rows + (skv - sq), float("-inf"))
    return s


def _chunks(num_heads: int, batch: int, sq: int, skv: int):
    per_head = max(1, batch * sq * skv)
    step = max(1, _MAX_SCORE_ELEMENTS // per_head)
    for start in range(0, num_heads, step):
        yield start, min(num_heads, start + step)


def forward(q, k, v, heads, kv_heads, mask_heads, mask, causal, scale, out) -> torch.Tensor:
    """Attention for query heads ``heads`` (program p reads KV head ``kv_heads[p]``).

    Writes ``out[:, heads[p]]`` and returns the log-sum-exp, shape (B, P, Sq),
    float32/64; rows with nothing to attend get output 0 and lse = +inf.
    """
    cdt = _compute_dtype(q.dtype)
    b, _, sq, _ = q.shape
    skv = k.shape[2]
    lse = torch.empty((b, heads.numel(), sq), dtype=cdt, device=q.device)
    for lo, hi in _chunks(heads.numel(), b, sq, skv):
        h = heads[lo:hi]
        qa = q.index_select(1, h).to(cdt)
        ka = k.index_select(1, kv_heads[lo:hi]).to(cdt)
        va = v.index_select(1, kv_heads[lo:hi]).to(cdt)
        m_sel = None if mask is None else mask.index_select(1, mask_heads[lo:hi])
        s = _masked_scores(qa, ka, m_sel, causal, scale)
        if skv == 0:  # nothing to attend anywhere: amax over an empty dimension is undefined
            s = s.new_full(s.shape[:-1] + (1,), float("-inf"))
            va = va.new_zeros(va.shape[:-2] + (1, va.shape[-1]))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        p = torch.exp(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        empty = denom == 0
        o = torch.matmul(p, va) / torch.where(empty, torch.ones_like(denom), denom)
        lse[:, lo:hi] = torch.where(empty, torch.full_like(denom, float("inf")), row_max + torch.log(denom)).squeeze(-1)
        out.index_copy_(1, h, o.to(out.dtype))
    return lse


def backward(do, q, k, v, o, lse, kv_heads, mask_heads, mask, causal, scale, stats: Optional[torch.Tensor]):
    """Compact backward: q, o, do (B, G, Sq, D); k, v (B, R, Skv, D); lse (B, G, Sq).

    ``kv_heads[g]`` is the position in k/v of head g's KV head and ``mask_heads[g]``
    its index into the mask's head dimension. Returns dq (B, G, Sq, D) and
    dk, dv (B, R, Skv, D) in the input dtype. If ``stats`` (B, G) is given, the
    per-(batch, head) sum over tokens of <o, do> is added to it.
    """
    cdt = _compute_dtype(q.dtype)
    b, g, sq, d = q.shape
    r, skv = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.zeros((b, r, skv, d), dtype=cdt, device=q.device)
    dv = torch.zeros_like(dk)
    for lo, hi in _chunks(g, b, sq, skv):
        idx = kv_heads[lo:hi]
        qg, dog, og = (t[:, lo:hi].to(cdt) for t in (q, do, o))
        kg = k.index_select(1, idx).to(cdt)
        vg = v.index_select(1, idx).to(cdt)
        m_sel = None if mask is None else mask.index_select(1, mask_heads[lo:hi])
        s = _masked_scores(qg, kg, m_sel, causal, scale)
        p = torch.exp(s - lse[:, lo:hi, :, None].to(cdt))
        delta = (og * dog).sum(dim=-1)  # (B, G, Sq): FlashAttention's preprocessing
        if stats is not None:
            stats[:, lo:hi] += delta.sum(dim=-1).to(stats.dtype)
        dv.index_add_(1, idx, torch.matmul(p.transpose(-1, -2), dog))
        ds = p * (torch.matmul(dog, vg.transpose(-1, -2)) - delta[..., None])
        dq[:, lo:hi] = (torch.matmul(ds, kg) * scale).to(q.dtype)
        dk.index_add_(1, idx, torch.matmul(ds.transpose(-1, -2), qg) * scale)
    return dq, dk.to(q.dtype), dv.to(q.dtype)
