"""Head-sparse tuning: AdamW on a plan's head slices (or full fine-tuning as the baseline), APT-style pruning."""
from .apt import cubic_retained, tune_apt, tune_apt_heads
from .callback import HeadSparseCallback, MinedDataset, trainer_collator
from .core import TuneResult, tune

__all__ = ["tune", "tune_apt_heads", "tune_apt", "cubic_retained", "TuneResult", "HeadSparseCallback", "MinedDataset",
           "trainer_collator"]
