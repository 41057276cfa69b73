"""Selection x training grid on the embedded default: which part of "10% of heads on 10% of data" wins or fails?

Selections (10% of the pool): p2d (forward-only signature), random, loss (highest loss under the base model),
gradient-similarity (the library's "less": sketched per-sample gradients of the TRAIN slices, cosine to the target).
Trainings: the scored 10% of heads (gate-gradient scorer), a random 10% of heads, all parameters, and LoRA r=16 on
q/k/v/o (peft, the parameter-efficient baseline users know; peft is used here only, never by the library).
Reference arms: the untuned model and full fine-tuning on the whole pool.

Settings (from the dev-split pilot, benchmarks/results/pilot-analogy-mix.md): full fine-tuning 1 epoch at lr 1e-4;
every grid cell 8 epochs, batch 8; heads and LoRA at lr 1e-3 (LoRA's lr was not searched: it reuses the heads'
value); all-parameter training on the subset at lr 1e-4 (full fine-tuning's). Evaluation: the 500 held-out
analogies, with bootstrap CIs and paired comparisons.

    python benchmarks/bench_grid.py [--threads 2] [--out benchmarks/results]

Writes grid-smollm2.{json,md}; about 20 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from headsparse._atomic import atomic_write_text  # noqa: E402
from headsparse.recipes.metrics import aer  # noqa: E402
from headsparse.recipes.mining import mine  # noqa: E402
from headsparse.recipes.pipeline import environment, evaluate, score_heads_for_pipeline  # noqa: E402
from headsparse.plan import HeadPlan  # noqa: E402
from headsparse.recipes.stats import bootstrap_ci, mcnemar_p, paired_bootstrap_ci  # noqa: E402
from headsparse.recipes.tasks import (DEFAULT_TASK_DESCRIPTION, analogy_mix_records, load_causal_lm, smollm2_dir,  # noqa: E402
                              task_from_records)
from headsparse.recipes.tuning import tune  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SELECTIONS = ("p2d", "random", "loss", "gradient-similarity")
TRAININGS = ("scored heads", "random heads", "all parameters", "LoRA r16 qkvo")


def lora_model(model, r: int = 16):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(copy.deepcopy(model), cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8, help="epochs of every grid cell")
    ap.add_argument("--lr-heads", type=float, default=1e-3)
    ap.add_argument("--lr-full", type=float, default=1e-4)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--smoke", action="store_true", help="a random tiny Llama on the synthetic task (seconds)")
    args = ap.parse_args(argv)
    from headsparse.recipes._optional import MissingPackageError, require

    try:  # before any work: the grid's LoRA r16 column
        require("peft", "the LoRA r16 baseline")
    except MissingPackageError as e:
        raise SystemExit(f"bench_grid: {e}") from None
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = environment()
    t_start = time.perf_counter()

    def log(msg):
        print(f"[grid {time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    if args.smoke:
        from headsparse.recipes.tasks import synthetic_task, tiny_llama

        model, task = tiny_llama(seed=0), synthetic_task(n_pool=60, n_targets=10, n_eval=20)
    else:
        model, tok = load_causal_lm(smollm2_dir())
        task = task_from_records(analogy_mix_records(tok), tok, vocab_size=model.config.vocab_size,
                                 name="analogy-in-a-mix", description=DEFAULT_TASK_DESCRIPTION)
    ref = HeadPlan.for_model(model, "train")
    base = evaluate(model, task.eval)
    log(f"base {base.accuracy:.4f}")
    m = copy.deepcopy(model)
    res_full = tune(m, None, task.pool, epochs=1, batch_size=8, lr=args.lr_full, progress=False)
    full = evaluate(m, task.eval)
    del m
    log(f"full {full.accuracy:.4f} ({res_full.time_s:.0f} s)")

    t0 = time.perf_counter()
    scores, scorer = score_heads_for_pipeline(model, task.target)
    t_score = time.perf_counter() - t0
    plans = {"scored heads": HeadPlan.from_scores(scores, fraction=0.1, num_kv_heads=ref.num_kv_heads,
                                                  model_family=ref.model_family),
             "random heads": HeadPlan.from_scores(torch.rand(scores.shape, generator=torch.Generator().manual_seed(0)),
                                                  fraction=0.1, num_kv_heads=ref.num_kv_heads,
                                                  model_family=ref.model_family)}
    method_of = {"p2d": "p2d", "random": "random", "loss": "loss", "gradient-similarity": "less"}
    cells = []
    for sel in SELECTIONS:
        kw = {"signature": "fwd"} if sel == "p2d" else {}
        mres = mine(model, task.pool, plans["scored heads"], method=method_of[sel], fraction=args.fraction,
                    target=task.target, batch_size=16, **kw)
        subset = mres.subset(task.pool)
        pr = mres.precision_recall(task.is_target)
        log(f"{sel}: mined {len(subset)} in {mres.time_s:.1f} s, precision {pr['precision']:.2f}")
        for training in TRAININGS:
            if training in plans:
                mm = copy.deepcopy(model)
                res = tune(mm, plans[training], subset, epochs=args.epochs, batch_size=8, lr=args.lr_heads,
                           progress=False)
            elif training == "all parameters":
                mm = copy.deepcopy(model)
                res = tune(mm, None, subset, epochs=args.epochs, batch_size=8, lr=args.lr_full, progress=False)
            else:
                mm = lora_model(model)
                res = tune(mm, None, subset, epochs=args.epochs, batch_size=8, lr=args.lr_heads, progress=False,
                           keep_requires_grad=True)
            # head scoring is selection cost wherever its plan is used: to mine (p2d, gradient similarity) or to train
            t_select = mres.time_s + (t_score if training == "scored heads" or sel in ("p2d", "gradient-similarity")
                                      else 0.0)
            t_train = res.time_s
            ev = evaluate(mm, task.eval)
            del mm
            parts = aer(t_select, t_train, res_full.time_s, ev.accuracy, full.accuracy, base.accuracy)
            cells.append({"selection": sel, "training": training, "q": ev.accuracy,
                          "q_ci": bootstrap_ci(ev.correct, n_boot=args.n_boot).as_dict(),
                          "vs_full": paired_bootstrap_ci(ev.correct, full.correct, n_boot=args.n_boot).as_dict(),
                          "vs_full_mcnemar_p": mcnemar_p(ev.correct, full.correct),
                          "trainable_params": res.trainable_params, "steps": res.steps,
                          "mining_precision": pr["precision"], "correct": [int(c) for c in ev.correct],
                          **parts.as_dict()})
            log(f"  {training}: Q {ev.accuracy:.4f}, train {res.time_s:.0f} s, {res.trainable_params:,} params")
    wall = time.perf_counter() - t_start
    report = {"task": DEFAULT_TASK_DESCRIPTION, "config": vars(args), "head_scorer": scorer,
              "base": {"q": base.accuracy, "q_ci": bootstrap_ci(base.correct, n_boot=args.n_boot).as_dict()},
              "full": {"q": full.accuracy, "q_ci": bootstrap_ci(full.correct, n_boot=args.n_boot).as_dict(),
                       "t_train": res_full.time_s, "steps": res_full.steps},
              "t_score": t_score, "cells": cells, "wall_s": wall,
              "environment": {**env, "load_average_end": environment()["load_average"]}}
    os.makedirs(args.out, exist_ok=True)
    stem = "grid-tiny-smoke" if args.smoke else "grid-smollm2"
    atomic_write_text(os.path.join(args.out, f"{stem}.json"), json.dumps(report, indent=1, default=str))
    atomic_write_text(os.path.join(args.out, f"{stem}.md"), markdown(report))
    print(markdown(report))
    return 0


def _ci(d, signed=False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _num(v) -> str:
    return "inf" if v == float("inf") else f"{v:.3f}"


def markdown(rep) -> str:
    env = rep["environment"]
    load = lambda v: "/".join(f"{x:.1f}" for x in v) if v else "-"  # noqa: E731
    lines = ["# Selection x training grid (analogy-in-a-mix, SmolLM2-135M-Instruct)", "",
             f"{env['date_utc']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit "
             f"{env['commit']}; 1/5/15-min load average at the start {load(env['load_average'])}, at the end "
             f"{load(env['load_average_end'])}; wall time {rep['wall_s'] / 60:.1f} min.", "",
             rep["task"], "", f"Config: {json.dumps(rep['config'])}. Head scorer: {rep['head_scorer']}.", "",
             f"Base (untuned): {_ci(rep['base']['q_ci'])}. Full fine-tuning (the whole pool, 1 epoch, "
             f"{rep['full']['t_train']:.1f} s): {_ci(rep['full']['q_ci'])}.", "",
             "| selection | training | Q [95% CI] | Q - Q_full [95% CI] | McNemar p | gain recovered | trainable params "
             "| T_select s | T_train s | speedup | AER | mining precision |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in rep["cells"]:
        lines.append(f"| {c['selection']} | {c['training']} | {_ci(c['q_ci'])} | {_ci(c['vs_full'], True)} | "
                     f"{c['vs_full_mcnemar_p']:.2g} | {_num(c['gain_recovered'])} | {c['trainable_params']:,} | "
                     f"{c['t_select']:.1f} | {c['t_train']:.1f} | {c['speedup']:.2f}x | {_num(c['aer'])} | "
                     f"{c['mining_precision']:.2f} |")
    ref = next(c for c in rep["cells"] if c["selection"] == "p2d" and c["training"] == "scored heads")
    lines += ["", "Every cell against P2D + scored heads (paired over the same eval items):", "",
              "| selection | training | Q - Q_(p2d, scored heads) [95% CI] | McNemar p |", "| --- | --- | --- | --- |"]
    for c in rep["cells"]:
        if c is not ref:
            d = paired_bootstrap_ci(c["correct"], ref["correct"], n_boot=rep["config"]["n_boot"]).as_dict()
            lines.append(f"| {c['selection']} | {c['training']} | {_ci(d, True)} | "
                         f"{mcnemar_p(c['correct'], ref['correct']):.2g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
