"""Which kernel backends exist, whether they are usable here, and why not.

A backend module exposes ``forward`` and ``backward`` with the contract of
``headsparse.ops.torch_backend``. Each entry here says on which devices it
runs, whether it can be loaded on this machine, and which calls it supports.
Nothing falls back silently: an unusable backend that is asked for by name
raises :class:`BackendUnavailableError` with the reason.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .problem import AttentionProblem


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call here."""


@dataclass(frozen=True)
class BackendInfo:
    """Status of one backend on this machine (see :func:`headsparse.backends`)."""

    name: str
    usable: bool
    reason: str
    devices: Tuple[str, ...]


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


def _torch_status() -> Tuple[bool, str]:
    return True, "plain PyTorch; any device"


def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            return False, f"needs a GPU with compute capability >= 8.0, found {major}.x"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if triton_interpreted():
        import numpy

        broken = _interpreter_incompatibility(triton.__version__, numpy.__version__)
        if broken:
            return False, broken
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors; slow, for tests)"
    return False, "no CUDA GPU (on CPU, triton runs only with TRITON_INTERPRET=1 set before import)"


def _triton_devices() -> Tuple[str, ...]:
    return ("cpu",) if triton_interpreted() and not torch.cuda.is_available() else ("cuda",)


def _triton_check(p: AttentionProblem) -> Optional[str]:
    if p.q.dtype == torch.float64:
        return "triton kernels support float16, bfloat16 and float32, not float64"
    if not 16 <= p.head_dim <= 256:
        return f"triton kernels support head_dim 16..256, got {p.head_dim}"
    return None


def _torch_check(p: AttentionProblem) -> Optional[str]:
    if p.head_dim > 256:
        return f"head_dim must be <= 256, got {p.head_dim}"
    return None


def _cpu_status() -> Tuple[bool, str]:
    from . import extension

    return extension.cpu_status()


def _cuda_status() -> Tuple[bool, str]:
    from . import extension

    return extension.cuda_status()


def _cuda_check(p: AttentionProblem) -> Optional[str]:
    if p.q.dtype == torch.float64:
        return "compiled CUDA kernels support float16, bfloat16 and float32, not float64"
    if p.head_dim > 256:
        return f"compiled CUDA kernels support head_dim <= 256, got {p.head_dim}"
    return None


@dataclass(frozen=True)
class _Entry:
    module: str
    status: Callable[[], Tuple[bool, str]]
    devices: Callable[[], Tuple[str, ...]]
    check: Callable[[AttentionProblem], Optional[str]]


_REGISTRY: Dict[str, _Entry] = {
    "torch": _Entry("headsparse.ops.torch_backend", _torch_status, lambda: ("cpu", "cuda", "mps"), _torch_check),
    "triton": _Entry("headsparse.ops.triton_backend", _triton_status, _triton_devices, _triton_check),
    # Compiled extension (csrc/, docs/extension.md). Not in the auto order: see docs/extension.md.
    "cpu": _Entry("headsparse.ops.cpu_backend", _cpu_status, lambda: ("cpu",), _torch_check),
    "cuda": _Entry("headsparse.ops.cuda_backend", _cuda_status, lambda: ("cuda",), _cuda_check),
}

# Preference order of ``backend="auto"`` per device type, fastest first.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


def register_backend(name: str, module: str, status, devices, check, auto_rank: Optional[Dict[str, int]] = None):
    """Add a backend (used by the compiled extension's loader)."""
    _REGISTRY[name] = _Entry(module, status, devices, check)
    for dev, rank in (auto_rank or {}).items():
        order = list(_AUTO_ORDER.get(dev, ()))
        if name in order:
            order.remove(name)
        order.insert(rank, name)
        _AUTO_ORDER[dev] = tuple(order)
    _status_cache.pop(name, None)


_status_cache: Dict[str, Tuple[bool, str]] = {}


def backend_status(name: str) -> Tuple[bool, str]:
    if name not in _status_cache:
        _status_cache[name] = _REGISTRY[name].status()
    return _status_cache[name]


def backends() -> Dict[str, BackendInfo]:
    """Every known backend with whether it is usable on this machine and why (not)."""
    out = {}
    for name, entry in _REGISTRY.items():
        usable, reason = backend_status(name)
        out[name] = BackendInfo(name, usable, reason, entry.devices())
    return out


def resolve(name: str, problem: AttentionProblem):
    """The kernel module for ``name`` (or the best for ``auto``) that can run ``problem``."""
    device = problem.q.device.type
    if name == "auto":
        reasons = []
        for cand in _AUTO_ORDER.get(device, ("torch",)):
            why = _why_not(cand, problem, device)
            if why is None:
                return importlib.import_module(_REGISTRY[cand].module)
            reasons.append(f"{cand}: {why}")
        raise BackendUnavailableError(f"no backend can run this call on {device}: " + "; ".join(reasons))
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    why = _why_not(name, problem, device)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run this call: {why}")
    return importlib.import_module(_REGISTRY[name].module)


def _why_not(name: str, problem: AttentionProblem, device: str) -> Optional[str]:
    entry = _REGISTRY[name]
    usable, reason = backend_status(name)
    if not usable:
        return reason
    if device not in entry.devices():
        return f"it runs on {'/'.join(entry.devices())} tensors, got {device} tensors"
    return entry.check(problem)
