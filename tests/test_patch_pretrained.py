"""headsparse.patch on real pretrained weights: SmolLM2-135M (Llama, GQA 9/3) and MiniLM-L6 (BERT), float32."""
import copy

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from _hs_models import full_layout_grads, ref_layout_grads, zero_pruned_o

pytestmark = pytest.mark.slow



def _smol_plan(model, modes_fn):
    c = model.config
    return HeadPlan([[modes_fn(i, h) for h in range(c.num_attention_heads)] for i in range(c.num_hidden_layers)],
                    num_kv_heads=c.num_key_value_heads, model_family="llama")


def test_smollm2_logits_padding_and_pruning(smol):
    tok, ref = smol
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(["The capital of Italy is", "Hello"], return_tensors="pt", padding=True)
    plan = _smol_plan(ref, lambda i, h: "train" if (i, h) in {(29, 0), (20, 4)} else "frozen")
    model = hs.patch(copy.deepcopy(ref), plan)
    with torch.no_grad():
        lp = model(**enc).logits
        lr = ref(**enc).logits
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(lp[keep], lr[keep], rtol=1e-4, atol=2e-4)
    assert tok.decode(lp[0, -1].argmax()) == " Rome"
    # prune a third of the heads (including whole KV groups in some layers)
    pplan = _smol_plan(ref, lambda i, h: "pruned" if (i * 9 + h) % 3 == 0 or (i % 5 == 0 and h < 3) else "frozen")
    pruned = hs.patch(copy.deepcopy(ref), pplan)
    zref = zero_pruned_o(copy.deepcopy(ref), pplan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**enc).logits[keep], zref(**enc).logits[keep], rtol=1e-4, atol=2e-4)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in ref.parameters())


def test_smollm2_sparse_plan_exact_gradients(smol):
    tok, ref0 = smol
    ids = tok("Head-sparse tuning trains only the attention heads that matter.", return_tensors="pt").input_ids
    plan = _smol_plan(ref0, lambda i, h: "train" if (i, h) in {(27, 1), (27, 5), (29, 8)} else
                      ("pruned" if (i, h) == (28, 0) else "frozen"))
    ref = zero_pruned_o(copy.deepcopy(ref0), plan)
    for n, p in ref.named_parameters():  # the slices' gradients do not depend on these; skip their weight grads
        p.requires_grad_(any(f"layers.{i}." in n for i in (27, 28, 29)))
    model = hs.patch(copy.deepcopy(ref0), plan)
    model(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    grads, masks = full_layout_grads(model)
    refg = ref_layout_grads(ref)
    for i in (27, 28, 29):
        for key in ("q", "k", "v", "o"):
            scale = refg[i][key][0].abs().max()
            torch.testing.assert_close(grads[i][key][0], refg[i][key][0] * masks[i][key][0], rtol=1e-3,
                                       atol=1e-4 * float(scale))
    assert masks[27]["q"][0].sum() == 2 * 64 * 576 and masks[27]["k"][0].sum() == 2 * 64 * 576  # kv 0 and 1
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (3 + 3 + 3 + 3) * 64 * 576  # Q rows, O columns of 3 heads; K, V rows of 3 KV heads


def test_minilm_matches_and_exact_gradients(minilm):
    tok, ref0 = minilm
    enc = tok(["a cat sat on the mat", "feline"], return_tensors="pt", padding=True)
    plan = HeadPlan([["t" if (i, h) in {(4, 3), (5, 0), (5, 11)} else "f" for h in range(12)] for i in range(6)],
                    model_family="bert")
    model = hs.patch(copy.deepcopy(ref0), plan)
    ref = copy.deepcopy(ref0)
    hp = model(**enc).last_hidden_state
    hr = ref(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(hp[keep], hr[keep], rtol=1e-4, atol=1e-4)
    w = torch.randn(hp.shape, generator=torch.Generator().manual_seed(0)) * enc["attention_mask"][..., None]
    (hp * w).sum().backward()
    (hr * w).sum().backward()
    grads, masks = full_layout_grads(model)
    refg = ref_layout_grads(ref)
    for i in (4, 5):
        for key in ("q", "k", "v", "o"):
            scale = refg[i][key][0].abs().max()
            torch.testing.assert_close(grads[i][key][0], refg[i][key][0] * masks[i][key][0], rtol=1e-3,
                                       atol=1e-4 * float(scale))
