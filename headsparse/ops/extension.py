"""The compiled extension ``headsparse._C``: its loader and its two backends, ``cpu`` and ``cuda``.

The extension is imported lazily, on first use, and never at ``import
headsparse``: a missing, broken or stale build only makes the ``cpu`` and
``cuda`` backends (attention and head statistics) unusable, with a reason that
says why. See docs/extension.md for the build.

Both backends call the same bindings (``csrc/bind.cpp`` picks the C++ or the
CUDA kernels from the tensors' device), so they are one class,
:class:`CompiledBackend`, parametrised by device: :data:`CPU` and :data:`CUDA`.
The C++ kernels compute in float32 (float64 for float64 inputs), parallel over
(batch, head, row block) in the forward and (batch, KV head) in the backward;
the CUDA kernels run float16/bfloat16 on tensor cores (WMMA, fp32 accumulation)
when the head dim is a multiple of 16 up to 128 on sm_80 or newer, and
everything else on CUDA cores. The CUDA kernels are compiled by nvcc and tested
on CPU under the emulator in tests/cuda_emu, not yet validated on a GPU.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import List, Optional, Tuple

import torch

from .backend import Backend
from .problem import AttentionProblem

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


def _unvalidated_switch() -> str:
    return os.environ.get("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "0")


def cuda_status() -> Tuple[bool, str]:
    ok, why = status()
    if not ok:
        return False, why
    if not with_cuda():
        return False, "extension built without CUDA (CPU-only torch or no nvcc at build time)"
    if not torch.cuda.is_available():
        return False, "extension has CUDA kernels but no CUDA GPU is available"
    if _unvalidated_switch() in ("", "0"):
        return False, ("CUDA kernels compiled and checked under the CPU emulator, but not yet validated on a GPU; set "
                       "HEADSPARSE_ENABLE_UNVALIDATED_CUDA=1 to use them (tests/test_extension_gpu.py checks them)")
    return True, "compiled CUDA kernels (tensor cores for fp16/bf16 on sm_80+, fp32 accumulation); " + why


# ---------------------------------------------------------------- the backends


def _idx(t: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=torch.int64).contiguous()


class CompiledBackend(Backend):
    """The compiled kernels on one device type (``"cpu"``: csrc/cpu, ``"cuda"``: csrc/cuda)."""

    ops = ("attention", "head_stats")

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.name = device
        self._switch_seen: Optional[str] = None

    def devices(self) -> Tuple[str, ...]:
        return (self.device,)

    def status(self) -> Tuple[bool, str]:
        # The cuda probe reads HEADSPARSE_ENABLE_UNVALIDATED_CUDA, a switch rather than a property of the machine:
        # probe again when it has changed since, so setting it after the first call takes effect.
        if self.device == "cuda" and _unvalidated_switch() != self._switch_seen:
            self._status, self._switch_seen = None, _unvalidated_switch()
        return super().status()

    def probe(self) -> Tuple[bool, str]:
        return cpu_status() if self.device == "cpu" else cuda_status()

    def limits(self, problem) -> List[str]:
        if self.device == "cpu":  # every dtype; the attention kernels take head_dim <= 256
            if isinstance(problem, AttentionProblem) and problem.head_dim > 256:
                return [f"head_dim must be <= 256, got {problem.head_dim}"]
            return []
        reasons = []
        if problem.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"compiled CUDA kernels support float16, bfloat16 and float32, not {str(problem.dtype).removeprefix('torch.')}")
        if isinstance(problem, AttentionProblem) and problem.head_dim > 256:
            reasons.append(f"compiled CUDA kernels support head_dim <= 256, got {problem.head_dim}")
        return reasons

    def forward(self, q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
        return get().attn_forward(q, k, v, _idx(q_idx), _idx(kv_idx), _idx(mask_idx), mask, bool(causal),
                                  float(scale), out)

    def backward(self, do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats):
        dq, dk, dv = get().attn_backward(do, q, k, v, o, lse, _idx(kv_pos), _idx(mask_idx), mask, bool(causal),
                                         float(scale), stats)
        return dq, dk, dv

    def head_stats(self, x, g, num_heads, token_mask):
        xg, x_sq, g_sq, abs_x, abs_g = get().head_stats(x, g, num_heads, token_mask)
        if g is None:
            return None, x_sq, None, abs_x, None
        return xg, x_sq, g_sq, abs_x, abs_g

    def gram(self, x, token_mask):
        return get().gram(x, token_mask)


CPU = CompiledBackend("cpu")
CUDA = CompiledBackend("cuda")


def uses_tensor_cores(like: torch.Tensor, head_dim: int) -> Tuple[bool, bool]:
    """(forward, backward): whether ``cuda`` backend calls on ``like``'s CUDA device, dtype and ``head_dim`` run
    the tensor-core kernels (fp16/bf16, head_dim a multiple of 16 up to 128, sm_80+, enough shared memory,
    ``HEADSPARSE_CUDA_TENSOR_CORES`` not 0) rather than the CUDA-core ones."""
    return tuple(get().cuda_uses_tensor_cores(like, int(head_dim)))
