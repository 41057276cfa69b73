"""The ``triton`` backend: its rules and the launchers of the kernels in ``triton_kernels``.

:data:`BACKEND` follows the kernel contract of :mod:`headsparse.ops.backend`; the log-sum-exp it returns is in
base 2 and meant only for its own backward. Triton itself is imported on first use (the status probe or a launch),
never by ``import headsparse``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .backend import Backend
from .problem import AttentionProblem


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> Tuple[int, ...]:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    parts = [re.match(r"\d*", piece).group() for piece in version.split(".")[:2]]
    return tuple(int(p) if p else 0 for p in parts)


def _interpreter_incompatibility(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why this Triton's CPU interpreter cannot run our kernels with this NumPy, or None.

    Triton < 3.7's interpreter converts loop bounds with ``int(array)`` on
    1-element arrays, which NumPy >= 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"); Triton 3.7 squeezes them first.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter fails with numpy {numpy_version} (int() of 1-element arrays, "
                f"an error since numpy 2.4): install numpy<2.4 or triton>=3.7 to run it on the CPU")
    return None


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
    return max(16, 1 << max(0, head_dim - 1).bit_length())  # the next power of two, at least 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernels():
    from . import triton_kernels  # imports triton; cached in sys.modules after the first launch

    return triton_kernels


def _ragged(sq: int, skv: int, cfg: LaunchConfig) -> bool:
    """Whether some tile reaches past the sequence ends (then the kernels test bounds per score)."""
    return sq % cfg.block_m != 0 or skv % cfg.block_n != 0


def _dot_mode(dtype: torch.dtype) -> int:
    K = _kernels()
    if triton_interpreted() and dtype == torch.bfloat16:
        return K.DOT_UPCAST
    return K.DOT_IEEE if dtype == torch.float32 else K.DOT_NATIVE


def _same_layout(k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """k and v with one set of strides (the kernels read both with one): as given when they already share it."""
    if k.stride() == v.stride():
        return k, v
    return k.contiguous(), v.contiguous()


def _mask_args(mask: Optional[torch.Tensor], dummy: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...], int]:
    K = _kernels()
    if mask is None:
        return dummy, (0, 0, 0, 0), K.MASK_NONE
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), K.MASK_BOOL
    return mask, mask.stride(), K.MASK_ADD


def _forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
    K = _kernels()
    k, v = _same_layout(k, v)
    b, _, sq, d = q.shape
    skv = k.shape[2]
    n_prog_h = q_idx.numel()
    lse = torch.empty((b, n_prog_h, sq), dtype=torch.float32, device=q.device)
    m, m_strides, mask_kind = _mask_args(mask, q)
    cfg = launch_config("fwd", d)
    grid = (_cdiv(sq, cfg.block_m), b * n_prog_h)
    K._attn_fwd[grid](
        q, k, v, out, lse, m, q_idx, kv_idx, mask_idx,
        *q.stride(), *k.stride(), *out.stride(), *m_strides,
        n_prog_h, sq, skv, scale * K.LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CHECK_BOUNDS=_ragged(sq, skv, cfg), CAUSAL=causal, MASK_KIND=mask_kind, DOT_MODE=_dot_mode(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return lse


def _backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats):
    K = _kernels()
    k, v = _same_layout(k, v)
    b, g, sq, d = q.shape
    r, skv = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    delta = torch.empty((b, g, sq), dtype=torch.float32, device=q.device)
    pre = launch_config("fwd", d)
    K._attn_bwd_preprocess[(_cdiv(sq, pre.block_m), b * g)](
        o, do, delta, stats if stats is not None else delta,
        *o.stride(), *do.stride(), g, sq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre.block_m, HAS_STATS=stats is not None,
    )
    m, m_strides, mask_kind = _mask_args(mask, q)
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, MASK_KIND=mask_kind, DOT_MODE=_dot_mode(q.dtype))

    # Query heads of each KV head, as a CSR list, so that dK/dV need no atomics.
    # (index_add_ rather than bincount, which would synchronise with the device to size its output)
    counts = torch.zeros(r, dtype=torch.int64, device=q.device).index_add_(0, kv_pos, torch.ones_like(kv_pos))
    qh_ptr = torch.zeros(r + 1, dtype=torch.int64, device=q.device)
    qh_ptr[1:] = torch.cumsum(counts, 0)
    qh_idx = torch.argsort(kv_pos, stable=True)
    dk = torch.empty((b, r, skv, d), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    cfg = launch_config("dkdv", d)
    K._attn_bwd_dkdv[(_cdiv(skv, cfg.block_n), b * r)](
        q, k, v, do, dk, dv, lse, delta, m, qh_ptr, qh_idx, mask_idx,
        *q.stride(), *k.stride(), *do.stride(), *m_strides,
        g, r, sq, skv, scale * K.LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHECK_BOUNDS=_ragged(sq, skv, cfg), **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dq = torch.empty((b, g, sq, d), dtype=q.dtype, device=q.device)
    cfg = launch_config("dq", d)
    K._attn_bwd_dq[(_cdiv(sq, cfg.block_m), b * g)](
        q, k, v, do, dq, lse, delta, m, kv_pos, mask_idx,
        *q.stride(), *k.stride(), *do.stride(), *m_strides,
        g, sq, skv, scale * K.LOG2E, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CHECK_BOUNDS=_ragged(sq, skv, cfg), **common,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv


class TritonBackend(Backend):
    name = "triton"

    def devices(self) -> Tuple[str, ...]:
        return ("cpu",) if triton_interpreted() and not torch.cuda.is_available() else ("cuda",)

    def probe(self) -> Tuple[bool, str]:
        try:
            import triton
        except Exception as exc:  # ImportError or a broken install
            return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability()
            if major < 8:
                return False, f"needs a GPU with compute capability >= 8.0, found {major}.x"
            return True, (f"triton {triton.__version__} on {torch.cuda.get_device_name()}; runs when named, but auto "
                          "picks it on CUDA only with HEADSPARSE_ENABLE_UNVALIDATED_TRITON=1 until a committed GPU "
                          "run validates these kernels")
        if triton_interpreted():
            import numpy

            broken = _interpreter_incompatibility(triton.__version__, numpy.__version__)
            if broken:
                return False, broken
            return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors; slow, for tests)"
        return False, "no CUDA GPU (on CPU, triton runs only with TRITON_INTERPRET=1 set before import)"

    def limits(self, problem: AttentionProblem) -> List[str]:
        reasons = []
        if problem.q.dtype == torch.float64:
            reasons.append("triton kernels support float16, bfloat16 and float32, not float64")
        if not 16 <= problem.head_dim <= 256:
            reasons.append(f"triton kernels support head_dim 16..256, got {problem.head_dim}")
        return reasons

    def forward(self, q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
        return _forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out)

    def backward(self, do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats):
        return _backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats)


BACKEND = TritonBackend()
