"""The torch backend's sdpa path (PyTorch's public scaled_dot_product_attention), which CUDA runs by default.

On CPU the path is forced with ``HEADSPARSE_TORCH_PATH=sdpa``, so the code a GPU user's first run takes is
checked here against the float64 reference: every shape case, half dtypes, head dims, saved bytes, gate-gradient
statistics, non-finite inputs (which must leave the path for the plain one), functorch transforms, and ``auto``'s
choice on a (faked) CUDA device.
"""
import types

import pytest
import torch

import headsparse as hs
from headsparse.ops import registry, torch_backend
from headsparse.ops.memory import saved_tensor_bytes

from attention_cases import Case, bits, count_calls, make_inputs, run_and_compare
from test_attention_backends import HEAD_DIMS, SHAPE_CASES
from test_torch_backend_paths import BROADCAST_MASK_SHAPES, check_broadcast_mask, check_strided_inputs


@pytest.fixture
def sdpa_calls(sdpa_counts, monkeypatch):
    """Forces the sdpa path and counts the calls that reach it."""
    monkeypatch.setenv(torch_backend.PATH_ENV, "sdpa")
    return sdpa_counts


@pytest.fixture
def sdpa_counts(monkeypatch):
    """Counts the calls that reach the sdpa path (whichever path is set)."""
    return count_calls(monkeypatch, torch_backend, forward="_sdpa_forward", backward="_sdpa_backward")


def _computes(case: Case) -> bool:
    active = torch.ones(case.hq, dtype=torch.bool) if case.pruned is None else ~bits(case.pruned)
    return bool(active.any())


def _differentiates(case: Case) -> bool:
    active = torch.ones(case.hq, dtype=torch.bool) if case.pruned is None else ~bits(case.pruned)
    grad = torch.ones(case.hq, dtype=torch.bool) if case.grad is None else bits(case.grad)
    return bool((grad & active).any())


@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_shape_case_runs_the_sdpa_path(case, dtype, sdpa_calls):
    run_and_compare(case, dtype, "torch")
    # a float32 additive mask with a half-precision q keeps the plain path (SDPA would add it in half precision)
    takes = not (dtype != torch.float32 and case.mask == "additive")
    assert (sdpa_calls["forward"] > 0) == (takes and _computes(case))
    assert (sdpa_calls["backward"] > 0) == (takes and _differentiates(case))


@pytest.mark.parametrize("d", HEAD_DIMS + [256])
def test_head_dims(d, sdpa_calls):
    run_and_compare(Case(b=2, hq=4, hkv=2, sq=13, skv=20, d=d, causal=True, mask="bool"), torch.float32, "torch")
    assert sdpa_calls == {"forward": 1, "backward": 1}


def test_float64_and_empty_keys_take_the_plain_path(sdpa_calls):
    run_and_compare(Case(b=1, hq=4, hkv=2, sq=9, skv=9, causal=True), torch.float64, "torch")
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, requires_grad=True)
    out = hs.attention(q, k, k, backend="torch")
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all()
    assert sdpa_calls == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("hkv", [8, 2])
