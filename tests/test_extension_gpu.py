"""The compiled extension's ``cuda`` backend and statistics kernels on a GPU (skipped without one).

The attention reference cases for the ``cuda`` backend are in tests/test_attention_backends.py.

The cuda backend is gated behind HEADSPARSE_ENABLE_UNVALIDATED_CUDA=1 until these
tests have passed on a GPU; they set it for themselves. They fail (not skip)
when a GPU is present but the extension was built without CUDA, so that a
CPU-only build on a GPU machine is noticed.
"""
from __future__ import annotations

import pytest
import torch

import headsparse as hs
from headsparse.ops import registry
from headsparse.ops.head_stats import gram, head_stats

from attention_cases import Case, make_inputs

pytestmark = pytest.mark.gpu

@pytest.fixture(autouse=True)
def _enable_cuda_backend(monkeypatch):
    monkeypatch.setenv("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "1")
    registry.get("cuda").reset_status()
    yield
    registry.get("cuda").reset_status()


def test_cuda_pruned_heads_never_read():
    q, k, v, do, kw = make_inputs(Case(b=2, hq=4, hkv=2, sq=29, skv=29, causal=True, grad="1000", pruned="0100"),
                                  torch.float16, device="cuda")
    q2 = q.clone()
    q2[:, 1] = float("nan")
    out = hs.attention(q2, k, v, backend="cuda", **kw)
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all()
    assert torch.equal(out, hs.attention(q, k, v, backend="cuda", **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_head_stats_and_gram(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 150, 8 * 64, generator=gen).to("cuda", dtype)
    g = torch.randn(3, 150, 8 * 64, generator=gen).to("cuda", dtype)
    mask = (torch.rand(3, 150, generator=gen) > 0.3).cuda()
    res = hs.head_stats(x, g, num_heads=8, token_mask=mask, backend="cuda")
    ref = head_stats(x.double(), g.double(), 8, mask, backend="torch")
    for f in ("xg", "x_sq", "g_sq", "abs_x", "abs_g"):
        torch.testing.assert_close(getattr(res, f).double(), getattr(ref, f), rtol=1e-4, atol=1e-2)
    gm = hs.gram(x, mask, backend="cuda")
    torch.testing.assert_close(gm.double(), gram(x.double(), mask, backend="torch"), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("tensor_cores", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [Case(b=2, hq=8, hkv=2, sq=300, skv=517, d=128, causal=True, mask="bool"),
                                  Case(b=2, hq=5, hkv=3, sq=70, skv=90, d=64, kv_map=(2, 0, 2, 2, 1),
                                       grad="10110", pruned="01000"),
                                  Case(b=2, hq=4, hkv=2, sq=45, skv=61, d=80, causal=True, mask="additive"),
                                  Case(b=3, hq=4, hkv=1, sq=7, skv=30, d=48, mask="bool_empty_rows")], ids=str)
def test_cuda_tensor_core_and_cuda_core_paths(case, dtype, tensor_cores, monkeypatch):
    """Both kernel families on the GPU (HEADSPARSE_CUDA_TENSOR_CORES=0 forces the CUDA-core kernels)."""
    from attention_cases import run_and_compare
    from headsparse.ops import extension

    monkeypatch.setenv("HEADSPARSE_CUDA_TENSOR_CORES", tensor_cores)
    like = torch.empty(1, device="cuda", dtype=dtype)
    if torch.cuda.get_device_capability() in ((8, 0), (9, 0)):  # A100/H100/H200: every tile fits
        expect = tensor_cores == "1"
        assert extension.uses_tensor_cores(like, case.d) == (expect, expect)
    run_and_compare(case, dtype, "cuda", device="cuda")
