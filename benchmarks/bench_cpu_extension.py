"""CPU speed of the compiled ``cpu`` backend against the ``torch`` backend (decides ``auto`` on CPU).

Usage: python benchmarks/bench_cpu_extension.py [--repeat N] [--threads T] [--clock wall|cpu] [--json out.json]
Prints the median time (ms) of the forward and of forward+backward per shape.
``--clock cpu`` measures the process's CPU time instead of wall time: on a
shared, oversubscribed machine it is far less noisy (use it with --threads 1).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import headsparse as hs

SHAPES = [
    # name, b, hq, hkv, s, d, causal, dtype, padding mask
    ("llama-like GQA causal", 1, 8, 2, 512, 64, True, torch.float32, False),
    ("bert-like padded", 4, 12, 12, 128, 64, False, torch.float32, True),
    ("long causal d128", 1, 4, 4, 1024, 128, True, torch.float32, False),
    ("bf16 GQA causal", 1, 8, 2, 256, 64, True, torch.bfloat16, False),
    ("half the heads trained", 2, 8, 2, 256, 64, True, torch.float32, False),
    # small problems, where a compiled loop could beat torch's per-op overhead
    ("tiny s16", 1, 4, 2, 16, 16, True, torch.float32, False),
    ("short s64 batch 8", 8, 4, 4, 64, 32, False, torch.float32, True),
    ("1 of 8 heads trained", 2, 8, 2, 256, 64, True, torch.float32, False),
    ("decode: 1 query, 512 keys", 4, 8, 2, 512, 64, False, torch.float32, False),
]


def _time(fn, repeat, clock=time.perf_counter):
    fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0 = default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}")
    for name, b, hq, hkv, s, d, causal, dtype, padded in SHAPES:
        gen = torch.Generator().manual_seed(0)
        sq = 1 if name.startswith("decode") else s
        q = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
        k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
        v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
        mask = None
        if padded:
            lengths = torch.randint(s // 2, s + 1, (b,), generator=gen)
            mask = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
        grad = None
        if name.startswith("half"):
            grad = torch.tensor([i % 2 == 0 for i in range(hq)])
        if name.startswith("1 of 8"):
            grad = torch.tensor([i == 0 for i in range(hq)])
        row = {"shape": name, "b": b, "hq": hq, "hkv": hkv, "sq": sq, "s": s, "d": d, "causal": causal,
               "dtype": str(dtype)}
        for backend in ("torch", "cpu"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            do = torch.randn(q.shape, generator=gen).to(dtype)

            def fwd():
                with torch.no_grad():
                    hs.attention(q, k, v, causal=causal, attention_mask=mask, backend=backend)

            def fwd_bwd():
                out = hs.attention(*leaves, causal=causal, attention_mask=mask, grad_heads=grad, backend=backend)
                torch.autograd.grad(out, leaves, do, allow_unused=True)

            row[f"{backend}_fwd_ms"] = round(_time(fwd, args.repeat, clock), 2)
            row[f"{backend}_fwdbwd_ms"] = round(_time(fwd_bwd, args.repeat, clock), 2)
        rows.append(row)
        for kind in ("fwd", "fwdbwd"):
            row[f"cpu_speedup_{kind}"] = round(row[f"torch_{kind}_ms"] / row[f"cpu_{kind}_ms"], 3)
        print(f"{name:26s} fwd torch {row['torch_fwd_ms']:8.2f} ms  cpu {row['cpu_fwd_ms']:8.2f} ms | "
              f"fwd+bwd torch {row['torch_fwdbwd_ms']:8.2f} ms  cpu {row['cpu_fwdbwd_ms']:8.2f} ms")
    if args.json:
        from headsparse._atomic import atomic_write_text
        from headsparse.provenance import provenance

        rec = {"provenance": provenance("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "clock": args.clock, "repeat": args.repeat, "rows": rows}
        atomic_write_text(args.json, json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
