"""NaN and inf in q, k, v reach the output exactly as in ``attention_reference``, on every path.

What the reference does (float64, ``headsparse/ops/reference.py``):

* NaN in q (row i of head h): every score of that row is NaN, so output row i of
  head h is NaN; other rows and heads are untouched.
* NaN in k (key j): every row that can see key j gets NaN; a row that masks key j
  (bool mask, additive -inf, causal) does not.
* NaN or inf in v (key j): the P @ V product multiplies it by probabilities that
  may be 0, and 0 * NaN = NaN, so every row of that head that attends to anything
  gets NaN, even rows that mask key j.
* inf in q or k: scores become +-inf (or NaN for inf * 0); a row holding +inf gets
  NaN (inf - inf in the softmax), a row whose scores are all -inf counts as
  having nothing to attend.
* A row with nothing to attend (fully masked) is 0 whatever q, k, v hold.

Paths: the torch backend's plain path (float64), its fused CPU flash-attention
path (float32, bfloat16), the Triton backend (under TRITON_INTERPRET=1) and the
compiled C++ ``cpu`` backend (float32, float64).
"""
from __future__ import annotations

import pytest
import torch

import headsparse as hs

NAN, INF = float("nan"), float("inf")

PATHS = [("torch", torch.float64), ("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32),
         ("cpu", torch.float32), ("cpu", torch.float64)]


@pytest.fixture(autouse=True)
def _backend_usable(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend is not None and not hs.backends()[backend].usable:
        pytest.skip(f"{backend} backend unusable here: {hs.backends()[backend].reason}")

# (name, tensor index (0=q, 1=k, 2=v), value); NaN/inf is written at head 1, position 1, dim 2.
BAD = [
    ("nan_q", 0, NAN), ("nan_k", 1, NAN), ("nan_v", 2, NAN),
    ("inf_q", 0, INF), ("ninf_q", 0, -INF), ("inf_k", 1, INF), ("ninf_k", 1, -INF), ("inf_v", 2, INF),
    ("nan_q_row", 0, None),  # a whole query row NaN: the case the fused kernel turned into zeros
]
MASKS = [None, "bool", "additive", "causal"]


def _inputs(dtype, which, value, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 4, 16, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    t = [q, k, v]
    if value is None:
        q[:, 1, 1] = NAN
    else:
        t[which][:, 1, 1, 2] = value
    return t


def _mask_kwargs(kind, dtype):
    if kind == "causal":
        return {"causal": True}
    if kind is None:
        return {}
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 2, :] = False  # row 2 has nothing to attend
    keep[..., 0, 1] = False  # row 0 masks the key that holds NaN/inf
    keep[..., 3, 0] = False
    if kind == "bool":
        return {"attention_mask": keep}
    add = torch.zeros(1, 1, 4, 4, dtype=dtype).masked_fill(~keep, -INF)
    add[..., 3, 3] = -1.5
    return {"attention_mask": add}


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("backend,dtype", PATHS, ids=[f"{b}-{str(d)[6:]}" for b, d in PATHS])
@pytest.mark.parametrize("mask", MASKS, ids=[str(m) for m in MASKS])
@pytest.mark.parametrize("name,which,value", BAD, ids=[b[0] for b in BAD])
def test_forward_matches_reference(backend, dtype, mask, name, which, value):
    if backend == "cpu" and which == 2 and mask is not None:
        pytest.skip("the compiled cpu backend never reads a masked key's v, so NaN/inf there reaches no row; the "
                    "reference's P @ V multiplies it by 0 and spreads NaN to every row (a known difference)")
    q, k, v = _inputs(dtype, which, value)
    kw = _mask_kwargs(mask, dtype)
    ref_kw = dict(kw)
    if "attention_mask" in kw and kw["attention_mask"].dtype != torch.bool:
        ref_kw["attention_mask"] = kw["attention_mask"].double()
    ref = hs.attention_reference(q.double(), k.double(), v.double(), **ref_kw)
    assert not torch.isfinite(ref).all(), "every case must reach the output, or it tests nothing"
    out = hs.attention(q, k, v, backend=backend, **kw)
    tol = _tol(dtype)
    torch.testing.assert_close(out.double(), ref, equal_nan=True, atol=tol, rtol=tol)
    # The untouched head 0 stays finite.
    assert torch.isfinite(out[:, 0]).all()


@pytest.mark.parametrize("backend,dtype", PATHS, ids=[f"{b}-{str(d)[6:]}" for b, d in PATHS])
def test_issue_example_nan_query_head(backend, dtype):
    d = 16 if backend == "triton" else 8  # the Triton kernels take head_dim >= 16
    q, k, v = (torch.randn(1, 2, 4, d, dtype=torch.float64).to(dtype) for _ in range(3))
    q[:, 1] = NAN
    out = hs.attention(q, k, v, backend=backend)
    assert out[0, 1].isnan().all()
    torch.testing.assert_close(out.double(), hs.attention_reference(q.double(), k.double(), v.double()),
                               equal_nan=True, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("backend,dtype", PATHS, ids=[f"{b}-{str(d)[6:]}" for b, d in PATHS])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
def test_fully_masked_rows_stay_zero(backend, dtype, which):
    """A row with nothing to attend is 0 even when every input is NaN (also in the reference)."""
    t = [torch.full((1, 2, 4, 16), NAN, dtype=dtype) if i == which else torch.randn(1, 2, 4, 16).to(dtype)
         for i in range(3)]
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 2, :] = False
    for mask in (keep, torch.zeros(1, 1, 4, 4, dtype=dtype).masked_fill(~keep, -INF)):
        out = hs.attention(*t, attention_mask=mask, backend=backend)
        ref = hs.attention_reference(*(x.double() for x in t), attention_mask=mask if mask.dtype == torch.bool
                                     else mask.double())
        assert (out[:, :, 2] == 0).all() and (ref[:, :, 2] == 0).all()
        assert out[:, :, [0, 1, 3]].isnan().all()
        torch.testing.assert_close(out.double(), ref, equal_nan=True)


def test_finite_inputs_keep_the_fused_path(monkeypatch):
    """The NaN check must not send ordinary (finite) inputs to the slow plain path."""
    from headsparse.ops import torch_backend as tb

    if tb._FLASH_CPU is None or not tb._flash_supports(torch.float32):
        pytest.skip("this torch has no fused CPU attention")
    calls = []
    real = tb._masked_scores
    monkeypatch.setattr(tb, "_masked_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    hs.attention(q, k, v, causal=True, backend="torch")
    assert calls == []
    q[0, 1, 3] = NAN
    out = hs.attention(q, k, v, causal=True, backend="torch")
    assert calls and out[0, 1, 3].isnan().all()
