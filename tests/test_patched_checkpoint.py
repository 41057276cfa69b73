"""A patched model saves and loads like a stock one: state_dict holds the standard keys with the merged weights,
save_pretrained writes a checkpoint plain from_pretrained reproduces (plus the plan), load_state_dict takes a
standard checkpoint back into the slices, and output_attentions warns."""
import copy
import warnings

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.patch import core
from _hs_models import FAMILIES, batch, loss_of, tiny_model

TOL = dict(rtol=1e-9, atol=1e-11)
MODES = [["p", "t", "f", "f"], ["t", "t", "p", "p"], ["f", "f", "t", "p"]]


def _tuned(family):
    ref = tiny_model(family)
    kv = getattr(ref.config, "num_key_value_heads", None) or ref.config.num_attention_heads
    plan = HeadPlan(MODES, num_kv_heads=kv, model_family=family)
    model = copy.deepcopy(ref)
    hs.patch(model, plan)
    ids = batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss_of(model, ids)[0].backward()
    opt.step()
    return ref, plan, model, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_the_merged_standard_one(family):
    ref, plan, model, ids = _tuned(family)
    merged = hs.unpatch(copy.deepcopy(model)).state_dict()
    sd = model.state_dict()
    assert list(sd) == list(ref.state_dict())  # the stock keys, in the stock order
    for k in sd:
        torch.testing.assert_close(sd[k], merged[k], rtol=0, atol=0)
    assert core.is_patched(model)  # reading the state dict changed nothing
    with torch.no_grad():
        before = loss_of(model, ids)[1]
    # a standard state dict loads back into a freshly patched base model: the same function
    fresh = hs.patch(copy.deepcopy(ref), plan)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(loss_of(fresh, ids)[1], before, **TOL)
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_save_pretrained_of_a_patched_model_loads_with_plain_from_pretrained(family, tmp_path):
    ref, plan, model, ids = _tuned(family)
    with torch.no_grad():
        tuned = loss_of(model, ids)[1]
    model.save_pretrained(tmp_path / "m")
    reloaded = type(ref).from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(loss_of(reloaded, ids)[1], tuned, **TOL)
    assert HeadPlan.load(tmp_path / "m" / core.PLAN_FILE) == plan
    assert core.is_patched(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_given_patched_names_writes_the_stock_checkpoint(family, tmp_path):
    """A state dict read from the parameters directly (DeepSpeed's consolidated ZeRO-3 one, which Trainer passes to
    save_pretrained) has the patched names; save_pretrained merges it into the stock checkpoint all the same."""
    ref, plan, model, ids = _tuned(family)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(n.endswith(".weight_train") for n in params)
    converted = core._standard_from_patched(model, params)
    sd = model.state_dict()
    assert set(converted) <= set(sd) and set(sd) - set(converted) <= {"lm_head.weight"}  # tied: one name
    assert list(converted) == [k for k in sd if k in converted]
    for k, v in converted.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="save_final"):  # frozen blocks left out: nothing to merge them from
        core._standard_from_patched(model, {n: p for n, p in params.items() if not n.endswith("_frozen")})
    model.save_pretrained(tmp_path / "m", state_dict=params)
    reloaded = type(ref).from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(loss_of(reloaded, ids)[1], loss_of(model, ids)[1], **TOL)


def test_unpatch_removes_the_hooks_also_on_a_deep_copy():
    ref, plan, model, ids = _tuned("llama")
    twin = copy.deepcopy(model)
    hs.unpatch(twin)
    assert "save_pretrained" not in twin.__dict__
    assert list(twin.state_dict()) == list(ref.state_dict())  # no hook of the original left on the copy
    assert list(model.state_dict()) == list(ref.state_dict())  # the original still merges through its own hooks
    hs.unpatch(model)
    for layer in model.model.layers:
        assert not layer._state_dict_hooks and not layer._load_state_dict_pre_hooks
    # the copy's save_pretrained is its class's again, and writes no plan
    assert "save_pretrained" not in model.__dict__


