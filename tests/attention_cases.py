"""Shared helpers for the attention tests: random problems and the float64 comparison."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

import headsparse as hs

# Absolute tolerances (values and gradients are O(1) with the inputs below).
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 5e-5),
    torch.float16: (4e-3, 1.5e-2),
    torch.bfloat16: (3e-2, 8e-2),
}


@dataclass
class Case:
    b: int = 2
    hq: int = 4
    hkv: int = 2
    sq: int = 37
    skv: int = 53
    d: int = 64
    causal: bool = False
    mask: Optional[str] = None  # None, "bool", "bool_empty_rows", "additive", "per_head"
    grad: Optional[str] = None  # grad heads as a bit string, e.g. "1001"; None = all
    pruned: Optional[str] = None  # pruned heads as a bit string
    kv_map: Optional[tuple] = None

    def __str__(self):
        parts = [f"b{self.b}", f"h{self.hq}x{self.hkv}", f"s{self.sq}x{self.skv}", f"d{self.d}"]
        if self.causal:
            parts.append("causal")
        if self.mask:
            parts.append(self.mask)
        if self.grad is not None:
            parts.append("grad" + self.grad)
        if self.pruned is not None:
            parts.append("pruned" + self.pruned)
        if self.kv_map is not None:
            parts.append("map" + "".join(map(str, self.kv_map)))
        return "-".join(parts)


def bits(spec: str) -> torch.Tensor:
    """A bool head mask from a bit string such as "0110" (kept on the CPU, as a model's plan would be)."""
    return torch.tensor([c == "1" for c in spec])


def make_mask(case: Case, gen: torch.Generator):
    shape_b = (case.b, 1, case.sq, case.skv)
    if case.mask is None:
        return None
    if case.mask == "bool":
        return torch.rand(shape_b, generator=gen) > 0.3
    if case.mask == "bool_empty_rows":  # left padding in keys plus rows with nothing to attend
        m = torch.rand(shape_b, generator=gen) > 0.3
        m[0, :, 1] = False
        m[-1, :, -1] = False
        m[-1, :, :, :3] = False
        return m
    if case.mask == "additive":
        m = torch.randn(shape_b, generator=gen)
        m[torch.rand(shape_b, generator=gen) > 0.7] = float("-inf")
        m[0, 0, 2] = float("-inf")  # an additive row that sees nothing
        return m
    if case.mask == "per_head":
        return torch.rand((case.b, case.hq, case.sq, case.skv), generator=gen) > 0.4
    raise ValueError(case.mask)


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.b, case.hq, case.sq, case.d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(case.b, case.hkv, case.skv, case.d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(case.b, case.hkv, case.skv, case.d, generator=gen).to(device=device, dtype=dtype)
    do = torch.randn(case.b, case.hq, case.sq, case.d, generator=gen).to(device=device, dtype=dtype)
    mask = make_mask(case, gen)
    if mask is not None:
        mask = mask.to(device)
    kw = dict(causal=case.causal, attention_mask=mask)
    if case.grad is not None:
        kw["grad_heads"] = bits(case.grad)
    if case.pruned is not None:
        kw["pruned_heads"] = bits(case.pruned)
    if case.kv_map is not None:
        kw["kv_head_index"] = torch.tensor(case.kv_map)
    return q, k, v, do, kw


@contextlib.contextmanager
def torch_path(path):
    """Force the torch backend's path (``HEADSPARSE_TORCH_PATH``) inside the block; None leaves it alone."""
    from headsparse.ops.torch_backend import PATH_ENV

    before = os.environ.get(PATH_ENV)
    if path is not None:
        os.environ[PATH_ENV] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PATH_ENV, None)
        else:
            os.environ[PATH_ENV] = before


def split_backend(name: str):
    """("torch", "sdpa") for the test name "torch:sdpa" (the torch backend on one forced path); (name, None) else."""
    backend, _, path = name.partition(":")
    return backend, (path or None)


def run_and_compare(case: Case, dtype: torch.dtype, backend: str, seed: int = 0, device="cpu"):
    """Run ``backend`` and the float64 reference on the same inputs; assert outputs and gradients agree.
    ``backend`` may name a path of the torch backend, as "torch:sdpa"."""
    backend, path = split_backend(backend)
    q, k, v, do, kw = make_inputs(case, dtype, seed, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch_path(path):
        out = hs.attention(*leaves, backend=backend, **kw)
        grads = torch.autograd.grad(out, leaves, do, allow_unused=True)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kw = {key: (val.double() if key == "attention_mask" and val is not None and val.is_floating_point() else val)
              for key, val in kw.items()}
    ref = hs.attention_reference(*ref_leaves, **ref_kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double(), allow_unused=True)
    atol_o, atol_g = TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=atol_o, rtol=0, msg=lambda m: f"{case} output: {m}")
    for name, g, rg in zip("qkv", grads, ref_grads):
        g = torch.zeros_like(rg) if g is None else g.double()
        rg = torch.zeros_like(g) if rg is None else rg
        assert torch.isfinite(g).all(), f"{case}: d{name} not finite"
        torch.testing.assert_close(g, rg, atol=atol_g, rtol=0, msg=lambda m: f"{case} d{name}: {m}")
    return out, grads


def count_calls(monkeypatch, module, **attrs):
    """Wraps ``module.<attr>`` for each ``key=attr`` so that every call is counted; returns ``{key: count}``."""
    calls = {key: 0 for key in attrs}

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    for key, attr in attrs.items():
        monkeypatch.setattr(module, attr, counting(key, getattr(module, attr)))
    return calls
