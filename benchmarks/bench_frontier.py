"""The cost-quality frontier on the fair test's pool: how many heads, which heads, against LoRA ranks and full FT.

Every point trains on P2D's mined 10% of the capitals-in-a-mix pool (the fair test's pool; one mining, with the
gradient scorer's 10% heads, shared by every point), except the "pool" part, which trains on the whole pool:

  heads-F   trainable-head fraction F (5, 10, 25, 50%; attention only, exact gradient) with heads chosen by every
            scorer we ship (gradient, apt, hifi, alps) and by random draws (uniform, and spread: as even a count per
            layer as the fraction allows); heads-10 adds the sparse-mode gradient for the gradient scorer, and every
            heads-F ends with the best scorer (highest seed-0 dev Q at 10%) restricted to the top half of the layers
  heads-100 every head trainable (attention only)
  lora      LoRA r4, r16, r64 on q, k, v, o (peft)
  full      full fine-tuning
  pool      on the whole pool: the best scorer's 10% heads, LoRA r16, full fine-tuning

Settings: one shared grid per family, the same for every point of it (GRIDS). The learning rate of a head fraction is
chosen on dev with the gradient scorer's point at seed 0 and used by every chooser at that fraction (one search per
fraction, not per point, to fit the budget); LoRA ranks and full fine-tuning choose their own. The whole-pool LoRA
and full fine-tuning take the committed fair-test search's choice (fair-search-smollm2.json) for smollm2.
Nothing is chosen on the held-out items. Seeds: 3 for head and LoRA points (seed k orders the data, initialises
LoRA and draws the random heads; the scorers' heads are fixed), 1 for full fine-tuning.

Cost per point, measured in this process, one point at a time: wall and CPU seconds per optimizer step, training
time, peak and average RSS above the RSS before the model copy (CPU; the CUDA allocator's peak on a GPU), trainable
parameters, selection time (scoring, plus mining for the mined data), and time to 97% of the point's final dev
quality (seed 0: dev evaluated after each quarter of the steps; the dev passes are not counted as training).

Each part writes frontier-<model>-<part>.json with its provenance and is skipped when its file exists (resumable;
--force reruns it). ``--part report`` (run last; ``--part all`` runs everything then it) writes frontier-<model>.md,
.json (every point, plus PEFT method-comparison-style records) and .png (quality with 95% CIs against time per step,
Pareto front drawn).

    python benchmarks/bench_frontier.py --part all [--threads 2] [--pool-size 600] [--eval-size 200]
    python benchmarks/bench_frontier.py --model tiny --part all --out /tmp/f    # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCORERS = ("gradient", "apt", "hifi", "alps")
CHOOSERS = SCORERS + ("random", "random-spread")
FRACTIONS = (0.05, 0.10, 0.25, 0.50)
LORA_RANKS = (4, 16, 64)
PARTS = ("heads-10", "heads-5", "heads-25", "heads-50", "heads-100", "lora", "full", "pool")
# (epochs, lr) candidates, one grid per family; on the mined 10% (60 records at pool 600: 8 steps an epoch). Heads and
# LoRA train 6 epochs, between the 4 and 8 the fair test's search chose for its head and LoRA arms (8 would take the
# frontier past its 90 minutes on 2 cores); the learning rates are the two that search found best for them
GRIDS = {"heads": [(6, 3e-4), (6, 1e-3)], "lora": [(6, 3e-4), (6, 1e-3)], "full": [(2, 3e-5), (2, 1e-4)],
         "heads@pool": [(1, 3e-4), (1, 1e-3)], "lora@pool": [(2, 3e-4), (2, 1e-3)], "full@pool": [(1, 1e-4)]}
TINY_GRIDS = {k: [(1, 1e-3), (2, 3e-3)] for k in GRIDS}
FAIR_SEARCH = os.path.join(OUT, "fair-search-smollm2.json")
TARGET_SHARE = 0.97  # time to this share of the point's final dev quality


@dataclass(frozen=True)
class Point:
    """One point of the frontier: what trains (family), on which data, with which heads."""

    name: str
    family: str  # "heads", "lora" or "full"
    data: str = "mined"  # "mined" or "pool"
    chooser: Optional[str] = None  # heads: a scorer, "random" or "random-spread"
    fraction: Optional[float] = None  # heads: share of all query heads trained
    layers: str = "all"  # heads: "all" or "top-half"
    grad: str = "exact"
    rank: Optional[int] = None  # lora
    seeds: int = 3

    @property
    def grid_key(self) -> str:
        return self.family if self.data == "mined" else f"{self.family}@pool"


def points_of(part: str, best: str, seeds: int) -> List[Point]:
    """The points a part runs, in order (``best``: the scorer the top-half and whole-pool points use)."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; parts: {PARTS}")
    if part.startswith("heads-") and part != "heads-100":
        f = int(part.split("-")[1]) / 100
        pts = [Point(f"{c} {part[6:]}%", "heads", chooser=c, fraction=f, seeds=seeds) for c in CHOOSERS]
        if part == "heads-10":
            pts.append(Point("gradient 10% (sparse mode)", "heads", chooser="gradient", fraction=f, grad="sparse",
                             seeds=seeds))
        else:  # the best scorer is known once heads-10 has run
            pts.append(Point(f"{best} {part[6:]}% top half", "heads", chooser=best, fraction=f, layers="top-half",
                             seeds=seeds))
        return pts
    if part == "heads-100":
        return [Point("all heads 100%", "heads", chooser="gradient", fraction=1.0, seeds=seeds)]
    if part == "lora":
        return [Point(f"LoRA r{r}", "lora", rank=r, seeds=seeds) for r in LORA_RANKS]
    if part == "full":
        return [Point("full FT", "full", seeds=1)]
    if part == "pool":
        return [Point(f"{best} 10%, whole pool", "heads", data="pool", chooser=best, fraction=0.1, seeds=seeds),
                Point("LoRA r16, whole pool", "lora", data="pool", rank=16, seeds=seeds),
                Point("full FT, whole pool", "full", data="pool", seeds=1)]
    raise AssertionError(part)


