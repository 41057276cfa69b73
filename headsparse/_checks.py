"""One place for the argument checks every public function repeats: ints that are not bools, finite numbers in a
range, each failing with a ValueError that names the argument and shows the bad value."""
from __future__ import annotations

import math
import numbers
from typing import Optional


def check_int(name: str, v, lo: Optional[int] = None, hi: Optional[int] = None, *, hint: str = "") -> int:
    """``v`` if it is an int (not a bool) in [lo, hi]; otherwise ValueError (``hint`` is added to its message)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        if lo == 1 and hi is None:
            what = "a positive int"
        elif hi is None:
            what = "an int" if lo is None else f"an int >= {lo}"
        else:
            what = f"an int in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {v!r}")
    return v


def check_number(name: str, v, lo: Optional[float] = None, hi: Optional[float] = None, *,
                 lo_open: bool = False, hi_open: bool = False, hint: str = "") -> float:
    """``v`` if it is a finite real number (not a bool) within the bounds (open where asked); otherwise
    ValueError (``hint`` is added to its message)."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        if lo == 0 and lo_open and hi is None:
            what = "a positive number"
        elif lo is None and hi is None:
            what = "a finite number"
        elif hi is None:
            what = f"a number {'>' if lo_open else '>='} {lo:g}"
        else:
            what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {v!r}")
    return float(v)
