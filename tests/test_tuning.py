"""headsparse.tune: head-sparse training touches only TRAIN slices and learns; full baseline; SLAP on-policy; errors."""
import copy

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.recipes.data import collate, per_sample_loss
from headsparse.patch.core import is_patched
from headsparse.recipes.tasks import synthetic_task, tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task():
    return synthetic_task(n_pool=60, n_targets=12, n_target_set=8, n_eval=8, seed=2)


PLAN = HeadPlan([["t", "f", "f", "f"], ["f", "f", "t", "f"], ["f"] * 4], num_kv_heads=2, model_family="llama")


def _loss(model, data):
    b = collate(data, 0)
    with torch.no_grad():
        return float(per_sample_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                     b["labels"]).mean())


def test_tune_trains_only_the_plan_heads_and_lowers_the_loss(task):
    base = tiny_llama(seed=0)
    model = copy.deepcopy(base)
    data = [e for e, t in zip(task.pool, task.is_target) if t]
    before = _loss(base, data)
    res = hs.tune(model, PLAN, data, epochs=8, batch_size=4, lr=1e-2, progress=False)
    assert is_patched(model) and res.steps == 8 * 3 and len(res.losses) == res.steps
    after = _loss(model, data)
    assert after < before - 0.3, (before, after)
    # trainable parameters: two query heads' Q rows + O columns and their KV heads' K/V rows (16 x 64 each)
    assert res.trainable_params == 2 * 4 * 16 * 64
    hs.unpatch(model)
    d = 16
    for i, (lb, lm) in enumerate(zip(base.model.layers, model.model.layers)):
        tq = PLAN.heads(i, "train")
        for name in ("q_proj", "o_proj"):
            w0, w1 = getattr(lb.self_attn, name).weight, getattr(lm.self_attn, name).weight
            changed = (w0 != w1)
            changed = changed.any(1) if name == "q_proj" else changed.any(0)
            heads = sorted({int(r) // d for r in changed.nonzero().flatten()})
            assert heads == tq, (i, name, heads)
        assert torch.equal(lb.mlp.up_proj.weight, lm.mlp.up_proj.weight)
    assert torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tune_full_baseline_trains_everything(task):
    model = tiny_llama(seed=0)
    before = copy.deepcopy(model.state_dict())
    res = hs.tune(model, None, task.pool[:16], epochs=1, batch_size=8, lr=1e-3, progress=False)
    assert not is_patched(model) and res.steps == 2
    assert res.trainable_params == sum(p.numel() for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


def test_tune_with_slap_reselects_on_policy(task):
    model = tiny_llama(seed=0)
    res = hs.mine(model, task.pool, PLAN, method="slap", fraction=0.3, batch_size=6)
    assert res.selector.rounds == 1
    tr = hs.tune(model, PLAN, res, epochs=3, batch_size=6, lr=1e-2, progress=False)
    assert res.selector.rounds == 3  # rounds for epochs 2 and 3 ran with the model being trained
    assert tr.steps == 3 * len(res.batches) and tr.reselect_time_s > 0


def test_tune_rejects_bad_arguments(task):
    model = tiny_llama(seed=0)
    for kwargs, match in [(dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(batch_size=0), "batch_size"),
                          (dict(schedule="cosine"), "schedule"), (dict(max_steps=0), "max_steps")]:
        with pytest.raises(ValueError, match=match):
            hs.tune(model, PLAN, task.pool, progress=False, **kwargs)
    with pytest.raises(ValueError, match="plan"):
        hs.tune(model, "heads", task.pool, progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        hs.tune(tiny_llama(seed=0), HeadPlan.uniform(3, 4, 2, "frozen"), task.pool, progress=False)
    patched = hs.patch(tiny_llama(seed=0), PLAN)
    with pytest.raises(ValueError, match="different plan"):
        hs.tune(patched, HeadPlan.uniform(3, 4, 2, "train"), task.pool, progress=False)
    with pytest.raises(ValueError, match="unpatched"):
        hs.tune(patched, None, task.pool, progress=False)
    r = hs.mine(model, task.pool, PLAN, method="random")
    with pytest.raises(ValueError, match="subset"):
        hs.tune(model, PLAN, r, progress=False)


def test_tune_max_steps_and_callback(task):
    seen = []
    res = hs.tune(tiny_llama(seed=0), PLAN, task.pool, epochs=5, batch_size=4, max_steps=3, progress=False,
                  on_step=lambda s, l: seen.append((s, l)))
    assert res.steps == 3 and [s for s, _ in seen] == [1, 2, 3]


def test_keep_requires_grad_trains_only_what_requires_a_gradient():
    model = tiny_llama(seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # as an adapter library would leave a wrapped model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"input_ids": [5, 6, 7, 8, 9]}] * 4
    res = hs.tune(model, None, data, epochs=1, batch_size=2, lr=1e-2, progress=False, keep_requires_grad=True)
    assert res.trainable_params == model.lm_head.weight.numel()
    after = model.state_dict()
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k != "lm_head.weight")
