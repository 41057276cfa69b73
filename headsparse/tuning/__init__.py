"""Head-sparse tuning: AdamW on a plan's head slices (or full fine-tuning as the baseline)."""
from .core import TuneResult, tune

__all__ = ["tune", "TuneResult"]
