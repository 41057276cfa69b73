"""A patched model never silently becomes another model: switching its attention implementation away from
"headsparse" is refused (set_attn_implementation) or caught before the next forward (the config changed by hand),
on every family patch supports, also under torch.compile; unpatch then allows the switch. And Hugging Face's
initialisation convention holds: post_init()/init_weights() on an initialised patched model change nothing."""
import copy

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from _hs_models import FAMILIES, batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the task models too: their set_attn_implementation and config are the outer ones
CASES = [(f, False) for f in FAMILIES] + [("bert", True), ("roberta", True)]


def _plan(model):
    plan = HeadPlan.for_model(model, "frozen")
    plan.modes[1][2] = hs.HeadMode.TRAIN  # heads reordered in layer 1: stock attention would compute another model
    plan.modes[2][0] = hs.HeadMode.PRUNED
    plan.modes[2][3] = hs.HeadMode.TRAIN
    return plan


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _patched(family, seq_cls):
    ref = tiny_model(family, seq_cls=seq_cls)
    return ref, hs.patch(copy.deepcopy(ref), _plan(ref))


@pytest.mark.parametrize("family,seq_cls", CASES)
def test_set_attn_implementation_is_refused_then_allowed_after_unpatch(family, seq_cls):
    ref, model = _patched(family, seq_cls)
    ids = batch(model)
    before = _out(model, ids)
    for impl in ("eager", "sdpa", {"": "eager"}):
        with pytest.raises(ValueError, match=r"patched by headsparse\.patch.*headsparse\.unpatch\(model\)"):
            model.set_attn_implementation(impl)
        with pytest.raises(ValueError, match="unpatch"):  # the base model refuses as well
            model.base_model.set_attn_implementation(impl)
    assert model.config._attn_implementation == "headsparse"
    model.set_attn_implementation("headsparse")  # the name it already has is fine
    torch.testing.assert_close(_out(model, ids), before, rtol=0, atol=0)

    hs.unpatch(model)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    # the stock model (tuned weights merged, pruned heads zeroed) computes the patched model's function
    torch.testing.assert_close(_out(model, ids), before, rtol=1e-5, atol=1e-6)  # eager: float32 softmax


@pytest.mark.parametrize("family,seq_cls", CASES)
def test_forward_after_a_config_change_raises_before_computing(family, seq_cls):
    ref, model = _patched(family, seq_cls)
    ids = batch(model)
    before = _out(model, ids)
    ran = []
    for name, m in model.named_modules():
        if name:  # every submodule: none may run once the top-level check has failed
            m.register_forward_pre_hook(lambda mod, args, name=name: ran.append(name))
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        ran.clear()
        with pytest.raises(RuntimeError, match=rf"selects attention implementation '{impl}'.*headsparse\.unpatch"):
            _out(model, ids)
        assert ran == []
        with pytest.raises(RuntimeError, match="unpatch"):  # called below the top level: the layers check too
            model.base_model(input_ids=ids)
    # a stock model computes something else with these patched layers; headsparse computes the patched model
    model.config._attn_implementation = "headsparse"
    torch.testing.assert_close(_out(model, ids), before, rtol=0, atol=0)

    hs.unpatch(model)
    model.config._attn_implementation = "eager"
    torch.testing.assert_close(_out(model, ids), before, rtol=1e-5, atol=1e-6)  # eager: float32 softmax


def test_the_check_compiles_with_fullgraph_and_still_fires():
    ref = tiny_model("llama", dtype=torch.float32)
    eager, comp = hs.patch(copy.deepcopy(ref), _plan(ref)), hs.patch(copy.deepcopy(ref), _plan(ref))
    ids = batch(ref)
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    loss_c, loss_e = compiled(input_ids=ids, labels=ids).loss, eager(input_ids=ids, labels=ids).loss
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    trained = [(a.grad, b.grad) for a, b in zip(comp.parameters(), eager.parameters()) if b.grad is not None]
    assert trained and all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in trained)
    comp.config._attn_implementation = "eager"  # the guard on the config value sends it back to the check
    with pytest.raises(Exception, match="selects attention implementation 'eager'"):
        compiled(input_ids=ids, labels=ids)
    torch._dynamo.reset()


def test_the_recipes_still_switch_an_unpatched_model():
    """Scoring routes an unpatched model through "headsparse" and restores its implementation afterwards."""
    model = tiny_model("llama")
    scores = hs.score_heads(model, [{"input_ids": batch(model)}], method="gradient")
    assert scores.scores.shape == (3, 4)
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------ Hugging Face initialisation convention
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("call", ["post_init", "init_weights"])
def test_post_init_on_an_initialised_patched_model_changes_nothing(family, call):
    ref = tiny_model(family)
    model = hs.patch(copy.deepcopy(ref), _plan(ref))
    before = {n: t.clone() for n, t in model.state_dict(keep_vars=False).items()}
    params = {n: p.clone() for n, p in model.named_parameters()}
    getattr(model, call)()
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n  # bitwise
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # unpatch keeps the mark on the stock projections it rebuilds: the merged weights survive init_weights too
    hs.unpatch(model)
    merged = {n: p.clone() for n, p in model.named_parameters()}
    model.init_weights()
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_an_uninitialised_patched_projection_still_meets_the_error(family):
    ref = tiny_model(family)
    for m in ref.modules():  # as if the projections had never been initialised
        m._is_hf_initialized = False
    model = hs.patch(ref, _plan(ref))
    with pytest.raises(RuntimeError, match="cannot be re-initialised.*unpatch"):
        model.init_weights()
