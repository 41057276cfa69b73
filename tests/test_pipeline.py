"""AER arithmetic, the pipeline's report, and ``headsparse run`` end to end on a tiny model."""
import json
import math
import os

import pytest
import torch

from headsparse.cli import main
from headsparse.metrics import aer, end_to_end_speedup
from headsparse.pipeline import RunConfig, evaluate, run_pipeline, table, write_report
from headsparse.tasks import synthetic_task, tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_aer_arithmetic():
    p = aer(t_select=10.0, t_train=20.0, t_full=300.0, q=0.8, q_full=0.9)
    assert p.cost_ratio == pytest.approx(0.1)
    assert p.quality_ratio == pytest.approx(0.8 / 0.9)
    assert p.aer == pytest.approx(0.1 * 0.9 / 0.8)
    assert p.speedup == pytest.approx(10.0)
    assert (p.t_select, p.t_train, p.t_full, p.q, p.q_full) == (10.0, 20.0, 300.0, 0.8, 0.9)
    # full fine-tuning against itself: AER 1, speedup 1
    f = aer(0, 300, 300, 0.9, 0.9)
    assert f.aer == 1.0 and f.speedup == 1.0
    # better quality than full at the same cost: AER below 1
    assert aer(0, 300, 300, 0.99, 0.9).aer < 1
    # zero quality: infinite AER; zero time: infinite speedup
    assert math.isinf(aer(1, 1, 10, 0.0, 0.5).aer)
    assert math.isinf(end_to_end_speedup(0, 0, 10))
    assert end_to_end_speedup(5, 15, 100) == pytest.approx(5.0)
    assert "AER 0.113" in str(p) and "speedup 10.00x" in str(p)
    assert set(p.as_dict()) >= {"aer", "speedup", "cost_ratio", "quality_ratio", "t_select", "t_train", "t_full"}


@pytest.mark.parametrize("args, match", [
    ((1, 1, 0, 0.5, 0.5), "t_full"),
    ((-1, 1, 10, 0.5, 0.5), "t_select"),
    ((1, float("nan"), 10, 0.5, 0.5), "t_train"),
    ((1, 1, 10, 0.5, 0.0), "q_full"),
    ((1, 1, 10, -0.1, 0.5), "q"),
    ((1, True, 10, 0.5, 0.5), "t_train"),
])
def test_aer_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        aer(*args)


def test_evaluate_accuracy_counts_correct_choices():
    model = tiny_llama(seed=0)
    items = [{"input_ids": [11, 12, 13], "choices": [5, 6], "answer": a} for a in (0, 1)]
    # the same prompt with both answers: exactly one is right
    assert evaluate(model, items) == 0.5
    # which one is right is decided by the logits: compare with a direct computation
    with torch.no_grad():
        row = model(input_ids=torch.tensor([[11, 12, 13]])).logits[0, -1]
    want = 1 if row[6] > row[5] else 0
    assert evaluate(model, items[want:want + 1]) == 1.0 and evaluate(model, items[1 - want:2 - want]) == 0.0
    acc, nll = evaluate(model, items, detail=True)
    lp = torch.log_softmax(row.float(), -1)
    assert acc == 0.5 and nll == pytest.approx(-(lp[5] + lp[6]).item() / 2, rel=1e-5)


def test_run_pipeline_report_and_files(tmp_path):
    task = synthetic_task(n_pool=48, n_targets=6, n_target_set=6, n_eval=12, seed=0)
    cfg = RunConfig(methods=("p2d", "random", "all"), epochs=1, batch_size=8, lr_full=1e-3, lr_heads=3e-3,
                    head_fraction=0.25, progress=False)
    model = tiny_llama(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = run_pipeline(model, task, cfg, quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input model is untouched
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows) == {"full", "p2d", "random", "all"}
    t_full, q_full = rows["full"]["t_train"], rows["full"]["q"]
    for r in rep["rows"]:
        assert r["t_full"] == t_full and r["q_full"] == q_full
        assert r["aer"] == pytest.approx(((r["t_select"] + r["t_train"]) / t_full) / (r["q"] / q_full))
        assert 0 <= r["q"] <= 1 and r["answer_nll"] > 0
    assert rows["p2d"]["t_select"] == pytest.approx(rows["p2d"]["t_score"] + rows["p2d"]["t_mine"])
    assert rows["p2d"]["data"] == "5 of 48" and rows["all"]["data"] == "48 of 48"
    assert 0 <= rows["p2d"]["mining_precision"] <= 1
    assert rows["p2d"]["trainable_params"] < rows["full"]["trainable_params"] / 10
    assert rep["environment"]["torch"] == torch.__version__ and rep["environment"]["date_utc"]
    paths = write_report(rep, str(tmp_path), "r")
    assert json.loads(open(paths["json"]).read())["rows"][0]["method"] == "full"
    md = open(paths["md"]).read()
    assert "| p2d |" in md and "AER" in md and table(rep) in md
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
    assert [r["method"] for r in rep["rows"]] == ["full", "p2d", "random"]
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
    assert rep["rows"][1]["params"] == "1 heads, 6 pruned"  # 12 heads, keep half
