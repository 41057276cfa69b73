"""Build script for headsparse.

By default nothing is compiled: the wheel is pure Python and carries the C++/CUDA
sources (``csrc/``, installed as ``headsparse/_csrc``). The extension is compiled
just in time against the torch that runs it, on first use of the ``cpu``/``cuda``
backends or by ``headsparse build-ext`` (see headsparse/ops/_build.py and
docs/extension.md).

``HEADSPARSE_BUILD_EXT=1`` compiles ``headsparse._C`` at install time instead
(no ninja needed), against the installed torch, so it needs
``pip install --no-build-isolation``; the build records that torch beside the
library and the loader refuses the library once torch has changed. The CUDA part
is added when torch has CUDA, nvcc is found and a GPU is visible or
``TORCH_CUDA_ARCH_LIST`` is set, or with ``HEADSPARSE_FORCE_CUDA=1``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_helpers():
    """headsparse/ops/_build.py, loaded by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_headsparse_build", os.path.join(ROOT, "headsparse", "ops",
                                                                                     "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_B = _build_helpers()


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package as headsparse/_csrc, where the just-in-time build finds it. An editable
    install skips this: the loader reads the checkout's csrc/ directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = os.path.join(ROOT, "csrc")
        dst = os.path.join(self.build_lib, "headsparse", "_csrc")
        for rel in _B.source_files(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))


class SdistWithoutEggInfo(sdist):
    """The sdist without setuptools' headsparse.egg-info/ (PKG-INFO at the top is the metadata; a wheel build
    writes its own egg-info)."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, [f for f in files if not f.split("/")[0].endswith(".egg-info")])


def _license():
    """Apache-2.0 as an SPDX expression (License-Expression) where setuptools takes one (77+), else the older
    License field: pyproject.toml's ``license`` would fail on setuptools < 77, which a --no-build-isolation install
    may meet."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


os.chdir(ROOT)
cmdclass = {"build_py": BuildPyWithSources, "sdist": SdistWithoutEggInfo}
ext_modules = []
if _B.truthy("HEADSPARSE_BUILD_EXT") and not _B.truthy("HEADSPARSE_SKIP_EXT"):
    try:
        ext_modules, ext_cmd = _B.aot_extension(ROOT)
    except _B.BuildError as exc:
        sys.exit(f"headsparse: {exc}")
    cmdclass.update(ext_cmd)
setup(ext_modules=ext_modules, cmdclass=cmdclass, **_license())
