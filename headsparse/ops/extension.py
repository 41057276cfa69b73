"""Loader of the compiled extension ``headsparse._C``.

The extension is imported lazily, on first use, and never at ``import
headsparse``: a missing, broken or stale build only makes the ``cpu`` and
``cuda`` backends (and ``backend="cpu"/"cuda"`` of the statistics ops)
unusable, with a reason that says why. See docs/extension.md for the build.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Optional, Tuple

# Must equal HEADSPARSE_ABI_VERSION in csrc/bind.cpp.
ABI_VERSION = 2

_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_loaded = False

_SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


def _load() -> None:
    global _module, _error, _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        if os.environ.get("HEADSPARSE_SKIP_EXT", "0") not in ("", "0"):
            _error = "extension disabled (HEADSPARSE_SKIP_EXT=1)"
            return
        try:
            mod = importlib.import_module("headsparse._C")
        except ImportError as exc:
            if "No module named" in str(exc) and "headsparse._C" in str(exc):
                _error = ("extension not built (headsparse._C is missing; reinstall with "
                          "`pip install --no-build-isolation -e .` without HEADSPARSE_SKIP_EXT=1)")
            else:  # built against another torch, missing symbols, ...
                _error = f"extension failed to load, rebuild it ({exc.__class__.__name__}: {exc})"
            return
        except Exception as exc:  # pragma: no cover - unexpected loader failure
            _error = f"extension failed to load ({exc.__class__.__name__}: {exc})"
            return
        abi = getattr(mod, "ABI_VERSION", None)
        if abi != ABI_VERSION:
            _error = f"stale extension build (ABI {abi}, this Python code expects {ABI_VERSION}); rebuild it"
            return
        _module = mod


def get():
    """The loaded ``headsparse._C`` module; raises RuntimeError with the reason if unusable."""
    _load()
    if _module is None:
        raise RuntimeError(f"headsparse._C is unusable: {_error}")
    return _module


def status() -> Tuple[bool, str]:
    """(loaded, reason)."""
    _load()
    if _module is None:
        return False, str(_error)
    where = getattr(_module, "__file__", "?")
    return True, f"headsparse._C at {where}" + _staleness_note(where)


def with_cuda() -> bool:
    _load()
    return _module is not None and bool(_module.with_cuda())


def _staleness_note(so_path: str) -> str:
    """A note when a source in csrc/ is newer than the built library (editable installs)."""
    try:
        built = os.path.getmtime(so_path)
        newest = max(
            os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(_SRC_DIR)
            for f in files
            if f.endswith((".cpp", ".cu", ".h", ".cuh"))
        )
    except (OSError, ValueError):
        return ""
    return " (note: csrc/ has changed since it was built; reinstall to rebuild)" if newest > built else ""


def cpu_status() -> Tuple[bool, str]:
    ok, why = status()
    if not ok:
        return False, why
    return True, "compiled C++ kernels; " + why


def cuda_status() -> Tuple[bool, str]:
    ok, why = status()
    if not ok:
        return False, why
    if not with_cuda():
        return False, "extension built without CUDA (CPU-only torch or no nvcc at build time)"
    import torch

    if not torch.cuda.is_available():
        return False, "extension has CUDA kernels but no CUDA GPU is available"
    if os.environ.get("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "0") in ("", "0"):
        return False, ("CUDA kernels compiled and checked under the CPU emulator, but not yet validated on a GPU; set "
                       "HEADSPARSE_ENABLE_UNVALIDATED_CUDA=1 to use them (tests/test_extension_gpu.py checks them)")
    return True, "compiled CUDA kernels (tensor cores for fp16/bf16 on sm_80+, fp32 accumulation); " + why
