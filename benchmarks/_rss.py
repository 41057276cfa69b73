"""Process memory on CPU for the benchmarks: peak RSS through /proc (VmHWM after clear_refs), average by sampling.

Process RSS includes the allocator's caching; it is what the machine has to hold, not tracemalloc's view (which does
not see torch's allocations). Where /proc/self/clear_refs cannot be written, the peak comes from the sampling thread.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Optional

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover (not Linux)
        return 0


def _hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _hwm() is not None
    except OSError:
        return False


def trim() -> None:
    """Hand freed heap back to the OS (glibc malloc_trim), so the next measurement starts from what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover (not glibc)
        pass


class RssMeter:
    """``with RssMeter() as m: ...`` -> ``m.peak_delta`` and ``m.avg_delta`` (bytes above the RSS at entry),
    ``m.method`` ("VmHWM" or "sampled")."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self._stop = threading.Event()

    def __enter__(self):
        trim()
        self.base = rss_bytes()
        self.use_hwm = _reset_hwm()
        self.method = "VmHWM" if self.use_hwm else "sampled"
        self._peak, self._sum, self._n = self.base, 0, 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            r = rss_bytes()
            self._peak, self._sum, self._n = max(self._peak, r), self._sum + r, self._n + 1
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = _hwm() if self.use_hwm else self._peak
        self.peak_delta = max(0, (peak or self._peak) - self.base)
        self.avg_delta = max(0, (self._sum / self._n if self._n else self.base) - self.base)
        return False

    def start(self) -> "RssMeter":
        return self.__enter__()

    def stop(self) -> int:
        """Ends the measurement; the peak RSS above the start, in bytes."""
        self.__exit__(None, None, None)
        return self.peak_delta
