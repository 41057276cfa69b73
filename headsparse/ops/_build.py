"""Building the compiled extension against the torch that runs it.

headsparse compiles ``csrc/`` just in time, as DeepSpeed does its ops: on first
use of the ``cpu`` or ``cuda`` backend (or ``headsparse build-ext``),
``torch.utils.cpp_extension.load`` builds it with ninja (without ninja:
setuptools and torch's BuildExtension, one file after another) into a cache
directory keyed by the Python version, the torch version and whether CUDA is
compiled in, so a different torch never loads a library built for another one. ``pip
install`` builds nothing by default (the wheel is pure Python and carries the
sources); ``HEADSPARSE_BUILD_EXT=1`` with ``--no-build-isolation`` compiles it
at install time instead, against the installed torch, and records that torch
beside the library so the loader can refuse it after torch changes.

This module imports only the standard library at module level: ``setup.py``
loads it by path, before anything (torch included) may be importable.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

JIT_NAME = "headsparse_C"
#: the record that an ahead-of-time build (HEADSPARSE_BUILD_EXT=1) leaves beside ``headsparse/_C*.so``
RECORD_NAME = "_C.build.json"
DEFAULT_ARCH_LIST = "8.0;9.0"
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: every file the build reads (sources and headers), relative to the source directory
SOURCE_PATTERNS = ("*.cpp", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h")


class BuildError(RuntimeError):
    """The extension cannot be built here; the message is one sentence that says what to do."""


def truthy(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def cache_root() -> str:
    return os.environ.get("HEADSPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "headsparse")


def source_dir() -> Optional[str]:
    """``csrc/``: inside an installed package (``headsparse/_csrc``, put there by the wheel build), else the source
    checkout's ``csrc/`` (editable installs); None if neither has ``bind.cpp``."""
    for cand in (os.path.join(_PKG_DIR, "_csrc"), os.path.join(os.path.dirname(_PKG_DIR), "csrc")):
        if os.path.isfile(os.path.join(cand, "bind.cpp")):
            return cand
    return None


def source_files(src: str) -> List[str]:
    """Every file of ``src`` that the build reads, relative paths, sorted."""
    out = set()
    for pat in SOURCE_PATTERNS:
        out.update(os.path.relpath(p, src) for p in glob.glob(os.path.join(src, pat)))
    return sorted(out)


def find_cuda_home() -> Optional[str]:
    """CUDA_HOME from the user, else the toolkit that nvcc really belongs to (``/usr/local/bin/nvcc`` may be a
    wrapper script such as ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), else ``/usr/local/cuda``."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
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


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def _flag_works(flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as fh:
            fh.write("int main() { return 0; }\n")
        try:
            res = subprocess.run([compiler(), flag, src, "-o", os.path.join(tmp, "t")], capture_output=True,
                                 timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def flags() -> Tuple[List[str], List[str]]:
    """(C++ compile flags, link flags): -O3 without debug info, OpenMP when the compiler takes it, and
    -march=native with HEADSPARSE_CPU_NATIVE=1 (faster CPU kernels that then run only on CPUs like this one)."""
    cxx, link = ["-O3", "-g0"], []
    if truthy("HEADSPARSE_CPU_NATIVE"):
        cxx.append("-march=native")
    if _flag_works("-fopenmp"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    return cxx, link


def cuda_plan(torch) -> Tuple[bool, str]:
    """(compile the CUDA part?, why) for this torch and machine; BuildError where HEADSPARSE_FORCE_CUDA=1 cannot
    work. Without the switch CUDA is compiled when torch has CUDA, nvcc is found, and a GPU is visible or
    TORCH_CUDA_ARCH_LIST names the architectures; so a machine without a GPU compiles no CUDA code."""
    cuda_home = find_cuda_home()
    if truthy("HEADSPARSE_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise BuildError(f"HEADSPARSE_FORCE_CUDA=1 cannot work with torch {torch.__version__}, a CPU-only build "
                             "with no CUDA libraries to link against: install a CUDA build of torch or unset "
                             "HEADSPARSE_FORCE_CUDA")
        if cuda_home is None:
            raise BuildError("HEADSPARSE_FORCE_CUDA=1 but no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME "
                             "unset): install the CUDA toolkit or set CUDA_HOME")
        return True, "HEADSPARSE_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if cuda_home is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    if not (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        return False, "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (HEADSPARSE_FORCE_CUDA=1 compiles it)"
    return True, f"CUDA_HOME={cuda_home}"


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported with CUDA_HOME pointing at the real toolkit when the user did not set
    it (torch reads it once, at import, and otherwise guesses from nvcc's directory, warning when that fails)."""
    if "torch.utils.cpp_extension" not in sys.modules and not os.environ.get("CUDA_HOME"):
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    return cpp_extension


