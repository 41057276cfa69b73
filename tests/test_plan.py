"""HeadPlan: construction, KV policy, scores, persistence, checks against models."""
import json
import os

import pytest
import torch

import headsparse as hs
from headsparse import HeadMode, HeadPlan


def test_modes_parse_and_shape():
    p = HeadPlan([["train", "F", HeadMode.PRUNED, "frozen"], ["t", "t", "f", "p"]], num_kv_heads=2, model_family="llama")
    assert p.num_layers == 2 and p.num_q_heads == 4 and p.num_kv_heads == 2 and p.group_size == 2
    assert p.modes[0] == [HeadMode.TRAIN, HeadMode.FROZEN, HeadMode.PRUNED, HeadMode.FROZEN]
    assert p.heads(1, "train") == [0, 1] and p.heads(1, HeadMode.PRUNED) == [3]
    assert p.train_mask(0).tolist() == [True, False, False, False]
    assert p.pruned_mask(1).tolist() == [False, False, False, True]
    assert p.count("train") == 3 and p.count("pruned") == 2
    assert p.trainable_fraction == pytest.approx(3 / 8)
    assert p.pruned_fraction == pytest.approx(2 / 8)


@pytest.mark.parametrize("bad, match", [
    ([], "at least one layer"),
    ([[]], "no heads"),
    ([["t", "f"], ["t"]], "layer 1 has 1 heads"),
    ([["t", "q"]], "head mode"),
    ("tf", "sequence"),
])
def test_bad_modes(bad, match):
    with pytest.raises(ValueError, match=match):
        HeadPlan(bad)


def test_bad_kv_and_policy():
    with pytest.raises(ValueError, match="num_kv_heads"):
        HeadPlan([["t", "f", "f", "f"]], num_kv_heads=3)
    with pytest.raises(ValueError, match="kv_policy"):
        HeadPlan([["t", "f"]], kv_policy="some")


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_bad_num_kv_heads_message_names_the_query_heads(bad):
    """Every bad num_kv_heads is told what it must divide, not only a non-divisor (the type check alone said
    'a positive int' and dropped the head count)."""
    with pytest.raises(ValueError, match=r"num_kv_heads must be .*divisor of the 4 query heads.*, got " + repr(bad)):
        HeadPlan([["t", "f", "f", "f"]], num_kv_heads=bad)


def test_kv_policies_and_pruned_groups():
    modes = [["t", "f", "f", "f", "p", "p"], ["t", "t", "p", "f", "f", "f"]]
    any_ = HeadPlan(modes, num_kv_heads=3, kv_policy="any")
    all_ = HeadPlan(modes, num_kv_heads=3, kv_policy="all")
    none = HeadPlan(modes, num_kv_heads=3, kv_policy="none")
    assert any_.kv_trainable(0) == [True, False, False]
    assert all_.kv_trainable(0) == [False, False, False]
    assert any_.kv_trainable(1) == [True, False, False]
    assert all_.kv_trainable(1) == [True, False, False]  # group 1: only head 3 is unpruned and it is frozen
    assert none.kv_trainable(1) == [False, False, False]
    assert any_.kv_pruned(0) == [False, False, True] and any_.kv_pruned(1) == [False, False, False]
    assert any_.kv_of(5) == 2


def test_lowest_trainable_layer():
    p = HeadPlan([["f", "f"], ["p", "f"], ["f", "t"], ["t", "t"]])
    assert p.lowest_trainable_layer == 2
    assert HeadPlan([["f", "p"]]).lowest_trainable_layer is None
    assert not p.layer_has_trainable(1) and p.layer_has_trainable(3)


def test_from_scores_global_fraction_and_prune():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.8, 0.05, 0.7, 0.6]])
    p = HeadPlan.from_scores(scores, fraction=0.25, prune_fraction=0.25, num_kv_heads=2)
    assert p.heads(0, "train") == [1] and p.heads(1, "train") == [0]
    assert sorted((i, h) for i in range(2) for h in p.heads(i, "pruned")) == [(0, 0), (1, 1)]
    assert p.count("frozen") == 4
    # threshold prunes below it but never a TRAIN head
    q = HeadPlan.from_scores(scores, fraction=0.25, prune_threshold=0.85)
    assert q.heads(0, "pruned") == [0, 2, 3] and q.heads(0, "train") == [1]


