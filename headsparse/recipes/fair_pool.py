"""The pool of the fair test ("capitals-in-a-mix"): a target task that is at most a small share of the pool.

The claim under test is that a few scored heads, trained on the 10% of a pool
those heads respond to, reach what full fine-tuning on the whole pool reaches.
That can only be tested on a pool where the mined 10% can hold (nearly) all of
the target task's data and where finding it is not a template match. So:

- **target task**: capital -> country analogies ("Q: Athens is to Greece as
  Lima is to what?\\nA: Peru"), ``target_share`` of the pool (default 10%, at
  most 15%). With a share s and a mined fraction f the mining recall ceiling
  is min(1, f / s): 1.0 at the default.
- **near-domain distractors**, same template: analogies of the twelve other
  relations of ``questions-words.txt`` phrased exactly alike (currencies,
  city-in-state, family, nine grammatical ones), and other question types
  about the same kind of entities ("What is the capital of Peru?", "Of which
  country is Lima the capital?", "What is the currency of Japan?", "In which
  US state is Dallas?", "What is the nationality adjective of Spain?").
- **other supervised tasks**, same template: sentiment of a Pang & Lee
  sentence, topic of a mini-newsgroup post, last word of a news sentence.
- **unlabelled near-domain text**: news sentences (the Lee corpus), those
  naming a country or a capital first.

Every record is built at run time from files that the installed ``gensim``
package ships as its test data (``questions-words.txt`` from word2vec, Apache
2.0; the Lee news corpus, the Pang & Lee polarity sentences and a mini
20-newsgroups sample); nothing of it is committed to this repository.

Splits are disjoint by underlying item: capital word pairs are split into
train / dev / eval, and every record that mentions a capital pair (target
analogies, their distractor questions about capitals, the target set) uses
train pairs only; dev and eval items use only their own pairs. Quality is
multiple-choice accuracy among every country of the relation.
"""
from __future__ import annotations

import random
import re
from typing import Dict, List, Optional, Tuple

from .tasks import (PROMPT_TEMPLATE, _analogy_question, _analogy_questions, _gensim_file, _newsgroup_posts, _qa,
                    _sentences, _sentiment_reviews, analogy_pairs, split_pairs)

TARGET_RELATION = "capital-world"
TARGET_TASK = "capital-analogy"
MAX_TARGET_SHARE = 0.15
MAX_WORDS = 14  # news sentences of last-word questions, and text records, hold at most this many words
# shares of the pool besides the target task (the rest is unlabelled text); sentiment and topic are capped by the
# bundled data (200 each), the difference goes to the text
SHARES = {"other-analogy": 0.34, "entity-question": 0.08, "sentiment": 0.12, "topic": 0.12, "last-word": 0.12}

DESCRIPTION = (
    "Capitals-in-a-mix (the fair test's pool): the target task is capital -> country analogies from gensim's "
    "questions-words.txt, {share:.0%} of the pool, split by word pair into train / dev / eval (no capital pair in two "
    "splits). The rest of the pool, in the same 'Q: ...\\nA:' template: analogies of the 12 other relations phrased "
    "alike, other questions about the same kind of entities (capital of a country, country of a capital, currency, "
    "US state of a city, nationality adjective), sentiment of Pang & Lee sentences, topic of mini-newsgroup posts, "
    "last word of a news sentence; plus unlabelled news sentences (LM loss). Quality = accuracy of choosing the "
    "country among every country of the relation (log-likelihood), on held-out analogies.")


def recall_ceiling(n_pool: int, n_target: int, fraction: float = 0.1) -> float:
    """The largest share of the pool's target records a mined ``fraction`` of the pool can hold."""
    return 1.0 if n_target == 0 else min(1.0, int(fraction * n_pool) / n_target)


def _entity_questions(pairs: Dict[str, List[Tuple[str, str]]], train_capitals: List[Tuple[str, str]]) -> List[Dict]:
    qs = []
    for cap, country in train_capitals:
        qs.append(_qa(f"What is the capital of {country}?", cap, "entity-question"))
        qs.append(_qa(f"Of which country is {cap} the capital?", country, "entity-question"))
        qs.append(_qa(f"Name the capital city of {country}.", cap, "entity-question"))
        qs.append(_qa(f"{cap} is the capital of which country?", country, "entity-question"))
    for country, cur in pairs.get("currency", []):
        qs.append(_qa(f"What is the currency of {country}?", cur, "entity-question"))
    for city, state in pairs.get("city-in-state", []):
        qs.append(_qa(f"In which US state is {city}?", state, "entity-question"))
    for country, adj in pairs.get("gram6-nationality-adjective", []):
        qs.append(_qa(f"What is the nationality adjective of {country}?", adj, "entity-question"))
    return qs


