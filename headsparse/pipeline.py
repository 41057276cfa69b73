"""``headsparse run``: score heads, mine data, tune the heads, evaluate; against full fine-tuning.

Stages, each timed with ``time.perf_counter`` on the same machine:

1. ``warmup`` (untimed in AER): one forward + backward per model kind, so
   lazy initialisation does not land in the first timed stage.
2. ``base_eval``: quality of the untouched model (for reference).
3. ``full``: full-data, full-parameter fine-tuning (AdamW, same epochs, batch
   size and schedule as the methods) -> T_full, Q_full.
4. ``score``: head scores on the small target set -> a :class:`HeadPlan`
   that trains the top ``head_fraction`` of heads (the rest frozen).
5. per mining method: ``mine`` (T_mine) -> the selected ``fraction`` of the
   pool; ``tune`` the plan's heads on it (T_train); ``eval`` (Q). The AER uses
   T_select = T_score + T_mine (head scoring is part of the selection latency)
   and T_train; see :mod:`headsparse.metrics`.

The report (markdown + JSON, written to a temporary file and renamed) holds
every part of every number, the device, versions, commit and date.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ._atomic import atomic_path, atomic_write_text
from .metrics import aer
from .provenance import provenance
from .mining.core import METHODS, mine
from .mining.data import as_examples, collate, model_device, pad_id_of
from .mining.features import patched_for, probe
from .plan import HeadPlan
from .scoring import score_heads
from .tuning.core import tune

PIPELINE_METHODS = METHODS + ("all",)  # "all": head-sparse tuning on the whole pool (no mining)


# ----------------------------------------------------------------------- task
@dataclass
class Task:
    """A mining/tuning task.

    pool: training candidates (examples); is_target: which pool examples are
    target-task examples (for mining precision/recall; may be None); target:
    the small target set (head scoring, P2D/LESS prototypes); eval: held-out
    multiple-choice items {"input_ids": prompt, "choices": [token id per
    answer], "answer": index}; quality = accuracy of the answer tokens' logits
    after the prompt.
    """

    name: str
    pool: List[Dict]
    target: List[Dict]
    eval: List[Dict]
    is_target: Optional[List[bool]] = None
    description: str = ""


def evaluate(model, items: Sequence[Dict], batch_size: int = 16, pad_id: Optional[int] = None,
             detail: bool = False):
    """Accuracy of the multiple-choice ``items`` (next-token logits of the choices after the prompt).

    With ``detail=True`` returns ``(accuracy, answer_nll)``, where answer_nll is
    the mean negative log-likelihood (full-vocabulary softmax) of the correct
    answer token: it also measures whether the model learnt to answer with a
    label word at all, which the accuracy between the choices does not.
    """
    if not items:
        raise ValueError("eval items are empty")
    pad = pad_id_of(model, pad_id)
    dev = model_device(model)
    was = model.training
    model.eval()
    correct, nll = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            b = collate([{"input_ids": it["input_ids"]} for it in chunk], pad, dev)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            last = b["attention_mask"].sum(1) - 1
            for r, it in enumerate(chunk):
                row = logits[r, last[r]].float()
                pred = max(range(len(it["choices"])), key=lambda c: float(row[it["choices"][c]]))
                correct += int(pred == it["answer"])
                nll -= float(torch.log_softmax(row, -1)[it["choices"][it["answer"]]])
    model.train(was)
    acc = correct / len(items)
    return (acc, nll / len(items)) if detail else acc


# -------------------------------------------------------------------- scoring
def score_heads_for_pipeline(model, data, batch_size: int = 8, method: str = "gradient") -> tuple:
    """(scores (layers, heads), description of the scorer used) from :func:`headsparse.score_heads`.

    ``method`` is any scoring method (default "gradient" = Michel et al.'s gate
    gradient), run on the target set; its errors propagate (no fallback).
    """
    examples = as_examples(data, "data")
    pad = pad_id_of(model, None)
    dev = model_device(model)
    batches = [collate(examples[i:i + batch_size], pad, dev) for i in range(0, len(examples), batch_size)]
    hs_scores = score_heads(model, batches, method=method)
    return hs_scores.scores.float(), f"headsparse.score_heads(method={method!r})"


# ------------------------------------------------------------------ config
@dataclass
class RunConfig:
    methods: Sequence[str] = ("p2d", "random")
    fraction: float = 0.1  # share of the pool mined
    head_fraction: float = 0.1  # share of heads trained
    epochs: int = 2
    batch_size: int = 8
    lr_full: float = 3e-5
    lr_heads: float = 1e-3
    grad: str = "exact"
    seed: int = 0
    probe_batch_size: int = 16
    eval_batch_size: int = 32
    progress: bool = True
    base_eval: bool = True
    head_scorer: str = "gradient"  # a headsparse.score_heads method
    tune_mode: str = "sparse"  # "sparse" or "apt" (APT-style adaptive pruning of FROZEN heads while tuning)
    apt_keep: float = 0.6  # apt: retained share of heads at the end

    def check(self) -> None:
        bad = [m for m in self.methods if m not in PIPELINE_METHODS]
        if not self.methods or bad:
            raise ValueError(f"methods must be a non-empty list of {PIPELINE_METHODS}, got {list(self.methods)!r}")
        for name in ("fraction", "head_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        for name in ("epochs", "batch_size", "probe_batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.tune_mode not in ("sparse", "apt"):
            raise ValueError(f"tune_mode must be 'sparse' or 'apt', got {self.tune_mode!r}")
        for name in ("lr_full", "lr_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")


# ---------------------------------------------------------------- pipeline
def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[headsparse run] {msg}", flush=True)


def _warmup(model, task: Task, plan_probe: HeadPlan, pad: int) -> float:
    t0 = time.perf_counter()
    ex = task.pool[:2]
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    b = collate(ex, pad, model_device(m))
    m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().mean().backward()
    del m
    with patched_for(model, plan_probe) as pm:
        probe(pm, ex, batch_size=2, pad_id=pad, gate=True)
    return time.perf_counter() - t0


def run_pipeline(model, task: Task, config: Optional[RunConfig] = None, *, quiet: bool = False) -> Dict:
    """Run every stage on ``model`` (left untouched: each variant trains a deep copy); returns the report dict."""
    cfg = config or RunConfig()
    cfg.check()
    pool = as_examples(task.pool)
    target = as_examples(task.target, "target")
    if task.is_target is not None and len(task.is_target) != len(pool):
        raise ValueError(f"task.is_target has {len(task.is_target)} entries for a pool of {len(pool)}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    env = environment()  # commit and date as the run starts; the load average is taken again at the end
    env["load_average_start"] = env.pop("load_average")
    pad = pad_id_of(model, None)
    stages: Dict[str, float] = {}
    rows: List[Dict] = []
    nl_plan = HeadPlan.for_model(model, "train")
    stages["warmup"] = _warmup(model, task, nl_plan, pad)

    if cfg.base_eval:
        t0 = time.perf_counter()
        q_base, nll_base = evaluate(model, task.eval, cfg.eval_batch_size, pad, detail=True)
        stages["base_eval"] = time.perf_counter() - t0
        _log(f"base model quality {q_base:.4f}, answer NLL {nll_base:.3f} ({stages['base_eval']:.1f} s)", quiet)
    else:
        q_base = nll_base = None

    # full-data full-parameter baseline
    full_model = copy.deepcopy(model)
    res_full = tune(full_model, None, pool, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr_full,
                    seed=cfg.seed, progress=cfg.progress)
    t_full = res_full.time_s
    t0 = time.perf_counter()
    q_full, nll_full = evaluate(full_model, task.eval, cfg.eval_batch_size, pad, detail=True)
    stages["full_train"], stages["full_eval"] = t_full, time.perf_counter() - t0
    del full_model
    _log(f"full fine-tuning: {res_full.steps} steps in {t_full:.1f} s, quality {q_full:.4f}", quiet)
    if q_full <= 0:
        raise RuntimeError("the full fine-tuning baseline has quality 0; the AER is undefined")

    # head scoring
    t0 = time.perf_counter()
    scores, scorer = score_heads_for_pipeline(model, target, cfg.probe_batch_size, cfg.head_scorer)
    t_score = time.perf_counter() - t0
    stages["score"] = t_score
    plan = HeadPlan.from_scores(scores, top_fraction=cfg.head_fraction, num_kv_heads=nl_plan.num_kv_heads,
                                model_family=nl_plan.model_family)
    _log(f"head scoring ({scorer}): {t_score:.1f} s; training {plan.count('train')} of "
         f"{plan.num_layers * plan.num_q_heads} heads, lowest trainable layer {plan.lowest_trainable_layer}", quiet)

    rows.append({"method": "full", "data": "all", "params": "all", "t_select": 0.0, "t_train": t_full,
                 "quality": q_full, "answer_nll": nll_full, "trainable_params": res_full.trainable_params,
                 "steps": res_full.steps,
                 **aer(0.0, t_full, t_full, q_full, q_full).as_dict()})
    for method in cfg.methods:
        if method == "all":
            t_mine, subset, pr, mres = 0.0, pool, None, None
        else:
            mres = mine(model, pool, plan, method=method, fraction=cfg.fraction, target=target,
                        batch_size=cfg.probe_batch_size if method != "slap" else cfg.batch_size, seed=cfg.seed,
                        progress=cfg.progress)
            t_mine = mres.time_s
            subset = mres.subset(pool)
            pr = mres.precision_recall(task.is_target) if task.is_target is not None else None
        stages[f"{method}_mine"] = t_mine
        m = copy.deepcopy(model)
        data = mres if (mres is not None and mres.selector is not None) else subset
        if cfg.tune_mode == "apt" and not isinstance(data, list):
            data = subset  # APT trains on the mined subset (no on-policy re-selection)
        res = tune(m, plan, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr_heads, grad=cfg.grad,
                   seed=cfg.seed, progress=cfg.progress, mode=cfg.tune_mode,
                   apt_options={"keep_final": cfg.apt_keep} if cfg.tune_mode == "apt" else None)
        t0 = time.perf_counter()
        q, nll = evaluate(m, task.eval, cfg.eval_batch_size, pad, detail=True)
        stages[f"{method}_train"], stages[f"{method}_eval"] = res.time_s, time.perf_counter() - t0
        del m
        parts = aer(t_score + t_mine, res.time_s, t_full, q, q_full)
        row = {"method": method, "data": f"{len(subset)} of {len(pool)}",
               "params": f"{plan.count('train')} heads" + (
                   f", {res.info['plan'].count('pruned')} pruned" if cfg.tune_mode == "apt" else ""),
               "t_score": t_score, "t_mine": t_mine,
               "quality": q, "answer_nll": nll, "trainable_params": res.trainable_params, "steps": res.steps,
               "reselect_s": res.reselect_time_s, **parts.as_dict()}
        if pr is not None:
            row.update({"mining_precision": pr["precision"], "mining_recall": pr["recall"]})
        rows.append(row)
        _log(f"{method}: mine {t_mine:.1f} s, train {res.time_s:.1f} s ({res.steps} steps), quality {q:.4f}; "
             f"{parts}", quiet)

    return {
        "task": {"name": task.name, "description": task.description, "pool": len(pool), "target_set": len(target),
                 "eval": len(task.eval),
                 "pool_targets": sum(task.is_target) if task.is_target is not None else None},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "head_scorer": scorer,
        "plan": plan.to_dict(),
        "base_quality": q_base,
        "base_answer_nll": nll_base,
        "stages_s": stages,
        "rows": rows,
        "environment": {**env, "load_average_end": environment()["load_average"]},
    }


# ------------------------------------------------------------------ report
def environment() -> Dict:
    """The report's provenance record, with the versions at top level."""
    rec = provenance("cuda" if torch.cuda.is_available() else "cpu")
    rec.update(rec.pop("versions"))
    rec["device"] = f"{rec['device']}: {rec.pop('device_name')}"
    return rec


