"""The fair test of the claim at a larger size: the main job's design (every arm of FAIR_ARMS on capitals-in-a-mix)
on a pool of 3,000 records (target share 10%, mining recall ceiling 1.0) and 500 held-out analogies.

Epochs and learning rates come from the committed dev-split search (benchmarks/results/fair-search-smollm2.json,
written by ``headsparse run --search --stem fair-search-smollm2``; without it, the priors the report names as not
searched). The same epochs on five times the data train five times the steps, never fewer than the search chose.

    python benchmarks/bench_fair.py [--threads 2] [--pool-size 3000] [--eval-size 500] [--out benchmarks/results]

Writes fair-smollm2-<pool>.{json,md,png}. Budget: within 60 minutes on 2 cores (quiet machine); measure it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-size", type=int, default=3000)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--model", default="smollm2", help="smollm2, or tiny for a seconds-long smoke run")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--settings-from", default=None, help="a search report JSON (default: the committed one)")
    args, rest = ap.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from headsparse.recipes.cli import main as cli

    stem = f"fair-{'tiny' if args.model == 'tiny' else 'smollm2'}-{args.pool_size}"
    argv = ["run", "--design", "fair", "--model", args.model, "--threads", str(args.threads), "--pool-size",
            str(args.pool_size), "--eval-size", str(args.eval_size), "--out", args.out, "--stem", stem, "--no-progress"]
    if args.settings_from:
        argv += ["--settings-from", args.settings_from]
    return cli(argv + rest)


if __name__ == "__main__":
    sys.exit(main())
