"""The torch backend's two CPU paths, each against the float64 reference.

On CPU float32/float16/bfloat16 it calls PyTorch's fused flash-attention
kernels; float64, Skv = 0 and an additive mask that would lose precision in the
input dtype take the plain materialised-scores path. Both must meet the same
specification, so every shape case runs through each path, and the test checks
which path actually ran.
"""
import pytest
import torch

from attention_cases import Case, bits, count_calls, make_inputs, run_and_compare
from test_attention_backends import SHAPE_CASES

from headsparse.ops import torch_backend

pytestmark = pytest.mark.skipif(torch_backend._FLASH_CPU is None, reason="this torch has no fused CPU attention")


@pytest.fixture
def path_counter(monkeypatch):
    return count_calls(monkeypatch, torch_backend, forward="_flash_forward", backward="_flash_backward")


def _computed(case: Case) -> torch.Tensor:
    return torch.ones(case.hq, dtype=torch.bool) if case.pruned is None else ~bits(case.pruned)


def _computes_heads(case: Case) -> bool:
    return bool(_computed(case).any())


def _has_grad_heads(case: Case) -> bool:
    grad = torch.ones(case.hq, dtype=torch.bool) if case.grad is None else bits(case.grad)
    return bool((grad & _computed(case)).any())


@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_path(case, dtype, path_counter):
    run_and_compare(case, dtype, "torch")
    # bf16 with an additive float32 mask keeps the plain path (the kernel would add the mask in bf16).
    expect = not (dtype == torch.bfloat16 and case.mask == "additive")
    assert (path_counter["forward"] > 0) == (expect and _computes_heads(case))
    assert (path_counter["backward"] > 0) == (expect and _has_grad_heads(case))


@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_path(case, dtype, path_counter, monkeypatch):
    monkeypatch.setattr(torch_backend, "_FLASH_CPU", None)
    run_and_compare(case, dtype, "torch")
    assert path_counter == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("case", [SHAPE_CASES[4], SHAPE_CASES[6], SHAPE_CASES[10]], ids=str)
def test_paths_agree_with_each_other(case, monkeypatch):
    # float32 through both paths: the same numbers to float32 rounding, gate statistics included.
    import headsparse as hs

    q, k, v, do, kw = make_inputs(case, torch.float32, seed=3)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with hs.record_gate_grads() as rec:
            out = hs.attention(*leaves, backend="torch", stats_key="x", **kw)
        grads = torch.autograd.grad(out, leaves, do)
        return [out, *grads, rec.by_key()["x"]]

    flash = run()
    monkeypatch.setattr(torch_backend, "_FLASH_CPU", None)
    plain = run()
    for a, b in zip(flash, plain):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, equal_nan=True)


BROADCAST_MASK_SHAPES = [(1, 1, 13, 21), (13, 21), (21,), (2, 4, 13, 21), (1, 4, 1, 21)]


def check_broadcast_mask(mask_shape, grad_heads=None):
    """A causal call whose bool mask is broadcast over batch and/or heads, against the float64 reference."""
    import headsparse as hs

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 13, 32, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 21, 32, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 21, 32, generator=gen, requires_grad=True)
    mask = torch.rand(mask_shape, generator=gen) > 0.3
    do = torch.randn(2, 4, 13, 32, generator=gen)
    kw = dict(attention_mask=mask, causal=True, grad_heads=grad_heads)
    out = hs.attention(q, k, v, backend="torch", **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = hs.attention_reference(*leaves, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=0)


@pytest.mark.parametrize("mask_shape", BROADCAST_MASK_SHAPES, ids=str)
def test_flash_path_broadcast_masks(mask_shape, path_counter):
    # Masks broadcast over batch and/or heads reach the kernel one batch/head wide (stride-0 dims collapsed).
    check_broadcast_mask(mask_shape)
    assert path_counter["forward"] == 1 and path_counter["backward"] == 1


def test_empty_query_sequence_takes_the_plain_path():
    # The fused kernel kills the process (SIGFPE) on Sq = 0, so this runs in a child process.
    import subprocess
    import sys

    code = ("import torch, headsparse as hs\n"
            "q = torch.randn(1, 2, 0, 8, requires_grad=True); k = torch.randn(1, 2, 5, 8, requires_grad=True)\n"
            "out = hs.attention(q, k, k, causal=True, backend='torch')\n"
            "out.sum().backward()\n"
            "print(tuple(out.shape), float(k.grad.abs().sum()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["(1,", "2,", "0,", "8)", "0.0"]


def check_strided_inputs(dtype):
    """Every head trained, inputs whose last dimension is strided (the backward receives the caller's q itself),
    against the float64 reference."""
    import headsparse as hs
    from attention_cases import TOL

    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 32, 19, generator=gen).to(dtype).transpose(-1, -2).requires_grad_()
    k = torch.randn(2, 2, 32, 23, generator=gen).to(dtype).transpose(-1, -2).requires_grad_()
    v = torch.randn(2, 2, 23, 32, generator=gen).to(dtype).requires_grad_()
    do = torch.randn(2, 4, 19, 32, generator=gen).to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    out = hs.attention(q, k, v, causal=True, backend="torch")
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = hs.attention_reference(*leaves, causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    atol_o, atol_g = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol_o, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=atol_g, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_inputs_with_every_head_trained(dtype, path_counter):
    check_strided_inputs(dtype)
    assert path_counter["backward"] == 1
