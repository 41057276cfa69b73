"""``headsparse run``: score heads, mine data, tune the heads, evaluate; against full fine-tuning.

Stages, each timed with ``time.perf_counter`` on the same machine:

1. ``warmup`` (untimed in AER): one forward + backward per model kind, so
   lazy initialisation does not land in the first timed stage.
2. ``base_eval``: quality of the untouched model (for reference).
3. ``full``: full-data, full-parameter fine-tuning (AdamW with linear warm-up
   and decay, the same epochs and batch size as the methods) -> T_full, Q_full.
4. ``score``: head scores on the small target set -> a :class:`HeadPlan`
   that trains the top ``head_fraction`` of heads (the rest frozen).
5. per mining method: ``mine`` (T_mine) -> the selected ``fraction`` of the
   pool; ``tune`` the plan's heads on it (T_train); ``eval`` (Q). The AER uses
   T_select = T_score + T_mine (head scoring is part of the selection latency)
   and T_train; see :mod:`headsparse.recipes.metrics`.
6. optionally (``same_steps``) the first method again, trained for as many
   optimizer steps as full fine-tuning: what head-sparse training reaches when
   it is not the cheaper one.
7. further seeds (``seeds``): seed k scores the heads on a bootstrap resample
   of the target set (so the plan and the mined set change), mines with that
   plan, draws random subsets and orders the data with seed k.

Learning rates (``lr_grid_full`` / ``lr_grid_heads``) are chosen per arm on
the dev split, never on eval; the candidate chosen is the arm, and the other
candidates' training plus the dev evaluations are the search's cost, which the
report adds to T_select (and to T_full for the baseline's own search) in a
second AER. ``lr_table`` reuses an earlier run's choices with its times.

The report (markdown + JSON, written to a temporary file and renamed) holds
every part of every number, the device, versions, commit and date.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
import dataclasses
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .metrics import aer
from .stats import bootstrap_ci, mcnemar_p, paired_bootstrap_ci, seed_interval
from ..provenance import provenance
from .mining.core import METHODS, mine
from .data import as_examples, check_token_ids, collate, model_device, pad_id_of, vocab_size_of
from .mining.features import patched_for, probe
from ..plan import HeadPlan
from .scoring import score_heads
from .tuning.core import tune
from .._checks import check_int, check_number

PIPELINE_METHODS = METHODS + ("all",)  # "all": head-sparse tuning on the whole pool (no mining)


# ----------------------------------------------------------------------- task
@dataclass
class Task:
    """A mining/tuning/evaluation task, tokenised.

    pool: training candidates (examples: ``input_ids`` and optional ``labels``
    and ``task``); target: the small target set (head scoring, P2D/LESS
    prototypes); eval: held-out multiple-choice items ``{"prompt_ids",
    "choice_ids": [ids per choice], "answer": index}``; dev: items of the same
    kind for every choice (learning rate, epochs), never the eval items;
    is_target: which pool examples belong to the target task (mining precision
    and recall; None when unknown); quality = accuracy on eval.
    """

    name: str
    pool: List[Dict]
    target: List[Dict]
    eval: List[Dict]
    is_target: Optional[List[bool]] = None
    description: str = ""
    dev: Optional[List[Dict]] = None


@dataclass
class EvalResult:
    """Per-item outcome of :func:`evaluate`: correct or not, and the answer's negative log-likelihood."""

    correct: List[bool]
    nll: List[float]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def answer_nll(self) -> float:
        return sum(self.nll) / len(self.nll)


def _check_item(it, i: int, name: str = "eval") -> None:
    ok = (isinstance(it, dict) and isinstance(it.get("prompt_ids"), (list, tuple)) and len(it["prompt_ids"]) > 0
          and isinstance(it.get("choice_ids"), (list, tuple)) and len(it["choice_ids"]) >= 2
          and all(isinstance(c, (list, tuple)) and len(c) > 0 for c in it["choice_ids"])
          and isinstance(it.get("answer"), int) and 0 <= it["answer"] < len(it["choice_ids"]))
    if not ok:
        raise ValueError(f"{name} item {i} must be {{'prompt_ids': [...], 'choice_ids': [[...], ...] (>= 2), "
                         f"'answer': index}}, got {it!r:.200}")


def _last_logprobs(model, prompts: List[List[int]], pad: int, dev) -> torch.Tensor:
    """(B, vocab) float32 log-probabilities of the token after each prompt; logits only at those positions."""
    b = collate([{"input_ids": p} for p in prompts], pad, dev)
    last = b["attention_mask"].sum(1) - 1
    keep, inv = torch.unique(last, return_inverse=True)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep).logits
    return torch.log_softmax(logits[torch.arange(len(prompts), device=logits.device), inv].float(), -1)


