"""Frozen-prefix cache (headsparse.PrefixCache, tune(prefix_cache=...)): cached training equals uncached training.

Every test compares against the same computation without the cache, and checks that the cache was really used
(layers below the horizon did not run, or an entry changed what came out), so that an inactive cache fails.
"""
import copy

import pytest
import torch
import transformers

import headsparse as hs
from headsparse import HeadPlan, PrefixCache
from headsparse.patch.prefix_cache import example_key, prefix_cache_of
from _hs_models import FAMILIES, VOCAB, tiny_model

# TRAIN heads in layers 2 and 3 of 4: the horizon is layer 2
MODES = [["f"] * 4, ["f", "p", "f", "f"], ["t", "f", "p", "f"], ["f", "t", "f", "f"]]


def _plan(family, modes=MODES, kv=2):
    kv = kv if family in ("llama", "mistral", "qwen2", "qwen3") else 4
    return HeadPlan(modes, num_kv_heads=kv, model_family=family)


def _examples(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = 5 + (i * 3) % 7
        ids = torch.randint(3, VOCAB, (s,), generator=g).tolist()
        labels = list(ids)
        labels[0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class _Calls:
    """Counts forwards of a module (layer 0: it runs only when the prefix is not served from the cache)."""

    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_pre_hook(self._hit)

    def _hit(self, *_):
        self.n += 1


def _layer0(model):
    from headsparse.patch.families import find_family

    fam, base = find_family(model)
    return fam.layers(base)[0]


def _left_batch(seed=1, b=3, s=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of different lengths
    mask[1, :1] = 0
    return ids, mask


def _loss_and_grads(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    t = out.logits if hasattr(out, "logits") else out.last_hidden_state
    w = torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(t.dtype)
    loss = (t * w * mask[..., None]).sum() / mask.sum()  # real positions only
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------ exactness, model level, every family
@pytest.mark.parametrize("grad", ["exact", "sparse"])
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_forward_and_gradients_equal_uncached(family, grad):
    model = hs.patch(tiny_model(family, layers=4), _plan(family), grad=grad)
    model.train()
    ids, mask = _left_batch()
    ref_loss, ref_grads = _loss_and_grads(model, ids, mask)
    cache = PrefixCache().attach(model)
    calls = _Calls(_layer0(model))
    fill_loss, fill_grads = _loss_and_grads(model, ids, mask)  # fills the cache
    hit_loss, hit_grads = _loss_and_grads(model, ids, mask)  # served from it
    assert calls.n == 1 and cache.hits == 1 and cache.misses == 1 and len(cache) == 3
    assert cache.stats()["tokens"] == int(mask.sum())
    for loss, grads in ((fill_loss, fill_grads), (hit_loss, hit_grads)):
        _close(loss, ref_loss, 1e-12)
        assert grads.keys() == ref_grads.keys() and grads
        for n in grads:
            _close(grads[n], ref_grads[n], 1e-12)
    # the replayed states are what the layers above read: a corrupted entry changes the loss
    key = next(iter(cache._mem))
    cache._mem[key].add_(torch.randn_like(cache._mem[key]))  # (not a constant: LayerNorm would remove it)
    bad_loss, _ = _loss_and_grads(model, ids, mask)
    assert cache.hits == 2 and abs(float(bad_loss - ref_loss)) > 1e-6


def test_same_tokens_other_left_padding_is_another_entry():
    model = hs.patch(tiny_model("gpt2", layers=4), _plan("gpt2"))  # absolute positions: padding moves them
    cache = PrefixCache().attach(model)
    ids, mask = _left_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        shifted = torch.cat([ids[:, :1], ids], 1)
        smask = torch.cat([torch.zeros_like(mask[:, :1]), mask], 1)
        got = model(input_ids=shifted, attention_mask=smask).logits
    assert cache.misses == 2 and cache.hits == 0 and len(cache) == 6
    cache.detach(clear=True)
    with torch.no_grad():
        want = model(input_ids=shifted, attention_mask=smask).logits
    keep = smask.bool()
    _close(got[keep], want[keep], 1e-12)


# ------------------------------------------------------------------ exactness through tune
def _tune_pair(make, plan, grad, data, **kw):
    runs = []
    for cached in (False, True):
        model = make()
        calls = _Calls(_layer0(model))
        res = hs.tune(model, plan, data, grad=grad, progress=False, prefix_cache=cached, **kw)
        runs.append((model, res, calls.n))
    return runs


@pytest.mark.parametrize("grad", ["exact", "sparse"])
def test_tune_tiny_llama_float64_equal_to_uncached(grad):
    data = _examples(7)
    (m0, r0, n0), (m1, r1, n1) = _tune_pair(lambda: tiny_model("llama", layers=4), _plan("llama"), grad, data,
                                            epochs=3, batch_size=3, lr=5e-2)
    assert r0.steps == r1.steps == 9
    _close(torch.tensor(r1.losses), torch.tensor(r0.losses), 1e-10)
    p0 = {n: p for n, p in m0.named_parameters() if p.requires_grad}
    for n, p in m1.named_parameters():
        if p.requires_grad:
            _close(p, p0[n], 1e-10)
    assert n0 == 9 and n1 == 3  # the cached run ran the prefix in epoch one only
    st = r1.info["prefix_cache"]
    assert st["misses"] == 3 and st["hits"] == 6 and st["entries"] == 7 and st["horizon"] == 2
    assert prefix_cache_of(m1) is None  # tune's own cache is detached and dropped on return
    assert len(r1.info["epoch_s"]) == 3


@pytest.mark.parametrize("grad", ["exact", "sparse"])
def test_tune_smollm2_first_layers_float32_equal_to_uncached(grad):
    from headsparse.recipes.tasks import smollm2_dir

    try:
        path = smollm2_dir()
    except FileNotFoundError as exc:  # pragma: no cover - the dev environment installs the model package
        pytest.skip(f"SmolLM2 not available: {exc}")
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=4,
                                                       attn_implementation="sdpa")
    c = ref.config
    modes = [["frozen"] * 9, ["frozen"] * 9, ["train"] + ["frozen"] * 8, ["frozen", "train"] + ["frozen"] * 7]
    plan = HeadPlan(modes, num_kv_heads=c.num_key_value_heads, model_family="llama")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, c.vocab_size, (6 + 3 * i,), generator=g).tolist()} for i in range(5)]
    (m0, r0, n0), (m1, r1, n1) = _tune_pair(lambda: copy.deepcopy(ref), plan, grad, data,
                                            epochs=2, batch_size=3, lr=1e-3)
    _close(torch.tensor(r1.losses), torch.tensor(r0.losses), 2e-5)
    p0 = {n: p for n, p in m0.named_parameters() if p.requires_grad}
    for n, p in m1.named_parameters():
        if p.requires_grad:
            _close(p, p0[n], 2e-5)
    assert (n0, n1) == (4, 2)
    assert r1.info["prefix_cache"]["bytes"] == sum(len(e["input_ids"]) for e in data) * 576 * 4


