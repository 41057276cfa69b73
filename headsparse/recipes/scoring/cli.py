"""``headsparse score``: score the heads of a model on a text file and write a HeadPlan.

    headsparse score --model PATH --data FILE --method hifi --fraction 0.1 [--layers 15:] --out plan.json

Writes ``plan.json`` (the HeadPlan), ``plan.scores.json`` (the HeadScores) and
``plan.heatmap.png`` (scores per layer and head, TRAIN heads marked), prints a
per-layer summary table. ``--data``: one text per line, or JSONL with a "text"
field (``.jsonl`` files, or any file whose first line is a JSON object).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List

from ..._atomic import atomic_path
from .._optional import load, require


def read_texts(path: str) -> List[str]:
    """Texts of a data file: one per non-empty line, or the "text" field of each JSONL record."""
    if not os.path.isfile(path):
        raise ValueError(f"--data: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise ValueError(f"--data: {path!r} holds no text")
    jsonl = path.endswith(".jsonl") or lines[0].lstrip().startswith("{")
    if not jsonl:
        return lines
    texts = []
    for n, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--data: line {n} of {path!r} is not JSON: {exc}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"--data: line {n} of {path!r} has no string 'text' field")
        texts.append(rec["text"])
    return texts


def load_model(path: str, dtype: str = "float32"):
    """(model, tokenizer) from a Hugging Face folder: a causal LM for decoder families, the bare model otherwise."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ._model import DECODER_FAMILIES

    if not os.path.isdir(path):
        raise ValueError(f"--model: {path!r} is not a Hugging Face model folder")
    cfg = AutoConfig.from_pretrained(path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cls = AutoModelForCausalLM if cfg.model_type in DECODER_FAMILIES else AutoModel
    model = cls.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def parse_options(items) -> dict:
    opts = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--option must be KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts


def write_heatmap(scores, plan, path: str, title: str) -> None:
    """A PNG heat map of the (layers x heads) scores; TRAIN heads of ``plan`` marked with a dot."""
    matplotlib = load("matplotlib", "the heat map (--heatmap none skips it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = scores.scores.numpy()
    nl, nh = s.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * nh + 2), max(3.0, 0.22 * nl + 1.5)))
    im = ax.imshow(s, aspect="auto", cmap="viridis", origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="score")
    if plan is not None:
        pts = [(h, i) for i in range(nl) for h in plan.heads(i, "train")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, c="red", marker="o", label="TRAIN")
            ax.legend(loc="upper right", fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def add_parser(sub) -> argparse.ArgumentParser:
    from . import METHODS

    p = sub.add_parser("score", help="score attention heads on a text file and write a HeadPlan",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--data", required=True, help="text file (one text per line) or JSONL with a 'text' field")
    p.add_argument("--method", default="gradient", choices=METHODS)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--fraction", type=float, default=None, help="TRAIN the global top fraction (default 0.1)")
    sel.add_argument("--per-layer-k", type=int, default=None, help="TRAIN the top k heads of every layer")
    p.add_argument("--layers", default=None, metavar="START:STOP",
                   help="placement: TRAIN heads only in these layers, START:STOP (STOP excluded; 'START:' runs to the "
                        "last layer) or a comma list; the same number of heads as without it. Below the lowest one no "
                        "autograd graph is kept (the gradient horizon)")
    p.add_argument("--prune-fraction", type=float, default=None, help="PRUNE the lowest-scoring fraction")
    p.add_argument("--kv-policy", default="any", choices=("any", "all", "none"))
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--scores-out", default=None, help="scores JSON (default: <out>.scores.json)")
    p.add_argument("--heatmap", default=None, help="heat map PNG (default: <out>.heatmap.png; 'none' to skip)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option damping=0.9 (value parsed as JSON when possible)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def parse_layers(text):
    """``--layers``: "START:STOP" (STOP excluded, empty = to the end), "START:", or "i,j,k"; None stays None."""
    if text is None:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start = int(a) if a.strip() else 0
            return ("range", start, int(b) if b.strip() else None)
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be START:STOP, START: or a comma list of layer indices, got {text!r}") from None


def _layers_for(spec, num_layers: int):
    if spec is None or isinstance(spec, list):
        return spec
    _, start, stop = spec
    return range(start, num_layers if stop is None else stop)


def _stem(out: str) -> str:
    return out[:-5] if out.endswith(".json") else out


def run(args) -> int:
    """``headsparse score``: a bad argument or input ends with a one-line message naming it, no traceback."""
    try:
        return _run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"headsparse score: {e}") from None


def _run(args) -> int:
    import time

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")
    from . import score_heads

    fraction = args.fraction if args.fraction is not None or args.per_layer_k is not None else 0.1
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"--fraction must be in [0, 1], got {fraction}")
    layers = parse_layers(args.layers)
    texts = read_texts(args.data)
    opts = parse_options(args.option)
    if (args.heatmap or "").lower() != "none":  # before any work, not after the scores are written
        require("matplotlib", "the heat map (--heatmap none skips it)")
    model, tok = load_model(args.model, args.dtype)
    t0 = time.perf_counter()
    scores = score_heads(model, texts, args.method, tokenizer=tok, batch_size=args.batch_size,
                         max_length=args.max_length, max_samples=args.max_samples, seed=args.seed,
                         progress=not args.no_progress, **opts)
    elapsed = time.perf_counter() - t0
    plan = scores.to_plan(fraction=fraction, per_layer_k=args.per_layer_k, prune_fraction=args.prune_fraction,
                          layers=_layers_for(layers, scores.num_layers), kv_policy=args.kv_policy)
    stem = _stem(args.out)
    scores_out = args.scores_out or stem + ".scores.json"
    heatmap = args.heatmap or stem + ".heatmap.png"
    plan.save(args.out)
    scores.save(scores_out)
    if heatmap.lower() != "none":
        write_heatmap(scores, plan, heatmap, f"{args.method} scores, {os.path.basename(args.model.rstrip('/'))}")
    print(scores.summary(plan))
    print(f"train {plan.count('train')} heads ({100 * plan.trainable_fraction:.1f}%), pruned {plan.count('pruned')}; "
          f"{scores.num_samples} samples, {scores.num_tokens} tokens, {elapsed:.1f} s "
          f"({scores.num_tokens / max(elapsed, 1e-9):.0f} tokens/s)")
    print(plan.horizon_text())
    print(f"wrote {args.out}, {scores_out}" + ("" if heatmap.lower() == "none" else f", {heatmap}"))
    return 0