def _fmt(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.{nd}f}"
    return str(v)


def table(report: Dict) -> str:
    """The AER table (markdown) of a report."""
    head = ("| method | data | trained | T_select s | T_train s | T_full s | Q | Q_full | cost ratio | quality ratio "
            "| AER | speedup | mining P/R | answer NLL |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in report["rows"]:
        pr = (f"{r['mining_precision']:.2f}/{r['mining_recall']:.2f}" if "mining_precision" in r else "-")
        lines.append(f"| {r['method']} | {r['data']} | {r['params']} | {_fmt(r['t_select'], 1)} | "
                     f"{_fmt(r['t_train'], 1)} | {_fmt(r['t_full'], 1)} | {_fmt(r['q'], 4)} | {_fmt(r['q_full'], 4)} | "
                     f"{_fmt(r['cost_ratio'])} | {_fmt(r['quality_ratio'])} | {_fmt(r['aer'])} | "
                     f"{_fmt(r['speedup'], 2)}x | {pr} | {_fmt(r.get('answer_nll'))} |")
    return "\n".join(lines)


def markdown(report: Dict) -> str:
    env, task, cfg = report["environment"], report["task"], report["config"]
    out = [f"# headsparse run: {task['name']}", "",
           f"{env['date_utc']}, {env['device']} ({env['torch_threads']} torch threads, "
           f"1/5/15-min load average at the start {_load(env, 'start')} and at the end {_load(env, 'end')}), "
           f"Python {env['python']}, torch {env['torch']}, "
           f"transformers {env['transformers']}, headsparse {env['headsparse']}, commit {env['commit']}.", "",
           task["description"], "",
           f"Pool {task['pool']} examples ({task['pool_targets']} target-task), target set {task['target_set']}, "
           f"held-out eval {task['eval']}. Config: {json.dumps(cfg)}.", "",
           f"Head scorer: {report['head_scorer']}; plan trains {sum(r.count('T') for r in report['plan']['modes'])} "
           f"heads. Base model quality (no tuning): {_fmt(report['base_quality'], 4)}, answer NLL "
           f"{_fmt(report.get('base_answer_nll'))}.", "",
           "Q is the accuracy between the answer choices; answer NLL (lower is better, not part of the AER) is the "
           "held-out negative log-likelihood of the correct answer token over the whole vocabulary.", "",
           "AER = ((T_select + T_train) / T_full) / (Q / Q_full), lower is better; "
           "speedup = T_full / (T_select + T_train); T_select = head scoring + mining.", "",
           table(report), "", "Stage wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["stages_s"].items()),
           ""]
    return "\n".join(out)


def _load(env: Dict, when: str) -> str:
    v = env.get(f"load_average_{when}", env.get("load_average"))
    return "-" if not v else "/".join(f"{x:.1f}" for x in v)


def write_report(report: Dict, out_dir: str, stem: str = "run") -> Dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` if matplotlib is there) into ``out_dir``."""
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "md": os.path.join(out_dir, f"{stem}.md")}
    atomic_write_text(paths["json"], json.dumps(report, indent=1, default=str))
    atomic_write_text(paths["md"], markdown(report))
    png = _plot(report, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths


def _plot(report: Dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in report["rows"]:
        ax.scatter(r["cost_ratio"], r["q"])
        ax.annotate(r["method"], (r["cost_ratio"], r["q"]))
    ax.set_xlabel("cost / full fine-tuning cost")
    ax.set_ylabel("quality")
    ax.set_title(report["task"]["name"])
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
