"""Shared helpers for the multi-process tests: free port, spawning with a hard deadline, per-rank byte counts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_gloo():
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def spawn_with_deadline(fn, args, nprocs: int = 2, deadline_s: float = 300.0, what: str = "workers"):
    """mp.spawn ``fn(rank, *args)``; a worker that hangs past ``deadline_s`` fails the test instead of stalling."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {nprocs} {what} did not finish within {deadline_s:.0f} s")


def run_with_deadline(cmd, deadline_s: float = 300.0, env=None, cwd=None):
    """Run a launcher command (accelerate launch, torchrun) in its own process group; kill the group on a hang."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or ROOT,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish within {deadline_s:.0f} s; output tail:\n{out[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}; output tail:\n{out[-6000:]}")
    return out


def local_bytes(t) -> int:
    """Bytes this rank holds for ``t`` (a DTensor's local shard, or the tensor)."""
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def rank_bytes(model, opt) -> dict:
    """This rank's trainable-parameter, gradient and optimizer-state bytes, and the frozen ones it holds."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    state = sum(local_bytes(v) for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {
        "trainable": sum(local_bytes(p) for p in trainable),
        "frozen": sum(local_bytes(p) for p in frozen),
        "grad": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": state,
        "frozen_with_grad": sum(p.grad is not None for p in frozen),
        "frozen_in_optimizer": sum(id(p) in opt_params for p in frozen),
    }


def worker_exit(fn):
    """Run ``fn``; print a traceback and exit 1 on error, else exit 0 without interpreter teardown (see
    test_patch_ddp.py: freeing a gloo process group at exit can deadlock)."""
    import traceback

    try:
        fn()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def train_steps(model, batches, lr: float):
    """AdamW over ``model``'s trainable parameters, one step per batch of token ids (labels = ids); returns the
    optimizer and the per-step losses (this process's, not reduced)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return opt, losses


def check_final_outputs(out, single):
    """save_final's outputs under ``out`` (each rank named its own final-rank{r} / delta-rank{r}): only rank 0's
    exist, no temporary is left, and the stock checkpoint (plain from_pretrained) and the delta both reproduce
    ``single``'s logits."""
    import headsparse as hs
    from headsparse.patch import is_patched
    from headsparse.patch.core import PLAN_FILE
    from _hs_models import batch, tiny_model

    assert not (out / "final-rank1").exists() and not (out / "delta-rank1.safetensors").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert (out / "final-rank0" / PLAN_FILE).exists()
    ids = batch(single, b=2, s=9, seed=5)
    want = single(input_ids=ids).logits
    stock = type(single).from_pretrained(out / "final-rank0", dtype=torch.float32)
    assert not is_patched(stock)
    torch.testing.assert_close(stock(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    base = tiny_model("llama", dtype=torch.float32)
    hs.load_delta(base, out / "delta-rank0.safetensors")
    torch.testing.assert_close(base(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def init_gloo(rank: int, world: int, port: int):
    """In a spawned worker: one thread, a gloo process group on localhost; returns ``torch.distributed``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    return torch.distributed


def save_rank_record(out_dir, rank: int, record: dict) -> None:
    """A worker's results to ``out_dir/rank{rank}.pt``, then a barrier so no rank exits before the others wrote."""
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()


def run_rank_workers(worker, tmp_path_factory, name: str, what: str, nprocs: int = 2, deadline_s: float = 300.0):
    """Spawn ``worker(rank, nprocs, port, out_dir)`` under a deadline; returns (out_dir, each rank's record)."""
    need_gloo()
    out = tmp_path_factory.mktemp(name)
    spawn_with_deadline(worker, (nprocs, free_port(), str(out)), nprocs=nprocs, deadline_s=deadline_s, what=what)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(nprocs)]
