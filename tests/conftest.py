"""Test configuration: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is
set here, before headsparse is imported by any test module.
"""
import os

try:  # pragma: no cover - depends on the machine
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing entirely: let the import errors speak in the tests
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
