"""Reading, checking and tokenising JSONL task records (headsparse.recipes.records), good and bad input."""
import json
import re

import pytest

from headsparse.recipes.records import (check_disjoint, check_records, read_jsonl, record_shape, to_choice_item,
                                to_example)


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return str(p)


def _raises(msg_parts, fn, *a, **kw):
    with pytest.raises(ValueError) as ei:
        fn(*a, **kw)
    for part in msg_parts:
        assert part in str(ei.value), (part, str(ei.value))
    return str(ei.value)


@pytest.fixture(scope="module")
def tok():
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer()


def ids(s):  # ByT5: one id per UTF-8 byte, offset by its 3 special tokens
    return [b + 3 for b in s.encode("utf-8")]


TEXT = {"text": "hello"}
COMP = {"prompt": "Q:", "completion": " A"}
CHOICE = {"prompt": "Pick:", "choices": [" x", " yz"], "answer": 1}


# ------------------------------------------------------------------ reading: bad input
def test_line_not_json(tmp_path):
    p = _write(tmp_path, "pool.jsonl", [TEXT, "", "{bad"])
    _raises([f"{p}:3", "not valid JSON"], read_jsonl, p)


@pytest.mark.parametrize("rec,field,words", [
    ({"foo": 1}, "'foo'", "none of the known shapes"),
    ([1, 2], "list", "expected a JSON object"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, "'answer'", "0 to 1"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": -1}, "'answer'", "got -1"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": True}, "'answer'", "got True"),
    ({"prompt": "p", "choices": ["a", "b"], "answer": "0"}, "'answer'", "int index"),
    ({"prompt": "p", "choices": "ab", "answer": 0}, "'choices'", "at least 2"),
    ({"prompt": "p", "choices": ["a"], "answer": 0}, "'choices'", "at least 2"),
    ({"prompt": "p", "choices": ["a", ""], "answer": 0}, "'choices'", "non-empty"),
    ({"prompt": "p", "choices": ["a", "a"], "answer": 0}, "'choices'", "duplicate"),
    ({"prompt": "p", "choices": ["a", "b"]}, "'answer'", "multiple-choice record needs"),
    ({"completion": " A"}, "'prompt'", "completion record needs"),
    ({"prompt": "", "completion": " A"}, "'prompt'", "non-empty string"),
    ({"prompt": "Q", "completion": 5}, "'completion'", "non-empty string"),
    ({"text": ""}, "'text'", "non-empty string"),
    ({"text": "t", "task": 3}, "'task'", "must be a string"),
])
def test_bad_record_names_file_line_field(tmp_path, rec, field, words):
    p = _write(tmp_path, "pool.jsonl", [TEXT, TEXT, rec])
    msg = _raises([f"{p}:3", field, words], read_jsonl, p)
    assert "pool.jsonl:3" in msg


@pytest.mark.parametrize("lines", [[], ["", "   ", "\t"]])
def test_file_without_records(tmp_path, lines):
    p = _write(tmp_path, "pool.jsonl", lines)
    _raises([p, "holds no records"], read_jsonl, p)


def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.jsonl")
    for kw, label in (({}, p), ({"name": "--eval"}, "--eval " + p)):
        with pytest.raises(FileNotFoundError) as ei:
            read_jsonl(p, **kw)
        assert label in str(ei.value) and "no such file" in str(ei.value)


def test_eval_file_takes_only_choice(tmp_path):
    p = _write(tmp_path, "eval.jsonl", [CHOICE, TEXT])
    _raises([f"--eval {p}:2", "'text' record is not accepted", "'choice'"],
            read_jsonl, p, name="--eval", shapes=("choice",))
    assert len(read_jsonl(_write(tmp_path, "ok.jsonl", [CHOICE]), shapes=("choice",))) == 1


def test_check_disjoint(tmp_path):
    ev = read_jsonl(_write(tmp_path, "eval.jsonl", [CHOICE, {**CHOICE, "prompt": "Other:"}]))
    dev_bad = read_jsonl(_write(tmp_path, "dev.jsonl", [{**CHOICE, "prompt": "Dev:"}, CHOICE]))
    msg = _raises([f"{tmp_path}/dev.jsonl:2", f"{tmp_path}/eval.jsonl:1", "must not overlap"],
                  check_disjoint, dev_bad, ev)
    assert "--eval" in msg
    dev_ok = read_jsonl(_write(tmp_path, "dev2.jsonl", [{**CHOICE, "prompt": "Dev:"}]))
    assert check_disjoint(dev_ok, ev) is None


# ------------------------------------------------------------------ reading: good input
def test_three_shapes_parse_with_where(tmp_path):
    p = _write(tmp_path, "pool.jsonl", [TEXT, "", {**COMP, "task": "qa", "extra": 1}, "  ", CHOICE])
    recs = read_jsonl(p)
    assert [record_shape(r) for r in recs] == ["text", "completion", "choice"]
    assert [r["_where"] for r in recs] == [f"{p}:1", f"{p}:3", f"{p}:5"]
    assert recs[1]["task"] == "qa" and recs[1]["extra"] == 1
    assert recs[2]["choices"] == [" x", " yz"] and recs[2]["answer"] == 1