# ------------------------------------------------------------------ correctness conditions
def test_refuses_trainable_embeddings_tied_or_via_train_modules():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tied = transformers.LlamaForCausalLM(cfg).double()
    hs.patch(tied, _plan("llama"), train_modules=("lm_head",))
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' \(also lm_head.weight\) is trainable"):
        PrefixCache().attach(tied)
    m = tiny_model("llama", layers=4)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        hs.tune(m, _plan("llama"), _examples(2), train_modules=("model.embed_tokens",), progress=False,
                prefix_cache=True)


def test_refuses_a_parameter_made_trainable_below_the_horizon_after_attaching():
    model = hs.patch(tiny_model("llama", layers=4), _plan("llama"))
    PrefixCache().attach(model)
    w = model.model.layers[1].mlp.up_proj.weight
    w.requires_grad_(True)
    ids, mask = _left_batch()
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is trainable"):
        model(input_ids=ids, attention_mask=mask)


def test_refuses_horizon_at_layer_zero_and_models_it_cannot_serve():
    modes = [["t", "f", "f", "f"]] + [["f"] * 4] * 3
    model = hs.patch(tiny_model("llama", layers=4), _plan("llama", modes))
    with pytest.raises(ValueError, match="lowest trainable layer is 0"):
        PrefixCache().attach(model)
    with pytest.raises(ValueError, match="patched by headsparse.patch"):
        PrefixCache().attach(tiny_model("llama", layers=4))
    with pytest.raises(ValueError, match="prefix_cache needs a fixed head plan"):
        hs.tune(tiny_model("llama", layers=4), None, _examples(2), progress=False, prefix_cache=True)


