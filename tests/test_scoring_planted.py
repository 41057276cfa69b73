"""A synthetic task with one planted necessary head: gradient and apt rank it first, hifi within its top 10 %."""
import math

import pytest
import torch

import headsparse as hs
from headsparse.recipes.scoring import model_info
from _hs_models import VOCAB, tiny_model

LAYER, HEAD = 1, 2


def _planted(family="llama"):
    """Tiny MHA model (3 layers x 4 heads, head dim 16). In layer 1, head 2's value rows are scaled up x8 and
    its output columns x4; every other head's output columns are scaled down x0.05, so the residual stream
    carries almost nothing but that head's contribution."""
    model = tiny_model(family, layers=3, heads=4, kv_heads=4, seed=11)
    info = model_info(model)
    d = 16
    with torch.no_grad():
        for i in range(3):
            attn = info.family.slots(info.layers[i])
            o = getattr(*attn["o"])
            for h in range(4):
                if (i, h) == (LAYER, HEAD):
                    o.weight[:, h * d:(h + 1) * d] *= 4
                    v = getattr(*attn["v"])
                    v.weight[h * d:(h + 1) * d] *= 8
                    if v.bias is not None:
                        v.bias[h * d:(h + 1) * d] *= 8
                else:
                    o.weight[:, h * d:(h + 1) * d] *= 0.05
    return model


def _task(model, n=4, b=4, s=24):
    """The task: predict the planted model's own greedy next tokens (labels shifted as in HF causal LMs)."""
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (b, s), generator=g)
        with torch.no_grad():
            pred = model(input_ids=ids).logits.argmax(-1)
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = pred[:, :-1]
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return data


def _accuracy(model, data, knock=None):
    """Task accuracy, optionally with one head's output columns zeroed."""
    info = model_info(model)
    d = 16
    o = info.o_module(knock[0]) if knock else None
    saved = o.weight[:, knock[1] * d:(knock[1] + 1) * d].clone() if knock else None
    try:
        if knock:
            with torch.no_grad():
                o.weight[:, knock[1] * d:(knock[1] + 1) * d] = 0
        hit = tot = 0
        with torch.no_grad():
            for b in data:
                pred = model(input_ids=b["input_ids"]).logits.argmax(-1)[:, :-1]
                lab = b["labels"][:, 1:]
                hit += int((pred == lab).sum())
                tot += lab.numel()
        return hit / tot
    finally:
        if knock:
            with torch.no_grad():
                o.weight[:, knock[1] * d:(knock[1] + 1) * d] = saved


@pytest.fixture(scope="module")
def planted():
    model = _planted()
    return model, _task(model)


def test_planted_head_is_necessary(planted):
    model, data = planted
    assert _accuracy(model, data) == 1.0
    assert _accuracy(model, data, (LAYER, HEAD)) < 0.3
    for i in range(3):
        for h in range(4):
            if (i, h) != (LAYER, HEAD):
                assert _accuracy(model, data, (i, h)) > 0.9, (i, h)


@pytest.mark.parametrize("method", ["gradient", "apt"])
def test_gradient_and_apt_rank_planted_head_first(planted, method):
    model, data = planted
    s = hs.score_heads(model, data, method)
    assert s.ranking()[0] == (LAYER, HEAD), s.scores
    plan = s.to_plan(fraction=1 / 12)
    assert plan.heads(LAYER, "train") == [HEAD] and plan.count("train") == 1


def test_hifi_ranks_planted_head_in_top_tenth(planted):
    model, data = planted
    s = hs.score_heads(model, data, "hifi")
    top = s.ranking()[: math.ceil(0.1 * 12)]
    assert (LAYER, HEAD) in top, s.scores
    assert int(s.scores[LAYER].argmax()) == HEAD


def test_random_baseline_does_not_know(planted):
    """The random baseline puts the planted head first for only about 1 in 12 seeds."""
    model, data = planted
    firsts = sum(hs.score_heads(model, data[:1], "random", seed=k).ranking()[0] == (LAYER, HEAD) for k in range(48))
    assert firsts < 12
