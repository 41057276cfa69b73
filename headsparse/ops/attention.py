"""``headsparse.attention``: the public head-sparse attention op."""
from __future__ import annotations

from typing import Hashable, Optional

import torch

from .autograd import HeadSparseAttentionFn, run_forward
from .library import compiled_attention
from .problem import make_problem
from .registry import resolve
from .gate_grads import current_recorder


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_heads: Optional[torch.Tensor] = None,
    pruned_heads: Optional[torch.Tensor] = None,
    causal: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
    *,
    kv_head_index: Optional[torch.Tensor] = None,
    out_layout: str = "bhsd",
    stats_key: Optional[Hashable] = None,
) -> torch.Tensor:
    """Scaled dot-product attention with a per-head plan.

    Args:
        q: queries, (B, Hq, Sq, D).
        k, v: keys and values, (B, Hkv, Skv, D). Hq must be a multiple of Hkv
            unless ``kv_head_index`` is given.
        grad_heads: bool (Hq,); heads whose q/k/v receive gradients. None = all.
            Other heads get zero gradients, are not visited by the backward and
            keep nothing alive in the autograd graph. A KV head gets a k/v
            gradient only if some query head reading it is in ``grad_heads``.
        pruned_heads: bool (Hq,); heads that are not computed at all: output
            exactly 0, zero gradients, inputs never read (NaN there is harmless).
            A head that is both pruned and in ``grad_heads`` is pruned.
        causal: causal masking, aligned bottom-right when Sq != Skv (query i
            sees keys j <= i + Skv - Sq, as when decoding with a KV cache).
        attention_mask: None, a bool mask broadcastable to (B, Hq, Sq, Skv)
            (True = attend), or an additive float mask of that shape. Rows with
            nothing to attend produce 0 (never NaN) and finite gradients.
        scale: softmax scale; default 1/sqrt(D).
        backend: "auto", "torch", "triton", or a compiled backend listed by
            :func:`headsparse.backends`. A named backend that cannot run the
            call raises ``BackendUnavailableError`` saying why.
        kv_head_index: int (Hq,); KV head read by each query head, for ragged
            groups (for example after pruning query heads inside a GQA group).
        out_layout: "bhsd" returns (B, Hq, Sq, D); "bshd" returns a (B, Hq, Sq, D)
            view of a contiguous (B, Sq, Hq, D) buffer, so ``out.transpose(1, 2)``
            is what a Hugging Face attention module returns, without a copy.
        stats_key: label for the gate-gradient statistics recorded inside
            :func:`headsparse.record_gate_grads` (for example the layer index).

    Returns:
        The attention output in the dtype of q (softmax statistics are float32).
    """
    if torch.compiler.is_compiling():
        # torch.compile traces the torch.library op instead (plain ints/bools cross its boundary)
        if current_recorder() is not None:
            raise RuntimeError("headsparse.record_gate_grads is not supported inside torch.compile")
        return compiled_attention(q, k, v, grad_heads, pruned_heads, causal, attention_mask, scale, backend,
                                  kv_head_index, out_layout)
    problem = make_problem(q, k, v, grad_heads, pruned_heads, causal, attention_mask, scale, kv_head_index, out_layout)
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    kernels = resolve("attention", backend, problem)
    transformed = any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (q, k, v))
    if not transformed and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Inference or below the gradient horizon: no graph, so nothing to gather or save.
        return run_forward(problem, kernels)[0]
    recorder = current_recorder() if torch.is_grad_enabled() else None
    if recorder is not None:
        stats_key = recorder._next_key(stats_key)
    return HeadSparseAttentionFn.apply(q, k, v, problem.mask, problem, kernels, recorder, stats_key)[0]
