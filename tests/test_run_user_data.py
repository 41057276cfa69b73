"""``headsparse run`` on the user's own JSONL data: the README's worked example, and bad input stopping early."""
import json
import os
import shutil

import pytest

from headsparse.recipes.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
FILES = {k: os.path.join(EXAMPLES, f"{k}.jsonl") for k in ("pool", "target", "dev", "eval")}


def _args(out, **files):
    paths = {**FILES, **files}
    argv = ["run", "--model", "tiny", "--out", str(out), "--stem", "x", "--no-progress"]
    for k in ("pool", "target", "dev", "eval"):
        if paths.get(k):
            argv += [f"--{k}", str(paths[k])]
    return argv


def test_worked_example_end_to_end(tmp_path, capsys):
    """The README's example: the committed files, the tiny model, a full report."""
    assert main(_args(tmp_path)) == 0
    rep = json.loads((tmp_path / "x.json").read_text())
    rows = {r["method"]: r for r in rep["rows"]}
    assert list(rows) == ["base (untuned)", "full", "p2d", "random"]
    n_eval = sum(1 for line in open(FILES["eval"]) if line.strip())
    n_pool = sum(1 for line in open(FILES["pool"]) if line.strip())
    assert rep["task"]["eval"] == n_eval and rep["task"]["pool"] == n_pool and rep["task"]["dev"] > 0
    # pool records tagged with the target file's task count as target-task data
    n_capital = sum(json.loads(line).get("task") == "capital" for line in open(FILES["pool"]) if line.strip())
    assert rep["task"]["pool_targets"] == n_capital
    for r in rep["rows"]:
        assert len(r["correct"]) == n_eval and 0 <= r["q_dev"] <= 1
    assert 0 <= rows["p2d"]["mining_precision"] <= 1
    assert (tmp_path / "x.md").exists()
    assert "| p2d |" in capsys.readouterr().out


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


MC = '{"prompt": "Q: x?\\nA:", "choices": [" a", " b"], "answer": 0}'


@pytest.mark.parametrize("which, lines, match", [
    ("pool", ['{"text": "fine text here"}', "{not json"], r"--pool .*bad\.jsonl:2: not valid JSON"),
    ("pool", ['{"text": "fine"}', '{"question": "no known shape"}'], r"bad\.jsonl:2: record has none of the known"),
    ("eval", [MC, '{"prompt": "Q: y?\\nA:", "choices": [" a", " b"], "answer": 2}'],
     r"--eval .*bad\.jsonl:2: field 'answer'"),
    ("eval", ['{"prompt": "p", "completion": " c"}'], r"bad\.jsonl:1: a 'completion' record is not accepted"),
    ("target", [], r"--target .*bad\.jsonl: the file holds no records"),
    ("dev", ['{"prompt": "Q: What is the capital of India?\\nA:", "choices": [" Delhi", " Lima"], "answer": 0}'],
     r"--dev .*bad\.jsonl:1: the same prompt is in --eval"),
])
def test_bad_data_stops_before_training_naming_file_line_field(tmp_path, which, lines, match):
    bad = _write(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=match):
        main(_args(out, **{which: bad}))
    assert not out.exists()  # nothing written, not even a folder


def test_data_files_go_together(tmp_path):
    with pytest.raises(SystemExit, match="--target missing"):
        main(_args(tmp_path / "out", target=""))


def test_unsupported_model_family_is_named(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    argv = _args(tmp_path / "out")
    argv[argv.index("tiny")] = str(tmp_path / "bert")
    with pytest.raises(SystemExit, match=r"model_type 'bert' is not a supported causal-LM family"):
        main(argv)
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_is_named(tmp_path):
    argv = _args(tmp_path / "out")
    argv[argv.index("tiny")] = str(tmp_path / "nope")
    with pytest.raises(SystemExit, match="--model .*nope"):
        main(argv)


def test_token_ids_outside_the_vocabulary_name_the_record(tmp_path):
    """A tokenizer whose ids exceed the model's vocabulary: caught per record, before training."""
    from headsparse.recipes.records import read_jsonl
    from headsparse.recipes.tasks import byte_tokenizer, task_from_records

    shutil.copy(FILES["pool"], tmp_path / "pool.jsonl")
    recs = {k: read_jsonl(FILES[k] if k != "pool" else str(tmp_path / "pool.jsonl"), name=f"--{k}",
                          shapes=("choice",) if k in ("eval", "dev") else ("text", "completion", "choice"))
            for k in FILES}
    with pytest.raises(ValueError, match=r"pool\.jsonl:1: field '.*' has token id \d+ outside the model's vocabulary"):
        task_from_records(recs, byte_tokenizer(), vocab_size=50)


def test_in_memory_records_are_checked_like_files():
    from headsparse.recipes.tasks import byte_tokenizer, task_from_records

    good = {"pool": [{"text": "ab cd"}], "target": [{"text": "xy z"}],
            "eval": [{"prompt": "Q", "choices": [" a", " b"], "answer": 1}]}
    assert len(task_from_records(good, byte_tokenizer()).eval) == 1
    for split, rec, match in (("eval", {"text": "no"}, r"eval\[0\]: a 'text' record is not accepted in eval"),
                              ("pool", {"foo": 1}, r"pool\[0\]: record has none of the known shapes"),
                              ("eval", {"prompt": "Q", "choices": [" a", " b"], "answer": 5},
                               r"eval\[0\]: field 'answer'")):
        with pytest.raises(ValueError, match=match):
            task_from_records({**good, split: [rec]}, byte_tokenizer())
