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
    if p.heads.pruned.numel() > 0:
        out.index_fill_(1, p.heads.pruned, 0)
    return out


def run_forward(p: AttentionProblem, kernels):
    """The forward alone (no autograd bookkeeping); returns (output, log-sum-exp or None)."""
    out = _allocate_output(p)
    lse = None
    heads = p.heads
    if heads.active.numel() > 0:
        lse = kernels.forward(p.q, p.k, p.v, heads.active, heads.kv_head_index[heads.active], heads.active,
                              p.mask, p.causal, p.scale, out)
    return out, lse


class HeadSparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, problem: AttentionProblem, kernels, recorder: Optional[GateGradRecorder],
                stats_key: Hashable):
        out, lse = run_forward(problem, kernels)
        heads = problem.heads
        ctx.grad_count = heads.grad.numel() if any(ctx.needs_input_grad[:3]) else 0
        ctx.shapes = (q.shape, k.shape)
        ctx.problem_meta = (problem.causal, problem.scale)
        ctx.kernels, ctx.recorder, ctx.stats_key = kernels, recorder, stats_key
        if ctx.grad_count == 0:
            return out
        ctx.heads = heads
        lse_g = lse if heads.grad.numel() == heads.active.numel() else lse.index_select(1, heads.lse_pos)
        ctx.save_for_backward(
            _select_heads(q, heads.grad, heads.all_q), _select_heads(k, heads.kv_needed, heads.all_kv),
            _select_heads(v, heads.kv_needed, heads.all_kv), _select_heads(out, heads.grad, heads.all_q), lse_g,
            problem.mask,
        )
        return out

    @staticmethod
    def backward(ctx, dout):
        nones = (None,) * 5
        if ctx.grad_count == 0:
            return None, None, None, *nones
        q_s, k_s, v_s, o_s, lse_s, mask = ctx.saved_tensors
        heads = ctx.heads
        causal, scale = ctx.problem_meta
        q_shape, k_shape = ctx.shapes
        do_s = _select_heads(dout, heads.grad, heads.all_q)
        stats = None
        if ctx.recorder is not None:
            stats = torch.zeros((q_shape[0], heads.grad.numel()), dtype=torch.float32, device=dout.device)
        dq_s, dk_s, dv_s = ctx.kernels.backward(do_s, q_s, k_s, v_s, o_s, lse_s, heads.kv_pos, heads.grad, mask,
                                                causal, scale, stats)
        if stats is not None:
            full = torch.full((q_shape[0], q_shape[1]), float("nan"), dtype=torch.float32, device=dout.device)
            full[:, heads.grad] = stats
            ctx.recorder.add(ctx.stats_key, full)
        if heads.all_q:
            dq = dq_s
        else:
            dq = torch.zeros(q_shape, dtype=dq_s.dtype, device=dq_s.device).index_copy_(1, heads.grad, dq_s)
        if heads.all_kv:
            dk, dv = dk_s, dv_s
        else:
            dk = torch.zeros(k_shape, dtype=dk_s.dtype, device=dk_s.device).index_copy_(1, heads.kv_needed, dk_s)
            dv = torch.zeros(k_shape, dtype=dv_s.dtype, device=dv_s.device).index_copy_(1, heads.kv_needed, dv_s)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, *nones)
