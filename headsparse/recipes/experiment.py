"""The fair test of the claim as data: a table of arms, one loop that runs them on the same held-out items.

An arm (:class:`ArmSpec`) names its data (``none``, the whole ``pool``, the
10% P2D ``mined`` with the scored heads, or a ``random`` 10%), what it trains
(``none``, ``full`` parameters, ``lora`` r16 on q/k/v/o through peft, or
``heads``), which heads (``scored`` or ``random``, for ``heads``) and how many
seeds it runs. :data:`FAIR_ARMS` is the default table; LoRA or another head
choice is a row, not a branch. :func:`run_arms` runs the rows in order.

Per arm, epochs and learning rate come from ``settings`` (a committed search)
or are chosen now on the dev split (``search=True``) from a grid of (epochs,
lr) candidates: the candidate chosen is the arm's seed-0 result, the other
candidates and the dev evaluations are the search's cost (``search_s``).
Nothing is ever chosen on the held-out eval items.

Seed k > 0 scores the heads on a bootstrap resample of the target set (so the
scored plan and P2D's mined data change), draws random heads and random data
with seed k and orders the training data with seed k. Arms with ``seeds="auto"``
run every seed when seed 0 cost less than ``cheap_share`` of full fine-tuning
on the whole pool (process CPU seconds, selection included), else seed 0 only.

Cost: T_select = head scoring (when the arm uses the scored plan, to train or to
mine) + mining; T_train = the training loop; speedup = T_full / (T_select +
T_train), T_full = full fine-tuning on the whole pool. Quality = accuracy on
the held-out items with a 95% bootstrap CI; comparisons are paired.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..plan import HeadPlan
from .data import as_examples, pad_id_of

DATA = ("none", "pool", "mined", "random")
TRAIN = ("none", "full", "lora", "heads")
HEADS = (None, "scored", "random")
SEEDS = ("one", "three", "auto")


@dataclass(frozen=True)
class ArmSpec:
    """One arm of the experiment (module docstring)."""

    name: str
    data: str
    train: str
    heads: Optional[str] = None
    seeds: str = "auto"
    scorer: Optional[str] = None  # heads="scored": a headsparse.score_heads method (None: FairConfig.head_scorer)

    def check(self) -> None:
        if self.data not in DATA or self.train not in TRAIN or self.heads not in HEADS or self.seeds not in SEEDS:
            raise ValueError(f"arm {self.name!r}: data in {DATA}, train in {TRAIN}, heads in {HEADS}, seeds in "
                             f"{SEEDS}; got {self}")
        if (self.train == "heads") != (self.heads is not None):
            raise ValueError(f"arm {self.name!r}: heads ('scored' or 'random') goes with train='heads' only")
        if self.scorer is not None and self.heads != "scored":
            raise ValueError(f"arm {self.name!r}: scorer goes with heads='scored' only")
        if (self.train == "none") != (self.data == "none"):
            raise ValueError(f"arm {self.name!r}: an arm trains iff it has data")

    @property
    def grid_key(self) -> str:
        return f"{self.train}@{'pool' if self.data == 'pool' else 'subset'}"


FAIR_ARMS: Tuple[ArmSpec, ...] = (
    ArmSpec("base (untuned)", "none", "none", seeds="one"),
    ArmSpec("full FT, whole pool", "pool", "full", seeds="one"),
    ArmSpec("P2D: scored heads, mined 10%", "mined", "heads", "scored", seeds="three"),
    ArmSpec("random heads, mined 10%", "mined", "heads", "random", seeds="three"),
    ArmSpec("scored heads, random 10%", "random", "heads", "scored", seeds="three"),
    ArmSpec("LoRA r16, mined 10%", "mined", "lora"),
    ArmSpec("full FT, mined 10%", "mined", "full"),
    ArmSpec("LoRA r16, whole pool", "pool", "lora", seeds="one"),
)

# (epochs, lr) candidates of a search on dev, per kind of training and data
SEARCH_GRIDS: Dict[str, List[Tuple[int, float]]] = {
    "full@pool": [(1, 3e-5), (1, 1e-4), (2, 3e-5), (2, 1e-4)],
    "lora@pool": [(1, 3e-4), (1, 1e-3), (2, 3e-4), (2, 1e-3)],
    "full@subset": [(2, 3e-5), (2, 1e-4), (4, 3e-5), (4, 1e-4)],
    "lora@subset": [(4, 3e-4), (4, 1e-3), (8, 3e-4), (8, 1e-3)],
    "heads@subset": [(4, 1e-3), (4, 3e-3), (8, 1e-3), (8, 3e-3)],
}


@dataclass
class FairConfig:
    arms: Sequence[ArmSpec] = FAIR_ARMS
    settings: Dict[str, Dict] = field(default_factory=dict)  # arm -> {"epochs", "lr", "search_s"?, "source"?}
    search: bool = False  # choose (epochs, lr) per arm on dev now, from grids
    grids: Dict[str, List[Tuple[int, float]]] = field(default_factory=lambda: dict(SEARCH_GRIDS))
    fraction: float = 0.1
    head_fraction: float = 0.1
    seeds: int = 3
    eval_dev: Optional[bool] = None  # evaluate every arm on dev too; None: only when searching (settings given: the
    # search's report holds each candidate's dev quality, and a second dev pass would only add cost)
    cheap_share: float = 0.1  # "auto" arms run every seed when seed 0 cost less than this share of T_full
    batch_size: int = 8
    warmup_ratio: float = 0.1
    grad: str = "exact"
    head_scorer: str = "gradient"
    lora_r: int = 16
    n_boot: int = 2000
    seed: int = 0
    probe_batch_size: int = 16
    eval_batch_size: int = 32
    progress: bool = False

    def check(self) -> None:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names repeat: {names}")
        from .scoring import METHODS as scorers

        for a in self.arms:
            a.check()
            if a.scorer is not None and a.scorer not in scorers:
                raise ValueError(f"arm {a.name!r}: scorer must be one of {scorers}, got {a.scorer!r}")
        if self.head_scorer not in scorers:
            raise ValueError(f"head_scorer must be one of {scorers}, got {self.head_scorer!r}")
        if not any(a.data == "pool" and a.train == "full" for a in self.arms):
            raise ValueError("the arms need full fine-tuning on the whole pool (data='pool', train='full'): every cost "
                             "is measured against it")
        trained = [a for a in self.arms if a.train != "none"]
        if not (trained[0].data == "pool" and trained[0].train == "full"):
            raise ValueError("full fine-tuning on the whole pool must be the first arm that trains (the others' costs "
                             "are measured against it)")
        if not self.search:
            missing = [a.name for a in self.arms if a.train != "none" and a.name not in self.settings]
            if missing:
                raise ValueError(f"no epochs/lr for arms {missing}: give settings (a committed search) or search=True")
            for n, s in self.settings.items():
                if not (isinstance(s, dict) and isinstance(s.get("epochs"), int) and s["epochs"] >= 1
                        and isinstance(s.get("lr"), (int, float)) and s["lr"] > 0):
                    raise ValueError(f"settings[{n!r}] must be {{'epochs': int >= 1, 'lr': > 0, ...}}, got {s!r}")
        else:
            missing = sorted({a.grid_key for a in self.arms if a.train != "none"} - set(self.grids))
            if missing:
                raise ValueError(f"search=True but no grid for {missing}")
        if not 0 < self.fraction < 1 or not 0 < self.head_fraction <= 1:
            raise ValueError("fraction must be in (0, 1) and head_fraction in (0, 1]")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")


def lora_wrap(model, r: int = 16):
    """A deep copy of ``model`` with LoRA r (alpha 2r, no dropout) on q/k/v/o through peft; base weights frozen."""
    from ._optional import require

    require("peft", "the LoRA r16 arms of the fair test")
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(copy.deepcopy(model), cfg)


def composition_of(task) -> Dict:
    """A composition table for a task that has no builder's table: target records, share, recall ceiling."""
    from .fair_pool import recall_ceiling

    n = len(task.pool)
    t = sum(task.is_target) if task.is_target is not None else None
    return {"records": {"target": t, "other": n - t} if t is not None else {"all": n}, "pool": n,
            "target_task": "target", "target_records": t, "target_share": t / n if t is not None else None,
            "recall_ceiling": recall_ceiling(n, t) if t is not None else None, "fraction": 0.1}


