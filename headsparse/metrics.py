"""Cost/quality metrics of the pipeline: the Alignment Efficiency Ratio (AER) and end-to-end speedup.

P2D reports an "Alignment Efficiency Ratio" over selection latency and
training time without publishing its formula. headsparse uses an explicit one
(``design.md``) and always reports its parts::

    AER     = ((T_select + T_train) / T_full) / (Q / Q_full)
    speedup = T_full / (T_select + T_train)

T_full and Q_full are the wall time and task quality of full-data,
full-parameter fine-tuning on the same hardware under the same rules; Q is the
quality of the method's model. Lower AER is better; below 1 means more quality
per unit of cost than full fine-tuning. Quality must be "higher is better" and
non-negative (accuracy, F1, ...); Q = 0 gives an infinite AER.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict


def _time(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class AERParts:
    """AER and every number it is made of."""

    t_select: float
    t_train: float
    t_full: float
    q: float
    q_full: float
    cost_ratio: float  # (t_select + t_train) / t_full
    quality_ratio: float  # q / q_full
    aer: float  # cost_ratio / quality_ratio (inf when q == 0)
    speedup: float  # t_full / (t_select + t_train) (inf when the method took no time)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"AER {self.aer:.3f} = cost ratio {self.cost_ratio:.3f} "
                f"((T_select {self.t_select:.2f} s + T_train {self.t_train:.2f} s) / T_full {self.t_full:.2f} s) "
                f"/ quality ratio {self.quality_ratio:.3f} (Q {self.q:.4f} / Q_full {self.q_full:.4f}); "
                f"speedup {self.speedup:.2f}x")


def end_to_end_speedup(t_select: float, t_train: float, t_full: float) -> float:
    """T_full / (T_select + T_train): how many times faster than full fine-tuning the method ran."""
    ts, tt, tf = _time("t_select", t_select), _time("t_train", t_train), _time("t_full", t_full)
    if tf <= 0:
        raise ValueError(f"t_full must be > 0, got {t_full!r}")
    total = ts + tt
    return math.inf if total == 0 else tf / total


def aer(t_select: float, t_train: float, t_full: float, q: float, q_full: float) -> AERParts:
    """The Alignment Efficiency Ratio with its parts (see the module docstring)."""
    ts, tt, tf = _time("t_select", t_select), _time("t_train", t_train), _time("t_full", t_full)
    if tf <= 0:
        raise ValueError(f"t_full must be > 0 (the full fine-tuning wall time), got {t_full!r}")
    for name, v in (("q", q), ("q_full", q_full)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite quality >= 0 (higher is better), got {v!r}")
    if q_full <= 0:
        raise ValueError(f"q_full must be > 0 (the full fine-tuning quality), got {q_full!r}")
    cost = (ts + tt) / tf
    qr = float(q) / float(q_full)
    value = math.inf if qr == 0 else cost / qr
    return AERParts(ts, tt, tf, float(q), float(q_full), cost, qr, value, end_to_end_speedup(ts, tt, tf))
