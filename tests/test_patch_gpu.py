"""A patched model on the GPU (through ``auto``: the torch backend's sdpa path by default, the Triton backend with
HEADSPARSE_ENABLE_UNVALIDATED_TRITON=1) against the float64 CPU model.

Skipped without a CUDA GPU. Compares logits and the trainable slices' gradients
by relative norm error, with a sparse plan (TRAIN, FROZEN and PRUNED heads, a
ragged GQA group) in exact mode, in float32 and bfloat16.
"""
import copy

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from _hs_models import batch, full_layout_grads, loss_of, ref_layout_grads, tiny_model, zero_pruned_o

pytestmark = pytest.mark.gpu

# relative norm error bounds: float32 lands near 1e-6, bfloat16 operands between 1e-3 and 1e-2
REL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("auto", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_on_gpu_matches_float64_cpu(family, dtype, auto, monkeypatch):
    monkeypatch.setenv("HEADSPARSE_ENABLE_UNVALIDATED_TRITON", "1" if auto == "triton" else "0")
    ref = tiny_model(family, heads=4, kv_heads=2)
    nkv = getattr(ref.config, "num_key_value_heads", None) or ref.config.num_attention_heads
    plan = HeadPlan([["f", "t", "f", "p"], ["t", "f", "f", "t"], ["f", "t", "p", "f"]], num_kv_heads=nkv, model_family=family)
    zero_pruned_o(ref, plan)
    model = copy.deepcopy(ref).to(device="cuda", dtype=dtype)
    hs.patch(model, plan, grad="exact")
    ids = batch(model, b=3, s=67)
    loss, out = loss_of(model, ids.cuda())
    loss_ref, out_ref = loss_of(ref, ids)
    assert torch.isfinite(out).all()
    assert _rel(out, out_ref) < REL[dtype], _rel(out, out_ref)
    loss.backward()
    loss_ref.backward()
    grads, masks = full_layout_grads(model)
    checked = 0
    for g, m, r in zip(grads, masks, ref_layout_grads(ref)):
        for key in g:
            gw, mw, rw = g[key][0], m[key][0], r[key][0]
            if mw.sum() == 0:
                continue
            mw = mw.double().cpu()
            err = _rel(gw.double().cpu() * mw, rw * mw)
            assert err < 3 * REL[dtype], (key, err)
            checked += 1
    assert checked > 0
    hs.unpatch(model)
