"""Run a command as if some packages were not installed: a ``sitecustomize`` that puts a meta-path finder in
front of the import system, refusing the names in ``HS_BLOCK_MODULES`` (comma-separated top-level names) the way
an absent package is refused (``ModuleNotFoundError``; ``importlib.util.find_spec`` raises it too)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional, Sequence

SITECUSTOMIZE = '''\
import os, sys

_BLOCKED = {m for m in os.environ.get("HS_BLOCK_MODULES", "").split(",") if m}


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
'''


def run_without(blocked: Sequence[str], cmd: List[str], tmp_path, env: Optional[dict] = None,
                cwd: Optional[str] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the packages ``blocked`` made unimportable (and HF offline); returns the finished process."""
    site = os.path.join(str(tmp_path), "hs-blocker")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as fh:
        fh.write(SITECUSTOMIZE)
    full = dict(os.environ if env is None else env)
    full["PYTHONPATH"] = site + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    full["HS_BLOCK_MODULES"] = ",".join(blocked)
    full.setdefault("HF_HUB_OFFLINE", "1")
    full.setdefault("TRANSFORMERS_OFFLINE", "1")
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=cwd or str(tmp_path), timeout=timeout)


def assert_one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The process failed (non-zero exit) with exactly one line on stderr, no traceback, containing ``needles``."""
    err = proc.stderr.strip()
    assert proc.returncode != 0, (proc.returncode, proc.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    assert len(err.splitlines()) == 1, err[-3000:]
    for n in needles:
        assert n in err, (n, err)
    return err


def python() -> str:
    return sys.executable
