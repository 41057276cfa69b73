"""The fair test's verdict: rules fixed before any run, applied to a report's per-item outcomes.

The claim: a few scored heads (P2D's arm: the scored 10% of heads trained on the
10% of the pool P2D mined with them) reach what full fine-tuning on the whole
pool reaches, at a lower end-to-end cost. Every comparison is paired over the
same held-out items (percentile bootstrap, 95%) and made per seed; seed k of
every arm is compared with seed k of the other (or with its only seed).

R1 non-inferiority to full fine-tuning on the whole pool: CI of
   Q_P2D - Q_full. A seed *passes* when the lower bound is above -MARGIN, *fails*
   when the upper bound is below -MARGIN, else it is inconclusive.
R2 the mined data matter: P2D against the same (scored) heads on a random 10%.
R3 the scored heads matter: P2D against random heads on the same mined data.
   R2, R3 per seed: *better* (lower bound > 0), *worse* (upper bound < 0) or no
   difference shown.
R4 against LoRA r16 on the mined data, at its cost: P2D passes a seed when it
   is non-inferior to LoRA (lower bound > -MARGIN), fails it when LoRA is
   better by more than the margin (upper bound < -MARGIN).
   Cost: mean end-to-end seconds (selection + training) of the two arms.
R5 end-to-end speedup of P2D (selection included) over full fine-tuning on the
   whole pool, mean over seeds, without and with each arm's search.

A rule *holds* when every seed passes (better, for R2/R3), *fails* when any
seed fails (worse), and is *inconclusive* otherwise. R4 also fails when P2D
costs more than LoRA on the mined data without being better in any seed, and
holds only if P2D costs no more. R5 holds when the speedup exceeds 1 both
without and with searches, fails when it is at most 1 in both, else is
inconclusive. The claim holds when R1 and R5 hold, fails when R1 or R5 fails,
and is inconclusive otherwise; R2-R4 say which part of the recipe carries it.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .stats import paired_bootstrap_ci

MARGIN = 0.02  # non-inferiority margin in accuracy
P2D = "P2D: scored heads, mined 10%"
FULL = "full FT, whole pool"
RANDOM_DATA = "scored heads, random 10%"
RANDOM_HEADS = "random heads, mined 10%"
LORA_MINED = "LoRA r16, mined 10%"
RULES = ("R1", "R2", "R3", "R4", "R5")


def _rows(report: Dict, arm: str) -> Dict[int, Dict]:
    return {r["seed"]: r for r in report["rows"] if r["arm"] == arm}


def _pairs(report: Dict, a: str, b: str, n_boot: int, seed: int) -> List[Dict]:
    """Per seed of arm a: the paired CI of Q_a - Q_b (b's same seed, else its first)."""
    ra, rb = _rows(report, a), _rows(report, b)
    out = []
    if not ra or not rb:
        return out
    for s in sorted(ra):
        other = rb.get(s, rb[min(rb)])
        ci = paired_bootstrap_ci(ra[s]["correct"], other["correct"], n_boot=n_boot, seed=seed).as_dict()
        out.append({"seed": s, "vs_seed": other["seed"], **ci})
    return out


def _cost(report: Dict, arm: str, with_search: bool = False) -> Optional[float]:
    rs = list(_rows(report, arm).values())
    if not rs:
        return None
    search = report.get("settings", {}).get(arm, {}).get("search_s", 0.0) if with_search else 0.0
    return sum(r["t_select"] + r["t_train"] for r in rs) / len(rs) + (search or 0.0)


def _aggregate(outcomes: List[str], good: str, bad: str) -> str:
    if not outcomes:
        return "not measured"
    if any(o == bad for o in outcomes):
        return "fails"
    return "holds" if all(o == good for o in outcomes) else "inconclusive"


def _noninf(ci: Dict) -> str:
    return "passes" if ci["low"] > -MARGIN else ("fails" if ci["high"] < -MARGIN else "inconclusive")


def _better(ci: Dict) -> str:
    return "better" if ci["low"] > 0 else ("worse" if ci["high"] < 0 else "no difference shown")


def verdict(report: Dict, n_boot: int = 2000, seed: int = 0) -> Dict:
    """Every rule's per-seed outcomes and overall result, and the claim's (module docstring)."""
    out: Dict = {"margin": MARGIN, "rules": {}}
    r1 = _pairs(report, P2D, FULL, n_boot, seed)
    for c in r1:
        c["outcome"] = _noninf(c)
    out["rules"]["R1"] = {"name": "P2D non-inferior to full fine-tuning on the whole pool (lower bound > -margin)",
                          "per_seed": r1, "result": _aggregate([c["outcome"] for c in r1], "passes", "fails")}
    for rule, other, what in (("R2", RANDOM_DATA, "P2D's data against a random 10% (same scored heads)"),
                              ("R3", RANDOM_HEADS, "scored heads against random heads (same mined data)")):
        cs = _pairs(report, P2D, other, n_boot, seed)
        for c in cs:
            c["outcome"] = _better(c)
        out["rules"][rule] = {"name": what, "per_seed": cs,
                              "result": _aggregate([c["outcome"] for c in cs], "better", "worse")}
    r4 = _pairs(report, P2D, LORA_MINED, n_boot, seed)
    for c in r4:
        c["outcome"] = _noninf(c)
    cost_p, cost_l = _cost(report, P2D), _cost(report, LORA_MINED)
    res = _aggregate([c["outcome"] for c in r4], "passes", "fails")
    if res != "not measured" and cost_p is not None and cost_l is not None and cost_p > cost_l:
        res = "fails" if not any(c["low"] > 0 for c in r4) else ("inconclusive" if res == "holds" else res)
    out["rules"]["R4"] = {"name": "P2D against LoRA r16 on the mined data, at its cost (non-inferior and no dearer)",
                          "per_seed": r4, "cost_s": {"p2d": cost_p, "lora_mined": cost_l}, "result": res}
    t_full, t_full_s = _cost(report, FULL), _cost(report, FULL, True)
    c_p, c_p_s = _cost(report, P2D), _cost(report, P2D, True)
    sp = t_full / c_p if t_full and c_p else None
    sp_s = t_full_s / c_p_s if t_full_s and c_p_s else None
    if sp is None or sp_s is None:
        r5 = "not measured"
    else:
        r5 = "holds" if sp > 1 and sp_s > 1 else ("fails" if sp <= 1 and sp_s <= 1 else "inconclusive")
    out["rules"]["R5"] = {"name": "end-to-end speedup of P2D over full fine-tuning (selection included)",
                          "speedup": sp, "speedup_with_search": sp_s, "result": r5}
    r1r = out["rules"]["R1"]["result"]
    if "not measured" in (r1r, r5):
        claim = "not measured"
    elif r1r == "fails" or r5 == "fails":
        claim = "fails"
    else:
        claim = "holds" if r1r == "holds" and r5 == "holds" else "inconclusive"
    out["claim"] = claim
    out["text"] = verdict_text(out)
    out["why"] = why(report, n_boot, seed)
    return out


def _fmt_ci(c: Dict) -> str:
    return f"seed {c['seed']}: {c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] ({c['outcome']})"


def verdict_text(v: Dict) -> str:
    """The verdict in plain sentences (markdown)."""
    r = v["rules"]
    claim = {"holds": "the claim HOLDS", "fails": "the claim FAILS", "inconclusive": "INCONCLUSIVE",
             "not measured": "not measured"}[v["claim"]]
    lines = [f"**Verdict: {claim}** "
             f"(rules fixed before the run; margin {v['margin']}).", ""]
    for k in RULES:
        e = r[k]
        detail = "; ".join(_fmt_ci(c) for c in e.get("per_seed", []))
        if k == "R4" and e["cost_s"]["p2d"] is not None and e["cost_s"]["lora_mined"] is not None:
            detail += (f"; cost {e['cost_s']['p2d']:.1f} s (P2D) against {e['cost_s']['lora_mined']:.1f} s (LoRA)")
        if k == "R5" and e["speedup"] is not None:
            detail = f"{e['speedup']:.2f}x without searches, {e['speedup_with_search']:.2f}x with them"
        lines.append(f"- {k} {e['name']}: **{e['result']}**" + (f" ({detail})" if detail else "") + ".")
    held = [k for k in RULES if r[k]["result"] == "holds"]
    failed = [k for k in RULES if r[k]["result"] == "fails"]
    lines += ["", f"Holds: {', '.join(held) or 'none'}. Fails: {', '.join(failed) or 'none'}. "
              f"Inconclusive or not measured: {', '.join(k for k in RULES if k not in held + failed) or 'none'}."]
    return "\n".join(lines)


# ------------------------------------------------------------------ why
# Not rules: the grid's other paired comparisons, read to say *why* the claim holds or fails. Each is (question,
# arm a, arm b); a pair is read only when both arms ran.
FULL_MINED = "full FT, mined 10%"
LORA_POOL = "LoRA r16, whole pool"
WHY_PAIRS = (
    ("Does the mined 10% hold the task? (full fine-tuning on it against full fine-tuning on the whole pool)",
     FULL_MINED, FULL),
    ("What does training only the scored heads cost on the same data? (P2D against full fine-tuning on the mined "
     "10%)", P2D, FULL_MINED),
    ("Do random heads do as well on the same data? (random heads against full fine-tuning on the mined 10%)",
     RANDOM_HEADS, FULL_MINED),
    ("Does LoRA lose anything on the mined 10%? (LoRA r16 mined against LoRA r16 on the whole pool)",
     LORA_MINED, LORA_POOL),
)


def _mean(xs: List[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def why(report: Dict, n_boot: int = 2000, seed: int = 0) -> Dict:
    """The grid's diagnostic comparisons (paired CIs per seed, read as better / worse / no difference shown) and
    P2D's mining recall against its ceiling: where the gap to full fine-tuning comes from."""
    pairs = []
    for question, a, b in WHY_PAIRS:
        cs = _pairs(report, a, b, n_boot, seed)
        for c in cs:
            c["outcome"] = _better(c)
        if cs:
            pairs.append({"question": question, "a": a, "b": b, "per_seed": cs})
    p2d = list(_rows(report, P2D).values())
    recall = _mean([r["mining_recall"] for r in p2d if "mining_recall" in r])
    ceiling = report.get("composition", {}).get("recall_ceiling")
    out = {"pairs": pairs, "p2d_mining_recall": recall, "recall_ceiling": ceiling}
    out["text"] = why_text(out)
    return out


def why_text(w: Dict) -> str:
    """The diagnostic comparisons in sentences (markdown)."""
    lines = ["**Why, from the grid** (diagnostics, not rules; paired 95% CIs of Q_a - Q_b per seed):", ""]
    if w.get("p2d_mining_recall") is not None:
        ceil = w.get("recall_ceiling")
        lines.append(f"- P2D's mining found {w['p2d_mining_recall']:.2f} of the pool's target records on average "
                     f"(ceiling at this fraction {ceil:.2f})." if ceil is not None else
                     f"- P2D's mining found {w['p2d_mining_recall']:.2f} of the pool's target records on average.")
    for p in w["pairs"]:
        outcomes = [c["outcome"] for c in p["per_seed"]]
        summary = ("no difference shown in any seed" if all(o == "no difference shown" for o in outcomes) else
                   f"{p['a']} better in every seed" if all(o == "better" for o in outcomes) else
                   f"{p['a']} worse in every seed" if all(o == "worse" for o in outcomes) else "mixed across seeds")
        lines.append(f"- {p['question']}: {summary} (" + "; ".join(_fmt_ci(c) for c in p["per_seed"]) + ").")
    return "\n".join(lines)