def test_from_scores_per_layer_and_ties():
    scores = [[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]
    p = HeadPlan.from_scores(scores, per_layer_k=1)
    assert p.heads(0, "train") == [0] and p.heads(1, "train") == [1]  # ties break towards the lower index
    assert HeadPlan.from_scores(scores, fraction=0.01).count("train") == 1  # at least one head


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one"),
    (dict(fraction=0.5, per_layer_k=1), "exactly one"),
    (dict(fraction=1.5), "fraction"),
    (dict(per_layer_k=9), "per_layer_k"),
    (dict(fraction=0.5, prune_fraction=-1), "prune_fraction"),
    (dict(fraction=0.5, prune_threshold=float("nan")), "prune_threshold"),
])
def test_from_scores_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeadPlan.from_scores([[1.0, 2.0], [3.0, 4.0]], **kwargs)


def test_from_scores_bad_scores():
    with pytest.raises(ValueError, match="shape"):
        HeadPlan.from_scores([1.0, 2.0], fraction=0.5)
    with pytest.raises(ValueError, match="finite"):
        HeadPlan.from_scores([[1.0, float("nan")]], fraction=0.5)


def test_save_load_roundtrip(tmp_path):
    p = HeadPlan([["t", "f", "p", "f"], ["f", "f", "t", "t"]], num_kv_heads=2, kv_policy="all", model_family="qwen2")
    path = tmp_path / "plan.json"
    p.save(path)
    d = json.loads(path.read_text())
    assert d["model_family"] == "qwen2" and d["num_layers"] == 2 and d["num_q_heads"] == 4 and d["num_kv_heads"] == 2
    q = HeadPlan.load(path)
    assert q == p and q is not p
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # temp file renamed away


def test_load_rejects_bad_files(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="does not parse"):
        HeadPlan.load(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a headsparse HeadPlan"):
        HeadPlan.load(path)
    d = HeadPlan([["t", "f"]]).to_dict()
    d["num_layers"] = 3
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="num_layers=3"):
        HeadPlan.load(path)


def test_summary_is_per_layer():
    p = HeadPlan([["t", "f", "p", "f"], ["f", "f", "f", "f"]], num_kv_heads=2)
    s = p.summary()
    assert "layer 0: T.x.  kv T." in s and "layer 1: ....  kv .." in s
    assert "lowest trainable layer: 0" in s and "train 1 (12.5%)" in s


def test_uniform_and_check_model():
    from _hs_models import tiny_model

    m = tiny_model("llama", layers=2)
    p = HeadPlan.for_model(m, "frozen")
    assert (p.num_layers, p.num_q_heads, p.num_kv_heads, p.model_family) == (2, 4, 2, "llama")
    p.check_model(m)
    with pytest.raises(ValueError, match="num layers: plan has 3, model has 2"):
        HeadPlan.uniform(3, 4, 2).check_model(m)
    with pytest.raises(ValueError, match="query heads per layer: plan has 8"):
        HeadPlan.uniform(2, 8, 2).check_model(m)
    with pytest.raises(ValueError, match="KV heads per layer: plan has 4, model has 2"):
        HeadPlan.uniform(2, 4, 4).check_model(m)
    with pytest.raises(ValueError, match="model family: plan is for 'gpt2'"):
        HeadPlan.uniform(2, 4, 2, model_family="gpt2").check_model(m)
    with pytest.raises(ValueError, match="num_layers"):
        HeadPlan.uniform(0, 4)
    assert hs.HeadPlan is HeadPlan


# ------------------------------------------------- one way from scores to a plan; placement; family required
def _scored(layers=4, heads=4, kv_heads=2):
    from _hs_models import tiny_model

    model = tiny_model("llama", layers=layers, heads=heads, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 1000, (2, 9), generator=g)}]
    return model, hs.score_heads(model, data, method="gradient")


def test_from_scores_takes_head_scores_and_their_shape():
    model, scores = _scored()
    plan = HeadPlan.from_scores(scores, fraction=0.25)
    assert (plan.model_family, plan.num_kv_heads) == ("llama", 2)
    assert plan == scores.to_plan(fraction=0.25)  # one rule behind both spellings
    assert plan == HeadPlan.from_scores(scores.scores, fraction=0.25, num_kv_heads=2, model_family="llama")
    top = set(scores.ranking()[:4])
    assert {(i, h) for i in range(4) for h in plan.heads(i, "train")} == top
    hs.patch(model, plan)  # fits the model it was scored on
    with pytest.raises(ValueError, match="model_family='gpt2' disagrees with the HeadScores"):
        HeadPlan.from_scores(scores, fraction=0.25, model_family="gpt2")
    with pytest.raises(ValueError, match="num_kv_heads=4 disagrees"):
        HeadPlan.from_scores(scores, fraction=0.25, num_kv_heads=4)