def test_output_attentions_warns_once(monkeypatch):
    ref, plan, model, ids = _tuned("llama")
    monkeypatch.setattr(core, "_warned_attentions", False)
    with pytest.warns(UserWarning, match="does not return attention probabilities"):
        model(input_ids=ids, output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids, output_attentions=True)  # once only


def test_trainer_checkpoint_loads_stock_and_resumes_patched(tmp_path):
    """Trainer checkpoints of a patched model are stock checkpoints (plus the plan), and resume_from_checkpoint
    continues a patched model to the same weights as an uninterrupted run."""
    from transformers import Trainer, TrainingArguments

    ref = tiny_model("llama", dtype=torch.float32)
    plan = HeadPlan([["f"] * 4, ["f", "t", "p", "f"], ["t", "f", "f", "f"]], num_kv_heads=2, model_family="llama")
    data = [{"input_ids": x, "labels": x} for x in batch(ref, b=8, s=12)]

    def args(out, steps):
        return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=2,
                                 use_cpu=True, dataloader_num_workers=0, seed=0, data_seed=0)

    straight = hs.patch(copy.deepcopy(ref), plan)
    Trainer(model=straight, args=args(tmp_path / "a", 4), train_dataset=data).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / core.PLAN_FILE).exists()
    stock = type(ref).from_pretrained(ckpt, dtype=torch.float32)
    assert list(stock.state_dict()) == list(ref.state_dict())

    resumed = hs.patch(copy.deepcopy(ref), plan)
    Trainer(model=resumed, args=args(tmp_path / "a", 4), train_dataset=data).train(resume_from_checkpoint=str(ckpt))
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    trained = [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert trained and all(not torch.equal(dict(resumed.named_parameters())[n], p)
                           for n, p in hs.patch(copy.deepcopy(ref), plan).named_parameters() if n in trained)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_reinitialising_a_patched_model_says_what_to_do(family):
    ref, plan, model, ids = _tuned(family)
    with pytest.raises(RuntimeError, match="cannot be re-initialised.*unpatch"):
        model.apply(model._init_weights)
    for m in model.modules():  # init_weights() goes through the base model's own _init_weights
        m._is_hf_initialized = False
    with pytest.raises(RuntimeError, match="cannot be re-initialised"):
        model.init_weights()
    hs.unpatch(model)
    assert not any("_init_weights" in m.__dict__ for m in model.modules())
    model.apply(model._init_weights)  # the stock model initialises again
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_layer_split_across_shards_loads_slot_by_slot():
    """Sharded checkpoints load shard by shard (strict=False): a layer's projections may arrive separately."""
    ref, plan, model, ids = _tuned("llama")
    sd = model.state_dict()
    fresh = hs.patch(copy.deepcopy(ref), plan)
    first = {k: v for k, v in sd.items() if not k.endswith(("k_proj.weight", "o_proj.weight"))}
    second = {k: v for k, v in sd.items() if k not in first}
    fresh.load_state_dict(first, strict=False)
    fresh.load_state_dict(second, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loss_of(fresh, ids)[1], loss_of(model, ids)[1], **TOL)



@pytest.mark.parametrize("family", FAMILIES)
def test_whole_patched_model_pickles_and_deep_copies(family):
    import io

    _, plan, model, ids = _tuned(family)
    buf = io.BytesIO()
    torch.save(model, buf)  # whole-model pickling: hooks and per-instance overrides must not be closures
    buf.seek(0)
    copies = [torch.load(buf, weights_only=False), copy.deepcopy(model)]
    model.zero_grad(set_to_none=True)
    loss, out = loss_of(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    for other in copies:
        assert core.is_patched(other) and core.patch_info(other).plan.to_dict() == plan.to_dict()
        other.zero_grad(set_to_none=True)
        loss2, out2 = loss_of(other, ids)
        torch.testing.assert_close(out2, out, rtol=0, atol=0)
        loss2.backward()
        assert {n: p.grad for n, p in other.named_parameters() if p.grad is not None}.keys() == grads.keys()
        for n, p in other.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
        # the reloaded model's overrides act on the reloaded model, not on the original
        assert other.save_pretrained.obj is other
        sd = other.state_dict()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
