"""headsparse.mine: P2D finds planted target examples, signatures are the gate gradients, SLAP diversity, errors."""
import random

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.recipes.data import collate, per_sample_loss
from headsparse.recipes.mining import (compose_batches, loss_strata, mean_intra_batch_distance, patched_for, probe,
                                       relative_distances)
from headsparse.patch.core import is_patched
from headsparse.recipes.tasks import synthetic_task, tiny_llama
from _hs_models import input_keeper, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def _plan_top_heads(model, task, frac=0.25):
    scores = hs.score_heads(model, [collate(task.target, 0)], method="gradient").scores
    return HeadPlan.from_scores(scores, fraction=frac, num_kv_heads=model.config.num_key_value_heads,
                                model_family="llama")


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=0, layers=3, heads=8, kv_heads=4)
    task = synthetic_task(n_pool=100, n_targets=10, n_target_set=8, n_eval=8, seed=1)
    plan = _plan_top_heads(model, task)
    return model, task, plan


def test_p2d_recall_of_planted_targets_well_above_random(setup):
    model, task, plan = setup
    res = hs.mine(model, task.pool, plan, method="p2d", fraction=0.1, target=task.target)
    pr = res.precision_recall(task.is_target)
    # random selection of 10 from 100 with 10 targets: expected recall 0.10
    assert pr["recall"] >= 0.6, pr
    rnd = [hs.mine(model, task.pool, plan, method="random", fraction=0.1, seed=s).precision_recall(task.is_target)
           ["recall"] for s in range(20)]
    assert sum(rnd) / len(rnd) < 0.25
    assert len(res.indices) == 10 and len(set(res.indices)) == 10
    assert res.scores.shape == (100,)
    assert res.info["signature_dim"] == plan.count("train")
    # the model given was not patched or changed
    assert not is_patched(model)


def test_less_recall_above_random(setup):
    model, task, plan = setup
    res = hs.mine(model, task.pool, plan, method="less", fraction=0.1, target=task.target)
    assert res.precision_recall(task.is_target)["recall"] >= 0.4


def test_gate_signature_is_the_per_sample_gate_gradient():
    """probe()'s P2D signature equals sum_t <X_h, dL_b/dX_h> at the o_proj input of an unpatched float64 model."""
    ref = tiny_model("llama", layers=3, heads=4, kv_heads=2)
    plan = HeadPlan([["f", "t", "f", "t"], ["t", "f", "f", "f"], ["f", "f", "t", "f"]], num_kv_heads=2, model_family="llama")
    g = torch.Generator().manual_seed(3)
    ex = [{"input_ids": torch.randint(3, 1000, (n,), generator=g).tolist()} for n in (9, 12, 7)]
    ex[1]["labels"] = [-100] * 8 + ex[1]["input_ids"][8:]
    with patched_for(ref, plan) as m:
        sig = probe(m, ex, batch_size=2, gate=True)["gate"]  # batches of 2 and 1, padded
    xs = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(input_keeper(xs, i))
               for i, layer in enumerate(ref.model.layers)]
    b = collate(ex, 0)
    out = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    per_sample_loss(out.logits, b["labels"]).sum().backward()
    for h in handles:
        h.remove()
    mask = b["attention_mask"].unsqueeze(-1).double()
    cols = []
    for i, h in [(i, h) for i in range(3) for h in plan.heads(i, "train")]:
        x, gr = xs[i][..., h * 16:(h + 1) * 16], xs[i].grad[..., h * 16:(h + 1) * 16]
        cols.append((x * gr * mask).sum((1, 2)))
    want = torch.stack(cols, 1)
    torch.testing.assert_close(sig.double(), want, rtol=1e-4, atol=1e-6)
    assert want.abs().min() > 0  # not a trivially-zero comparison