@pytest.mark.parametrize("wrapper", ["fsdp2", "zero3"])
def test_refuses_sharded_layers_below_the_horizon(wrapper, monkeypatch):
    """FSDP2/ZeRO-3 gather a layer's weights with a collective in its forward: a replaying rank would skip them and
    hang its peers, so a sharded layer below the horizon is refused before any forward work."""
    import headsparse.patch.prefix_cache as pc

    model = hs.patch(tiny_model("llama", layers=4), _plan("llama"))
    PrefixCache().attach(model)
    target = model.model.layers[1].mlp.up_proj.weight
    if wrapper == "fsdp2":
        monkeypatch.setattr(pc, "is_sharded", lambda t: t is target)
    else:
        target.ds_id = 7  # what DeepSpeed ZeRO-3 puts on every parameter it manages
    ids, mask = _left_batch()
    with pytest.raises(ValueError, match=r"layer 1: mlp.up_proj.weight is an FSDP2/ZeRO-3 parameter"):
        model(input_ids=ids, attention_mask=mask)


def test_a_failed_tune_detaches_its_own_cache():
    model = tiny_model("llama", layers=4)

    def fail(step, loss):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        hs.tune(model, _plan("llama"), _examples(4), epochs=2, progress=False, prefix_cache=True, on_step=fail)
    assert prefix_cache_of(model) is None


def test_dropout_below_the_horizon_runs_in_eval_mode_cached_or_not():
    torch.manual_seed(0)
    model = tiny_model("gpt2", layers=4)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3  # dropout everywhere, below and above the horizon
    hs.patch(model, _plan("gpt2"))
    model.train()
    ids, mask = _left_batch()
    prefix = [model.transformer.drop] + list(model.transformer.h[:2])

    def reference():  # the documented method: prefix in eval mode, dropout above it as usual
        for m in prefix:
            m.eval()
        torch.manual_seed(5)
        out = _loss_and_grads(model, ids, mask)
        model.train()
        return out

    def plain():
        torch.manual_seed(5)
        return _loss_and_grads(model, ids, mask)

    ref_loss, ref_grads = reference()
    assert abs(float(plain()[0] - ref_loss)) > 1e-6  # dropout below the horizon would change the result
    cache = PrefixCache().attach(model)
    for _ in range(2):  # fill, then replay
        torch.manual_seed(5)
        loss, grads = _loss_and_grads(model, ids, mask)
        _close(loss, ref_loss, 1e-12)
        for n in grads:
            _close(grads[n], ref_grads[n], 1e-12)
    assert cache.hits == 1 and all(m.training for m in prefix)  # the user's train/eval flags are restored


