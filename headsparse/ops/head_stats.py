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

Backends: ``"torch"`` (:mod:`headsparse.ops.torch_backend`, any device, always available), ``"cpu"`` and
``"cuda"`` (the compiled extension, :mod:`headsparse.ops.extension`), chosen by the dispatcher of
:mod:`headsparse.ops.registry` like the attention backends. ``"auto"`` uses the
torch implementation everywhere (see docs/extension.md for the measurement
that decided it; the CUDA kernels are not yet validated on a GPU). Results are
float32 (float64 for float64 inputs on the torch and cpu backends).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._checks import check_int
from . import registry
from .backend import StatsProblem


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
    try:
        registry.check_name("head_stats", backend)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None


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
    check_int("head_stats: num_heads", num_heads, lo=1)
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
    kernels = registry.resolve("head_stats", backend, StatsProblem(x))
    xg, x_sq, g_sq, abs_x, abs_g = kernels.head_stats(x, g, num_heads, token_mask)
    return HeadStats(num_heads=num_heads, x_sq=x_sq, abs_x=abs_x, xg=xg, g_sq=g_sq, abs_g=abs_g)


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
    return registry.resolve("head_stats", backend, StatsProblem(x)).gram(x, token_mask)


def _check_gram(gram_matrix, num_heads: int, fn: str) -> int:
    if not isinstance(gram_matrix, torch.Tensor) or gram_matrix.dim() != 2 or gram_matrix.shape[0] != gram_matrix.shape[1]:
        raise ValueError(f"{fn}: gram_matrix must be a square 2-d tensor")
    check_int(f"{fn}: num_heads", num_heads, lo=1)
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
