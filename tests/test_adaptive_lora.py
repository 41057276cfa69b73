"""APT's adaptive tuning pieces: growing an adapter keeps the function, importance is |sum_j A_ij dL/dA_ij|, and a
growth step hits its parameter target with the top half of the adapters."""
import copy

import pytest
import torch

from headsparse.recipes.tuning.adaptive_lora import GrowingLoRA, add_adapters, grow_to_budget
from _hs_models import batch, loss_of, tiny_model


def _trained_adapters():
    model = tiny_model("llama")
    adapters = add_adapters(model, ("q_proj", "v_proj"), rank=4)
    ids = batch(model)
    opt = torch.optim.SGD([p for a in adapters.values() for p in (a.lora_A, a.lora_B)], lr=0.1)
    for _ in range(2):  # B moves away from zero, so the adapters change the function
        loss_of(model, ids)[0].backward()
        opt.step()
        opt.zero_grad()
    return model, adapters, ids


def test_growing_an_adapter_leaves_the_output_unchanged():
    model, adapters, ids = _trained_adapters()
    with torch.no_grad():
        before = loss_of(model, ids)[1]
    assert any(float(a.lora_B.detach().abs().sum()) > 0 for a in adapters.values())
    for a in adapters.values():
        a.grow(a.rank * 3)
    with torch.no_grad():
        after = loss_of(model, ids)[1]
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert all(a.rank == 12 and a.lora_A.requires_grad for a in adapters.values())
    with pytest.raises(ValueError, match="only grows"):
        next(iter(adapters.values())).grow(2)


def test_only_adapters_train_and_importance_is_the_published_formula():
    model, adapters, ids = _trained_adapters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    loss_of(model, ids)[0].backward()
    for a in adapters.values():
        want = (a.lora_A.detach().double() * a.lora_A.grad.double()).sum(1).abs()
        torch.testing.assert_close(a.importance(), want, rtol=1e-12, atol=0)
    fresh = GrowingLoRA(torch.nn.Linear(8, 4).double(), rank=2)
    assert torch.equal(fresh.importance(), torch.zeros(2, dtype=torch.float64))


def test_growth_step_hits_the_target_with_the_top_half():
    base = [torch.nn.Linear(64, 64).double() for _ in range(8)]
    adapters = [GrowingLoRA(b, rank=8) for b in base]
    imp = [0.1, 5.0, 0.2, 4.0, 3.0, 0.3, 2.0, 0.05]
    start = sum(a.tuning_params() for a in adapters)
    ranks = grow_to_budget(adapters, imp, target_params=2 * start, max_rank=64)
    top = {1, 3, 4, 6}
    assert all(r == 8 for i, r in enumerate(ranks) if i not in top)  # the bottom half keeps its rank
    grown = [ranks[i] for i in top]
    assert len(set(grown)) == 1 and grown[0] > 8  # one common factor
    total = sum(a.tuning_params() for a in adapters)
    assert total <= 2 * start and total + 4 * 128 > 2 * start  # one more rank step each would overshoot
    capped = grow_to_budget([GrowingLoRA(torch.nn.Linear(64, 64).double(), rank=8)], [1.0], 10 ** 9, max_rank=64)
    assert capped == [64]
