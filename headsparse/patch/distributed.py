"""Final outputs of a patched model trained on several processes (DDP, FSDP2 ``fully_shard``, DeepSpeed ZeRO-2/3,
accelerate, Trainer).

:func:`save_final` is called on every rank after training. It gathers the
sharded parameters (a collective: every rank must call it), and rank 0 alone
writes the standard checkpoint (stock keys, tuned slices merged, pruned heads
zeroed, the plan beside it: loads with plain ``from_pretrained``) and, if asked,
the delta; each through a temporary name that is then renamed, so no
half-written output is ever visible. The other ranks wait for rank 0 and raise
if it failed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, Optional

import torch
from torch import nn

from .._atomic import atomic_path
from .core import patch_info
from .delta import _trainable_names, write_delta_file
from .linear import is_sharded, is_zero3


def _dist():
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


def _unwrap(model: nn.Module) -> nn.Module:
    """The patched model inside DDP / accelerate / DeepSpeed / torch.compile wrappers (FSDP2 shards in place:
    nothing to unwrap). Read from the instance's own dicts: DeepSpeedEngine and OptimizedModule forward unknown
    attributes to the model, so ``hasattr(wrapper, "_headsparse_patch")`` is true on the wrapper itself."""
    seen = 0
    while "_headsparse_patch" not in vars(model) and seen < 8:
        children = vars(model).get("_modules", {})
        inner = children.get("module", children.get("_orig_mod"))
        if inner is None:
            break
        model, seen = inner, seen + 1
    return model


def _gathered_parameters(params):
    """``deepspeed.zero.GatheredParameters`` over ``params`` (read only: every rank gets the whole tensors, and they
    are partitioned again on exit). Imported only here, for ZeRO-3 parameters: deepspeed stays optional."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _gathered(t: torch.Tensor) -> torch.Tensor:
    if is_zero3(t):
        with _gathered_parameters([t]):  # a collective: every rank gathers the same parameters in the same order
            return t.detach().to("cpu", copy=True)
    return (t.full_tensor() if is_sharded(t) else t).detach().to("cpu")


def _keep(items, keep: bool) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in items:
        g = _gathered(v)  # gathered on every rank (a collective when sharded), kept on one
        if keep:
            out[k] = g
    return out