def _sequence_logprobs(model, prompt: List[int], choices: List[List[int]], pad: int, dev) -> List[float]:
    """Sum of log-probabilities of each choice's tokens after ``prompt`` (one batch of len(choices) rows)."""
    b = collate([{"input_ids": prompt + c} for c in choices], pad, dev)
    lp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1)
    out = []
    for r, c in enumerate(choices):
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=lp.device)
        out.append(float(lp[r, pos, torch.tensor(c, device=lp.device)].sum()))
    return out


def evaluate(model, items: Sequence[Dict], batch_size: int = 16, pad_id: Optional[int] = None,
             progress: bool = False) -> EvalResult:
    """Multiple-choice evaluation by log-likelihood: per item, the choice whose tokens the model finds likeliest.

    A choice's score is the sum of its tokens' log-probabilities after the prompt
    (full-vocabulary softmax, no length normalisation); ties go to the first
    choice. ``nll`` is minus that score for the correct choice. Items whose
    choices are all single tokens cost one batched forward (logits only at the
    last prompt position); the others one forward per choice.
    """
    if not items:
        raise ValueError("eval items are empty")
    for i, it in enumerate(items):
        _check_item(it, i)
    pad = pad_id_of(model, pad_id)
    dev = model_device(model)
    was = model.training
    model.eval()
    correct: List[Optional[bool]] = [None] * len(items)
    nll: List[float] = [0.0] * len(items)
    single = [i for i, it in enumerate(items) if all(len(c) == 1 for c in it["choice_ids"])]
    multi = [i for i, it in enumerate(items) if any(len(c) != 1 for c in it["choice_ids"])]

    def record(i, scores):
        ans = items[i]["answer"]
        best = max(range(len(scores)), key=lambda c: (scores[c], -c))
        correct[i] = best == ans
        nll[i] = -scores[ans]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="eval", unit="item", disable=not progress, leave=False)
    with torch.no_grad():
        for s in range(0, len(single), batch_size):
            idx = single[s:s + batch_size]
            lp = _last_logprobs(model, [list(items[i]["prompt_ids"]) for i in idx], pad, dev)
            for r, i in enumerate(idx):
                record(i, [float(lp[r, c[0]]) for c in items[i]["choice_ids"]])
            bar.update(len(idx))
        for i in multi:
            record(i, _sequence_logprobs(model, list(items[i]["prompt_ids"]),
                                         [list(c) for c in items[i]["choice_ids"]], pad, dev))
            bar.update(1)
    bar.close()
    model.train(was)
    return EvalResult([bool(c) for c in correct], nll)


# -------------------------------------------------------------------- scoring
def score_heads_for_pipeline(model, data, batch_size: int = 8, method: str = "gradient", seed: int = 0) -> tuple:
    """(scores (layers, heads), description of the scorer used) from :func:`headsparse.score_heads`.

    ``method`` is any scoring method (default "gradient" = Michel et al.'s gate
    gradient), run on the target set; its errors propagate (no fallback).
    """
    examples = as_examples(data, "data")
    pad = pad_id_of(model, None)
    dev = model_device(model)
    batches = [collate(examples[i:i + batch_size], pad, dev) for i in range(0, len(examples), batch_size)]
    hs_scores = score_heads(model, batches, method=method, seed=seed)
    return hs_scores.scores.float(), f"headsparse.score_heads(method={method!r})"


def scored_plan(model, target, seed: int, first_seed: int, method: str, batch_size: int, head_fraction: float,
                ref: HeadPlan) -> tuple:
    """(plan, target set, scoring wall s, CPU s, scorer) of both designs' scored heads: ``method``'s scores on the
    target set at ``first_seed``, on a bootstrap resample of it (seeded) at any other seed; the top
    ``head_fraction`` of heads TRAIN, shaped like ``ref`` (the model's all-TRAIN plan)."""
    tgt = target if seed == first_seed else bootstrap_resample(target, seed)
    t0, c0 = time.perf_counter(), time.process_time()
    scores, scorer = score_heads_for_pipeline(model, tgt, batch_size, method, seed=seed)
    t, c = time.perf_counter() - t0, time.process_time() - c0
    plan = HeadPlan.from_scores(scores, fraction=head_fraction, num_kv_heads=ref.num_kv_heads,
                                model_family=ref.model_family)
    return plan, tgt, t, c, scorer


