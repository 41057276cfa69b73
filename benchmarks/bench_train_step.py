"""One training step (forward, backward, AdamW): time and peak memory, per fine-tuning method.

Methods:
  full               every parameter trainable (sdpa attention)
  lora16             LoRA r=16 (alpha 32) on q/k/v/o via peft (sdpa attention); needs ``pip install peft``
  hs-exact-spread    headsparse, 10% of heads TRAIN, spread over all layers, grad="exact"
  hs-sparse-spread   same plan, grad="sparse"
  hs-exact-top       headsparse, 10% of heads TRAIN, all in the top half of the layers, grad="exact"
  hs-sparse-top      same plan, grad="sparse"
  hs-*-cached        the same four with the frozen-prefix cache (headsparse.PrefixCache): "epoch one" steps each
                     take a new batch (the prefix runs and its output is stored), "later epochs" steps replay
                     those batches from the cache (the layers below the horizon do not run). The main step
                     columns are the later epochs; the epoch-one columns and the cache's bytes are beside them.

Each method runs in its own subprocess (fresh memory). Memory:
  - CUDA: ``torch.cuda.max_memory_allocated()`` during the steps minus the allocation before the first step.
  - CPU: peak resident set size (VmHWM from /proc/self/status, reset through /proc/self/clear_refs) during the
    steps minus the RSS before the first step. This is process RSS, so it includes allocator caching; it is not
    tracemalloc (which does not see torch's allocations).
  Also reported, exactly: bytes of gradients + AdamW state, and bytes saved for backward in one forward
  (``torch.autograd.graph.saved_tensors_hooks``).
Time: the minimum and the median of the measured steps after one warm-up step (on a shared machine the
minimum is the more stable figure).

Usage:
  python benchmarks/bench_train_step.py --model smollm2 --batch 2 --seq 256 --steps 3          # CPU
  python benchmarks/bench_train_step.py --model smollm2-random,llama-1b --batch 1 --seq 2048   # GPU
Writes JSON (--out) and markdown (--md) and prints the markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("full", "lora16", "hs-exact-spread", "hs-sparse-spread", "hs-exact-top", "hs-sparse-top",
           "hs-exact-spread-cached", "hs-sparse-spread-cached", "hs-exact-top-cached", "hs-sparse-top-cached")
MODELS = ("smollm2", "smollm2-random", "llama-1b", "tiny")
TRAIN_FRACTION = 0.10


# ------------------------------------------------------------------ worker side
def _build_model(name: str, dtype, device):
    import torch
    import transformers

    if name == "smollm2":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from _hs_models import smollm2_dir

        return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype,
                                                             attn_implementation="sdpa").to(device)
    if name == "smollm2-random":  # SmolLM2-135M's shape, random weights (same time and memory)
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    elif name == "llama-1b":  # Llama-3.2-1B's shape, random weights
        cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                       tie_word_embeddings=True, rope_theta=500000.0)
    elif name == "tiny":
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2)
    else:
        raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).to(dtype)


def _plan(model, where: str):
    import torch

    import headsparse as hs

    c = model.config
    nl, nq = c.num_hidden_layers, c.num_attention_heads
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(nl, nq, generator=g)
    if where == "top":  # only heads in the top half of the layers can be chosen
        scores[: nl // 2] -= 10.0
    return hs.HeadPlan.from_scores(scores, fraction=TRAIN_FRACTION, num_kv_heads=c.num_key_value_heads,
                                   model_family="llama")


def _setup(method: str, model):
    if method == "full":
        return model, None
    if method == "lora16":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        return get_peft_model(model, cfg), None
    import headsparse as hs

    _, grad, where = method.split("-")[:3]
    plan = _plan(model, where)
    hs.patch(model, plan, grad=grad)
    return model, plan


def _sparse_vs_exact_cosine(args, model, plan, ids) -> float:
    """Cosine similarity of the sparse-mode gradient of the trainable slices to the exact one (same batch, same
    weights as after the measured steps)."""
    import copy

    import torch

    import headsparse as hs

    exact = hs.patch(hs.unpatch(copy.deepcopy(model)), plan, grad="exact")
    grads = []
    for m in (model, exact):
        m.train()
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.float().flatten() for n, p in sorted(m.named_parameters())
                                if p.requires_grad]))
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = _build_model(args.model, dtype, device)
    model, plan = _setup(args.method, model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    cached = args.method.endswith("-cached")
    # cached methods: one new batch per step of "epoch one" (each a cache miss), replayed in the later epochs
    epoch_ids = [ids] + [torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
                         for _ in range(args.steps)] if cached else None

    # saved-for-backward bytes of one forward (exact, backend independent)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    gc.collect()

    def step(x=None):
        x = ids if x is None else x
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        return float(loss)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        from _rss import RssMeter

        meter = RssMeter(interval_s=0.002).start()
    times, epoch1_times, cache, cache_stats = [], [], None, None
    if cached:
        import headsparse as hs

        cache = hs.PrefixCache().attach(model)
        for i, x in enumerate(epoch_ids):  # epoch one: every batch new (the first is the warm-up)
            sync()
            t0 = time.perf_counter()
            step(x)
            sync()
            if i > 0:
                epoch1_times.append(time.perf_counter() - t0)
    for i in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        step(epoch_ids[i] if cached else None)
        sync()
        if i > 0:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else meter.stop()
    if cache is not None:
        cache_stats = cache.stats()
        if cache_stats["hits"] != args.steps + 1 or cache_stats["misses"] != args.steps + 1:
            raise RuntimeError(f"prefix cache: expected {args.steps + 1} misses then as many hits, got {cache_stats}")
        cache.detach(clear=True)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    cosine = _sparse_vs_exact_cosine(args, model, plan, ids) if "sparse" in args.method else None
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    return {
        "method": args.method, "model": args.model, "device": str(device), "dtype": args.dtype,
        "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_all": times,
        "peak_mem_bytes": int(peak),
        "peak_mem_kind": "cuda max_memory_allocated delta" if device.type == "cuda" else
        f"RSS {meter.method} delta",
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "grad_plus_adam_bytes": grad_bytes + state_bytes,
        "saved_activation_bytes": saved[0],
        "trainable_head_fraction": None if plan is None else plan.trainable_fraction,
        "lowest_trainable_layer": None if plan is None else plan.lowest_trainable_layer,
        "threads": torch.get_num_threads(),
        "grad_cosine_vs_exact": cosine,
        "epoch1_step_s_median": statistics.median(epoch1_times) if epoch1_times else None,
        "epoch1_step_s_min": min(epoch1_times) if epoch1_times else None,
        "cache_bytes": None if cache_stats is None else cache_stats["bytes"],
        "cache_bytes_per_token": None if cache_stats is None else cache_stats["bytes"] // cache_stats["tokens"],
    }


# ------------------------------------------------------------------ driver side
def _mb(b):
    return f"{b / 2**20:,.1f}"


def markdown(results, meta) -> str:
    lines = [
        f"# One training step: {meta['date']}",
        "",
        f"device: {meta['device_name']}; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, peft {meta['versions']['peft']}; commit {meta['commit']}",
        f"peak memory = {results[0]['peak_mem_kind'] if results else '-'} over the state before the first step "
        "(CPU: process RSS, includes allocator caching); grad+Adam and saved activations are exact tensor bytes.",
        f"headsparse methods train {int(TRAIN_FRACTION * 100)}% of the query heads (spread = anywhere, top = top half "
        "of the layers); exact = true gradient, sparse = frozen heads treated as constants. full and lora16 use "
        "sdpa attention, headsparse its own op. -cached: frozen-prefix cache; step time = later epochs (replayed "
        "from the cache), epoch one (prefix run and stored, a new batch per step) beside it; peak memory includes "
        "the cache, whose bytes are also given. vs full / vs lora16: minimum step time over theirs in this table.",
        f"torch threads per worker: {sorted({r.get('threads') for r in results if 'threads' in r})}; "
        f"1/5/15-minute load average at the end: {meta.get('load_average')} (other jobs shared this machine: "
        "times are noisy)." if meta.get("load_average") else "",
        "",
    ]
    for (model, batch, seq, dtype), rows in _group(results).items():
        lines += [f"## {model}, batch {batch}, seq {seq}, {dtype}", "",
                  "| method | step time min / median (s) | peak mem (MB) | grad+Adam (MB) | saved activations (MB) | trainable params "
                  "| grad cosine vs exact | epoch-one step min / median (s) | cache (MB) | vs full | vs lora16 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        ref = {r["method"]: r["step_s_min"] for r in rows if "error" not in r and r["method"] in ("full", "lora16")}

        def ratio(r, m):
            return f"{r['step_s_min'] / ref[m]:.2f}" if m in ref and ref[m] > 0 else ""

        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | | | | |")
                continue
            e1 = ("" if r.get("epoch1_step_s_min") is None
                  else f"{r['epoch1_step_s_min']:.2f} / {r['epoch1_step_s_median']:.2f}")
            extra = (f" {e1} | {'' if r.get('cache_bytes') is None else _mb(r['cache_bytes'])} | "
                     f"{ratio(r, 'full')} | {ratio(r, 'lora16')} |")
            lines.append(f"| {r['method']} | {r['step_s_min']:.2f} / {r['step_s_median']:.2f} | {_mb(r['peak_mem_bytes'])} | "
                         f"{_mb(r['grad_plus_adam_bytes'])} | {_mb(r['saved_activation_bytes'])} | "
                         f"{r['trainable_params']:,} | "
                         f"{'' if r.get('grad_cosine_vs_exact') is None else format(r['grad_cosine_vs_exact'], '.4f')} |"
                         + extra)
        lines.append("")
    return "\n".join(lines)


def _group(results):
    out = {}
    for r in results:
        out.setdefault((r["model"], r["batch"], r["seq"], r["dtype"]), []).append(r)
    return out


def _write(args, results, quiet: bool) -> None:
    """The JSON (--out) and markdown (--md) reports, each written to a temporary name and renamed."""
    from headsparse.provenance import device_name, git_commit, versions

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_name": device_name(args.device), "versions": versions(), "commit": git_commit(short=True),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    md = markdown(results, meta)
    if not quiet:
        print(md)
    from headsparse._atomic import atomic_write_text

    for path, text in ((args.out, json.dumps({"meta": meta, "results": results}, indent=1)), (args.md, md)):
        if path:
            atomic_write_text(path, text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help=f"comma-separated, from {MODELS}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--md", default=None, help="markdown output path")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    if "lora16" in methods and not args.worker:
        from headsparse.recipes._optional import MissingPackageError, require

        try:
            require("peft", "the lora16 baseline (--methods without lora16 skips it)")
        except MissingPackageError as e:
            raise SystemExit(f"bench_train_step: {e}") from None
    results = []
    for model in args.model.split(","):
        if model not in MODELS:
            ap.error(f"unknown model {model!r}; choose from {MODELS}")
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--model", model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--device", args.device, "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                r = {"method": method, "model": model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
                     "error": err}
            else:
                r = json.loads(line[-1][len("RESULT "):])
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("model", "method", "step_s_median", "peak_mem_bytes", "error")}),
                  file=sys.stderr, flush=True)
            _write(args, results, quiet=True)  # after every method: a run stopped at a time limit keeps its rows
    _write(args, results, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