def _zero3_state_dict(model: nn.Module, keep: bool = True) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` of a DeepSpeed ZeRO-3 model with whole tensors: the parameters outside the decoder
    layers are gathered around the call, each decoder layer's only while its own entries (and the state-dict hook
    that merges its slices) are written, then copied, so at most one layer is whole at a time. A collective.
    ``keep=False`` (a rank that only takes part): each layer's entries are dropped instead of copied."""
    info = patch_info(model)
    layers = list(info.family.layers(model.base_model))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    open_ctx, copied = {}, set()

    def enter(layer, prefix, keep_vars):
        open_ctx[id(layer)] = ctx = _gathered_parameters(layer.parameters())
        ctx.__enter__()

    def leave(layer, state_dict, prefix, local_metadata):  # registered after the merging hook: runs after it
        for k in [k for k in state_dict if k.startswith(prefix)]:
            if keep:
                state_dict[k] = state_dict[k].detach().to("cpu", copy=True)
                copied.add(k)
            else:
                del state_dict[k]
        open_ctx.pop(id(layer)).__exit__(None, None, None)

    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_state_dict_pre_hook(enter))
            handles.append(layer._register_state_dict_hook(leave))
        with _gathered_parameters(p for p in model.parameters() if id(p) not in in_layers):
            state = model.state_dict()
            if not keep:
                return {}
            return {k: v if k in copied else v.detach().to("cpu", copy=True) for k, v in state.items()}
    finally:
        for h in handles:
            h.remove()
        for ctx in open_ctx.values():  # only after an error inside state_dict()
            ctx.__exit__(None, None, None)


def gather_trainable(model: nn.Module, keep: bool = True) -> Dict[str, torch.Tensor]:
    """The trainable slices (and ``train_modules``) of a patched model under their patched names, whole, on the CPU.

    Sharded parameters are gathered: under FSDP2 and DeepSpeed ZeRO-3 every rank must call this (``keep=False``:
    take part, keep nothing, return an empty dict).
    """
    model = _unwrap(model)
    info = patch_info(model)
    params = dict(model.named_parameters())
    return _keep(((n, params[n]) for n in _trainable_names(model, info)), keep)


def gather_standard_state_dict(model: nn.Module, keep: bool = True) -> Dict[str, torch.Tensor]:
    """The model's state dict as a stock checkpoint (standard keys, merged weights), whole, on the CPU.

    Under FSDP2 and DeepSpeed ZeRO-3 every rank must call this (the shards are gathered, in the same order on every
    rank; ``keep=False``: take part, keep nothing). Under ZeRO-3 one decoder layer at a time is gathered whole.
    """
    model = _unwrap(model)
    if any(is_zero3(p) for p in model.parameters()):
        return _zero3_state_dict(model, keep)
    return _keep(model.state_dict().items(), keep)


def _write_checkpoint_dir(model: nn.Module, state_dict: Dict[str, torch.Tensor], directory: str,
                          safe_serialization: bool) -> None:
    """save_pretrained into a temporary folder beside ``directory``, then swap it in by renames."""
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + "-", suffix=".tmp", dir=parent)
    old = None
    try:
        os.chmod(tmp, 0o755)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=safe_serialization,
                              is_main_process=True)
        if os.path.lexists(directory):
            # os.replace cannot replace a non-empty folder: move the old one aside, then the new one in
            old = tempfile.mkdtemp(prefix="." + os.path.basename(directory) + "-", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        if old is not None and not os.path.lexists(directory):
            os.replace(old, directory)  # put the previous output back
            old = None
        raise
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_final(model: nn.Module, directory=None, *, delta=None, safe_serialization: bool = True,
               main_rank: int = 0) -> None:
    """Write a trained patched model's final outputs from one rank, atomically; call it on every rank.

    Args:
        model: the patched model, as trained: plain, FSDP2-sharded in place (``fully_shard``), DeepSpeed ZeRO-3
            partitioned (gathered one decoder layer at a time), or inside a DDP / accelerate / DeepSpeed wrapper.
        directory: if given, the standard checkpoint is written there (``save_pretrained``: stock keys, tuned
            slices merged, pruned heads zeroed, ``headsparse_plan.json`` beside it); it loads with plain
            ``from_pretrained``. It is built in a temporary folder beside ``directory`` and renamed into place
            (an existing folder of that name is replaced only once the new one is complete).
        delta: if given, a path for the delta file (:func:`headsparse.save_delta`'s format), written to a
            temporary name and renamed.
        safe_serialization: passed to ``save_pretrained``.
        main_rank: the rank that writes (default 0).

    Sharded parameters are gathered with collectives, so every rank must call this with the same model; only
    ``main_rank`` writes. When ``torch.distributed`` is initialised, every rank returns after the writer has
    finished and raises ``RuntimeError`` if it failed. Without ``torch.distributed`` this simply writes.
    """
    if directory is None and delta is None:
        raise ValueError("save_final: give a directory for the standard checkpoint, a delta path, or both")
    inner = _unwrap(model)
    patch_info(inner)  # a clear error for an unpatched model, on every rank
    dist = _dist()
    rank = dist.get_rank() if dist is not None else main_rank
    mine = rank == main_rank
    tensors = gather_trainable(inner, keep=mine) if delta is not None else None
    state = gather_standard_state_dict(inner, keep=mine) if directory is not None else None
    error: Optional[str] = None
    if mine:
        try:
            # the checkpoint (the larger write, the likelier to fail) first: if it fails, the old delta stays
            # beside the old checkpoint instead of a new delta beside an old checkpoint
            if directory is not None:
                _write_checkpoint_dir(inner, state, directory, safe_serialization)
            if delta is not None:
                write_delta_file(patch_info(inner), tensors, delta)
        except Exception as exc:  # reported to every rank below, then raised here
            if dist is None:
                raise
            error = f"{type(exc).__name__}: {exc}"
            failure = exc
    if dist is not None:
        box = [error]
        dist.broadcast_object_list(box, src=main_rank)
        if box[0] is not None:
            if rank == main_rank:
                raise failure
            raise RuntimeError(f"headsparse.save_final: rank {main_rank} failed to write the outputs: {box[0]}")