# ------------------------------------------------------------------ config
@dataclass
class RunConfig:
    """Settings of :func:`run_pipeline`. Learning rates and epochs are choices: make them on a dev split."""

    methods: Sequence[str] = ("p2d", "random")
    fraction: float = 0.1  # share of the pool mined
    head_fraction: float = 0.1  # share of heads trained
    epochs: int = 1  # epochs of every arm (full fine-tuning and the head-sparse arms alike)
    epochs_heads: Optional[int] = None  # head-sparse epochs if they must differ (None: the same as epochs)
    same_steps: bool = False  # add "<first method> (same steps as full)": as many optimizer steps as full fine-tuning
    batch_size: int = 8
    lr_full: float = 3e-5  # used when lr_grid_full is empty and lr_table is None
    lr_heads: float = 1e-3  # used when lr_grid_heads is empty and lr_table is None
    lr_grid_full: Sequence[float] = ()  # >= 2 values: full fine-tuning's lr is chosen on the dev split
    lr_grid_heads: Sequence[float] = ()  # >= 2 values: each head arm's lr is chosen on the dev split
    lr_table: Optional[Dict] = None  # a previous run's report["lr_search"]: its lrs, with its search times counted
    warmup_ratio: float = 0.1  # share of each arm's optimizer steps spent in linear lr warm-up (sparse mode)
    grad: str = "exact"
    seed: int = 0
    probe_batch_size: int = 16
    eval_batch_size: int = 32
    progress: bool = True
    head_scorer: str = "gradient"  # a headsparse.score_heads method
    tune_mode: str = "sparse"  # "sparse" or "apt" (APT-style adaptive pruning of FROZEN heads while tuning)
    apt_keep: float = 0.6  # apt: retained share of heads at the end
    n_boot: int = 2000  # bootstrap resamples for every confidence interval
    seeds: int = 1  # every mining arm runs with seeds seed, seed+1, ... (see run_pipeline): its spread across seeds
    p2d_signature: str = "fwd"  # "fwd" (forward-only pooled head outputs) or "gate" (|gate gradient|, fwd + bwd)
    p2d_compare: bool = True  # also mine with the other signature, for its precision/recall and cost (not trained)
    cache_dir: Optional[str] = None  # P2D "fwd": keep every head's pool signature here (reused by later runs)
    # head arms' frozen-prefix cache (tune(prefix_cache=...)): None = on for a sparse-mode head arm that trains
    # more than one epoch and whose plan has a layer below its lowest trainable layer; True/False = always/never
    prefix_cache: Optional[bool] = None

    def arm_keys(self) -> List[str]:
        """The names under which each arm's learning rate is searched (or looked up in ``lr_table``)."""
        keys = ["full", *self.methods]
        return keys + [same_steps_label(self.methods[0])] if self.same_steps else keys

    def check(self) -> None:
        bad = [m for m in self.methods if m not in PIPELINE_METHODS]
        if not self.methods or bad:
            raise ValueError(f"methods must be a non-empty list of {PIPELINE_METHODS}, got {list(self.methods)!r}")
        for name in ("fraction", "head_fraction"):
            v = getattr(self, name)
            check_number(name, v, 0, 1, lo_open=True)
        for name in ("epochs", "batch_size", "probe_batch_size", "eval_batch_size", "n_boot", "seeds"):
            v = getattr(self, name)
            check_int(name, v, 1)
        if self.epochs_heads is not None and (isinstance(self.epochs_heads, bool)
                                              or not isinstance(self.epochs_heads, int) or self.epochs_heads < 1):
            raise ValueError(f"epochs_heads must be a positive int or None, got {self.epochs_heads!r}")
        if self.prefix_cache is not None and not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True, False or None (on for head arms of more than one epoch), "
                             f"got {self.prefix_cache!r}")
        from .scoring import METHODS as scorers

        if self.head_scorer not in scorers:
            raise ValueError(f"head_scorer must be one of {scorers}, got {self.head_scorer!r}")
        if self.p2d_signature not in ("fwd", "gate"):
            raise ValueError(f"p2d_signature must be 'fwd' or 'gate', got {self.p2d_signature!r}")
        if self.tune_mode not in ("sparse", "apt"):
            raise ValueError(f"tune_mode must be 'sparse' or 'apt', got {self.tune_mode!r}")
        for name in ("lr_full", "lr_heads"):
            _check_lr(name, getattr(self, name))
        for name in ("lr_grid_full", "lr_grid_heads"):
            grid = getattr(self, name)
            if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 1:
                raise ValueError(f"{name} must be empty (no search) or hold at least 2 learning rates, got {grid!r}")
            for v in grid:
                _check_lr(name, v)
            if len(set(grid)) != len(grid):
                raise ValueError(f"{name} repeats a learning rate: {list(grid)!r}")
        check_number("warmup_ratio", self.warmup_ratio, 0, 1, hi_open=True)
        if self.lr_table is not None:
            if self.lr_grid_full or self.lr_grid_heads:
                raise ValueError("give either lr_table (reuse a search) or lr_grid_full/lr_grid_heads (search now), "
                                 "not both")
            if not isinstance(self.lr_table, dict):
                raise ValueError(f"lr_table must be a dict (a report's 'lr_search'), got {type(self.lr_table).__name__}")
            missing = [k for k in self.arm_keys() if k not in self.lr_table]
            if missing:
                raise ValueError(f"lr_table has no learning rate for {missing} (it has {sorted(self.lr_table)}); "
                                 f"run a search with these arms first")
            for k in self.arm_keys():
                e = self.lr_table[k]
                if not isinstance(e, dict) or "lr" not in e:
                    raise ValueError(f"lr_table[{k!r}] must be a dict with 'lr', got {e!r}")
                _check_lr(f"lr_table[{k!r}]['lr']", e["lr"])


