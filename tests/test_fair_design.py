"""The fair test: every arm end to end on the tiny model, arms as data, and the fixed verdict rules against
hand-made reports (a winning, a losing and an inconclusive one)."""
import json
import random

import pytest

from headsparse.recipes.cli import main
from headsparse.recipes.experiment import FAIR_ARMS, ArmSpec, FairConfig, run_arms
from headsparse.recipes.run_cli import design_of
from headsparse.recipes.verdict import (FULL, FULL_MINED, LORA_MINED, LORA_POOL, P2D, RANDOM_DATA, RANDOM_HEADS,
                                        verdict, why)

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fair")
    assert main(["run", "--model", "tiny", "--design", "fair", "--search", "--no-progress", "--threads", "1",
                 "--out", str(out), "--stem", "f"]) == 0
    return out, json.loads((out / "f.json").read_text())


def test_every_arm_end_to_end_tiny(tiny_report):
    out, rep = tiny_report
    assert {r["arm"] for r in rep["rows"]} == {a.name for a in FAIR_ARMS}
    by = {(r["arm"], r["seed"]): r for r in rep["rows"]}
    n_eval = rep["task"]["eval"]
    for r in rep["rows"]:
        assert len(r["correct"]) == n_eval and 0 <= r["q_ci"]["low"] <= r["q"] <= r["q_ci"]["high"] <= 1
    full = by[(FULL, 0)]["trained"]["trainable_params"]
    lora = by[(LORA_MINED, 0)]["trained"]["trainable_params"]
    heads = by[(P2D, 0)]["trained"]["trainable_params"]
    assert 0 < heads < full and 0 < lora < full
    for arm in (P2D, RANDOM_HEADS, RANDOM_DATA):  # three seeds for the arms the verdict compares per seed
        assert sorted(r["seed"] for r in rep["rows"] if r["arm"] == arm) == [0, 1, 2]
    assert by[(P2D, 0)]["indices"] == by[(RANDOM_HEADS, 0)]["indices"] == by[(LORA_MINED, 0)]["indices"]
    assert by[(P2D, 0)]["indices"] != by[(RANDOM_DATA, 0)]["indices"]
    assert len(by[(P2D, 0)]["indices"]) == rep["task"]["pool"] // 10
    # every trained arm's epochs and lr were chosen on dev by this run's search, with its cost
    for a in FAIR_ARMS[1:]:
        s = rep["settings"][a.name]
        assert s["source"] == "this run" and len(s["tried"]) == 2 and s["search_s"] >= 0
        assert by[(a.name, 0)]["epochs"] == s["epochs"] and by[(a.name, 0)]["lr"] == s["lr"]
    assert rep["composition"]["recall_ceiling"] >= 0.9 and rep["composition"]["target_share"] <= 0.15
    md = (out / "f.md").read_text()
    assert "## Pool composition" in md and "## Verdict" in md and "load average" in md
    assert (out / "f.png").exists()
    assert rep["verdict"]["claim"] in ("holds", "fails", "inconclusive")


def test_settings_from_a_search_report(tiny_report, tmp_path):
    out, rep = tiny_report
    assert main(["run", "--model", "tiny", "--design", "fair", "--settings-from", str(out / "f.json"),
                 "--no-progress", "--threads", "1", "--out", str(tmp_path), "--stem", "g", "--seeds", "1"]) == 0
    again = json.loads((tmp_path / "g.json").read_text())
    for name, s in again["settings"].items():
        assert (s["epochs"], s["lr"]) == (rep["settings"][name]["epochs"], rep["settings"][name]["lr"])
        assert str(out / "f.json") in s["source"] or "f.json" in s["source"]
    # dev is read only to choose: with settings given no arm is evaluated on it again; the search did each time
    assert all("q_dev" not in r for r in again["rows"]) and all("q_dev" in r for r in rep["rows"])
    assert "dev Q per candidate" in (tmp_path / "g.md").read_text()
    with pytest.raises(SystemExit, match="cannot be combined"):
        main(["run", "--model", "tiny", "--design", "fair", "--search", "--settings-from", "x.json"])
    with pytest.raises(SystemExit, match="belong to --design pipeline"):
        main(["run", "--model", "tiny", "--design", "fair", "--epochs", "3"])