def test_mine_does_not_depend_on_batch_composition(setup):
    model, task, plan = setup
    with patched_for(model, plan) as m:
        a = probe(m, task.pool[:6], batch_size=6, gate=True, sketch_k=4)
        b = probe(m, task.pool[:6], batch_size=1, gate=True, sketch_k=4)
    torch.testing.assert_close(a["gate"], b["gate"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(a["sketch"], b["sketch"], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)


def test_compose_batches_diverse_and_stratified():
    # 4 tight clusters of 6 points; batches of 4 should take one point of each cluster
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 8) * 5
    emb = torch.cat([c + 0.05 * torch.randn(6, 8, generator=g) for c in centers])
    cluster = torch.arange(24) // 6
    dist = relative_distances(emb)
    strata = torch.zeros(24, dtype=torch.long)
    batches, scores, _ = compose_batches(dist, strata, None, budget=12, batch_size=4, n_candidates=3)
    assert [len(b) for b in batches] == [4, 4, 4]
    for b in batches:
        assert sorted(int(cluster[i]) for i in b) == [0, 1, 2, 3]
    # stratified: quotas follow stratum sizes
    loss = torch.arange(24, dtype=torch.float)
    st = loss_strata(loss, 4)
    assert [int((st == s).sum()) for s in range(4)] == [6, 6, 6, 6]
    batches, _, _ = compose_batches(dist, st, None, budget=8, batch_size=4)
    chosen = [i for b in batches for i in b]
    assert sorted(int((st[chosen] == s).sum()) for s in range(4)) == [2, 2, 2, 2]


def test_compose_batches_curvature_score_picks_aligned_batch():
    # two strata-free groups; gradients of group A agree, of group B cancel: A's batch must win
    dist = torch.ones(8, 8) - torch.eye(8)
    grads = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    batches, scores, sample_scores = compose_batches(dist, torch.zeros(8, dtype=torch.long), grads, budget=4,
                                                     batch_size=4, n_candidates=16, generator=gen)
    gb = grads[batches[0]].mean(0)
    assert scores[0] > 0
    assert abs(float(gb[0])) >= 0.5  # the chosen batch is not a cancelling one
    assert (sample_scores[batches[0]] == scores[0]).all()


def test_slap_batches_more_diverse_than_random(setup):
    model, task, plan = setup
    res = hs.mine(model, task.pool, plan, method="slap", fraction=0.4, batch_size=8)
    sel = res.selector
    dist = sel.last["dist"]
    assert sum(len(b) for b in res.batches) == 40 and len(set(res.indices)) == 40
    slap = mean_intra_batch_distance(dist, res.batches)
    rng = random.Random(0)
    rnd = [mean_intra_batch_distance(dist, [rng.sample(range(100), 8) for _ in range(5)]) for _ in range(20)]
    assert slap > max(rnd), (slap, max(rnd))
    # strata quotas: 4 loss strata of 25, 10 picked from each
    st = sel.last["strata"]
    assert sorted(int((st[res.indices] == s).sum()) for s in range(4)) == [10, 10, 10, 10]


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope"), "method"),
    (dict(method="p2d"), "target"),
    (dict(method="less"), "target"),
    (dict(method="random", fraction=0.0), "fraction"),
    (dict(method="random", fraction=1.5), "fraction"),
    (dict(method="random", batch_size=0), "batch_size"),
])
def test_mine_rejects_bad_arguments(setup, kwargs, match):
    model, task, plan = setup
    with pytest.raises(ValueError, match=match):
        hs.mine(model, task.pool, plan, **kwargs)


def test_mine_rejects_bad_pool_and_plan(setup):
    model, task, plan = setup
    with pytest.raises(ValueError, match="pool"):
        hs.mine(model, [], plan, method="random")
    with pytest.raises(ValueError, match="input_ids"):
        hs.mine(model, [{"ids": [1, 2]}], plan, method="random")
    with pytest.raises(ValueError, match="plan"):
        hs.mine(model, task.pool, "plan", method="random")
    wrong = HeadPlan.uniform(2, 8, 4, "train")
    with pytest.raises(ValueError, match="num layers"):
        hs.mine(model, task.pool, wrong, method="p2d", target=task.target)
