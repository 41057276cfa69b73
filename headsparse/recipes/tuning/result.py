"""What a tuning call returns (shared by :func:`~headsparse.recipes.tuning.core.tune` and
:func:`~headsparse.recipes.tuning.apt.tune_apt_heads`, so neither imports the other at module level)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class TuneResult:
    model: object
    steps: int
    epochs: int
    losses: List[float]
    time_s: float
    trainable_params: int
    reselect_time_s: float = 0.0  # SLAP on-policy re-selection inside the training time
    info: Dict = field(default_factory=dict)
    cpu_s: float = 0.0  # process CPU time of the training loop (all threads), beside the wall time_s
