"""Attention speed and saved-activation memory: SDPA, FlexAttention, headsparse dense and head-sparse.

Claim under test: dense headsparse is as fast as SDPA's flash backend,
and the backward of a call with a fraction f of heads in ``grad_heads`` costs
about f of the dense backward and saves about f of its activations; a call with half its heads pruned
(``pruned0.5``, the other half trained) costs about half in both passes.

Usage (GPU)::

    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100

Usage (CPU smoke run, torch backend, tiny shapes)::

    python benchmarks/bench_attention.py --device cpu --quick

Each row: one provider at one (S, D, causal). Batch = tokens // S, heads =
hidden // D. FLOPs follow the FlashAttention convention: forward
4*B*H*S*S*D (halved when causal), backward 2.5x forward; for a grad fraction
f the backward FLOPs are scaled by f (the work that is actually needed), so
TFLOP/s columns compare useful throughput.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import headsparse as hs  # noqa: E402
from headsparse._atomic import atomic_write_text  # noqa: E402
from headsparse.ops.memory import saved_tensor_bytes  # noqa: E402
from headsparse.provenance import provenance  # noqa: E402

GRAD_FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.0)


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100))

    def cpu_time(fn, reps=3):
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    return cpu_time


def _flex_provider(causal: bool):
    """FlexAttention compiled for this run (a block mask per shape when causal), or None if it cannot run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # reported, not hidden
        print(f"FlexAttention unavailable: {exc}", file=sys.stderr)
        return None
    cache = {}

    def flex_fn(q, k, v):
        if not causal:
            return flex(q, k, v)
        key = (q.shape[2], k.shape[2])
        if key not in cache:
            cache[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, key[0], key[1], device=q.device)
        return flex(q, k, v, block_mask=cache[key])

    return flex_fn


def _providers(args, heads: int, causal: bool, seq: int):
    """(name, grad fraction, fn(q, k, v) -> out) for every provider that runs here."""
    out = []
    if args.device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        out.append(("sdpa-flash", 1.0, sdpa))
        if args.flex_seqs is None or seq in args.flex_seqs:
            flex_fn = _flex_provider(causal)
            if flex_fn is not None:
                out.append(("flex", 1.0, flex_fn))
    else:
        out.append(("sdpa", 1.0, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal)))
    for name in args.backends:
        backend = name.partition(":")[0]  # "torch:sdpa": the torch backend on one path (set by _provider_env)
        out.append((f"hs-{name}-dense", 1.0,
                    lambda q, k, v, b=backend: hs.attention(q, k, v, causal=causal, backend=b)))
        gen = torch.Generator().manual_seed(heads)
        for frac in GRAD_FRACTIONS:
            n = round(frac * heads)
            # head masks stay on the CPU, as a patched model passes them (no device sync per call)
            mask = torch.zeros(heads, dtype=torch.bool)
            mask[torch.randperm(heads, generator=gen)[:n]] = True
            out.append((f"hs-{name}-grad{frac:g}", n / heads,
                        lambda q, k, v, b=backend, m=mask: hs.attention(q, k, v, grad_heads=m, causal=causal,
                                                                        backend=b)))
        if backend == "cuda":  # the same kernels' CUDA-core family, to show what the tensor cores bring
            out.append(("hs-cuda-cudacores-dense", 1.0,
                        lambda q, k, v: hs.attention(q, k, v, causal=causal, backend="cuda")))
        pruned = torch.zeros(heads, dtype=torch.bool)
        pruned[torch.randperm(heads, generator=gen)[: heads // 2]] = True
        # half the heads pruned, the other half trained: forward and backward should both halve
        out.append((f"hs-{name}-pruned0.5", 1.0 - pruned.float().mean().item(),
                    lambda q, k, v, b=backend, m=pruned: hs.attention(q, k, v, grad_heads=~m, pruned_heads=m,
                                                                      causal=causal, backend=b)))
    return out


def bench_one(args, seq: int, head_dim: int, causal: bool, timer):
    batch = max(1, args.tokens // seq)
    heads = args.hidden // head_dim
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=args.device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(shape, device=args.device, dtype=dtype, generator=gen)
    fwd_flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    rows = []
    for name, frac, fn in _providers(args, heads, causal, seq):
        with _provider_env(name):
            rows.append(_bench_provider(name, frac, fn, q, k, v, do, fwd_flops, timer,
                                        dict(seq=seq, head_dim=head_dim, causal=causal, batch=batch, heads=heads),
                                        args.dtype))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def _provider_env(name: str):
    """Environment a provider runs under (forward and backward): the CUDA-core row switches tensor cores off, and
    an "hs-torch:PATH-..." row forces the torch backend's path (HEADSPARSE_TORCH_PATH)."""
    overrides = {"HEADSPARSE_CUDA_TENSOR_CORES": "0"} if name == "hs-cuda-cudacores-dense" else {}
    if name.startswith("hs-torch:"):
        overrides["HEADSPARSE_TORCH_PATH"] = name[len("hs-torch:"):].rsplit("-", 1)[0]
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


def _bench_provider(name, frac, fn, q, k, v, do, fwd_flops, timer, shape, dtype: str) -> dict:
    """One row: forward, backward and fwd+bwd times, saved bytes and throughput of provider ``name``."""
    # a half-pruned call computes only its unpruned heads (all of them trained): count only that work
    computed = frac if name.endswith("-pruned0.5") else 1.0
    row = dict(provider=name, **shape, grad_fraction=frac, computed_fraction=computed, dtype=dtype)
    try:
        with torch.no_grad():
            row["fwd_ms"] = timer(lambda: fn(q, k, v))
        out = fn(q, k, v)
        if out.requires_grad:
            row["bwd_ms"] = timer(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True,
                                                              allow_unused=True))

            def step():
                o = fn(q, k, v)
                torch.autograd.grad(o, (q, k, v), do, allow_unused=True)

            row["fwd_bwd_ms"] = timer(step)
        else:  # grad fraction 0: the backward has nothing to do
            row["bwd_ms"] = 0.0
            row["fwd_bwd_ms"] = timer(lambda: fn(q, k, v))
        out = None  # free the graph before the next measurement
        row["saved_bytes"] = saved_tensor_bytes(lambda: fn(q, k, v))[0]
        row["fwd_tflops"] = fwd_flops * computed / row["fwd_ms"] / 1e9
        bwd_flops = 2.5 * fwd_flops * frac
        row["bwd_tflops"] = bwd_flops / row["bwd_ms"] / 1e9 if row["bwd_ms"] > 0 else None
        row["fwd_bwd_tflops"] = (fwd_flops * computed + bwd_flops) / row["fwd_bwd_ms"] / 1e9
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def _fmt(x, digits=2):
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def markdown(rows, meta) -> str:
    lines = [
        f"# bench_attention ({meta['device_name']})",
        "",
        f"- date: {meta['date_utc']}, commit: {meta['commit']}",
        f"- torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
        f"python {meta['versions']['python']}",
        f"- dtype {meta['dtype']}, about {meta['tokens']} tokens per batch, hidden {meta['hidden']}; "
        f"load average at the end {meta.get('load_average')}, torch threads {meta.get('torch_threads')}",
        "- times in ms; saved = bytes the autograd graph keeps for the backward; "
        "TFLOP/s count only the backward work a grad fraction needs",
        "",
        "| S | D | causal | provider | grad frac | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s "
        "| saved MiB | bwd / dense bwd | fwd / dense fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = {(r["seq"], r["head_dim"], r["causal"], r["provider"][:-6]): r
             for r in rows if r["provider"].endswith("-dense") and "bwd_ms" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['head_dim']} | {r['causal']} | {r['provider']} | - | error: "
                         f"{r['error']} | | | | | | | |")
            continue
        base = dense.get((r["seq"], r["head_dim"], r["causal"], r["provider"].rsplit("-", 1)[0]))
        hs_row = base is not None and r["provider"].startswith("hs-")
        ratio = r["bwd_ms"] / base["bwd_ms"] if hs_row and base["bwd_ms"] else None
        fwd_ratio = r["fwd_ms"] / base["fwd_ms"] if hs_row and base["fwd_ms"] else None
        lines.append(
            f"| {r['seq']} | {r['head_dim']} | {r['causal']} | {r['provider']} | {r['grad_fraction']:.2f} "
            f"| {_fmt(r['fwd_ms'], 3)} | {_fmt(r['bwd_ms'], 3)} | {_fmt(r['fwd_bwd_ms'], 3)} "
            f"| {_fmt(r['fwd_tflops'])} | {_fmt(r['fwd_bwd_tflops'])} | {r['saved_bytes'] / 2**20:.1f} "
            f"| {_fmt(ratio)} | {_fmt(fwd_ratio)} |")
    return "\n".join(lines) + "\n"


def metadata(args) -> dict:
    meta = provenance(args.device)
    meta.update(dtype=args.dtype, tokens=args.tokens, hidden=args.hidden, backends=args.backends,
                headsparse_backends={k: v.reason for k, v in hs.backends().items()})
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch (batch = tokens // S)")
    ap.add_argument("--hidden", type=int, default=2048, help="heads = hidden // D")
    ap.add_argument("--backends", nargs="+", default=None,
                    help="headsparse backends; torch:PATH forces the torch backend's path (cpu-flash, sdpa, plain). "
                         "Default: torch and triton on GPU, torch and torch:sdpa on CPU")
    ap.add_argument("--flex-seqs", type=int, nargs="+", default=None,
                    help="run FlexAttention only at these S (each shape compiles it anew; default: every S)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes, to check the script runs")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.backends is None:
        args.backends = ["torch", "triton"] if args.device == "cuda" else ["torch", "torch:sdpa"]
    if args.quick:
        args.seqs, args.head_dims, args.tokens, args.hidden = [128, 256], [64], 512, 640
    timer = _timer(args.device)
    causal_opts = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    rows = []
    for d in args.head_dims:
        for s in args.seqs:
            for c in causal_opts:
                rows.extend(bench_one(args, s, d, c, timer))
                print(f"done S={s} D={d} causal={c}", file=sys.stderr)
                if args.out:  # after every shape, so a run stopped at a time limit keeps what it measured
                    write_results(args, rows)
    print(markdown(rows, metadata(args)))
    if args.out:
        write_results(args, rows)


def write_results(args, rows) -> None:
    """OUT.json and OUT.md, each written to a temporary name and renamed."""
    meta = metadata(args)
    atomic_write_text(f"{args.out}.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    atomic_write_text(f"{args.out}.md", markdown(rows, meta))


if __name__ == "__main__":
    main()