def same_steps_label(method: str) -> str:
    return f"{method} (same steps as full)"


def _check_lr(name: str, v) -> None:
    check_number(name, v, 0, lo_open=True)


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


def trained_parts(plan: Optional[HeadPlan], model, trainable_params: int) -> Dict:
    """What an arm trains: query heads, KV heads (of total) and parameters."""
    ref = HeadPlan.for_model(model, "train")
    total_q = ref.num_layers * ref.num_q_heads
    total_kv = ref.num_layers * ref.num_kv_heads
    if plan is None:
        return {"query_heads": total_q, "kv_heads": total_kv, "total_query_heads": total_q,
                "total_kv_heads": total_kv, "trainable_params": trainable_params, "other_modules": "all"}
    kv = sum(sum(plan.kv_trainable(layer)) for layer in range(plan.num_layers))
    return {"query_heads": plan.count("train"), "kv_heads": kv, "total_query_heads": total_q,
            "total_kv_heads": total_kv, "trainable_params": trainable_params, "other_modules": "none"}


def _quality_stats(res: EvalResult, base: EvalResult, full: Optional[EvalResult], cfg: RunConfig) -> Dict:
    """An arm's quality with its CI, and its paired comparisons with the base model and full fine-tuning."""
    n, s = cfg.n_boot, cfg.seed
    out = {"q": res.accuracy, "q_ci": bootstrap_ci(res.correct, n_boot=n, seed=s).as_dict(),
           "answer_nll": res.answer_nll, "n_eval": len(res.correct),
           "vs_base": paired_bootstrap_ci(res.correct, base.correct, n_boot=n, seed=s).as_dict(),
           "vs_base_mcnemar_p": mcnemar_p(res.correct, base.correct)}
    if full is not None:
        out["vs_full"] = paired_bootstrap_ci(res.correct, full.correct, n_boot=n, seed=s).as_dict()
        out["vs_full_mcnemar_p"] = mcnemar_p(res.correct, full.correct)
    out["correct"] = [int(c) for c in res.correct]
    return out


@dataclass(frozen=True)
class PipelineArm:
    """One mined arm of the pipeline design, after the two baselines (the base model, full fine-tuning).

    ``method`` mines the data (or ``"all"``: the whole pool), ``seed`` scores the
    heads and orders the data, ``same_steps`` trains as many optimizer steps as
    full fine-tuning; ``label`` names the arm in the report.
    """

    method: str
    seed: int
    label: str
    same_steps: bool = False

    @property
    def search_key(self) -> str:
        """The name its learning rate is searched under: one search per method, shared by its seeds."""
        return self.label if self.same_steps else self.method


def pipeline_arms(cfg: RunConfig) -> List[PipelineArm]:
    """The arms of one run in run order: every method at the first seed, the same-steps arm, the further seeds."""
    arms = [PipelineArm(m, cfg.seed, m) for m in cfg.methods]
    if cfg.same_steps:
        arms.append(PipelineArm(cfg.methods[0], cfg.seed, same_steps_label(cfg.methods[0]), same_steps=True))
    arms += [PipelineArm(m, cfg.seed + k, f"{m} (seed {cfg.seed + k})") for k in range(1, cfg.seeds)
             for m in cfg.methods]
    return arms


def _check_inputs(task: Task, pool: List, vocab: Optional[int], cfg: RunConfig) -> None:
    if task.is_target is not None and len(task.is_target) != len(pool):
        raise ValueError(f"task.is_target has {len(task.is_target)} entries for a pool of {len(pool)}")
    if not task.eval:
        raise ValueError("task.eval is empty")
    for name, items in (("eval", task.eval), ("dev", task.dev or [])):
        for i, it in enumerate(items):
            _check_item(it, i, name)
            check_token_ids(list(it["prompt_ids"]) + [t for c in it["choice_ids"] for t in c], vocab, f"{name}[{i}]",
                            "prompt_ids/choice_ids")
    if (cfg.lr_grid_full or cfg.lr_grid_heads) and not task.dev:
        raise ValueError("a learning-rate search (lr_grid_full / lr_grid_heads) needs task.dev: it chooses on the dev "
                         "split, never on eval")


class _PipelineRun:
    """What the stages of one :func:`run_pipeline` share: inputs, stage times, learning-rate searches, rows."""

    def __init__(self, model, task: Task, cfg: RunConfig, quiet: bool):
        vocab = vocab_size_of(model)
        self.model, self.task, self.cfg, self.quiet = model, task, cfg, quiet
        self.pool = as_examples(task.pool, "pool", vocab)
        self.target = as_examples(task.target, "target", vocab)
        _check_inputs(task, self.pool, vocab, cfg)
        self.pad = pad_id_of(model, None)
        self.ref_plan = HeadPlan.for_model(model, "train")
        self.stages: Dict[str, float] = {}
        self.rows: List[Dict] = []
        self.searches: Dict[str, Dict] = {}
        self.loads: Dict[str, Optional[float]] = {}
        self.plans: Dict[int, tuple] = {}  # seed -> (plan, target set, score s, score CPU s, scorer)
        self.mined: Dict[tuple, tuple] = {}  # (method, seed) -> (mine s, subset, precision/recall, MiningResult)

    def log(self, msg: str) -> None:
        _log(msg, self.quiet)

    def evaluate(self, m, items) -> EvalResult:
        return evaluate(m, items, self.cfg.eval_batch_size, self.pad, progress=self.cfg.progress)

    def assess(self, m, label: str, dev_done: Optional[EvalResult] = None):
        """(eval result, dev result) of ``m``; the dev pass is skipped when a search already made it."""
        t0 = time.perf_counter()
        res = self.evaluate(m, self.task.eval)
        dev = dev_done
        if dev is None and self.task.dev:
            dev = self.evaluate(m, self.task.dev)
        self.stages[f"{label}_eval"] = time.perf_counter() - t0
        return res, dev

    # ------------------------------------------------------------- training
    def fit(self, key: str, plan: Optional[HeadPlan], data, n_examples: int, epochs: int, seed: int,
            max_steps: Optional[int] = None):
        """Train a copy of the model for arm ``key``. The lr is searched on dev the first time ``key`` is seen
        (when its grid holds >= 2 values; the candidate chosen on dev is the arm), taken from ``cfg.lr_table``, or
        fixed. Returns (model, TuneResult, lr, dev result of the search or None)."""
        cfg = self.cfg
        kw = dict(epochs=epochs, batch_size=cfg.batch_size, seed=seed, progress=cfg.progress)
        if max_steps is not None:
            kw["max_steps"] = max_steps
        if plan is not None:
            kw.update(grad=cfg.grad, mode=cfg.tune_mode,
                      apt_options={"keep_final": cfg.apt_keep} if cfg.tune_mode == "apt" else None)
            if cfg.tune_mode == "sparse":
                auto = epochs > 1 and (plan.lowest_trainable_layer or 0) > 0
                kw["prefix_cache"] = auto if cfg.prefix_cache is None else bool(cfg.prefix_cache)
        if plan is None or cfg.tune_mode == "sparse":  # tune_apt has its own schedule
            steps = epochs * math.ceil(n_examples / cfg.batch_size)
            kw["warmup_steps"] = math.ceil(cfg.warmup_ratio * min(steps, max_steps or steps))

        def train(lr):
            m = copy.deepcopy(self.model)
            d = data
            if getattr(data, "selector", None) is not None:  # on-policy state (SLAP's rounds) per training
                d = dataclasses.replace(data, selector=copy.copy(data.selector))
            return m, tune(m, plan, d, lr=lr, **kw)

        grid = tuple(cfg.lr_grid_full if plan is None else cfg.lr_grid_heads)
        if cfg.lr_table is not None and key not in self.searches:
            self.searches[key] = dict(cfg.lr_table[key])
            self.searches[key].setdefault("source", "lr_table")
        if key in self.searches or not grid:
            lr = self.searches[key]["lr"] if key in self.searches else (cfg.lr_full if plan is None else cfg.lr_heads)
            return (*train(lr), lr, None)
        return self.search_lr(key, grid, train)

    def search_lr(self, key: str, grid: tuple, train):
        """Train every lr of ``grid``, keep the best on dev; the others' training and the dev passes are the
        search's cost (the chosen candidate's training is the arm's T_train)."""
        t0, c0 = time.perf_counter(), time.process_time()
        best, tried = None, []
        for lr in grid:
            m, res = train(lr)
            d = self.evaluate(m, self.task.dev)
            tried.append({"lr": lr, "dev_q": d.accuracy, "dev_answer_nll": d.answer_nll, "train_s": res.time_s,
                          "steps": res.steps})
            self.log(f"lr search {key}: lr {lr:g} -> dev quality {d.accuracy:.4f} ({res.time_s:.1f} s)")
            if best is None or (d.accuracy, -d.answer_nll) > (best[3].accuracy, -best[3].answer_nll):
                best = (m, res, lr, d)  # ties on dev accuracy go to the lower dev answer NLL
            del m
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.searches[key] = {"grid": list(grid), "tried": tried, "lr": best[2], "search_s": wall - best[1].time_s,
                              "search_cpu_s": cpu - best[1].cpu_s, "source": "this run"}
        self.stages[f"{key}_lr_search"] = self.searches[key]["search_s"]
        return best

    # ------------------------------------------------------------- rows
    def finish(self, row, res, dev, t_select, t_train, cpu_select=0.0, cpu_train=0.0):
        """Add ``row`` with its quality, its paired comparisons and its cost ratios against full fine-tuning."""
        row.update(_quality_stats(res, self.base, self.full if row["method"] != "full" else None, self.cfg))
        parts = aer(t_select, t_train, self.t_full, res.accuracy, self.full.accuracy, self.base.accuracy)
        row.update(parts.as_dict())
        if self.cpu_full > 0:  # the same ratios from process CPU time, which other jobs on the machine do not inflate
            c = aer(cpu_select, cpu_train, self.cpu_full, res.accuracy, self.full.accuracy, self.base.accuracy)
            row.update(cpu_select=cpu_select, cpu_train=cpu_train, cpu_full=self.cpu_full, speedup_cpu=c.speedup,
                       aer_cpu=c.aer)
        if dev is not None:
            row["q_dev"] = dev.accuracy
        self.rows.append(row)
        return parts

    def baselines(self) -> None:
        """The untuned model and full-data, full-parameter fine-tuning: the yardsticks of every other arm."""
        model, pool, cfg = self.model, self.pool, self.cfg
        self.stages["warmup"] = _warmup(model, self.task, self.ref_plan, self.pad)
        self.base, base_dev = self.assess(model, "base")
        self.log(f"base model: quality {self.base.accuracy:.4f}, answer NLL {self.base.answer_nll:.3f} "
                 f"({self.stages['base_eval']:.1f} s)")
        full_model, self.res_full, lr_full, full_dev = self.fit("full", None, pool, len(pool), cfg.epochs, cfg.seed)
        self.t_full, self.cpu_full = self.res_full.time_s, self.res_full.cpu_s
        self.stages["full_train"] = self.t_full
        self.loads["full"] = _load1()
        self.full, full_dev = self.assess(full_model, "full", full_dev)
        del full_model
        self.log(f"full fine-tuning: {self.res_full.steps} steps at lr {lr_full:g} in {self.t_full:.1f} s, quality "
                 f"{self.full.accuracy:.4f}")
        self.finish({"method": "base (untuned)", "data": "none", "trained": trained_parts(None, model, 0) | {
            "query_heads": 0, "kv_heads": 0, "other_modules": "none"}, "steps": 0}, self.base, base_dev, 0.0, 0.0)
        self.finish({"method": "full", "data": f"{len(pool)} of {len(pool)}", "search_key": "full",
                     "trained": trained_parts(None, model, self.res_full.trainable_params),
                     "steps": self.res_full.steps, "epochs": cfg.epochs, "lr": lr_full},
                    self.full, full_dev, 0.0, self.t_full, 0.0, self.cpu_full)

    # ------------------------------------------------------------- selection
    def plan_for(self, seed: int):
        """Head scoring: the first seed on the target set, every further seed on a bootstrap resample of it."""
        cfg = self.cfg
        if seed not in self.plans:
            p, tgt, t, c, scorer = scored_plan(self.model, self.target, seed, cfg.seed, cfg.head_scorer,
                                               cfg.probe_batch_size, cfg.head_fraction, self.ref_plan)
            self.stages["score" if seed == cfg.seed else f"score (seed {seed})"] = t
            self.plans[seed] = (p, tgt, t, c, scorer)
            self.log(f"head scoring ({scorer}, seed {seed}): {t:.1f} s; training {p.count('train')} of "
                     f"{p.num_layers * p.num_q_heads} heads, lowest trainable layer {p.lowest_trainable_layer}")
        return self.plans[seed]

    def mine_for(self, arm: PipelineArm, plan: HeadPlan, tgt):
        """(mine s, subset, precision/recall, MiningResult, other signature's comparison) of ``arm``'s data."""
        cfg, pool, task = self.cfg, self.pool, self.task
        if (arm.method, arm.seed) in self.mined:  # the same-steps arm trains on its method's data (cost counted again)
            return (*self.mined[(arm.method, arm.seed)], None)
        compare = None
        if arm.method == "all":
            out = (0.0, pool, None, None)
        else:
            mres = mine(self.model, pool, plan, method=arm.method, fraction=cfg.fraction, target=tgt,
                        batch_size=cfg.probe_batch_size if arm.method != "slap" else cfg.batch_size, seed=arm.seed,
                        progress=cfg.progress,
                        **({"signature": cfg.p2d_signature, "cache_dir": cfg.cache_dir} if arm.method == "p2d"
                           else {}))
            pr = mres.precision_recall(task.is_target) if task.is_target is not None else None
            out = (mres.time_s, mres.subset(pool), pr, mres)
            if arm.method == "p2d" and cfg.p2d_compare and arm.seed == cfg.seed:
                compare = self.other_signature(arm, plan, tgt, mres)
        self.mined[(arm.method, arm.seed)] = out
        return (*out, compare)

    def other_signature(self, arm: PipelineArm, plan: HeadPlan, tgt, mres) -> Dict:
        """P2D mined again with the signature not used (not trained): its overlap, precision/recall and cost."""
        cfg = self.cfg
        other = "gate" if cfg.p2d_signature == "fwd" else "fwd"
        alt = mine(self.model, self.pool, plan, method="p2d", fraction=cfg.fraction, target=tgt,
                   batch_size=cfg.probe_batch_size, seed=arm.seed, progress=cfg.progress, signature=other)
        self.stages[f"{arm.label}_mine_{other}_untrained"] = alt.time_s
        compare = {"signature": other, "mine_s": alt.time_s,
                   "overlap": len(set(alt.indices) & set(mres.indices)) / len(mres.indices)}
        if self.task.is_target is not None:
            apr = alt.precision_recall(self.task.is_target)
            compare.update(precision=apr["precision"], recall=apr["recall"])
        return compare

    # ------------------------------------------------------------- one arm
    def run_arm(self, arm: PipelineArm) -> None:
        """Score (or reuse) the heads, mine, tune the plan's heads on the mined data, evaluate, add the row."""
        cfg, model = self.cfg, self.model
        plan, tgt, t_score, cpu_score, _ = self.plan_for(arm.seed)
        label = arm.label
        self.loads[label] = _load1()
        t_mine, subset, pr, mres, compare = self.mine_for(arm, plan, tgt)
        self.stages[f"{label}_mine"] = t_mine
        data = mres if (mres is not None and mres.selector is not None) else subset
        if cfg.tune_mode == "apt" and not isinstance(data, list):
            data = subset  # APT trains on the mined subset (no on-policy re-selection)
        epochs = (math.ceil(cfg.epochs * len(self.pool) / len(subset)) if arm.same_steps
                  else cfg.epochs_heads or cfg.epochs)
        # the same-steps arm stops at full fine-tuning's step count (whole epochs could overshoot it)
        max_steps = self.res_full.steps if arm.same_steps and cfg.tune_mode == "sparse" else None
        m, res, lr, search_dev = self.fit(arm.search_key, plan, data, len(subset), epochs, arm.seed, max_steps)
        self.stages[f"{label}_train"] = res.time_s
        ev, ev_dev = self.assess(m, label, search_dev)
        del m
        final_plan = res.info.get("plan", plan)
        row = {"method": label, "data": f"{len(subset)} of {len(self.pool)}", "search_key": arm.search_key,
               "trained": trained_parts(plan, model, res.trainable_params)
               | ({"pruned_query_heads": final_plan.count("pruned")} if cfg.tune_mode == "apt" else {}),
               "t_score": t_score, "t_mine": t_mine, "steps": res.steps, "epochs": epochs, "lr": lr,
               "seed": arm.seed, "target_resampled": arm.seed != cfg.seed, "reselect_s": res.reselect_time_s,
               "prefix_cache": "prefix_cache" in res.info}
        if arm.method == "p2d":
            row["signature"] = cfg.p2d_signature
            if "cache" in mres.info:  # the pool forward a later run on this pool and model no longer pays
                amortised = aer(t_score + t_mine - mres.info["signature_s"], res.time_s, self.t_full, ev.accuracy,
                                self.full.accuracy, self.base.accuracy)
                row.update(cache=mres.info["cache"], signature_s=mres.info["signature_s"],
                           t_select_amortised=amortised.t_select, speedup_amortised=amortised.speedup,
                           aer_amortised=amortised.aer)
            if compare is not None:
                row["other_signature"] = compare
        if pr is not None:
            row.update({"mining_precision": pr["precision"], "mining_recall": pr["recall"]})
        if mres is not None:
            row["mined_indices"] = sorted(int(i) for i in mres.indices)
        parts = self.finish(row, ev, ev_dev, t_score + t_mine, res.time_s,
                            cpu_score + (mres.cpu_s if mres else 0.0), res.cpu_s)
        self.log(f"{label}: mine {t_mine:.1f} s, train {res.time_s:.1f} s ({res.steps} steps at lr {lr:g}), "
                 f"quality {ev.accuracy:.4f}; {parts}")

    def add_search_costs(self) -> None:
        """Every arm's cost with the learning-rate search it needed; full fine-tuning's search included."""
        if not self.searches:
            return
        t_search_full = self.searches.get("full", {}).get("search_s", 0.0)
        for r in self.rows[1:]:
            t_search = self.searches.get(r["search_key"], {}).get("search_s", 0.0)
            w = aer(r["t_select"] + t_search, r["t_train"], self.t_full + t_search_full, r["q"], self.full.accuracy,
                    self.base.accuracy)
            r.update(t_search=t_search, speedup_with_search=w.speedup, aer_with_search=w.aer)

    def report(self, env: Dict) -> Dict:
        task, cfg, first = self.task, self.cfg, self.plans[self.cfg.seed]
        return {
            "task": {"name": task.name, "description": task.description, "pool": len(self.pool),
                     "target_set": len(self.target), "eval": len(task.eval), "dev": len(task.dev) if task.dev else 0,
                     "pool_targets": sum(task.is_target) if task.is_target is not None else None},
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "head_scorer": first[4],
            "plan": first[0].to_dict(),
            "plans_by_seed": {str(s): p[0].to_dict() for s, p in self.plans.items() if s != cfg.seed},
            "base_quality": self.base.accuracy,
            "lr_search": self.searches,
            "stages_s": self.stages,
            "load_1min_at_start_of": self.loads,
            "load_changed": _load_changed(self.loads),
            "seed_summary": _seed_summary(self.rows),
            "rows": self.rows,
            "environment": {**env, "load_average_end": environment()["load_average"]},
        }


