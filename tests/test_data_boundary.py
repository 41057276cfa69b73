"""Data entering scoring, mining and tuning is checked once at the boundary: an out-of-vocabulary id names its
record (or batch) and field instead of an IndexError from deep inside the embedding."""
import copy

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.recipes.data import as_examples, check_token_ids
from headsparse.recipes.tasks import tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=0, layers=2, heads=4, kv_heads=2, vocab=100)
    plan = HeadPlan([["t", "f", "f", "f"], ["f", "t", "f", "f"]], num_kv_heads=2, model_family="llama")
    good = [{"input_ids": [5, 6, 7, 8]} for _ in range(6)]
    return model, plan, good


def test_check_token_ids_boundaries():
    check_token_ids([0, 99], 100, "x")
    check_token_ids([-100, 3], 100, "x", "labels", ignore=-100)
    for ids in ([100], [-1], [3, 250]):
        with pytest.raises(ValueError, match=r"x: input_ids holds token id -?\d+, outside the model's vocabulary of 100"):
            check_token_ids(ids, 100, "x")
    with pytest.raises(ValueError, match=r"pool\[1\]: labels holds token id 120"):
        as_examples([{"input_ids": [1, 2]}, {"input_ids": [1, 2], "labels": [-100, 120]}], "pool", 100)
    with pytest.raises(ValueError, match=r"pool\[1\]: input_ids holds token id 100"):  # tensor pools too
        as_examples(torch.tensor([[1, 2], [3, 100]]), "pool", 100)


def test_mine_tune_score_name_the_bad_record(setup):
    model, plan, good = setup
    bad = good[:3] + [{"input_ids": [5, 6, 1000, 8]}] + good[3:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("p2d", "random", "loss"):
        with pytest.raises(ValueError, match=r"pool\[3\]: input_ids holds token id 1000"):
            hs.mine(model, bad, plan, method=method, fraction=0.5, target=good[:2])
    with pytest.raises(ValueError, match=r"target\[0\]: input_ids holds token id 1000"):
        hs.mine(model, good, plan, method="p2d", fraction=0.5, target=bad[3:4])
    with pytest.raises(ValueError, match=r"data\[3\]: input_ids holds token id 1000"):
        hs.tune(copy.deepcopy(model), plan, bad, progress=False)
    batches = [{"input_ids": torch.tensor([[5, 6, 7]])}, {"input_ids": torch.tensor([[5, 100, 7]])}]
    with pytest.raises(ValueError, match=r"batch 1: input_ids holds token id 100"):
        hs.score_heads(model, batches, method="gradient")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
