"""A CPU-sized demonstration of head-sparse attention (the README's main job until the pipeline lands).

It runs one attention layer densely and with 10% of its heads in
``grad_heads``, then shows that the outputs agree, how many bytes the autograd
graph keeps for the backward, and the forward+backward time of each.
"""
from __future__ import annotations

import time

import torch

from ..ops import attention, backends
from ..ops.memory import saved_tensor_bytes


def _time_step(fn, inputs, grad_out, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def run_demo(batch=4, q_heads=16, kv_heads=4, seq=512, head_dim=64, grad_fraction=0.1, backend="auto",
             reps=3, seed=0) -> dict:
    """Run the comparison and return its numbers (also printed)."""
    if not 0 <= grad_fraction <= 1:
        raise ValueError(f"grad_fraction must lie in [0, 1], got {grad_fraction}")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen).requires_grad_()
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).requires_grad_()
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).requires_grad_()
    grad_out = torch.randn(batch, q_heads, seq, head_dim, generator=gen)
    n_train = max(1, round(grad_fraction * q_heads)) if grad_fraction > 0 else 0
    grad_heads = torch.zeros(q_heads, dtype=torch.bool)
    grad_heads[torch.randperm(q_heads, generator=gen)[:n_train]] = True

    print("headsparse backends on this machine:")
    for name, info in backends().items():
        print(f"  {name:7s} {'usable' if info.usable else 'unusable':8s} {info.reason}")
    print(f"\nattention: B={batch}, {q_heads} query / {kv_heads} KV heads, S={seq}, D={head_dim}, causal, float32")
    print(f"head-sparse call: {n_train} of {q_heads} heads in grad_heads ({grad_fraction:.0%})\n")

    def dense():
        return attention(q, k, v, causal=True, backend=backend)

    def sparse():
        return attention(q, k, v, grad_heads=grad_heads, causal=True, backend=backend)

    dense_bytes, out_dense = saved_tensor_bytes(dense)
    sparse_bytes, out_sparse = saved_tensor_bytes(sparse)
    max_diff = (out_dense - out_sparse).abs().max().item()
    g_dense = torch.autograd.grad(out_dense, (q, k, v), grad_out)
    g_sparse = torch.autograd.grad(out_sparse, (q, k, v), grad_out, allow_unused=True)
    dq_diff = (g_dense[0][:, grad_heads] - g_sparse[0][:, grad_heads]).abs().max().item() if n_train else 0.0
    t_dense = _time_step(dense, (q, k, v), grad_out, reps)
    t_sparse = _time_step(sparse, (q, k, v), grad_out, reps)
    result = dict(max_output_diff=max_diff, max_dq_diff_trained_heads=dq_diff, saved_bytes_dense=dense_bytes,
                  saved_bytes_sparse=sparse_bytes, fwd_bwd_ms_dense=t_dense, fwd_bwd_ms_sparse=t_sparse)
    print(f"{'':28s}{'dense':>14s}{'head-sparse':>14s}")
    print(f"{'saved for backward (MiB)':28s}{dense_bytes / 2**20:14.2f}{sparse_bytes / 2**20:14.2f}")
    print(f"{'forward+backward (ms)':28s}{t_dense:14.1f}{t_sparse:14.1f}")
    print(f"\nmax |output difference|            {max_diff:.2e}  (same forward)")
    print(f"max |dq difference| on grad heads  {dq_diff:.2e}")
    print(f"saved bytes ratio {sparse_bytes / dense_bytes:.3f}, time ratio {t_sparse / t_dense:.3f}")
    if max_diff != 0.0 or dq_diff > 1e-5:
        raise RuntimeError("dense and head-sparse calls disagree")
    return result
