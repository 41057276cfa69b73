"""The ``cuda`` backend: the compiled extension's CUDA kernels (``csrc/cuda``).

Same contract as :mod:`headsparse.ops.torch_backend`; see docs/extension.md.
float16 and bfloat16 run on tensor cores (WMMA, fp32 accumulation) when the head
dim is a multiple of 16 up to 128 on sm_80 or newer; float32 and other shapes use
the CUDA-core kernels. Compiled by nvcc and tested on CPU under the emulator in
tests/cuda_emu; not yet validated on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


def uses_tensor_cores(like: torch.Tensor, head_dim: int) -> Tuple[bool, bool]:
    """(forward, backward): whether calls on ``like``'s CUDA device, dtype and ``head_dim`` run the
    tensor-core kernels (fp16/bf16, head_dim a multiple of 16 up to 128, sm_80+, enough shared memory,
    ``HEADSPARSE_CUDA_TENSOR_CORES`` not 0) rather than the CUDA-core ones."""
    return tuple(extension.get().cuda_uses_tensor_cores(like, int(head_dim)))
