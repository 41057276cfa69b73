"""Head-sparse tuning: AdamW on a plan's head slices (or full fine-tuning as the baseline), APT-style pruning."""
from .apt import cubic_retained, tune_apt
from .core import TuneResult, tune

__all__ = ["tune", "tune_apt", "cubic_retained", "TuneResult"]