def capital_mix_records(tok=None, *, n_pool: int = 600, target_share: float = 0.10, n_target_set: int = 16,
                        n_dev: int = 150, n_eval: int = 300, fraction: float = 0.1,
                        seed: int = 0) -> Dict[str, object]:
    """{"pool", "target", "dev", "eval": records; "composition": table} of the fair test's pool (module docstring).

    ``n_pool`` records, of which ``round(target_share * n_pool)`` are target analogies; ``tok`` (optional) keeps
    only pairs whose answer is a single token. ``composition``: records per task, the target share and the
    mining recall ceiling at ``fraction``. ValueError when the bundled data cannot fill the request.
    """
    if not 0 < target_share <= MAX_TARGET_SHARE:
        raise ValueError(f"target_share must be in (0, {MAX_TARGET_SHARE}], got {target_share!r}")
    if n_pool < 50:
        raise ValueError(f"n_pool must be at least 50, got {n_pool}")
    g = random.Random(seed)
    pairs = analogy_pairs(tok)
    if TARGET_RELATION not in pairs:
        raise ValueError(f"no {TARGET_RELATION} pairs survive the tokenizer's single-token filter")
    splits = split_pairs({TARGET_RELATION: pairs[TARGET_RELATION]}, seed)
    countries = sorted({b for _, b in pairs[TARGET_RELATION]})

    def choice_rec(rel, p, q):
        return {"prompt": PROMPT_TEMPLATE.format(question=_analogy_question(p, q)),
                "choices": [" " + w for w in countries], "answer": countries.index(q[1]), "task": TARGET_TASK,
                "pairs": [list(p), list(q)]}

    n_target = round(target_share * n_pool)
    train_q = _analogy_questions(splits["train"], n_target + n_target_set, g)
    target = [dict(_qa(_analogy_question(p, q), q[1], TARGET_TASK), pairs=[list(p), list(q)]) for _, p, q in train_q]
    dev = [choice_rec(*x) for x in _analogy_questions(splits["dev"], n_dev, g)]
    ev = [choice_rec(*x) for x in _analogy_questions(splits["eval"], n_eval, g)]

    counts = {k: round(v * n_pool) for k, v in SHARES.items()}
    others = {rel: ps for rel, ps in pairs.items() if rel != TARGET_RELATION}
    other_q = _analogy_questions(others, counts["other-analogy"], g)
    other_analogy = [_qa(_analogy_question(p, q), q[1], "other-analogy") for _, p, q in other_q]

    train_caps = splits["train"][TARGET_RELATION]
    ent = _entity_questions(pairs, train_caps)
    g.shuffle(ent)
    if counts["entity-question"] > len(ent):
        raise ValueError(f"{counts['entity-question']} entity questions wanted, {len(ent)} can be formed")
    entity = ent[:counts["entity-question"]]

    reviews = _sentiment_reviews()
    posts = _newsgroup_posts()
    g.shuffle(reviews), g.shuffle(posts)
    counts["sentiment"] = min(counts["sentiment"], len(reviews))
    counts["topic"] = min(counts["topic"], len(posts))
    sentiment = [_qa(f"Is this movie review positive or negative? {t}", y, "sentiment")
                 for t, y in reviews[:counts["sentiment"]]]
    topic = [_qa(f"Is this newsgroup post about religion or space? {t}", y, "topic") for t, y in posts[:counts["topic"]]]

    news = _gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    sents = sorted({s for art in news for s in _sentences(art) if 6 <= len(s.split()) <= 25})
    g.shuffle(sents)
    names = {w for p in pairs[TARGET_RELATION] for w in p}
    near = [s for s in sents if names & set(re.findall(r"\w+", s))]
    rest = [s for s in sents if not names & set(re.findall(r"\w+", s))]
    n_text = n_pool - n_target - sum(counts.values())
    if counts["last-word"] + n_text > len(sents) or counts["last-word"] > sum(len(s.split()) <= MAX_WORDS
                                                                             for s in sents):
        raise ValueError(f"n_pool={n_pool} needs {counts['last-word'] + n_text} news sentences ({counts['last-word']} "
                         f"of at most {MAX_WORDS} words), the bundled corpus has {len(sents)}")
    # last-word questions take whole short sentences; text records are the other sentences' first words
    # (near-domain first: sentences that name a capital or a country), so no record is longer than the others
    short = [s for s in sents if len(s.split()) <= MAX_WORDS]
    last_s = short[:counts["last-word"]]
    used = set(last_s)
    text_s = [" ".join(s.split()[:MAX_WORDS]) for s in near + rest if s not in used][:n_text]
    last = [_qa(f"What is the last word of this sentence? {s}", re.sub(r"\W+$", "", s.split()[-1]), "last-word")
            for s in last_s]
    text = [{"text": s, "task": "news"} for s in text_s]

    pool = target[:n_target] + other_analogy + entity + sentiment + topic + last + text
    g.shuffle(pool)
    per_task: Dict[str, int] = {}
    for r in pool:
        per_task[r["task"]] = per_task.get(r["task"], 0) + 1
    composition = {"records": per_task, "pool": len(pool), "target_task": TARGET_TASK,
                   "target_records": n_target, "target_share": n_target / len(pool),
                   "near_domain_text": min(len(text_s), sum(1 for s in near if s not in used)),
                   "fraction": fraction, "recall_ceiling": recall_ceiling(len(pool), n_target, fraction),
                   "eval": len(ev), "dev": len(dev), "target_set": n_target_set,
                   "capital_pairs": {k: len(v[TARGET_RELATION]) for k, v in splits.items()}}
    return {"pool": pool, "target": target[n_target:], "dev": dev, "eval": ev, "composition": composition}


def description(composition: Optional[Dict] = None) -> str:
    share = composition["target_share"] if composition else 0.10
    return DESCRIPTION.format(share=share)
