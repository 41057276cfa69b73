"""APT's block machinery: FFN-neuron salience against a hand computation, selection by density under a budget,
the published schedule, soft masks that end exact, and physical removal that keeps the function."""
import copy
import math

import pytest
import torch

from headsparse.recipes.tuning.apt_blocks import (FFNNeurons, apt_retained, compact_ffn, density_keep, gated_mlps,
                                          neuron_cost)
from _hs_models import batch, input_keeper, loss_of, tiny_model


def test_ffn_salience_equals_the_hand_computation():
    model = tiny_model("llama")
    ids = batch(model)
    for p in model.parameters():
        p.requires_grad_(True)
    seen = {}
    handles = [m.down_proj.register_forward_pre_hook(input_keeper(seen, i)) for i, m in enumerate(gated_mlps(model))]
    neurons = FFNNeurons(model)  # registered after grab: it sees the same input tensor
    for _ in range(2):  # accumulated over two backward passes
        loss_of(model, ids)[0].backward()
    got = neurons.take()
    assert neurons.take() == [None] * len(got)  # cleared
    neurons.close()
    # the same two passes by hand
    want = []
    model.zero_grad()
    acc = {}
    for _ in range(2):
        loss_of(model, ids)[0].backward()
        for i, x in seen.items():
            sx, sg = x.detach().abs().sum((0, 1)), x.grad.abs().sum((0, 1))
            a = acc.setdefault(i, [0, 0])
            a[0], a[1] = a[0] + sx, a[1] + sg
    want = [acc[i][0] * acc[i][1] for i in range(len(acc))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.double(), rtol=1e-10, atol=0)
    for h in handles:
        h.remove()


def test_density_keep_meets_the_budget_within_one_block():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = 40
        sal = torch.rand(n, generator=gen, dtype=torch.float64)
        cost = torch.randint(1, 20, (n,), generator=gen).double()
        budget = float(torch.rand(1, generator=gen)) * float(cost.sum())
        keep = density_keep(sal, cost, budget)
        kept = float(cost[keep].sum())
        assert kept <= budget + 1e-9
        dens = sal / cost
        order = torch.argsort(dens, descending=True, stable=True)
        k = int(keep.sum())
        assert set(order[:k].tolist()) == set(torch.nonzero(keep).flatten().tolist())  # a density prefix
        if k < n:
            assert kept + float(cost[order[k]]) > budget  # the next block would not fit
    assert density_keep(torch.ones(3), torch.ones(3), 10).all()
    assert not density_keep(torch.ones(3), torch.ones(3), 0.5).any()
    with pytest.raises(ValueError, match="positive cost"):
        density_keep(torch.ones(2), torch.tensor([1.0, 0.0]), 1)


def test_retained_ratio_follows_the_published_formula():
    r0, rT, tw, te = 1.0, 0.4, 10, 50
    for t in range(0, 70, 5):
        want = r0 if t <= tw else (rT if t >= te else min(r0, rT + (r0 - rT) * ((te - t) / (te - tw)) ** 3))
        assert apt_retained(t, r0, rT, tw, te) == pytest.approx(want, abs=0)
    assert apt_retained(30, r0, rT, tw, te) == pytest.approx(0.4 + 0.6 * 0.125)
    with pytest.raises(ValueError):
        apt_retained(1, 1.0, 0.5, 5, 5)


def test_soft_masks_move_by_their_step_and_end_exact():
    model = tiny_model("llama")
    neurons = FFNNeurons(model)
    keep = [torch.arange(m.numel()) % 3 != 0 for m in neurons.masks]
    neurons.set_targets(keep)
    for _ in range(30):
        neurons.move(0.01)
    for m, k in zip(neurons.masks, keep):
        assert torch.allclose(m[k], torch.ones_like(m[k])) and torch.allclose(m[~k], torch.full_like(m[~k], 0.7))
    neurons.finalize()
    for m, k in zip(neurons.masks, keep):
        assert torch.equal(m, k.to(m.dtype))
    neurons.set_targets([torch.ones_like(k) for k in keep])
    neurons.move(0.01)  # a dropped neuron can come back until the last pruning step
    assert all(float(m.min()) == pytest.approx(0.01) for m in neurons.masks)
    neurons.close()


def test_compacting_keeps_the_masked_function_and_shrinks_the_model():
    model = tiny_model("llama")
    ids = batch(model)
    neurons = FFNNeurons(model)
    keep = [torch.arange(m.numel()) % 4 != 1 for m in neurons.masks]
    neurons.set_targets(keep)
    neurons.finalize()
    with torch.no_grad():
        masked = loss_of(model, ids)[1]
    neurons.close()
    n_before = sum(p.numel() for p in model.parameters())
    removed = compact_ffn(model, keep)
    assert removed == sum(int((~k).sum()) * neuron_cost(m) for k, m in zip(keep, gated_mlps(model)))
    assert sum(p.numel() for p in model.parameters()) == n_before - removed
    assert all(m.down_proj.weight.shape[1] == int(k.sum()) for m, k in zip(gated_mlps(model), keep))
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, ids)[1], masked, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="gated MLPs"):
        FFNNeurons(tiny_model("gpt2"))


