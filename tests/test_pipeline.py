"""AER arithmetic, the pipeline's report, and ``headsparse run`` end to end on a tiny model."""
import json
import math
import os

import pytest
import torch

from headsparse.recipes.cli import main
from headsparse.recipes.pipeline import RunConfig, evaluate, markdown, run_pipeline, table, write_report
from headsparse.recipes.tasks import synthetic_task, tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_evaluate_single_token_choices_against_direct_logits():
    model = tiny_llama(seed=0)
    items = [{"prompt_ids": [11, 12, 13], "choice_ids": [[5], [6]], "answer": a} for a in (0, 1)]
    # the same prompt with both answers: exactly one is right
    assert evaluate(model, items).accuracy == 0.5
    with torch.no_grad():
        row = model(input_ids=torch.tensor([[11, 12, 13]])).logits[0, -1].double()
    want = 1 if row[6] > row[5] else 0
    assert evaluate(model, items[want:want + 1]).correct == [True]
    assert evaluate(model, items[1 - want:2 - want]).correct == [False]
    res = evaluate(model, items)
    lp = torch.log_softmax(row, -1)
    assert res.nll == pytest.approx([-lp[5].item(), -lp[6].item()], rel=1e-5)


def test_evaluate_multi_token_choices_sum_log_likelihood():
    """Choices of different lengths, a prompt padded in a batch with shorter ones: sums of token log-probs."""
    model = tiny_llama(seed=1)
    prompt, choices = [21, 22, 23, 24], [[7, 8], [9], [10, 11, 12]]
    with torch.no_grad():
        want = []
        for c in choices:
            lp = torch.log_softmax(model(input_ids=torch.tensor([prompt + c])).logits[0].double(), -1)
            want.append(sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(c)))
    best = max(range(3), key=lambda i: want[i])
    items = [{"prompt_ids": prompt, "choice_ids": choices, "answer": a} for a in range(3)]
    items.append({"prompt_ids": [30], "choice_ids": [[5], [6]], "answer": 0})  # single-token path in the same call
    res = evaluate(model, items, batch_size=2)
    assert res.correct[:3] == [a == best for a in range(3)]
    assert res.nll[:3] == pytest.approx([-w for w in want], rel=1e-4)


@pytest.mark.parametrize("bad, match", [
    ({"prompt_ids": [1], "choice_ids": [[5]], "answer": 0}, "eval item 0"),
    ({"prompt_ids": [1], "choice_ids": [[5], [6]], "answer": 2}, "eval item 0"),
    ({"prompt_ids": [], "choice_ids": [[5], [6]], "answer": 0}, "eval item 0"),
    ({"input_ids": [1], "choices": [5, 6], "answer": 0}, "eval item 0"),
])
def test_evaluate_rejects_bad_items(bad, match):
    with pytest.raises(ValueError, match=match):
        evaluate(tiny_llama(), [bad])


