"""The compiled extension ``headsparse._C``: its loader and its two backends, ``cpu`` and ``cuda``.

The extension is loaded lazily, on first use, and never at ``import
headsparse``. It is compiled just in time against the running torch
(``_build.py``: ``torch.utils.cpp_extension.load`` into a cache directory per
Python and torch version), or ahead of time with ``HEADSPARSE_BUILD_EXT=1 pip
install --no-build-isolation``, whose build record is checked against the
running torch before the library is imported. A missing compiler, a build for
another torch or a stale build only makes the ``cpu`` and ``cuda`` backends
(attention and head statistics) unusable, with a reason that says how to
rebuild. See docs/extension.md for the build.

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

import glob
import importlib
import json
import os
import sys
import threading
from typing import List, Optional, Tuple

import torch

from . import _build
from .backend import Backend
from .problem import AttentionProblem

# Must equal HEADSPARSE_ABI_VERSION in csrc/bind.cpp.
ABI_VERSION = 2

_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_loaded = False
#: set when nothing is built yet for this torch but it can be: (with_cuda, why); get() compiles it
_pending: Optional[Tuple[bool, str]] = None
#: why an ahead-of-time build beside the package was not used (another torch, ...), added to the reasons
_aot_note = ""

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SRC_DIR = _build.source_dir() or os.path.join(os.path.dirname(_PKG_DIR), "csrc")
_REBUILD = "`headsparse build-ext` compiles it for this torch"


def _aot_library() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(_PKG_DIR, "_C.*.so")) + glob.glob(os.path.join(_PKG_DIR, "_C.*.pyd")))
    return found[0] if found else None


def _try_aot() -> Tuple[object, str]:
    """(module, "") for an ahead-of-time ``headsparse._C`` built for this torch, else (None, why it is not used;
    "" when there is none). The record written beside it at build time is checked before the library is
    imported: a library built for another torch may not even fail cleanly when imported."""
    lib = _aot_library()
    if lib is None:
        return None, ""
    name = os.path.basename(lib)
    try:
        with open(os.path.join(_PKG_DIR, _build.RECORD_NAME)) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None, (f"{name} beside the package was ignored: it has no build record (an old build, or not "
                      f"built by this version's setup.py); delete it, or rebuild with HEADSPARSE_BUILD_EXT=1 "
                      f"pip install --no-build-isolation")
    why = _build.record_mismatch(record, torch)
    if why:
        return None, (f"{name} beside the package was ignored: {why}; rebuild it with HEADSPARSE_BUILD_EXT=1 "
                      f"pip install --no-build-isolation (or delete it: {_REBUILD})")
    try:
        mod = importlib.import_module("headsparse._C")
    except ImportError as exc:
        return None, f"{name} failed to load ({exc.__class__.__name__}: {exc}); {_REBUILD}"
    return mod, ""


def _accept(mod) -> None:
    global _module, _error
    abi = getattr(mod, "ABI_VERSION", None)
    if abi != ABI_VERSION:
        _error = f"stale extension build (ABI {abi}, this Python code expects {ABI_VERSION}); {_REBUILD}"
        return
    _module = mod


def _load() -> None:
    """Find a usable build without compiling anything: an ahead-of-time one for this torch, else this torch's
    just-in-time build if it exists; otherwise note whether get() can compile one (and why not)."""
    global _error, _loaded, _pending, _aot_note
    with _lock:
        if _loaded:
            return
        _loaded = True
        if _build.truthy("HEADSPARSE_SKIP_EXT"):
            _error = "extension disabled (HEADSPARSE_SKIP_EXT=1)"
            return
        try:
            try:  # first: HEADSPARSE_FORCE_CUDA=1 where it cannot work is an error whatever is built
                plan = _build.cuda_plan(torch)
            except _build.BuildError as exc:
                _error = str(exc)
                return
            mod, _aot_note = _try_aot()
            if mod is not None:
                _accept(mod)
                return
            if _build.built_library(torch, plan[0]):  # built before: ninja rebuilds only what changed
                try:
                    _accept(_build.jit_load(torch, plan[0]))
                except _build.BuildError as exc:
                    _error = str(exc)
                return
            missing = _build.missing_tools(plan[0])
            if missing:
                _error = "extension not built and cannot be compiled here: " + "; ".join(missing)
                return
            _pending = plan
        except Exception as exc:  # pragma: no cover - unexpected loader failure
            _error = f"extension failed to load ({exc.__class__.__name__}: {exc})"


def build(verbose: bool = False):
    """Compile the extension for the running torch now (a no-op when it is up to date) and load it; returns the
    module. Raises RuntimeError with one line when it cannot. What ``headsparse build-ext`` runs."""
    global _pending, _error, _loaded
    _load()
    with _lock:
        if _module is not None:
            return _module
        if _pending is None:
            raise RuntimeError(f"headsparse._C is unusable: {_error}")
        with_cuda, why = _pending
        print(f"[headsparse] compiling the C++{'/CUDA' if with_cuda else ''} extension for torch "
              f"{torch.__version__} into {_build.build_dir(torch, with_cuda)} (once per torch version; about a "
              f"minute{', more with CUDA' if with_cuda else ''})", file=sys.stderr, flush=True)
        _pending = None
        try:
            _accept(_build.jit_load(torch, with_cuda, verbose=verbose))
        except _build.BuildError as exc:
            _error = str(exc)
    for backend in (CPU, CUDA):  # their cached status said "compiled on first use" (or, on failure, usable)
        backend.reset_status()
    if _module is None:
        raise RuntimeError(f"headsparse._C is unusable: {_error}")
    return _module


def get():
    """The loaded extension module, compiled first if this torch has no build yet; raises RuntimeError with the
    reason if unusable."""
    _load()
    if _module is None and _pending is not None:
        return build()
    if _module is None:
        raise RuntimeError(f"headsparse._C is unusable: {_error}")
    return _module


def _note() -> str:
    return f" (note: {_aot_note})" if _aot_note else ""


def status() -> Tuple[bool, str]:
    """(usable, reason). Usable also when nothing is built yet but it can be compiled on first use."""
    _load()
    if _module is None and _pending is not None:
        with_cuda, why = _pending
        return True, (f"not compiled yet for torch {torch.__version__}: compiled on first use "
                      f"({'C++ and CUDA' if with_cuda else 'C++ only'}, about a minute, cached in "
                      f"{_build.build_dir(torch, with_cuda)}); `headsparse build-ext` compiles it now" + _note())
    if _module is None:
        return False, str(_error) + _note()
    where = getattr(_module, "__file__", "?")
    kind = "headsparse._C" if _module.__name__ == "headsparse._C" else f"headsparse._C (compiled for torch " \
        f"{torch.__version__})"
    note = _staleness_note(where) if _module.__name__ == "headsparse._C" else ""
    return True, f"{kind} at {where}" + note + _note()


def with_cuda() -> bool:
    _load()
    if _module is None:
        return _pending is not None and _pending[0]
    return bool(_module.with_cuda())


def _staleness_note(so_path: str) -> str:
    """A note when a source in csrc/ is newer than an ahead-of-time built library (editable installs)."""
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
        if _module is None and _pending is not None:
            return False, f"the extension would be compiled without CUDA here ({_pending[1]})"
        return False, "extension built without CUDA (CPU-only torch, no nvcc or no GPU at build time)"
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
