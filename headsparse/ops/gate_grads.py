"""Opt-in collection of per-(sample, head) gate-gradient statistics.

If every head's output were multiplied by a gate g_h = 1, the gradient of the
loss with respect to that gate is sum over tokens of <O_h, dO_h>: exactly the
row sums FlashAttention's backward computes first (``delta``). Recording them
therefore costs no extra pass over O and dO.

Usage::

    with headsparse.record_gate_grads() as rec:
        loss = model(batch).loss
        loss.backward()
    scores = rec.by_key()          # {key: (N, Hq) tensor}, N = samples seen

The recorder must be active when the forward runs (that is when an attention
call decides to record); the values arrive during ``backward()``.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Dict, Hashable, Iterator, List, Optional

import torch

_state = threading.local()


@dataclass
class GateGradRecord:
    """One attention call's statistics: ``value`` (B, Hq) float32, NaN for heads the backward skipped."""

    key: Hashable
    value: torch.Tensor


class GateGradRecorder:
    """Collects :class:`GateGradRecord` entries from attention backward passes."""

    def __init__(self) -> None:
        self.records: List[GateGradRecord] = []
        self._calls = 0

    def _next_key(self, key: Optional[Hashable]) -> Hashable:
        self._calls += 1
        return self._calls - 1 if key is None else key

    def add(self, key: Hashable, value: torch.Tensor) -> None:
        self.records.append(GateGradRecord(key, value.detach()))

    def by_key(self) -> Dict[Hashable, torch.Tensor]:
        """Concatenate the records of each key along the batch dimension (in arrival order)."""
        grouped: Dict[Hashable, List[torch.Tensor]] = {}
        for rec in self.records:
            grouped.setdefault(rec.key, []).append(rec.value)
        return {k: torch.cat(v, dim=0) for k, v in grouped.items()}

    def clear(self) -> None:
        self.records.clear()
        self._calls = 0


def current_recorder() -> Optional[GateGradRecorder]:
    """The innermost active recorder of this thread, or None."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def record_gate_grads(recorder: Optional[GateGradRecorder] = None) -> Iterator[GateGradRecorder]:
    """Record sum_t <O, dO> per (sample, head) for attention calls made inside the block.

    Pass ``stats_key=`` to :func:`headsparse.attention` to label calls (for
    example the layer index); unlabelled calls are numbered in call order.
    """
    rec = recorder if recorder is not None else GateGradRecorder()
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(rec)
    try:
        yield rec
    finally:
        stack.pop()
