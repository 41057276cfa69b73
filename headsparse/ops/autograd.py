"""The autograd function shared by every backend.

Forward: the backend computes the unpruned heads only and writes them into a
zero-headed output. Then only the heads in ``grad_heads`` (and the KV heads
they read) are gathered and saved, so the graph keeps nothing of the other
heads alive. Backward: the backend works on those compact tensors, so its grid
never visits a head without a gradient; the result is scattered back.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Optional

import torch

from .problem import AttentionProblem
from .gate_grads import GateGradRecorder


def _batched(t: torch.Tensor) -> bool:
    f = torch._C._functorch
    legacy = getattr(f, "is_legacy_batchedtensor", lambda _: False)  # is_grads_batched's vmap
    return f.is_batchedtensor(t) or f.is_functorch_wrapped_tensor(t) or legacy(t)


def _select_heads(t: torch.Tensor, idx: torch.Tensor, full: bool) -> torch.Tensor:
    # Keep the caller's tensor when every head is selected: saving it costs nothing extra.
    return t if full else t.index_select(1, idx)


def _allocate_output(p: AttentionProblem) -> torch.Tensor:
    b, hq, sq, d = p.q.shape
    if p.out_layout == "bshd":
        out = torch.empty((b, sq, hq, d), dtype=p.q.dtype, device=p.q.device).transpose(1, 2)
    else:
        out = torch.empty((b, hq, sq, d), dtype=p.q.dtype, device=p.q.device)
    if p.heads.pruned_idx.numel() > 0:
        out.index_fill_(1, p.heads.pruned_idx, 0)
    return out


def run_forward(p: AttentionProblem, kernels):
    """The forward alone (no autograd bookkeeping); returns (output, log-sum-exp or None)."""
    out = _allocate_output(p)
    lse = None
    heads = p.heads
    if heads.active_idx.numel() > 0:  # each active head reads its KV head and its own row of the mask
        lse = kernels.forward(p.q, p.k, p.v, heads.active_idx, heads.kv_head_index[heads.active_idx],
                              heads.active_idx, p.mask, p.causal, p.scale, out)
    return out, lse


class HeadSparseAttentionFn(torch.autograd.Function):
    """Forward and setup_context kept apart (as torch.func transforms require); the forward also returns the
    log-sum-exp, which is not differentiable. The backward is written out of place, so batched gradients
    (``is_grads_batched``, ``gradcheck(check_batched_grad=True)``, ``torch.func.jacrev``) go through it."""

    @staticmethod
    def forward(q, k, v, mask, problem: AttentionProblem, kernels, recorder: Optional[GateGradRecorder],
                stats_key: Hashable):
        out, lse = run_forward(problem, kernels)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _mask, problem, kernels, recorder, stats_key = inputs
        out, lse = output
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        heads = problem.heads
        ctx.grad_count = heads.grad_idx.numel() if any(t.requires_grad for t in (q, k, v)) else 0
        ctx.shapes = (q.shape, k.shape)
        ctx.problem_meta = (problem.causal, problem.scale)
        ctx.kernels, ctx.recorder, ctx.stats_key = kernels, recorder, stats_key
        if ctx.grad_count == 0:
            return
        ctx.heads = heads
        lse_g = lse if heads.grad_idx.numel() == heads.active_idx.numel() else lse.index_select(1, heads.lse_pos)
        ctx.save_for_backward(
            _select_heads(q, heads.grad_idx, heads.all_q), _select_heads(k, heads.kv_needed, heads.all_kv),
            _select_heads(v, heads.kv_needed, heads.all_kv), _select_heads(out, heads.grad_idx, heads.all_q), lse_g,
            problem.mask,
        )

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, problem: AttentionProblem, kernels, recorder, stats_key):
        """torch.func.vmap over the op: one call per batch entry (the kernels write into fresh buffers)."""
        def entry(t, dim, i):
            return t if (t is None or dim is None) else t.select(dim, i)

        outs, lses = [], []
        for i in range(info.batch_size):
            qi, ki, vi, mi = (entry(t, d, i) for t, d in zip((q, k, v, mask), in_dims[:4]))
            sub = dataclasses.replace(problem, q=qi, k=ki, v=vi, mask=mi)
            out, lse = HeadSparseAttentionFn.apply(qi, ki, vi, mi, sub, kernels, recorder, stats_key)
            outs.append(out)
            lses.append(lse)
        lse = None if lses[0] is None else torch.stack(lses)
        return (torch.stack(outs), lse), (0, None if lse is None else 0)

    @staticmethod
    def backward(ctx, dout, _dlse=None):
        nones = (None,) * 5
        if ctx.grad_count == 0:
            return None, None, None, *nones
        if _batched(dout) and not ctx.kernels.batched_grads:
            raise NotImplementedError(
                f"batched gradients (is_grads_batched, gradcheck(check_batched_grad=True), torch.func transforms) "
                f"go through the 'torch' backend only; this call ran {ctx.kernels.name!r}, "
                f"whose kernels read raw memory: pass backend='torch'")
        q_s, k_s, v_s, o_s, lse_s, mask = ctx.saved_tensors
        causal, scale = ctx.problem_meta
        dq, dk, dv = compact_backward(ctx.kernels, ctx.heads, dout, q_s, k_s, v_s, o_s, lse_s, mask, causal, scale,
                                      ctx.shapes, ctx.recorder, ctx.stats_key)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, *nones)


def compact_backward(kernels, heads, dout, q_s, k_s, v_s, o_s, lse_s, mask, causal, scale, shapes,
                     recorder=None, stats_key=None):
    """The backward on the compact (grad-head) tensors, scattered back to full-size dq, dk, dv."""
    q_shape, k_shape = shapes
    do_s = _select_heads(dout, heads.grad_idx, heads.all_q)
    stats = None
    if recorder is not None:
        stats = torch.zeros((q_shape[0], heads.grad_idx.numel()), dtype=torch.float32, device=dout.device)
    dq_s, dk_s, dv_s = kernels.backward(do_s, q_s, k_s, v_s, o_s, lse_s, heads.kv_pos, heads.grad_idx, mask,
                                        causal, scale, stats)
    if stats is not None:
        full = torch.full((q_shape[0], q_shape[1]), float("nan"), dtype=torch.float32, device=dout.device)
        full[:, heads.grad_idx] = stats
        recorder.add(stats_key, full)
    # scatter back out of place (a batched dq_s cannot be copied into a fresh unbatched buffer)
    if heads.all_q:
        dq = dq_s
    else:
        dq = torch.zeros(q_shape, dtype=dq_s.dtype, device=dq_s.device).index_copy(1, heads.grad_idx, dq_s)
    if heads.all_kv:
        dk, dv = dk_s, dv_s
    else:
        dk = torch.zeros(k_shape, dtype=dk_s.dtype, device=dk_s.device).index_copy(1, heads.kv_needed, dk_s)
        dv = torch.zeros(k_shape, dtype=dv_s.dtype, device=dv_s.device).index_copy(1, heads.kv_needed, dv_s)
    return dq, dk, dv
