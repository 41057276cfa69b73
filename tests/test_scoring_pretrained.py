"""Every scoring method runs on SmolLM2-135M (Llama, GQA 9/3) and MiniLM-L6 (BERT) on a handful of short texts."""
import pytest
import torch

import headsparse as hs
from test_scoring import ref_gradient

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of Italy is Rome.",
    "A cat sat quietly on the warm mat.",
    "Attention heads can be pruned without much loss.",
    "Water boils at one hundred degrees.",
]



def _check(s, layers, heads, kv, family):
    assert s.scores.shape == (layers, heads)
    assert torch.isfinite(s.scores).all() and (s.scores >= 0).all()
    assert s.num_samples == len(TEXTS) and s.num_kv_heads == kv and s.model_family == family
    plan = s.to_plan(fraction=0.1)
    assert plan.count("train") == round(0.1 * layers * heads)


@pytest.mark.parametrize("method", ["gradient", "apt", "hifi", "alps", "random"])
def test_smollm2_methods(smol, method):
    tok, model = smol
    kw = {"steps": 1} if method == "alps" else {}
    s = hs.score_heads(model, TEXTS, method, tokenizer=tok, batch_size=2, max_length=16, **kw)
    _check(s, 30, 9, 3, "llama")
    if method == "hifi":
        torch.testing.assert_close(s.scores.sum(-1), torch.full((30,), 9.0, dtype=torch.float64))
    if method in ("gradient", "apt", "alps"):
        assert s.scores.std() > 0


def test_smollm2_gradient_matches_gates(smol):
    tok, model = smol
    tok.padding_side = "right"
    enc = tok(TEXTS[:2], return_tensors="pt", padding=True)
    data = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]
    s = hs.score_heads(model, data, "gradient")
    torch.testing.assert_close(s.scores, ref_gradient(model, data), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["gradient", "apt", "hifi", "alps", "random"])
def test_minilm_methods(minilm, method):
    tok, model = minilm
    kw = {"steps": 2} if method == "alps" else {}
    s = hs.score_heads(model, TEXTS, method, tokenizer=tok, batch_size=4, max_length=32, **kw)
    _check(s, 6, 12, 12, "bert")