def test_run_pipeline_report_and_files(tmp_path):
    task = synthetic_task(n_pool=48, n_targets=6, n_target_set=6, n_eval=12, n_dev=6, seed=0)
    cfg = RunConfig(methods=("p2d", "random", "all"), epochs=1, batch_size=8, lr_full=1e-3, lr_heads=3e-3,
                    head_fraction=0.25, progress=False, n_boot=200)
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = run_pipeline(model, task, cfg, quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched
    rows = {r["method"]: r for r in rep["rows"]}
    assert list(rows) == ["base (untuned)", "full", "p2d", "random", "all"]
    base, full = rows["base (untuned)"], rows["full"]
    assert rep["base_quality"] == base["q"]
    for r in rep["rows"]:
        assert r["t_full"] == full["t_train"] and r["q_full"] == full["q"] and r["q_base"] == base["q"]
        assert r["cost_ratio"] == pytest.approx((r["t_select"] + r["t_train"]) / full["t_train"])
        assert r["q_ci"]["low"] <= r["q"] <= r["q_ci"]["high"] and r["n_eval"] == 12 and len(r["correct"]) == 12
        assert r["q"] == pytest.approx(sum(r["correct"]) / 12)
        assert r["vs_base"]["estimate"] == pytest.approx(r["q"] - base["q"])
        assert 0 <= r["vs_base_mcnemar_p"] <= 1 and 0 <= r["q_dev"] <= 1 and r["answer_nll"] > 0
        if r is not full and r is not base:
            assert r["vs_full"]["estimate"] == pytest.approx(r["q"] - full["q"])
        if full["q"] > base["q"]:
            g = (r["q"] - base["q"]) / (full["q"] - base["q"])
            assert r["gain_recovered"] == pytest.approx(g)
            assert r["aer"] == (math.inf if g <= 0 else pytest.approx(r["cost_ratio"] / g))
        else:
            assert math.isnan(r["aer"])
    assert base["trained"]["query_heads"] == 0 and base["t_train"] == 0
    for r in rep["rows"][1:]:  # CPU-time ratios beside the wall-time ones
        assert r["cpu_full"] > 0 and r["cpu_train"] > 0 and r["speedup_cpu"] > 0
        assert r["speedup_cpu"] == pytest.approx(r["cpu_full"] / (r["cpu_select"] + r["cpu_train"]))
    assert set(rep["load_1min_at_start_of"]) == {"full", "p2d", "random", "all"}
    assert isinstance(rep["load_changed"], bool)
    assert math.isinf(base["aer"]) or math.isnan(base["aer"])  # doing nothing never scores well
    assert rows["p2d"]["t_select"] == pytest.approx(rows["p2d"]["t_score"] + rows["p2d"]["t_mine"])
    assert rows["p2d"]["data"] == "5 of 48" and rows["all"]["data"] == "48 of 48"
    assert 0 <= rows["p2d"]["mining_precision"] <= 1
    t = rows["p2d"]["trained"]
    assert t["query_heads"] == 3 and t["total_query_heads"] == 12 and 1 <= t["kv_heads"] <= 3
    assert t["trainable_params"] < full["trained"]["trainable_params"] / 10
    assert rep["environment"]["torch"] == torch.__version__ and rep["environment"]["date_utc"]
    paths = write_report(rep, str(tmp_path), "r")
    assert json.loads(open(paths["json"]).read())["rows"][1]["method"] == "full"
    md = open(paths["md"]).read()
    assert "| p2d |" in md and "gain recovered" in md and table(rep) in md
    if "png" in paths:
        assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_run_config_rejects_bad_values():
    task = synthetic_task(n_pool=20, n_targets=2, n_target_set=2, n_eval=2)
    for cfg, match in [(RunConfig(methods=("nope",)), "methods"), (RunConfig(methods=()), "methods"),
                       (RunConfig(fraction=0), "fraction"), (RunConfig(epochs=0), "epochs"),
                       (RunConfig(lr_heads=0), "lr_heads")]:
        with pytest.raises(ValueError, match=match):
            run_pipeline(tiny_llama(), task, cfg, quiet=True)


def test_cli_run_tiny_end_to_end(tmp_path, capsys):
    rc = main(["run", "--model", "tiny", "--methods", "p2d,random", "--pool-size", "40", "--targets", "4",
               "--eval-size", "8", "--epochs", "1", "--out", str(tmp_path), "--stem", "t", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "| p2d |" in out and "| random |" in out and "speedup" in out
    rep = json.loads((tmp_path / "t.json").read_text())
    assert [r["method"] for r in rep["rows"]] == ["base (untuned)", "full", "p2d", "random"]
    assert (tmp_path / "t.md").exists()


def test_cli_run_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit):
        main(["run", "--model", str(tmp_path / "missing"), "--no-progress"])


def test_cli_run_tiny_apt_mode(tmp_path, capsys):
    rc = main(["run", "--model", "tiny", "--methods", "p2d", "--pool-size", "40", "--targets", "4",
               "--eval-size", "8", "--epochs", "2", "--tune-mode", "apt", "--apt-keep", "0.5", "--out", str(tmp_path),
               "--stem", "a", "--no-progress"])
    assert rc == 0
    rep = json.loads((tmp_path / "a.json").read_text())
    t = rep["rows"][2]["trained"]  # 12 heads: 1 trained, keep half
    assert (t["query_heads"], t["pruned_query_heads"]) == (1, 6)


def test_random_arm_runs_several_seeds():
    task = synthetic_task(n_pool=40, n_targets=8, n_target_set=4, n_eval=8, seed=0)
    cfg = RunConfig(methods=("random",), epochs=1, lr_full=1e-3, lr_heads=3e-3, head_fraction=0.25, progress=False,
                    n_boot=100, seeds=3, seed=5)
    rep = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)
    rows = [r for r in rep["rows"] if r["method"].startswith("random")]
    assert [r["method"] for r in rows] == ["random", "random (seed 6)", "random (seed 7)"]
    assert [r["seed"] for r in rows] == [5, 6, 7]
    sm = rep["seed_summary"]["random"]
    assert sm["seeds"] == [5, 6, 7] and sm["q"]["estimate"] == pytest.approx(sum(r["q"] for r in rows) / 3)
    assert sm["q"]["low"] <= sm["q"]["estimate"] <= sm["q"]["high"]
    assert "random over 3 seeds [5, 6, 7]" in markdown(rep)
    with pytest.raises(ValueError, match="seeds"):
        run_pipeline(tiny_llama(), task, RunConfig(seeds=0), quiet=True)


def test_p2d_signature_choice_and_comparison_in_the_report():
    task = synthetic_task(n_pool=40, n_targets=8, n_target_set=4, n_eval=8, seed=0)
    for sig, other in (("fwd", "gate"), ("gate", "fwd")):
        cfg = RunConfig(methods=("p2d",), epochs=1, lr_full=1e-3, lr_heads=3e-3, head_fraction=0.25, progress=False,
                        n_boot=100, p2d_signature=sig)
        rep = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)
        row = rep["rows"][-1]
        assert row["signature"] == sig and row["other_signature"]["signature"] == other
        o = row["other_signature"]
        assert 0 <= o["precision"] <= 1 and 0 <= o["overlap"] <= 1 and o["mine_s"] > 0
        assert f"mining the same pool with {other!r}" in markdown(rep)
        assert f"p2d_mine_{other}_untrained" in rep["stages_s"]
        assert row["t_mine"] == rep["stages_s"]["p2d_mine"]  # the comparison's time is not the arm's
    with pytest.raises(ValueError, match="p2d_signature"):
        run_pipeline(tiny_llama(), task, RunConfig(p2d_signature="norm"), quiet=True)
    with pytest.raises(ValueError, match="head_scorer"):
        run_pipeline(tiny_llama(), task, RunConfig(head_scorer="magic"), quiet=True)


def test_cli_rejects_bad_settings_before_loading_anything(tmp_path):
    for argv, match in ((["--head-scorer", "magic"], "head_scorer"), (["--fraction", "2"], "fraction"),
                        (["--epochs-heads", "0"], "epochs_heads")):
        with pytest.raises(SystemExit, match=match):
            main(["run", "--model", "tiny", "--out", str(tmp_path / "o"), "--no-progress"] + argv)
    assert not (tmp_path / "o").exists()


def test_cli_head_scorer_is_used(tmp_path):
    assert main(["run", "--model", "tiny", "--methods", "random", "--pool-size", "24", "--targets", "4",
                 "--eval-size", "6", "--epochs", "1", "--head-scorer", "random", "--out", str(tmp_path),
                 "--stem", "h", "--no-progress"]) == 0
    rep = json.loads((tmp_path / "h.json").read_text())
    assert rep["config"]["head_scorer"] == "random" and "method='random'" in rep["head_scorer"]


def test_load_flag_and_its_warning():
    from headsparse.recipes.pipeline import _load_changed

    assert _load_changed({"full": 2.0, "p2d": 3.2}) and not _load_changed({"full": 2.0, "p2d": 2.9, "x": None})
    assert not _load_changed({"full": None})


def test_run_pipeline_checks_token_ids_of_every_split_before_training():
    task = synthetic_task(n_pool=20, n_targets=4, n_target_set=2, n_eval=4, seed=0)
    task.eval[2] = {"prompt_ids": [11, 5000], "choice_ids": [[5], [6]], "answer": 0}
    with pytest.raises(ValueError, match=r"eval\[2\]: prompt_ids/choice_ids holds token id 5000"):
        run_pipeline(tiny_llama(), task, RunConfig(progress=False), quiet=True)


def test_signature_cache_in_the_report(tmp_path):
    task = synthetic_task(n_pool=40, n_targets=8, n_target_set=4, n_eval=8, seed=0)
    cfg = RunConfig(methods=("p2d",), epochs=1, lr_full=1e-3, lr_heads=3e-3, head_fraction=0.25, progress=False,
                    n_boot=100, p2d_compare=False, cache_dir=str(tmp_path))
    first = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)["rows"][-1]
    again = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)
    row = again["rows"][-1]
    assert (first["cache"], row["cache"]) == ("miss", "hit") and row["signature_s"] == 0.0
    assert first["t_select_amortised"] == pytest.approx(first["t_select"] - first["signature_s"])
    assert first["q"] == row["q"]  # the same selection, trained the same way
    assert "P2D signature cache: hit" in markdown(again)


