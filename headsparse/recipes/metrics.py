"""Cost/quality metrics of the pipeline: the Alignment Efficiency Ratio (AER) and end-to-end speedup.

P2D reports an "Alignment Efficiency Ratio" over selection latency and
training time without publishing its formula. headsparse uses an explicit one
and always reports its parts::

    gain recovered G = (Q - Q_base) / (Q_full - Q_base)
    AER              = ((T_select + T_train) / T_full) / G      (inf when G <= 0)
    speedup          = T_full / (T_select + T_train)

Q_base is the untuned model's quality, T_full and Q_full the wall time and
task quality of full-data, full-parameter fine-tuning on the same hardware
under the same rules, Q the method's quality, all on the same held-out set.
Lower AER is better; below 1 means more of full fine-tuning's *gain* per unit
of cost. An arm that learns nothing (G <= 0) gets an infinite AER, never a
good one. AER is undefined (NaN) when full fine-tuning itself did not improve
on the base model: then there is no gain to recover and the task cannot rank
the methods.

An earlier version divided the cost ratio by Q / Q_full; on a task the base
model already does well, that rewarded doing nothing (a no-op arm kept a
quality ratio near 1 at almost no cost). It is still reported, as
``aer_quality_ratio``, for comparison only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict

from .stats import gain_recovered
from .._checks import check_number


def _time(name: str, v) -> float:
    return check_number(name, v, 0, hint="seconds")


@dataclass(frozen=True)
class AERParts:
    """AER and every number it is made of."""

    t_select: float
    t_train: float
    t_full: float
    q: float
    q_full: float
    q_base: float
    cost_ratio: float  # (t_select + t_train) / t_full
    gain_recovered: float  # (q - q_base) / (q_full - q_base); NaN when q_full <= q_base
    aer: float  # cost_ratio / gain_recovered; inf when gain_recovered <= 0, NaN when undefined
    speedup: float  # t_full / (t_select + t_train) (inf when the method took no time)
    quality_ratio: float  # q / q_full (old definition's denominator; secondary)
    aer_quality_ratio: float  # cost_ratio / quality_ratio (old definition; rewards doing nothing)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"AER {_num(self.aer)} = cost ratio {self.cost_ratio:.3f} "
                f"((T_select {self.t_select:.2f} s + T_train {self.t_train:.2f} s) / T_full {self.t_full:.2f} s) "
                f"/ gain recovered {_num(self.gain_recovered)} ((Q {self.q:.4f} - Q_base {self.q_base:.4f}) / "
                f"(Q_full {self.q_full:.4f} - Q_base)); speedup {self.speedup:.2f}x")


def _num(v: float) -> str:
    return "inf" if math.isinf(v) else ("undefined" if math.isnan(v) else f"{v:.3f}")


def end_to_end_speedup(t_select: float, t_train: float, t_full: float) -> float:
    """T_full / (T_select + T_train): how many times faster than full fine-tuning the method ran."""
    ts, tt, tf = _time("t_select", t_select), _time("t_train", t_train), _time("t_full", t_full)
    if tf <= 0:
        raise ValueError(f"t_full must be > 0, got {t_full!r}")
    total = ts + tt
    return math.inf if total == 0 else tf / total


def aer(t_select: float, t_train: float, t_full: float, q: float, q_full: float, q_base: float) -> AERParts:
    """The Alignment Efficiency Ratio with its parts (see the module docstring)."""
    ts, tt, tf = _time("t_select", t_select), _time("t_train", t_train), _time("t_full", t_full)
    if tf <= 0:
        raise ValueError(f"t_full must be > 0 (the full fine-tuning wall time), got {t_full!r}")
    for name, v in (("q", q), ("q_full", q_full), ("q_base", q_base)):
        check_number(name, v, 0, hint="a quality, higher is better")
    cost = (ts + tt) / tf
    g = gain_recovered(q, q_base, q_full)
    value = math.nan if math.isnan(g) else (math.inf if g <= 0 else cost / g)
    qr = float(q) / float(q_full) if q_full > 0 else math.nan
    old = math.nan if math.isnan(qr) else (math.inf if qr == 0 else cost / qr)
    return AERParts(ts, tt, tf, float(q), float(q_full), float(q_base), cost, g, value,
                    end_to_end_speedup(ts, tt, tf), qr, old)
