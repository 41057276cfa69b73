"""``headsparse.tune``: train a plan's heads (or, with ``plan=None``, every parameter) with AdamW.

With a plan, the model is patched in place (:func:`headsparse.patch`) unless it
already is: gradients and optimizer state exist only for the TRAIN head slices,
nothing below the lowest trainable layer keeps a graph. The model stays patched
on return (``headsparse.unpatch`` merges the tuned slices back;
``headsparse.save_delta`` writes only them).

``data`` is a list of examples (dicts with ``input_ids`` and optional
``labels``), an (N, S) tensor, or the :class:`headsparse.MineResult` of SLAP
mining: its batches are used in the first epoch and the selector re-selects
on-policy, with the model as it is then, before every later epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..mining.core import MineResult
from ..data import (as_examples, batches as make_batches, collate, model_device, pad_id_of, per_sample_loss,
                           vocab_size_of)
from ...patch import is_patched, patch, patch_info
from ...patch.prefix_cache import PrefixCache, prefix_cache_of
from ...plan import HeadPlan
from ..._checks import check_int, check_number


from .result import TuneResult  # noqa: E402  (re-exported: headsparse.recipes.tuning.core.TuneResult)


def scheduled_lr(lr: float, step: int, total: int, warmup_steps: int = 0, schedule: str = "linear") -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``total``: linear warm-up over ``warmup_steps``,
    then constant or linear decay to 0 at ``total``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    return lr * max(0.0, (total - step) / max(1, total - warmup_steps))


def tune(model, plan: Optional[HeadPlan], data, *, epochs: int = 1, batch_size: int = 8, lr: float = 1e-4,
         weight_decay: float = 0.0, grad: str = "exact", max_steps: Optional[int] = None, warmup_steps: int = 0,
         schedule: str = "linear", train_modules: Sequence[str] = (), pad_id: Optional[int] = None, seed: int = 0,
         shuffle: bool = True, max_grad_norm: Optional[float] = 1.0, progress: bool = True,
         on_step: Optional[Callable[[int, float], None]] = None, mode: str = "sparse",
         apt_options: Optional[Dict] = None, keep_requires_grad: bool = False,
         prefix_cache=False) -> TuneResult:
    """Fine-tune ``model`` on ``data`` (see the module docstring); returns a :class:`TuneResult`.

    Args:
        plan: the :class:`HeadPlan` whose TRAIN heads are trained, or None for
            full-parameter fine-tuning of the unpatched model (the baseline).
        keep_requires_grad: with ``plan=None``, train the parameters that already
            require a gradient instead of all of them (e.g. a model wrapped by an
            adapter library, whose base weights are frozen).
        epochs, batch_size, lr, weight_decay: AdamW training; the learning rate
            follows ``schedule`` ("linear" decay to 0 or "constant") after
            ``warmup_steps`` of linear warm-up.
        grad: "exact" or "sparse" (see :func:`headsparse.patch`).
        max_steps: stop after this many optimizer steps (None: all epochs).
        on_step: called as ``on_step(step, loss)`` after every optimizer step.
        mode: "sparse" (train the plan's heads as they are) or "apt" (APT-style
            adaptive head pruning during training, :func:`headsparse.recipes.tuning.tune_apt_heads`,
            with ``apt_options``; needs a plan and an unpatched model).
        prefix_cache: False (default), True, or a :class:`headsparse.PrefixCache` (e.g. one that mining
            filled): the frozen-prefix cache. Each example's hidden state at the input of the plan's lowest
            trainable layer is kept the first time it is computed, and later epochs start from it instead of
            running the layers below (same losses and gradients; the layers below run in eval mode, cached or
            not). True makes a cache for this call and drops it on return; a given cache stays the caller's.
            Its statistics are in ``result.info["prefix_cache"]``.
    """
    if mode not in ("sparse", "apt"):
        raise ValueError(f"mode must be 'sparse' or 'apt', got {mode!r}")
    if not isinstance(prefix_cache, (bool, PrefixCache)):
        raise ValueError(f"prefix_cache must be True, False or a headsparse.PrefixCache, got {type(prefix_cache).__name__}")
    if prefix_cache is not False and (plan is None or mode == "apt"):
        raise ValueError("prefix_cache needs a fixed head plan: plan=None trains every layer and mode='apt' changes "
                         "the plan while training, so there is no frozen prefix to cache")
    if mode == "apt":
        from .apt import tune_apt_heads

        if plan is None:
            raise ValueError("mode='apt' needs a plan")
        return tune_apt_heads(model, plan, data, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        grad=grad, pad_id=pad_id, seed=seed, max_grad_norm=max_grad_norm, progress=progress,
                        **(apt_options or {}))
    check_int("epochs", epochs, 1)
    check_int("batch_size", batch_size, 1)
    if max_steps is not None:
        check_int("max_steps", max_steps, 1)
    check_number("lr", lr, 0, lo_open=True)
    if schedule not in ("linear", "constant"):
        raise ValueError(f"schedule must be 'linear' or 'constant', got {schedule!r}")
    check_number("weight_decay", weight_decay, 0)
    check_int("warmup_steps", warmup_steps, 0)
    if max_grad_norm is not None:
        check_number("max_grad_norm", max_grad_norm, 0, hint="0 or None: no clipping")
    if isinstance(plan, HeadPlan) and not plan.count("train") and not train_modules:
        raise ValueError("plan: nothing to train, the plan has no TRAIN heads and no train_modules are given")
    selector, first_batches = None, None
    if isinstance(data, MineResult):
        if data.selector is None:
            raise ValueError("data: a MineResult of a per-sample method holds only indices; pass result.subset(pool)")
        selector, first_batches = data.selector, data.batches
        examples = selector.examples
    else:
        examples = as_examples(data, "data", vocab_size_of(model))
    if plan is None:
        if is_patched(model):
            raise ValueError("plan=None means full-parameter fine-tuning of an unpatched model, but model is patched")
        if not keep_requires_grad:
            for p in model.parameters():
                p.requires_grad_(True)
    else:
        if not isinstance(plan, HeadPlan):
            raise ValueError(f"plan must be a headsparse.HeadPlan or None, got {type(plan).__name__}")
        if is_patched(model):
            if patch_info(model).plan != plan:
                raise ValueError("model is patched with a different plan; unpatch it first or pass its plan")
        else:
            patch(model, plan, grad=grad, train_modules=train_modules)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the plan has no TRAIN heads and no train_modules")
    cache, own_cache = None, False
    if prefix_cache is not False:
        cache = prefix_cache_of(model) if prefix_cache is True else prefix_cache
        if cache is None:
            cache = PrefixCache()
        own_cache = cache.attached is None
        cache.attach(model)  # refuses (naming the reason) when the model's prefix cannot be cached
        own_entries = prefix_cache is True and own_cache
        cache_before = cache.stats()  # a cache filled by mining: report this call's use of it only
    n_params = sum(p.numel() for p in params)
    pad = pad_id_of(model, pad_id)
    dev = model_device(model)
    steps_per_epoch = math.ceil((len(examples) if selector is None else sum(len(b) for b in first_batches))
                                / batch_size) if selector is None else len(first_batches)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="tune" if plan is not None else "tune (full)", unit="step",
                   disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    gen = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    step, reselect = 0, 0.0
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    epoch_s: List[float] = []
    try:
        for epoch in range(epochs):
            if step >= total:
                break
            e0 = time.perf_counter()
            if cache is not None and epoch > 0:
                cache.verify()  # a stale entry is never used: the prefix weights are re-hashed before a replay
            if selector is not None:
                if epoch == 0:
                    epoch_batches = first_batches
                else:
                    r0 = time.perf_counter()
                    epoch_batches = selector.select(model)
                    reselect += time.perf_counter() - r0
                    model.train()
            else:
                order = torch.randperm(len(examples), generator=gen).tolist() if shuffle else None
                epoch_batches = make_batches(len(examples), batch_size, order)
            for idx in epoch_batches:
                if step >= total:
                    break
                b = collate([examples[i] for i in idx], pad, dev)
                for g in opt.param_groups:
                    g["lr"] = scheduled_lr(lr, step, total, warmup_steps, schedule)
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                loss = per_sample_loss(out.logits, b["labels"]).mean()
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                lv = float(loss.detach())
                losses.append(lv)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.3f}", epoch=epoch)
                if on_step is not None:
                    on_step(step, lv)
            epoch_s.append(time.perf_counter() - e0)
    except BaseException:  # a failed or interrupted run must not leave its own cache attached (or its memory)
        if cache is not None and own_cache:
            cache.detach(clear=own_entries)
        raise
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    info: Dict = {"epoch_s": epoch_s}
    if cache is not None:
        now = cache.stats()
        info["prefix_cache"] = dict(now, **{k: now[k] - cache_before[k] for k in ("hits", "misses", "bypassed",
                                                                                 "fill_s")})
        if own_cache:
            cache.detach(clear=own_entries)
    if bar is not None:
        bar.close()
    model.eval()
    del opt
    return TuneResult(model, step, epochs, losses, elapsed, n_params, reselect, info=info, cpu_s=cpu)