def test_the_fraction_argument_has_one_name_and_the_old_ones_warn():
    s = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.8, 0.05, 0.7, 0.6]])
    with pytest.warns(FutureWarning, match="top_fraction= is deprecated, use fraction="):
        old = HeadPlan.from_scores(s, top_fraction=0.25)
    assert old == HeadPlan.from_scores(s, fraction=0.25)
    with pytest.warns(FutureWarning, match="top_k_per_layer= is deprecated, use per_layer_k="):
        assert HeadPlan.from_scores(s, top_k_per_layer=1) == HeadPlan.from_scores(s, per_layer_k=1)
    with pytest.raises(ValueError, match="give fraction only"):
        HeadPlan.from_scores(s, fraction=0.25, top_fraction=0.25)
    with pytest.raises(TypeError, match="unexpected keyword argument 'topfraction'.*fraction, per_layer_k"):
        HeadPlan.from_scores(s, topfraction=0.25)
    import inspect

    from headsparse.recipes.scoring import HeadScores
    from headsparse.recipes.scoring.cli import add_parser
    import argparse

    assert {"fraction", "per_layer_k", "layers"} <= set(inspect.signature(HeadPlan.from_scores).parameters)
    assert {"fraction", "per_layer_k", "layers"} <= set(inspect.signature(HeadScores.to_plan).parameters)
    p = add_parser(argparse.ArgumentParser().add_subparsers())
    dests = {a.dest for a in p._actions}
    assert {"fraction", "per_layer_k", "layers"} <= dests


def test_placement_restricts_train_heads_and_sets_the_horizon():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(8, 4, generator=g)
    spread = HeadPlan.from_scores(s, fraction=0.25, num_kv_heads=2, model_family="llama")
    top = HeadPlan.from_scores(s, fraction=0.25, layers=range(4, 8), num_kv_heads=2, model_family="llama")
    assert top.count("train") == spread.count("train") == 8  # the same number of heads, placed higher
    assert all(not top.heads(i, "train") for i in range(4))
    # within the allowed layers they are the highest-scoring heads there
    allowed = sorted(((float(s[i, h]), -i, -h) for i in range(4, 8) for h in range(4)), reverse=True)[:8]
    assert {(-i, -h) for _, i, h in allowed} == {(i, h) for i in range(8) for h in top.heads(i, "train")}
    assert top.lowest_trainable_layer == top.gradient_horizon == 4
    assert "gradient horizon: layer 4 (layers 0-3, 4 of 8, run without an autograd graph" in top.summary()
    assert spread.gradient_horizon == spread.lowest_trainable_layer
    per = HeadPlan.from_scores(s, per_layer_k=1, layers=[6, 7])
    assert [len(per.heads(i, "train")) for i in range(8)] == [0] * 6 + [1, 1]
    assert "gradient horizon: layer 6" in per.summary()
    none = HeadPlan.uniform(3, 2, mode="frozen")
    assert none.gradient_horizon == 3 and "gradient horizon: every layer (nothing trains)" in none.summary()
    assert "gradient horizon: none (layer 0 trains" in HeadPlan.uniform(3, 2).summary()
    with pytest.raises(ValueError, match=r"fraction=0.5 asks for 16 TRAIN heads but layers=range\(6, 8\) hold only 8"):
        HeadPlan.from_scores(s, fraction=0.5, layers=range(6, 8))
    with pytest.raises(ValueError, match="layers"):
        HeadPlan.from_scores(s, fraction=0.1, layers=range(6, 9))
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        HeadPlan.from_scores(s, fraction=0.1, layers=range(8, 8))
    with pytest.raises(ValueError, match="iterable of layer indices"):
        HeadPlan.from_scores(s, fraction=0.1, layers=4)


def test_a_placed_plan_has_no_graph_below_its_horizon():
    """Patched, the top-half plan's layers below the horizon save nothing for the backward; the one above do."""
    model, scores = _scored(layers=4)
    plan = scores.to_plan(fraction=0.25, layers=range(2, 4))
    assert plan.gradient_horizon == 2
    hs.patch(model, plan)
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple)
                                                                               else out).requires_grad))
    ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == {0: False, 1: False, 2: True, 3: True}


def test_patch_refuses_a_plan_without_a_family():
    from _hs_models import tiny_model

    model = tiny_model("gpt2", layers=2)
    plan = HeadPlan.uniform(2, 4, mode="frozen")
    with pytest.raises(ValueError, match=r"plan has no model_family.*HeadPlan.for_model\(model\).*model_family="
                                         r"model.config.model_type \(here 'gpt2'\)"):
        hs.patch(model, plan)
    assert not hasattr(model, "_headsparse_patch")
    plan.model_family = "gpt2"
    hs.patch(model, plan)
