"""The APT recipe (:func:`headsparse.recipes.apt.finetune_apt`) against hand references: head and FFN-neuron
salience (with the kurtosis term) from independent hooks, the parameter budget and the cubic schedule at every
pruning step, rank growth that keeps the function, soft masks that end exact and a compaction that keeps the
masked function (GQA included), the teacher refreshed only on a dev improvement as a real, mask-folded copy, the
distillation weight mu, the baselines run through the same loop, argument checks, and merging the adapters."""
import copy
import types

import numpy as np
import pytest
import torch

import headsparse.recipes.apt as apt
import headsparse.recipes.tuning.apt_blocks as apt_blocks_module
from headsparse.recipes.apt import _Masks, apt_blocks, finetune_apt, kurtosis_term, merge_adapters
from headsparse.recipes.tuning.adaptive_lora import GrowingLoRA, add_adapters
from _hs_models import VOCAB, batch, input_keeper, loss_of, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD_DIM = 16  # hidden 64 / 4 heads in every tiny model here
# 48 examples / batch 8 x 5 epochs = 30 steps: t_start 3, t_warm 6, t_end 18, pruning at 6, 9, 12, 15, 18
RUN = dict(keep=0.4, epochs=5, batch_size=8, n_prunings=5, prune_start=0.1, prune_end=0.6, mask_step=0.1,
           lr=1e-3, progress=False)


def _data(family, n=48, seed=0):
    """Random 8-token examples: sequence classification (label from the first token) for BERT, LM for Llama."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (8,), generator=g).tolist()
        out.append({"input_ids": ids, "label": ids[0] % 3} if family == "bert" else {"input_ids": ids})
    return out


def _model(family, dtype=torch.float32, **kw):
    return tiny_model(family, seq_cls=family == "bert", dtype=dtype, **kw)


def _logits(model, ids):
    """The model's logits on ``ids`` in eval mode without gradients (the training mode is restored)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.clone()
    model.train(was)
    return out


def _block_costs(model):
    """Parameters per head and per FFN neuron, from the module shapes (a GQA KV head charged to its query heads
    in equal shares; the O and down projections' biases are not per block). Returns (head, neuron, prunable)."""
    cfg = model.config
    if model.config.model_type == "bert":
        layers = model.bert.encoder.layer
        a = layers[0].attention.self
        head = sum(HEAD_DIM * (m.in_features + (m.bias is not None)) for m in (a.query, a.key, a.value))
        head += HEAD_DIM * layers[0].attention.output.dense.out_features
        ffn_in, ffn_out = [layers[0].intermediate.dense], layers[0].output.dense
    else:
        layers = model.model.layers
        a = layers[0].self_attn
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        head = HEAD_DIM * (a.q_proj.in_features + a.o_proj.out_features)
        head += HEAD_DIM * (a.k_proj.in_features + a.v_proj.in_features) / group
        ffn_in, ffn_out = [layers[0].mlp.gate_proj, layers[0].mlp.up_proj], layers[0].mlp.down_proj
    neuron = sum(m.in_features + (m.bias is not None) for m in ffn_in) + ffn_out.out_features
    n_neurons = ffn_out.in_features
    prunable = len(layers) * (cfg.num_attention_heads * head + n_neurons * neuron)
    return float(head), float(neuron), float(prunable)


