"""Bad input raises a ValueError that names the argument; unusable backends say why."""
import pytest
import torch

import headsparse as hs
from headsparse.ops.registry import BackendUnavailableError


def _qkv(b=2, hq=4, hkv=2, sq=8, skv=8, d=16, dtype=torch.float32):
    return torch.randn(b, hq, sq, d, dtype=dtype), torch.randn(b, hkv, skv, d, dtype=dtype), \
        torch.randn(b, hkv, skv, d, dtype=dtype)


def _bad_calls():
    q, k, v = _qkv()
    yield "q", lambda: hs.attention(q[0], k, v)
    yield "k", lambda: hs.attention(q, k[0], v)
    yield "k and v", lambda: hs.attention(q, k, v[:, :, :5])
    yield "dtype", lambda: hs.attention(q, k.double(), v)
    yield "batch", lambda: hs.attention(q, k[:1], v[:1])
    yield "head_dim", lambda: hs.attention(q, k[..., :8], v[..., :8])
    yield "kv_head_index", lambda: hs.attention(q, *_qkv(hkv=3)[1:])
    yield "kv_head_index", lambda: hs.attention(q, k, v, kv_head_index=torch.tensor([0, 1, 2, 0]))
    yield "kv_head_index", lambda: hs.attention(q, k, v, kv_head_index=torch.tensor([0, 1]))
    yield "kv_head_index", lambda: hs.attention(q, k, v, kv_head_index=torch.tensor([0.0, 1.0, 1.0, 1.0]))
    yield "grad_heads", lambda: hs.attention(q, k, v, grad_heads=torch.ones(3, dtype=torch.bool))
    yield "grad_heads", lambda: hs.attention(q, k, v, grad_heads=torch.ones(4))
    # a Python list is accepted (what torch.compile keeps static), but only of bools, one per head
    yield "pruned_heads", lambda: hs.attention(q, k, v, pruned_heads=[1, 0, 0, 0])
    yield "pruned_heads", lambda: hs.attention(q, k, v, pruned_heads=[True, False])
    yield "attention_mask", lambda: hs.attention(q, k, v, attention_mask=torch.ones(2, 1, 8, 7, dtype=torch.bool))
    yield "attention_mask", lambda: hs.attention(q, k, v, attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.int32))
    yield "causal", lambda: hs.attention(q, k, v, causal=1)
    yield "scale", lambda: hs.attention(q, k, v, scale=float("inf"))
    yield "scale", lambda: hs.attention(q, k, v, scale=float("nan"))
    yield "out_layout", lambda: hs.attention(q, k, v, out_layout="sbhd")
    yield "backend", lambda: hs.attention(q, k, v, backend="flash")
    yield "q", lambda: hs.attention(q.to(torch.int64), k, v)


@pytest.mark.parametrize("name,call", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_unusable_backend_raises_with_reason():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        hs.attention(q, k, v, backend="triton")


def test_auto_never_falls_back_silently_to_a_backend_that_cannot_run():
    q, k, v = _qkv(d=300)
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        hs.attention(q, k, v)


def test_backends_report():
    info = hs.backends()
    assert {"torch", "triton"} <= set(info)
    assert info["torch"].usable
    for entry in info.values():
        assert entry.reason  # every backend says why it is (not) usable


def test_triton_interpreter_reports_an_incompatible_numpy(monkeypatch):
    # Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy 2.4 rejects (measured: 3.6.0 with
    # numpy 2.4.6 fails, with 2.3.5 passes; 3.7.1 squeezes first). The backend must say so, not crash mid-kernel.
    import numpy
    import triton

    from headsparse.ops import triton_backend

    assert "numpy<2.4" in triton_backend._interpreter_incompatibility("3.6.0", "2.4.6")
    assert triton_backend._interpreter_incompatibility("3.6.0", "2.3.5") is None
    assert triton_backend._interpreter_incompatibility("3.7.1", "2.4.6") is None
    assert triton_backend._interpreter_incompatibility("3.8.0", "2.5.0") is None
    if torch.cuda.is_available():
        return  # compiled kernels: the interpreter is not involved
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton_backend.BACKEND, "_status", None)  # probe again; the cached status comes back after
    info = hs.backends()["triton"]
    assert not info.usable and "numpy 2.4.6" in info.reason
    q, k, v = _qkv(d=32)
    with pytest.raises(BackendUnavailableError, match="numpy<2.4"):
        hs.attention(q, k, v, backend="triton")
