"""The embedded default task: word pairs never cross splits, the pool is a real mining problem."""
import collections
import re

import pytest

pytest.importorskip("gensim")

from headsparse.recipes.tasks import analogy_mix_records, analogy_pairs, split_pairs  # noqa: E402

QUESTION = re.compile(r"^Q: (\S+) is to (\S+) as (\S+) is to what\?\nA:$")


def _pairs_of(rec):
    a, b, c = QUESTION.match(rec["prompt"]).groups()
    d = rec["completion"].strip() if "completion" in rec else rec["choices"][rec["answer"]].strip()
    return {(a, b), (c, d)}


@pytest.fixture(scope="module")
def records():
    return analogy_mix_records(seed=0)


def test_split_pairs_partition_every_relation():
    pairs = analogy_pairs()
    splits = split_pairs(pairs, seed=3)
    for rel, ps in pairs.items():
        parts = [set(splits[s][rel]) for s in ("train", "dev", "eval")]
        assert set.union(*parts) == set(ps)
        assert sum(len(p) for p in parts) == len(ps)  # disjoint
        assert len(parts[1]) >= 2 and len(parts[2]) >= 2


def test_no_word_pair_in_two_splits(records):
    used = {}
    for split in ("pool", "target", "dev", "eval"):
        used[split] = set()
        for r in records[split]:
            if r.get("task") == "analogy":
                used[split] |= _pairs_of(r)
    train = used["pool"] | used["target"]
    assert train and used["dev"] and used["eval"]
    assert not train & used["dev"] and not train & used["eval"] and not used["dev"] & used["eval"]


def test_sizes_and_mix(records):
    assert len(records["eval"]) >= 500 and len(records["dev"]) >= 100
    tasks = collections.Counter(r.get("task") for r in records["pool"])
    others = [t for t in tasks if t not in ("analogy", "news")]
    assert len(others) >= 3 and tasks["news"] > 0
    # clearly more target-task items than a mined 10% of the pool
    assert tasks["analogy"] >= 100 and tasks["analogy"] > 3 * len(records["pool"]) // 10
    for r in records["pool"]:
        if "completion" in r:
            assert r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:")  # one shared template
    # every eval item: its answer is one of its relation's answer words; all distinct questions
    assert len({r["prompt"] for r in records["eval"]}) == len(records["eval"])
    for r in records["eval"][:50]:
        assert len(r["choices"]) >= 2 and 0 <= r["answer"] < len(r["choices"])


def test_records_are_deterministic_per_seed():
    a, b = analogy_mix_records(seed=1, n_eval=50, n_dev=20), analogy_mix_records(seed=1, n_eval=50, n_dev=20)
    assert a == b
    assert analogy_mix_records(seed=2, n_eval=50, n_dev=20)["eval"] != a["eval"]