def trainee(model, train: str, lora_r: int = 16):
    """The copy an arm trains: ``model`` wrapped with LoRA r on q/k/v/o for ``train="lora"``, else a deep copy."""
    return lora_wrap(model, lora_r) if train == "lora" else copy.deepcopy(model)


def tune_arm(m, train: str, plan: Optional[HeadPlan], data, *, epochs: int, lr: float, seed: int, batch_size: int = 8,
             warmup_ratio: float = 0.1, grad: str = "exact", progress: bool = False, on_step=None):
    """One arm's training of its copy ``m`` (from :func:`trainee`): AdamW with linear warm-up over ``warmup_ratio``
    of the steps, then linear decay. LoRA trains its adapters only; a head plan trains its heads with ``grad`` and the
    frozen-prefix cache when it runs more than one epoch with no trainable head in layer 0."""
    from .tuning.core import tune

    steps = epochs * math.ceil(len(data) / batch_size)
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
              warmup_steps=math.ceil(warmup_ratio * steps), on_step=on_step)
    if train == "lora":
        return tune(m, None, data, keep_requires_grad=True, **kw)
    if plan is not None:
        kw.update(grad=grad, prefix_cache=epochs > 1 and (plan.lowest_trainable_layer or 0) > 0)
    return tune(m, plan, data, **kw)


