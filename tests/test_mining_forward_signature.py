"""P2D's forward-only signature: per-head output norms against an explicit float64 recomputation, early stop, mining."""
import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import headsparse as hs
from headsparse import HeadMode, HeadPlan
from headsparse.recipes.data import collate
from headsparse.recipes.mining.features import forward_signature, train_head_index
from headsparse.recipes.tasks import synthetic_task, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _plan(layers=3, heads=4, kv=2, train=((0, 1), (1, 0), (1, 3)), pruned=()):
    modes = [[HeadMode.FROZEN] * heads for _ in range(layers)]
    for i, h in train:
        modes[i][h] = HeadMode.TRAIN
    for i, h in pruned:
        modes[i][h] = HeadMode.PRUNED
    return HeadPlan(modes, num_kv_heads=kv, model_family="llama")


def _explicit_norms(model, batch, plan):
    """Per (sample, TRAIN head): mean over valid tokens of softmax(q k^T / sqrt(d) + mask) v, in float64."""
    m = copy.deepcopy(model).double()
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = m(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    cfg = m.config
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // nq
    b, s = ids.shape
    pos = torch.arange(s)[None].expand(b, s)
    keep = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None] & am.bool()[:, None, None, :]
    cols = []
    for i, h in train_head_index(plan):
        layer = m.model.layers[i]
        with torch.no_grad():
            x = layer.input_layernorm(hidden[i])
            q = layer.self_attn.q_proj(x).view(b, s, nq, d).transpose(1, 2)
            k = layer.self_attn.k_proj(x).view(b, s, nkv, d).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(b, s, nkv, d).transpose(1, 2)
            cos, sin = m.model.rotary_emb(x, pos)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            g = h // (nq // nkv)
            sc = (q[:, h] @ k[:, g].transpose(-1, -2)) / d ** 0.5
            p = torch.softmax(sc.masked_fill(~keep[:, 0], float("-inf")), -1)
            o = p @ v[:, g]
        w = am.double()[..., None]
        cols.append((o * w).sum(1) / w.sum(1))
    return torch.cat(cols, 1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, layers=3, heads=4, kv_heads=2)


def _batch():
    g = torch.Generator().manual_seed(0)
    ex = [{"input_ids": torch.randint(3, 1000, (n,), generator=g).tolist()} for n in (7, 12, 3, 9)]
    return ex, collate(ex, 0)


@pytest.mark.parametrize("patched", [False, True])
def test_forward_signature_matches_explicit_head_norms(model, patched):
    plan = _plan(pruned=((1, 2),))
    ex, batch = _batch()
    want = _explicit_norms(model, batch, plan)
    m = model
    if patched:  # a patched model lays heads out TRAIN first and drops pruned ones: mapped back to plan order
        m = hs.patch(copy.deepcopy(model), plan)
    got = forward_signature(m, ex, plan, batch_size=3)
    assert got.shape == (4, 3 * 16)  # 3 TRAIN heads of dim 16
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_forward_stops_after_the_highest_train_layer(model):
    plan = _plan(train=((0, 1), (1, 0)))  # nothing in layer 2
    calls = {"layer2": 0, "head": 0}
    h1 = model.model.layers[2].register_forward_hook(lambda *a: calls.__setitem__("layer2", calls["layer2"] + 1))
    h2 = model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    try:
        ex, _ = _batch()
        forward_signature(model, ex, plan, batch_size=2)
    finally:
        h1.remove(), h2.remove()
    assert calls == {"layer2": 0, "head": 0}
    assert not model.training  # the tiny model is in eval mode and stays so


def test_forward_signature_errors(model):
    ex, _ = _batch()
    with pytest.raises(ValueError, match="no TRAIN heads"):
        forward_signature(model, ex, _plan(train=()))
    with pytest.raises(ValueError, match="signature"):
        hs.mine(model, ex, _plan(), method="p2d", target=ex, signature="nope")


def test_p2d_fwd_mining_finds_planted_targets():
    model = tiny_llama(seed=0, layers=3, heads=8, kv_heads=4)
    task = synthetic_task(n_pool=100, n_targets=10, n_target_set=8, n_eval=8, seed=1)
    scores = hs.score_heads(model, [collate(task.target, 0)], method="gradient").scores
    plan = HeadPlan.from_scores(scores, fraction=0.25, num_kv_heads=4, model_family="llama")
    res = hs.mine(model, task.pool, plan, method="p2d", fraction=0.1, target=task.target, signature="fwd")
    assert res.info["signature"] == "fwd" and res.info["signature_dim"] == plan.count("train") * 8
    # random selection of 10 from 100 with 10 targets: expected recall 0.10 (the gate signature gets >= 0.6)
    assert res.precision_recall(task.is_target)["recall"] >= 0.4


def test_signature_cache_hits_and_invalidates(tmp_path, model):
    from headsparse.recipes.mining.features import cached_forward_signature

    plan_a, plan_b = _plan(), _plan(train=((2, 3), (0, 0)))
    ex, _ = _batch()
    sig, status, spent = cached_forward_signature(model, ex, plan_a, tmp_path, batch_size=3)
    assert status == "miss" and spent > 0 and len(list(tmp_path.glob("fwdsig-*.safetensors"))) == 1
    torch.testing.assert_close(sig, forward_signature(model, ex, plan_a, batch_size=3))
    # another plan on the same model and pool: a hit, the right columns, no forward
    calls = []
    h = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        sig_b, status, spent = cached_forward_signature(model, ex, plan_b, tmp_path, batch_size=3)
    finally:
        h.remove()
    assert status == "hit" and spent == 0.0 and not calls
    torch.testing.assert_close(sig_b, forward_signature(model, ex, plan_b, batch_size=3))
    # a changed pool or a changed weight is a new key
    assert cached_forward_signature(model, ex[:-1], plan_a, tmp_path)[1] == "miss"
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert cached_forward_signature(other, ex, plan_a, tmp_path)[1] == "miss"
    assert len(list(tmp_path.glob("fwdsig-*.safetensors"))) == 3 and not list(tmp_path.glob(".*"))
    # mine reports the cache and gives the same selection as without it
    r1 = hs.mine(model, ex, plan_b, method="p2d", fraction=0.5, target=ex[:2], signature="fwd", cache_dir=tmp_path)
    r0 = hs.mine(model, ex, plan_b, method="p2d", fraction=0.5, target=ex[:2], signature="fwd")
    assert r1.info["cache"] == "hit" and r1.indices == r0.indices
    with pytest.raises(ValueError, match="cache_dir"):
        cached_forward_signature(hs.patch(copy.deepcopy(model), plan_a), ex, plan_a, tmp_path)
