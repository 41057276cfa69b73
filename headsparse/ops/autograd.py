"""The autograd function shared by every backend.

Forward: the backend computes the unpruned heads only and writes them into a
zero-headed output. Then only the heads in ``grad_heads`` (and the KV heads
they read) are gathered and saved, so the graph keeps nothing of the other
heads alive. Backward: the backend works on those compact tensors, so its grid
never visits a head without a gradient; the result is scattered back.
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch

from .problem import AttentionProblem
from .stats import GateGradRecorder


def _select_heads(t: torch.Tensor, idx: torch.Tensor, full: bool) -> torch.Tensor:
    # Keep the caller's tensor when every head is selected: saving it costs nothing extra.
    return t if full else t.index_select(1, idx)


def _allocate_output(p: AttentionProblem) -> torch.Tensor:
    b, hq, sq, d = p.q.shape
    if p.out_layout == "bshd":
        out = torch.empty((b, sq, hq, d), dtype=p.q.dtype, device=p.q.device).transpose(1, 2)
    else:
        out = torch.empty((b, hq, sq, d), dtype=p.q.dtype, device=p.q.device)
    if p.active_heads.numel() < hq:
        pruned = torch.ones(hq, dtype=torch.bool, device=p.q.device)
        pruned[p.active_heads] = False
        out.index_fill_(1, pruned.nonzero().flatten(), 0)
    return out


def run_forward(p: AttentionProblem, kernels):
    """The forward alone (no autograd bookkeeping); returns (output, log-sum-exp or None)."""
    out = _allocate_output(p)
    lse = None
    if p.active_heads.numel() > 0:
        lse = kernels.forward(p.q, p.k, p.v, p.active_heads, p.kv_head_index[p.active_heads], p.active_heads,
                              p.mask, p.causal, p.scale, out)
    return out, lse


class HeadSparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, problem: AttentionProblem, kernels, recorder: Optional[GateGradRecorder],
                stats_key: Hashable):
        p = problem
        out, lse = run_forward(p, kernels)
        active = p.active_heads
        mask_arg = p.mask
        grad_idx = p.grad_heads
        ctx.grad_count = grad_idx.numel() if any(ctx.needs_input_grad[:3]) else 0
        ctx.shapes = (q.shape, k.shape)
        ctx.problem_meta = (p.causal, p.scale)
        ctx.kernels, ctx.recorder, ctx.stats_key = kernels, recorder, stats_key
        if ctx.grad_count == 0:
            return out
        hq, hkv = q.shape[1], k.shape[1]
        kv_of_grad = p.kv_head_index[grad_idx]
        kv_needed = torch.unique(kv_of_grad)  # sorted
        kv_pos = torch.searchsorted(kv_needed, kv_of_grad)
        all_q = grad_idx.numel() == hq
        all_kv = kv_needed.numel() == hkv
        # lse rows of the grad heads: their positions in the list of active heads.
        lse_g = lse if grad_idx.numel() == active.numel() else lse.index_select(1, torch.searchsorted(active, grad_idx))
        ctx.save_for_backward(
            _select_heads(q, grad_idx, all_q), _select_heads(k, kv_needed, all_kv), _select_heads(v, kv_needed, all_kv),
            _select_heads(out, grad_idx, all_q), lse_g, mask_arg, grad_idx, kv_needed, kv_pos,
        )
        ctx.full = (all_q, all_kv)
        return out

    @staticmethod
    def backward(ctx, dout):
        nones = (None,) * 5
        if ctx.grad_count == 0:
            return None, None, None, *nones
        q_s, k_s, v_s, o_s, lse_s, mask, grad_idx, kv_needed, kv_pos = ctx.saved_tensors
        all_q, all_kv = ctx.full
        causal, scale = ctx.problem_meta
        q_shape, k_shape = ctx.shapes
        do_s = _select_heads(dout, grad_idx, all_q)
        stats = None
        if ctx.recorder is not None:
            stats = torch.zeros((q_shape[0], grad_idx.numel()), dtype=torch.float32, device=dout.device)
        dq_s, dk_s, dv_s = ctx.kernels.backward(do_s, q_s, k_s, v_s, o_s, lse_s, kv_pos, grad_idx, mask, causal,
                                                scale, stats)
        if stats is not None:
            full = torch.full((q_shape[0], q_shape[1]), float("nan"), dtype=torch.float32, device=dout.device)
            full[:, grad_idx] = stats
            ctx.recorder.add(ctx.stats_key, full)
        if all_q:
            dq = dq_s
        else:
            dq = torch.zeros(q_shape, dtype=dq_s.dtype, device=dq_s.device).index_copy_(1, grad_idx, dq_s)
        if all_kv:
            dk, dv = dk_s, dv_s
        else:
            dk = torch.zeros(k_shape, dtype=dk_s.dtype, device=dk_s.device).index_copy_(1, kv_needed, dk_s)
            dv = torch.zeros(k_shape, dtype=dv_s.dtype, device=dv_s.device).index_copy_(1, kv_needed, dv_s)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, *nones)
