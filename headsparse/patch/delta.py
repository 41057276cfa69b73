"""Compact delta files: only the tuned head slices (and ``train_modules``), plus the plan.

A delta is a safetensors file. Its tensors are the trainable parameters of a
patched model under their patched names (``...q_proj.weight_train``,
``...o_proj.weight_train``, ...); its metadata holds the plan JSON, the grad
mode and the ``train_modules``. Applied to a fresh copy of the base model,
:func:`load_delta` patches it with the same plan (the head layout is a
deterministic function of plan and model) and copies the slices in.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .._atomic import atomic_path
from ..plan import HeadPlan
from .core import is_patched, patch, patch_info, unpatch

_FORMAT = "headsparse.delta"
_VERSION = "1"


def _trainable_names(model: nn.Module, info):
    names = []
    prefixes = tuple(f"{m}." for m in info.train_modules)
    for n, p in model.named_parameters():
        if n.endswith(".weight_train") or n.endswith(".bias_train") or n.startswith(prefixes):
            names.append(n)
    return names


def save_delta(model: nn.Module, path) -> None:
    """Write the tuned slices of a patched model to ``path`` (safetensors; temp file + rename)."""
    from .linear import is_sharded, is_zero3_partitioned

    info = patch_info(model)
    params = dict(model.named_parameters())
    names = _trainable_names(model, info)
    if any(is_sharded(params[n]) or is_zero3_partitioned(params[n]) for n in names):
        raise ValueError("save_delta: the model's parameters are sharded (FSDP2 / DTensor, or DeepSpeed ZeRO-3 "
                         "partitioned: empty placeholders); call "
                         "headsparse.save_final(model, delta=path) on every rank instead (it gathers the slices "
                         "and writes from rank 0)")
    write_delta_file(info, {n: params[n].detach().to("cpu") for n in names}, path)


def write_delta_file(info, tensors, path) -> None:
    """The delta file: ``tensors`` (patched names -> whole CPU tensors) with the plan, grad mode, train_modules and
    family of ``info`` (a PatchInfo) as metadata; through a temporary file and a rename."""
    from safetensors.torch import save_file

    meta = {
        "format": _FORMAT, "version": _VERSION, "plan": info.plan.to_json(), "grad": info.grad,
        "train_modules": json.dumps(list(info.train_modules)), "model_family": info.family.name,
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)


def _open_delta(path: str):
    """safe_open ``path``, turning a missing or unreadable file into FileNotFoundError / ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"headsparse delta file {path!r} does not exist (expected a file written by save_delta)")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        size = os.path.getsize(path)
        raise ValueError(f"{path!r} ({size} bytes) is not a readable headsparse delta: expected a safetensors file "
                         f"written by save_delta, and it is empty, truncated or of another format ({exc})") from None


def _delta_plan(path: str, meta: dict) -> HeadPlan:
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a headsparse delta file (metadata format={meta.get('format')!r}); "
                         "expected a file written by headsparse.save_delta")
    if meta.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported headsparse delta version {meta.get('version')!r}; this reads {_VERSION}")
    try:
        return HeadPlan.from_json(meta["plan"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: the delta's stored plan is missing or invalid ({exc})") from None


def read_delta_plan(path) -> HeadPlan:
    """The plan stored in a delta file."""
    path = os.fspath(path)
    with _open_delta(path) as f:
        meta = f.metadata() or {}
    return _delta_plan(path, meta)


def load_delta(model: nn.Module, path) -> nn.Module:
    """Apply a delta to ``model``; returns the (patched) model.

    An unpatched model is patched first with the delta's plan, grad mode and
    train_modules; a patched one must carry the same plan. Every check (file,
    plan against the model, tensor names and shapes) runs before any weight is
    written; if the delta does not fit a model this call patched, the model is
    unpatched and its weights restored, so a failed call leaves it as it was.
    """
    path = os.fspath(path)
    with _open_delta(path) as f:
        meta = f.metadata() or {}
        plan = _delta_plan(path, meta)
        patched_here = False
        if is_patched(model):
            if patch_info(model).plan != plan:
                raise ValueError(f"{path}: model is patched with a different plan than the delta's; unpatch it first")
        else:
            try:
                plan.check_model(model)
            except ValueError as e:
                raise ValueError(f"{path}: the delta was made for another model: {e}") from None
            # Patching removes pruned heads, which unpatch zeroes: keep their weights to restore on failure.
            backup = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                      if plan.count("pruned") else None)
            patch(model, plan, grad=meta.get("grad", "exact"),
                  train_modules=tuple(json.loads(meta.get("train_modules", "[]"))))
            patched_here = True
        try:
            params = dict(model.named_parameters())
            expected = set(_trainable_names(model, patch_info(model)))
            keys = set(f.keys())
            if keys != expected:
                missing, extra = sorted(expected - keys), sorted(keys - expected)
                raise ValueError(f"{path}: delta does not match the patched model: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            for name in sorted(keys):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(params[name].shape):
                    raise ValueError(f"{path}: delta tensor {name} has shape {shape}, the model expects "
                                     f"{tuple(params[name].shape)} (a delta of another model?)")
        except ValueError:
            if patched_here:
                unpatch(model)
                if backup is not None:
                    model.load_state_dict(backup)
            raise
        with torch.no_grad():
            for name in keys:
                p = params[name]
                p.copy_(f.get_tensor(name).to(device=p.device, dtype=p.dtype))
    return model