def test_weight_change_below_the_horizon_drops_stale_entries():
    model = hs.patch(tiny_model("llama", layers=4), _plan("llama"))
    cache = PrefixCache().attach(model)
    ids, mask = _left_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        key = cache.key
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # an in-place change (version counter)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert cache.hits == 0 and cache.misses == 2 and cache.key != key
    cache.detach()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    _close(got[keep], want[keep], 1e-12)
    # a change the version counter does not see (through .data) is caught by verify(), which tune runs per epoch
    cache.attach(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.model.embed_tokens.weight.data[ids[0, -1]] += 1.0
    assert cache.verify() is False and len(cache) == 0


def test_unpatch_and_a_new_plan_drop_the_cache():
    model = hs.patch(tiny_model("llama", layers=4), _plan("llama"))
    cache = PrefixCache().attach(model)
    ids, mask = _left_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(cache) == 3
    hs.unpatch(model)
    assert len(cache) == 0 and cache.attached is None and prefix_cache_of(model) is None
    modes = [["f"] * 4, ["t", "f", "f", "f"], ["f"] * 4, ["f"] * 4]
    hs.patch(model, _plan("llama", modes))
    calls = _Calls(_layer0(model))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls.n == 1 and cache.misses == 1  # the old cache is no longer hooked in


def test_spilled_entries_are_memory_mapped_and_replay_exactly(tmp_path):
    model = hs.patch(tiny_model("qwen2", layers=4), _plan("qwen2"))
    model.train()
    ids, mask = _left_batch()
    ref_loss, ref_grads = _loss_and_grads(model, ids, mask)
    cache = PrefixCache(max_memory_bytes=0, spill_dir=tmp_path).attach(model)
    _loss_and_grads(model, ids, mask)
    st = cache.stats()
    assert st["memory_bytes"] == 0 and st["disk_bytes"] == int(mask.sum()) * 64 * 8 and st["spill_files"] == 1
    loss, grads = _loss_and_grads(model, ids, mask)
    assert cache.hits == 1
    _close(loss, ref_loss, 1e-12)
    for n in grads:
        _close(grads[n], ref_grads[n], 1e-12)
    cache.clear()
    assert list(tmp_path.iterdir()) == []


def test_forwards_it_cannot_serve_run_uncached():
    model = hs.patch(tiny_model("llama", layers=4), _plan("llama"))
    cache = PrefixCache().attach(model)
    ids, mask = _left_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        emb = model.model.embed_tokens(ids)
        out2 = model(inputs_embeds=emb, attention_mask=mask)
    assert cache.bypassed == 2 and len(cache) == 0 and len(out.hidden_states) == 5
    _close(out2.logits, out.logits, 1e-12)


def test_retain_keeps_the_given_examples():
    model = hs.patch(tiny_model("llama", layers=4), _plan("llama"))
    cache = PrefixCache().attach(model)
    data = _examples(4)
    from headsparse.recipes.data import collate

    with torch.no_grad():
        b = collate(data, 0)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert all(cache.has_example(e) for e in data)
    cache.retain(data[1:3])
    assert [cache.has_example(e) for e in data] == [False, True, True, False]
    assert example_key(data[1]["input_ids"]) in cache


# ------------------------------------------------------------------ mining fills it
def test_p2d_forward_signature_fills_the_cache_that_tune_starts_from():
    pool, target = _examples(10, seed=4), _examples(3, seed=5)
    plan = _plan("llama")
    ref = tiny_model("llama", layers=4)
    # on an unpatched model the cache is filled on a patched copy, whose signatures (pruned heads removed) are
    # those of mining on the patched model
    plain = hs.mine(hs.patch(copy.deepcopy(ref), plan), pool, plan, "p2d", fraction=0.4, target=target,
                    signature="fwd")
    cache = PrefixCache()
    mined = hs.mine(ref, pool, plan, "p2d", fraction=0.4, target=target, signature="fwd", prefix_cache=cache)
    assert mined.indices == plain.indices and len(mined.indices) == 4
    _close(mined.scores, plain.scores, 1e-12)
    subset = mined.subset(pool)
    assert len(cache) == 4 and all(cache.has_example(e) for e in subset)  # the pool's other entries dropped
    assert mined.info["prefix_cache"]["fill_s"] > 0  # filled inside the selection's time
    (m0, r0, _), = [_tune_pair(lambda: tiny_model("llama", layers=4), plan, "exact", subset, epochs=2,
                               batch_size=2, lr=5e-2)[0]]
    model = tiny_model("llama", layers=4)
    calls = _Calls(_layer0(model))
    r1 = hs.tune(model, plan, subset, epochs=2, batch_size=2, lr=5e-2, progress=False, prefix_cache=cache)
    st = r1.info["prefix_cache"]
    assert calls.n == 0 and st["misses"] == 0 and st["hits"] == 4 and st["fill_s"] == 0  # no prefix in training
    _close(torch.tensor(r1.losses), torch.tensor(r0.losses), 1e-10)
    assert cache.attached is None and len(cache) == 4  # a given cache stays the caller's
    with pytest.raises(ValueError, match="signature='fwd'"):
        hs.mine(ref, pool, plan, "p2d", fraction=0.4, target=target, prefix_cache=cache)
