"""The ``triton`` backend: launchers for the kernels in ``triton_kernels``.

Same contract as ``headsparse.ops.torch_backend`` (read that module first);
the log-sum-exp it returns is in base 2 and meant only for this backend's
backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from . import triton_kernels as K
from .registry import triton_interpreted


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Small blocks under the CPU interpreter keep several blocks per test shape
# (exercising the online softmax and the causal skips); every block stays >= 16
# so that what passes on CPU also compiles for a GPU.
INTERPRETER_CONFIG = {"fwd": LaunchConfig(32, 32), "dkdv": LaunchConfig(32, 32), "dq": LaunchConfig(32, 32)}


def _gpu_config(kind: str, head_dim: int) -> LaunchConfig:
    # Starting points from FlashAttention-2-style kernels on sm_80/sm_90; tuned per GPU later.
    big = head_dim > 64
    if kind == "fwd":
        return LaunchConfig(128, 64, 8 if big else 4, 3)
    if kind == "dkdv":
        return LaunchConfig(32, 64 if big else 128, 8 if big else 4, 3)
    return LaunchConfig(64 if big else 128, 32, 8 if big else 4, 3)


def launch_config(kind: str, head_dim: int) -> LaunchConfig:
    return INTERPRETER_CONFIG[kind] if triton_interpreted() else _gpu_config(kind, head_dim)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _ragged(sq: int, skv: int, cfg: LaunchConfig) -> bool:
    """Whether some tile reaches past the sequence ends (then the kernels test bounds per score)."""
    return sq % cfg.block_m != 0 or skv % cfg.block_n != 0


def _flags(q: torch.Tensor) -> dict:
    return dict(
        UPCAST=triton_interpreted() and q.dtype == torch.bfloat16,
        IEEE=q.dtype == torch.float32,
    )


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...], int]:
    if mask is None:
        return dummy, (0, 0, 0, 0), K.MASK_NONE
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), K.MASK_BOOL
    return mask, mask.stride(), K.MASK_ADD


def forward(q, k, v, heads, kv_heads, mask_heads, mask, causal, scale, out) -> torch.Tensor:
    b, _, sq, d = q.shape
    skv = k.shape[2]
    n_prog_h = heads.numel()
    lse = torch.empty((b, n_prog_h, sq), dtype=torch.float32, device=q.device)
    m, m_strides, mask_kind = _mask_args(mask, q)
    cfg = launch_config("fwd", d)
    grid = (triton.cdiv(sq, cfg.block_m), b * n_prog_h)
    K._attn_fwd[grid](
        q, k, v, out, lse, m, heads, kv_heads, mask_heads,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *m_strides,
        n_prog_h, sq, skv, skv - sq, scale * K.LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CHECK_BOUNDS=_ragged(sq, skv, cfg), CAUSAL=causal, MASK_KIND=mask_kind, **_flags(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return lse


def backward(do, q, k, v, o, lse, kv_heads, mask_heads, mask, causal, scale, stats):
    b, g, sq, d = q.shape
    r, skv = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    delta = torch.empty((b, g, sq), dtype=torch.float32, device=q.device)
    pre = launch_config("fwd", d)
    K._attn_bwd_preprocess[(triton.cdiv(sq, pre.block_m), b * g)](
        o, do, delta, stats if stats is not None else delta,
        *o.stride(), *do.stride(), g, sq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre.block_m, HAS_STATS=stats is not None,
    )
    m, m_strides, mask_kind = _mask_args(mask, q)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, MASK_KIND=mask_kind, **_flags(q))

    # Query heads of each KV head, as a CSR list, so that dK/dV need no atomics.
    # (index_add_ rather than bincount, which would synchronise with the device to size its output)
    counts = torch.zeros(r, dtype=torch.int64, device=q.device).index_add_(0, kv_heads, torch.ones_like(kv_heads))
    qh_ptr = torch.zeros(r + 1, dtype=torch.int64, device=q.device)
    qh_ptr[1:] = torch.cumsum(counts, 0)
    qh_idx = torch.argsort(kv_heads, stable=True)
    dk = torch.empty((b, r, skv, d), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    cfg = launch_config("dkdv", d)
    K._attn_bwd_dkdv[(triton.cdiv(skv, cfg.block_n), b * r)](
        q, k, v, do, dk, dv, lse, delta, m, qh_ptr, qh_idx, mask_heads,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *m_strides,
        g, r, sq, skv, skv - sq, scale * K.LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHECK_BOUNDS=_ragged(sq, skv, cfg), **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dq = torch.empty((b, g, sq, d), dtype=q.dtype, device=q.device)
    cfg = launch_config("dq", d)
    K._attn_bwd_dq[(triton.cdiv(sq, cfg.block_m), b * g)](
        q, k, v, do, dq, lse, delta, m, kv_heads, mask_heads,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *m_strides,
        g, sq, skv, skv - sq, scale * K.LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHECK_BOUNDS=_ragged(sq, skv, cfg), **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv
