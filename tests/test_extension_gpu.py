"""The compiled extension's ``cuda`` backend and statistics kernels on a GPU (skipped without one).

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
from headsparse.ops.head_stats import gram_torch, head_stats_torch

pytestmark = pytest.mark.gpu

TOL = {torch.float16: (4e-3, 1.5e-2), torch.bfloat16: (3e-2, 8e-2), torch.float32: (5e-5, 2e-4)}


@pytest.fixture(autouse=True)
def _enable_cuda_backend(monkeypatch):
    monkeypatch.setenv("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "1")
    registry._status_cache.pop("cuda", None)
    yield
    registry._status_cache.pop("cuda", None)


def _bits(s):
    return None if s is None else torch.tensor([c == "1" for c in s], device="cuda")


CASES = [
    # b, hq, hkv, sq, skv, d, causal, mask, grad, pruned, kv_map
    (2, 4, 2, 37, 53, 64, False, None, None, None, None),
    (1, 3, 1, 41, 41, 128, True, None, None, None, None),
    (3, 8, 2, 17, 133, 64, True, "bool", None, None, None),
    (2, 4, 2, 33, 21, 128, True, None, None, None, None),
    (2, 4, 2, 37, 45, 80, True, "empty_rows", None, None, None),
    (2, 4, 2, 23, 23, 96, False, "additive", None, None, None),
    (2, 5, 2, 19, 19, 64, True, None, None, None, (0, 0, 0, 1, 1)),
    (2, 8, 4, 21, 70, 128, False, None, "10100100", "01100001", None),
    (1, 4, 2, 300, 300, 32, True, None, None, None, None),
]


def _inputs(case, dtype, seed=0):
    b, hq, hkv, sq, skv, d, causal, mask_kind, grad, pruned, kv_map = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    do = torch.randn(b, hq, sq, d, generator=gen)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, skv, generator=gen) > 0.3
    elif mask_kind == "empty_rows":
        mask = torch.rand(b, 1, sq, skv, generator=gen) > 0.3
        mask[0, :, 1] = False
        mask[-1, :, :, :3] = False
    elif mask_kind == "additive":
        mask = torch.randn(b, 1, sq, skv, generator=gen)
        mask[torch.rand(b, 1, sq, skv, generator=gen) > 0.7] = float("-inf")
    kw = dict(causal=causal, attention_mask=None if mask is None else mask.cuda(), grad_heads=_bits(grad),
              pruned_heads=_bits(pruned))
    if kv_map is not None:
        kw["kv_head_index"] = torch.tensor(kv_map, device="cuda")
    return [t.cuda().to(dtype) for t in (q, k, v, do)], kw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_backend_matches_reference(case, dtype):
    assert hs.backends()["cuda"].usable, hs.backends()["cuda"].reason
    (q, k, v, do), kw = _inputs(case, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with hs.record_gate_grads() as rec:
        out = hs.attention(*leaves, backend="cuda", stats_key=0, **kw)
        grads = torch.autograd.grad(out, leaves, do, allow_unused=True)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kw = dict(kw)
    if ref_kw["attention_mask"] is not None and ref_kw["attention_mask"].is_floating_point():
        ref_kw["attention_mask"] = ref_kw["attention_mask"].double()
    ref = hs.attention_reference(*ref_leaves, **ref_kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double(), allow_unused=True)
    atol_o, atol_g = TOL[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=atol_o, rtol=0)
    for g, rg in zip(grads, ref_grads):
        g = torch.zeros_like(rg) if g is None else g.double()
        rg = torch.zeros_like(g) if rg is None else rg
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, rg, atol=atol_g, rtol=0)
    stats = rec.by_key()[0]
    graded = ~torch.isnan(stats[0])
    expect = (out.detach().double() * do.double()).sum(dim=(2, 3))
    torch.testing.assert_close(stats[:, graded].double(), expect[:, graded], atol=5e-2, rtol=1e-2)


def test_cuda_pruned_heads_never_read():
    (q, k, v, do), kw = _inputs((2, 4, 2, 29, 29, 64, True, None, "1000", "0100", None), torch.float16)
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
    ref = head_stats_torch(x.double(), g.double(), 8, mask)
    for f in ("xg", "x_sq", "g_sq", "abs_x", "abs_g"):
        torch.testing.assert_close(getattr(res, f).double(), getattr(ref, f), rtol=1e-4, atol=1e-2)
    gm = hs.gram(x, mask, backend="cuda")
    torch.testing.assert_close(gm.double(), gram_torch(x.double(), mask), rtol=1e-4, atol=1e-2)
