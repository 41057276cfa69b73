"""The one dispatcher: which backends exist, which one runs a call, and why not.

Each backend is an object (:class:`headsparse.ops.backend.Backend`) defined in its own module and owning its
rules; this module only holds the table, the ``auto`` preference order per op and device, and :func:`resolve`,
which both ops use (attention in :mod:`headsparse.ops.attention` and :mod:`headsparse.ops.library`, head
statistics in :mod:`headsparse.ops.head_stats`). Nothing falls back silently: a backend asked for by name that
cannot run the call raises :class:`BackendUnavailableError` with its reasons.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from . import extension, torch_backend, triton_backend
from .backend import Backend, BackendInfo, BackendUnavailableError

__all__ = ["Backend", "BackendInfo", "BackendUnavailableError", "backends", "get", "names", "register_backend",
           "resolve"]

_BACKENDS: Dict[str, Backend] = {
    b.name: b for b in (torch_backend.BACKEND, triton_backend.BACKEND,
                        # compiled extension (csrc/, docs/extension.md); not in the auto orders, see that page
                        extension.CPU, extension.CUDA)
}

# Preference order of ``backend="auto"`` per op and device type, fastest first; devices not listed use torch.
# On CUDA the torch backend (PyTorch's own attention kernels) comes first: no headsparse kernel has passed on a GPU
# yet, so the Triton kernels go first only behind TRITON_AUTO_SWITCH. Head statistics use torch everywhere
# (docs/extension.md has the measurement).
_AUTO_ORDER: Dict[str, Dict[str, tuple]] = {
    "attention": {"cuda": ("torch",), "cpu": ("torch",)},
    "head_stats": {},
}

TRITON_AUTO_SWITCH = "HEADSPARSE_ENABLE_UNVALIDATED_TRITON"


def triton_auto_enabled() -> bool:
    """Whether ``auto`` tries the Triton kernels first on CUDA (``HEADSPARSE_ENABLE_UNVALIDATED_TRITON=1``)."""
    return os.environ.get(TRITON_AUTO_SWITCH, "0").strip().lower() not in ("", "0", "false", "no")


def register_backend(backend: Backend, auto_rank: Optional[Dict[str, int]] = None, op: str = "attention") -> None:
    """Add (or replace) a backend; ``auto_rank`` ({device: position}) puts it in ``op``'s auto order there."""
    _BACKENDS[backend.name] = backend
    backend.reset_status()
    for dev, rank in (auto_rank or {}).items():
        order = [n for n in _AUTO_ORDER[op].get(dev, ("torch",)) if n != backend.name]
        order.insert(rank, backend.name)
        _AUTO_ORDER[op][dev] = tuple(order)


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)
    for orders in _AUTO_ORDER.values():
        for dev, order in orders.items():
            orders[dev] = tuple(n for n in order if n != name)


def get(name: str) -> Backend:
    return _BACKENDS[name]


def names(op: str) -> List[str]:
    """The backends that implement ``op``, sorted."""
    return sorted(n for n, b in _BACKENDS.items() if op in b.ops)


def auto_order(op: str, device: str) -> tuple:
    """The backends ``auto`` tries for ``op`` on ``device``, in order."""
    order = _AUTO_ORDER[op].get(device, ("torch",))
    if op == "attention" and device == "cuda" and triton_auto_enabled() and "triton" in _BACKENDS:
        order = ("triton",) + tuple(n for n in order if n != "triton")
    return order


def backends() -> Dict[str, BackendInfo]:
    """Every known backend with whether it is usable on this machine and why (not)."""
    return {name: b.info() for name, b in _BACKENDS.items()}


def check_name(op: str, name) -> None:
    """ValueError unless ``name`` is "auto" or a backend that implements ``op``."""
    if not isinstance(name, str) or (name != "auto" and name not in names(op)):
        raise ValueError(f"backend must be 'auto' or one of {names(op)}, got {name!r}")


def resolve(op: str, name: str, problem) -> Backend:
    """The backend called ``name`` (or the first usable one of the auto order) that can run ``problem``."""
    device = problem.device.type
    if name == "auto":
        reasons = []
        for cand in auto_order(op, device):
            why = _BACKENDS[cand].supports(problem)
            if not why:
                return _BACKENDS[cand]
            reasons.append(f"{cand}: {'; '.join(why)}")
        raise BackendUnavailableError(f"no backend can run this call on {device}: " + "; ".join(reasons))
    check_name(op, name)
    why = _BACKENDS[name].supports(problem)
    if why:
        raise BackendUnavailableError(f"backend {name!r} cannot run this call: {'; '.join(why)}")
    return _BACKENDS[name]
