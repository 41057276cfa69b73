"""The fair test's pool: composition (target share, recall ceiling, >= 4 other supervised tasks, unlabelled text)
and splits disjoint by capital word pair."""
import collections
import re

import pytest

pytest.importorskip("gensim")

from headsparse.recipes.fair_pool import (MAX_TARGET_SHARE, TARGET_TASK, capital_mix_records,  # noqa: E402
                                          recall_ceiling)

QUESTION = re.compile(r"^Q: (\S+) is to (\S+) as (\S+) is to what\?\nA:$")


@pytest.fixture(scope="module", params=[600, 3000])
def recs(request):
    return capital_mix_records(n_pool=request.param, n_eval=300 if request.param == 600 else 500, seed=0)


def test_composition(recs):
    pool, comp = recs["pool"], recs["composition"]
    tasks = collections.Counter(r["task"] for r in pool)
    assert len(pool) == comp["pool"] and dict(tasks) == comp["records"]
    assert tasks[TARGET_TASK] == comp["target_records"]
    assert comp["target_share"] <= MAX_TARGET_SHARE and comp["recall_ceiling"] >= 0.9
    assert recall_ceiling(len(pool), tasks[TARGET_TASK]) == comp["recall_ceiling"]
    supervised = [t for t in tasks if t not in (TARGET_TASK, "news")]
    assert len(supervised) >= 4 and tasks["news"] > 0 and comp["near_domain_text"] > 0
    for r in pool:
        if "completion" in r:
            assert r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:")  # one shared template
        else:
            assert set(r) == {"text", "task"}
    # distractors phrased exactly like the target
    assert sum(1 for r in pool if r["task"] == "other-analogy" and QUESTION.match(r["prompt"])) > 0.2 * len(pool)
    assert len(recs["eval"]) >= 300 and len(recs["dev"]) >= 100


def test_disjoint_by_capital_pair(recs):
    train_pairs = set()
    for r in recs["pool"] + recs["target"]:
        if r["task"] == TARGET_TASK:
            train_pairs |= {tuple(p) for p in r["pairs"]}
    dev = {tuple(p) for r in recs["dev"] for p in r["pairs"]}
    ev = {tuple(p) for r in recs["eval"] for p in r["pairs"]}
    assert train_pairs and dev and ev
    assert not train_pairs & dev and not train_pairs & ev and not dev & ev
    # no other record names an eval or dev capital: no question about the same pair leaks the answer
    held = {w for p in dev | ev for w in p}
    caps = {p[0] for p in dev | ev}
    for r in recs["pool"]:
        if r["task"] == "entity-question":
            words = set(re.findall(r"\w+", r["prompt"] + r["completion"]))
            assert not (words & caps and words & held - caps), r
    # eval items distinct and answerable
    assert len({r["prompt"] for r in recs["eval"]}) == len(recs["eval"])
    for r in recs["eval"]:
        assert r["choices"][r["answer"]].strip() == r["pairs"][1][1]


def test_deterministic_and_limits():
    a = capital_mix_records(n_pool=200, n_eval=40, n_dev=20, seed=1)
    assert a == capital_mix_records(n_pool=200, n_eval=40, n_dev=20, seed=1)
    assert capital_mix_records(n_pool=200, n_eval=40, n_dev=20, seed=2)["pool"] != a["pool"]
    with pytest.raises(ValueError, match="target_share"):
        capital_mix_records(n_pool=200, target_share=0.2)
    with pytest.raises(ValueError, match="news sentences|entity"):
        capital_mix_records(n_pool=20000)
