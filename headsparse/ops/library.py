"""``headsparse::attention`` as a ``torch.library`` custom op, so ``torch.compile`` can trace it.

The eager path (:mod:`headsparse.ops.autograd`) hands Python objects (the validated problem, the backend
module) to an autograd Function, which the compiler cannot trace. Here the plan crosses the op boundary as plain
ints and bools (one flag per query head), the backend is named by a string and resolved inside the op, and fake
kernels give the output shapes: ``torch.compile(fullgraph=True)`` sees one opaque op per attention call.
As in eager mode, only the grad heads (and the KV heads they read) are saved for the backward.

:func:`headsparse.attention` routes here while compiling (``torch.compiler.is_compiling()``); head masks must
then be None or Python sequences of bools (a tensor would have to be read on the host, which breaks the graph).
The gate-gradient recorder is not supported under compile.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from .autograd import compact_backward, run_forward
from .problem import head_index_lists, make_problem
from .registry import resolve


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=512)
def _saved_index_lists(grad_heads: Tuple[int, ...], pruned_heads: Tuple[int, ...], kv_head_index: Tuple[int, ...],
                       hkv: int):
    """(grad heads, KV heads they need, position of each grad head among the active ones) as Python index lists."""
    hq = len(grad_heads)
    kv_map = kv_head_index or tuple(h // (hq // hkv) for h in range(hq))
    lists = head_index_lists([bool(g) for g in grad_heads], [not p for p in pruned_heads], kv_map)
    return lists["grad_idx"], lists["kv_needed"], lists["lse_pos"]


def _problem(q, k, v, mask, grad_heads, pruned_heads, kv_head_index, causal, scale):
    as_mask = (lambda flags: torch.tensor([bool(f) for f in flags], dtype=torch.bool))  # noqa: E731
    kvi = torch.tensor(list(kv_head_index), dtype=torch.long) if kv_head_index else None
    return make_problem(q, k, v, as_mask(grad_heads), as_mask(pruned_heads), causal, mask, scale, kvi, "bhsd")


@torch.library.custom_op("headsparse::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 grad_heads: List[int], pruned_heads: List[int], kv_head_index: List[int], causal: bool, scale: float,
                 backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output (B, Hq, Sq, D), log-sum-exp (B, active heads, Sq)); ``grad_heads``/``pruned_heads`` are bool masks
    as one 0/1 flag per query head, ``kv_head_index`` the KV head of each query head (empty: the standard GQA
    grouping)."""
    p = _problem(q, k, v, mask, grad_heads, pruned_heads, kv_head_index, causal, scale)
    out, lse = run_forward(p, resolve("attention", backend, p))
    if lse is None:
        lse = q.new_empty((q.shape[0], 0, q.shape[2]), dtype=_lse_dtype(q.dtype))
    return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()  # the fake kernel promises contiguous


@attention_op.register_fake
def _attention_fake(q, k, v, mask, grad_heads, pruned_heads, kv_head_index, causal, scale, backend):
    n_active = len(pruned_heads) - sum(1 for f in pruned_heads if f)
    return q.new_empty(q.shape), q.new_empty((q.shape[0], n_active, q.shape[2]), dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("headsparse::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor,
                          o_s: torch.Tensor, lse_s: torch.Tensor, mask: Optional[torch.Tensor],
                          grad_heads: List[int], pruned_heads: List[int], kv_head_index: List[int], causal: bool,
                          scale: float, backend: str, hkv: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-size (dq, dk, dv) from the compact tensors saved by the forward."""
    b, hq, sq, d = dout.shape
    skv = k_s.shape[2]
    q_full = dout.new_empty((b, hq, sq, d))  # shape and device only: make_problem checks them
    kv_full = dout.new_empty((b, hkv, skv, d))
    p = _problem(q_full, kv_full, kv_full, mask, grad_heads, pruned_heads, kv_head_index, causal, scale)
    kernels = resolve("attention", backend, p)
    dq, dk, dv = compact_backward(kernels, p.heads, dout, q_s, k_s, v_s, o_s, lse_s, p.mask, causal, scale,
                                  (q_full.shape, kv_full.shape))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # the fake kernel promises contiguous


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q_s, k_s, v_s, o_s, lse_s, mask, grad_heads, pruned_heads, kv_head_index, causal,
                             scale, backend, hkv):
    b, hq, sq, d = dout.shape
    kv = (b, hkv, k_s.shape[2], d)
    return dout.new_empty(dout.shape), dout.new_empty(kv), dout.new_empty(kv)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, grad_heads, pruned_heads, kv_head_index, causal, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    hkv = int(k.shape[1])  # head counts are static (the plan fixes them); under dynamic shapes this specialises
    ctx.args = (list(grad_heads), list(pruned_heads), list(kv_head_index), causal, scale, backend, hkv)
    grad_idx, kv_needed, lse_pos = _saved_index_lists(tuple(grad_heads), tuple(pruned_heads), tuple(kv_head_index),
                                                      hkv)
    ctx.empty = not grad_idx

    def take(t, idx, n):
        return t if len(idx) == n else t.index_select(1, torch.tensor(idx, dtype=torch.long, device=t.device))

    hq, n_active = len(grad_heads), len(grad_heads) - sum(1 for f in pruned_heads if f)
    ctx.save_for_backward(take(q, grad_idx, hq), take(k, kv_needed, hkv), take(v, kv_needed, hkv),
                          take(out, grad_idx, hq), take(lse, lse_pos, n_active), mask)


def _backward(ctx, dout, _dlse):
    q_s, k_s, v_s, o_s, lse_s, mask = ctx.saved_tensors
    grad_heads, pruned_heads, kv_head_index, causal, scale, backend, hkv = ctx.args
    if ctx.empty:
        b, hq, sq, d = dout.shape
        z = dout.new_zeros((b, hkv, k_s.shape[2], d))
        return dout.new_zeros(dout.shape), z, z.clone(), None, None, None, None, None, None, None
    dq, dk, dv = attention_backward_op(dout.contiguous(), q_s, k_s, v_s, o_s, lse_s, mask, grad_heads, pruned_heads,
                                       kv_head_index, causal, scale, backend, hkv)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(q, k, v, grad_heads: Optional[Sequence[bool]], pruned_heads: Optional[Sequence[bool]],
                       causal: bool, attention_mask, scale: Optional[float], backend: str,
                       kv_head_index: Optional[Sequence[int]], out_layout: str) -> torch.Tensor:
    """:func:`headsparse.attention` through the custom op (what runs while ``torch.compile`` traces)."""
    hq = q.shape[1]

    def flags(arg, name, default):
        if arg is None:
            return [int(default)] * hq
        if isinstance(arg, torch.Tensor):
            arg = arg.tolist()  # a host read: under fullgraph=True pass a Python list instead
        if len(arg) != hq:
            raise ValueError(f"{name} needs one entry per query head ({hq}), got {len(arg)}")
        return [int(bool(x)) for x in arg]

    kv = [] if kv_head_index is None else [int(x) for x in (kv_head_index.tolist() if isinstance(
        kv_head_index, torch.Tensor) else kv_head_index)]
    s = float(scale) if scale is not None else q.shape[-1] ** -0.5
    out, _ = attention_op(q, k, v, attention_mask, flags(grad_heads, "grad_heads", True),
                          flags(pruned_heads, "pruned_heads", False), kv, bool(causal), s, backend)
    if out_layout == "bshd":
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return out
