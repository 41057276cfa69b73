"""Per-rank trainable, gradient and optimizer bytes of a patched model under FSDP2 (byte counts, not timings).

SmolLM2-135M (the converted copy in ~/.cache/headsparse/smollm2), 10% of the query heads trainable (chosen by
seeded random scores with HeadPlan.from_scores), grad="exact", float32; ``fully_shard`` per decoder layer and on
the root, 2 processes with gloo on the CPU; one AdamW step (batch 1 per rank, 32 tokens). For each rank it counts
the bytes of its local shards: trainable slices, their gradients, AdamW state (exp_avg + exp_avg_sq), and the frozen
parameters it holds; and the same for one unsharded process. Writes benchmarks/results/fsdp-smollm2.{json,md}.

    python benchmarks/bench_fsdp_memory.py [--model DIR] [--fraction 0.1] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(model_dir, fraction, seed=0):
    import transformers

    import headsparse as hs

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(cfg.num_hidden_layers, cfg.num_attention_heads, generator=g)
    plan = hs.HeadPlan.from_scores(scores, fraction=fraction, num_kv_heads=cfg.num_key_value_heads,
                                   model_family=cfg.model_type)
    hs.patch(model, plan, grad="exact")
    return model, plan


def _local_bytes(t):
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _counts(model, opt):
    params = list(model.parameters())
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    return {
        "trainable_bytes": sum(_local_bytes(p) for p in params if p.requires_grad),
        "grad_bytes": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": sum(_local_bytes(v) for s in opt.state.values() for v in s.values()
                               if torch.is_tensor(v) and v.dim() > 0),
        "frozen_bytes": sum(_local_bytes(p) for p in params if not p.requires_grad),
        "frozen_params_in_optimizer": sum(id(p) in opt_ids for p in params if not p.requires_grad),
        "frozen_params_with_grad": sum(p.grad is not None for p in params if not p.requires_grad),
    }


def _step(model, rank, seq=32):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return opt, loss.item()


def _worker(rank, world, port, model_dir, fraction, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.fsdp import fully_shard

        model, _ = _load(model_dir, fraction)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt, loss = _step(model, rank)
        counts = dict(_counts(model, opt), rank=rank, loss=loss)
        box = [None] * world
        torch.distributed.all_gather_object(box, counts)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(box, f)
        torch.distributed.barrier()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)  # no interpreter teardown of the gloo group


def _provenance():
    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    import transformers

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": run("git", "rev-parse", "HEAD"), "dirty": bool(run("git", "status", "--porcelain")),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": f"{cpu or platform.processor()}, {os.cpu_count()} cores, {platform.system()}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/headsparse/smollm2"))
    ap.add_argument("--fraction", type=float, default=0.10)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from headsparse._atomic import atomic_write_text

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = os.path.join(args.out, ".fsdp-ranks.json")
    os.makedirs(args.out, exist_ok=True)
    mp.spawn(_worker, args=(2, port, args.model, args.fraction, tmp), nprocs=2, join=True)
    with open(tmp) as f:
        ranks = json.load(f)
    os.unlink(tmp)

    torch.set_num_threads(2)
    model, plan = _load(args.model, args.fraction)
    opt, _ = _step(model, 0)
    one = _counts(model, opt)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "claim": "under FSDP2 each rank holds gradients and AdamW state only for its shard of the trainable head "
                 "slices; the frozen blocks are sharded, outside the optimizer, without gradients",
        "model": os.path.basename(os.path.normpath(args.model)), "dtype": "float32", "grad_mode": "exact",
        "plan": {"trainable_fraction": plan.trainable_fraction, "train_heads": plan.count("train"),
                 "layers": len(plan.modes), "q_heads": plan.num_q_heads, "kv_heads": plan.num_kv_heads},
        "wrapping": "fully_shard per LlamaDecoderLayer, then the root; 2 ranks, gloo, CPU",
        "model_bytes": total, "single_process": one, "ranks": ranks, "provenance": _provenance(),
    }
    atomic_write_text(os.path.join(args.out, "fsdp-smollm2.json"), json.dumps(result, indent=2) + "\n")

    mb = lambda b: f"{b / 2**20:,.3f}"  # noqa: E731
    rows = [("single process (no sharding)", one)] + [(f"FSDP2 rank {r['rank']} of 2", r) for r in ranks]
    lines = [
        "# FSDP2 per-rank bytes: SmolLM2-135M, 10% of heads trainable",
        "",
        f"{result['plan']['train_heads']} of {plan.num_q_heads * len(plan.modes)} query heads trainable "
        f"({plan.trainable_fraction:.1%}), grad=\"exact\", float32, {result['wrapping']}; one AdamW step. "
        "Bytes of each rank's local shards (DTensor.to_local), counted, not timed. Model parameters in all: "
        f"{mb(total)} MiB.",
        "",
        "| where | trainable (MiB) | gradients (MiB) | AdamW state (MiB) | frozen held (MiB) | frozen in optimizer | "
        "frozen with grad |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in rows:
        lines.append(f"| {name} | {mb(c['trainable_bytes'])} | {mb(c['grad_bytes'])} | {mb(c['optimizer_bytes'])} | "
                     f"{mb(c['frozen_bytes'])} | {c['frozen_params_in_optimizer']} | {c['frozen_params_with_grad']} |")
    p = result["provenance"]
    lines += ["", f"Exact bytes: trainable {one['trainable_bytes']:,} in one process = "
              + " + ".join(f"{r['trainable_bytes']:,}" for r in ranks) + " over the ranks; gradients "
              + " + ".join(f"{r['grad_bytes']:,}" for r in ranks) + "; AdamW "
              + " + ".join(f"{r['optimizer_bytes']:,}" for r in ranks) + ".",
              "", f"Measured {p['date']}, commit {p['commit']}{' (uncommitted changes present)' if p['dirty'] else ''}, "
              f"torch {p['torch']}, transformers {p['transformers']}, {p['machine']}. "
              "Rerun: `python benchmarks/bench_fsdp_memory.py`."]
    atomic_write_text(os.path.join(args.out, "fsdp-smollm2.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