def test_arms_are_a_table():
    from headsparse.recipes.tasks import synthetic_task, tiny_llama

    arms = (ArmSpec("base", "none", "none", seeds="one"), ArmSpec(FULL, "pool", "full", seeds="one"),
            ArmSpec("all-new row: random heads, random 10%", "random", "heads", "random", seeds="one"),
            ArmSpec("another scorer (hifi) on P2D's data", "mined", "heads", "scored", seeds="one", scorer="hifi"))
    settings = {FULL: {"epochs": 1, "lr": 1e-3}, arms[2].name: {"epochs": 1, "lr": 3e-3},
                arms[3].name: {"epochs": 1, "lr": 3e-3}}
    rep = run_arms(tiny_llama(), synthetic_task(n_pool=40, n_targets=4, n_eval=10),
                   FairConfig(arms=arms, settings=settings, n_boot=50), quiet=True)
    assert [r["arm"] for r in rep["rows"]] == [a.name for a in arms]
    hifi = rep["rows"][3]
    assert hifi["t_score"] > 0 and hifi["trained"]["query_heads"] > 0  # its own scoring counted as selection
    assert rep["verdict"]["claim"] == "not measured"
    with pytest.raises(ValueError, match="no epochs/lr"):
        FairConfig(arms=arms, settings={}).check()
    with pytest.raises(ValueError, match="first arm that trains"):
        FairConfig(arms=(arms[0], arms[2], arms[1]), settings=settings).check()
    with pytest.raises(ValueError, match="heads"):
        ArmSpec("x", "mined", "heads").check()
    with pytest.raises(ValueError, match="scorer must be one of"):
        FairConfig(arms=arms[:2] + (ArmSpec("y", "mined", "heads", "scored", scorer="nope"),),
                   settings={FULL: {"epochs": 1, "lr": 1e-3}, "y": {"epochs": 1, "lr": 1e-3}}).check()


def test_default_design():
    class A:
        design = None
        model = "smollm2"
        methods = None
    assert design_of(A, {}) == "fair"
    A.methods = "p2d"
    assert design_of(A, {}) == "pipeline"
    A.methods, A.model = None, "tiny"
    assert design_of(A, {}) == "pipeline"
    assert design_of(A, {"pool": []}) == "pipeline"


# ------------------------------------------------------------------ verdict rules on hand-made reports
N = 400


def _correct(acc, seed):
    g = random.Random(seed)
    k = round(acc * N)
    c = [1] * k + [0] * (N - k)
    g.shuffle(c)
    return c


def _flip(c, n_down, n_up, seed):
    """c with n_down correct items made wrong and n_up wrong ones made right (a paired difference)."""
    c = list(c)
    g = random.Random(seed)
    ones = [i for i, v in enumerate(c) if v]
    zeros = [i for i, v in enumerate(c) if not v]
    for i in g.sample(ones, n_down):
        c[i] = 0
    for i in g.sample(zeros, n_up):
        c[i] = 1
    return c


def _report(p2d_vs_full, p2d_vs_random, cost_p2d, cost_lora, t_full=100.0):
    """P2D differs from full FT by p2d_vs_full items (net), and beats the random arms by p2d_vs_random items."""
    full = _correct(0.8, 0)
    rows = [{"arm": FULL, "seed": 0, "correct": full, "t_select": 0.0, "t_train": t_full}]
    for s in range(3):
        up, down = max(0, p2d_vs_full), max(0, -p2d_vs_full)
        p2d = _flip(full, down, up, s + 1)
        rows.append({"arm": P2D, "seed": s, "correct": p2d, "t_select": cost_p2d / 2, "t_train": cost_p2d / 2})
        worse = _flip(p2d, max(0, p2d_vs_random), max(0, -p2d_vs_random), s + 10)
        rows += [{"arm": a, "seed": s, "correct": worse, "t_select": 1.0, "t_train": 5.0}
                 for a in (RANDOM_DATA, RANDOM_HEADS)]
        rows.append({"arm": LORA_MINED, "seed": s, "correct": _flip(p2d, 2, 0, s + 20), "t_select": cost_lora / 2,
                     "t_train": cost_lora / 2})
    return {"rows": rows, "settings": {FULL: {"search_s": 50.0}, P2D: {"search_s": 10.0}}}


def test_verdict_winning():
    v = verdict(_report(p2d_vs_full=0, p2d_vs_random=60, cost_p2d=20.0, cost_lora=30.0), n_boot=500)
    assert v["rules"]["R1"]["result"] == "holds"
    assert v["rules"]["R2"]["result"] == v["rules"]["R3"]["result"] == v["rules"]["R4"]["result"] == "holds"
    assert v["rules"]["R5"]["result"] == "holds" and v["claim"] == "holds"
    assert "the claim HOLDS" in v["text"]


