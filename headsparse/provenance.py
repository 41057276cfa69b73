"""Where, when and with what a measurement was taken: one record for every report and benchmark."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Dict, Optional

_PACKAGES = ("torch", "triton", "transformers", "peft")


def device_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU model and core count."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def git_commit(short: bool = False) -> Optional[str]:
    """The checkout's HEAD commit (None outside a git checkout); ``+dirty`` if headsparse/ has local changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               timeout=5, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) if rev else None


def versions() -> Dict[str, Optional[str]]:
    """Python and the versions of the packages a measurement depends on (None when not installed)."""
    import importlib

    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    from . import __version__

    out["headsparse"] = __version__
    return out


def provenance(device: str = "cpu") -> Dict:
    """Date (UTC), commit, device, core count, torch threads, load average and versions, as a JSON-able dict."""
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "versions": versions(),
    }