def test_tune_apt_prunes_heads_and_neurons_jointly_under_the_budget():
    from headsparse import HeadPlan
    from headsparse.patch.core import is_patched
    from headsparse.recipes.tuning.apt import tune_apt
    from headsparse.recipes.tasks import synthetic_task, tiny_llama

    model = tiny_llama(seed=0, heads=4, kv_heads=2)
    task = synthetic_task(n_pool=48, n_targets=12, n_eval=4, seed=0)
    plan = HeadPlan([["t", "f", "f", "f"], ["f", "t", "f", "f"], ["f", "f", "f", "t"]], num_kv_heads=2, model_family="llama")
    params_before = sum(p.numel() for p in model.parameters())
    res = tune_apt(model, plan, task.pool, keep_final=0.5, n_prunings=3, epochs=3, batch_size=8, lr=1e-3,
                   progress=False, ffn=True, mask_step=0.05, distill_max=0.0)
    hist = res.info["prune_history"]
    assert [h["retained_target"] for h in hist][-1] == pytest.approx(0.5)
    assert all(h["retained_params"] <= h["retained_target"] + 1e-9 for h in hist)  # never over the budget
    assert hist[-1]["ffn_removed"] and not any(h["ffn_removed"] for h in hist[:-1])
    kept = res.info["ffn_neurons_kept"]
    mlps = [layer.mlp for layer in model.model.layers]
    assert [m.down_proj.weight.shape[1] for m in mlps] == kept and sum(kept) < 3 * 128  # physically smaller
    assert sum(p.numel() for p in model.parameters()) < params_before
    final = res.info["plan"]
    assert all(final.modes[i][h].value == "train" for i, h in ((0, 0), (1, 1), (2, 3)))  # TRAIN heads stay
    assert is_patched(model) and all(math.isfinite(x) for x in res.losses)
    with torch.no_grad():  # the compacted, patched model runs
        model(input_ids=torch.tensor([task.pool[0]["input_ids"]]))


def test_teacher_is_refreshed_only_on_a_dev_improvement_and_mu_follows_its_schedule(monkeypatch):
    import headsparse.recipes.tuning.apt as apt
    from headsparse import HeadPlan
    from headsparse.recipes.tasks import synthetic_task, tiny_llama

    taken = []
    real = apt.snapshot

    def counting_snapshot(model, *args):
        taken.append(sum(float(p.detach().double().sum()) for p in model.parameters()))
        return real(model, *args)

    monkeypatch.setattr(apt, "snapshot", counting_snapshot)
    scores = iter([0.55, 0.5, 0.4, 0.6])  # the starting model first: 0.55 is the bar
    model = tiny_llama(seed=0)
    task = synthetic_task(n_pool=48, n_targets=12, n_eval=4, seed=0)
    plan = HeadPlan([["t", "f", "f", "f"], ["f", "t", "f", "f"], ["f", "f", "f", "t"]], num_kv_heads=2, model_family="llama")
    res = apt.tune_apt(model, plan, task.pool, keep_final=0.5, n_prunings=3, epochs=3, batch_size=8, lr=1e-2,
                       prune_start=0.1, prune_end=0.6, progress=False, distill_max=0.8,
                       dev_fn=lambda m: next(scores))
    hist = res.info["prune_history"]
    assert [h["dev"] for h in hist] == [0.5, 0.4, 0.6]
    assert [h["teacher_refreshed"] for h in hist] == [False, False, True]  # only 0.6 beats the start's 0.55
    assert len(taken) == 2 and len(set(taken)) == 2  # the start, then one trained state
    # mu: 0 until the window opens, linear to distill_max at its end, then flat
    total, t_start, t_end = 18, 1, 10  # 48 examples / 8 = 6 steps x 3 epochs
    want = [0.8 * min(1.0, max(0.0, (s - t_start) / (t_end - t_start))) for s in range(total)]
    assert res.info["mu"] == pytest.approx(want)


def test_teacher_snapshot_folds_the_soft_masks():
    from headsparse.recipes.tuning.apt_blocks import snapshot

    model = tiny_model("llama")
    ids = batch(model)
    neurons = FFNNeurons(model)
    neurons.set_targets([torch.arange(m.numel()) % 2 == 0 for m in neurons.masks])
    for _ in range(40):
        neurons.move(0.01)  # dropped neurons at 0.6: a soft mask, not 0/1
    with torch.no_grad():
        masked = loss_of(model, ids)[1]
        teacher = snapshot(model, neurons)
        torch.testing.assert_close(loss_of(teacher, ids)[1], masked, rtol=1e-10, atol=1e-12)
    assert not any(m._forward_pre_hooks for m in teacher.modules())  # no hook of the student's left
    neurons.close()
