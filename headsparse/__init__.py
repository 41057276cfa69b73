"""headsparse: train only the attention heads that matter, with kernels that skip the rest.

See README.md for the public API. Layers: ``headsparse.ops`` (kernels),
``headsparse.plan`` and ``headsparse.patch`` (Hugging Face integration), and
``headsparse.recipes`` (scoring, mining, tuning, APT, the pipeline, tasks, the
CLI), which loads on first use.
"""
from .ops import (
    BackendInfo,
    BackendUnavailableError,
    GateGradRecord,
    GateGradRecorder,
    HeadStats,
    attention,
    attention_reference,
    backends,
    cross_head_inner,
    gram,
    head_gram_blocks,
    head_stats,
    record_gate_grads,
)
from ._lazy import lazy_attributes
from .plan import HeadMode, HeadPlan
from .patch import load_delta, save_delta, save_final, unpatch
from .patch import PrefixCache  # noqa: E402
from .patch import patch  # noqa: E402  (the function; the subpackage stays importable as headsparse.patch.core etc.)
from .patch import core as _patch_core, delta as _patch_delta, families as _patch_families, linear as _patch_linear  # noqa: E402
from .patch import distributed as _patch_distributed  # noqa: E402
from .patch import prefix_cache as _patch_prefix_cache  # noqa: E402

# ``import headsparse.patch.core as core`` resolves ``headsparse.patch`` by attribute, which is the function
# above; giving the function the subpackage's submodules as attributes keeps that import working.
for _name, _mod in (("core", _patch_core), ("delta", _patch_delta), ("families", _patch_families),
                    ("linear", _patch_linear), ("distributed", _patch_distributed),
                    ("prefix_cache", _patch_prefix_cache)):
    setattr(patch, _name, _mod)
del _name, _mod
__version__ = "0.1.0"

# The recipes (scoring, mining, tuning, APT, the pipeline) load on first use: ``import headsparse`` stays light and does
# not import transformers' Trainer, tqdm or the pipeline for a user who wants only the op and the patch.
_LAZY = {
    "score_heads": ".recipes.scoring", "HeadScores": ".recipes.scoring",
    "mine": ".recipes.mining", "MineResult": ".recipes.mining",
    "tune": ".recipes.tuning", "TuneResult": ".recipes.tuning", "trainer_collator": ".recipes.tuning",
    "smollm2_dir": ".recipes.tasks",
    "aer": ".recipes.metrics", "AERParts": ".recipes.metrics",
    "run_pipeline": ".recipes.pipeline", "RunConfig": ".recipes.pipeline", "Task": ".recipes.pipeline",
}
_SUBMODULES = ("recipes", "provenance")


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _SUBMODULES, globals())

__all__ = [
    "attention",
    "attention_reference",
    "backends",
    "record_gate_grads",
    "GateGradRecorder",
    "GateGradRecord",
    "BackendInfo",
    "BackendUnavailableError",
    "HeadPlan",
    "HeadMode",
    "patch",
    "unpatch",
    "save_delta",
    "load_delta",
    "save_final",
    "PrefixCache",
    "head_stats",
    "gram",
    "head_gram_blocks",
    "cross_head_inner",
    "HeadStats",
    "score_heads",
    "HeadScores",
    "mine",
    "MineResult",
    "tune",
    "TuneResult",
    "aer",
    "AERParts",
    "run_pipeline",
    "RunConfig",
    "Task",
    "trainer_collator",
    "smollm2_dir",
    "__version__",
]
