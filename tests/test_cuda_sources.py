"""Every csrc/cuda/*.cu compiles standalone with nvcc for sm_80 and sm_90 (compile only, no GPU).

The .cu files include no torch headers, so this takes about a second per file
and arch. Skipped only if nvcc is not installed.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()


def test_cuda_sources_exist():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"attention.cu", "head_stats.cu"} <= names


def test_cuda_sources_include_no_torch_headers():
    for path in glob.glob(os.path.join(CUDA_DIR, "*")):
        with open(path) as fh:
            text = fh.read()
        for banned in ("torch/", "ATen/", "c10/", "pybind11"):
            assert f"#include <{banned}" not in text, f"{path} includes {banned} headers"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, arch, tmp_path):
    obj = tmp_path / (os.path.basename(source) + f".{arch}.o")
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-O1", "-Werror", "all-warnings", "-c", source, "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    assert obj.stat().st_size > 0
