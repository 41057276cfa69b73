"""Task data as JSON records: reading, checking and tokenising ``headsparse run`` inputs.

One record per line of a JSONL file, in one of three shapes:

- ``{"text": ...}``: language-model loss on every token (unlabelled text).
- ``{"prompt": ..., "completion": ...}``: loss on the completion's tokens only.
- ``{"prompt": ..., "choices": [...], "answer": i}``: multiple choice. In a
  training file it trains like ``{"prompt", "completion": choices[answer]}``;
  in an evaluation file it is scored by the log-likelihood the model gives each
  choice after the prompt (quality = accuracy).

Any record may carry ``"task"`` (a string naming the task it belongs to); the
pipeline uses it to report how much of a mined subset is target-task data.
Other keys are ignored. Prompt and completion are tokenised separately and
concatenated, without special tokens, so the boundary is the same in training
and evaluation; write the separating space into the completion (``" Paris"``).

Every problem is reported as a ``ValueError`` that names the file, the line
and the field, before any model work starts.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

SHAPES = ("text", "completion", "choice")
_SHAPE_HELP = ('{"text": ...}, {"prompt": ..., "completion": ...} or '
               '{"prompt": ..., "choices": [...], "answer": i}')


def _where(source: str, line: int) -> str:
    return f"{source}:{line}"


def record_shape(rec: Dict, where: str = "record") -> str:
    """``"text"``, ``"completion"`` or ``"choice"`` for a checked record; ValueError naming ``where`` otherwise."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object {_SHAPE_HELP}, got {type(rec).__name__}")

    def need_str(key):
        v = rec[key]
        if not isinstance(v, str) or not v:
            raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {v!r}")

    if "task" in rec and not isinstance(rec["task"], str):
        raise ValueError(f"{where}: field 'task' must be a string, got {rec['task']!r}")
    if "choices" in rec or "answer" in rec:
        for key in ("prompt", "choices", "answer"):
            if key not in rec:
                raise ValueError(f"{where}: a multiple-choice record needs field {key!r} ({_SHAPE_HELP})")
        need_str("prompt")
        ch = rec["choices"]
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise ValueError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, got {ch!r}")
        if len(set(ch)) != len(ch):
            raise ValueError(f"{where}: field 'choices' holds a duplicate: {ch!r}")
        a = rec["answer"]
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
            raise ValueError(f"{where}: field 'answer' must be an int index into the {len(ch)} choices "
                             f"(0 to {len(ch) - 1}), got {a!r}")
        return "choice"
    if "completion" in rec:
        if "prompt" not in rec:
            raise ValueError(f"{where}: a completion record needs field 'prompt' ({_SHAPE_HELP})")
        need_str("prompt")
        need_str("completion")
        return "completion"
    if "text" in rec:
        need_str("text")
        return "text"
    raise ValueError(f"{where}: record has none of the known shapes {_SHAPE_HELP}; its fields are {sorted(rec)}")


def read_jsonl(path: str, *, name: Optional[str] = None, shapes: Sequence[str] = SHAPES) -> List[Dict]:
    """Read and check a JSONL file of records; each gets ``"_where"`` = "file:line" for later messages.

    ``shapes`` restricts the accepted record shapes (an evaluation file takes
    only ``"choice"``); ``name`` labels the file in errors (e.g. ``--eval``).
    """
    label = f"{name} {path}" if name else str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{label}: no such file")
    out: List[Dict] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{_where(label, i)}: not UTF-8 text ({e.reason} at byte {e.start}); JSONL files "
                                 f"must be UTF-8") from None
            if not line.strip():
                continue
            where = _where(label, i)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            shape = record_shape(rec, where)
            if shape not in shapes:
                raise ValueError(f"{where}: a {shape!r} record is not accepted here; this file takes "
                                 f"{' or '.join(repr(s) for s in shapes)} records")
            rec = dict(rec)
            rec["_where"] = where
            out.append(rec)
    if not out:
        raise ValueError(f"{label}: the file holds no records")
    return out