def test_one_of_eight_grad_heads_saves_at_most_its_share(hkv, sdpa_calls):
    """Saved bytes (saved_tensors_hooks) of 1 of 8 grad heads: at most 0.15 of dense with one KV head per query
    head; with GQA, the one KV head read stays whole."""
    case = Case(b=2, hq=8, hkv=hkv, sq=32, skv=32, d=64, causal=True)
    q, k, v, _, kw = make_inputs(case, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dense, _ = saved_tensor_bytes(lambda: hs.attention(q, k, v, backend="torch", **kw))
    one = torch.zeros(8, dtype=torch.bool)
    one[5] = True
    sparse, out = saved_tensor_bytes(lambda: hs.attention(q, k, v, grad_heads=one, backend="torch", **kw))
    assert out.requires_grad and sdpa_calls["forward"] == 2
    qo = 2 * q.numel() * 4 + 2 * 8 * 32 * 4  # q and o, and the (B, H, Sq) float32 marker
    kv = 2 * k.numel() * 4
    assert dense >= qo + kv
    assert sparse <= (qo / 8 + kv / hkv) * 1.02 + 512, (sparse, dense)
    if hkv == 8:
        assert sparse <= 0.15 * dense, (sparse, dense)


@pytest.mark.parametrize("case", [SHAPE_CASES[4], SHAPE_CASES[6], SHAPE_CASES[10], SHAPE_CASES[12]], ids=str)
def test_gate_statistics_and_gradients_equal_the_plain_path(case, monkeypatch):
    q, k, v, do, kw = make_inputs(case, torch.float32, seed=3)

    def run(path):
        monkeypatch.setenv(torch_backend.PATH_ENV, path)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with hs.record_gate_grads() as rec:
            out = hs.attention(*leaves, backend="torch", stats_key="x", **kw)
        grads = torch.autograd.grad(out, leaves, do)
        return [out, *grads, rec.by_key()["x"]]

    for a, b in zip(run("sdpa"), run("plain")):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("mask", [None, "bool", "causal"])
def test_non_finite_inputs_follow_the_specification(which, mask, sdpa_calls):
    """NaN/inf in an input: the sdpa path hands the call to the plain path (forward and backward), which
    propagates them as the reference does."""
    gen = torch.Generator().manual_seed(1)
    t = [torch.randn(1, 2, 5, 16, generator=gen) for _ in range(3)]
    t[which][0, 1, 1, 3] = float("nan")
    kw = {}
    if mask == "bool":
        keep = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        keep[..., 2, :] = False
        keep[..., 0, 1] = False
        kw["attention_mask"] = keep
    elif mask == "causal":
        kw["causal"] = True
    leaves = [x.clone().requires_grad_() for x in t]
    out = hs.attention(*leaves, backend="torch", **kw)
    ref = hs.attention_reference(*(x.double() for x in t), **kw)
    assert not torch.isfinite(ref).all()
    torch.testing.assert_close(out.double(), ref, equal_nan=True, atol=1e-5, rtol=1e-5)
    out.nan_to_num().sum().backward()
    assert sdpa_calls == {"forward": 1, "backward": 0}


def test_fully_masked_rows_give_zero_and_finite_gradients(sdpa_calls):
    q, k, v = (torch.randn(2, 2, 6, 16, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    keep = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(7)) > 0.4
    keep[:, :, 3] = False
    out = hs.attention(q, k, v, attention_mask=keep, backend="torch")
    (out * torch.randn_like(out)).sum().backward()
    assert (out[:, :, 3] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, 3] == 0).all()
    assert sdpa_calls == {"forward": 1, "backward": 1}


def test_functorch_transforms_match_the_reference(sdpa_calls):
    """torch.func.grad and vmap of grad: the backward of an sdpa forward inside a transform cannot run autograd, so
    it takes the plain backward on a recomputed log-sum-exp."""
    q, k, v = (torch.randn(2, 4, 7, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    grad = bits("0110")

    def f(x):
        return hs.attention(x, k, v, grad_heads=grad, causal=True, backend="torch").square().sum()

    def ref(x):
        return hs.attention_reference(x, k.double(), v.double(), grad_heads=grad, causal=True).square().sum()

    torch.testing.assert_close(torch.func.grad(f)(q).double(), torch.func.grad(ref)(q.double()), atol=5e-5, rtol=1e-5)
    qs = torch.stack([q, q * 0.5])
    expect = torch.stack([torch.func.grad(ref)(x.double()) for x in qs])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f))(qs).double(), expect, atol=5e-5, rtol=1e-5)
    assert sdpa_calls["backward"] == 0


