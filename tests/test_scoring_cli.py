"""``headsparse score``: plan, scores and heat map from a text file (MiniLM-L6), and bad input."""
import json

import pytest

from headsparse import HeadPlan, HeadScores
from headsparse.recipes.cli import main
from headsparse.recipes.scoring.cli import parse_options, read_texts
from _hs_models import minilm_dir

TEXTS = ["The capital of Italy is Rome.", "A cat sat on the mat.", "Heads can be pruned.", "Water boils."]


@pytest.fixture(scope="module")
def model_path():
    try:
        return str(minilm_dir())
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"MiniLM not available: {exc}")


def test_score_command_text_file(tmp_path, model_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "plan.json"
    rc = main(["score", "--model", model_path, "--data", str(data), "--method", "hifi", "--fraction", "0.1",
               "--out", str(out), "--no-progress", "--option", "damping=0.9"])
    assert rc == 0
    plan = HeadPlan.load(out)
    scores = HeadScores.load(tmp_path / "plan.scores.json")
    assert plan.count("train") == round(0.1 * 72) and plan.model_family == "bert"
    assert scores.method == "hifi" and scores.options["damping"] == 0.9 and scores.num_samples == 4
    assert plan == scores.to_plan(fraction=0.1)
    png = (tmp_path / "plan.heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    text = capsys.readouterr().out
    assert "layer" in text and "train 7 heads" in text and "tokens/s" in text


def test_score_command_jsonl_per_layer(tmp_path, model_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)))
    out = tmp_path / "p.json"
    rc = main(["score", "--model", model_path, "--data", str(data), "--method", "apt", "--per-layer-k", "2",
               "--out", str(out), "--heatmap", "none", "--no-progress", "--max-samples", "3"])
    assert rc == 0
    plan = HeadPlan.load(out)
    assert all(len(plan.heads(i, "train")) == 2 for i in range(6))
    assert HeadScores.load(tmp_path / "p.scores.json").num_samples == 3
    assert not (tmp_path / "p.heatmap.png").exists()


def test_score_command_places_heads_with_layers(tmp_path, model_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS))
    out = tmp_path / "top.json"
    rc = main(["score", "--model", model_path, "--data", str(data), "--method", "gradient", "--fraction", "0.1",
               "--layers", "3:", "--out", str(out), "--heatmap", "none", "--no-progress"])
    assert rc == 0
    plan = HeadPlan.load(out)
    scores = HeadScores.load(tmp_path / "top.scores.json")
    assert plan == scores.to_plan(fraction=0.1, layers=range(3, 6)) and plan.count("train") == 7
    assert plan.gradient_horizon == 3 and all(not plan.heads(i, "train") for i in range(3))
    assert "gradient horizon: layer 3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layers must be START:STOP"):
        main(["score", "--model", model_path, "--data", str(data), "--layers", "top", "--out", str(out)])


def test_read_texts_and_options(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_texts(str(f))
    with pytest.raises(ValueError, match="no such file"):
        read_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        read_texts(str(tmp_path / "e.txt"))
    assert parse_options(["damping=0.9", "richness=effective_rank", "steps=3"]) == {
        "damping": 0.9, "richness": "effective_rank", "steps": 3}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["oops"])


def test_score_command_bad_model(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello\n")
    with pytest.raises(SystemExit, match="headsparse score: --model"):
        main(["score", "--model", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "p.json")])
    with pytest.raises(SystemExit):
        main(["score", "--model", "x", "--data", str(data), "--out", "p.json", "--method", "fisher"])
    assert not (tmp_path / "p.json").exists()
