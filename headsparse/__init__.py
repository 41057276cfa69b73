"""headsparse: train only the attention heads that matter, with kernels that skip the rest.

See README.md for the public API. Layers: ``headsparse.ops`` (kernels),
``headsparse.patch`` (Hugging Face integration), and the pipeline.
"""
from .ops import (
    BackendInfo,
    BackendUnavailableError,
    GateGradRecord,
    GateGradRecorder,
    attention,
    attention_reference,
    backends,
    record_gate_grads,
)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_reference",
    "backends",
    "record_gate_grads",
    "GateGradRecorder",
    "GateGradRecord",
    "BackendInfo",
    "BackendUnavailableError",
    "__version__",
]
