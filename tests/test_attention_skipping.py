"""Skipping is measured, not assumed: saved bytes, what the backward sees, NaN in pruned heads, statistics."""
import math
import os

import pytest
import torch

import headsparse as hs
from headsparse.ops import registry
from headsparse.ops.memory import saved_tensor_bytes as saved_bytes

from attention_cases import Case, make_inputs

BACKENDS = ["torch", "triton"] + ([] if os.environ.get("HEADSPARSE_SKIP_EXT", "0") not in ("", "0") else ["cpu"])


def _leaves(case, dtype=torch.float32, seed=0):
    q, k, v, do, kw = make_inputs(case, dtype, seed)
    return [t.requires_grad_() for t in (q, k, v)], do, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hkv", [8, 2])
def test_one_of_eight_grad_heads_saves_an_eighth(backend, hkv):
    case = Case(b=2, hq=8, hkv=hkv, sq=32, skv=32, d=64, causal=True)
    (q, k, v), _, kw = _leaves(case)
    dense, _ = saved_bytes(lambda: hs.attention(q, k, v, backend=backend, **kw))
    one = torch.zeros(8, dtype=torch.bool)
    one[5] = True
    sparse, out = saved_bytes(lambda: hs.attention(q, k, v, grad_heads=one, backend=backend, **kw))
    assert out.requires_grad
    # q, o, lse shrink to 1/8; k, v to the one KV head read (1/hkv of them).
    qo = 2 * q.numel() * 4 + 2 * 8 * 32 * 4
    kv = 2 * k.numel() * 4
    expect = qo / 8 + kv / hkv
    assert dense >= qo + kv
    assert sparse <= expect * 1.02 + 512, (sparse, dense, expect)
    if hkv == 8:
        assert sparse <= dense / 8 * 1.02 + 512


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_heads_save_nothing(backend):
    (q, k, v), _, kw = _leaves(Case(b=1, hq=4, hkv=2, sq=16, skv=16))
    nbytes, _ = saved_bytes(lambda: hs.attention(q, k, v, grad_heads=torch.zeros(4, dtype=torch.bool),
                                                 backend=backend, **kw))
    assert nbytes == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_sees_only_grad_heads_and_their_kv_heads(backend, monkeypatch):
    seen = {}
    kernels = registry.get(backend)
    original = kernels.backward

    def spy(do, q, k, v, *rest):
        seen["q_heads"], seen["kv_heads"] = q.shape[1], k.shape[1]
        return original(do, q, k, v, *rest)

    monkeypatch.setattr(kernels, "backward", spy)  # an instance attribute: the dispatcher hands out this object
    (q, k, v), do, kw = _leaves(Case(b=2, hq=8, hkv=4, sq=24, skv=24))
    grad = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)  # KV heads 1 and 3
    out = hs.attention(q, k, v, grad_heads=grad, backend=backend, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert seen == {"q_heads": 3, "kv_heads": 2}
    assert (dq[:, ~grad] == 0).all() and (dq[:, grad] != 0).any()
    for g in (dk, dv):
        assert (g[:, [0, 2]] == 0).all()
        assert (g[:, [1, 3]] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_pruned_heads_is_never_read(backend):
    case = Case(b=2, hq=6, hkv=3, sq=20, skv=27, causal=True)
    q, k, v, do, kw = make_inputs(case, torch.float32)
    pruned = torch.tensor([0, 1, 0, 0, 1, 1], dtype=torch.bool)  # KV head 2 is read only by pruned heads
    clean = hs.attention(q, k, v, pruned_heads=pruned, backend=backend, **kw)
    qn, kn, vn = q.clone(), k.clone(), v.clone()
    qn[:, pruned] = float("nan")
    kn[:, 2] = float("nan")
    vn[:, 2] = float("nan")
    leaves = [t.requires_grad_() for t in (qn, kn, vn)]
    out = hs.attention(*leaves, pruned_heads=pruned, backend=backend, **kw)
    assert torch.isfinite(out).all()
    assert (out[:, pruned] == 0).all()
    torch.testing.assert_close(out, clean, atol=0, rtol=0)
    ref = hs.attention_reference(q.double(), k.double(), v.double(), pruned_heads=pruned, **kw)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    grads = torch.autograd.grad(out, leaves, do)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, pruned] == 0).all() and (grads[1][:, 2] == 0).all() and (grads[2][:, 2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_overrides_grad(backend):
    (q, k, v), do, kw = _leaves(Case(b=1, hq=4, hkv=4, sq=16, skv=16))
    pruned = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    out = hs.attention(q, k, v, grad_heads=torch.ones(4, dtype=torch.bool), pruned_heads=pruned, backend=backend, **kw)
    dq, dk, _ = torch.autograd.grad(out, (q, k, v), do)
    assert (out[:, 0] == 0).all() and (dq[:, 0] == 0).all() and (dk[:, 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_grad_statistics(backend):
    case = Case(b=3, hq=4, hkv=2, sq=21, skv=21, causal=True, mask="bool_empty_rows")
    (q, k, v), do, kw = _leaves(case)
    grad = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    with hs.record_gate_grads() as rec:
        out = hs.attention(q, k, v, grad_heads=grad, backend=backend, stats_key="layer0", **kw)
        out2 = hs.attention(q, k, v, backend=backend, **kw)
    (out * do).sum().backward()
    (out2 * do).sum().backward()
    by_key = rec.by_key()
    assert set(by_key) == {"layer0", 1}
    expect = (out.detach().double() * do.double()).sum(dim=(2, 3))
    got = by_key["layer0"]
    assert got.shape == (3, 4) and got.dtype == torch.float32
    assert torch.isnan(got[:, 1]).all()
    torch.testing.assert_close(got[:, grad].double(), expect[:, grad], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(by_key[1].double(), (out2.detach().double() * do.double()).sum(dim=(2, 3)),
                               atol=1e-4, rtol=1e-5)


def test_gate_grad_statistic_is_the_gate_gradient():
    """sum_t <O, dO> equals d loss / d g for a gate multiplying the head output."""
    (q, k, v), do, kw = _leaves(Case(b=2, hq=4, hkv=2, sq=15, skv=15, causal=True), dtype=torch.float64)
    gate = torch.ones(4, dtype=torch.float64, requires_grad=True)
    with hs.record_gate_grads() as rec:
        out = hs.attention(q, k, v, backend="torch", **kw)
    loss = (out * gate[None, :, None, None] * do).sum()
    loss.backward()
    # the recorded statistic is per sample; the gate gradient sums over samples
    torch.testing.assert_close(rec.records[0].value.double().sum(0), gate.grad, atol=1e-5, rtol=1e-6)


def test_nothing_recorded_outside_the_context():
    (q, k, v), do, kw = _leaves(Case(b=1, hq=2, hkv=2, sq=8, skv=8))
    with hs.record_gate_grads() as rec:
        pass
    out = hs.attention(q, k, v, backend="torch", **kw)
    (out * do).sum().backward()
    assert rec.records == []
    assert math.isfinite(float(q.grad.sum()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_path_matches_and_keeps_no_graph(backend):
    (q, k, v), _, kw = _leaves(Case(b=2, hq=4, hkv=2, sq=19, skv=25, causal=True, mask="bool"))
    with torch.no_grad():
        nbytes, out = saved_bytes(lambda: hs.attention(q, k, v, backend=backend, **kw))
    assert nbytes == 0 and not out.requires_grad
    torch.testing.assert_close(out, hs.attention(q, k, v, backend=backend, **kw), atol=0, rtol=0)


def test_head_index_is_computed_once_per_plan():
    from headsparse.ops.problem import make_problem

    (q, k, v), _, _ = _leaves(Case(b=1, hq=4, hkv=2, sq=8, skv=8))
    grad = torch.tensor([True, False, False, True])
    first = make_problem(q, k, v, grad_heads=grad).heads
    again = make_problem(q, k, v, grad_heads=grad.clone()).heads
    assert first is again
    assert first.grad_idx.tolist() == [0, 3] and first.kv_needed.tolist() == [0, 1] and first.all_kv
    assert make_problem(q, k, v).heads is not first


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_gives_zero_output_and_finite_grads(backend):
    (q, k, v), do, kw = _leaves(Case(b=2, hq=4, hkv=2, sq=5, skv=0))
    out = hs.attention(q, k, v, backend=backend, **kw)
    assert out.shape == q.shape and (out == 0).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape
