"""The shared argument checks: ints that are not bools, finite numbers within bounds, messages naming both."""
import math

import pytest

from headsparse._checks import check_int, check_number


def test_check_int():
    assert check_int("n", 3, 1) == 3 and check_int("n", 0, 0) == 0 and check_int("n", -5) == -5
    for bad, lo, hi, msg in ((True, 1, None, "n must be a positive int, got True"), (1.0, 1, None, "positive int"),
                             (0, 1, None, "positive int, got 0"), (-1, 0, None, "an int >= 0, got -1"),
                             (5, 0, 4, r"an int in \[0, 4\], got 5"), ("3", None, None, "n must be an int")):
        with pytest.raises(ValueError, match=msg):
            check_int("n", bad, lo, hi)


def test_check_number():
    assert check_number("x", 1, 0, 1, lo_open=True) == 1.0 and check_number("x", 0.5) == 0.5
    cases = ((0, dict(lo=0, hi=1, lo_open=True), r"x must be a number in \(0, 1\], got 0"),
             (1.5, dict(lo=0, hi=1, lo_open=True), r"in \(0, 1\]"),
             (-1e-9, dict(lo=0, lo_open=True), "x must be a positive number"),
             (math.nan, {}, "x must be a finite number, got nan"), (math.inf, dict(lo=0), "got inf"),
             (False, {}, "got False"), ("1", {}, "finite number"),
             (1.0, dict(lo=0, hi=1, hi_open=True), r"in \[0, 1\)"), (-2, dict(lo=-1), "a number >= -1"))
    for v, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_number("x", v, **kw)