def test_verdict_losing():
    v = verdict(_report(p2d_vs_full=-80, p2d_vs_random=-60, cost_p2d=20.0, cost_lora=10.0), n_boot=500)
    assert v["rules"]["R1"]["result"] == "fails" and v["claim"] == "fails"
    assert v["rules"]["R2"]["result"] == "fails" and v["rules"]["R3"]["result"] == "fails"
    assert v["rules"]["R4"]["result"] == "fails"  # dearer than LoRA on the mined data and never better
    assert "the claim FAILS" in v["text"]
    # not cheaper than full fine-tuning: R5 fails and the claim with it, even at equal quality
    v = verdict(_report(p2d_vs_full=0, p2d_vs_random=0, cost_p2d=200.0, cost_lora=300.0), n_boot=500)
    assert v["rules"]["R1"]["result"] == "holds" and v["rules"]["R5"]["result"] == "fails" and v["claim"] == "fails"


def test_verdict_inconclusive():
    # P2D 3 points below full fine-tuning on 400 items: the CI straddles the -0.02 margin
    v = verdict(_report(p2d_vs_full=-12, p2d_vs_random=0, cost_p2d=20.0, cost_lora=30.0), n_boot=500)
    r1 = v["rules"]["R1"]
    assert all(c["low"] < -0.02 < c["high"] for c in r1["per_seed"])
    assert r1["result"] == "inconclusive" and v["claim"] == "inconclusive"
    assert v["rules"]["R2"]["result"] == "inconclusive"
    assert "INCONCLUSIVE" in v["text"]


def test_why_reads_the_grid():
    """The diagnostics say where P2D's gap comes from: here the mined data hold the task (full FT on it matches full
    FT on the pool) and training only the heads loses 15 points on the same data."""
    rep = _report(p2d_vs_full=-60, p2d_vs_random=0, cost_p2d=20.0, cost_lora=30.0)
    full = next(r for r in rep["rows"] if r["arm"] == FULL)
    rep["rows"].append({**full, "arm": FULL_MINED, "correct": _flip(full["correct"], 1, 1, 99)})
    rep["rows"].append({**full, "arm": LORA_POOL})
    for r in rep["rows"]:
        if r["arm"] == P2D:
            r["mining_recall"] = 0.9
    rep["composition"] = {"recall_ceiling": 1.0}
    w = why(rep, n_boot=500)
    by = {p["a"] + " | " + p["b"]: p for p in w["pairs"]}
    assert [c["outcome"] for c in by[f"{FULL_MINED} | {FULL}"]["per_seed"]] == ["no difference shown"]
    assert [c["outcome"] for c in by[f"{P2D} | {FULL_MINED}"]["per_seed"]] == ["worse"] * 3
    assert all(-0.2 < c["estimate"] < -0.1 for c in by[f"{P2D} | {FULL_MINED}"]["per_seed"])
    assert w["p2d_mining_recall"] == pytest.approx(0.9)
    assert "P2D: scored heads, mined 10% worse in every seed" in w["text"] and "ceiling at this fraction 1.00" in w["text"]
    assert verdict(rep, n_boot=500)["why"]["pairs"][0]["per_seed"] == w["pairs"][0]["per_seed"]
    # arms that did not run are left out, never read as "no difference"
    rep["rows"] = [r for r in rep["rows"] if r["arm"] != LORA_POOL]
    assert all(p["b"] != LORA_POOL for p in why(rep, n_boot=200)["pairs"])


def test_larger_run_script_smoke(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fair.py"
    spec = importlib.util.spec_from_file_location("bench_fair", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "tiny", "--pool-size", "60", "--eval-size", "10", "--threads", "1",
                     "--out", str(tmp_path), "--seeds", "1"]) == 0
    rep = json.loads((tmp_path / "fair-tiny-60.json").read_text())
    assert rep["task"]["pool"] == 60 and rep["task"]["eval"] == 10


def test_main_job_settings_source(tmp_path, monkeypatch):
    """The main job takes the committed search when there is one, else the carried-over settings (named as such)."""
    import argparse

    from headsparse.recipes import run_cli

    p = argparse.ArgumentParser()
    run_cli.add_run_arguments(p)
    args = p.parse_args([])
    monkeypatch.setattr(run_cli, "FAIR_SEARCH_JSON", str(tmp_path / "missing.json"))
    st, search = run_cli.fair_settings(args, tiny=False)
    assert not search and set(st) == set(run_cli.FAIR_PRIOR_SETTINGS)
    assert all("not searched on this pool" in v["source"] for v in st.values())
    rep = {"settings": {k: {**v, "search_s": 1.0, "source": "this run"} for k, v in st.items()},
           "environment": {"commit": "abcdef0123", "date_utc": "today"}}
    (tmp_path / "s.json").write_text(json.dumps(rep))
    monkeypatch.setattr(run_cli, "FAIR_SEARCH_JSON", str(tmp_path / "s.json"))
    st, _ = run_cli.fair_settings(args, tiny=False)
    assert all("abcdef0" in v["source"] and v["search_s"] == 1.0 for v in st.values())
