"""Recipes: the methods and the application built on the op, the plan and the patch layer.

Subpackages and modules (each loads on first use, so importing one recipe does not import the others):

- :mod:`~headsparse.recipes.scoring`: head importance scores and plans (``score_heads``, ``headsparse score``);
- :mod:`~headsparse.recipes.mining`: data mining with the heads' signatures (P2D, SLAP, LESS-style, loss, random);
- :mod:`~headsparse.recipes.tuning`: head-sparse tuning (``tune``), APT-style pruning during it, the Trainer callback;
- :mod:`~headsparse.recipes.apt`: :func:`finetune_apt_published` (old name ``finetune_apt``), APT (Zhao et al.,
  ICML 2024) as published (unlike ``tuning.tune_apt_heads``, which prunes heads while tuning head slices), with
  its baselines (full fine-tuning, LoRA, LoRA+prune) through the same loop;
- :mod:`~headsparse.recipes.data`: the one data module (examples, batching, the next-token loss) they all use;
- :mod:`~headsparse.recipes.pipeline` (report: :mod:`~headsparse.recipes.pipeline_report`),
  :mod:`~headsparse.recipes.experiment` (the fair test: arms as data; pool :mod:`~headsparse.recipes.fair_pool`,
  report :mod:`~headsparse.recipes.fair_report`, verdict :mod:`~headsparse.recipes.verdict`),
  :mod:`~headsparse.recipes.tasks`, :mod:`~headsparse.recipes.metrics`,
  :mod:`~headsparse.recipes.stats`, :mod:`~headsparse.recipes.records`: the end-to-end experiment
  (``headsparse run``), its tasks, AER, confidence intervals and result records;
- :mod:`~headsparse.recipes.cli`: the ``headsparse`` command.

Nothing below ``headsparse.recipes`` is imported by the kernels (``headsparse.ops``) or the patch layer.
"""
from .._lazy import lazy_attributes

_LAZY = {
    "finetune_apt": ".apt", "finetune_apt_published": ".apt", "APTResult": ".apt", "apt_blocks": ".apt",
    "kurtosis_term": ".apt",
    "time_to_fraction": ".apt",
}
_SUBMODULES = ("apt", "cli", "data", "demo", "experiment", "fair_pool", "fair_report", "metrics", "mining", "pipeline",
               "pipeline_report", "records", "run_cli", "scoring", "stats", "tasks", "tuning", "verdict")

__all__ = ["finetune_apt", "finetune_apt_published", "APTResult", "apt_blocks", "kurtosis_term", "time_to_fraction"]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES, globals())
