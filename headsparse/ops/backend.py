"""What a kernel backend is: one object that owns its rules.

Every backend (``torch``, ``triton``, the compiled ``cpu`` and ``cuda``) is an instance of a :class:`Backend`
subclass, defined in its own module. It says on which devices it runs (:meth:`Backend.devices`), whether it can
load on this machine (:meth:`Backend.status`, probed once), which ops it implements (:attr:`Backend.ops`) and, for
one call, every reason it cannot run it (:meth:`Backend.supports`; an empty list means it can). The dispatcher
(:mod:`headsparse.ops.registry`) asks these objects and nothing else.

Kernel contract of the ``"attention"`` op (index tensors are int64 on the inputs' device):

* ``forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> lse``: program ``p`` computes query
  head ``q_idx[p]``, reading KV head ``kv_idx[p]`` (an absolute head of k/v) and head ``mask_idx[p]`` of the mask;
  it writes ``out[:, q_idx[p]]`` and returns the log-sum-exp (B, P, Sq) (its base is the backend's own business:
  only its backward reads it). Rows with nothing to attend get output 0 and lse = +inf.
* ``backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats) -> (dq, dk, dv)`` on compact
  tensors: q, o, do (B, G, Sq, D) hold only the G heads in the backward, k, v (B, R, Skv, D) only the R KV heads
  they read; ``kv_pos[g]`` is the position in k/v (not the absolute KV head) of head g's KV head and
  ``mask_idx[g]`` its head in the mask. If ``stats`` (B, G) is given, sum_t <o, do> is added to it.

Kernel contract of the ``"head_stats"`` op (x, g: (B, S, H*D); token_mask: (B, S) bool or None):

* ``head_stats(x, g, num_heads, token_mask) -> (xg, x_sq, g_sq, abs_x, abs_g)``; the parts that need g are None
  without it.
* ``gram(x, token_mask) -> (C, C)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call here."""


@dataclass(frozen=True)
class BackendInfo:
    """Status of one backend on this machine (see :func:`headsparse.backends`)."""

    name: str
    usable: bool
    reason: str
    devices: Tuple[str, ...]


@dataclass(frozen=True)
class StatsProblem:
    """One head-statistics call, as the backends see it: the tensor they would read."""

    x: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


class Backend:
    """Base of every backend. Subclasses set :attr:`name` and :attr:`ops`, and override :meth:`devices`,
    :meth:`probe`, :meth:`limits` and the kernels of their ops."""

    name: str = ""
    ops: Tuple[str, ...] = ("attention",)
    # Whether the attention backward is built from torch ops out of place, so vmap (batched gradients) can batch it.
    batched_grads: bool = False

    def __init__(self) -> None:
        self._status: Optional[Tuple[bool, str]] = None

    # ---------------------------------------------------------------- rules

    def devices(self) -> Tuple[str, ...]:
        """Device types whose tensors this backend takes."""
        raise NotImplementedError

    def probe(self) -> Tuple[bool, str]:
        """(usable, reason): whether the backend can load on this machine. Called once, by :meth:`status`."""
        raise NotImplementedError

    def limits(self, problem) -> List[str]:
        """Reasons specific to this backend why it cannot run ``problem`` (dtypes, head dims, ...)."""
        return []

    def status(self) -> Tuple[bool, str]:
        """(usable, reason), probed on first use and cached (``reset_status`` forgets it)."""
        if self._status is None:
            self._status = self.probe()
        return self._status

    def reset_status(self) -> None:
        self._status = None

    def supports(self, problem) -> List[str]:
        """Every reason this backend cannot run ``problem`` here; empty when it can."""
        usable, reason = self.status()
        if not usable:
            return [reason]
        device = problem.device.type
        if device not in self.devices():
            return [f"it runs on {'/'.join(self.devices())} tensors, got {device} tensors"]
        return self.limits(problem)

    def info(self) -> BackendInfo:
        usable, reason = self.status()
        return BackendInfo(self.name, usable, reason, self.devices())

    def __repr__(self) -> str:
        return f"<headsparse backend {self.name!r}>"

    # ---------------------------------------------------------------- kernels (see the module docstring)

    def forward(self, q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats):
        raise NotImplementedError

    def head_stats(self, x, g, num_heads, token_mask):
        raise NotImplementedError

    def gram(self, x, token_mask):
        raise NotImplementedError
