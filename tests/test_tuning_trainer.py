"""The Trainer callback: on-policy SLAP re-selection per epoch inside transformers.Trainer, head-only updates."""
import copy

import pytest
import torch
import transformers

import headsparse as hs
from headsparse import HeadPlan
from headsparse.recipes.tasks import synthetic_task, tiny_llama
from headsparse.recipes.tuning import HeadSparseCallback, MinedDataset, trainer_collator


def test_trainer_with_reselection(tmp_path):
    torch.set_num_threads(1)
    task = synthetic_task(n_pool=40, n_targets=8, n_target_set=4, n_eval=4, seed=5)
    model = tiny_llama(seed=0)
    base = copy.deepcopy(model)
    plan = HeadPlan([["t", "f", "f", "f"], ["f"] * 4, ["f", "f", "t", "f"]], num_kv_heads=2, model_family="llama")
    sel = hs.mine(model, task.pool, plan, method="slap", fraction=0.4, batch_size=8)
    hs.patch(model, plan)
    ds = MinedDataset(task.pool, sel.indices)
    first_loss = sel.selector.last["features"]["loss"].clone()
    cb = HeadSparseCallback(selector=sel.selector, dataset=ds)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=trainer_collator(0),
                                   callbacks=[cb])
    trainer.train()
    assert cb.rounds == 2 and sel.selector.rounds == 3  # mine() + epochs 2 and 3
    assert len(ds) == 16 and cb.train_s > 0 and cb.trainable_params == 2 * 4 * 16 * 64
    # the last round probed the model being trained (its pool losses moved), and its picks are in the dataset
    assert (sel.selector.last["features"]["loss"] - first_loss).abs().max() > 1e-3
    assert ds.indices == [i for b in sel.selector.last["batches"] for i in b][:16]
    hs.unpatch(model)
    assert torch.equal(base.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_callback_and_dataset_reject_bad_input():
    with pytest.raises(ValueError, match="selector"):
        HeadSparseCallback(selector=object())
    with pytest.raises(ValueError, match="out of range"):
        MinedDataset([{"input_ids": [1, 2]}], [3])


def test_the_public_collator_pads_without_loss_on_padding():
    assert hs.trainer_collator is trainer_collator
    batch = hs.trainer_collator(7)([{"input_ids": [5, 6, 8]}, {"input_ids": [9], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 8], [9, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 8], [-100, -100, -100]]  # no labels: loss on every real token
    assert hs.trainer_collator(None)([{"input_ids": [5]}, {"input_ids": [5, 6]}])["input_ids"].tolist() == [[5, 0],
                                                                                                             [5, 6]]
    for bad in (-1, "0", 1.0, True):
        with pytest.raises(ValueError, match="pad_id must be a non-negative int"):
            hs.trainer_collator(bad)
