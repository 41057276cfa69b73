"""Head-scoring throughput and split-half rank agreement (issue 5).

Throughput (``--mode speed``, default): SmolLM2-135M, batches of B sequences of S tokens
(real English text: the license texts under /usr/share/common-licenses, tokenized and cut into
S-token windows, no padding). Per batch, median over interleaved repetitions, of:

* ``plain_fwd_bwd``: the model as for training (sdpa attention, every parameter requires grad),
  HF loss, ``backward()``; the reference cost;
* ``forward_only``: the same forward without a graph: a lower bound for any score that needs
  a backward (the backward of the activations alone costs about one more forward);
* ``gradient``, ``apt``, ``hifi``, ``alps`` (one proxy AdamW step + distances), ``random``:
  ``headsparse.score_heads`` on the same batch;
* ``gradient_per_example`` / ``apt_per_example``: the same methods fed one sample at a time
  (batch size 1, as Michel's script runs);
* ``michel_per_example``: Michel's procedure literally: batch size 1, an explicit gate per head
  (hooked into the o_proj input), every parameter requiring grad, ``backward()`` per sample.

Agreement (``--mode agreement``): the texts are cut into chunks of ``--words`` words, split into two
disjoint halves (even / odd chunks); each method scores each half; Spearman's rho between the two
halves' (layers x heads) score tables, for SmolLM2-135M and MiniLM-L6.

Usage::

    python benchmarks/bench_scoring.py --mode speed --out benchmarks/results/scoring_cpu
    python benchmarks/bench_scoring.py --mode agreement --out benchmarks/results/scoring_agreement_cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import transformers  # noqa: E402

import headsparse as hs  # noqa: E402
from headsparse.recipes.scoring import model_info, scoring_loss, spearman  # noqa: E402

LICENSES = ["GPL-3", "Apache-2.0", "GFDL-1.3", "LGPL-3", "MPL-2.0"]


def corpus_text(paths=None) -> str:
    paths = paths or [f"/usr/share/common-licenses/{n}" for n in LICENSES]
    parts = []
    for p in paths:
        if os.path.exists(p):
            parts.append(Path(p).read_text(errors="replace"))
    if not parts:
        raise SystemExit("no text found: pass --texts FILE")
    return "\n".join(parts)


def load_smollm2():
    from _hs_models import smollm2_dir

    path = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), tok


def load_minilm():
    from _hs_models import minilm_dir

    path = minilm_dir()
    return (transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def environment(device: str = "cpu") -> dict:
    """The shared provenance record, flattened into the fields this script's reports print."""
    from headsparse.provenance import provenance

    rec = provenance(device)
    commit = rec["commit"] or "unknown"
    return {"device": f"{'CPU' if device == 'cpu' else 'GPU'}: {rec['device_name']}", "cpu_count": rec["cpu_count"],
            "torch_threads": rec["torch_threads"], **{k: rec["versions"][k] for k in ("torch", "transformers", "python")},
            "headsparse_commit": commit.replace("+dirty", ""), "headsparse_dirty": commit.endswith("+dirty"),
            "date_utc": rec["date_utc"], "loadavg_start": rec["load_average"]}


