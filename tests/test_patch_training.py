"""headsparse.patch in training: memory scaling, gradient horizon, round trips, Trainer, checkpointing, autocast."""
import copy
import os

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from _hs_models import batch, loss_of, tiny_model, zero_pruned_o

TOL = dict(rtol=1e-9, atol=1e-11)


def _plan(model, modes):
    kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    return HeadPlan(modes, num_kv_heads=kv, model_family=model.config.model_type)


def _step(model, ids, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_of(model, ids)[0].backward()
    opt.step()
    return opt


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_grad_and_optimizer_bytes_scale_with_trainable_heads(family):
    ids = batch(tiny_model(family, layers=4))
    sizes = {}
    for k in (1, 2, 4):  # TRAIN heads per layer, in every layer
        m = tiny_model(family, layers=4, heads=4, kv_heads=4)
        hs.patch(m, HeadPlan([["t"] * k + ["f"] * (4 - k)] * 4, model_family=family))
        opt = _step(m, ids)
        grads = _bytes(p.grad for p in m.parameters() if p.grad is not None)
        states = _bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert grads == n_train * 8 and states == 2 * n_train * 8  # fp64: exp_avg + exp_avg_sq per trainable element
        sizes[k] = grads
        # per layer: k heads x (Q, K, V rows + biases where present, O columns)
        d, h = 16, 64
        bias = 3 * k * d if family == "gpt2" else 0
        assert n_train == 4 * (4 * k * d * h + bias)
    assert sizes[1] * 2 == sizes[2] and sizes[1] * 4 == sizes[4]
    full = tiny_model(family, layers=4, heads=4, kv_heads=4)
    _step(full, ids)
    assert _bytes(p.grad for p in full.parameters() if p.grad is not None) > 3 * sizes[4]


class _SavedBytesByLayer:
    """Bytes saved for backward while each decoder layer's forward runs (saved_tensors_hooks + pre-hooks)."""

    def __init__(self, layers):
        self.current = None
        self.bytes = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: self._enter(None)))

    def _enter(self, i):
        self.current = i

    def pack(self, t):
        if self.current is not None:
            self.bytes[self.current] = self.bytes.get(self.current, 0) + t.numel() * t.element_size()
        return t


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_no_saved_activations_below_the_horizon(family):
    layers = 4
    ref = tiny_model(family, layers=layers)
    ids = batch(ref, b=2, s=32)
    plan = _plan(ref, [["f"] * 4, ["f"] * 4, ["f", "t", "f", "f"], ["f"] * 4])
    results = {}
    for name in ("full", "patched"):
        m = copy.deepcopy(ref)
        if name == "patched":
            hs.patch(m, plan)
        # make the embeddings' output require grad (as PEFT / checkpointing setups do): without the horizon,
        # every layer would then record a graph
        m.enable_input_require_grads()
        from headsparse.patch.families import find_family

        fam, base = find_family(m)
        rec = _SavedBytesByLayer(fam.layers(base))
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = loss_of(m, ids)[0]
        loss.backward()
        results[name] = rec.bytes
    full, patched = results["full"], results["patched"]
    assert all(full.get(i, 0) > 0 for i in range(layers))
    assert patched.get(0, 0) == 0 and patched.get(1, 0) == 0  # below the lowest trainable layer: nothing
    assert patched[2] > 0 and patched[3] > 0
    assert patched[2] < full[2]  # lowest trainable layer: frozen slices save no weight-grad inputs, fewer heads


