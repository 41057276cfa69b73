"""Statistics for comparing fine-tuned models on the same held-out items.

Every quality the pipeline reports is a mean of per-item scores (1 = correct,
0 = wrong for accuracy), so its uncertainty comes from which items happened to
be in the evaluation set. The functions here resample items:

- :func:`bootstrap_ci`: percentile bootstrap CI of a mean.
- :func:`paired_bootstrap_ci`: CI of the difference of two arms' means, resampling
  the *same* items for both (the pairing removes the item difficulty from the
  comparison, which is why it is much narrower than two separate CIs).
- :func:`mcnemar_p`: exact (binomial) McNemar test on the items where exactly
  one of two arms is correct.
- :func:`gain_recovered`: (Q - Q_base) / (Q_full - Q_base), the share of full
  fine-tuning's improvement over the untuned model that an arm recovers.
- :func:`seed_interval`: mean and 95% Student-t interval of an arm's quality
  across seeds (independent runs), the spread the item bootstrap does not see.

Everything is deterministic for a given ``seed``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np
from .._checks import check_int, check_number


def _scores(name: str, values: Sequence[float]) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers (per-item scores): {e}") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-item scores, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds a non-finite value")
    return a


def _check_common(n_boot: int, confidence: float, seed: int = 0) -> None:
    check_int("seed", seed, 0)
    check_int("n_boot", n_boot, 1)
    if not isinstance(confidence, float) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _percentile_interval(estimate: float, boots: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boots, [tail, 1.0 - tail])
    return Interval(float(estimate), float(lo), float(hi), confidence)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile bootstrap CI (items resampled with replacement)."""
    a = _scores("values", values)
    _check_common(n_boot, confidence, seed)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    return _percentile_interval(a.mean(), a[idx].mean(axis=1), confidence)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> Interval:
    """mean(a) - mean(b) over the same items, with a CI that resamples items jointly for both."""
    x, y = _scores("a", a), _scores("b", b)
    if x.size != y.size:
        raise ValueError(f"a and b must score the same items, got {x.size} and {y.size} values")
    return bootstrap_ci(x - y, n_boot=n_boot, confidence=confidence, seed=seed)


def _outcomes(name: str, values) -> list:
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Integral) and v in (0, 1)):
            out.append(bool(v))
        else:
            raise ValueError(f"{name} must hold booleans (or 0/1), got {v!r}")
    return out


def mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired correct/wrong outcomes of two arms on the same items.

    Only discordant items count: n01 (a wrong, b right) and n10 (a right, b
    wrong); under the null each is Binomial(n01 + n10, 1/2), so
    p = min(1, 2 * P[X <= min(n01, n10)]). No discordant item gives p = 1.
    """
    x, y = _outcomes("a_correct", a_correct), _outcomes("b_correct", b_correct)
    if len(x) != len(y) or not x:
        raise ValueError(f"a_correct and b_correct must be equally long and non-empty, got {len(x)} and {len(y)}")
    n10 = sum(1 for u, v in zip(x, y) if u and not v)
    n01 = sum(1 for u, v in zip(x, y) if v and not u)
    n = n10 + n01
    if n == 0:
        return 1.0
    k = min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def gain_recovered(q: float, q_base: float, q_full: float) -> float:
    """(q - q_base) / (q_full - q_base); NaN when full fine-tuning did not improve on the base model.

    1 means the arm matched full fine-tuning's gain, 0 that it learnt nothing,
    a negative value that it got worse than the untuned model.
    """
    for name, v in (("q", q), ("q_base", q_base), ("q_full", q_full)):
        check_number(name, v)
    gain_full = float(q_full) - float(q_base)
    if gain_full <= 0:
        return math.nan
    return (float(q) - float(q_base)) / gain_full


# Two-sided 95% quantiles of Student's t for 1 to 10 degrees of freedom; 11 to 30 use the value for 10
# (conservative), more use the normal 1.96.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def seed_interval(values: Sequence[float]) -> Interval:
    """Mean over seeds (runs) with a 95% Student-t interval: mean +- t(n-1) * sd / sqrt(n).

    This is the spread of an arm across independent draws (data, order),
    not across evaluation items; with one value the interval is the point.
    """
    a = _scores("values", values)
    n = a.size
    if n == 1:
        return Interval(float(a[0]), float(a[0]), float(a[0]))
    t = _T975.get(n - 1, _T975[10] if n - 1 <= 30 else 1.96)
    half = t * float(a.std(ddof=1)) / math.sqrt(n)
    return Interval(float(a.mean()), float(a.mean()) - half, float(a.mean()) + half)