# ------------------------------------------------------------------- speed
def plain_fwd_bwd(model, batch):
    for p in model.parameters():
        p.requires_grad_(True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def forward_only(model, batch):
    """The floor of any exact gradient score: one forward with the loss, no graph."""
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"])


def michel_per_example(model, batch):
    """Michel et al.'s script: batch size 1, explicit head gates, all parameters require grad."""
    info = model_info(model)
    L, H, D = info.num_layers, info.num_q_heads, info.head_dim
    dev, dtype = batch["input_ids"].device, next(model.parameters()).dtype
    gates = [torch.ones(H, device=dev, dtype=dtype, requires_grad=True) for _ in range(L)]
    hooks = [info.o_module(i).register_forward_pre_hook(
        lambda m, a, i=i: (a[0] * gates[i].repeat_interleave(D),)) for i in range(L)]
    for p in model.parameters():
        p.requires_grad_(True)
    total = torch.zeros(L, H, device=dev)
    try:
        for r in range(batch["input_ids"].shape[0]):
            smp = {"input_ids": batch["input_ids"][r:r + 1], "attention_mask": batch["attention_mask"][r:r + 1]}
            loss = scoring_loss(model, info, smp)[0]
            loss.backward()
            total += torch.stack([g.grad.abs() for g in gates])
            for g in gates:
                g.grad = None
            model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return total


def singles(batch):
    return [{"input_ids": batch["input_ids"][r:r + 1], "attention_mask": batch["attention_mask"][r:r + 1]}
            for r in range(batch["input_ids"].shape[0])]


def speed_model(args):
    """(model, token ids of the corpus): the packaged SmolLM2, or its shape with random weights (``smollm2-random``,
    for machines without the model package, such as the GPU box: the throughput does not depend on the weights)."""
    S, B = args.seq, args.batch
    need = B * S * args.batches
    if args.model == "smollm2":
        model, tok = load_smollm2()
        ids = tok(corpus_text(args.texts), return_tensors="pt")["input_ids"][0]
        if ids.numel() < need:
            raise SystemExit(f"corpus has {ids.numel()} tokens, need {need}")
    else:
        from bench_train_step import _build_model

        model = _build_model("smollm2-random", torch.float32, "cpu").eval()
        ids = torch.randint(0, model.config.vocab_size, (need,), generator=torch.Generator().manual_seed(0))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return model.to(device=args.device, dtype=dtype), ids


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run_speed(args):
    model, ids = speed_model(args)
    S, B = args.seq, args.batch
    batches = [{"input_ids": ids[k * B * S:(k + 1) * B * S].view(B, S).clone().to(args.device),
                "attention_mask": torch.ones(B, S, dtype=torch.long, device=args.device)}
               for k in range(args.batches)]
    cases = {
        "plain_fwd_bwd": lambda b: plain_fwd_bwd(model, b),
        "forward_only": lambda b: forward_only(model, b),
        "gradient": lambda b: hs.score_heads(model, [b], "gradient"),
        "apt": lambda b: hs.score_heads(model, [b], "apt"),
        "hifi": lambda b: hs.score_heads(model, [b], "hifi"),
        "alps": lambda b: hs.score_heads(model, [b], "alps", steps=1),
        "random": lambda b: hs.score_heads(model, [b], "random"),
        "gradient_per_example": lambda b: hs.score_heads(model, singles(b), "gradient"),
        "apt_per_example": lambda b: hs.score_heads(model, singles(b), "apt"),
        "michel_per_example": lambda b: michel_per_example(model, b),
    }
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",") or k == "plain_fwd_bwd"}
    env = environment(args.device)
    times = {k: [] for k in cases}
    warm = {k: v[:, :16] for k, v in batches[0].items()}
    for name, fn in cases.items():  # warm-up on a short batch (first-call allocations, lazy imports)
        fn(warm)
    for rep in range(args.reps):
        for b in batches:
            for name, fn in cases.items():  # interleaved, so machine-load drift hits every case alike
                times[name].append(_timed(lambda: fn(b), args.device))
                print(f"rep {rep} {name:22s} {times[name][-1]:8.2f} s", flush=True)
    tokens = B * S
    rows = []
    base = statistics.median(times["plain_fwd_bwd"])
    pe = {m: statistics.median(times[f"{m}_per_example"]) for m in ("gradient", "apt") if f"{m}_per_example" in times}
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"case": name, "median_s_per_batch": med, "min_s": min(ts), "max_s": max(ts), "n": len(ts),
               "tokens_per_s": tokens / med, "x_plain_fwd_bwd": med / base}
        if name in pe:
            row["speedup_vs_per_example"] = pe[name] / med
        rows.append(row)
    env["loadavg_end"] = os.getloadavg()
    name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "SmolLM2-135M shape, random weights"
    res = {"benchmark": "scoring throughput", "model": f"{name} ({args.dtype}, {args.device})", "batch": B, "seq": S,
           "batches": args.batches, "reps": args.reps, "environment": env, "rows": rows,
           "michel_per_example_speedup_of_gradient": (statistics.median(times["michel_per_example"]) /
                                                      statistics.median(times["gradient"]))
           if "michel_per_example" in times and "gradient" in times else None,
           "michel_per_example_over_forward_only": (statistics.median(times["michel_per_example"]) /
                                                    statistics.median(times["forward_only"]))
           if "michel_per_example" in times and "forward_only" in times else None}
    write(args.out, res, speed_markdown(res))


