"""The CUDA kernels of csrc/cuda, compiled for the CPU emulator in tests/cuda_emu and driven through ctypes.

``build()`` compiles csrc/cuda/*.cu with g++ against tests/cuda_emu/hs_cuda_emu.h
(cached by source hash). ``forward``/``backward`` have the contract of
:class:`headsparse.ops.extension.CompiledBackend` (``forward``, ``backward``) and fill the kernels' parameter structs the
way csrc/bind.cpp does, so the module can be registered as an attention
backend ("cuda_emu") and run through the shared suites on CPU tensors.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(ROOT, "tests", "cuda_emu")
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.h")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh"))
                 + glob.glob(os.path.join(EMU_DIR, "*.h")))
ENTRY = os.path.join(EMU_DIR, "entry.cpp")
SELFTEST = os.path.join(EMU_DIR, "selftest.cpp")


def compiler() -> Optional[str]:
    return shutil.which("g++")


def _compile_one(src: str, obj: str) -> subprocess.Popen:
    cmd = ["g++", "-std=c++20", "-O2", "-fPIC", "-DHS_CUDA_EMULATION=1", "-Wno-unknown-pragmas",
           "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", f"-I{EMU_DIR}", f"-I{os.path.join(ROOT, 'csrc')}", "-x", "c++", "-c", src, "-o", obj]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def build() -> str:
    """Compile (once per source version) and return the shared library's path."""
    digest = hashlib.sha256()
    digest.update(subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.encode())
    for path in CUDA_SOURCES + HEADERS + [ENTRY, SELFTEST, __file__]:
        with open(path, "rb") as fh:
            digest.update(path.encode() + fh.read())
    out_dir = os.path.join(tempfile.gettempdir(), f"headsparse-cuda-emu-{os.getuid()}-{digest.hexdigest()[:16]}")
    lib = os.path.join(out_dir, "libhs_cuda_emu.so")
    if os.path.isfile(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    srcs = CUDA_SOURCES + [ENTRY, SELFTEST]
    objs = [os.path.join(out_dir, os.path.basename(s) + f".{os.getpid()}.o") for s in srcs]
    procs = [_compile_one(s, o) for s, o in zip(srcs, objs)]
    errors = []
    for src, proc in zip(srcs, procs):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(f"{src}:\n{out}")
    if errors:
        raise RuntimeError("emulated CUDA build failed:\n" + "\n".join(errors))
    tmp = lib + f".{os.getpid()}.tmp"
    res = subprocess.run(["g++", "-shared", "-o", tmp, *objs], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("emulated CUDA link failed:\n" + res.stdout + res.stderr)
    os.replace(tmp, lib)  # atomic: a concurrent build sees a whole library or none
    return lib


# ---------------------------------------------------------------- ctypes mirrors of csrc/cuda/hs_cuda.h

c_i64p = ctypes.POINTER(ctypes.c_int64)
c_f32p = ctypes.POINTER(ctypes.c_float)


class Strided4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("s0", ctypes.c_int64), ("s1", ctypes.c_int64), ("s2", ctypes.c_int64),
                ("s3", ctypes.c_int64)]


class AttnFwdParams(ctypes.Structure):
    _fields_ = [("q", Strided4), ("k", Strided4), ("v", Strided4), ("out", Strided4), ("mask", Strided4),
                ("mask_kind", ctypes.c_int), ("heads", ctypes.c_void_p), ("kv_heads", ctypes.c_void_p),
                ("mask_heads", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("B", ctypes.c_int), ("P", ctypes.c_int),
                ("Sq", ctypes.c_int), ("Skv", ctypes.c_int), ("D", ctypes.c_int), ("causal", ctypes.c_int),
                ("scale", ctypes.c_float), ("dtype", ctypes.c_int)]


class AttnBwdParams(ctypes.Structure):
    _fields_ = [("dout", Strided4), ("q", Strided4), ("o", Strided4), ("k", Strided4), ("v", Strided4),
                ("lse", ctypes.c_void_p), ("lse_s0", ctypes.c_int64), ("lse_s1", ctypes.c_int64),
                ("lse_s2", ctypes.c_int64), ("mask", Strided4), ("mask_kind", ctypes.c_int),
                ("kv_pos", ctypes.c_void_p), ("mask_heads", ctypes.c_void_p), ("stats", ctypes.c_void_p),
                ("delta", ctypes.c_void_p), ("dq_accum", ctypes.c_void_p), ("dk", ctypes.c_void_p),
                ("dv", ctypes.c_void_p), ("B", ctypes.c_int), ("G", ctypes.c_int), ("R", ctypes.c_int),
                ("Sq", ctypes.c_int), ("Skv", ctypes.c_int), ("D", ctypes.c_int), ("causal", ctypes.c_int),
                ("scale", ctypes.c_float), ("dtype", ctypes.c_int)]


class HeadStatsParams(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("xs0", ctypes.c_int64), ("xs1", ctypes.c_int64), ("xs2", ctypes.c_int64),
                ("g", ctypes.c_void_p), ("gs0", ctypes.c_int64), ("gs1", ctypes.c_int64), ("gs2", ctypes.c_int64),
                ("token_mask", ctypes.c_void_p), ("ms0", ctypes.c_int64), ("ms1", ctypes.c_int64),
                ("xg", ctypes.c_void_p), ("xx", ctypes.c_void_p), ("gg", ctypes.c_void_p), ("abs_x", ctypes.c_void_p),
                ("abs_g", ctypes.c_void_p), ("B", ctypes.c_int), ("S", ctypes.c_int), ("C", ctypes.c_int),
                ("H", ctypes.c_int), ("dtype", ctypes.c_int)]


class GramParams(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("xs0", ctypes.c_int64), ("xs1", ctypes.c_int64), ("xs2", ctypes.c_int64),
                ("token_mask", ctypes.c_void_p), ("ms0", ctypes.c_int64), ("ms1", ctypes.c_int64),
                ("out", ctypes.c_void_p), ("B", ctypes.c_int), ("S", ctypes.c_int), ("C", ctypes.c_int),
                ("dtype", ctypes.c_int)]


_STRUCTS = (AttnFwdParams, AttnBwdParams, HeadStatsParams, GramParams)
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MASK_KINDS = {torch.bool: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4, torch.float64: 5}

_lib = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        handle = ctypes.CDLL(build())
        handle.hs_emu_error.restype = ctypes.c_char_p
        handle.hs_emu_launch_name.restype = ctypes.c_char_p
        handle.hs_emu_sizeof.restype = ctypes.c_size_t
        for i, struct in enumerate(_STRUCTS):
            size = handle.hs_emu_sizeof(i)
            if size != ctypes.sizeof(struct):
                raise RuntimeError(f"ctypes mirror of {struct.__name__} has {ctypes.sizeof(struct)} B, C++ has {size} B")
        _lib = handle
    return _lib


SELFTESTS = {1: "missing __syncthreads", 2: "missing __syncwarp after a fragment store",
             3: "misaligned WMMA pointer", 4: "divergent __syncthreads", 5: "shared-memory overrun",
             6: "shared memory over 48 KiB without the opt-in",
             7: "missing __syncwarp before a lane-strided read-back of a fragment"}


def selftest(which: int) -> bool:
    """Entry 0: the planted kernels are right when written right; others: the planted bug was flagged."""
    return lib().hs_emu_selftest(which) == 0


def configure(cc_major: int = 9, cc_minor: int = 0, smem_optin: int = 232448, binary_arch: Optional[int] = None):
    """The emulated device (default: an H100/H200, sm_90 with 227 KiB opt-in shared memory per block).

    ``binary_arch``: the architecture the kernel binary was built for (default: the device's).
    """
    arch = cc_major * 10 + cc_minor if binary_arch is None else binary_arch
    lib().hs_emu_configure(cc_major, cc_minor, smem_optin, arch)


def uses_tensor_cores(dtype: torch.dtype, head_dim: int) -> tuple:
    """(forward, backward) answer of attn_{forward,backward}_uses_tensor_cores on the emulated device."""
    return tuple(bool(lib().hs_emu_uses_tensor_cores(_DTYPES[dtype], head_dim, bwd)) for bwd in (0, 1))


_launched: List[str] = []


def launched() -> List[str]:
    """Kernels launched by the calls since the last ``clear_launched()``, in order."""
    return list(_launched)


def clear_launched() -> None:
    _launched.clear()


def _call(fn_name: str, params) -> None:
    L = lib()
    L.hs_emu_reset()
    rc = getattr(L, fn_name)(ctypes.byref(params))
    _launched.extend(L.hs_emu_launch_name(i).decode() for i in range(L.hs_emu_launch_count()))
    err = L.hs_emu_error().decode()
    if rc != 0 or err:
        raise RuntimeError(f"headsparse (cuda, emulated): {fn_name} returned {rc}: {err}")


def _strided4(t: Optional[torch.Tensor]) -> Strided4:
    if t is None:
        return Strided4(None, 0, 0, 0, 0)
    assert t.dim() == 4 and t.device.type == "cpu"
    return Strided4(t.data_ptr(), *t.stride())


def _dtype(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPES:
        raise TypeError(f"headsparse (cuda): supports float16, bfloat16 and float32, got {t.dtype}")
    return _DTYPES[t.dtype]


def _mask(mask: Optional[torch.Tensor]):
    if mask is None:
        return Strided4(None, 0, 0, 0, 0), 0
    return _strided4(mask), _MASK_KINDS[mask.dtype]


def forward(q, k, v, q_idx, kv_idx, mask_idx, mask, causal, scale, out) -> torch.Tensor:
    """Like csrc/bind.cpp's cuda_attn_forward: writes out[:, q_idx], returns lse (B, P, Sq) fp32."""
    h, hk, hm = (t.to(torch.int64).contiguous() for t in (q_idx, kv_idx, mask_idx))
    P = h.numel()
    lse = torch.full((q.shape[0], P, q.shape[2]), float("nan"), dtype=torch.float32)  # NaN: unwritten shows
    p = AttnFwdParams()
    p.q, p.k, p.v, p.out = (_strided4(t) for t in (q, k, v, out))
    p.mask, p.mask_kind = _mask(mask)
    p.heads, p.kv_heads, p.mask_heads = h.data_ptr(), hk.data_ptr(), hm.data_ptr()
    p.lse = lse.data_ptr()
    p.B, p.P, p.Sq, p.Skv, p.D = q.shape[0], P, q.shape[2], k.shape[2], q.shape[3]
    p.causal, p.scale, p.dtype = int(bool(causal)), float(scale), _dtype(q)
    _call("hs_emu_attn_forward", p)
    return lse


def backward(do, q, k, v, o, lse, kv_pos, mask_idx, mask, causal, scale, stats: Optional[torch.Tensor]):
    """Like csrc/bind.cpp's cuda_attn_backward: returns (dq, dk, dv) of the compact heads."""
    lse = lse.to(torch.float32)
    kp, hm = (t.to(torch.int64).contiguous() for t in (kv_pos, mask_idx))
    B, G, Sq, D = q.shape
    R, Skv = k.shape[1], k.shape[2]
    dq32 = torch.zeros(B, G, Sq, D, dtype=torch.float32)
    # NaN where bind.cpp has empty(): an element a kernel forgets to write fails the comparison
    delta = torch.full((B, G, Sq), float("nan"), dtype=torch.float32)
    dk = torch.full((B, R, Skv, D), float("nan"), dtype=q.dtype)
    dv = torch.full((B, R, Skv, D), float("nan"), dtype=q.dtype)
    stats32 = None
    if stats is not None:
        stats32 = (stats if stats.dtype == torch.float32 and stats.is_contiguous()
                   else torch.zeros(B, G, dtype=torch.float32))
    p = AttnBwdParams()
    p.dout, p.q, p.o, p.k, p.v = (_strided4(t) for t in (do, q, o, k, v))
    p.lse = lse.data_ptr()
    p.lse_s0, p.lse_s1, p.lse_s2 = lse.stride()
    p.mask, p.mask_kind = _mask(mask)
    p.kv_pos, p.mask_heads = kp.data_ptr(), hm.data_ptr()
    p.stats = stats32.data_ptr() if stats32 is not None else None
    p.delta, p.dq_accum, p.dk, p.dv = delta.data_ptr(), dq32.data_ptr(), dk.data_ptr(), dv.data_ptr()
    p.B, p.G, p.R, p.Sq, p.Skv, p.D = B, G, R, Sq, Skv, D
    p.causal, p.scale, p.dtype = int(bool(causal)), float(scale), _dtype(q)
    _call("hs_emu_attn_backward", p)
    if stats32 is not None and stats32 is not stats:
        stats.add_(stats32.to(stats.dtype))
    return dq32.to(q.dtype), dk, dv


def head_stats(x, g, num_heads, token_mask=None):
    """(xg, xx, gg, abs_x, abs_g) like csrc/bind.cpp's cuda_head_stats (xg, gg, abs_g are None without g)."""
    B, S, C = x.shape
    f = torch.float32
    xg, xx, gg = torch.zeros(B, num_heads, dtype=f), torch.zeros(B, num_heads, dtype=f), torch.zeros(B, num_heads, dtype=f)
    abs_x, abs_g = torch.zeros(C, dtype=f), torch.zeros(C, dtype=f)
    p = HeadStatsParams()
    p.x, (p.xs0, p.xs1, p.xs2) = x.data_ptr(), x.stride()
    if g is not None:
        p.g, (p.gs0, p.gs1, p.gs2) = g.data_ptr(), g.stride()
    if token_mask is not None:
        m = token_mask.to(torch.bool)
        p.token_mask, (p.ms0, p.ms1) = m.data_ptr(), m.stride()
    p.xg, p.xx, p.gg, p.abs_x, p.abs_g = (t.data_ptr() for t in (xg, xx, gg, abs_x, abs_g))
    p.B, p.S, p.C, p.H, p.dtype = B, S, C, num_heads, _dtype(x)
    _call("hs_emu_head_stats", p)
    if g is None:
        return None, xx, None, abs_x, None
    return xg, xx, gg, abs_x, abs_g


def gram(x, token_mask=None):
    B, S, C = x.shape
    out = torch.empty(C, C, dtype=torch.float32)
    p = GramParams()
    p.x, (p.xs0, p.xs1, p.xs2) = x.data_ptr(), x.stride()
    if token_mask is not None:
        m = token_mask.to(torch.bool)
        p.token_mask, (p.ms0, p.ms1) = m.data_ptr(), m.stride()
    p.out = out.data_ptr()
    p.B, p.S, p.C, p.dtype = B, S, C, _dtype(x)
    _call("hs_emu_gram", p)
    return out
