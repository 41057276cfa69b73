"""The supported model families: where their layers, attention and projections live.

Each family is a small table entry; the shared logic is in ``core.py``. A
projection is addressed as (parent module, attribute name) so it can be
replaced as a module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from torch import nn

Slot = Tuple[nn.Module, str]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]
    base_classes: Tuple[str, ...]  # class names of the base (headless) model
    layers: Callable[[nn.Module], nn.ModuleList]  # base model -> its transformer layers
    attention: Callable[[nn.Module], nn.Module]  # layer -> module that calls the attention interface
    slots: Callable[[nn.Module], Dict[str, Slot]]  # layer -> {"q","k","v","o"} or {"qkv","o"}
    fused_qkv: bool = False  # GPT-2: one Conv1D producing [q | k | v]
    conv1d: bool = False  # projections are transformers Conv1D (weight stored (in, out))

    def __reduce__(self):
        # the table's entries hold lambdas: a pickled patched model refers to its family by name
        return family_named, (self.name,)


def _llama_slots(layer) -> Dict[str, Slot]:
    a = layer.self_attn
    return {"q": (a, "q_proj"), "k": (a, "k_proj"), "v": (a, "v_proj"), "o": (a, "o_proj")}


def _bert_slots(layer) -> Dict[str, Slot]:
    s = layer.attention.self
    return {"q": (s, "query"), "k": (s, "key"), "v": (s, "value"), "o": (layer.attention.output, "dense")}


def _gpt2_slots(layer) -> Dict[str, Slot]:
    a = layer.attn
    return {"qkv": (a, "c_attn"), "o": (a, "c_proj")}


_DECODER = dict(layers=lambda base: base.layers, attention=lambda layer: layer.self_attn, slots=_llama_slots)
_ENCODER = dict(layers=lambda base: base.encoder.layer, attention=lambda layer: layer.attention.self, slots=_bert_slots)

FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("llama",), ("LlamaModel",), **_DECODER),
    Family("mistral", ("mistral",), ("MistralModel",), **_DECODER),
    Family("qwen2", ("qwen2",), ("Qwen2Model",), **_DECODER),
    Family("qwen3", ("qwen3",), ("Qwen3Model",), **_DECODER),
    Family("gpt2", ("gpt2",), ("GPT2Model",), layers=lambda base: base.h, attention=lambda layer: layer.attn,
           slots=_gpt2_slots, fused_qkv=True, conv1d=True),
    Family("bert", ("bert",), ("BertModel",), **_ENCODER),
    Family("roberta", ("roberta",), ("RobertaModel",), **_ENCODER),
)

SUPPORTED = ", ".join(
    f"{f.name} ({'/'.join(f.base_classes)} and its task heads)" for f in FAMILIES
)


def family_named(name: str) -> Family:
    """The supported family called ``name`` (KeyError if there is none)."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"no supported family {name!r}; supported: {[f.name for f in FAMILIES]}")


def find_family(model) -> Tuple[Family, nn.Module]:
    """The family of ``model`` and its base model, or ValueError listing the supported families."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a Hugging Face transformers model (nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base = getattr(model, "base_model", None)
    for fam in FAMILIES:
        if model_type in fam.model_types and base is not None and type(base).__name__ in fam.base_classes:
            return fam, base
    raise ValueError(
        f"model {type(model).__name__} (model_type={model_type!r}) is not supported by headsparse.patch; "
        f"supported families: {SUPPORTED}"
    )