def test_horizon_layers_run_without_grad():
    m = hs.patch(tiny_model("llama", layers=3), HeadPlan([["f"] * 4, ["t"] + ["f"] * 3, ["f"] * 4], num_kv_heads=2, model_family="llama"))
    seen = []
    for layer in m.model.layers:
        layer.mlp.register_forward_hook(lambda mod, a, o: seen.append(torch.is_grad_enabled()))
    m.enable_input_require_grads()
    loss_of(m, batch(m))[0].backward()
    assert seen == [False, True, True]
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_unpatch_and_save_pretrained_roundtrip(family, tmp_path):
    ref = tiny_model(family)
    model = copy.deepcopy(ref)
    plan = _plan(ref, [["p", "t", "f", "f"], ["t", "t", "p", "p"], ["f", "f", "t", "p"]])
    hs.patch(model, plan)
    ids = batch(model)
    _step(model, ids, lr=0.05)
    with torch.no_grad():
        tuned = loss_of(model, ids)[1]
        assert not torch.allclose(tuned, loss_of(zero_pruned_o(copy.deepcopy(ref), plan), ids)[1])  # it trained
    hs.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert type(model.base_model).__name__ == type(ref.base_model).__name__
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in ref.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, ids)[1], tuned, **TOL)
    model.save_pretrained(tmp_path / "m")
    reloaded = type(ref).from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(loss_of(reloaded, ids)[1], tuned, **TOL)
    # frozen weights did not move: MLP of layer 0 equals the base model's
    fam_params = dict(ref.named_parameters())
    changed = [n for n, p in reloaded.named_parameters() if not torch.equal(p, fam_params[n])]
    assert changed and all(("attn" in n or "attention" in n) for n in changed)


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "roberta"])
def test_delta_roundtrip(family, tmp_path):
    ref = tiny_model(family, seq_cls=True)
    plan = _plan(ref, [["f", "t", "f", "f"], ["t", "f", "p", "p"], ["f", "f", "t", "t"]])
    extra = ("classifier",) if family == "roberta" else ()
    model = hs.patch(copy.deepcopy(ref), plan, train_modules=extra)
    ids = batch(model)
    _step(model, ids, lr=0.05)
    with torch.no_grad():
        tuned = loss_of(model, ids)[1]
    path = tmp_path / "delta.safetensors"
    hs.save_delta(model, path)
    n_delta = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert os.path.getsize(path) < 8 * n_delta + 20000  # only the slices (plus a small header)
    assert os.path.getsize(path) < 0.5 * 8 * sum(p.numel() for p in ref.parameters())
    fresh = copy.deepcopy(ref)
    hs.load_delta(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(loss_of(fresh, ids)[1], tuned, **TOL)
    assert hs.patch.__module__  # the function
    from headsparse.patch import read_delta_plan

    assert read_delta_plan(path) == plan
    hs.unpatch(fresh)
    with torch.no_grad():
        torch.testing.assert_close(loss_of(fresh, ids)[1], tuned, **TOL)
    # a delta does not fit a model with a different plan
    other = hs.patch(copy.deepcopy(ref), HeadPlan.for_model(ref))
    with pytest.raises(ValueError, match="different plan"):
        hs.load_delta(other, path)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a headsparse delta"):
        hs.load_delta(copy.deepcopy(ref), bad)


def test_gradient_checkpointing_same_gradients():
    ref = tiny_model("llama", layers=4)
    plan = _plan(ref, [["f"] * 4, ["t", "f", "f", "f"], ["f", "f", "t", "f"], ["f"] * 4])
    ids = batch(ref, s=16)
    grads = []
    for gc in (False, True):
        m = hs.patch(copy.deepcopy(ref), plan)
        m.train()
        if gc:
            enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
            enable()
            assert m.model.gradient_checkpointing
        loss_of(m, ids)[0].backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **TOL)


def test_bf16_autocast_trains():
    ref = tiny_model("llama", dtype=torch.float32)
    plan = _plan(ref, [["f"] * 4, ["t", "f", "f", "t"], ["f", "t", "f", "f"]])
    m = hs.patch(copy.deepcopy(ref), plan)
    ids = batch(ref, s=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, labels=ids).loss
    loss.backward()
    ref_loss = m(ids, labels=ids).loss
    assert abs(loss.item() - ref_loss.item()) < 0.05
    train = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in train)
    assert all(p.grad.abs().sum() > 0 for p in train)


def test_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    ref = tiny_model("llama", dtype=torch.float32)
    plan = _plan(ref, [["f"] * 4, ["f", "t", "f", "f"], ["t", "f", "f", "f"]])
    model = hs.patch(copy.deepcopy(ref), plan)
    ids = batch(ref, b=8, s=12)
    data = [{"input_ids": x, "labels": x} for x in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert hs.patch.__name__ == "patch"
    hs.unpatch(model)  # still a patched model after training


@pytest.mark.parametrize("train", ["model.embed_tokens", "model.layers.1.mlp", "lm_head"])
def test_train_modules_below_the_heads_get_exact_gradients(train):
    """A trainable module below the lowest TRAIN head moves the gradient horizon down with it."""
    ref = tiny_model("llama")
    plan = HeadPlan([["f"] * 4, ["f"] * 4, ["t", "f", "f", "f"]], num_kv_heads=2, model_family="llama")
    model = hs.patch(copy.deepcopy(ref), plan, train_modules=(train,))
    ids = batch(ref)
    loss_of(model, ids)[0].backward()
    loss_of(ref, ids)[0].backward()
    mod_p, mod_r = dict(model.named_modules())[train], dict(ref.named_modules())[train]
    pairs = list(zip(mod_p.named_parameters(), mod_r.named_parameters()))
    assert pairs
    for (n, p), (_, r) in pairs:
        assert p.requires_grad and p.grad is not None, n
        torch.testing.assert_close(p.grad, r.grad, **TOL)
    top = model.model.layers[2].self_attn.q_proj.weight_train.grad
    torch.testing.assert_close(top, ref.model.layers[2].self_attn.q_proj.weight.grad[:16], **TOL)
