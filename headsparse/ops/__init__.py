"""Kernels and the op layer: dispatcher, autograd, reference, backends.

Backends are objects that own their rules (:mod:`headsparse.ops.backend`), one module each: ``torch_backend``,
``triton_backend`` and ``extension`` (the compiled ``cpu`` and ``cuda``); :mod:`headsparse.ops.registry` is the
one dispatcher for attention and head statistics.

Nothing here imports the model-patching layer or the pipeline.
"""
from .attention import attention
from .head_stats import HeadStats, cross_head_inner, gram, head_gram_blocks, head_stats
from .reference import attention_reference
from .registry import BackendInfo, BackendUnavailableError, backends, register_backend
from .gate_grads import GateGradRecord, GateGradRecorder, record_gate_grads

__all__ = [
    "attention",
    "attention_reference",
    "backends",
    "register_backend",
    "BackendInfo",
    "BackendUnavailableError",
    "record_gate_grads",
    "GateGradRecorder",
    "GateGradRecord",
    "head_stats",
    "gram",
    "head_gram_blocks",
    "cross_head_inner",
    "HeadStats",
]
