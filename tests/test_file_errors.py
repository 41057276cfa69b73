"""load_delta / read_delta_plan / HeadPlan.load on bad files: FileNotFoundError or ValueError naming the file,
and the model left bit-identical."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import headsparse as hs
from headsparse.patch import read_delta_plan
from headsparse import HeadPlan
from _hs_models import tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    ref = tiny_model("llama", layers=2)
    plan = HeadPlan([["t", "f", "p", "f"], ["f", "t", "f", "p"]], num_kv_heads=2, model_family="llama")
    hs.save_delta(hs.patch(copy.deepcopy(ref), plan), d / "good.safetensors")
    plan.save(d / "plan.json")
    good = (d / "good.safetensors").read_bytes()
    out = {"good": d / "good.safetensors", "plan": d / "plan.json", "missing": d / "missing.safetensors"}
    for name, data in (("empty", b""), ("truncated", good[: len(good) // 2]), ("header_only", good[:8]),
                       ("random", os.urandom(4096)), ("json_list", b"[1, 2, 3]"),
                       ("json_wrong", b'{"format": "headsparse.HeadPlan", "version": 1, "modes": 5}')):
        (d / name).write_bytes(data)
        out[name] = d / name
    return ref, out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not hs.patch.core.is_patched(model)


@pytest.mark.parametrize("name", ["empty", "truncated", "header_only", "random", "json_list", "plan"])
def test_load_delta_bad_file(files, name):
    ref, f = files
    model = copy.deepcopy(ref)
    before = _state(model)
    with pytest.raises(ValueError, match=os.path.basename(f[name])) as exc:
        hs.load_delta(model, f[name])
    assert "delta" in str(exc.value)
    _assert_untouched(model, before)
    with pytest.raises(ValueError, match=os.path.basename(f[name])):
        read_delta_plan(f[name])


def test_load_delta_missing_file(files):
    ref, f = files
    model = copy.deepcopy(ref)
    before = _state(model)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        hs.load_delta(model, f["missing"])
    _assert_untouched(model, before)


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "json_list", "json_wrong", "good"])
def test_plan_load_bad_file(files, name):
    _, f = files
    with pytest.raises(ValueError, match=os.path.basename(f[name])):
        HeadPlan.load(f[name])
    with pytest.raises(FileNotFoundError, match="missing"):
        HeadPlan.load(f["missing"])


def test_good_files_still_load(files):
    ref, f = files
    assert HeadPlan.load(f["plan"]) == read_delta_plan(f["good"])
    model = hs.load_delta(copy.deepcopy(ref), f["good"])
    assert hs.patch.core.is_patched(model)


def _llama(hidden, layers=2, seed=1):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("modes", [[["t", "f", "p", "f"], ["f", "t", "f", "p"]],   # pruning: weights restored
                                   [["t", "f", "f", "f"], ["f", "t", "f", "f"]]])  # no pruning: unpatch is exact
def test_load_delta_of_another_model_leaves_the_model_untouched(tmp_path, modes):
    plan = HeadPlan(modes, num_kv_heads=2, model_family="llama")
    hs.save_delta(hs.patch(_llama(64), plan), tmp_path / "d.safetensors")
    for other, match in ((_llama(32), "shape"), (_llama(64, layers=3), "another model")):
        before = _state(other)
        with pytest.raises(ValueError, match=match) as exc:
            hs.load_delta(other, tmp_path / "d.safetensors")
        assert "d.safetensors" in str(exc.value)
        _assert_untouched(other, before)
    same = _llama(64, seed=2)
    hs.load_delta(same, tmp_path / "d.safetensors")  # the right model still loads it
    assert hs.patch.core.is_patched(same)