def test_batched_gradients_of_an_sdpa_forward(sdpa_calls):
    case = Case(b=1, hq=4, hkv=2, sq=6, skv=9, d=16, causal=True, mask="bool_empty_rows", grad="1010")
    q, k, v, _, kw = make_inputs(case, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = hs.attention(*leaves, backend="torch", **kw)
    assert sdpa_calls["forward"] == 1
    cots = torch.randn((3,) + out.shape, generator=torch.Generator().manual_seed(2))
    batched = torch.autograd.grad(out, leaves, cots, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(out, leaves, cots[i], retain_graph=True)
        for a, b in zip(batched, one):
            torch.testing.assert_close(a[i], b, atol=2e-5, rtol=1e-5)


def test_bad_path_setting_is_named(monkeypatch):
    monkeypatch.setenv(torch_backend.PATH_ENV, "flash")
    with pytest.raises(ValueError, match="HEADSPARSE_TORCH_PATH must be one of"):
        hs.attention(*(torch.randn(1, 1, 2, 8) for _ in range(3)), backend="torch")


def test_auto_path_is_cpu_flash_on_cpu_and_sdpa_elsewhere(monkeypatch):
    monkeypatch.delenv(torch_backend.PATH_ENV, raising=False)
    assert torch_backend.fused_path("cuda") == "sdpa"
    assert torch_backend.fused_path("mps") == "sdpa"
    expect = "cpu-flash" if torch_backend._FLASH_CPU is not None else "plain"
    assert torch_backend.fused_path("cpu") == expect


def test_the_sdpa_path_stays_on_the_public_api():
    """The path must work on every torch the metadata allows, so it calls only the public SDPA function with
    keywords every release since 2.1 takes (no private aten op, whose arguments change between releases)."""
    import inspect

    for fn in (torch_backend._sdpa_forward, torch_backend._sdpa_backward, torch_backend._sdpa_mask):
        src = inspect.getsource(fn)
        assert "torch.ops" not in src and "aten" not in src, fn.__name__
    doc = torch.nn.functional.scaled_dot_product_attention.__doc__
    for keyword in ("attn_mask=None", "is_causal=False", "scale=None"):
        assert keyword in doc, keyword


# ---------------------------------------------------------------- auto's choice on CUDA


def _fake_cuda_problem():
    q = torch.empty(1, 4, 8, 64, device="meta", dtype=torch.bfloat16)
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=q.dtype, q=q, head_dim=64)


@pytest.fixture
def usable_fake_gpu_backends(monkeypatch):
    triton = registry.get("triton")
    monkeypatch.setattr(triton, "_status", (True, "faked for the test"))
    monkeypatch.setattr(triton, "devices", lambda: ("cuda",))
    yield


def test_auto_picks_torch_on_cuda(usable_fake_gpu_backends, monkeypatch):
    monkeypatch.delenv(registry.TRITON_AUTO_SWITCH, raising=False)
    assert registry.resolve("attention", "auto", _fake_cuda_problem()).name == "torch"
    assert registry.resolve("attention", "triton", _fake_cuda_problem()).name == "triton"  # when named


def test_auto_picks_triton_on_cuda_only_behind_the_switch(usable_fake_gpu_backends, monkeypatch):
    monkeypatch.setenv(registry.TRITON_AUTO_SWITCH, "1")
    assert registry.auto_order("attention", "cuda") == ("triton", "torch")
    assert registry.resolve("attention", "auto", _fake_cuda_problem()).name == "triton"
    assert registry.auto_order("attention", "cpu") == ("torch",)
    monkeypatch.setenv(registry.TRITON_AUTO_SWITCH, "0")
    assert registry.resolve("attention", "auto", _fake_cuda_problem()).name == "torch"


# ---------------------------------------------------------------- on a GPU: the default path, no switch


@pytest.mark.gpu
@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_default_is_the_sdpa_path(case, dtype, sdpa_counts, monkeypatch):
    monkeypatch.delenv(torch_backend.PATH_ENV, raising=False)
    run_and_compare(case, dtype, "auto", device="cuda")
    takes = not (dtype != torch.float32 and case.mask == "additive")
    assert (sdpa_counts["forward"] > 0) == (takes and _computes(case))
    assert (sdpa_counts["backward"] > 0) == (takes and _differentiates(case))


@pytest.mark.gpu
@pytest.mark.parametrize("d", HEAD_DIMS + [256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_long_sequences_and_head_dims(d, dtype, sdpa_counts):
    run_and_compare(Case(b=2, hq=8, hkv=2, sq=1031, skv=1031, d=d, causal=True, mask="bool_empty_rows",
                         grad="10100100", pruned="01000001"), dtype, "torch", device="cuda")
    assert sdpa_counts == {"forward": 1, "backward": 1}


@pytest.mark.gpu
def test_cuda_saved_bytes_at_one_of_eight_grad_heads(sdpa_counts):
    case = Case(b=2, hq=8, hkv=8, sq=512, skv=512, d=128, causal=True)
    q, k, v, _, kw = make_inputs(case, torch.bfloat16, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dense, _ = saved_tensor_bytes(lambda: hs.attention(q, k, v, **kw))
    one = torch.zeros(8, dtype=torch.bool)
    one[5] = True
    sparse, _ = saved_tensor_bytes(lambda: hs.attention(q, k, v, grad_heads=one, **kw))
    assert sdpa_counts["forward"] == 2
    assert sparse <= 0.15 * dense, (sparse, dense)


@pytest.mark.parametrize("mask_shape", BROADCAST_MASK_SHAPES, ids=str)
def test_broadcast_masks(mask_shape, sdpa_calls):
    check_broadcast_mask(mask_shape, grad_heads=bits("1101"))
    assert sdpa_calls == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_whose_last_dimension_is_strided(dtype, sdpa_calls):
    check_strided_inputs(dtype)
    assert sdpa_calls == {"forward": 1, "backward": 1}
