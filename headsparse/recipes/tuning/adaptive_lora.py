"""APT's adaptive tuning: LoRA adapters whose ranks grow where they matter.

APT (Zhao et al., ICML 2024) tunes LoRA adapters (rank 8 at the start) and, over the pruning window, grows the
number of tuning parameters linearly to a multiple (4x) of the start: the adapters in the top half by importance
(capped at rank 64) grow by one common factor chosen to reach the target. An adapter's importance is the sum over
its rank rows i of |sum_j A_ij dL/dA_ij|, smoothed over steps. New rows of A are drawn Kaiming-uniform and the new
columns of B are zero, so growing an adapter leaves the model's function unchanged.

This module is the building block (adapters, importance, growth); :func:`headsparse.recipes.finetune_apt` (APT as
published) grows these adapters during pruning. :func:`headsparse.recipes.tuning.tune_apt` trains head slices instead.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn
from ..._checks import check_int


class GrowingLoRA(nn.Module):
    """``base(x) + scaling * x A^T B^T`` with ``base`` frozen, A (r, in), B (out, r); ``grow(r)`` adds rank."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        check_int("rank", rank, 1)
        w = getattr(base, "weight", None)
        in_f = getattr(base, "in_features", None) or (w.shape[1] if w is not None else None)
        out_f = getattr(base, "out_features", None) or (w.shape[0] if w is not None else None)
        if not in_f or not out_f:
            raise ValueError(f"cannot tell the input and output sizes of {type(base).__name__}")
        p = next(base.parameters())
        self.base = base
        for q in base.parameters():
            q.requires_grad_(False)
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.scaling = alpha / rank  # fixed at creation: growth must not change the function
        self.lora_A = nn.Parameter(self._new_rows(rank, p))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=p.dtype, device=p.device))

    def _new_rows(self, n: int, like: torch.Tensor) -> torch.Tensor:
        a = torch.empty(n, self.in_features, dtype=like.dtype, device=like.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.t()) @ self.lora_B.t()

    def importance(self) -> torch.Tensor:
        """Per rank row i: |sum_j A_ij dL/dA_ij| from the current gradient (zeros without one)."""
        g = self.lora_A.grad
        if g is None:
            return torch.zeros(self.rank, dtype=torch.float64, device=self.lora_A.device)
        return (self.lora_A.detach() * g).sum(1).abs().double()

    def grow(self, new_rank: int) -> None:
        """Add rank rows: new A rows Kaiming-uniform, new B columns zero (the output does not change). The
        parameters are replaced, so an optimizer must be rebuilt afterwards."""
        if new_rank < self.rank:
            raise ValueError(f"an adapter only grows: rank {self.rank} -> {new_rank}")
        if new_rank == self.rank:
            return
        a, b = self.lora_A.detach(), self.lora_B.detach()
        extra = new_rank - self.rank
        self.lora_A = nn.Parameter(torch.cat([a, self._new_rows(extra, a)], 0))
        self.lora_B = nn.Parameter(torch.cat([b, b.new_zeros(b.shape[0], extra)], 1))

    def tuning_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)


def add_adapters(model: nn.Module, targets: Sequence[str] = ("q_proj", "v_proj"), rank: int = 8,
                 alpha: float = 16.0) -> Dict[str, GrowingLoRA]:
    """Wrap every module whose name ends with one of ``targets`` in a :class:`GrowingLoRA` (in place) and freeze
    everything else, so only the adapters train. Returns the adapters by module name."""
    found = [(n, m) for n, m in model.named_modules() if n and n.split(".")[-1] in targets]
    if not found:
        raise ValueError(f"no module named {list(targets)} in {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for name, module in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        ad = GrowingLoRA(module, rank=rank, alpha=alpha)
        setattr(parent, name.rsplit(".", 1)[-1], ad)
        out[name] = ad
    return out


def grow_to_budget(adapters: Sequence[GrowingLoRA], importance: Sequence[float], target_params: int,
                   max_rank: int = 64) -> List[int]:
    """APT's growth step: the top half of ``adapters`` by ``importance`` grow by one common factor (ranks rounded
    down, capped at ``max_rank``) chosen as the largest that keeps the total tuning parameters at most
    ``target_params``. Returns the new ranks (all adapters)."""
    if len(adapters) != len(importance):
        raise ValueError("one importance per adapter")
    order = sorted(range(len(adapters)), key=lambda i: -float(importance[i]))
    top = order[:max(1, len(adapters) // 2)]
    fixed = sum(a.tuning_params() for i, a in enumerate(adapters) if i not in top)

    def ranks_at(factor: float) -> Dict[int, int]:
        return {i: min(max_rank, max(adapters[i].rank, int(adapters[i].rank * factor))) for i in top}

    def params(r: Dict[int, int]) -> int:
        return fixed + sum(r[i] * (adapters[i].in_features + adapters[i].out_features) for i in top)

    lo, hi = 1.0, float(max_rank)  # binary search on the common factor
    for _ in range(60):
        mid = (lo + hi) / 2
        if params(ranks_at(mid)) <= target_params:
            lo = mid
        else:
            hi = mid
    new = ranks_at(lo)
    for i, r in new.items():
        adapters[i].grow(r)
    return [a.rank for a in adapters]