# --------------------------------------------------------------- learning-rate search, seeds, same steps
def _small_task():
    return synthetic_task(n_pool=40, n_targets=8, n_target_set=4, n_eval=8, n_dev=6, seed=0)


def test_lr_search_picks_by_dev_never_eval(monkeypatch):
    """A planted disagreement: dev prefers one learning rate, eval another; the search must follow dev."""
    import headsparse.recipes.pipeline as pl

    real_tune, real_eval = pl.tune, pl.evaluate
    task = _small_task()
    dev_items = task.dev

    def tagging_tune(model, plan, data, *, lr, **kw):
        res = real_tune(model, plan, data, lr=lr, **kw)
        model._planted_lr = lr
        return res

    def planted_eval(model, items, *a, **kw):
        res = real_eval(model, items, *a, **kw)
        lr = getattr(model, "_planted_lr", None)
        good_on_dev = lr in (3e-4, 1e-3)  # dev's favourites: 3e-4 (full) and 1e-3 (heads)
        good = good_on_dev if items is dev_items else (lr is not None and not good_on_dev)
        return pl.EvalResult([good] * len(items), res.nll)

    monkeypatch.setattr(pl, "tune", tagging_tune)
    monkeypatch.setattr(pl, "evaluate", planted_eval)
    cfg = RunConfig(methods=("random",), epochs=1, head_fraction=0.25, progress=False, n_boot=50,
                    lr_grid_full=(1e-4, 3e-4), lr_grid_heads=(1e-4, 1e-3, 3e-3))
    rep = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)
    s = rep["lr_search"]
    assert s["full"]["lr"] == 3e-4 and s["random"]["lr"] == 1e-3
    assert [t["lr"] for t in s["random"]["tried"]] == [1e-4, 1e-3, 3e-3]
    assert [t["dev_q"] for t in s["random"]["tried"]] == [0.0, 1.0, 0.0]
    full, rnd = rep["rows"][1], rep["rows"][2]
    assert full["lr"] == 3e-4 and rnd["lr"] == 1e-3
    assert full["q"] == 0.0 and rnd["q"] == 0.0 and full["q_dev"] == 1.0  # eval disagreed and was not consulted
    # the search's cost: every other candidate's training, counted in the second AER (full's search in T_full)
    assert s["random"]["search_s"] >= sum(t["train_s"] for t in s["random"]["tried"] if t["lr"] != 1e-3) > 0
    assert rnd["t_search"] == s["random"]["search_s"]
    assert rnd["speedup_with_search"] == pytest.approx(
        (full["t_train"] + s["full"]["search_s"]) / (rnd["t_select"] + rnd["t_train"] + rnd["t_search"]))
    md = markdown(rep)
    assert "Learning rates were chosen per arm on the dev split" in md and "| random | this run |" in md


def test_lr_search_needs_dev_and_a_real_grid():
    task = _small_task()
    task.dev = None
    with pytest.raises(ValueError, match="needs task.dev"):
        run_pipeline(tiny_llama(), task, RunConfig(lr_grid_heads=(1e-4, 1e-3)), quiet=True)
    for bad, match in (({"lr_grid_full": (1e-4,)}, "at least 2"), ({"lr_grid_heads": (1e-4, -1.0)}, "positive"),
                       ({"lr_grid_heads": (1e-3, 1e-3)}, "repeats"), ({"warmup_ratio": 1.0}, "warmup_ratio"),
                       ({"lr_table": {"full": {"lr": 1e-4}}}, r"no learning rate for \['p2d', 'random'\]"),
                       ({"lr_table": {"full": {"lr": 1e-4}}, "lr_grid_full": (1e-4, 1e-3)}, "not both")):
        with pytest.raises(ValueError, match=match):
            RunConfig(**bad).check()


