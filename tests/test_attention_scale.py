"""Any finite softmax scale, as in PyTorch's SDPA: zero (uniform attention) and negative scales match the reference."""
import pytest
import torch

import headsparse as hs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _usable(name):
    info = hs.backends().get(name)
    return info is not None and info.usable and "cpu" in info.devices


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.0, -0.3])
@pytest.mark.parametrize("causal", [False, True])
def test_zero_and_negative_scale_match_the_reference(backend, dtype, scale, causal):
    if not _usable(backend) or (backend != "torch" and dtype == torch.float64):
        pytest.skip(f"{backend} does not run {dtype} on this machine")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 17, 32, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 17, 32, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 17, 32, generator=g, dtype=dtype, requires_grad=True)
    grad_heads = torch.tensor([True, False, True, True])
    out = hs.attention(q, k, v, grad_heads=grad_heads, causal=causal, scale=scale, backend=backend)
    ref = hs.attention_reference(*(t.double() for t in (q, k, v)), grad_heads=grad_heads, causal=causal,
                                 scale=scale)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.double(), ref, **tol)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(hs.attention_reference(qd, kd, vd, grad_heads=grad_heads, causal=causal,
                                                      scale=scale), (qd, kd, vd), do.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)
    if scale == 0.0 and not causal:  # uniform attention: every query row is the mean of v over keys
        torch.testing.assert_close(out.double()[:, 0], v.double()[:, 0].mean(1, keepdim=True).expand(2, 17, 32),
                                   **tol)
