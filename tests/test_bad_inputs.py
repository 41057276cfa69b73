"""A systematic walk over the public entry points with bad input.

Every case asserts: the exception type (ValueError; FileNotFoundError for a missing file), that the message names
the offending argument, that nothing was modified (model state_dict bit-identical, requires_grad flags and patch
state unchanged, input tensors and lists unchanged) and, for calls that write files, that no file or temp file is
left behind. The CLI verbs run as subprocesses: non-zero exit, no output file, and a one-line message naming the
argument on stderr without a Python traceback.

Complements tests/test_attention_errors.py, tests/test_file_errors.py and tests/test_run_user_data.py
(none of their exact cases is repeated here).
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import headsparse as hs
from headsparse import HeadPlan
from headsparse.recipes import stats
from headsparse.patch.core import is_patched
from headsparse.recipes.records import read_jsonl
from _hs_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ shared state and checks
@pytest.fixture(scope="module")
def base():
    """One tiny Llama (2 layers, 4 query / 2 KV heads, float32) per module; tests use deep copies."""
    return tiny_model("llama", layers=2, dtype=torch.float32)


PLAN = HeadPlan([["t", "f", "p", "f"], ["f", "t", "f", "p"]], num_kv_heads=2, model_family="llama")


def _snap(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()], is_patched(model),
            getattr(model.config, "_attn_implementation", None))


def _assert_untouched(model, snap):
    state, grads, patched, impl = snap
    after = model.state_dict()
    assert after.keys() == state.keys(), "state_dict keys changed (model patched or unpatched?)"
    for k in state:
        assert torch.equal(after[k], state[k]), f"{k} changed"
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads, "requires_grad flags changed"
    assert is_patched(model) == patched
    assert getattr(model.config, "_attn_implementation", None) == impl


def _files(folder):
    """Every entry under ``folder`` (hidden temp files included)."""
    out = []
    for root, dirs, files in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, f), folder) for f in files + dirs]
    return sorted(out)


def _pool(n=8, s=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 1000, (s,), generator=g).tolist()} for _ in range(n)]


def _batches(n=2, b=2, s=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 1000, (b, s), generator=g), "attention_mask": torch.ones(b, s, dtype=torch.long)}
            for _ in range(n)]


class _Tok:
    """A minimal tokenizer: fixed-length random ids (enough for score_heads on a list of texts)."""

    pad_token = eos_token = "<pad>"

    def __call__(self, texts, **kw):
        n = len(texts)
        return {"input_ids": torch.randint(3, 1000, (n, 5)), "attention_mask": torch.ones(n, 5, dtype=torch.long)}


# ================================================================== hs.attention
def _qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g),
            torch.randn(2, 2, 8, 16, generator=g))


META = torch.device("meta")
B4 = dict(dtype=torch.bool)

ATTENTION = [
    # devices
    ("k on another device", r"k=meta", lambda q, k, v: hs.attention(q, k.to(META), v)),
    pytest.param("grad_heads on another device", "grad_heads",
                 lambda q, k, v: hs.attention(q, k, v, grad_heads=torch.ones(4, device=META, **B4)), id="grad_heads on another device"),
    pytest.param("pruned_heads on another device", "pruned_heads",
                 lambda q, k, v: hs.attention(q, k, v, pruned_heads=torch.zeros(4, device=META, **B4)), id="pruned_heads on another device"),
    ("attention_mask on another device", "attention_mask",
     lambda q, k, v: hs.attention(q, k, v, attention_mask=torch.ones(2, 1, 8, 8, device=META, **B4))),
    # grad_heads / pruned_heads
    ("grad_heads int64", "grad_heads", lambda q, k, v: hs.attention(q, k, v, grad_heads=torch.ones(4, dtype=torch.long))),
    ("grad_heads 2-D", "grad_heads", lambda q, k, v: hs.attention(q, k, v, grad_heads=torch.ones(1, 4, **B4))),
    # Python lists are accepted (what torch.compile keeps static): of bools, one per head
    ("grad_heads list of ints", "grad_heads", lambda q, k, v: hs.attention(q, k, v, grad_heads=[1] * 4)),
    ("grad_heads list too short", "grad_heads", lambda q, k, v: hs.attention(q, k, v, grad_heads=[True] * 3)),
    ("pruned_heads length 5", "pruned_heads", lambda q, k, v: hs.attention(q, k, v, pruned_heads=torch.ones(5, **B4))),
    ("pruned_heads float", "pruned_heads", lambda q, k, v: hs.attention(q, k, v, pruned_heads=torch.ones(4))),
    # kv_head_index
    ("kv_head_index negative", "kv_head_index",
     lambda q, k, v: hs.attention(q, k, v, kv_head_index=torch.tensor([-1, 0, 1, 1]))),
    ("kv_head_index length 5", "kv_head_index",
     lambda q, k, v: hs.attention(q, k, v, kv_head_index=torch.tensor([0, 0, 1, 1, 1]))),
    ("kv_head_index list of floats", "kv_head_index",
     lambda q, k, v: hs.attention(q, k, v, kv_head_index=[0.0, 0.0, 1.0, 1.0])),
    ("kv_head_index list out of range", "kv_head_index",
     lambda q, k, v: hs.attention(q, k, v, kv_head_index=[0, 0, 1, 2])),
    # out_layout / backend
    ("out_layout upper case", "out_layout", lambda q, k, v: hs.attention(q, k, v, out_layout="BHSD")),
    ("out_layout None", "out_layout", lambda q, k, v: hs.attention(q, k, v, out_layout=None)),
    ("backend None", "backend", lambda q, k, v: hs.attention(q, k, v, backend=None)),
    ("backend empty", "backend", lambda q, k, v: hs.attention(q, k, v, backend="")),
    ("backend upper case", "backend", lambda q, k, v: hs.attention(q, k, v, backend="TORCH")),
    # mask shapes
    ("mask 3 heads", "attention_mask", lambda q, k, v: hs.attention(q, k, v, attention_mask=torch.ones(2, 3, 8, 8, **B4))),
    ("mask 5-D", "attention_mask", lambda q, k, v: hs.attention(q, k, v, attention_mask=torch.ones(1, 2, 1, 8, 8, **B4))),
    ("additive mask batch 3", "attention_mask",
     lambda q, k, v: hs.attention(q, k, v, attention_mask=torch.zeros(3, 1, 8, 8))),
    ("mask list", "attention_mask", lambda q, k, v: hs.attention(q, k, v, attention_mask=[[True] * 8] * 8)),
    # shapes and dtypes
    ("q 5-D", "q must have 4 dims", lambda q, k, v: hs.attention(q[None], k, v)),
    ("v float16", r"v=torch\.float16", lambda q, k, v: hs.attention(q, k, v.half())),
    ("bool inputs", "q must be float", lambda q, k, v: hs.attention(q.bool(), k.bool(), v.bool())),
    ("complex inputs", "q must be float", lambda q, k, v: hs.attention(*(t.to(torch.complex64) for t in (q, k, v)))),
    ("k and v head counts differ", "k and v", lambda q, k, v: hs.attention(q, k, v[:, :1])),
    ("q a list", "q must be a torch.Tensor", lambda q, k, v: hs.attention(q.tolist(), k, v)),
    ("head_dim 0", "head_dim", lambda q, k, v: hs.attention(q[..., :0], k[..., :0], v[..., :0])),
    ("no query heads", "heads", lambda q, k, v: hs.attention(q[:, :0], k, v)),
    ("scale a string", "scale", lambda q, k, v: hs.attention(q, k, v, scale="1")),
    ("scale inf", "scale", lambda q, k, v: hs.attention(q, k, v, scale=math.inf)),
]


@pytest.mark.parametrize("name,match,call", ATTENTION, ids=[c[0] if isinstance(c, tuple) else c.id for c in ATTENTION])
def test_attention(name, match, call):
    q, k, v = _qkv()
    before = [t.clone() for t in (q, k, v)]
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before)), "input tensors changed"


# ================================================================== HeadPlan
PLAN_CTOR = [
    ("no layers", "modes", lambda: HeadPlan([])),
    ("modes a string", "modes", lambda: HeadPlan("TTFF")),
    ("modes None", "modes", lambda: HeadPlan(None)),
    ("layer without heads", "modes", lambda: HeadPlan([[]])),
    ("ragged layers", "modes", lambda: HeadPlan([["t", "f"], ["t"]])),
    ("unknown mode letter", "mode", lambda: HeadPlan([["t", "z"]])),
    ("num_kv_heads not a divisor", "num_kv_heads", lambda: HeadPlan([["t"] * 4], num_kv_heads=3)),
    ("num_kv_heads 0", "num_kv_heads", lambda: HeadPlan([["t"] * 4], num_kv_heads=0)),
    ("num_kv_heads bool", "num_kv_heads", lambda: HeadPlan([["t"] * 4], num_kv_heads=True)),
    ("num_kv_heads float", "num_kv_heads", lambda: HeadPlan([["t"] * 4], num_kv_heads=2.0)),
    ("kv_policy unknown", "kv_policy", lambda: HeadPlan([["t"] * 4], kv_policy="some")),
    ("model_family int", "model_family", lambda: HeadPlan([["t"] * 4], model_family=5)),
]


@pytest.mark.parametrize("name,match,call", PLAN_CTOR, ids=[c[0] for c in PLAN_CTOR])
def test_headplan_constructor(name, match, call):
    with pytest.raises(ValueError, match=match):
        call()


SCORES = [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]
FROM_SCORES = [
    ("scores 1-D", "scores", lambda s: HeadPlan.from_scores(s[0], fraction=0.5)),
    ("scores with NaN", "scores", lambda s: HeadPlan.from_scores(s.clone().fill_(math.nan), fraction=0.5)),
    ("scores empty", "scores", lambda s: HeadPlan.from_scores(s[:0], fraction=0.5)),
    ("scores strings", "scores", lambda s: HeadPlan.from_scores([["a", "b"]], fraction=0.5)),
    ("both selectors", "fraction and per_layer_k",
     lambda s: HeadPlan.from_scores(s, fraction=0.5, per_layer_k=1)),
    ("no selector", "fraction and per_layer_k", lambda s: HeadPlan.from_scores(s)),
    ("fraction 1.5", "fraction", lambda s: HeadPlan.from_scores(s, fraction=1.5)),
    ("fraction string", "fraction", lambda s: HeadPlan.from_scores(s, fraction="0.5")),
    ("per_layer_k above heads", "per_layer_k", lambda s: HeadPlan.from_scores(s, per_layer_k=5)),
    ("per_layer_k float", "per_layer_k", lambda s: HeadPlan.from_scores(s, per_layer_k=1.0)),
    ("prune_fraction 2", "prune_fraction", lambda s: HeadPlan.from_scores(s, fraction=0.25, prune_fraction=2)),
    ("prune_threshold NaN", "prune_threshold",
     lambda s: HeadPlan.from_scores(s, fraction=0.25, prune_threshold=math.nan)),
    ("num_kv_heads 3", "num_kv_heads", lambda s: HeadPlan.from_scores(s, fraction=0.25, num_kv_heads=3)),
]


@pytest.mark.parametrize("name,match,call", FROM_SCORES, ids=[c[0] for c in FROM_SCORES])
def test_headplan_from_scores(name, match, call):
    s = torch.tensor(SCORES)
    before = s.clone()
    with pytest.raises(ValueError, match=match):
        call(s)
    assert torch.equal(s, before), "scores changed"


BAD_PLAN_FILES = {
    "version 2": lambda d: {**d, "version": 2},
    "unknown mode symbol": lambda d: {**d, "modes": ["Tz.x", "...."]},
    "num_layers disagrees": lambda d: {**d, "num_layers": 3},
    "num_kv_heads not a divisor": lambda d: {**d, "num_kv_heads": 3},
    "kv_policy unknown": lambda d: {**d, "kv_policy": "x"},
}


@pytest.mark.parametrize("name", list(BAD_PLAN_FILES))
def test_headplan_load_bad_content(tmp_path, name):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(BAD_PLAN_FILES[name](PLAN.to_dict())))
    with pytest.raises(ValueError, match="plan.json"):
        HeadPlan.load(path)


def test_headplan_load_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path.name)):
        HeadPlan.load(tmp_path)


def test_headplan_save_onto_a_directory(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(OSError, match="target"):  # an OS condition: IsADirectoryError naming the path
        PLAN.save(target)
    assert _files(tmp_path) == ["target"], "a file or temp file was left beside the target"


FOR_MODEL = [
    ("model a string", "model", lambda m: HeadPlan.for_model("llama")),
    ("unsupported module", "model", lambda m: HeadPlan.for_model(torch.nn.Linear(2, 2))),
    ("unknown mode", "mode", lambda m: HeadPlan.for_model(m, mode="bogus")),
    ("unknown kv_policy", "kv_policy", lambda m: HeadPlan.for_model(m, kv_policy="bogus")),
]

def _rejects_leaving_untouched(base, match, call):
    """``call`` on a copy of ``base`` raises ValueError matching ``match`` and leaves the copy as it was."""
    m = copy.deepcopy(base)
    snap = _snap(m)
    with pytest.raises(ValueError, match=match):
        call(m)
    _assert_untouched(m, snap)



@pytest.mark.parametrize("name,match,call", FOR_MODEL, ids=[c[0] for c in FOR_MODEL])
def test_headplan_for_model(base, name, match, call):
    _rejects_leaving_untouched(base, match, call)


# ================================================================== patch / unpatch
PATCH = [
    ("plan a dict", "plan", False, lambda m: hs.patch(m, PLAN.to_dict())),
    ("plan with 3 layers", "num layers", False, lambda m: hs.patch(m, HeadPlan([["t"] * 4] * 3, num_kv_heads=2))),
    ("plan with 8 heads", "query heads", False, lambda m: hs.patch(m, HeadPlan([["t"] * 8] * 2, num_kv_heads=2))),
    ("plan with 4 KV heads", "KV heads", False, lambda m: hs.patch(m, HeadPlan([["t"] * 4] * 2, num_kv_heads=4))),
    ("plan for gpt2", "model family",
     False, lambda m: hs.patch(m, HeadPlan([["t"] * 4] * 2, num_kv_heads=2, model_family="gpt2"))),
    ("unknown grad mode", "grad", False, lambda m: hs.patch(m, PLAN, grad="fast")),
    ("unknown train_modules", "train_modules", False, lambda m: hs.patch(m, PLAN, train_modules=("classifier",))),
    ("model a string", "model", False, lambda m: hs.patch("model", PLAN)),
    ("patching twice", "already patched", True, lambda m: hs.patch(m, PLAN)),
    ("patching twice, other plan", "already patched", True, lambda m: hs.patch(m, HeadPlan.for_model(m))),
    ("unpatch an unpatched model", "model is not patched", False, lambda m: hs.unpatch(m)),
    ("unpatch a string", "model is not patched", False, lambda m: hs.unpatch("model")),
]


@pytest.mark.parametrize("name,match,patched,call", PATCH, ids=[c[0] for c in PATCH])
def test_patch_unpatch(base, name, match, patched, call):
    m = copy.deepcopy(base)
    if patched:
        hs.patch(m, PLAN)
    snap = _snap(m)
    with pytest.raises(ValueError, match=match):
        call(m)
    _assert_untouched(m, snap)


# ================================================================== save_delta / load_delta
def test_save_delta_unpatched_model(base, tmp_path):
    m = copy.deepcopy(base)
    snap = _snap(m)
    with pytest.raises(ValueError, match="model is not patched"):
        hs.save_delta(m, tmp_path / "d.safetensors")
    _assert_untouched(m, snap)
    assert _files(tmp_path) == []


def test_save_delta_onto_a_directory(base, tmp_path):
    m = hs.patch(copy.deepcopy(base), PLAN)
    (tmp_path / "target").mkdir()
    snap = _snap(m)
    with pytest.raises(OSError, match="target"):  # an OS condition: IsADirectoryError naming the path
        hs.save_delta(m, tmp_path / "target")
    _assert_untouched(m, snap)
    assert _files(tmp_path) == ["target"], "a file or temp file was left beside the target"


@pytest.fixture(scope="module")
def delta(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "good.safetensors"
    hs.save_delta(hs.patch(copy.deepcopy(base), PLAN), path)
    return path


def _other_hidden():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return transformers.LlamaForCausalLM(cfg).eval()


LOAD_DELTA = [
    ("path is a directory", FileNotFoundError, "delta", lambda b, d: (copy.deepcopy(b), d.parent)),
    ("patched with another plan", ValueError, "different plan",
     lambda b, d: (hs.patch(copy.deepcopy(b), HeadPlan.for_model(b)), d)),
    ("model with 3 layers", ValueError, "num layers", lambda b, d: (tiny_model("llama", layers=3, dtype=torch.float32), d)),
    ("model of another hidden size", ValueError, "shape", lambda b, d: (_other_hidden(), d)),
    ("model a string", ValueError, "model", lambda b, d: ("model", d)),
]


@pytest.mark.parametrize("name,exc,match,make", LOAD_DELTA, ids=[c[0] for c in LOAD_DELTA])
def test_load_delta(base, delta, name, exc, match, make):
    m, path = make(base, delta)
    snap = _snap(m) if not isinstance(m, str) else None
    with pytest.raises(exc, match=match):
        hs.load_delta(m, path)
    if snap is not None:
        _assert_untouched(m, snap)


# ================================================================== score_heads
def _score(data=None, method="gradient", **kw):
    return lambda m: hs.score_heads(m, _batches() if data is None else data, method, **kw)


SCORE = [
    ("unknown method", "method", _score(method="bogus")),
    ("method None", "method", _score(method=None)),
    ("empty data, gradient", "data", _score(data=[])),
    ("empty data, hifi", "data", _score(data=[], method="hifi")),
    ("empty data, alps", "data", _score(data=[], method="alps")),
    ("data a single string", "data", _score(data="hello")),
    ("batch without input_ids", "data", _score(data=[{"x": 1}])),
    ("texts without tokenizer", "tokenizer", _score(data=["a", "b"])),
    ("batch_size 0 on batches", "batch_size", _score(batch_size=0)),
    ("batch_size -1 on texts", "batch_size", _score(data=["a", "b"], tokenizer=_Tok(), batch_size=-1)),
    pytest.param("batch_size 0 on texts", "batch_size", _score(data=["a", "b"], tokenizer=_Tok(), batch_size=0),
                 id="batch_size 0 on texts"),
    pytest.param("batch_size string on texts", "batch_size",
                 _score(data=["a", "b"], tokenizer=_Tok(), batch_size="2"),
                 id="batch_size string on texts"),
    ("unknown option", "bogus", _score(method="hifi", bogus=1)),
    ("seed a string", "seed", _score(method="random", seed="1")),
    ("max_samples 0", "max_samples", _score(max_samples=0)),
]


@pytest.mark.parametrize("name,match,call", SCORE, ids=[c[0] if isinstance(c, tuple) else c.id for c in SCORE])
def test_score_heads(base, name, match, call):
    _rejects_leaving_untouched(base, match, call)


def test_score_heads_patched_model(base):
    m = hs.patch(copy.deepcopy(base), PLAN)
    snap = _snap(m)
    with pytest.raises(ValueError, match="model is patched"):
        hs.score_heads(m, _batches())
    _assert_untouched(m, snap)


# ================================================================== mine
def _mine(method="random", fraction=0.5, plan=PLAN, pool=None, **kw):
    return lambda m, p: hs.mine(m, p if pool is None else pool, plan, method, fraction, **kw)


MINE = [
    ("unknown method", "method", _mine(method="bogus")),
    ("fraction 0", "fraction", _mine(fraction=0)),
    ("fraction 1.5", "fraction", _mine(fraction=1.5)),
    ("fraction True", "fraction", _mine(fraction=True)),
    ("fraction NaN", "fraction", _mine(fraction=math.nan)),
    ("p2d without target", "target", _mine(method="p2d")),
    ("less without target", "target", _mine(method="less")),
    ("batch_size 0", "batch_size", _mine(method="loss", batch_size=0)),
    ("batch_size string", "batch_size", _mine(method="loss", batch_size="4")),
    ("unknown signature", "signature", _mine(method="p2d", target=_pool(2), signature="grad")),
    ("empty pool", "pool", _mine(pool=[])),
    ("empty target", "target", _mine(method="p2d", target=[])),
    ("one-token pool example", r"pool\[0\]", _mine(pool=[{"input_ids": [5]}])),
    ("float tensor pool", "pool", _mine(pool=torch.zeros(4, 6))),
    ("plan a dict", "plan", _mine(plan=PLAN.to_dict())),
    ("plan for 3 layers", "plan", _mine(method="loss", plan=HeadPlan([["t"] * 4] * 3, num_kv_heads=2))),
    pytest.param("unknown slap option", "slap_options", _mine(method="slap", slap_options={"bogus": 1}),
                 id="unknown slap option"),
    pytest.param("sketch_k 0", "sketch_k", _mine(method="less", target=_pool(2), sketch_k=0),
                 id="sketch_k 0"),
]


@pytest.mark.parametrize("name,match,call", MINE, ids=[c[0] if isinstance(c, tuple) else c.id for c in MINE])
def test_mine(base, name, match, call):
    m = copy.deepcopy(base)
    pool = _pool()
    pool_before = copy.deepcopy(pool)
    snap = _snap(m)
    with pytest.raises(ValueError, match=match):
        call(m, pool)
    _assert_untouched(m, snap)
    assert pool == pool_before, "pool changed"


# ================================================================== tune
TUNE = [
    ("epochs 0", "epochs", dict(epochs=0)),
    ("epochs 1.5", "epochs", dict(epochs=1.5)),
    ("lr 0", "lr", dict(lr=0)),
    ("lr NaN", "lr", dict(lr=math.nan)),
    ("lr a string", "lr", dict(lr="1e-3")),
    ("batch_size 0", "batch_size", dict(batch_size=0)),
    ("unknown schedule", "schedule", dict(schedule="cosine")),
    ("unknown mode", "mode", dict(mode="lora")),
    ("max_steps 0", "max_steps", dict(max_steps=0)),
    ("unknown grad", "grad", dict(grad="fast")),
    ("apt with epochs 0", "epochs", dict(mode="apt", epochs=0)),
    ("apt with keep_final 0", "keep_final", dict(mode="apt", apt_options={"keep_final": 0})),
    ("empty data", "data", dict(data=[])),
    ("plan a dict", "plan", dict(plan=PLAN.to_dict())),
    ("apt with plan None", "plan", dict(plan=None, mode="apt")),
    ("full tuning with lr 0", "lr", dict(plan=None, lr=0)),
    pytest.param("weight_decay -1", "weight_decay", dict(weight_decay=-1.0),
                 id="weight_decay -1"),
    pytest.param("plan without TRAIN heads", "plan", dict(plan="frozen"),
                 id="plan without TRAIN heads"),
    pytest.param("warmup_steps -1", "warmup_steps", dict(warmup_steps=-1, max_steps=1),
                 id="warmup_steps -1"),
]


@pytest.mark.parametrize("name,match,kw", TUNE, ids=[c[0] if isinstance(c, tuple) else c.id for c in TUNE])
def test_tune(base, name, match, kw):
    m = copy.deepcopy(base)
    kw = dict(kw)
    plan = kw.pop("plan", PLAN)
    if plan == "frozen":
        plan = HeadPlan.for_model(m, "frozen")
    data = kw.pop("data", _pool())
    data_before = copy.deepcopy(data)
    snap = _snap(m)
    with pytest.raises(ValueError, match=match):
        hs.tune(m, plan, data, progress=False, **kw)
    _assert_untouched(m, snap)
    assert data == data_before


TUNE_PATCHED = [
    ("plan=None on a patched model", "plan=None", lambda m: hs.tune(m, None, _pool(), progress=False)),
    ("another plan on a patched model", "different plan",
     lambda m: hs.tune(m, HeadPlan.for_model(m), _pool(), progress=False)),
    ("apt on a patched model", "unpatched model", lambda m: hs.tune(m, PLAN, _pool(), progress=False, mode="apt")),
]


@pytest.mark.parametrize("name,match,call", TUNE_PATCHED, ids=[c[0] for c in TUNE_PATCHED])
def test_tune_patched_model(base, name, match, call):
    m = hs.patch(copy.deepcopy(base), PLAN)
    snap = _snap(m)
    with pytest.raises(ValueError, match=match):
        call(m)
    _assert_untouched(m, snap)


# ================================================================== aer and headsparse.recipes.stats
GOOD_AER = dict(t_select=1.0, t_train=1.0, t_full=2.0, q=0.5, q_full=0.6, q_base=0.4)
AER = [
    ("t_select", -1.0), ("t_select", True), ("t_train", math.nan), ("t_full", 0.0), ("t_full", math.inf),
    ("q", -0.1), ("q", None), ("q_full", math.inf), ("q_base", "0.4"),
]


@pytest.mark.parametrize("arg,value", AER, ids=[f"{a}={v!r}" for a, v in AER])
def test_aer(arg, value):
    with pytest.raises(ValueError, match=rf"\b{arg} must"):
        hs.aer(**{**GOOD_AER, arg: value})


STATS = [
    ("bootstrap_ci empty", "values", lambda: stats.bootstrap_ci([])),
    ("bootstrap_ci 2-D", "values", lambda: stats.bootstrap_ci([[1, 0], [0, 1]])),
    ("bootstrap_ci NaN", "values", lambda: stats.bootstrap_ci([1, math.nan])),
    ("bootstrap_ci n_boot 0", "n_boot", lambda: stats.bootstrap_ci([1, 0], n_boot=0)),
    ("bootstrap_ci confidence 95", "confidence", lambda: stats.bootstrap_ci([1, 0], confidence=95)),
    ("bootstrap_ci confidence 1.0", "confidence", lambda: stats.bootstrap_ci([1, 0], confidence=1.0)),
    pytest.param("bootstrap_ci strings", "values", lambda: stats.bootstrap_ci(["a", "b"]), id="bootstrap_ci strings"),
    pytest.param("bootstrap_ci seed -1", "seed", lambda: stats.bootstrap_ci([1, 0], seed=-1), id="bootstrap_ci seed -1"),
    ("paired lengths differ", "a and b", lambda: stats.paired_bootstrap_ci([1, 0], [1, 0, 1])),
    ("paired b empty", r"\bb must", lambda: stats.paired_bootstrap_ci([1, 0], [])),
    ("paired a inf", r"\ba holds", lambda: stats.paired_bootstrap_ci([1, math.inf], [1, 0])),
    ("mcnemar value 2", "a_correct", lambda: stats.mcnemar_p([1, 2], [1, 0])),
    ("mcnemar value 0.5", "b_correct", lambda: stats.mcnemar_p([True, False], [0.5, 1])),
    ("mcnemar lengths differ", "a_correct and b_correct", lambda: stats.mcnemar_p([True], [True, False])),
    ("mcnemar empty", "a_correct and b_correct", lambda: stats.mcnemar_p([], [])),
    ("gain_recovered q NaN", r"\bq must", lambda: stats.gain_recovered(math.nan, 0, 1)),
    ("gain_recovered q_base string", "q_base", lambda: stats.gain_recovered(0.5, "0", 1)),
    ("gain_recovered q_full inf", "q_full", lambda: stats.gain_recovered(0.5, 0, math.inf)),
]


@pytest.mark.parametrize("name,match,call", STATS, ids=[c[0] if isinstance(c, tuple) else c.id for c in STATS])
def test_stats(name, match, call):
    with pytest.raises(ValueError, match=match):
        call()


# ================================================================== records.read_jsonl
READ_JSONL = [
    ("text record in a choice file", '{"text": "hello"}\n', ("choice",)),
    ("record a list", "[1, 2]\n", None),
    ("empty text", '{"text": ""}\n', None),
    ("task an int", '{"text": "a", "task": 5}\n', None),
    ("duplicate choices", '{"prompt": "q", "choices": ["a", "a"], "answer": 0}\n', None),
    ("answer a bool", '{"prompt": "q", "choices": ["a", "b"], "answer": true}\n', None),
    ("one choice", '{"prompt": "q", "choices": ["a"], "answer": 0}\n', None),
    pytest.param("not UTF-8", b"\xff\xfe\x00garbage\n", None,
                 id="not UTF-8"),
]


@pytest.mark.parametrize("name,content,shapes", READ_JSONL,
                         ids=[c[0] if isinstance(c, tuple) else c.id for c in READ_JSONL])
def test_read_jsonl(tmp_path, name, content, shapes):
    path = tmp_path / "data.jsonl"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    kw = {"shapes": shapes} if shapes else {}
    with pytest.raises(ValueError, match=r"--pool .*data\.jsonl:1"):
        read_jsonl(str(path), name="--pool", **kw)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--pool .*nope\.jsonl"):
        read_jsonl(str(tmp_path / "nope.jsonl"), name="--pool")


def test_read_jsonl_missing_file_names_it(tmp_path):
    """Whatever the type, the message names the argument and the file."""
    with pytest.raises((ValueError, FileNotFoundError), match=r"--pool .*nope\.jsonl: no such file"):
        read_jsonl(str(tmp_path / "nope.jsonl"), name="--pool")


# ================================================================== CLI verbs (subprocesses)
MC = '{"prompt": "Q: x?\\nA:", "choices": [" a", " b"], "answer": 0}'


def _minilm():
    try:
        from _hs_models import minilm_dir

        path = minilm_dir()
        return str(path) if path.is_dir() else None
    except Exception:
        return None


# id -> (argv builder (tmp folder -> argv), regex the last stderr line must match)
CLI = {
    "run --fraction 0": (lambda d: ["run", "--model", "tiny", "--fraction", "0"], "fraction"),
    "run --fraction 1.5": (lambda d: ["run", "--model", "tiny", "--fraction", "1.5"], "fraction"),
    "run --fraction abc": (lambda d: ["run", "--model", "tiny", "--fraction", "abc"], "--fraction"),
    "run --methods bogus": (lambda d: ["run", "--model", "tiny", "--methods", "bogus"], "methods"),
    "run --methods empty": (lambda d: ["run", "--model", "tiny", "--methods", ","], "methods"),
    "run --epochs 0": (lambda d: ["run", "--model", "tiny", "--epochs", "0"], "epochs"),
    "run --head-scorer bogus": (lambda d: ["run", "--model", "tiny", "--head-scorer", "bogus"], "head.scorer"),
    "run --model missing folder": (lambda d: ["run", "--model", os.path.join(d, "no-model")], "--model .*no-model"),
    "run --pool missing file": (lambda d: ["run", "--model", "tiny", "--pool", os.path.join(d, "missing.jsonl"),
                                           "--target", d + "/ok.jsonl", "--eval", d + "/ok.jsonl"],
                                "--pool .*missing.jsonl"),
    "run --eval not UTF-8": (lambda d: ["run", "--model", "tiny", "--pool", d + "/ok.jsonl", "--target",
                                        d + "/ok.jsonl", "--eval", d + "/binary.jsonl"], "--eval .*binary.jsonl"),
    "score --fraction 2": (lambda d: ["score", "--model", d, "--data", d + "/texts.txt", "--out", d + "/out/p.json",
                                      "--fraction", "2"], "--fraction"),
    "score --data missing": (lambda d: ["score", "--model", d, "--data", d + "/missing.txt", "--out",
                                        d + "/out/p.json"], "--data"),
    "score --model missing folder": (lambda d: ["score", "--model", d + "/no-model", "--data", d + "/texts.txt",
                                                "--out", d + "/out/p.json"], "--model"),
    "score --option without =": (lambda d: ["score", "--model", d, "--data", d + "/texts.txt", "--out",
                                            d + "/out/p.json", "--option", "damping"], "--option"),
    "score --method bogus": (lambda d: ["score", "--model", d, "--data", d + "/texts.txt", "--out",
                                        d + "/out/p.json", "--method", "bogus"], "--method"),
    "score --batch-size 0": (lambda d: ["score", "--model", "MINILM", "--data", d + "/texts.txt", "--out",
                                        d + "/out/p.json", "--batch-size", "0", "--no-progress"], "--batch-size"),
    "demo --backend flash": (lambda d: ["demo", "--backend", "flash", "--batch", "1", "--heads", "2", "--kv-heads", "1",
                                        "--seq", "8", "--head-dim", "8"], "backend"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run every CLI case once (three at a time: each subprocess spends ~5 s importing torch/transformers)."""
    minilm = _minilm()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT,
           "OMP_NUM_THREADS": "1"}

    def one(case):
        d = str(tmp_path_factory.mktemp("cli"))
        with open(os.path.join(d, "ok.jsonl"), "w") as f:
            f.write(MC + "\n")
        with open(os.path.join(d, "binary.jsonl"), "wb") as f:
            f.write(b"\xff\xfe\x00 not utf-8\n")
        with open(os.path.join(d, "texts.txt"), "w") as f:
            f.write("The capital of Italy is Rome.\nA cat sat on the mat.\n")
        argv = CLI[case][0](d)
        if "MINILM" in argv:
            if minilm is None:
                return d, None
            argv[argv.index("MINILM")] = minilm
        if argv[0] == "run":
            argv += ["--out", os.path.join(d, "out"), "--stem", "s", "--no-progress"]
        before = set(_files(d))
        p = subprocess.run([sys.executable, "-m", "headsparse.recipes.cli", *argv], cwd=d, env=env, capture_output=True,
                           text=True, timeout=300)
        return d, (p, before)

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as ex:
        return dict(zip(CLI, ex.map(one, CLI)))


def _cli(cli_results, case):
    d, res = cli_results[case]
    if res is None:
        pytest.skip("MiniLM model package not installed")
    return d, res[0], res[1]


@pytest.mark.parametrize("case", list(CLI))
def test_cli_fails_and_writes_nothing(cli_results, case):
    d, p, before = _cli(cli_results, case)
    assert p.returncode != 0, p.stdout[-2000:]
    assert set(_files(d)) == before, f"files written: {sorted(set(_files(d)) - before)}"
    assert not os.path.exists(os.path.join(d, "out"))


@pytest.mark.parametrize("case", list(CLI))
def test_cli_message_is_one_clean_line_naming_the_argument(cli_results, case):
    d, p, _ = _cli(cli_results, case)
    err = p.stderr.strip()
    assert "Traceback (most recent call last)" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip() and "Warning" not in ln]
    assert lines, "nothing on stderr"
    assert re.search(CLI[case][1], lines[-1]), lines[-1]
    # one message line (argparse errors come after its usage lines, which start with "usage:" or blanks)
    msg = [ln for ln in lines if not ln.startswith(("usage:", " "))]
    assert len(msg) == 1, msg
