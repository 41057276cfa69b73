"""Recipes: published methods assembled from the package's parts, each one entry point.

- :func:`finetune_apt`: APT (adaptive pruning and tuning, Zhao et al., ICML 2024) with LoRA adapters that grow,
  salience-density pruning of heads and FFN neurons under a parameter budget, soft masks, self-distillation,
  and APT's cost accounting; ``adapters=False`` / ``keep=1`` / ``grow=False`` / ``distill=False`` give its
  baselines (full fine-tuning, LoRA, LoRA+prune) through the same loop.
"""
from .apt import APTResult, apt_blocks, finetune_apt, kurtosis_term, time_to_fraction

__all__ = ["finetune_apt", "APTResult", "apt_blocks", "kurtosis_term", "time_to_fraction"]