def _use_cuda_home(cpp_extension) -> None:
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        # torch fixes its CUDA_HOME when cpp_extension is imported, from nvcc's directory: behind a wrapper script
        # (/usr/local/bin/nvcc) that is /usr/local, which has no CUDA headers. Use the real toolkit instead.
        torch_home = cpp_extension.CUDA_HOME
        if torch_home is None or not os.path.isfile(os.path.join(torch_home, "include", "cuda_runtime.h")):
            cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST


def build_dir(torch, with_cuda: bool) -> str:
    """The JIT cache directory of this Python, torch and CUDA choice."""
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
    return os.path.join(cache_root(), "ext", tag.replace(os.sep, "_"))


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv used without activating it has the pip package's binary beside its
    Python (or in the ``ninja`` module's BIN_DIR), so put that directory on PATH."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package

        dirs.append(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    for d in dirs:
        if d and os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def missing_tools(with_cuda: bool) -> List[str]:
    """What the JIT build needs and this machine lacks, one phrase each."""
    cpp_extension = _cpp_extension()

    _ninja_on_path()
    out = []
    if source_dir() is None:
        out.append("the C++ sources are not installed (headsparse/_csrc is missing: reinstall headsparse)")
    if shutil.which(compiler()) is None:
        out.append(f"no C++ compiler ({compiler()!r} is not on PATH: install g++ or set CXX)")
    return out


def built_library(torch, with_cuda: bool) -> Optional[str]:
    """The library in this torch's cache directory that this machine's build would produce: ninja's
    ``headsparse_C.so``, or without ninja the setuptools fallback's ``headsparse_C.<python tag>.so``."""
    cpp_extension = _cpp_extension()

    _ninja_on_path()
    d = build_dir(torch, with_cuda)
    pattern = JIT_NAME + (".so" if cpp_extension.is_ninja_available() else ".*.so")
    found = sorted(glob.glob(os.path.join(d, pattern)))
    return found[0] if found else None


def _setuptools_build(sources, depends, cxx, link, cuda_flags, with_cuda, out, verbose):
    """Without ninja: the same extension through setuptools and torch's BuildExtension (sequential compiles; only
    what is older than its sources or headers), into ``out``, then imported from there."""
    import contextlib
    import importlib.util

    from setuptools import Distribution
    cpp_extension = _cpp_extension()

    if with_cuda:
        ext = cpp_extension.CUDAExtension(JIT_NAME, sources, depends=depends, extra_link_args=link,
                                          extra_compile_args={"cxx": cxx, "nvcc": cuda_flags})
    else:
        ext = cpp_extension.CppExtension(JIT_NAME, sources, depends=depends, extra_link_args=link,
                                         extra_compile_args={"cxx": cxx})
    dist = Distribution({"name": JIT_NAME, "ext_modules": [ext],
                         "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp, cmd.inplace = out, os.path.join(out, "setuptools-tmp"), False
    log = os.path.join(out, "build.log")
    with open(log, "w") as fh, contextlib.ExitStack() as stack:
        if not verbose:  # the compiler writes to the file descriptors, not to sys.stdout
            saved = [os.dup(1), os.dup(2)]
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(fh.fileno(), 1), os.dup2(fh.fileno(), 2)

            def restore():
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                os.close(saved[0]), os.close(saved[1])

            stack.callback(restore)
        try:
            dist.run_command("build_ext")
        except BaseException as exc:  # distutils' CompileError/LinkError, SystemExit from setuptools
            raise RuntimeError(f"{exc.__class__.__name__}: {exc} (log: {log})") from None
    path = cmd.get_ext_fullpath(JIT_NAME)
    spec = importlib.util.spec_from_file_location(JIT_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def jit_load(torch, with_cuda: bool, verbose: bool = False):
    """Compile (ninja: only what changed) and import the extension; BuildError with one line on failure."""
    cpp_extension = _cpp_extension()

    missing = missing_tools(with_cuda)
    if missing:
        raise BuildError("cannot compile the extension: " + "; ".join(missing))
    src = source_dir()
    sources = [os.path.join(src, f) for f in source_files(src) if f.endswith((".cpp", ".cu"))]
    if not with_cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    cxx, link = flags()
    cuda_flags = []
    if with_cuda:
        _use_cuda_home(cpp_extension)
        cxx = cxx + ["-DHEADSPARSE_WITH_CUDA=1"]
        cuda_flags = ["-O3", "-DHEADSPARSE_WITH_CUDA=1"]
    out = build_dir(torch, with_cuda)
    os.makedirs(out, exist_ok=True)
    try:
        if cpp_extension.is_ninja_available():
            return cpp_extension.load(name=JIT_NAME, sources=sources, extra_cflags=cxx,
                                      extra_cuda_cflags=cuda_flags, extra_ldflags=link, build_directory=out,
                                      with_cuda=with_cuda, verbose=verbose)
        headers = [os.path.join(src, f) for f in source_files(src) if f.endswith((".h", ".cuh"))]
        return _setuptools_build(sources, headers, cxx, link, cuda_flags, with_cuda, out, verbose)
    except Exception as exc:  # compiler errors arrive as RuntimeError with the whole log
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        first = first.split(": [", 1)[0]  # ninja's "Error building extension 'x': [1/7] <command line>"
        raise BuildError(f"compiling the extension in {out} failed ({first}); rerun `headsparse build-ext "
                         "--verbose` for the compiler output") from None


# ------------------------------------------------------------ ahead of time (HEADSPARSE_BUILD_EXT=1, setup.py)


def build_record(torch, with_cuda: bool) -> Dict[str, object]:
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": with_cuda,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}


def record_mismatch(record: Dict[str, object], torch) -> Optional[str]:
    """Why an ahead-of-time build recorded as ``record`` cannot be loaded by this torch, or None."""
    now = build_record(torch, bool(record.get("with_cuda")))
    for key, what in (("torch", "torch"), ("torch_cuda", "torch's CUDA"), ("python", "Python")):
        if record.get(key) != now[key]:
            return f"built for {what} {record.get(key)}, running {what} {now[key]}"
    return None


def aot_extension(root: str):
    """(ext_modules, cmdclass) for setup.py with HEADSPARSE_BUILD_EXT=1: headsparse._C built against the torch of
    the build environment, which must be the installed one (pip install --no-build-isolation)."""
    try:
        import torch
        cpp_extension = _cpp_extension()
    except ImportError as exc:
        raise BuildError(f"HEADSPARSE_BUILD_EXT=1 compiles against the installed torch, but torch cannot be imported "
                         f"here ({exc}): install torch first, then pip install --no-build-isolation") from None
    if "pip-build-env-" in (torch.__file__ or ""):
        raise BuildError(f"HEADSPARSE_BUILD_EXT=1 found torch {torch.__version__} in pip's isolated build "
                         "environment, not the installed one: add --no-build-isolation")
    if shutil.which(compiler()) is None:
        raise BuildError(f"HEADSPARSE_BUILD_EXT=1 needs a C++ compiler ({compiler()!r} is not on PATH): install g++ "
                         "or set CXX, or install without HEADSPARSE_BUILD_EXT (the extension then compiles on first "
                         "use)")
    with_cuda, why = cuda_plan(torch)
    cxx, link = flags()
    src = os.path.join(root, "csrc")
    rel = [os.path.join("csrc", f) for f in source_files(src) if f.endswith(".cpp")]
    print(f"[headsparse setup] building headsparse._C against torch {torch.__version__} "
          f"({'with CUDA: ' if with_cuda else 'C++ only: '}{why})", file=sys.stderr)
    if with_cuda:
        _use_cuda_home(cpp_extension)
        rel += [os.path.join("csrc", f) for f in source_files(src) if f.endswith(".cu")]
        ext = cpp_extension.CUDAExtension("headsparse._C", rel, define_macros=[("HEADSPARSE_WITH_CUDA", "1")],
                                          extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("headsparse._C", rel, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)
    record = build_record(torch, with_cuda)

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            super().run()
            for e in self.extensions:  # the record the loader checks against the running torch
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(e.name)), RECORD_NAME)
                with open(path, "w") as fh:
                    json.dump(record, fh)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}
