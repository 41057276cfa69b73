"""Measuring what the autograd graph keeps alive for the backward."""
from __future__ import annotations

from typing import Callable, Tuple, TypeVar

import torch

T = TypeVar("T")


def saved_tensor_bytes(fn: Callable[[], T]) -> Tuple[int, T]:
    """Run ``fn`` and return (bytes of every tensor autograd saves for the backward meanwhile, fn's result).

    Counted through ``torch.autograd.graph.saved_tensors_hooks``: each saved
    tensor counts its full size, even when it shares storage with another.
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return total, result
