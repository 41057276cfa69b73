"""Pilot for the embedded default task of ``headsparse run``: does it have headroom, and which learning rates?

Answers, on the dev split only (the eval split is touched once, for the chosen
settings, to report the headroom the acceptance asks for):

1. How good is the untuned model (accuracy with a 95% bootstrap CI)?
2. Full-data, full-parameter fine-tuning: which learning rate is best on dev,
   and how much does it gain over the base model on eval (paired CI, McNemar)?
3. Head-sparse tuning (top 10% of heads by gate gradient on the target set, a
   random 10% of the pool): which learning rate is best on dev?

The chosen learning rates become the defaults of ``headsparse run``.

    python benchmarks/pilot_task.py [--lrs-full 1e-5,3e-5,1e-4,3e-4] [--lrs-heads 1e-3,3e-3,1e-2] [--epochs-heads 2,4,8]

Writes ``benchmarks/results/pilot-analogy-mix.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from headsparse._atomic import atomic_write_text  # noqa: E402
from headsparse.recipes.pipeline import environment, evaluate, score_heads_for_pipeline  # noqa: E402
from headsparse.plan import HeadPlan  # noqa: E402
from headsparse.recipes.stats import bootstrap_ci, mcnemar_p, paired_bootstrap_ci  # noqa: E402
from headsparse.recipes.tasks import (DEFAULT_TASK_DESCRIPTION, analogy_mix_records, load_causal_lm,  # noqa: E402
                              smollm2_dir, task_from_records)
from headsparse.recipes.tuning import tune  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _floats(s: str):
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs-full", default="1e-5,3e-5,1e-4,3e-4")
    ap.add_argument("--lrs-heads", default="1e-3,3e-3,1e-2")
    ap.add_argument("--epochs-full", type=int, default=1)
    ap.add_argument("--epochs-heads", default="2,4,8", help="comma-separated epochs grid of head-sparse tuning")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = environment()
    model, tok = load_causal_lm(smollm2_dir())
    vocab = model.config.vocab_size
    recs = analogy_mix_records(tok)
    task = task_from_records(recs, tok, vocab_size=vocab, max_tokens=args.max_tokens)
    pool, target, dev, ev = task.pool, task.target, task.dev, task.eval
    rows, t_start = [], time.perf_counter()

    def log(msg):
        print(f"[pilot {time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    base_dev, base_eval = evaluate(model, dev), evaluate(model, ev)
    rows.append({"arm": "base (untuned)", "lr": None, "dev": base_dev.accuracy,
                 "dev_ci": bootstrap_ci(base_dev.correct).as_dict()})
    log(f"base: dev {base_dev.accuracy:.4f}, eval {base_eval.accuracy:.4f}")

    best_full, best_model, best_acc = None, None, -1.0
    for lr in sorted(_floats(args.lrs_full)):
        m = copy.deepcopy(model)
        res = tune(m, None, pool, epochs=args.epochs_full, batch_size=args.batch_size, lr=lr, progress=False)
        d = evaluate(m, dev)
        rows.append({"arm": "full", "lr": lr, "epochs": args.epochs_full, "dev": d.accuracy,
                     "dev_ci": bootstrap_ci(d.correct).as_dict(), "train_s": res.time_s, "steps": res.steps})
        log(f"full lr {lr:g}: dev {d.accuracy:.4f} ({res.time_s:.0f} s, {res.steps} steps)")
        if d.accuracy > best_acc:  # ties keep the smaller learning rate (the grid is ascending)
            best_full, best_model, best_acc = lr, m, d.accuracy
        del m
    full_eval = evaluate(best_model, ev)
    del best_model

    scores, scorer = score_heads_for_pipeline(model, target)
    ref = HeadPlan.for_model(model, "train")
    plan = HeadPlan.from_scores(scores, fraction=0.1, num_kv_heads=ref.num_kv_heads, model_family=ref.model_family)
    g = random.Random(0)
    subset = g.sample(pool, len(pool) // 10)
    heads = {}
    for epochs in sorted(int(e) for e in args.epochs_heads.split(",")):
        for lr in sorted(_floats(args.lrs_heads)):
            m = copy.deepcopy(model)
            res = tune(m, plan, subset, epochs=epochs, batch_size=args.batch_size, lr=lr, progress=False)
            d = evaluate(m, dev)
            heads[(lr, epochs)] = d
            rows.append({"arm": f"heads ({plan.count('train')} TRAIN heads, random 10% of the pool)", "lr": lr,
                         "epochs": epochs, "dev": d.accuracy, "dev_ci": bootstrap_ci(d.correct).as_dict(),
                         "train_s": res.time_s, "steps": res.steps})
            log(f"heads lr {lr:g}, {epochs} epochs: dev {d.accuracy:.4f} ({res.time_s:.0f} s)")
            del m
    # ties: the smaller learning rate, then fewer epochs (cheaper)
    best_heads = max(heads, key=lambda k: (heads[k].accuracy, -k[1], -k[0]))

    diff = paired_bootstrap_ci(full_eval.correct, base_eval.correct)
    report = {
        "task": DEFAULT_TASK_DESCRIPTION,
        "sizes": {k: len(v) for k, v in recs.items()},
        "pool_tasks": {t: sum(1 for r in recs["pool"] if r.get("task") == t) for t in
                       sorted({r.get("task") for r in recs["pool"]})},
        "config": vars(args),
        "rows": rows,
        "chosen_on_dev": {"lr_full": best_full, "epochs_full": args.epochs_full, "lr_heads": best_heads[0],
                          "epochs_heads": best_heads[1]},
        "eval": {"base": bootstrap_ci(base_eval.correct).as_dict(),
                 "full": bootstrap_ci(full_eval.correct).as_dict(),
                 "full_minus_base": diff.as_dict(),
                 "mcnemar_p": mcnemar_p(full_eval.correct, base_eval.correct),
                 "base_answer_nll": base_eval.answer_nll, "full_answer_nll": full_eval.answer_nll,
                 "n": len(ev)},
        "head_scorer": scorer,
        "environment": {**env, "load_average_end": environment()["load_average"]},
    }
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "pilot-analogy-mix.json"), json.dumps(report, indent=1, default=str))
    atomic_write_text(os.path.join(args.out, "pilot-analogy-mix.md"), markdown(report))
    print(markdown(report))
    return 0


def _load(v) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "-"


def _ci(d) -> str:
    return f"{d['estimate']:.4f} [{d['low']:.4f}, {d['high']:.4f}]"


def markdown(rep) -> str:
    env, e = rep["environment"], rep["eval"]
    lines = ["# Pilot: the embedded default task (analogy-in-a-mix, SmolLM2-135M-Instruct)", "",
             f"{env['date_utc']}, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"commit {env['commit']}; 1/5/15-min load average at the start {_load(env['load_average'])}, at the end "
             f"{_load(env['load_average_end'])}.", "", rep["task"], "",
             f"Sizes: {json.dumps(rep['sizes'])}; pool by task: {json.dumps(rep['pool_tasks'])}.", "",
             "## Choices, made on the dev split", "",
             "| arm | lr | epochs | dev accuracy [95% CI] | train s | steps |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rep["rows"]:
        lines.append(f"| {r['arm']} | {r['lr'] if r['lr'] is not None else '-'} | {r.get('epochs', '-')} | "
                     f"{_ci(r['dev_ci'])} | {r.get('train_s', 0):.0f} | {r.get('steps', '-')} |")
    c = rep["chosen_on_dev"]
    lines += ["", f"Chosen on dev: full fine-tuning lr {c['lr_full']:g} ({c['epochs_full']} epoch; more did not fit "
              f"the 10-minute budget of the main job), head-sparse lr {c['lr_heads']:g} with {c['epochs_heads']} "
              f"epochs.", "",
              "## Headroom on the held-out eval split (chosen settings, evaluated once)", "",
              "| | accuracy [95% CI] | answer NLL |", "| --- | --- | --- |",
              f"| base (untuned) | {_ci(e['base'])} | {e['base_answer_nll']:.3f} |",
              f"| full fine-tuning | {_ci(e['full'])} | {e['full_answer_nll']:.3f} |", "",
              f"Full minus base (paired bootstrap over the {e['n']} eval items): {_ci(e['full_minus_base'])}, "
              f"McNemar p = {e['mcnemar_p']:.2g}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
