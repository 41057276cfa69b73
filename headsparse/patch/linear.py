"""Projections split into a trainable head slice and a frozen remainder.

``HeadSlicedProjection`` replaces Q, K, V (or GPT-2's fused QKV): its output
rows are split into a trainable block (``weight_train``, ``bias_train``:
``nn.Parameter`` with ``requires_grad=True``) and a frozen block
(``weight_frozen``, ``bias_frozen``: parameters with ``requires_grad=False``).
Each block is one matmul. Autograd computes a weight gradient only for the
trainable block; the frozen block contributes to the input gradient only (it
saves its weight, not its input). The output is the concatenation of
segments of the two blocks' outputs, so a layer can be laid out
"trainable heads first" without a gather.

``HeadSlicedOutput`` replaces O: its input columns are split the same way,
``y = x_t W_t^T + x_f W_f^T + b`` (the bias stays frozen: it is not per head).

Gradient and optimizer-state bytes are therefore proportional to the
trainable heads.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Segment = Tuple[str, int, int]  # ("t" | "f", start, end) along the block's output


def _param(t: Optional[torch.Tensor], trainable: bool) -> Optional[nn.Parameter]:
    if t is None:
        return None
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=trainable)


def is_sharded(t: Optional[torch.Tensor]) -> bool:
    """True for a DTensor (a parameter sharded by FSDP2 ``fully_shard`` or another DTensor wrapper)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return False
    return isinstance(t, DTensor)


def is_zero3(t: Optional[torch.Tensor]) -> bool:
    """True for a parameter managed by DeepSpeed ZeRO-3 (it carries ``ds_id``; read without importing deepspeed)."""
    return t is not None and hasattr(t, "ds_id")


def is_zero3_partitioned(t: Optional[torch.Tensor]) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter that is partitioned right now: its ``data`` is an empty placeholder
    (``ds_status`` NOT_AVAILABLE), the values live in per-rank partitions (``ds_tensor``) until gathered."""
    status = getattr(t, "ds_status", None) if is_zero3(t) else None
    return status is not None and getattr(status, "name", str(status)) == "NOT_AVAILABLE"


def _stock_view(parts, dim: int) -> torch.Tensor:
    """The blocks concatenated along ``dim``, detached; a meta tensor of that shape when any block is sharded
    (reading it must not start a collective on one rank)."""
    parts = [x for x in parts if x is not None]
    if any(is_sharded(x) for x in parts):
        shape = list(parts[0].shape)
        shape[dim] = sum(x.shape[dim] for x in parts)
        return torch.empty(shape, dtype=parts[0].dtype, device="meta")
    return torch.cat([x.detach() for x in parts], dim=dim)


class HeadSlicedProjection(nn.Module):
    """y = x W^T + b with W's rows in a trainable and a frozen block (see the module docstring).

    Args:
        weight_train, bias_train: rows of the trainable block, (Rt, in) and (Rt,) (Rt may be 0).
        weight_frozen, bias_frozen: rows of the frozen block, (Rf, in) and (Rf,).
        segments: the output, as ("t" | "f", start, end) ranges of the blocks' outputs, in order.
    """

    def __init__(self, weight_train, bias_train, weight_frozen, bias_frozen, segments: Sequence[Segment]):
        super().__init__()
        self.in_features = (weight_train if weight_train.shape[0] else weight_frozen).shape[1]
        self.rows_train = weight_train.shape[0]
        self.rows_frozen = weight_frozen.shape[0]
        self.weight_train = _param(weight_train, True) if self.rows_train else None
        self.bias_train = _param(bias_train, True) if self.rows_train else None
        self.weight_frozen = _param(weight_frozen, False) if self.rows_frozen else None
        self.bias_frozen = _param(bias_frozen, False) if self.rows_frozen else None
        self.segments: List[Segment] = [s for s in segments if s[2] > s[1]]
        self.out_features = sum(e - s for _, s, e in self.segments)
        self.detach_frozen = False  # grad="sparse": the frozen rows give no input gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yt = F.linear(x, self.weight_train, self.bias_train) if self.rows_train else None
        xf = x.detach() if self.detach_frozen else x
        yf = F.linear(xf, self.weight_frozen, self.bias_frozen) if self.rows_frozen else None
        if len(self.segments) == 1:
            kind, s, e = self.segments[0]
            y = yt if kind == "t" else yf
            return y if (s == 0 and e == y.shape[-1]) else y[..., s:e]
        return torch.cat([(yt if kind == "t" else yf)[..., s:e] for kind, s, e in self.segments], dim=-1)

    # ``weight`` / ``bias``: what a stock projection would hold, read-only. The state dict of a patched model has
    # the stock keys (``...q_proj.weight``); torch.distributed.checkpoint resolves each key to an attribute, so they
    # must exist. Rows are in this module's (patched) output order; sharded blocks give a meta tensor of the shape.
    @property
    def weight(self) -> torch.Tensor:
        return self._stock("weight")

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._stock("bias")

    def _stock(self, kind: str) -> Optional[torch.Tensor]:
        blocks = {"t": getattr(self, f"{kind}_train"), "f": getattr(self, f"{kind}_frozen")}
        if all(b is None for b in blocks.values()):
            return None
        if any(is_sharded(b) for b in blocks.values()):
            ref = next(b for b in blocks.values() if b is not None)
            shape = (self.out_features, self.in_features) if kind == "weight" else (self.out_features,)
            return torch.empty(shape, dtype=ref.dtype, device="meta")
        return torch.cat([blocks[k].detach()[s:e] for k, s, e in self.segments])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rows_train={self.rows_train}, rows_frozen={self.rows_frozen}"


class HeadSlicedOutput(nn.Module):
    """y = x[..., :Ct] W_t^T + x[..., Ct:] W_f^T + b: the O projection with trainable columns first."""

    def __init__(self, weight_train, weight_frozen, bias):
        super().__init__()
        self.cols_train = weight_train.shape[1]
        self.cols_frozen = weight_frozen.shape[1]
        self.out_features = (weight_train if self.cols_train else weight_frozen).shape[0]
        self.in_features = self.cols_train + self.cols_frozen
        self.weight_train = _param(weight_train, True) if self.cols_train else None
        self.weight_frozen = _param(weight_frozen, False) if self.cols_frozen else None
        self.bias = _param(bias, False)
        # grad="sparse": input columns from here on get no gradient (frozen heads outside the backward set)
        self.detach_from: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = self.cols_train
        cut = self.detach_from
        if cut is not None and ct <= cut < self.in_features and self.cols_frozen:
            # frozen columns [ct, cut) pass a gradient, [cut, in) do not
            y = F.linear(x[..., cut:].detach(), self.weight_frozen[:, cut - ct:], self.bias)
            if cut > ct:
                y = y + F.linear(x[..., ct:cut], self.weight_frozen[:, : cut - ct])
            return y + F.linear(x[..., :ct], self.weight_train) if ct else y
        if not ct:
            return F.linear(x, self.weight_frozen, self.bias)
        if not self.cols_frozen:
            return F.linear(x, self.weight_train, self.bias)
        y = F.linear(x[..., ct:], self.weight_frozen, self.bias)
        return y + F.linear(x[..., :ct], self.weight_train)

    @property
    def weight(self) -> torch.Tensor:
        """The stock (out, in) weight, columns in patched head order, detached (see HeadSlicedProjection.weight)."""
        return _stock_view([self.weight_train, self.weight_frozen], 1)

    def extra_repr(self) -> str:
        return f"cols_train={self.cols_train}, cols_frozen={self.cols_frozen}, out_features={self.out_features}"