def test_lr_table_reuses_a_search_with_its_times(tmp_path):
    task = _small_task()
    base = dict(methods=("random",), epochs=1, head_fraction=0.25, progress=False, n_boot=50)
    first = run_pipeline(tiny_llama(seed=0), task, RunConfig(**base, lr_grid_full=(1e-4, 1e-3),
                                                             lr_grid_heads=(1e-3, 3e-3)), quiet=True)
    (tmp_path / "s.json").write_text(json.dumps(first))
    from headsparse.recipes.run_cli import read_lr_table

    table = read_lr_table(str(tmp_path / "s.json"))
    again = run_pipeline(tiny_llama(seed=0), task, RunConfig(**base, lr_table=table), quiet=True)
    for key in ("full", "random"):
        assert again["lr_search"][key]["lr"] == first["lr_search"][key]["lr"]
        assert again["lr_search"][key]["search_s"] == first["lr_search"][key]["search_s"]
        assert str(tmp_path / "s.json") in again["lr_search"][key]["source"]
    assert [r["q"] for r in again["rows"]] == [r["q"] for r in first["rows"]]  # the chosen arms, retrained
    assert not any(k.endswith("_lr_search") for k in again["stages_s"])  # nothing searched again
    bad = tmp_path / "no-search.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no learning-rate search"):
        read_lr_table(str(bad))


def test_seeds_change_the_plan_and_the_mined_set():
    task = synthetic_task(n_pool=60, n_targets=12, n_target_set=6, n_eval=8, seed=0)
    cfg = RunConfig(methods=("p2d", "random"), epochs=1, lr_full=1e-3, lr_heads=3e-3, head_fraction=0.25,
                    progress=False, n_boot=50, seeds=3, p2d_compare=False)
    rep = run_pipeline(tiny_llama(seed=0, heads=8), task, cfg, quiet=True)
    p2d = [r for r in rep["rows"] if r["method"].startswith("p2d")]
    assert [r["method"] for r in p2d] == ["p2d", "p2d (seed 1)", "p2d (seed 2)"]
    assert [r["target_resampled"] for r in p2d] == [False, True, True]
    plans = [rep["plan"], rep["plans_by_seed"]["1"], rep["plans_by_seed"]["2"]]
    assert len({tuple(p["modes"]) for p in plans}) > 1  # a resampled target set moves the heads
    assert len({tuple(r["mined_indices"]) for r in p2d}) > 1  # ... and P2D's mined set
    rnd = [r for r in rep["rows"] if r["method"].startswith("random")]
    assert len({tuple(r["mined_indices"]) for r in rnd}) == 3
    assert sorted(rep["seed_summary"]) == ["p2d", "random"]


def test_same_steps_arm_trains_as_many_steps_as_full():
    task = _small_task()
    cfg = RunConfig(methods=("p2d",), epochs=2, lr_full=1e-3, lr_heads=3e-3, head_fraction=0.25, progress=False,
                    n_boot=50, same_steps=True, p2d_compare=False, batch_size=4)
    rep = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)
    full, p2d, same = rep["rows"][1], rep["rows"][2], rep["rows"][3]
    assert same["method"] == "p2d (same steps as full)"
    assert p2d["epochs"] == full["epochs"] == 2 and full["steps"] == 20 and p2d["steps"] == 2  # 4 of 40 mined
    assert same["epochs"] == 20 and same["steps"] == full["steps"]
    assert same["t_mine"] == p2d["t_mine"] and same["data"] == p2d["data"]  # its selection is paid again


def test_cli_learning_rate_flags():
    import argparse

    from headsparse.recipes.run_cli import (LR_GRID_FULL, LR_GRID_HEADS, SMOLLM2_DEFAULTS, SMOLLM2_LR_TABLE,
                                    add_run_arguments, learning_rates)

    p = argparse.ArgumentParser()
    add_run_arguments(p)

    def lrs(*argv, tiny=False):
        return learning_rates(p.parse_args(list(argv)), SMOLLM2_DEFAULTS, tiny)

    default = lrs()
    assert default["lr_table"] is SMOLLM2_LR_TABLE  # the committed dev search, with its times
    cfg = RunConfig(methods=("p2d", "random"), same_steps=True, **default)
    cfg.check()  # the table covers every default arm
    assert set(cfg.arm_keys()) == set(SMOLLM2_LR_TABLE)
    assert "lr_table" not in lrs("--lr-heads", "1e-3") and lrs("--lr-heads", "1e-3")["lr_heads"] == 1e-3
    s = lrs("--lr-search")
    assert s["lr_grid_full"] == LR_GRID_FULL and s["lr_grid_heads"] == LR_GRID_HEADS and "lr_table" not in s
    assert lrs("--lr-grid-heads", "1e-3,1e-2", "--lr-full", "1e-4")["lr_grid_full"] == ()
    assert lrs("--lr-grid-heads", "1e-3,1e-2")["lr_grid_full"] == ()  # a heads grid alone searches only heads
    # the committed search is reused only on the setup it was run on
    for changed in (["--epochs", "2"], ["--fraction", "0.2"], ["--batch-size", "4"], ["--grad", "sparse"],
                    ["--pool", "p.jsonl", "--target", "t.jsonl", "--eval", "e.jsonl"], ["--seed", "1"]):
        assert "lr_table" not in lrs(*changed), changed
    with pytest.raises(ValueError, match="cannot be combined"):
        lrs("--lr-search", "--lr-from", "x.json")
    with pytest.raises(ValueError, match="comma-separated numbers"):
        lrs("--lr-grid-heads", "1e-3,fast")
    assert "lr_table" not in lrs(tiny=True)
    with pytest.raises(SystemExit, match="no learning rate for"):  # an arm the table does not cover
        main(["run", "--methods", "p2d,slap", "--no-progress", "--out", "/nonexistent/never-written"])


