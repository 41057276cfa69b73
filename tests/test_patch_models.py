"""headsparse.patch on tiny random models of every supported family (float64): equality with the unpatched model."""
import copy

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from _hs_models import (FAMILIES, batch, full_layout_grads, is_decoder, loss_of, ref_layout_grads,
                        tiny_model, zero_pruned_o)

TOL = dict(rtol=1e-9, atol=1e-11)


def _kv(model):
    return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads


def _sparse_modes(family):
    # 3 layers x 4 heads; GQA families have 2 KV heads (groups {0,1} and {2,3})
    return [["f", "f", "f", "f"], ["f", "t", "f", "p"], ["t", "f", "f", "t"]]


def _same_outputs_and_grads(model, ref, plan):
    """The patched model's outputs equal the reference's, and so do the gradients the plan asks for."""
    ids = batch(model)
    lp, outp = loss_of(model, ids)
    lr, outr = loss_of(ref, ids)
    torch.testing.assert_close(outp, outr, **TOL)
    lp.backward()
    lr.backward()
    _check_grads(model, ref, plan)


def _check_grads(patched, ref, plan):
    """Trainable slices' gradients equal the reference gradients on those slices; nothing else has a gradient."""
    grads, masks = full_layout_grads(patched)
    refg = ref_layout_grads(ref)
    n_checked = 0
    for i, (g, m, r) in enumerate(zip(grads, masks, refg)):
        for key in g:
            gw, gb = g[key]
            mw, mb = m[key]
            rw, rb = r[key]
            torch.testing.assert_close(gw, rw * mw, **TOL, msg=f"layer {i} {key} weight grad")
            n_checked += int(mw.sum())
            if gb is not None and key != "o":
                torch.testing.assert_close(gb, rb * mb, **TOL, msg=f"layer {i} {key} bias grad")
    assert n_checked > 0
    assert all(p.grad is None for p in patched.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_train_matches_unpatched(family):
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    plan = HeadPlan.for_model(model, "train")
    hs.patch(model, plan)
    assert model.config._attn_implementation == "headsparse"
    _same_outputs_and_grads(model, ref, plan)
    # every attention weight is trainable; nothing else is
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train == sum(sum(w.numel() for w, _ in d.values()) for d in full_layout_grads(model)[1]) + sum(
        b.numel() for d in full_layout_grads(model)[1] for k, (_, b) in d.items() if b is not None and k != "o")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_policy", ["any", "all", "none"])
def test_sparse_plan_exact_gradients(family, kv_policy):
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    plan = HeadPlan(_sparse_modes(family), num_kv_heads=_kv(model), kv_policy=kv_policy, model_family=family)
    zero_pruned_o(ref, plan)
    hs.patch(model, plan, grad="exact")
    _same_outputs_and_grads(model, ref, plan)
    if kv_policy == "none":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and not any(("k_proj" in n or "v_proj" in n or ".key." in n or ".value." in n) for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_heads_match_zeroed_o_columns(family):
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    nkv = _kv(model)
    # layer 1 loses a whole KV group when GQA, layer 2 is fully pruned
    modes = [["p", "f", "t", "f"], ["p", "p", "f", "f"], ["p", "p", "p", "p"]]
    plan = HeadPlan(modes, num_kv_heads=nkv, model_family=family)
    zero_pruned_o(ref, plan)
    hs.patch(model, plan)
    ids = batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, ids)[1], loss_of(ref, ids)[1], **TOL)
    # physically removed: fewer weight rows than the original layer
    n_attn = sum(p.numel() for n, p in model.named_parameters() if "layers.1." in n or ".h.1." in n or "layer.1." in n)
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if "layers.1." in n or ".h.1." in n or "layer.1." in n)
    assert n_attn < n_ref


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_sparse_mode_matches_exact_on_top_layer_only(family):
    """grad="sparse": with TRAIN heads only in the top layer it is exact; lower layers differ (frozen heads above
    are treated as constants), and the backward skips frozen heads in every layer."""
    ref = tiny_model(family)
    ids = batch(ref)
    top_only = HeadPlan([["f"] * 4, ["f"] * 4, ["t", "f", "f", "f"]], num_kv_heads=_kv(ref), model_family=family)
    two = HeadPlan([["f"] * 4, ["t", "f", "f", "f"], ["t", "f", "f", "f"]], num_kv_heads=_kv(ref), model_family=family)
    grads = {}
    for name, plan in (("top", top_only), ("two", two)):
        for grad in ("exact", "sparse"):
            m = hs.patch(copy.deepcopy(ref), plan, grad=grad)
            with hs.record_gate_grads() as rec:
                loss_of(m, ids)[0].backward()
            grads[name, grad] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
            stats = rec.by_key()
            if name == "two":
                # Stats are in the patched head order (TRAIN first). The backward set of the lowest trainable
                # layer is the TRAIN head plus, under GQA, head 1, which reads the same (trainable) KV head.
                n = 2 if _kv(ref) == 2 else 1
                assert torch.isnan(stats[1][:, n:]).all() and not torch.isnan(stats[1][:, :n]).any()
                # layer 2: exact runs every head's backward, sparse only that smaller set.
                assert torch.isnan(stats[2][:, n:]).all() == (grad == "sparse")
                assert not torch.isnan(stats[2][:, :n]).any()
                assert 0 not in stats  # below the horizon: no graph, no backward
    for n in grads["top", "exact"]:
        torch.testing.assert_close(grads["top", "sparse"][n], grads["top", "exact"][n], **TOL)
    low = [n for n in grads["two", "exact"] if ".1." in n]
    assert low and any(not torch.allclose(grads["two", "sparse"][n], grads["two", "exact"][n]) for n in low)
    high = [n for n in grads["two", "exact"] if ".2." in n]
    for n in high:
        torch.testing.assert_close(grads["two", "sparse"][n], grads["two", "exact"][n], **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert", "roberta"])
def test_padding_matches_sdpa(family):
    ref = tiny_model(family)
    model = hs.patch(copy.deepcopy(ref), HeadPlan.for_model(ref, "frozen"))
    ids = batch(ref, b=3, s=9)
    mask = torch.ones_like(ids)
    if is_decoder(ref):
        mask[0, :4] = 0  # left padding
        mask[2, :1] = 0
    else:
        mask[0, 5:] = 0  # right padding
        mask[2, 8:] = 0
    with torch.no_grad():
        out_p = model(input_ids=ids, attention_mask=mask)
        out_r = ref(input_ids=ids, attention_mask=mask)
        out_nomask = model(input_ids=ids)
    t_p = out_p.logits if hasattr(out_p, "logits") else out_p.last_hidden_state
    t_r = out_r.logits if hasattr(out_r, "logits") else out_r.last_hidden_state
    t_n = out_nomask.logits if hasattr(out_nomask, "logits") else out_nomask.last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(t_p[keep], t_r[keep], **TOL)
    assert (t_p[0][keep[0]] - t_n[0][keep[0]]).abs().max() > 1e-3  # the mask really changed something


def test_seq_classification_with_train_modules():
    ref = tiny_model("bert", seq_cls=True)
    model = copy.deepcopy(ref)
    plan = HeadPlan([["f"] * 4, ["f"] * 4, ["t", "f", "f", "t"]], model_family="bert")
    hs.patch(model, plan, train_modules=("classifier",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= names
    ids, labels = batch(model), torch.tensor([0, 2])
    lp = model(input_ids=ids, labels=labels).loss
    lr = ref(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(lp, lr, **TOL)
    lp.backward()
    lr.backward()
    torch.testing.assert_close(model.classifier.weight.grad, ref.classifier.weight.grad, **TOL)
    _check_grads(model, ref, plan)
    with pytest.raises(ValueError, match="no module named 'head'"):
        hs.patch(tiny_model("bert", seq_cls=True), plan, train_modules=("head",))


def test_bad_plans_and_models_raise():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="num layers: plan has 2, model has 3"):
        hs.patch(m, HeadPlan.uniform(2, 4, 2))
    with pytest.raises(ValueError, match="KV heads per layer"):
        hs.patch(m, HeadPlan.uniform(3, 4, 4))
    with pytest.raises(ValueError, match="plan must be a headsparse.HeadPlan"):
        hs.patch(m, [["t"] * 4] * 3)
    with pytest.raises(ValueError, match="grad must be one of"):
        hs.patch(m, HeadPlan.for_model(m), grad="approx")
    # a failed patch leaves the model untouched
    assert m.config._attn_implementation == "sdpa" and all(p.requires_grad for p in m.parameters())
    hs.patch(m, HeadPlan.for_model(m))
    with pytest.raises(ValueError, match="already patched"):
        hs.patch(m, HeadPlan.for_model(m))
    with pytest.raises(ValueError, match="supported families: llama"):
        hs.patch(torch.nn.Linear(3, 3), HeadPlan.uniform(1, 1))
    import transformers

    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"OPTForCausalLM \(model_type='opt'\) is not supported.*gpt2.*bert"):
        hs.patch(opt, HeadPlan.uniform(1, 2))
    with pytest.raises(ValueError, match="not patched"):
        hs.unpatch(tiny_model("gpt2"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_matches(family):
    ref = tiny_model(family, dtype=torch.float32)
    plan = HeadPlan([["f", "t", "f", "p"], ["p", "f", "f", "f"], ["t", "f", "p", "p"]], num_kv_heads=_kv(ref), model_family=family)
    model = hs.patch(copy.deepcopy(ref), plan)
    zero_pruned_o(ref, plan)
    ids = batch(ref, b=2, s=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out_p = model.generate(ids, **kw)
    out_r = ref.generate(ids, **kw)
    assert out_p.shape == (2, 13)
    assert torch.equal(out_p, out_r)
    # the cached decode path matches a full forward over the generated sequence
    with torch.no_grad():
        full = model(out_p).logits[:, 4:-1].argmax(-1)
    assert torch.equal(full, out_p[:, 5:])


def test_head_layout_reports_the_patched_order():
    from headsparse.patch import head_layout

    m = hs.patch(tiny_model("llama"), HeadPlan([["f", "p", "t", "f"], ["p"] * 4, ["t", "f", "f", "t"]], num_kv_heads=2, model_family="llama"))
    assert head_layout(m) == [[2, 3, 0], [0], [0, 3, 1, 2]]  # TRAIN, frozen readers of trainable KV, rest
