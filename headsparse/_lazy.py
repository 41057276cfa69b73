"""Module-level ``__getattr__`` / ``__dir__`` that import names and submodules on first use (PEP 562)."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable, List, Tuple


def lazy_attributes(package: str, names: Dict[str, str], submodules: Iterable[str],
                    namespace: dict) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps an attribute to the relative module that defines
    it; ``submodules`` are importable by attribute. A resolved name is cached in ``namespace`` (the package's
    globals), so the import happens once."""
    submodules = tuple(submodules)

    def __getattr__(name):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(names) | set(submodules))

    return __getattr__, __dir__