def test_check_records_in_memory():
    out = check_records([TEXT, COMP], "--pool")
    assert [r["_where"] for r in out] == ["--pool[0]", "--pool[1]"]
    assert "_where" not in TEXT  # the input records are not modified
    _raises(["--pool[1]", "'prompt'"], check_records, [TEXT, {"completion": "c"}], "--pool")
    _raises(["--eval[0]", "'text' record is not accepted in --eval"], check_records, [TEXT], "--eval", ("choice",))
    _raises(["--pool is empty"], check_records, [], "--pool")
    _raises(["must be a list of records"], check_records, "text", "--pool")
    _raises(["f.jsonl:7"], check_records, [{"foo": 1, "_where": "f.jsonl:7"}], "--pool")


# ------------------------------------------------------------------ tokenising
def test_ids_helper_matches_tokenizer(tok):
    assert tok("ab", add_special_tokens=False)["input_ids"] == [100, 101] == ids("ab")


def test_text_example_is_lm_loss(tok):
    ex = to_example({**TEXT, "task": "t"}, tok)
    assert ex == {"input_ids": ids("hello"), "task": "t"}
    assert to_example(TEXT, tok, max_tokens=3) == {"input_ids": ids("hel")}
    _raises(["'text'", "at least 2 tokens"], to_example, TEXT, tok, max_tokens=1)


def test_completion_example_masks_prompt(tok):
    ex = to_example(COMP, tok)
    assert ex["input_ids"] == ids("Q:") + ids(" A")
    assert ex["labels"] == [-100, -100] + ids(" A")
    assert "task" not in ex


def test_choice_example_trains_on_answer(tok):
    ex = to_example(CHOICE, tok)
    assert ex["input_ids"] == ids("Pick:") + ids(" yz")
    assert ex["labels"] == [-100] * 5 + ids(" yz")


def test_max_tokens_truncates_prompt_from_left(tok):
    rec = {"prompt": "abcdef", "completion": "XY"}
    ex = to_example(rec, tok, max_tokens=5)  # 6 + 2 > 5: keep the last 5 - 2 = 3 prompt tokens
    assert ex["input_ids"] == ids("defXY")
    assert ex["labels"] == [-100] * 3 + ids("XY")
    assert to_example(rec, tok, max_tokens=8)["input_ids"] == ids("abcdefXY")  # fits: untouched
    ex = to_example({"prompt": "abc", "completion": "WXYZ"}, tok, max_tokens=3)  # completion longer than budget
    assert ex["input_ids"] == ids("cWXYZ")  # one prompt token kept, completion whole


@pytest.mark.parametrize("rec,field", [(TEXT, "'text'"), (COMP, "'prompt'"), (CHOICE, "'prompt'")])
def test_vocab_size_too_small(tok, rec, field):
    rec = {**rec, "_where": "pool.jsonl:4"}
    _raises(["pool.jsonl:4", field, "vocabulary of 50", "token id"], to_example, rec, tok, vocab_size=50)
    to_example(rec, tok, vocab_size=384)  # the full ByT5 vocabulary is fine


def test_vocab_checks_completion_and_choices(tok):
    # "\x7f" -> id 127+3 = 130: prompt "!" (33+3 = 36) fits a vocabulary of 100, the completion does not
    _raises(["'completion'", "token id 130"], to_example, {"prompt": "!", "completion": "\x7f"}, tok, vocab_size=100)
    rec = {"prompt": "!", "choices": ["!", "\x7f"], "answer": 0}
    _raises(["'choices'", "token id 130"], to_choice_item, rec, tok, vocab_size=100)


def test_choice_item(tok):
    item = to_choice_item({**CHOICE, "task": "mc"}, tok)
    assert item == {"prompt_ids": ids("Pick:"), "choice_ids": [ids(" x"), ids(" yz")], "answer": 1, "task": "mc"}
    assert to_choice_item(CHOICE, tok, max_prompt_tokens=2)["prompt_ids"] == ids("k:")


@pytest.mark.parametrize("rec", [TEXT, COMP])
def test_choice_item_rejects_other_shapes(tok, rec):
    _raises(["f.jsonl:2", "multiple-choice"], to_choice_item, {**rec, "_where": "f.jsonl:2"}, tok)


def test_error_messages_match_regex(tmp_path):
    p = _write(tmp_path, "pool.jsonl", [TEXT, {"prompt": "p", "choices": ["a", "b"], "answer": 2}])
    with pytest.raises(ValueError, match=re.escape(f"{p}:2") + r".*field 'answer'"):
        read_jsonl(p)
