"""The specification of ``headsparse.attention`` as naive, differentiable PyTorch.

Used by the tests (in float64) and as documentation: every backend must agree
with this function, outputs and gradients. It materialises the full attention
matrix and is not meant to be fast.
"""
from __future__ import annotations

from typing import Optional

import torch

from .problem import make_problem


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_heads: Optional[torch.Tensor] = None,
    pruned_heads: Optional[torch.Tensor] = None,
    causal: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    kv_head_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference attention output (B, Hq, Sq, D); gradients flow only through ``grad_heads``."""
    p = make_problem(q, k, v, grad_heads, pruned_heads, causal, attention_mask, scale, kv_head_index)
    hq = q.shape[1]
    grad = torch.zeros(hq, dtype=torch.bool, device=q.device)
    grad[p.heads.grad_idx] = True
    active = p.heads.active_idx
    # Heads outside grad_heads see detached inputs: they contribute no gradient.
    g = grad[active][None, :, None, None]
    qa = torch.where(g, q[:, active], q[:, active].detach())
    kv = p.heads.kv_head_index[active]
    ka = torch.where(g, k[:, kv], k[:, kv].detach())
    va = torch.where(g, v[:, kv], v[:, kv].detach())
    s = torch.matmul(qa, ka.transpose(-1, -2)) * p.scale
    if p.mask is not None:
        m = p.mask[:, active]
        if m.dtype == torch.bool:
            s = s.masked_fill(~m, float("-inf"))
        else:  # an additive -inf masks the key even where the score is NaN (NaN + -inf would be NaN)
            s = (s + m.to(s.dtype)).masked_fill(torch.isneginf(m), float("-inf"))
    if causal:
        sq, skv = s.shape[-2:]
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(skv, device=q.device)[None, :]
        s = s.masked_fill(cols > rows + (skv - sq), float("-inf"))
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    # A row with nothing to attend is 0 even when v holds NaN/inf (0 * NaN would otherwise leak into it).
    o_active = torch.matmul(probs, va).masked_fill(empty, 0.0)
    out = q.new_zeros(q.shape)
    return out.index_copy(1, active, o_active)
