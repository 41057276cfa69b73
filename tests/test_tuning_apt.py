"""APT-style adaptive head pruning during tuning: cubic schedule, salience, physical pruning, distillation."""

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.recipes.data import collate
from headsparse.patch.core import is_patched, patch_info
from headsparse.recipes.tasks import synthetic_task, tiny_llama
from headsparse.recipes.tuning import cubic_retained, tune_apt


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cubic_schedule():
    vals = [cubic_retained(s, 0.4, 10, 50) for s in range(0, 61)]
    assert vals[0] == 1.0 and vals[10] == 1.0 and vals[50] == 0.4 and vals[60] == 0.4
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # non-increasing
    # cubic: halfway through the window 1/8 of the way from keep_final to 1
    assert cubic_retained(30, 0.4, 10, 50) == pytest.approx(0.4 + 0.6 / 8)


def test_apt_prunes_to_target_and_removes_heads():
    task = synthetic_task(n_pool=48, n_targets=24, n_target_set=4, n_eval=4, seed=3)
    model = tiny_llama(seed=0, layers=3, heads=4, kv_heads=2)
    plan = HeadPlan([["t", "f", "f", "f"], ["f", "f", "f", "f"], ["f", "t", "f", "f"]], num_kv_heads=2,
                    model_family="llama")
    res = tune_apt(model, plan, task.pool, keep_final=0.5, n_prunings=3, prune_start=0.0, prune_end=0.8,
                   epochs=2, batch_size=8, lr=1e-2, distill_max=0.5, progress=False)
    final = res.info["plan"]
    assert is_patched(model) and patch_info(model).plan == final
    # 12 heads, keep 50 %: 6 pruned, all of them formerly FROZEN; TRAIN heads survive
    assert final.count("pruned") == 6
    for i in range(3):
        for h in plan.heads(i, "train"):
            assert final.modes[i][h].value == "train"
    hist = res.info["prune_history"]
    assert [h["pruned"] for h in hist] == sorted(h["pruned"] for h in hist) and hist[-1]["pruned"] == 6
    # physically removed: the patched projections hold only the kept heads' rows
    q_rows = sum(getattr(l.self_attn.q_proj, "rows_train") + l.self_attn.q_proj.rows_frozen for l in model.model.layers)
    assert q_rows == (12 - 6) * 16
    # the pruned model computes what the unpatched (merged, pruned heads zeroed) model computes
    b = collate(task.pool[:4], 0)
    with torch.no_grad():
        a = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    hs.unpatch(model)
    with torch.no_grad():
        c = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_apt_prunes_the_least_salient_heads():
    """A head whose O columns are zeroed has zero gradient-times-activation salience: it must go first."""
    task = synthetic_task(n_pool=32, n_targets=16, n_target_set=4, n_eval=4, seed=4)
    model = tiny_llama(seed=0, layers=2, heads=4, kv_heads=2)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * 16:3 * 16] = 0  # layer 1, head 2: output unused
    plan = HeadPlan([["t", "f", "f", "f"], ["f", "f", "f", "t"]], num_kv_heads=2, model_family="llama")
    res = tune_apt(model, plan, task.pool, keep_final=7 / 8, n_prunings=1, prune_start=0.0, prune_end=0.5,
                   epochs=1, batch_size=8, lr=1e-3, distill_max=0.0, progress=False)
    final = res.info["plan"]
    assert final.count("pruned") == 1 and final.modes[1][2].value == "pruned"


def test_apt_rejects_bad_arguments():
    task = synthetic_task(n_pool=16, n_targets=4, n_target_set=2, n_eval=2)
    plan = HeadPlan.uniform(3, 4, 2, "train", model_family="llama")
    for kw, match in [(dict(keep_final=0), "keep_final"), (dict(n_prunings=0), "n_prunings"),
                      (dict(prune_start=0.5, prune_end=0.5), "prune_start"), (dict(distill_max=2), "distill_max")]:
        with pytest.raises(ValueError, match=match):
            tune_apt(tiny_llama(), plan, task.pool, progress=False, **kw)
    with pytest.raises(ValueError, match="unpatched"):
        tune_apt(hs.patch(tiny_llama(), plan), plan, task.pool, progress=False)


def test_tune_mode_apt_dispatches():
    task = synthetic_task(n_pool=16, n_targets=8, n_target_set=2, n_eval=2)
    plan = HeadPlan([["t", "f", "f", "f"], ["f"] * 4, ["f"] * 4], num_kv_heads=2, model_family="llama")
    res = hs.tune(tiny_llama(), plan, task.pool, mode="apt", batch_size=8, epochs=2, progress=False,
                  apt_options=dict(keep_final=0.75, n_prunings=1, prune_start=0.0, prune_end=0.5))
    assert res.info["plan"].count("pruned") == 3
    with pytest.raises(ValueError, match="mode"):
        hs.tune(tiny_llama(), plan, task.pool, mode="lora", progress=False)