def run_pipeline(model, task: Task, config: Optional[RunConfig] = None, *, quiet: bool = False) -> Dict:
    """Run every stage on ``model`` (left untouched: each variant trains a deep copy); returns the report dict.

    The base model and full fine-tuning first (every cost and quality is measured
    against them), then each arm of :func:`pipeline_arms` in turn.
    """
    cfg = config or RunConfig()
    cfg.check()
    run = _PipelineRun(model, task, cfg, quiet)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    env = environment()  # commit and date as the run starts; the load average is taken again at the end
    env["load_average_start"] = env.pop("load_average")
    run.baselines()
    for arm in pipeline_arms(cfg):
        run.run_arm(arm)
    run.add_search_costs()
    return run.report(env)


def bootstrap_resample(examples: Sequence, seed: int) -> List:
    """``len(examples)`` draws with replacement (seeded): the target set a further seed scores heads on."""
    g = random.Random(seed)
    return [examples[g.randrange(len(examples))] for _ in examples]


def _seed_summary(rows: List[Dict]) -> Dict:
    """Per method run with several seeds: the seeds, mean Q with a t-interval across them, mean gain/speedup/AER."""
    by: Dict[str, List[Dict]] = {}
    for r in rows:
        if "seed" in r:
            by.setdefault(r["method"].split(" (seed")[0], []).append(r)
    out = {}
    for name, rs in by.items():
        if len(rs) > 1:
            out[name] = {"seeds": [r["seed"] for r in rs], "q": seed_interval([r["q"] for r in rs]).as_dict(),
                         "gain_recovered_mean": sum(r["gain_recovered"] for r in rs) / len(rs),
                         "speedup_mean": sum(r["speedup"] for r in rs) / len(rs),
                         "aer_mean": sum(r["aer"] for r in rs) / len(rs)}
    return out


def _load1() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover (no load average on this platform)
        return None


LOAD_CHANGE = 1.0  # a spread of the 1-min load average across the arms' starts above this flags the run


def _load_changed(loads: Dict[str, Optional[float]]) -> bool:
    """True if the 1-min load average at the start of the arms spread by more than LOAD_CHANGE: other jobs
    probably shared the machine during part of the run, so compare the CPU-time ratios rather than wall time."""
    vals = [v for v in loads.values() if v is not None]
    return bool(vals) and max(vals) - min(vals) > LOAD_CHANGE


# ------------------------------------------------------------------ report
def environment() -> Dict:
    """The report's provenance record, with the versions at top level."""
    rec = provenance("cuda" if torch.cuda.is_available() else "cpu")
    rec.update(rec.pop("versions"))
    rec["device"] = f"{rec['device']}: {rec.pop('device_name')}"
    return rec


# the rendering lives in its own module; these names stay importable from here
from .pipeline_report import (_plot, lr_search_table, markdown, pairwise, table,  # noqa: E402,F401
                              write_report)