def test_lr_search_candidates_do_not_share_on_policy_state():
    """SLAP re-selects each epoch from a stateful selector: every candidate of the search starts from the mined
    state, so the arm the search keeps equals a fresh training at the chosen learning rate."""
    task = _small_task()
    base = dict(methods=("slap",), epochs=2, head_fraction=0.25, progress=False, n_boot=50, lr_full=1e-3)
    searched = run_pipeline(tiny_llama(seed=0), task, RunConfig(**base, lr_grid_heads=(1e-3, 3e-3)), quiet=True)
    chosen = searched["lr_search"]["slap"]["lr"]
    assert chosen == 3e-3  # the second candidate: it trained after another one had advanced a shared selector
    again = run_pipeline(tiny_llama(seed=0), task, RunConfig(**base, lr_heads=chosen), quiet=True)
    assert searched["rows"][2]["correct"] == again["rows"][2]["correct"]
    assert searched["rows"][2]["answer_nll"] == pytest.approx(again["rows"][2]["answer_nll"], rel=1e-6)


def test_head_arms_of_several_epochs_use_the_prefix_cache_by_default(monkeypatch):
    import headsparse.recipes.pipeline as pipeline

    def top_layer_scores(model, *args, **kwargs):  # heads of the top layer only: the horizon is above layer 0
        scores = torch.zeros(model.config.num_hidden_layers, model.config.num_attention_heads)
        scores[-1] = torch.arange(1.0, model.config.num_attention_heads + 1)
        return scores, "top layer (test)"

    monkeypatch.setattr(pipeline, "score_heads_for_pipeline", top_layer_scores)
    task = _small_task()
    reps = {}
    for pc in (None, False):
        cfg = RunConfig(methods=("p2d",), epochs=2, lr_full=1e-3, lr_heads=3e-3, head_fraction=0.25, progress=False,
                        n_boot=50, p2d_compare=False, batch_size=2, prefix_cache=pc)
        reps[pc] = run_pipeline(tiny_llama(seed=0), task, cfg, quiet=True)
    on, off = reps[None]["rows"][2], reps[False]["rows"][2]
    assert on["method"] == "p2d" and on["epochs"] == 2
    assert off["prefix_cache"] is False
    assert on["q"] == off["q"] and on["answer_nll"] == pytest.approx(off["answer_nll"], rel=1e-6)  # same training either way
    assert on["prefix_cache"] is True
    assert "frozen-prefix cache" in markdown(reps[None]) and "frozen-prefix cache" not in markdown(reps[False])
    with pytest.raises(ValueError, match="prefix_cache"):
        RunConfig(prefix_cache="yes").check()


def test_pipeline_arms_are_a_table():
    """The pipeline design's mined arms, in run order: every method at the first seed, the same-steps arm, then the
    further seeds; each seed of a method shares its learning-rate search, the same-steps arm has its own."""
    from headsparse.recipes.pipeline import pipeline_arms

    arms = pipeline_arms(RunConfig(methods=("p2d", "random"), seeds=3, seed=5, same_steps=True))
    assert [(a.label, a.seed, a.same_steps) for a in arms] == [
        ("p2d", 5, False), ("random", 5, False), ("p2d (same steps as full)", 5, True),
        ("p2d (seed 6)", 6, False), ("random (seed 6)", 6, False), ("p2d (seed 7)", 7, False),
        ("random (seed 7)", 7, False)]
    assert [a.search_key for a in arms] == ["p2d", "random", "p2d (same steps as full)", "p2d", "random", "p2d",
                                            "random"]
    assert [a.label for a in pipeline_arms(RunConfig(methods=("less",)))] == ["less"]