# ------------------------------------------------------------------ setup: task, scores, mined data
def build(args):
    """(model, task, pad id) for --model."""
    from headsparse.recipes.data import pad_id_of

    if args.model == "tiny":
        from headsparse.recipes.tasks import synthetic_task, tiny_llama

        model = tiny_llama(seed=0)
        task = synthetic_task(n_pool=args.pool_size, n_targets=max(1, args.pool_size // 10), n_eval=args.eval_size,
                              seed=0, n_dev=args.dev_size)
    else:
        from headsparse.recipes.fair_pool import capital_mix_records, description
        from headsparse.recipes.tasks import load_causal_lm, smollm2_dir, task_from_records

        model, tok = load_causal_lm(str(smollm2_dir()))
        recs = capital_mix_records(tok, n_pool=args.pool_size, n_eval=args.eval_size, n_dev=args.dev_size, seed=0)
        comp = recs.pop("composition")
        task = task_from_records(recs, tok, vocab_size=model.config.vocab_size, max_tokens=48,
                                 name=f"capitals-in-a-mix, pool {args.pool_size}", description=description(comp))
    return model, task, pad_id_of(model, None)


def setup(args, model, task, pad: int) -> Dict:
    """Every scorer's head scores on the target set and P2D's mined 10% (gradient scorer's heads); cached."""
    path = os.path.join(args.out, f"frontier-{args.model}-setup.json")
    key = {"pool": len(task.pool), "eval": len(task.eval), "dev": len(task.dev), "model": args.model}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        if s["key"] == key:
            return s
        raise SystemExit(f"bench_frontier: {path} was made for {s['key']}, not {key}: remove it or use another --out")
    from headsparse.plan import HeadPlan
    from headsparse.recipes.data import as_examples
    from headsparse.recipes.mining.core import mine
    from headsparse.recipes.pipeline import environment, score_heads_for_pipeline

    target = as_examples(task.target, "target")
    pool = as_examples(task.pool, "pool")
    scores, times = {}, {}
    for m in SCORERS:
        t0 = time.perf_counter()
        sc, _ = score_heads_for_pipeline(model, target, 16, m, seed=0)
        times[m] = time.perf_counter() - t0
        scores[m] = sc.tolist()
        print(f"[frontier] scored heads with {m} in {times[m]:.1f} s", flush=True)
    ref = HeadPlan.for_model(model, "train")
    plan = HeadPlan.from_scores(scores["gradient"], fraction=0.1, num_kv_heads=ref.num_kv_heads,
                                model_family=ref.model_family)
    mres = mine(model, pool, plan, method="p2d", fraction=0.1, target=target, batch_size=16, seed=0,
                signature="fwd")
    idx = sorted(int(i) for i in mres.indices)
    recall = (sum(1 for i in idx if task.is_target[i]) / max(1, sum(task.is_target))
              if task.is_target is not None else None)
    from headsparse.recipes.pipeline import evaluate

    base = evaluate(model, task.eval, 32, pad)
    s = {"key": key, "scores": scores, "score_s": times, "mined_indices": idx, "mine_s": mres.time_s,
         "mining_recall": recall, "base": {"q": base.accuracy, "correct": [int(c) for c in base.correct]},
         "environment": environment()}
    _write_json(path, s)
    return s


# ------------------------------------------------------------------ one point
def head_plan(model, setup_: Dict, p: Point, seed: int):
    """The HeadPlan of a heads point at ``seed`` (the scorers' heads are fixed; random draws change with seed)."""
    import torch

    from headsparse.plan import HeadPlan

    ref = HeadPlan.for_model(model, "train")
    L, H = ref.num_layers, ref.num_q_heads
    layers = range(L // 2, L) if p.layers == "top-half" else None
    kw = dict(num_kv_heads=ref.num_kv_heads, model_family=ref.model_family)
    if p.chooser in SCORERS:
        scores = torch.tensor(setup_["scores"][p.chooser])
    else:
        g = torch.Generator().manual_seed(10_000 + seed)
        scores = torch.rand((L, H), generator=g)
        if p.chooser == "random-spread":  # as even a count per layer as the fraction allows, heads drawn per layer
            n = HeadPlan.from_scores(scores, fraction=p.fraction, **kw).count("train")
            per = [n // L + (1 if i < n % L else 0) for i in range(L)]
            order = torch.randperm(L, generator=g).tolist()  # which layers get the extra head
            quota = {layer: per[rank] for rank, layer in enumerate(order)}
            boost = torch.zeros((L, H))
            for layer in range(L):
                boost[layer, torch.randperm(H, generator=g)[:quota[layer]]] = 2.0
            scores = scores + boost
    return HeadPlan.from_scores(scores, fraction=p.fraction, layers=layers, **kw)


def train_one(model, p: Point, data, plan, epochs: int, lr: float, seed: int, curve_items=None, evaluate=None):
    """Train a copy for one (point, seed, epochs, lr) as the fair test trains its arms (experiment.trainee and
    tune_arm); returns (model, TuneResult, cost dict, dev curve)."""
    import torch

    from headsparse.recipes.experiment import trainee, tune_arm
    from _rss import RssMeter

    steps = epochs * math.ceil(len(data) / 8)
    curve, spent = [], {"wall": 0.0, "cpu": 0.0}
    on_step = None
    if curve_items is not None:
        marks = {max(1, round(steps * q / 4)) for q in (1, 2, 3, 4)}

        def on_step(step, _loss):
            if step in marks:
                w0, c0 = time.perf_counter(), time.process_time()
                q = evaluate(m, curve_items).accuracy
                spent["wall"] += time.perf_counter() - w0
                spent["cpu"] += time.process_time() - c0
                m.train()
                curve.append({"step": step, "train_s": time.perf_counter() - t0 - spent["wall"], "dev_q": q})

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    with RssMeter() as mem:
        m = trainee(model, p.family, p.rank or 16)
        t0 = time.perf_counter()
        res = tune_arm(m, p.family, plan, data, epochs=epochs, lr=lr, seed=seed, batch_size=8, warmup_ratio=0.1,
                       grad=p.grad, progress=False, on_step=on_step)
    train_s, cpu_s = res.time_s - spent["wall"], res.cpu_s - spent["cpu"]
    cost = {"train_s": train_s, "cpu_s": cpu_s, "steps": res.steps, "s_per_step": train_s / max(1, res.steps),
            "cpu_s_per_step": cpu_s / max(1, res.steps), "trainable_params": res.trainable_params,
            "rss_peak_delta": mem.peak_delta, "rss_avg_delta": mem.avg_delta, "rss_method": mem.method}
    if cuda:
        cost["cuda_peak_delta"] = torch.cuda.max_memory_allocated() - base_alloc
    return m, res, cost, curve


def time_to(curve: List[Dict], share: float = TARGET_SHARE) -> Optional[float]:
    """Training seconds until the dev quality first reached ``share`` of its final value (None: no curve)."""
    if not curve:
        return None
    final = curve[-1]["dev_q"]
    return next(c["train_s"] for c in curve if c["dev_q"] >= share * final)


def run_point(model, task, pad, setup_: Dict, p: Point, settings: Dict, args) -> Dict:
    """Every seed of one point (choosing its lr on dev first when ``settings`` has none for it)."""
    from headsparse.recipes.data import as_examples
    from headsparse.recipes.pipeline import evaluate as _evaluate

    def evaluate(m, items):
        return _evaluate(m, items, 32, pad)

    pool = as_examples(task.pool, "pool")
    data = pool if p.data == "pool" else [pool[i] for i in setup_["mined_indices"]]
    select_s = setup_["score_s"].get(p.chooser, 0.0) + (setup_["mine_s"] if p.data == "mined" else 0.0)
    runs = []
    chosen = settings.get(p.name)
    for k in range(p.seeds):
        seed = k
        plan = head_plan(model, setup_, p, seed) if p.family == "heads" else None
        if chosen is None:  # search this point's grid at seed 0; the chosen candidate is its seed-0 run
            cands = []
            for epochs, lr in args.grids[p.grid_key]:
                m, res, cost, curve = train_one(model, p, data, plan, epochs, lr, seed, task.dev, evaluate)
                dev = curve[-1]["dev_q"] if curve else evaluate(m, task.dev).accuracy
                cands.append((dev, epochs, lr, m, res, cost, curve))
                print(f"[frontier] {p.name}: {epochs} ep @ {lr:g} -> dev {dev:.3f} ({cost['train_s']:.1f} s)",
                      flush=True)
            best = max(cands, key=lambda c: c[0])
            chosen = {"epochs": best[1], "lr": best[2], "source": "this point's dev search",
                      "tried": [{"epochs": c[1], "lr": c[2], "dev_q": c[0], "train_s": c[5]["train_s"]}
                                for c in cands],
                      "search_s": sum(c[5]["train_s"] for c in cands if c is not best)}
            _, _, _, m, res, cost, curve = best
            del cands
        else:
            m, res, cost, curve = train_one(model, p, data, plan, chosen["epochs"], chosen["lr"], seed,
                                            task.dev if k == 0 else None, evaluate)
        ev = evaluate(m, task.eval)
        del m
        runs.append({"seed": seed, "q": ev.accuracy, "correct": [int(c) for c in ev.correct],
                     "dev_curve": curve, "time_to_97_s": time_to(curve), **cost,
                     "plan": plan.to_dict() if plan is not None else None,
                     "query_heads": plan.count("train") if plan is not None else None})
        print(f"[frontier] {p.name} seed {seed}: Q {ev.accuracy:.3f}, {cost['s_per_step']:.2f} s/step, "
              f"peak RSS +{cost['rss_peak_delta'] / 2**20:.0f} MiB", flush=True)
    settings[p.name] = chosen
    return {"point": asdict(p), "settings": chosen, "select_s": select_s, "data_n": len(data), "runs": runs}


# ------------------------------------------------------------------ parts
def _write_json(path: str, obj) -> None:
    from headsparse._atomic import atomic_write_text

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _load1() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def part_path(args, part: str) -> str:
    return os.path.join(args.out, f"frontier-{args.model}-{part}.json")


def best_scorer(args) -> str:
    """The scorer whose 10% point reached the highest final dev quality at seed 0 (heads-10 must have run)."""
    path = part_path(args, "heads-10")
    if not os.path.exists(path):
        raise SystemExit("bench_frontier: run --part heads-10 first: it picks the best scorer (on dev) that the "
                         "top-half and whole-pool points use")
    with open(path, encoding="utf-8") as f:
        return _best_of(json.load(f)["points"])


def _best_of(points: List[Dict]) -> str:
    dev = {r["point"]["chooser"]: r["runs"][0]["dev_curve"][-1]["dev_q"] for r in points
           if r["point"]["chooser"] in SCORERS and r["point"]["grad"] == "exact" and r["point"]["layers"] == "all"
           and r["runs"][0]["dev_curve"]}
    return max(sorted(dev), key=lambda s: dev[s])


def run_part(args, part: str, model, task, pad, setup_) -> Dict:
    from headsparse.recipes.pipeline import environment

    best = best_scorer(args) if part not in ("heads-10", "heads-100", "lora", "full") else "gradient"
    pts = points_of(part, best, args.seeds)
    env = environment()
    load0, t0 = _load1(), time.perf_counter()
    settings: Dict[str, Dict] = {}
    if part == "pool" and args.model == "smollm2" and os.path.exists(FAIR_SEARCH):
        with open(FAIR_SEARCH, encoding="utf-8") as f:
            fair = json.load(f)
        src = f"fair-search-smollm2.json (commit {str(fair['environment'].get('commit', '?'))[:7]})"
        for name in ("LoRA r16, whole pool", "full FT, whole pool"):  # the fair test's arms of the same name
            arm = fair["settings"][name]
            settings[name] = {"epochs": arm["epochs"], "lr": arm["lr"], "source": src,
                              "search_s": arm.get("search_s")}
    out = []
    shared = None
    for p in pts:
        if p.family == "heads" and p.data == "mined" and p.fraction < 1 and shared is not None:
            settings.setdefault(p.name, {**shared, "source": f"shared: {pts[0].name}'s dev search",
                                         "search_s": 0.0, "tried": []})
        out.append(run_point(model, task, pad, setup_, p, settings, args))
        if shared is None and p.family == "heads" and p.data == "mined":
            shared = {k: settings[p.name][k] for k in ("epochs", "lr")}
    if part == "heads-10":  # the best scorer is known now: its 10% heads restricted to the top half, same lr
        best = _best_of(out)
        p = Point(f"{best} 10% top half", "heads", chooser=best, fraction=0.1, layers="top-half", seeds=args.seeds)
        settings[p.name] = {**shared, "source": f"shared: {pts[0].name}'s dev search", "search_s": 0.0, "tried": []}
        out.append(run_point(model, task, pad, setup_, p, settings, args))
    rep = {"part": part, "best_scorer": best, "points": out, "wall_s": time.perf_counter() - t0,
           "load_average_start": load0, "load_average_end": _load1(), "environment": env,
           "sizes": {"pool": len(task.pool), "eval": len(task.eval), "dev": len(task.dev)}, "threads": args.threads}
    _write_json(part_path(args, part), rep)
    return rep


# ------------------------------------------------------------------ report
def summarise(args) -> Dict:
    """Every point of every part with its quality (95% CI over items of the seed-mean correctness), cost and
    PEFT-style record; the scorer-against-random comparisons; the Pareto front."""
    from headsparse.recipes.stats import bootstrap_ci, paired_bootstrap_ci, seed_interval

    parts, rows = {}, []
    for part in PARTS:
        path = part_path(args, part)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                parts[part] = json.load(f)
    if not parts:
        raise SystemExit(f"bench_frontier: no part has run yet in {args.out}")
    with open(os.path.join(args.out, f"frontier-{args.model}-setup.json"), encoding="utf-8") as f:
        setup_ = json.load(f)
    for part, rep in parts.items():
        for r in rep["points"]:
            runs = r["runs"]
            per_item = [sum(c) / len(runs) for c in zip(*[x["correct"] for x in runs])]
            mean = lambda k: sum(x[k] for x in runs) / len(runs)  # noqa: E731
            row = {"part": part, "name": r["point"]["name"], **r["point"], "seeds_run": len(runs),
                   "q": sum(per_item) / len(per_item), "q_ci": bootstrap_ci(per_item, n_boot=2000).as_dict(),
                   "q_seeds": seed_interval([x["q"] for x in runs]).as_dict() if len(runs) > 1 else None,
                   "per_item": per_item, "epochs": r["settings"]["epochs"], "lr": r["settings"]["lr"],
                   "settings_source": r["settings"].get("source"), "search_s": r["settings"].get("search_s"),
                   "s_per_step": mean("s_per_step"), "cpu_s_per_step": mean("cpu_s_per_step"),
                   "train_s": mean("train_s"), "steps": runs[0]["steps"], "trainable_params": runs[0]["trainable_params"],
                   "query_heads": runs[0]["query_heads"], "rss_peak_mib": mean("rss_peak_delta") / 2**20,
                   "rss_avg_mib": mean("rss_avg_delta") / 2**20, "time_to_97_s": runs[0]["time_to_97_s"],
                   "select_s": r["select_s"], "data_n": r["data_n"], "commit": rep["environment"].get("commit"),
                   "load_average_start": rep["load_average_start"]}
            rows.append(row)
    # the scorer answer: every scorer against each random chooser at the same fraction, paired over items and seeds
    by = {(r["chooser"], r["fraction"], r["layers"], r["grad"], r["data"]): r for r in rows if r["family"] == "heads"}
    vs_random = []
    for (c, f, layers, grad, data), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if c not in SCORERS or layers != "all" or grad != "exact" or data != "mined" or f >= 1:
            continue
        for rnd in ("random", "random-spread"):
            o = by.get((rnd, f, "all", "exact", "mined"))
            if o:
                ci = paired_bootstrap_ci(r["per_item"], o["per_item"], n_boot=2000).as_dict()
                vs_random.append({"scorer": c, "random": rnd, "fraction": f, **ci,
                                  "reading": "better" if ci["low"] > 0 else ("worse" if ci["high"] < 0 else
                                                                             "no difference shown")})
    front = pareto(rows, "s_per_step")
    front_total = pareto(rows, "train_s")
    for r in rows:
        r["on_front_step"] = r["name"] in front
        r["on_front_total"] = r["name"] in front_total
    return {"rows": rows, "vs_random": vs_random, "pareto_step": front, "pareto_total": front_total,
            "setup": {k: setup_[k] for k in ("score_s", "mine_s", "mining_recall", "key")},
            "base": {"q": setup_["base"]["q"], "q_ci": bootstrap_ci(setup_["base"]["correct"], n_boot=2000).as_dict()},
            "parts": {p: {"commit": rep["environment"].get("commit"), "date_utc": rep["environment"].get("date_utc"),
                          "wall_s": rep["wall_s"], "load_average_start": rep["load_average_start"],
                          "load_average_end": rep["load_average_end"], "threads": rep["threads"]}
                      for p, rep in parts.items()},
            "environment": {k: next(iter(parts.values()))["environment"].get(k)
                            for k in ("device", "python", "torch", "transformers", "headsparse")},
            "total_wall_s": sum(rep["wall_s"] for rep in parts.values()),
            "peft_records": [peft_record(r) for r in rows]}


def pareto(rows: List[Dict], cost: str) -> List[str]:
    """Names of the points no other point beats on both cost (lower) and mean quality (higher)."""
    front, best_q = [], -1.0
    for r in sorted(rows, key=lambda r: (r[cost], -r["q"])):
        if r["q"] > best_q:
            front.append(r["name"])
            best_q = r["q"]
    return front


def peft_record(r: Dict) -> Dict:
    """A point in the field layout of PEFT's method comparison (run_info / train_info / meta_info), plus our
    selection time. Memory is CPU RSS here (PEFT records accelerator memory); both are named."""
    return {"run_info": {"experiment_name": f"headsparse/{r['name']}", "total_time": r["train_s"] + r["select_s"],
                         "train_config": {"epochs": r["epochs"], "lr": r["lr"], "batch_size": 8,
                                          "data": r["data"], "examples": r["data_n"]},
                         "peft_config": ({"peft_type": "LORA", "r": r["rank"], "lora_alpha": 2 * r["rank"],
                                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
                                         if r["family"] == "lora" else None),
                         "headsparse_config": ({"chooser": r["chooser"], "fraction": r["fraction"],
                                                "layers": r["layers"], "grad": r["grad"]}
                                               if r["family"] == "heads" else None),
                         "error_msg": ""},
            "train_info": {"accelerator_memory_max": None, "accelerator_memory_reserved_avg": None,
                           "cpu_rss_max": int(r["rss_peak_mib"] * 2**20), "cpu_rss_avg": int(r["rss_avg_mib"] * 2**20),
                           "train_time": r["train_s"], "selection_time": r["select_s"],
                           "num_trainable_params": r["trainable_params"], "status": "success",
                           "metrics": [{"test accuracy": r["q"], "seeds": r["seeds_run"]}]}}


def markdown(s: Dict, args) -> str:
    rows = s["rows"]
    lines = [f"# Cost-quality frontier: head training against LoRA and full fine-tuning ({args.model})", "",
             "Parts (each its own process and provenance): " + "; ".join(
                 f"{p} commit {str(v['commit'])[:7]} {v['date_utc']} {v['wall_s'] / 60:.1f} min, load "
                 f"{v['load_average_start']} -> {v['load_average_end']}" for p, v in s["parts"].items()) + ".",
             f"Total wall time of the parts: {s['total_wall_s'] / 60:.1f} min. Device {s['environment']['device']}; "
             f"Python {s['environment']['python']}, torch {s['environment']['torch']}, transformers "
             f"{s['environment']['transformers']}, headsparse {s['environment']['headsparse']}.", "",
             *([f"**Partial: parts not run yet: {', '.join(p for p in PARTS if p not in s['parts'])}** "
                f"(`--part all` runs them and rewrites this report).", ""]
               if any(p not in s["parts"] for p in PARTS) else []),
             f"Untuned base model: Q {s['base']['q']:.3f} [{s['base']['q_ci']['low']:.3f}, "
             f"{s['base']['q_ci']['high']:.3f}]. P2D's mined 10% (gradient scorer's heads): "
             f"{s['setup']['key']['pool'] // 10} records, target recall {_num2(s['setup']['mining_recall'])}. "
             f"Scoring s: " + ", ".join(f"{k} {v:.1f}" for k, v in s["setup"]["score_s"].items()) +
             f"; mining {s['setup']['mine_s']:.1f} s.", "",
             "Q: held-out accuracy averaged over seeds, 95% bootstrap CI over items of the seed-mean correctness. "
             "Cost: wall s per optimizer step and training s (mean over seeds, dev passes excluded), peak / average "
             "RSS above the RSS before the model copy (CPU), trainable parameters, selection s (scoring, plus "
             "mining for the mined 10%), t97 = training s to 97% of the point's final dev Q (seed 0, quarters). "
             "Exact mode saves the frozen heads' weight gradients and everything below the gradient horizon; above "
             "it their attention backward still runs. P = on the Pareto front of (s/step, Q); T = of (train s, Q).",
             "", "| point | data | epochs @ lr (source) | query heads | trainable params | Q [95% CI] | s/step | "
             "train s | peak RSS MiB | avg RSS MiB | select s | t97 s | front |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: r["s_per_step"]):
        ci = r["q_ci"]
        lines.append(f"| {r['name']} | {r['data']} {r['data_n']} | {r['epochs']} @ {r['lr']:g} "
                     f"({r['settings_source']}) | {r['query_heads'] if r['query_heads'] is not None else '-'} | "
                     f"{r['trainable_params']:,} | {r['q']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] | "
                     f"{r['s_per_step']:.2f} | {r['train_s']:.1f} | {r['rss_peak_mib']:.0f} | {r['rss_avg_mib']:.0f} | "
                     f"{r['select_s']:.1f} | {_num(r['time_to_97_s'])} | "
                     f"{'P' if r['on_front_step'] else ''}{'T' if r['on_front_total'] else ''} |")
    lines += ["", "## Scorers against random heads (paired over the same items and seeds)", "",
              "| fraction | scorer | against | Q_scorer - Q_random [95% CI] | reading |", "| --- | --- | --- | --- | --- |"]
    for c in s["vs_random"]:
        lines.append(f"| {c['fraction']:.0%} | {c['scorer']} | {c['random']} | {c['estimate']:+.3f} "
                     f"[{c['low']:+.3f}, {c['high']:+.3f}] | {c['reading']} |")
    lines += ["", f"Pareto front (s/step, Q): {', '.join(s['pareto_step'])}.",
              f"Pareto front (train s, Q): {', '.join(s['pareto_total'])}.", ""]
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _num2(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def plot(s: Dict, path: str) -> Optional[str]:
    from headsparse.recipes import _cost_plot

    plt = _cost_plot.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    marker = {"heads": "o", "lora": "s", "full": "D"}
    seen = set()
    _cost_plot.base_band(ax, s["base"]["q"], s["base"]["q_ci"], f"base (untuned) {s['base']['q']:.3f}")
    colors = {"heads": "tab:blue", "lora": "tab:orange", "full": "tab:green"}
    for r in s["rows"]:
        fam = r["family"] + (" (whole pool)" if r["data"] == "pool" else "")
        _cost_plot.point(ax, r["s_per_step"], r["q"], r["q_ci"], fmt=marker[r["family"]], capsize=2,
                         color=colors[r["family"]], mfc="none" if r["data"] == "pool" else colors[r["family"]],
                         label=fam if fam not in seen else None)
        seen.add(fam)
    front = [r for r in sorted(s["rows"], key=lambda r: r["s_per_step"]) if r["on_front_step"]]
    ax.plot([r["s_per_step"] for r in front], [r["q"] for r in front], "k--", lw=1, label="Pareto front")
    return _cost_plot.save(plt, fig, ax, "held-out Q (95% CI) against wall s per optimizer step", path,
                           xlabel="wall s per optimizer step (log)")


def report(args) -> Dict[str, str]:
    s = summarise(args)
    s["environment_report"] = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    stem = os.path.join(args.out, f"frontier-{args.model}")
    _write_json(stem + ".json", s)
    from headsparse._atomic import atomic_write_text

    atomic_write_text(stem + ".md", markdown(s, args))
    paths = {"json": stem + ".json", "md": stem + ".md"}
    png = plot(s, stem + ".png")
    if png:
        paths["png"] = png
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", help=f"one of {PARTS}, 'all' (every part not yet run, then the report) "
                                                 f"or 'report'")
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-size", type=int, default=None, help="default 600 (tiny: 60)")
    ap.add_argument("--eval-size", type=int, default=None, help="default 200 (tiny: 16)")
    ap.add_argument("--dev-size", type=int, default=None, help="default 100 (tiny: 16)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--force", action="store_true", help="rerun a part whose file exists")
    args = ap.parse_args(argv)
    tiny = args.model == "tiny"
    args.pool_size = args.pool_size or (60 if tiny else 600)
    args.eval_size = args.eval_size or (16 if tiny else 200)
    args.dev_size = args.dev_size or (16 if tiny else 100)
    args.grids = TINY_GRIDS if tiny else GRIDS
    if args.part not in PARTS + ("all", "report"):
        ap.error(f"--part must be one of {PARTS + ('all', 'report')}, got {args.part!r}")
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    if args.part != "report":
        model, task, pad = build(args)
        setup_ = setup(args, model, task, pad)
        todo = PARTS if args.part == "all" else (args.part,)
        for part in todo:
            if os.path.exists(part_path(args, part)) and not args.force:
                print(f"[frontier] {part}: done already ({part_path(args, part)}); --force reruns it", flush=True)
                continue
            print(f"[frontier] part {part}", flush=True)
            run_part(args, part, model, task, pad, setup_)
    if args.part in ("all", "report"):
        paths = report(args)
        print("report: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
