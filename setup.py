"""Build script for headsparse.

The pure-Python package (torch reference + Triton kernels) always installs. The
compiled extension ``headsparse._C`` (``csrc/``) is built as follows:

* C++ (CPU kernels, ``csrc/cpu`` + ``csrc/bind.cpp``): always, with -O3 and
  OpenMP when the compiler supports it.
* CUDA (``csrc/cuda/*.cu``): added when torch has CUDA and nvcc is found, or
  when ``HEADSPARSE_FORCE_CUDA=1``. ``TORCH_CUDA_ARCH_LIST`` is honoured
  (default "8.0;9.0"). ``CUDA_HOME`` is taken from the environment or derived
  from nvcc's real toolkit (``/usr/local/bin/nvcc`` may be a wrapper script).
* ``HEADSPARSE_SKIP_EXT=1``: no extension at all (pure Python).
* ``HEADSPARSE_CPU_NATIVE=1``: compile the C++ kernels with -march=native (not portable).

It must keep working with ``pip install --no-build-isolation --no-deps -e .``
(the venv's torch is used to build).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[headsparse setup] {msg}", file=sys.stderr)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _find_cuda_home():
    """CUDA_HOME from the user, else the toolkit that nvcc really belongs to."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script such as "exec /usr/local/cuda-13.0/bin/nvcc "$@""
            with open(real, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode("utf-8", "replace").split():
                    tok = tok.strip("\"'")
                    if tok.endswith("/bin/nvcc") and os.path.isfile(tok):
                        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(tok))))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if os.path.isfile(os.path.join(cand, "bin", "nvcc")) and os.path.isfile(
            os.path.join(cand, "include", "cuda_runtime.h")
        ):
            return cand
    return None


def _compiler_flag_works(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as fh:
            fh.write("int main() { return 0; }\n")
        try:
            res = subprocess.run([cxx, flag, src, "-o", os.path.join(tmp, "t")], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def _extensions():
    if _truthy("HEADSPARSE_SKIP_EXT"):
        _log("HEADSPARSE_SKIP_EXT=1: building the pure-Python package only (no headsparse._C)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(
            f"headsparse: no C++ compiler found ({cxx!r} is not on PATH). Install g++/clang++ or set CXX, "
            "or install without the compiled extension with HEADSPARSE_SKIP_EXT=1."
        )
    force_cuda = _truthy("HEADSPARSE_FORCE_CUDA")
    cuda_home = _find_cuda_home()
    if cuda_home and (force_cuda or "CUDA_HOME" not in os.environ):
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    with_cuda = (torch.version.cuda is not None and cuda_home is not None) or force_cuda
    if with_cuda and cuda_home is None:
        raise RuntimeError("headsparse: HEADSPARSE_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if with_cuda and cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = cuda_home  # CPU torch never sets it (see docs/extension.md)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    # -g0: no debug info (Python's CFLAGS add -g, which slows the build). The C++ standard is torch's choice.
    cxx_flags = ["-O3", "-g0"]
    if _truthy("HEADSPARSE_CPU_NATIVE"):  # faster CPU kernels, but the build only runs on CPUs like this one
        cxx_flags.append("-march=native")
    link_flags = []
    if _compiler_flag_works("-fopenmp"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    else:
        _log("the C++ compiler does not accept -fopenmp: CPU kernels build without OpenMP (single-threaded)")
    sources = ["csrc/bind.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        _log(f"building headsparse._C with CUDA (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = cpp_extension.CUDAExtension(
            "headsparse._C",
            sources,
            define_macros=[("HEADSPARSE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found"
        _log(f"building headsparse._C for CPU only ({why}; set HEADSPARSE_FORCE_CUDA=1 to force the CUDA part)")
        ext = cpp_extension.CppExtension(
            "headsparse._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


os.chdir(ROOT)
ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
