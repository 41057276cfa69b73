"""Hugging Face ``Trainer`` integration: a dataset over a mined subset and an on-policy re-selection callback.

Usage::

    sel = hs.mine(model, pool, plan, method="slap", fraction=0.1)
    hs.patch(model, plan)
    ds = MinedDataset(pool, sel.indices)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=trainer_collator(pad_id),
                      callbacks=[HeadSparseCallback(selector=sel.selector, dataset=ds)])

At the start of every epoch after the first, the callback re-selects with the
model as it is then (SLAP on-policy) and swaps the dataset's indices in place
(the subset size stays the same, so the Trainer's sampler and step count are
unchanged; the Trainer's own shuffling replaces SLAP's batch composition).
It also records the training wall time and the trainable parameter count.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

from ..data import as_examples, collate

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class MinedDataset(torch.utils.data.Dataset):
    """The examples ``indices`` of ``pool`` (indices can be replaced in place, same length)."""

    def __init__(self, pool, indices: Sequence[int]) -> None:
        self.examples = as_examples(pool)
        self.indices: List[int] = [int(i) for i in indices]
        if not self.indices:
            raise ValueError("indices is empty")
        bad = [i for i in self.indices if not 0 <= i < len(self.examples)]
        if bad:
            raise ValueError(f"indices out of range for a pool of {len(self.examples)}: {bad[:5]}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict:
        return self.examples[self.indices[i]]


def trainer_collator(pad_id: Optional[int] = 0):
    """A ``data_collator`` for ``transformers.Trainer`` over example dicts (``{"input_ids": [...]}``, optional
    ``"labels"``, -100 = no loss; without labels the loss is on every token): right-padded ``input_ids``,
    ``attention_mask`` and ``labels`` tensors. Public as ``headsparse.trainer_collator``. ``pad_id``: the
    tokenizer's ``pad_token_id`` (None, as for tokenizers without one, pads with 0; padding never enters the loss)."""
    if pad_id is None:
        pad_id = 0
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int (the tokenizer's pad_token_id) or None, got {pad_id!r}")

    def fn(examples):
        return collate(examples, pad_id)
    return fn


class HeadSparseCallback(TrainerCallback):
    """On-policy re-selection per epoch (with a selector and a :class:`MinedDataset`) and timing."""

    def __init__(self, selector=None, dataset: Optional[MinedDataset] = None) -> None:
        if (selector is None) != (dataset is None):
            raise ValueError("give both selector and dataset (for re-selection) or neither")
        self.selector, self.dataset = selector, dataset
        self.rounds = 0
        self.reselect_s = 0.0
        self.train_s: Optional[float] = None
        self.trainable_params: Optional[int] = None
        self._t0 = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._t0 = time.perf_counter()
        if model is not None:
            self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.selector is None or model is None or state.epoch is None or state.epoch < 1e-9:
            return
        t0 = time.perf_counter()
        was = model.training
        batches = self.selector.select(model)
        model.train(was)
        flat = [i for b in batches for i in b][: len(self.dataset)]
        if len(flat) < len(self.dataset):  # keep the length the sampler expects
            flat += self.dataset.indices[len(flat):]
        self.dataset.indices = flat
        self.rounds += 1
        self.reselect_s += time.perf_counter() - t0

    def on_train_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.train_s = time.perf_counter() - self._t0
