"""unpatch zeroes the K/V rows of fully pruned KV groups; headsparse.patch.core stays importable."""
from __future__ import annotations

import copy
import importlib

import torch

import headsparse as hs
from headsparse import HeadPlan
from _hs_models import tiny_model


def test_import_patch_core_submodule():
    import headsparse.patch.core as core  # noqa: F401  (raised ImportError before)

    assert core is importlib.import_module("headsparse.patch.core")
    assert callable(hs.patch) and hs.patch is core.patch


def test_unpatch_zeroes_fully_pruned_kv_group():
    ref = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    plan = HeadPlan([["t", "f", "p", "p"], ["p", "t", "f", "f"]], num_kv_heads=2, model_family="llama")  # layer 0: KV group 1 pruned
    model = hs.patch(copy.deepcopy(ref), plan)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    hs.unpatch(model)
    d = 64 // 4
    attn = model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        assert (proj.weight[d:2 * d] == 0).all()
        assert proj.weight[:d].abs().sum() > 0
    ref_attn = ref.model.layers[1].self_attn  # layer 1 has no fully pruned group: K/V unchanged
    torch.testing.assert_close(model.model.layers[1].self_attn.k_proj.weight, ref_attn.k_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-10, atol=1e-10)
