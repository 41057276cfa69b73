"""Per-head statistics over the attention output projection's input X and its gradient G.

X is the o_proj input (B, S, H*D): the concatenated per-head contexts; G = dL/dX
has the same shape. "Per head" is the D-wide slice h*D:(h+1)*D of the last axis.
Padding tokens are excluded with ``token_mask`` (B, S) bool, True = counted.

:func:`head_stats` computes in one pass:

* ``xg`` (B, H): sum_t <X_h, G_h>, the per-sample head-gate gradient (Michel et
  al. take |xg| per example; P2D-style sample mining uses it per sample);
* ``x_sq`` / ``g_sq`` (B, H): sum_t ||X_h||^2 and sum_t ||G_h||^2 (norm signatures);
* ``abs_x`` / ``abs_g`` (H*D,): sum over the whole batch and masked tokens of
  |X| and |G| per channel (APT's salience is ``(abs_x * abs_g)`` summed per head,
  :meth:`HeadStats.apt_salience`). These are totals over the batch, not per sample.

:func:`gram` accumulates X^T X (H*D x H*D) over masked tokens; :func:`head_gram_blocks`
and :func:`cross_head_inner` take per-head diagonal blocks and the H x H matrix of
cross-head inner products sum_t <X_i, X_j> from it.

Backends: ``"torch"`` (this file, any device, always available), ``"cpu"`` and
``"cuda"`` (the compiled extension, ``headsparse._C``). ``"auto"`` uses the
torch implementation everywhere (see docs/extension.md for the measurement
that decided it; the CUDA kernels are not yet validated on a GPU). Results are
float32 (float64 for float64 inputs on the torch and cpu backends).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import extension
from .registry import BackendUnavailableError

_BACKENDS = ("auto", "torch", "cpu", "cuda")


@dataclass
class HeadStats:
    """Result of :func:`head_stats`. Fields that need G are None when G was not given."""

    num_heads: int
    x_sq: torch.Tensor  # (B, H)
    abs_x: torch.Tensor  # (H*D,)
    xg: Optional[torch.Tensor] = None  # (B, H)
    g_sq: Optional[torch.Tensor] = None  # (B, H)
    abs_g: Optional[torch.Tensor] = None  # (H*D,)

    def apt_salience(self) -> torch.Tensor:
        """APT's head salience: sum over each head's channels of (sum|X|) * (sum|G|), shape (H,)."""
        if self.abs_g is None:
            raise ValueError("apt_salience needs the gradient g; call head_stats(x, g, ...)")
        return (self.abs_x * self.abs_g).view(self.num_heads, -1).sum(dim=-1)

    def gate_importance(self) -> torch.Tensor:
        """Michel et al.'s per-example importance |sum_t <X_h, G_h>|, shape (B, H)."""
        if self.xg is None:
            raise ValueError("gate_importance needs the gradient g; call head_stats(x, g, ...)")
        return self.xg.abs()


