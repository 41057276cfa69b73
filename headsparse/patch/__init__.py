"""Hugging Face integration: ``patch`` / ``unpatch`` a model for head-sparse training.

This layer imports ``headsparse.ops`` and ``headsparse.plan``, never the pipeline.
"""
from .core import (
    ATTN_NAME,
    head_layout,
    headsparse_attention_forward,
    is_patched,
    merged_layer_weights,
    model_shape,
    patch,
    patch_info,
    register,
    unpatch,
)
from .delta import load_delta, read_delta_plan, save_delta
from .distributed import gather_standard_state_dict, gather_trainable, save_final
from .families import FAMILIES, SUPPORTED
from .linear import HeadSlicedOutput, HeadSlicedProjection
from .prefix_cache import PrefixCache, prefix_cache_of

__all__ = [
    "patch", "unpatch", "save_delta", "load_delta", "read_delta_plan", "is_patched", "patch_info",
    "model_shape", "head_layout", "register", "headsparse_attention_forward", "ATTN_NAME", "FAMILIES", "SUPPORTED",
    "HeadSlicedProjection", "HeadSlicedOutput", "merged_layer_weights", "save_final", "gather_trainable",
    "gather_standard_state_dict", "PrefixCache", "prefix_cache_of",
]
