"""Batched gradients and torch.func transforms through the op (torch backend, float64): gradcheck with
check_batched_grad, is_grads_batched, jacrev against the float64 reference, vmap and vmap(grad) against loops."""
import pytest
import torch

import headsparse as hs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
B, HQ, HKV, S, D = 2, 4, 2, 5, 8


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, S, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, 1, S, S, generator=g) > 0.3
    return q, k, v, mask


CASES = {  # (pruned heads, causal, mask): GQA everywhere
    "plain": (None, False, False),
    "causal + bool mask": (None, True, True),
    "a pruned head, causal": (torch.tensor([False, False, False, True]), True, False),
    "pruned heads + mask": (torch.tensor([True, False, False, True]), False, True),
}


def _op(pruned, causal, mask, grad_heads=None):
    return lambda q, k, v: hs.attention(q, k, v, grad_heads=grad_heads, pruned_heads=pruned, causal=causal,
                                        attention_mask=mask, backend="torch")


def _ref(pruned, causal, mask):
    return lambda q, k, v: hs.attention_reference(q, k, v, pruned_heads=pruned, causal=causal, attention_mask=mask)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_with_batched_grads(case):
    pruned, causal, use_mask = CASES[case]
    q, k, v, mask = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(_op(pruned, causal, mask if use_mask else None), leaves,
                                    check_batched_grad=True)


@pytest.mark.parametrize("case", list(CASES))
def test_jacrev_matches_the_reference(case):
    pruned, causal, use_mask = CASES[case]
    q, k, v, mask = _inputs(1)
    m = mask if use_mask else None
    for argnum in (0, 1, 2):
        got = torch.func.jacrev(_op(pruned, causal, m), argnums=argnum)(q, k, v)
        want = torch.func.jacrev(_ref(pruned, causal, m), argnums=argnum)(q, k, v)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_batched_grads_with_a_grad_heads_subset_equal_one_by_one():
    q, k, v, mask = _inputs(2)
    grad = torch.tensor([True, False, True, False])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = _op(None, True, mask, grad)(*leaves)
    cot = torch.randn((3,) + out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    batched = torch.autograd.grad(out, leaves, cot, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(out, leaves, cot[i], retain_graph=True)
        for b, o in zip(batched, one):
            torch.testing.assert_close(b[i], o, rtol=1e-12, atol=1e-14)
    assert batched[0][:, :, [1, 3]].abs().max() == 0  # heads outside grad_heads get no gradient


def test_vmap_and_vmap_of_grad_equal_loops():
    q, k, v, mask = _inputs(4)
    qs = torch.randn(3, B, HQ, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    f = lambda x: _op(torch.tensor([False, True, False, False]), True, mask)(x, k, v)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f)(qs), torch.stack([f(x) for x in qs]), rtol=0, atol=0)
    g = torch.func.grad(lambda x: f(x).pow(2).sum())
    r = torch.func.grad(lambda x: _ref(torch.tensor([False, True, False, False]), True, mask)(x, k, v).pow(2).sum())
    torch.testing.assert_close(torch.func.vmap(g)(qs), torch.stack([r(x) for x in qs]), rtol=1e-9, atol=1e-11)


def test_compiled_kernels_refuse_batched_grads_clearly():
    if not hs.backends()["cpu"].usable:
        pytest.skip("the compiled cpu backend is not built here")
    q, k, v, _ = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = hs.attention(*leaves, backend="cpu")
    with pytest.raises(NotImplementedError, match="'torch' backend only"):
        torch.autograd.grad(out, leaves, torch.ones((2,) + out.shape, dtype=out.dtype), is_grads_batched=True)
