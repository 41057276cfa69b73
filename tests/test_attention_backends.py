"""Every backend against the float64 reference: outputs and q/k/v gradients.

The torch backend and the compiled ``cpu`` backend run the full matrix of
cases; the Triton backend runs under TRITON_INTERPRET=1 (set in conftest.py)
on a smaller set with small shapes, since each interpreted op is Python.
"""
import os

import pytest
import torch

from attention_cases import Case, run_and_compare, split_backend, torch_path

# The compiled extension is required unless it was deliberately not built. "torch:sdpa" is the torch backend forced
# onto its sdpa path (PyTorch's public scaled_dot_product_attention: the CUDA default), so CPU runs that code too.
CPU_BACKENDS = ["torch", "torch:sdpa"] + ([] if os.environ.get("HEADSPARSE_SKIP_EXT", "0") not in ("", "0")
                                          else ["cpu"])

SHAPE_CASES = [
    Case(),  # GQA 2, Sq < Skv, odd lengths
    Case(b=1, hq=3, hkv=3, sq=1, skv=29),  # decode step
    Case(b=1, hq=3, hkv=1, sq=41, skv=41, causal=True),  # GQA 3 (MQA)
    Case(b=3, hq=8, hkv=2, sq=17, skv=33, causal=True),  # GQA 4, bottom-right causal
    Case(b=2, hq=4, hkv=2, sq=33, skv=21, causal=True),  # Sq > Skv: the first rows see nothing
    Case(b=2, hq=4, hkv=4, sq=37, skv=37, mask="bool"),
    Case(b=2, hq=4, hkv=2, sq=37, skv=45, mask="bool_empty_rows", causal=True),
    Case(b=2, hq=4, hkv=2, sq=23, skv=23, mask="additive"),
    Case(b=2, hq=4, hkv=2, sq=23, skv=31, mask="per_head"),
    Case(b=2, hq=5, hkv=2, sq=19, skv=19, kv_map=(0, 0, 0, 1, 1), causal=True),  # ragged groups
    Case(b=2, hq=5, hkv=3, sq=19, skv=26, kv_map=(2, 0, 2, 2, 1), mask="bool"),  # ragged, unsorted
    Case(b=2, hq=8, hkv=2, sq=21, skv=21, grad="10000010"),
    Case(b=2, hq=8, hkv=4, sq=21, skv=21, pruned="01100001", grad="10100100"),
    Case(b=1, hq=4, hkv=2, sq=16, skv=16, grad="0000"),
    Case(b=1, hq=4, hkv=2, sq=16, skv=16, pruned="1111"),
]
HEAD_DIMS = [32, 64, 80, 96, 128]


# ---------------------------------------------------------------- torch and compiled cpu backends

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backends_shapes(backend, case, dtype):
    run_and_compare(case, dtype, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", HEAD_DIMS + [256])
def test_cpu_backends_head_dims(backend, d):
    run_and_compare(Case(b=2, hq=4, hkv=2, sq=13, skv=20, d=d, causal=True, mask="bool"), torch.float32, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [SHAPE_CASES[0], SHAPE_CASES[6], SHAPE_CASES[12]], ids=str)
def test_cpu_backends_half(backend, case, dtype):
    run_and_compare(case, dtype, backend)


# ---------------------------------------------------------------- triton backend

TRITON_CASES = [
    Case(b=2, hq=4, hkv=2, sq=37, skv=53),
    Case(b=1, hq=3, hkv=1, sq=41, skv=41, causal=True),
    Case(b=2, hq=4, hkv=2, sq=17, skv=45, causal=True),
    Case(b=1, hq=2, hkv=2, sq=40, skv=23, causal=True),  # Sq > Skv
    Case(b=2, hq=2, hkv=2, sq=1, skv=37),  # decode step
    Case(b=2, hq=4, hkv=2, sq=37, skv=45, mask="bool_empty_rows", causal=True),
    Case(b=1, hq=4, hkv=2, sq=23, skv=31, mask="additive"),
    Case(b=1, hq=4, hkv=2, sq=23, skv=31, mask="per_head"),
    Case(b=1, hq=5, hkv=2, sq=19, skv=19, kv_map=(0, 0, 0, 1, 1), causal=True),
    Case(b=2, hq=8, hkv=4, sq=21, skv=21, pruned="01100001", grad="10100100"),
    Case(b=1, hq=4, hkv=4, sq=16, skv=16, grad="0000"),
    # lengths that are multiples of the blocks: the kernels compile the bounds test out
    Case(b=1, hq=2, hkv=2, sq=64, skv=64),
    Case(b=1, hq=4, hkv=2, sq=64, skv=96, causal=True),
    Case(b=1, hq=2, hkv=1, sq=96, skv=64, causal=True),
    Case(b=1, hq=2, hkv=2, sq=64, skv=64, mask="bool_empty_rows", causal=True),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_backend_shapes(case):
    run_and_compare(case, torch.float32, "triton")


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_triton_backend_head_dims(d):
    run_and_compare(Case(b=1, hq=2, hkv=1, sq=35, skv=35, d=d, causal=True), torch.float32, "triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [TRITON_CASES[0], TRITON_CASES[5], TRITON_CASES[9]], ids=str)
def test_triton_backend_half(case, dtype):
    run_and_compare(case, dtype, "triton")


def test_bshd_layout_matches_bhsd():
    import headsparse as hs
    from attention_cases import make_inputs

    q, k, v, do, kw = make_inputs(Case(b=2, hq=4, hkv=2, sq=20, skv=20), torch.float32)
    for backend in [b for b in CPU_BACKENDS if ":" not in b] + ["triton"]:
        out = hs.attention(q, k, v, backend=backend, out_layout="bshd", **kw)
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(out, hs.attention(q, k, v, backend=backend, **kw), atol=0, rtol=0)


def test_strided_inputs_as_hugging_face_passes_them():
    """(B, S, H, D) buffers viewed as (B, H, S, D), as transformers hands them to an attention function."""
    import headsparse as hs

    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, s, d = 2, 4, 2, 19, 64
    q, k, v, do = (torch.randn(b, s, h, d, generator=gen).transpose(1, 2) for h in (hq, hkv, hkv, hq))
    assert not q.is_contiguous()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = hs.attention_reference(*ref_leaves, causal=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    for name in CPU_BACKENDS + ["triton"]:
        backend, path = split_backend(name)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch_path(path):
            out = hs.attention(*leaves, causal=True, backend=backend, out_layout="bshd")
            grads = torch.autograd.grad(out, leaves, do)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0, msg=lambda m: f"{backend}: {m}")
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=0, msg=lambda m: f"{backend}: {m}")



def test_k_and_v_in_different_layouts():
    """k contiguous, v a (B, S, H, D) buffer viewed as (B, H, S, D): the Triton kernels read k and v with one set of
    strides, so their launchers give the two one layout first; every backend still matches the reference."""
    import headsparse as hs

    gen = torch.Generator().manual_seed(4)
    b, hq, hkv, s, d = 2, 4, 2, 21, 32
    q, do = (torch.randn(b, hq, s, d, generator=gen) for _ in range(2))
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, s, hkv, d, generator=gen).transpose(1, 2)
    assert k.stride() != v.stride()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = hs.attention_reference(*ref_leaves, causal=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    for name in CPU_BACKENDS + ["triton"]:
        backend, path = split_backend(name)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch_path(path):
            out = hs.attention(*leaves, causal=True, backend=backend)
            grads = torch.autograd.grad(out, leaves, do)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0, msg=lambda m: f"{backend}: {m}")
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, atol=5e-5, rtol=0, msg=lambda m: f"{backend}: {m}")



# ---------------------------------------------------------------- GPU
# The compiled cuda backend is gated behind HEADSPARSE_ENABLE_UNVALIDATED_CUDA=1 until it has
# passed these tests on a GPU; the fixture sets it for them.

GPU_BACKENDS = ["torch", "triton", "cuda"]
GPU_CASES = TRITON_CASES + [
    Case(b=2, hq=8, hkv=2, sq=300, skv=517, d=128, causal=True),
    Case(b=3, hq=8, hkv=2, sq=17, skv=133, causal=True, mask="bool"),
    Case(b=2, hq=8, hkv=4, sq=21, skv=70, d=128, grad="10100100", pruned="01100001"),
]


@pytest.fixture
def unvalidated_cuda_enabled(monkeypatch):
    from headsparse.ops import registry

    monkeypatch.setenv("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "1")
    registry.get("cuda").reset_status()
    yield
    registry.get("cuda").reset_status()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_backends(case, dtype, backend, unvalidated_cuda_enabled):
    run_and_compare(case, dtype, backend, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_backends_head_dims(d, dtype, backend, unvalidated_cuda_enabled):
    run_and_compare(Case(b=2, hq=4, hkv=2, sq=257, skv=257, d=d, causal=True, mask="bool_empty_rows"), dtype,
                    backend, device="cuda")
