"""headsparse.score_heads on tiny random models: each method against a slow, obviously-correct implementation
of the same definition (hooks, per-sample and per-head loops), determinism, padding, options, I/O, plans."""
import copy
import math

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan, HeadScores
from headsparse.recipes.scoring import METHODS, model_info, scoring_loss, spearman
from headsparse.recipes.scoring.methods import proxy_finetune, resolve_options
from _hs_models import VOCAB, input_keeper, tiny_model

TOL = dict(rtol=1e-7, atol=1e-10)


def _data(b=5, s=9, seed=3, pad=True, left=False, nbatches=2):
    """Batches of random ids; some samples padded (right by default)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(nbatches):
        ids = torch.randint(3, VOCAB, (b, s), generator=g)
        am = torch.ones_like(ids)
        if pad:
            for r in range(1, b, 2):
                n = s - 1 - (r + j) % (s - 3)
                if left:
                    am[r, : s - n] = 0
                else:
                    am[r, n:] = 0
        ids = ids.masked_fill(am == 0, 0)
        out.append({"input_ids": ids, "attention_mask": am})
    return out


def _samples(data):
    """Every sample alone, padding removed: (1, n) batches."""
    out = []
    for b in data:
        for r in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][r].bool()
            ids = b["input_ids"][r][keep][None]
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _head_dim(model):
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


# ------------------------------------------------------------------ references
def ref_gradient(model, data):
    """Michel et al.: an explicit gate per head multiplies its output (o_proj input slice); per sample (batch
    size 1, unpadded), |dL/dgate|; averaged over samples; L2-normalised per layer."""
    info = model_info(model)
    L, H, D = info.num_layers, info.num_q_heads, _head_dim(model)
    gates = [torch.ones(H, dtype=torch.float64, requires_grad=True) for _ in range(L)]

    def pre(i):
        def fn(m, args):
            x = args[0]
            scale = torch.cat([gates[i][h].expand(D) for h in range(H)]).to(x.dtype)
            return (x * scale,)
        return fn

    handles = [info.o_module(i).register_forward_pre_hook(pre(i)) for i in range(L)]
    total = torch.zeros(L, H, dtype=torch.float64)
    samples = _samples(data)
    try:
        for smp in samples:
            for gt in gates:
                gt.grad = None
            loss = scoring_loss(model, info, smp)[0]
            loss.backward()
            for i in range(L):
                for h in range(H):
                    total[i, h] += abs(float(gates[i].grad[h]))
    finally:
        for hd in handles:
            hd.remove()
        model.zero_grad(set_to_none=True)
    s = total / len(samples)
    return s / s.pow(2).sum(-1, keepdim=True).sqrt()


def ref_apt(model, data, beta=0.85, kurtosis=True):
    """APT: hooks capture X and G at every o_proj input (full model with weight gradients, as in training);
    per head, channel loops over (sum|X|)(sum|G|); kurtosis by explicit moments; EMA from 0."""
    info = model_info(model)
    L, H, D = info.num_layers, info.num_q_heads, _head_dim(model)
    xs = {}
    handles = [info.o_module(i).register_forward_pre_hook(input_keeper(xs, i)) for i in range(L)]
    ema = torch.zeros(L, H, dtype=torch.float64)
    try:
        for b in data:
            model.zero_grad(set_to_none=True)
            loss = scoring_loss(model, info, b).mean()
            loss.backward()
            mask = b["attention_mask"].bool()
            cur = torch.zeros(L, H, dtype=torch.float64)
            for i in range(L):
                x = xs[i].detach().double()[mask]  # (tokens, C)
                g = xs[i].grad.double()[mask]
                wo = info.qkvo(i)["o"].double()
                mean_x = x.mean(0)
                for h in range(H):
                    sal = 0.0
                    for c in range(h * D, (h + 1) * D):
                        sal += float(x[:, c].abs().sum()) * float(g[:, c].abs().sum())
                    if kurtosis:
                        vals = (wo[:, h * D:(h + 1) * D] * mean_x[h * D:(h + 1) * D]).flatten()
                        n = vals.numel()
                        mu = float(vals.sum()) / n
                        m2 = sum((float(v) - mu) ** 2 for v in vals) / n
                        m4 = sum((float(v) - mu) ** 4 for v in vals) / n
                        k = m4 / m2 ** 2 - 3
                        sal += math.sqrt(max(k, 0.0))
                    cur[i, h] = sal
            ema = beta * ema + (1 - beta) * cur
    finally:
        for hd in handles:
            hd.remove()
        model.zero_grad(set_to_none=True)
    return ema


def ref_hifi(model, data, damping=0.85, tol=1e-6, max_iter=100):
    """HiFi as reconstructed: per head, the token matrix O_h (non-padding tokens of all batches); singular
    values by SVD; pairwise linear CKA by explicit products; PageRank with loops over nodes."""
    info = model_info(model)
    L, H, D = info.num_layers, info.num_q_heads, _head_dim(model)
    outs = {i: [] for i in range(L)}
    state = {}

    def pre(i):
        def fn(m, args):
            outs[i].append(args[0].detach().double()[state["mask"]])
        return fn

    handles = [info.o_module(i).register_forward_pre_hook(pre(i)) for i in range(L)]
    with torch.no_grad():
        for b in data:
            state["mask"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for hd in handles:
        hd.remove()
    scores = torch.zeros(L, H, dtype=torch.float64)
    for i in range(L):
        x = torch.cat(outs[i])
        n = x.shape[0]
        heads = [x[:, h * D:(h + 1) * D] for h in range(H)]
        rich = [float(torch.linalg.svdvals(o).sum()) / math.sqrt(n) for o in heads]
        w = [[0.0] * H for _ in range(H)]
        for a in range(H):
            for c in range(H):
                if a != c:
                    num = float(torch.linalg.matrix_norm(heads[a].T @ heads[c])) ** 2
                    den = float(torch.linalg.matrix_norm(heads[a].T @ heads[a])) * float(
                        torch.linalg.matrix_norm(heads[c].T @ heads[c]))
                    w[a][c] = num / den
        tele = [r / sum(rich) for r in rich]
        trans = []
        for a in range(H):
            row = [w[a][c] * rich[c] for c in range(H)]
            tot = sum(row)
            trans.append([v / tot for v in row])
        p = [1.0 / H] * H
        for _ in range(max_iter):
            new = [(1 - damping) * tele[c] + damping * sum(trans[a][c] * p[a] for a in range(H)) for c in range(H)]
            delta = sum(abs(u - v) for u, v in zip(new, p))
            p = new
            if delta < tol:
                break
        scores[i] = torch.tensor(p) * H
    return scores


def ref_alps(base, tuned, matrix="paper", temperature=1.0):
    """ALPS: per layer and query head, explicit row slices (KV head = h // group size), softmax, 1-d W1."""
    ib, it = model_info(base), model_info(tuned)
    H, Hkv, D = ib.num_q_heads, ib.num_kv_heads, _head_dim(base)
    out = torch.zeros(ib.num_layers, H, dtype=torch.float64)
    for i in range(ib.num_layers):
        wb, wt = ib.qkvo(i), it.qkvo(i)
        for h in range(H):
            kv = h // (H // Hkv)

            def vec(w):
                q = w["q"][h * D:(h + 1) * D].double()
                k = w["k"][kv * D:(kv + 1) * D].double()
                v = w["v"][kv * D:(kv + 1) * D].double()
                if matrix == "paper":
                    return (q.T @ k @ v.T).flatten()  # column convention: W_q (W_k)^T W_v, d_model x D
                return torch.cat([q.flatten(), k.flatten(), v.flatten()])

            p = torch.softmax(vec(wb) / temperature, 0)
            q_ = torch.softmax(vec(wt) / temperature, 0)
            n = p.numel()
            cp = cq = 0.0
            acc = 0.0
            for a, c in zip(p.tolist(), q_.tolist()):
                cp += a
                cq += c
                acc += abs(cp - cq)
            out[i, h] = acc / (n - 1)
    return out


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_gradient_matches_per_example_gates(family):
    model = tiny_model(family, layers=2)
    data = _data(left=(family == "llama"))
    got = hs.score_heads(model, data, "gradient")
    torch.testing.assert_close(got.scores, ref_gradient(model, data), **TOL)
    assert got.num_samples == 10 and got.num_tokens == int(sum(b["attention_mask"].sum() for b in data))
    # the model is restored: attention implementation and requires_grad
    assert model.config._attn_implementation == "sdpa"
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_gradient_per_example_equals_batched():
    model = tiny_model("qwen2", layers=2)
    data = _data()
    a = hs.score_heads(model, data, "gradient")
    b = hs.score_heads(model, _samples(data), "gradient")
    torch.testing.assert_close(a.scores, b.scores, **TOL)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_apt_matches_channel_loops(family):
    model = tiny_model(family, layers=2)
    data = _data(left=(family == "llama"))
    got = hs.score_heads(model, data, "apt")
    torch.testing.assert_close(got.scores, ref_apt(model, data), **TOL)
    no_k = hs.score_heads(model, data, "apt", kurtosis=False, beta=0.5)
    torch.testing.assert_close(no_k.scores, ref_apt(model, data, beta=0.5, kurtosis=False), **TOL)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_hifi_matches_svd_cka_pagerank_loops(family):
    model = tiny_model(family, layers=2)
    data = _data()
    got = hs.score_heads(model, data, "hifi", tol=1e-12, max_iter=500)
    torch.testing.assert_close(got.scores, ref_hifi(model, data, tol=1e-12, max_iter=500), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.scores.sum(-1), torch.full((2,), 4.0, dtype=torch.float64))
    assert 1 <= got.info["pagerank_iterations"] < 500


@pytest.mark.parametrize("family,matrix", [("llama", "paper"), ("llama", "qkv"), ("bert", "paper")])
def test_alps_matches_head_loops_gqa(family, matrix):
    model = tiny_model(family, layers=2, heads=4, kv_heads=2)
    data = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = hs.score_heads(model, data, "alps", steps=2, lr=1e-3, matrix=matrix, seed=5)
    # the scored model is untouched; the proxy run is reproducible and changes only q/k/v/o
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    opts = resolve_options("alps", {"steps": 2, "lr": 1e-3, "matrix": matrix})
    tuned, _, losses = proxy_finetune(model, model_info(model), data, None, opts, seed=5)
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(any(s in k for s in ("q_proj", "k_proj", "v_proj", "o_proj", "attention.self",
                                                    "attention.output.dense")) for k in changed), changed
    torch.testing.assert_close(got.scores, ref_alps(model, tuned, matrix), rtol=1e-6, atol=1e-14)
    assert (got.scores > 0).all()


def test_alps_gqa_heads_read_their_kv_group():
    """Heads beyond the KV-head count get full-size, group-correct scores (the published code's
    query-index slicing would leave them empty)."""
    from headsparse.recipes.scoring.methods import alps_head_matrices

    model = tiny_model("llama", layers=1, heads=4, kv_heads=2)
    w = model_info(model).qkvo(0)
    m = alps_head_matrices(w, 4, 2, 16, "qkv")
    assert m.shape == (4, 3 * 16 * 64)
    # heads 0 and 1 share KV head 0; heads 2 and 3 share KV head 1
    kpart = slice(16 * 64, 2 * 16 * 64)
    assert torch.equal(m[0, kpart], m[1, kpart]) and torch.equal(m[2, kpart], m[3, kpart])
    assert not torch.equal(m[1, kpart], m[2, kpart])
    torch.testing.assert_close(m[3, kpart], w["k"][16:32].double().flatten())


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_padding_free(method):
    model = tiny_model("llama", layers=2)
    data = _data(nbatches=1)
    kw = {"steps": 1} if method == "alps" else {}
    a = hs.score_heads(model, data, method, **kw)
    b = hs.score_heads(model, data, method, **kw)
    assert torch.equal(a.scores, b.scores)
    # three more padding columns (garbage ids, mask 0) change nothing
    wide = []
    for bt in data:
        ids = torch.cat([bt["input_ids"], torch.randint(3, VOCAB, (bt["input_ids"].shape[0], 3))], 1)
        am = torch.cat([bt["attention_mask"], torch.zeros_like(bt["attention_mask"][:, :3])], 1)
        wide.append({"input_ids": ids, "attention_mask": am})
    c = hs.score_heads(model, wide, method, **kw)
    torch.testing.assert_close(c.scores, a.scores, rtol=1e-6, atol=1e-9 if method != "alps" else 1e-15)
    assert c.num_tokens == a.num_tokens


def test_random_is_seeded():
    model = tiny_model("llama", layers=2)
    data = _data(nbatches=1)
    a = hs.score_heads(model, data, "random", seed=1)
    assert torch.equal(a.scores, hs.score_heads(model, data, "random", seed=1).scores)
    assert not torch.equal(a.scores, hs.score_heads(model, data, "random", seed=2).scores)
    assert a.options["seed"] == 1 and a.num_samples == 5


def test_texts_with_tokenizer():
    class Tok:
        pad_token = None
        eos_token = "<e>"

        def __call__(self, texts, return_tensors, padding, truncation, max_length):
            rows = [[3 + (ord(c) % 50) for c in t][:max_length] for t in texts]
            n = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
            am = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
            return {"input_ids": ids, "attention_mask": am}

    model = tiny_model("llama", layers=2)
    texts = ["hello world", "a", "scoring heads is fun", "xyz"]
    s = hs.score_heads(model, texts, "gradient", tokenizer=Tok(), batch_size=3, max_length=8)
    assert s.num_samples == 4 and s.num_tokens == 8 + 1 + 8 + 3
    with pytest.raises(ValueError, match="tokenizer"):
        hs.score_heads(model, texts, "gradient")


def test_bad_input():
    model = tiny_model("llama", layers=2)
    data = _data(nbatches=1)
    with pytest.raises(ValueError, match="method"):
        hs.score_heads(model, data, "fisher")
    with pytest.raises(ValueError, match="unknown option"):
        hs.score_heads(model, data, "apt", damping=0.5)
    with pytest.raises(ValueError, match="richness"):
        hs.score_heads(model, data, "hifi", richness="entropy")
    with pytest.raises(ValueError, match="beta"):
        hs.score_heads(model, data, "apt", beta=1.5)
    with pytest.raises(ValueError, match="input_ids"):
        hs.score_heads(model, [{"ids": 1}], "gradient")
    with pytest.raises(ValueError, match="no samples"):
        hs.score_heads(model, [], "gradient")
    with pytest.raises(ValueError, match="not supported"):
        hs.score_heads(torch.nn.Linear(2, 2), data, "gradient")
    patched = hs.patch(copy.deepcopy(model), HeadPlan.for_model(model))
    with pytest.raises(ValueError, match="patched"):
        hs.score_heads(patched, data, "gradient")


def test_json_roundtrip_and_plans(tmp_path):
    model = tiny_model("llama", layers=3, heads=4, kv_heads=2)
    s = hs.score_heads(model, _data(nbatches=1), "hifi")
    p = tmp_path / "s.json"
    s.save(p)
    t = HeadScores.load(p)
    assert torch.equal(t.scores, s.scores) and t.method == "hifi" and t.options == s.options
    assert t.num_samples == s.num_samples and t.num_tokens == s.num_tokens and t.num_kv_heads == 2
    plan = t.to_plan(fraction=0.25)
    assert plan.count("train") == 3 and plan.num_kv_heads == 2 and plan.model_family == "llama"
    top3 = set(t.ranking()[:3])
    assert {(i, h) for i in range(3) for h in plan.heads(i, "train")} == top3
    plan.check_model(model)
    pk = t.to_plan(per_layer_k=1, prune_fraction=0.25)
    for i in range(3):
        assert pk.heads(i, "train") == [int(t.scores[i].argmax())]
    assert pk.count("pruned") == 3
    with pytest.raises(ValueError):
        t.to_plan(fraction=0.1, per_layer_k=1)
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="HeadScores"):
        HeadScores.load(tmp_path / "bad.json")
    assert "layer" in t.summary(plan)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