def speed_markdown(res) -> str:
    env = res["environment"]
    lines = [f"# Head-scoring throughput, {res['model']}, B{res['batch']} S{res['seq']}", "",
             f"{env['device']}, {env['cpu_count']} cores ({env['torch_threads']} torch threads); torch {env['torch']}, "
             f"transformers {env['transformers']}, Python {env['python']}; headsparse {env['headsparse_commit'][:10]}"
             f"{' (dirty)' if env['headsparse_dirty'] else ''}; {env['date_utc']}.",
             f"Load average at start {tuple(round(x, 2) for x in env['loadavg_start'])}, at end "
             f"{tuple(round(x, 2) for x in env['loadavg_end'])} (a shared machine: absolute times are noisy; "
             f"cases were interleaved so ratios are fairer).", "",
             f"Median over {res['reps']} repetitions x {res['batches']} batches of {res['batch']} x {res['seq']} tokens.",
             "", "| case | s / batch (median) | min | max | tokens/s | x plain fwd+bwd | speedup vs per-example |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        sp = f"{r['speedup_vs_per_example']:.2f}x" if "speedup_vs_per_example" in r else ""
        lines.append(f"| {r['case']} | {r['median_s_per_batch']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['x_plain_fwd_bwd']:.2f} | {sp} |")
    if res.get("michel_per_example_speedup_of_gradient"):
        lines += ["", f"gradient (batched) vs Michel's literal per-example procedure: "
                      f"{res['michel_per_example_speedup_of_gradient']:.2f}x faster."]
    if res.get("michel_per_example_over_forward_only"):
        lines += ["", f"Ceiling for any score that needs a forward of the batch: Michel per-example / forward only = "
                      f"{res['michel_per_example_over_forward_only']:.2f}x (a backward, needed for exact gradients, "
                      f"adds about one more forward)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------- agreement
def chunks(text: str, words: int, n: int):
    w = text.split()
    out = [" ".join(w[i:i + words]) for i in range(0, len(w) - words + 1, words)]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} chunks of {words} words, need {n}")
    return out[:n]


def run_agreement(args):
    texts = chunks(corpus_text(args.texts), args.words, args.chunks)
    halves = (texts[0::2], texts[1::2])
    env = environment()
    results = []
    for name, loader in (("SmolLM2-135M", load_smollm2), ("MiniLM-L6", load_minilm)):
        if args.models and name not in args.models.split(","):
            continue
        model, tok = loader()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        per_method = {}
        for method in args.methods.split(","):
            kw = {"steps": None} if method == "alps" else {}
            t = time.perf_counter()
            a = hs.score_heads(model, halves[0], method, tokenizer=tok, batch_size=args.batch_size,
                               max_length=args.max_length, seed=0, **kw)
            b = hs.score_heads(model, halves[1], method, tokenizer=tok, batch_size=args.batch_size,
                               max_length=args.max_length, seed=1 if method == "random" else 0, **kw)
            rho = a.spearman(b)
            top = max(1, round(0.1 * a.scores.numel()))
            ta, tb = set(a.ranking()[:top]), set(b.ranking()[:top])
            per_method[method] = (a, b)
            row = {"model": name, "method": method, "spearman_halves": rho, "top10pct_overlap": len(ta & tb) / top,
                   "samples_per_half": a.num_samples, "tokens_half_a": a.num_tokens, "tokens_half_b": b.num_tokens,
                   "seconds": time.perf_counter() - t}
            if "pagerank_iterations" in a.info:
                row["pagerank_iterations"] = [a.info["pagerank_iterations"], b.info["pagerank_iterations"]]
            print(json.dumps(row), flush=True)
            results.append(row)
        names = list(per_method)
        cross = {}
        for i, m in enumerate(names):
            for n in names[i + 1:]:
                sa = per_method[m][0].scores + per_method[m][1].scores
                sb = per_method[n][0].scores + per_method[n][1].scores
                cross[f"{m}~{n}"] = spearman(sa.flatten(), sb.flatten())
        results.append({"model": name, "cross_method_spearman_full_data": cross})
        del model
    env["loadavg_end"] = os.getloadavg()
    res = {"benchmark": "scoring split-half agreement", "chunks": args.chunks, "words_per_chunk": args.words,
           "max_length": args.max_length, "corpus": "license texts in /usr/share/common-licenses: " + ", ".join(LICENSES)
           if not args.texts else args.texts, "environment": env, "rows": results}
    write(args.out, res, agreement_markdown(res))


def agreement_markdown(res) -> str:
    env = res["environment"]
    lines = ["# Head-score rank agreement between two disjoint halves of the data", "",
             f"Corpus: {res['corpus']}; {res['chunks']} chunks of {res['words_per_chunk']} words, even chunks vs "
             f"odd chunks, max length {res['max_length']} tokens. {env['device']}; torch {env['torch']}, transformers "
             f"{env['transformers']}; headsparse {env['headsparse_commit'][:10]}; {env['date_utc']}. ALPS: one proxy "
             "pass over each half (AdamW, lr 1e-4). random: different seeds per half (the expected rho is 0).", "",
             "| model | method | Spearman rho (half A vs B) | top-10% overlap | samples / half | seconds |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    cross = []
    for r in res["rows"]:
        if "method" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['spearman_halves']:.3f} | {r['top10pct_overlap']:.2f} | "
                         f"{r['samples_per_half']} | {r['seconds']:.0f} |")
        else:
            cross.append(r)
    for c in cross:
        lines += ["", f"Cross-method Spearman on all the data, {c['model']}: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in c["cross_method_spearman_full_data"].items())]
    return "\n".join(lines) + "\n"


def write(out: str, res: dict, md: str):
    from headsparse._atomic import atomic_write_text

    atomic_write_text(out + ".json", json.dumps(res, indent=1))
    atomic_write_text(out + ".md", md)
    print(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("speed", "agreement"), default="speed")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    ap.add_argument("--texts", nargs="*", default=None, help="text files (default: the license texts)")
    ap.add_argument("--model", choices=("smollm2", "smollm2-random"), default="smollm2", help="speed mode's model")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="speed mode's device")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="speed mode's model dtype")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default=None, help="comma-separated subset of cases (speed)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--words", type=int, default=80)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--methods", default="gradient,apt,hifi,alps,random")
    ap.add_argument("--models", default=None, help="comma-separated subset: SmolLM2-135M,MiniLM-L6")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (run_speed if args.mode == "speed" else run_agreement)(args)


if __name__ == "__main__":
    main()