def _check_common(x, token_mask, backend: str, fn: str):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a torch.Tensor of shape (B, S, C), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must have 3 dims (batch, seq, channels), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
            raise ValueError(f"{fn}: token_mask must be a bool tensor of shape (B, S) or None")
        if tuple(token_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{fn}: token_mask must have shape {tuple(x.shape[:2])}, got {tuple(token_mask.shape)}")
        if token_mask.device != x.device:
            raise ValueError(f"{fn}: token_mask is on {token_mask.device} but x is on {x.device}")
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {backend!r}")


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        return "torch"
    if backend == "torch":
        return backend
    if backend == "cpu":
        ok, why = extension.cpu_status()
        if not ok:
            raise BackendUnavailableError(f"backend 'cpu' is unusable: {why}")
        if x.device.type != "cpu":
            raise BackendUnavailableError(f"backend 'cpu' runs on cpu tensors, got {x.device.type} tensors")
        return backend
    ok, why = extension.cuda_status()
    if not ok:
        raise BackendUnavailableError(f"backend 'cuda' is unusable: {why}")
    if x.device.type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' runs on cuda tensors, got {x.device.type} tensors")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise BackendUnavailableError(f"backend 'cuda' supports float16, bfloat16 and float32, got {x.dtype}")
    return backend


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked(t: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    t = t.to(_acc_dtype(t.dtype))
    if token_mask is None:
        return t
    return torch.where(token_mask[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def head_stats_torch(x, g, num_heads: int, token_mask=None) -> HeadStats:
    """Pure-PyTorch implementation of :func:`head_stats` (also the reference of the tests)."""
    b, s, c = x.shape
    xf = _masked(x, token_mask)
    xh = xf.view(b, s, num_heads, c // num_heads)
    out = HeadStats(num_heads=num_heads, x_sq=(xh * xh).sum(dim=(1, 3)), abs_x=xf.abs().sum(dim=(0, 1)))
    if g is not None:
        gf = _masked(g, token_mask)
        gh = gf.view(b, s, num_heads, c // num_heads)
        out.xg = (xh * gh).sum(dim=(1, 3))
        out.g_sq = (gh * gh).sum(dim=(1, 3))
        out.abs_g = gf.abs().sum(dim=(0, 1))
    return out


def head_stats(
    x: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    num_heads: Optional[int] = None,
    token_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> HeadStats:
    """Per-(sample, head) and per-channel statistics of X (and G) in one pass.

    Args:
        x: the o_proj input, (B, S, H*D), float16/bfloat16/float32/float64.
        g: its gradient dL/dX, same shape, dtype and device; optional.
        num_heads: H (required); must divide the last dimension.
        token_mask: bool (B, S), True = token is counted (padding = False). None = all.
        backend: "auto", "torch", "cpu" or "cuda" (compiled extension).

    Returns:
        :class:`HeadStats` with ``x_sq`` (B, H), ``abs_x`` (H*D,) and, if ``g`` is
        given, ``xg`` (B, H), ``g_sq`` (B, H) and ``abs_g`` (H*D,). ``abs_*``
        are totals over the batch.
    """
    _check_common(x, token_mask, backend, "head_stats")
    if num_heads is None:
        raise ValueError("head_stats: num_heads is required (the number of heads H in x's last dimension H*D)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"head_stats: num_heads must be a positive int, got {num_heads!r}")
    if x.shape[2] % num_heads != 0:
        raise ValueError(f"head_stats: num_heads={num_heads} does not divide the channel count {x.shape[2]}")
    if g is not None:
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"head_stats: g must be a torch.Tensor or None, got {type(g).__name__}")
        if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device:
            raise ValueError(
                f"head_stats: g must match x in shape, dtype and device; got g {tuple(g.shape)} {g.dtype} {g.device}, "
                f"x {tuple(x.shape)} {x.dtype} {x.device}"
            )
    which = _resolve(backend, x)
    if which == "torch":
        return head_stats_torch(x, g, num_heads, token_mask)
    xg, xx, gg, ax, ag = extension.get().head_stats(x, g, num_heads, token_mask)
    has_g = g is not None
    return HeadStats(num_heads=num_heads, x_sq=xx, abs_x=ax, xg=xg if has_g else None, g_sq=gg if has_g else None,
                     abs_g=ag if has_g else None)


def gram_torch(x, token_mask=None) -> torch.Tensor:
    """Pure-PyTorch implementation of :func:`gram`."""
    c = x.shape[2]
    rows = x.reshape(-1, c)
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1)]
    rows = rows.to(_acc_dtype(x.dtype))
    return rows.transpose(0, 1) @ rows


def gram(x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Second-moment (Gram) matrix X^T X over the masked tokens of all samples.

    Args:
        x: (B, S, C) with C = H*D (for example the o_proj input).
        token_mask: bool (B, S), True = counted. None = all tokens.
        backend: "auto", "torch", "cpu" or "cuda".

    Returns:
        (C, C) float32 (float64 for float64 input on torch/cpu), symmetric. Per-head
        diagonal blocks: :func:`head_gram_blocks`; cross-head inner products:
        :func:`cross_head_inner`. Sum calls over batches to accumulate over a set.
    """
    _check_common(x, token_mask, backend, "gram")
    which = _resolve(backend, x)
    if which == "torch":
        return gram_torch(x, token_mask)
    return extension.get().gram(x, token_mask)


def _check_gram(gram_matrix, num_heads: int, fn: str) -> int:
    if not isinstance(gram_matrix, torch.Tensor) or gram_matrix.dim() != 2 or gram_matrix.shape[0] != gram_matrix.shape[1]:
        raise ValueError(f"{fn}: gram_matrix must be a square 2-d tensor")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"{fn}: num_heads must be a positive int, got {num_heads!r}")
    if gram_matrix.shape[0] % num_heads != 0:
        raise ValueError(f"{fn}: num_heads={num_heads} does not divide the Gram size {gram_matrix.shape[0]}")
    return gram_matrix.shape[0] // num_heads


def head_gram_blocks(gram_matrix: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head diagonal blocks X_h^T X_h of a Gram matrix, shape (H, D, D)."""
    d = _check_gram(gram_matrix, num_heads, "head_gram_blocks")
    blocks = gram_matrix.view(num_heads, d, num_heads, d)
    idx = torch.arange(num_heads, device=gram_matrix.device)
    return blocks[idx, :, idx, :]


def cross_head_inner(gram_matrix: torch.Tensor, num_heads: int) -> torch.Tensor:
    """H x H matrix of sum_t <X_i, X_j> (traces of the (i, j) blocks of the Gram matrix)."""
    d = _check_gram(gram_matrix, num_heads, "cross_head_inner")
    blocks = gram_matrix.view(num_heads, d, num_heads, d)
    return torch.diagonal(blocks, dim1=1, dim2=3).sum(dim=-1)
