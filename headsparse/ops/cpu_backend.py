"""The ``cpu`` backend: the compiled extension's C++ kernels (``csrc/cpu``).

Same contract as :mod:`headsparse.ops.torch_backend`; see docs/extension.md.
Arithmetic is float32 (float64 for float64 inputs), parallel over
(batch, head, row block) in the forward and (batch, KV head) in the backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import extension


def _idx(t: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=torch.int64).contiguous()


def forward(q, k, v, heads, kv_heads, mask_heads, mask, causal, scale, out) -> torch.Tensor:
    """Attention for query heads ``heads``; writes ``out[:, heads]``, returns lse (B, P, Sq)."""
    return extension.get().attn_forward(q, k, v, _idx(heads), _idx(kv_heads), _idx(mask_heads), mask, bool(causal),
                                        float(scale), out)


def backward(do, q, k, v, o, lse, kv_heads, mask_heads, mask, causal, scale, stats: Optional[torch.Tensor]):
    """Compact backward; returns (dq, dk, dv); adds sum_t <o, do> per (b, head) to ``stats`` if given."""
    dq, dk, dv = extension.get().attn_backward(do, q, k, v, o, lse, _idx(kv_heads), _idx(mask_heads), mask,
                                               bool(causal), float(scale), stats)
    return dq, dk, dv
