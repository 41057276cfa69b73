"""Data mining for head-sparse tuning: P2D head-guided mining, SLAP batch selection, baselines."""
from .core import METHODS, MineResult, mine, p2d_scores
from .features import patched_for, probe
from .slap import SlapSelector, compose_batches, loss_strata, mean_intra_batch_distance, relative_distances

__all__ = ["mine", "MineResult", "METHODS", "p2d_scores", "probe",
           "patched_for", "SlapSelector", "compose_batches", "loss_strata", "relative_distances",
           "mean_intra_batch_distance"]
