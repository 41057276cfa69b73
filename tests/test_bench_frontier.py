"""The frontier benchmark end to end in smoke mode (--model tiny): every part, resumable, and its report."""
import importlib.util
import json
import pathlib
import sys

import pytest

pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "benchmarks" / "bench_frontier.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_frontier"] = mod  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_points_table():
    mod = _load()
    ten = mod.points_of("heads-10", "gradient", 3)
    assert [p.chooser for p in ten] == list(mod.CHOOSERS) + ["gradient"] and ten[-1].grad == "sparse"
    assert all(p.fraction == 0.1 and p.family == "heads" for p in ten)
    half = mod.points_of("heads-50", "apt", 3)
    assert half[-1].chooser == "apt" and half[-1].layers == "top-half"
    assert [p.rank for p in mod.points_of("lora", "gradient", 3)] == [4, 16, 64]
    assert {p.data for p in mod.points_of("pool", "hifi", 3)} == {"pool"}
    assert mod.points_of("full", "gradient", 3)[0].seeds == 1
    with pytest.raises(ValueError, match="unknown part"):
        mod.points_of("heads-7", "gradient", 3)


def test_pareto_and_time_to():
    mod = _load()
    rows = [{"name": "a", "s": 1.0, "q": 0.5}, {"name": "b", "s": 2.0, "q": 0.4}, {"name": "c", "s": 3.0, "q": 0.9},
            {"name": "d", "s": 0.5, "q": 0.1}]
    assert mod.pareto(rows, "s") == ["d", "a", "c"]
    curve = [{"train_s": 1.0, "dev_q": 0.5}, {"train_s": 2.0, "dev_q": 0.79}, {"train_s": 3.0, "dev_q": 0.8}]
    assert mod.time_to(curve) == 2.0 and mod.time_to([]) is None


def test_random_spread_plan_spreads_heads():
    mod = _load()
    from headsparse.recipes.tasks import tiny_llama

    model = tiny_llama(layers=4, heads=4, kv_heads=2)
    p = mod.Point("r", "heads", chooser="random-spread", fraction=0.5)
    for seed in range(3):
        plan = mod.head_plan(model, {}, p, seed)
        per_layer = [len(plan.heads(layer, "train")) for layer in range(4)]
        assert per_layer == [2, 2, 2, 2]
    top = mod.head_plan(model, {"scores": {"gradient": [[4.0] * 4, [3.0] * 4, [2.0] * 4, [1.0] * 4]}},
                        mod.Point("t", "heads", chooser="gradient", fraction=0.25, layers="top-half"), 0)
    assert top.lowest_trainable_layer == 2 and top.count("train") == 4


def test_smoke_every_part_and_report(tmp_path):
    mod = _load()
    assert mod.main(["--model", "tiny", "--part", "all", "--out", str(tmp_path), "--threads", "1",
                     "--seeds", "2"]) == 0
    s = json.loads((tmp_path / "frontier-tiny.json").read_text())
    names = {r["name"] for r in s["rows"]}
    assert {"gradient 10%", "random-spread 5%", "all heads 100%", "LoRA r64", "full FT", "full FT, whole pool",
            "gradient 10% (sparse mode)"} <= names
    assert sum(1 for n in names if n.endswith("top half")) == 4  # the best scorer at 5, 10, 25 and 50%
    for r in s["rows"]:
        assert 0 <= r["q_ci"]["low"] <= r["q"] <= r["q_ci"]["high"] <= 1
        assert r["s_per_step"] > 0 and r["trainable_params"] > 0 and r["seeds_run"] == (1 if r["family"] == "full"
                                                                                       else 2)
    heads10 = [r for r in s["rows"] if r["family"] == "heads" and r["fraction"] == 0.1 and r["data"] == "mined"]
    assert len({r["query_heads"] for r in heads10}) == 1  # every chooser trains as many heads
    assert s["pareto_step"] and all(n in names for n in s["pareto_step"])
    assert {c["scorer"] for c in s["vs_random"]} == {"gradient", "apt", "hifi", "alps"}
    rec = s["peft_records"][0]
    assert {"run_info", "train_info"} <= set(rec) and "num_trainable_params" in rec["train_info"]
    md = (tmp_path / "frontier-tiny.md").read_text()
    assert "Pareto front" in md and "Scorers against random heads" in md and "Partial" not in md
    # resumable: a second run finds every part done and only rewrites the report
    before = (tmp_path / "frontier-tiny-lora.json").stat().st_mtime_ns
    assert mod.main(["--model", "tiny", "--part", "all", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert (tmp_path / "frontier-tiny-lora.json").stat().st_mtime_ns == before
    # a report over the parts run so far says which are missing
    (tmp_path / "frontier-tiny-pool.json").unlink()
    assert mod.main(["--model", "tiny", "--part", "report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "frontier-tiny.md").read_text()
    assert "Partial: parts not run yet: pool" in md
    assert not any(r["data"] == "pool" for r in json.loads((tmp_path / "frontier-tiny.json").read_text())["rows"])