def run_arms(model, task, config: Optional[FairConfig] = None, *, composition: Optional[Dict] = None,
             quiet: bool = False) -> Dict:
    """Run every arm of ``config.arms`` on ``task`` (``model`` left untouched); returns the report dict."""
    from .mining.core import mine
    from .pipeline import _load1, _quality_stats, _warmup, environment, evaluate, trained_parts
    from .pipeline import scored_plan as score_plan
    from .verdict import verdict

    cfg = config or FairConfig()
    cfg.check()
    if not task.dev and cfg.search:
        raise ValueError("a search chooses on the dev split: the task has none")
    pool = as_examples(task.pool, "pool")
    target = as_examples(task.target, "target")
    pad = pad_id_of(model, None)
    torch.manual_seed(cfg.seed)
    env = environment()
    env["load_average_start"] = env.pop("load_average")
    t_run = time.perf_counter()
    stages: Dict[str, float] = {}
    loads: Dict[str, Optional[float]] = {}
    settings: Dict[str, Dict] = {k: dict(v) for k, v in cfg.settings.items()}
    rows: List[Dict] = []
    ref = HeadPlan.for_model(model, "train")
    k_sub = max(1, int(round(cfg.fraction * len(pool))))

    def log(msg):
        if not quiet:
            print(f"[headsparse run {time.perf_counter() - t_run:6.0f} s] {msg}", flush=True)

    def ev(m, items):
        return evaluate(m, items, cfg.eval_batch_size, pad, progress=cfg.progress)

    plans: Dict[Tuple[str, int], Tuple] = {}

    def scored_plan(seed, method: Optional[str] = None):
        """(plan, target set, wall s, CPU s, scorer) of ``method`` (default: the config's scorer) at ``seed``."""
        key = (method or cfg.head_scorer, seed)
        if key not in plans:
            plans[key] = score_plan(model, target, seed, cfg.seed, key[0], cfg.probe_batch_size, cfg.head_fraction,
                                    ref)
        return plans[key]

    def random_plan(seed):
        g = torch.Generator().manual_seed(10_000 + seed)
        return HeadPlan.from_scores(torch.rand((ref.num_layers, ref.num_q_heads), generator=g),
                                    fraction=cfg.head_fraction, num_kv_heads=ref.num_kv_heads,
                                    model_family=ref.model_family)

    mined: Dict[int, object] = {}

    def p2d(seed):
        if seed not in mined:
            plan, tgt = scored_plan(seed)[:2]
            mined[seed] = mine(model, pool, plan, method="p2d", fraction=cfg.fraction, target=tgt,
                               batch_size=cfg.probe_batch_size, seed=seed, progress=cfg.progress, signature="fwd")
        return mined[seed]

    def random_subset(seed):
        idx = sorted(random.Random(20_000 + seed).sample(range(len(pool)), k_sub))
        return idx

    # one untimed forward + backward (full model and a patched probe), so lazy initialisation does not land in the
    # first timed arm (full fine-tuning, every other arm's yardstick)
    stages["warmup (untimed)"] = _warmup(model, task, HeadPlan.for_model(model, "train"), pad)
    base_res = ev(model, task.eval)
    eval_dev = bool(task.dev) and (cfg.search if cfg.eval_dev is None else cfg.eval_dev)
    base_dev = ev(model, task.dev) if eval_dev else None
    full_ref: Dict = {}

    def quality(res, dev_res):
        out = _quality_stats(res, base_res, full_ref.get("res"), cfg)
        if dev_res is not None:
            out["q_dev"] = dev_res.accuracy
        return out

    for spec in cfg.arms:
        seeds = [cfg.seed] if spec.seeds == "one" else [cfg.seed + k for k in range(cfg.seeds)]
        for seed in seeds:
            label = spec.name if seed == cfg.seed else f"{spec.name} (seed {seed})"
            loads[label] = _load1()
            row = {"arm": spec.name, "seed": seed, "data_kind": spec.data, "train": spec.train, "heads": spec.heads}
            if spec.train == "none":
                row.update(data="none", trained={"query_heads": 0, "kv_heads": 0, "trainable_params": 0,
                                                 "other_modules": "none"}, steps=0, t_select=0.0, t_train=0.0,
                           t_score=0.0, t_mine=0.0, **quality(base_res, base_dev))
                rows.append(row)
                log(f"{label}: Q {base_res.accuracy:.4f}")
                break
            t_score = t_mine = cpu_sel = 0.0
            if spec.data == "mined":  # P2D mines with the config's scorer's plan
                _, _, t_score, cpu_sel, _ = scored_plan(seed)
            if spec.heads == "scored" and (spec.data != "mined" or (spec.scorer or cfg.head_scorer) != cfg.head_scorer):
                _, _, t, c, _ = scored_plan(seed, spec.scorer)
                t_score, cpu_sel = t_score + t, cpu_sel + c
            if spec.data == "pool":
                data, idx = pool, None
            elif spec.data == "mined":
                mres = p2d(seed)
                idx, t_mine, cpu_sel = sorted(int(i) for i in mres.indices), mres.time_s, cpu_sel + mres.cpu_s
                data = [pool[i] for i in idx]
            else:
                idx = random_subset(seed)
                data = [pool[i] for i in idx]
            plan = None
            if spec.train == "heads":
                plan = scored_plan(seed, spec.scorer)[0] if spec.heads == "scored" else random_plan(seed)

            def train(epochs, lr):
                m = trainee(model, spec.train, cfg.lora_r)
                return m, tune_arm(m, spec.train, plan, data, epochs=epochs, lr=lr, seed=seed,
                                   batch_size=cfg.batch_size, warmup_ratio=cfg.warmup_ratio, grad=cfg.grad,
                                   progress=cfg.progress)

            search_dev = None
            if cfg.search and spec.name not in settings:
                t0 = time.perf_counter()
                best, tried = None, []
                for epochs, lr in cfg.grids[spec.grid_key]:
                    m, res = train(epochs, lr)
                    d = ev(m, task.dev)
                    tried.append({"epochs": epochs, "lr": lr, "dev_q": d.accuracy, "dev_answer_nll": d.answer_nll,
                                  "steps": res.steps, "train_s": res.time_s})
                    log(f"search {spec.name}: {epochs} epochs at lr {lr:g} -> dev Q {d.accuracy:.4f} "
                        f"({res.time_s:.1f} s)")
                    if best is None or (d.accuracy, -d.answer_nll) > (best[3].accuracy, -best[3].answer_nll):
                        best = (m, res, (epochs, lr), d)
                    del m
                m, res, (epochs, lr), search_dev = best
                settings[spec.name] = {"epochs": epochs, "lr": lr, "tried": tried, "source": "this run",
                                       "search_s": time.perf_counter() - t0 - res.time_s}
            else:
                epochs, lr = settings[spec.name]["epochs"], settings[spec.name]["lr"]
                m, res = train(epochs, lr)
            t0 = time.perf_counter()
            out = ev(m, task.eval)
            dev = search_dev if search_dev is not None else (ev(m, task.dev) if eval_dev else None)
            stages[f"{label} eval"] = time.perf_counter() - t0
            del m
            if spec.data == "pool" and spec.train == "full":
                full_ref.update(res=out, t=res.time_s, cpu=res.cpu_s)
            row.update(data=f"{len(data)} of {len(pool)}", trained=trained_parts(plan, model, res.trainable_params)
                       if spec.train != "lora" else {"query_heads": 0, "kv_heads": 0, "other_modules": f"LoRA r{cfg.lora_r} q,k,v,o",
                                                     "trainable_params": res.trainable_params},
                       steps=res.steps, epochs=epochs, lr=lr, t_score=t_score, t_mine=t_mine,
                       t_select=t_score + t_mine, t_train=res.time_s, cpu_select=cpu_sel, cpu_train=res.cpu_s,
                       **quality(out, dev))
            if idx is not None:
                row["indices"] = idx
                if task.is_target is not None:
                    hit = sum(1 for i in idx if task.is_target[i])
                    row.update(mining_precision=hit / len(idx), mining_recall=hit / max(1, sum(task.is_target)))
            t_full = full_ref.get("t")
            if t_full:
                row["speedup"] = t_full / max(1e-9, row["t_select"] + row["t_train"])
                row["cost_ratio"] = (row["t_select"] + row["t_train"]) / t_full
            rows.append(row)
            stages[f"{label} train"] = res.time_s
            log(f"{label}: {res.steps} steps ({epochs} epochs at lr {lr:g}), select {row['t_select']:.1f} s, train "
                f"{res.time_s:.1f} s, Q {out.accuracy:.4f}")
            # dearer than a tenth of full fine-tuning: one seed. Judged on process CPU seconds (which other jobs on
            # the machine inflate less than wall time), on wall time where CPU time is not measured
            cpu_full = full_ref.get("cpu")
            cost, ref_cost = ((cpu_sel + res.cpu_s, cpu_full) if cpu_full else (row["t_select"] + row["t_train"], t_full))
            row["cheaper_than_tenth_of_full"] = bool(ref_cost) and cost < cfg.cheap_share * ref_cost
            if spec.seeds == "auto" and seed == cfg.seed and ref_cost and not row["cheaper_than_tenth_of_full"]:
                break
    p0 = plans.get((cfg.head_scorer, cfg.seed))
    report = {
        "design": "fair",
        "task": {"name": task.name, "description": task.description, "pool": len(pool), "target_set": len(target),
                 "eval": len(task.eval), "dev": len(task.dev) if task.dev else 0},
        "composition": composition or composition_of(task),
        "arms": [asdict(a) for a in cfg.arms],
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("arms", "settings")},
        "settings": settings,
        "head_scorer": p0[4] if p0 else None,
        "plan": p0[0].to_dict() if p0 else None,
        "base_quality": base_res.accuracy,
        "rows": rows,
        "stages_s": stages,
        "load_1min_at_start_of": loads,
        "wall_s": time.perf_counter() - t_run,
        "environment": {**env, "load_average_end": environment()["load_average"]},
    }
    report["verdict"] = verdict(report, n_boot=cfg.n_boot, seed=cfg.seed)
    return report