def _fisher_kurtosis_term(w, mean_x, group):
    """sqrt(max(m4 / m2^2 - 3, 0)) of w[:, block] * mean_x[block] per run of ``group`` columns (numpy, float64)."""
    vals = w.detach().double().numpy() * mean_x.detach().double().numpy()[None, :]
    out = []
    for j in range(vals.shape[1] // group):
        v = vals[:, j * group:(j + 1) * group].ravel()
        c = v - v.mean()
        k = np.mean(c ** 4) / np.mean(c ** 2) ** 2 - 3.0
        out.append(np.sqrt(max(k, 0.0)))
    return torch.tensor(out, dtype=torch.float64)


# ------------------------------------------------------------------ 1. salience
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_salience_and_kurtosis_equal_the_hand_computation(family):
    model = _model(family, dtype=torch.float64)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    blocks = apt_blocks(model)
    ids = batch(model, b=3, s=9)
    seen = {}
    handles = []
    for i, b in enumerate(blocks):  # registered before _Masks: it sees the same (unmasked) input tensor
        handles.append(getattr(*b.o).register_forward_pre_hook(input_keeper(seen, ("h", i))))
        handles.append(getattr(*b.ffn_out).register_forward_pre_hook(input_keeper(seen, ("f", i))))
    masks = _Masks(blocks, torch.float64, torch.device("cpu"))
    with torch.no_grad():  # soft masks: the salience is read before the mask
        masks.head[1].copy_(torch.tensor([1.0, 0.7, 0.3, 1.0], dtype=torch.float64))
        masks.ffn[0].mul_(0.5)

    def passes():
        acc = {}
        for _ in range(2):  # accumulated over two backward passes
            model.zero_grad()
            loss_of(model, ids)[0].backward()
            for key, x in seen.items():
                sx, sg, s = x.detach().abs().sum((0, 1)), x.grad.abs().sum((0, 1)), x.detach().sum((0, 1))
                a = acc.setdefault(key, [0, 0, 0, 0])
                a[0], a[1], a[2], a[3] = a[0] + sx, a[1] + sg, a[2] + s, a[3] + x.shape[0] * x.shape[1]
        return acc

    acc = passes()
    heads, neurons = masks.take(kurtosis=False)
    assert masks.take(kurtosis=False) == ([None] * len(blocks), [None] * len(blocks))  # cleared
    for i in range(len(blocks)):
        ax, ag = acc[("h", i)][:2]
        want_h = (ax * ag).view(-1, HEAD_DIM).sum(1)
        assert heads[i].shape == (4,)
        torch.testing.assert_close(heads[i], want_h, rtol=1e-10, atol=0)
        ax, ag = acc[("f", i)][:2]
        torch.testing.assert_close(neurons[i], ax * ag, rtol=1e-10, atol=0)

    acc = passes()  # the same two passes again (no optimizer step): the same salience, now with the outlier term
    heads_k, neurons_k = masks.take(kurtosis=True)
    positive = clamped = 0
    for i, b in enumerate(blocks):
        for kind, got, plain, group, proj in (("h", heads_k, heads, HEAD_DIM, b.o),
                                              ("f", neurons_k, neurons, 1, b.ffn_out)):
            mean_x = acc[(kind, i)][2] / acc[(kind, i)][3]
            w = getattr(*proj).weight
            term = _fisher_kurtosis_term(w, mean_x, group)
            torch.testing.assert_close(kurtosis_term(mean_x, w, group), term, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[i], plain[i] + term, rtol=1e-10, atol=1e-12)
            positive += int((term > 0).sum())
            clamped += int((term == 0).sum())
    assert positive and clamped  # both branches of max(kurtosis, 0) are exercised
    masks.close()
    for h in handles:
        h.remove()


# ------------------------------------------------------------------ 2./3. budget and schedule
@pytest.mark.parametrize("kurtosis", [False, True])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_every_pruning_step_meets_the_budget_within_one_block(family, kurtosis):
    # (on the tiny Llama the density order empties a layer's FFN at the last step: the one neuron every layer
    # keeps must then fit inside the budget too)
    model = _model(family)
    head, neuron, prunable = _block_costs(model)
    res = finetune_apt(model, _data(family), kurtosis=kurtosis, **RUN)
    hist = res.history
    assert [h["step"] for h in hist] == res.info["prune_at"] and len(hist) == 5
    for h in hist:
        assert h["salience_known"]
        assert h["retained_params"] <= h["retained_target"] + 1e-12  # never over the budget
        assert h["retained_target"] - h["retained_params"] <= max(head, neuron) / prunable + 1e-12
    assert hist[-1]["retained_target"] == pytest.approx(0.4) and hist[0]["retained_params"] == 1.0
    # the final share, recounted from the blocks kept
    kept = (sum(hist[-1]["heads_kept"]) * head + sum(hist[-1]["neurons_kept"]) * neuron) / prunable
    assert hist[-1]["retained_params"] == pytest.approx(kept, rel=1e-12)
    assert res.heads_kept == hist[-1]["heads_kept"] and res.neurons_kept == hist[-1]["neurons_kept"]


@pytest.mark.parametrize("sched", [dict(epochs=5, n_prunings=5, prune_start=0.1, prune_end=0.6),
                                   dict(epochs=4, n_prunings=7, prune_start=0.05, sparsity_warmup=0.2,
                                        prune_end=0.5, keep=0.6)])
def test_retained_target_follows_the_cubic_schedule(sched):
    kw = {**RUN, **sched}
    res = finetune_apt(_model("bert"), _data("bert"), **kw)
    total = 6 * kw["epochs"]
    keep = kw["keep"]
    t_start = int(kw["prune_start"] * total)
    t_warm = int((kw["prune_start"] + kw.get("sparsity_warmup", 0.1)) * total)
    t_end = int(kw["prune_end"] * total)
    info = res.info
    assert (info["total_steps"], info["t_warm"], info["t_end"]) == (total, t_warm, t_end)
    prune_at = info["prune_at"]
    assert prune_at == sorted(set(prune_at)) and prune_at[-1] == t_end and t_start < prune_at[0]
    assert len(prune_at) <= kw["n_prunings"]
    assert [h["step"] for h in res.history] == prune_at
    cases = set()
    for h, step in zip(res.history, prune_at):
        if step <= t_warm:
            want, case = 1.0, "warm"
        elif step >= t_end:
            want, case = keep, "end"
        else:
            want, case = min(1.0, keep + (1 - keep) * ((t_end - step) / (t_end - t_warm)) ** 3), "cubic"
        cases.add(case)
        assert h["retained_target"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert cases == {"warm", "cubic", "end"}


# ------------------------------------------------------------------ 4. growth
def test_growing_adapters_leaves_the_output_unchanged():
    model = _model("bert", dtype=torch.float64)
    adapters = add_adapters(model, ("query", "value", "dense"), rank=4)
    ids = batch(model)
    opt = torch.optim.SGD([p for a in adapters.values() for p in (a.lora_A, a.lora_B)], lr=0.5)
    loss_of(model, ids)[0].backward()
    opt.step()
    assert all(float(a.lora_B.detach().abs().sum()) > 0 for a in adapters.values())
    before = _logits(model, ids)
    for j, a in enumerate(adapters.values()):
        a.grow(4 + 3 * (j % 3))
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-6, atol=1e-6)
    assert any(a.rank > 4 for a in adapters.values())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_tuning_parameters_grow_over_the_pruning_window_to_expand_x(family):
    model = _model(family)
    roles = {"bert": ("query", "value", "intermediate.dense"), "llama": ("q_proj", "v_proj")}[family]
    targeted = [m for n, m in model.named_modules() if n.endswith(roles)]
    initial = sum(8 * (m.in_features + m.out_features) for m in targeted)
    res = finetune_apt(model, _data(family), expand=4.0, max_rank=64, **RUN)
    tuning = [h["tuning_params"] for h in res.history]
    assert tuning[0] > initial and all(a <= b for a, b in zip(tuning, tuning[1:])) and tuning[-1] > tuning[0]
    t_start, t_end = int(0.1 * 30), res.info["t_end"]
    for h in res.history:  # never over the linear target, 1 -> 4 x over the window
        frac = min(1.0, (h["step"] - t_start) / (t_end - t_start))
        assert h["tuning_params"] <= int(initial * (1 + 3 * frac))
    widest = max(m.in_features + m.out_features for m in targeted)
    assert 4 * initial - len(targeted) // 2 * widest < tuning[-1] <= 4 * initial  # close: within a rank step
    ranks = res.info["ranks"]
    assert len(ranks) == len(targeted) and all(8 <= r <= 64 for r in ranks) and max(ranks) > 8


# ------------------------------------------------------------------ 5. exact masks and compaction
# Llama at keep 0.25 prunes heads into ragged GQA groups (e.g. a layer keeps query heads 0, 1 of KV head 0 and
# query head 2 of KV head 1), read through _apt_kv_index and the registered attention function
@pytest.mark.parametrize("family,dtype,tol,keep", [("bert", torch.float32, 1e-5, 0.4),
                                                   ("llama", torch.float64, 1e-10, 0.25)])
def test_compaction_keeps_the_exactly_masked_function_and_shrinks_the_model(monkeypatch, family, dtype, tol, keep):
    model = _model(family, dtype=dtype)
    params_before = sum(p.numel() for p in model.parameters())
    ids = batch(model, b=3, s=10, seed=5)
    seen = {}
    real_close, real_compact, real_register = apt._Masks.close, apt._compact, apt._register_attention

    def close(self):  # the model with its exact masks, right before compaction
        seen["masks"] = [m.clone() for m in self.head + self.ffn]
        seen["before"] = _logits(model, ids)
        real_close(self)

    def compact(blocks, hk, fk):
        real_compact(blocks, hk, fk)
        if blocks[0].family == "bert":
            seen["after"] = _logits(model, ids)

    def register(m):  # decoders read ragged KV groups through the registered attention function
        real_register(m)
        seen["after"] = _logits(model, ids)

    monkeypatch.setattr(apt._Masks, "close", close)
    monkeypatch.setattr(apt, "_compact", compact)
    monkeypatch.setattr(apt, "_register_attention", register)
    res = finetune_apt(model, _data(family), **{**RUN, "keep": keep})
    last = res.history[-1]
    assert last["masks_exact"] and all(bool(((m == 0) | (m == 1)).all()) for m in seen["masks"])
    assert any(bool((m == 0).any()) for m in seen["masks"])  # something was pruned
    torch.testing.assert_close(seen["after"], seen["before"], rtol=tol, atol=tol)

    hk, nk = last["heads_kept"], last["neurons_kept"]
    assert sum(hk) < 12 and sum(nk) < 3 * 128
    assert res.params_after < res.params_before == params_before
    assert res.params_after == sum(p.numel() for p in res.model.parameters())
    assert last["params_after_compaction"] == res.params_after + res.tuning_params  # adapters merged since
    assert not any(isinstance(m, GrowingLoRA) for m in res.model.modules())  # merged
    if family == "bert":
        per_head, per_neuron = 3 * (HEAD_DIM * 64 + HEAD_DIM) + HEAD_DIM * 64, 64 + 1 + 64
        removed = sum((4 - h) * per_head + (128 - n) * per_neuron for h, n in zip(hk, nk))
        for layer, h, n in zip(res.model.bert.encoder.layer, hk, nk):
            a = layer.attention
            assert a.self.query.weight.shape == (h * HEAD_DIM, 64) and a.output.dense.weight.shape == (64, h * HEAD_DIM)
            assert a.self.key.weight.shape[0] == a.self.value.weight.shape[0] == h * HEAD_DIM
            assert layer.intermediate.dense.weight.shape == (n, 64) and layer.output.dense.weight.shape == (64, n)
    else:
        removed, ragged = 0, False
        for layer, h, n in zip(res.model.model.layers, hk, nk):
            a, mlp = layer.self_attn, layer.mlp
            idx = a._apt_kv_index.tolist()
            n_kv = len(set(idx))
            assert len(idx) == h and sorted(idx) == idx and set(idx) == set(range(n_kv))
            ragged |= len({idx.count(k) for k in range(n_kv)}) > 1  # KV heads serving unequal query groups
            assert a.q_proj.weight.shape == (h * HEAD_DIM, 64) and a.o_proj.weight.shape == (64, h * HEAD_DIM)
            assert a.k_proj.weight.shape == a.v_proj.weight.shape == (n_kv * HEAD_DIM, 64)
            assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (n, 64)
            assert mlp.down_proj.weight.shape == (64, n)
            removed += (4 - h) * 2 * HEAD_DIM * 64 + (2 - n_kv) * 2 * HEAD_DIM * 64 + (128 - n) * 3 * 64
        assert ragged
    assert res.params_after == params_before - removed
    out = _logits(res.model, ids)  # the final model runs and is finite
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ 6. teacher refresh
@pytest.mark.parametrize("targets", [None, ("q", "v", "o", "ffn_in", "ffn_out")])
def test_teacher_is_refreshed_only_on_a_dev_improvement_as_a_mask_folded_copy(monkeypatch, targets):
    model = _model("bert", dtype=torch.float64)
    ids = batch(model, b=3, s=10, seed=7)
    copies = []

    def deepcopy(obj, *args):  # every teacher snapshot: the student's (masked) function at that moment
        copies.append({"student": _logits(obj, ids), "params": {p.data_ptr() for p in obj.parameters()}})
        t = copy.deepcopy(obj, *args)
        copies[-1]["teacher"] = t
        bare = copy.deepcopy(obj)  # the student without its masks, to see that the masks mattered
        for m in bare.modules():
            m._forward_pre_hooks.clear()
        copies[-1]["unmasked"] = _logits(bare, ids)
        return t

    # the teacher snapshot is taken by headsparse.recipes.tuning.apt_blocks.snapshot
    monkeypatch.setattr(apt_blocks_module, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    script = [0.5, 0.4, 0.6, 0.55, 0.7, 0.7, 0.1]  # start, the 5 pruning steps, the end
    calls = []

    def dev_fn(m):
        calls.append(m.training)
        return script[len(calls) - 1]

    res = finetune_apt(model, _data("bert"), dev_fn=dev_fn, eval_every=10 ** 6, targets=targets,
                       **{**RUN, "lr": 1e-2})
    assert len(calls) == 7 and not any(calls)  # start, pruning steps, end; evaluated in eval mode
    assert [h["dev"] for h in res.history] == script[1:6]
    best, want = script[0], []
    for v in script[1:6]:
        want.append(v > best)
        best = max(best, v)
    assert want == [False, True, False, True, False]
    assert [h["teacher_refreshed"] for h in res.history] == want
    assert len(copies) == 1 + sum(want)  # the start, then one copy per refresh
    assert [v for _, _, v in res.dev_curve] == script and res.dev_curve[0][0] == 0
    soft = False
    for c in copies:
        teacher = c["teacher"]
        assert teacher is not model and not teacher.training
        assert not ({p.data_ptr() for p in teacher.parameters()} & c["params"])  # a real copy
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not any(m._forward_pre_hooks for m in teacher.modules())
        # the teacher computes what the masked student computed when it was taken (soft masks folded in)
        torch.testing.assert_close(_logits(teacher, ids), c["student"], rtol=1e-10, atol=1e-12)
        soft |= not torch.allclose(c["unmasked"], c["student"], rtol=1e-6, atol=1e-6)
    assert soft  # at least one refresh happened under soft masks


# ------------------------------------------------------------------ 7. mu
def test_mu_rises_linearly_over_the_pruning_window():
    res = finetune_apt(_model("bert"), _data("bert"), **RUN)
    total, t_start, t_end = 30, int(0.1 * 30), res.info["t_end"]
    # rising 0 -> 1 over the pruning window, then 0: distillation ends with pruning (APT's trainer)
    want = [(s - t_start) / (t_end - t_start) if t_start <= s < t_end else 0.0 for s in range(total)]
    assert res.mu == pytest.approx(want, abs=1e-15) and len(res.mu) == res.steps == total
    assert 0 < res.mu[t_start + 1] < 1 and res.mu[t_end - 1] > 0.9 and res.mu[-1] == 0.0
    assert [h["mu"] for h in res.history] == [want[s - 1] for s in res.info["prune_at"]]
    off = finetune_apt(_model("bert"), _data("bert"), distill=False, **RUN)
    assert off.mu == [0.0] * total


# ------------------------------------------------------------------ 8. baselines and argument checks
def test_full_finetuning_through_the_same_loop_trains_everything_and_prunes_nothing():
    model = _model("bert")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = finetune_apt(model, _data("bert"), adapters=False, grow=False, distill=False,
                       **{**RUN, "keep": 1.0})
    assert res.trained_params == res.params_before == res.params_after == sum(t.numel() for t in start.values())
    assert res.tuning_params == res.params_before and res.info["ranks"] == [] and res.info["roles"] == []
    assert not any(k.startswith("retained") for h in res.history for k in h)
    changed = {n for n, p in res.model.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert changed == set(start)  # every parameter trained
    assert res.heads_kept == [4, 4, 4] and res.neurons_kept == [128] * 3


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_baseline_keeps_the_model_size_and_trains_only_adapters_and_head(family):
    model = _model(family)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = finetune_apt(model, _data(family), grow=False, distill=False, **{**RUN, "keep": 1.0})
    assert res.params_after == res.params_before == sum(t.numel() for t in start.values())
    assert not any(k.startswith("retained") or k in ("masks_exact", "tuning_params") for h in res.history for k in h)
    assert res.info["ranks"] == [8] * len(res.info["ranks"]) and res.mu == [0.0] * 30
    assert not any(isinstance(m, GrowingLoRA) for m in res.model.modules())
    names = dict(res.model.named_parameters())
    changed = {n for n, t in start.items() if not torch.equal(names[n].detach(), t)}
    targets = {"bert": (".query.weight", ".value.weight", ".intermediate.dense.weight", "classifier.weight",
                        "classifier.bias"),
               "llama": (".q_proj.weight", ".v_proj.weight")}[family]
    assert changed == {n for n in start if n.endswith(targets)}  # adapters merged into their targets, the rest frozen


def test_bad_arguments_raise_value_errors():
    data = _data("bert", n=8)
    bad = [dict(keep=0), dict(keep=1.5), dict(n_prunings=0), dict(prune_start=0.6, prune_end=0.6),
           dict(prune_start=0.7, prune_end=0.5)]
    for kw in bad:
        with pytest.raises(ValueError):
            finetune_apt(_model("bert"), data, progress=False, **kw)
    with pytest.raises(ValueError, match="max_rank"):  # caught before training, not mid-run by a shrinking grow
        finetune_apt(_model("bert"), data, rank=8, max_rank=4, progress=False)
    finetune_apt(_model("bert"), data, rank=8, max_rank=4, grow=False, epochs=1, progress=False)  # fine: no growth
    with pytest.raises(ValueError, match="supports BERT"):
        finetune_apt(tiny_model("gpt2"), _data("llama", n=8), progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        finetune_apt(_model("bert"), [], progress=False)
    with pytest.raises(ValueError, match="label"):
        finetune_apt(_model("bert"), data[:4] + [{"input_ids": e["input_ids"]} for e in data[4:]], progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        finetune_apt(_model("bert"), [{"input_ids": [], "label": 0}], progress=False)


# ------------------------------------------------------------------ 9. merging
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_merging_the_adapters_keeps_the_output(family):
    model = _model(family, dtype=torch.float64)
    roles = ("query", "value", "dense") if family == "bert" else ("q_proj", "v_proj", "o_proj", "down_proj")
    adapters = add_adapters(model, roles, rank=4)
    ids = batch(model)
    opt = torch.optim.SGD([p for a in adapters.values() for p in (a.lora_A, a.lora_B)], lr=0.5)
    for _ in range(2):
        loss_of(model, ids)[0].backward()
        opt.step()
        opt.zero_grad()
    assert all(float(a.lora_B.detach().abs().sum()) > 0 for a in adapters.values())
    base_only = copy.deepcopy(model)
    for a in base_only.modules():
        if isinstance(a, GrowingLoRA):
            a.lora_B.data.zero_()
    before = _logits(model, ids)
    assert not torch.allclose(_logits(base_only, ids), before, rtol=1e-6, atol=1e-6)  # the adapters matter
    n_params = sum(p.numel() for p in model.parameters()) - sum(a.tuning_params() for a in adapters.values())
    assert merge_adapters(model) == len(adapters)
    assert not any(isinstance(m, GrowingLoRA) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == n_params
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-10, atol=1e-12)