def check_records(records: Sequence[Dict], name: str, shapes: Sequence[str] = SHAPES) -> List[Dict]:
    """Check in-memory records like :func:`read_jsonl` checks a file's (errors name ``name[i]``)."""
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__len__"):
        raise ValueError(f"{name} must be a list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{name} is empty")
    out = []
    for i, rec in enumerate(records):
        where = rec.get("_where", f"{name}[{i}]") if isinstance(rec, dict) else f"{name}[{i}]"
        shape = record_shape(rec, where)
        if shape not in shapes:
            raise ValueError(f"{where}: a {shape!r} record is not accepted in {name} "
                             f"(takes {' or '.join(repr(s) for s in shapes)})")
        out.append(rec if "_where" in rec else {**rec, "_where": where})
    return out


def _key(rec: Dict) -> str:
    return rec["prompt"] if "prompt" in rec else rec.get("text", "")


def check_disjoint(dev: Sequence[Dict], eval_: Sequence[Dict], dev_name: str = "--dev",
                   eval_name: str = "--eval") -> None:
    """ValueError if a dev record has the same prompt (or text) as an eval record."""
    seen = {_key(r): r for r in eval_}
    for r in dev:
        if _key(r) in seen:
            raise ValueError(f"{r.get('_where', dev_name)}: the same prompt is in {eval_name} "
                             f"({seen[_key(r)].get('_where', eval_name)}): dev and eval must not overlap")


# ----------------------------------------------------------------- tokenising
def _encode(tok, text: str) -> List[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _check_ids(ids: List[int], vocab_size: Optional[int], where: str, field: str) -> None:
    if not ids:
        raise ValueError(f"{where}: field {field!r} tokenises to no tokens")
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{where}: field {field!r} has token id {bad[0]} outside the model's vocabulary "
                             f"of {vocab_size}")


def to_example(rec: Dict, tok, *, max_tokens: Optional[int] = None, vocab_size: Optional[int] = None) -> Dict:
    """A training example ``{"input_ids", "labels"?, "task"?}`` from a record (text: LM loss; else answer-only).

    ``max_tokens`` truncates a text record, and the *prompt* of a supervised one
    from the left, so the completion always stays whole.
    """
    where = rec.get("_where", "record")
    shape = record_shape(rec, where)
    if shape == "text":
        ids = _encode(tok, rec["text"])
        _check_ids(ids, vocab_size, where, "text")
        if max_tokens:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"{where}: field 'text' needs at least 2 tokens, got {len(ids)}")
        ex = {"input_ids": ids}
    else:
        completion = rec["completion"] if shape == "completion" else rec["choices"][rec["answer"]]
        p, c = _encode(tok, rec["prompt"]), _encode(tok, completion)
        _check_ids(p, vocab_size, where, "prompt")
        _check_ids(c, vocab_size, where, "completion" if shape == "completion" else "choices")
        if max_tokens and len(p) + len(c) > max_tokens:
            p = p[-max(1, max_tokens - len(c)):]
        ex = {"input_ids": p + c, "labels": [-100] * len(p) + c}
    if "task" in rec:
        ex["task"] = rec["task"]
    return ex


def to_choice_item(rec: Dict, tok, *, max_prompt_tokens: Optional[int] = None,
                   vocab_size: Optional[int] = None) -> Dict:
    """An evaluation item ``{"prompt_ids", "choice_ids", "answer", "task"?}`` from a multiple-choice record."""
    where = rec.get("_where", "record")
    if record_shape(rec, where) != "choice":
        raise ValueError(f"{where}: evaluation needs a multiple-choice record ({_SHAPE_HELP})")
    p = _encode(tok, rec["prompt"])
    _check_ids(p, vocab_size, where, "prompt")
    if max_prompt_tokens:
        p = p[-max_prompt_tokens:]
    choices = []
    for c in rec["choices"]:
        ids = _encode(tok, c)
        _check_ids(ids, vocab_size, where, "choices")
        choices.append(ids)
    if len({tuple(c) for c in choices}) != len(choices):
        raise ValueError(f"{where}: field 'choices': two choices tokenise to the same ids")
    item = {"prompt_ids": p, "choice_ids": choices, "answer": rec["answer"]}
    if "task" in rec:
        item["task"] = rec["task"]
    return item
