"""Every backend against the float64 reference: outputs and q/k/v gradients.

The torch backend runs the full matrix of cases; the Triton backend runs
under TRITON_INTERPRET=1 (set in conftest.py) on a smaller set with small
shapes, since each interpreted op is Python.
"""
import pytest
import torch

from attention_cases import Case, run_and_compare

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
    Case(b=2, hq=5, hkv=2, sq=19, skv=19, kv_map=[0, 0, 0, 1, 1], causal=True),  # ragged groups
    Case(b=2, hq=8, hkv=2, sq=21, skv=21, grad=[1, 0, 0, 0, 0, 0, 1, 0]),
    Case(b=2, hq=8, hkv=4, sq=21, skv=21, pruned=[0, 1, 1, 0, 0, 0, 0, 1], grad=[1, 0, 1, 0, 0, 1, 0, 0]),
    Case(b=1, hq=4, hkv=2, sq=16, skv=16, grad=[0, 0, 0, 0]),
    Case(b=1, hq=4, hkv=2, sq=16, skv=16, pruned=[1, 1, 1, 1]),
]
HEAD_DIMS = [32, 64, 80, 96, 128]


def _bool_lists(case: Case) -> Case:
    for attr in ("grad", "pruned"):
        val = getattr(case, attr)
        if val is not None:
            setattr(case, attr, [bool(x) for x in val])
    return case


SHAPE_CASES = [_bool_lists(c) for c in SHAPE_CASES]


# ---------------------------------------------------------------- torch backend

@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_shapes(case, dtype):
    run_and_compare(case, dtype, "torch")


@pytest.mark.parametrize("d", HEAD_DIMS + [256])
def test_torch_backend_head_dims(d):
    run_and_compare(Case(b=2, hq=4, hkv=2, sq=13, skv=20, d=d, causal=True), torch.float32, "torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [SHAPE_CASES[0], SHAPE_CASES[6], SHAPE_CASES[11]], ids=str)
def test_torch_backend_half(case, dtype):
    run_and_compare(case, dtype, "torch")


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
    Case(b=1, hq=5, hkv=2, sq=19, skv=19, kv_map=[0, 0, 0, 1, 1], causal=True),
    Case(b=2, hq=8, hkv=4, sq=21, skv=21, pruned=[0, 1, 1, 0, 0, 0, 0, 1], grad=[1, 0, 1, 0, 0, 1, 0, 0]),
    Case(b=1, hq=4, hkv=4, sq=16, skv=16, grad=[0, 0, 0, 0]),
    # lengths that are multiples of the blocks: the kernels compile the bounds test out
    Case(b=1, hq=2, hkv=2, sq=64, skv=64),
    Case(b=1, hq=4, hkv=2, sq=64, skv=96, causal=True),
    Case(b=1, hq=2, hkv=1, sq=96, skv=64, causal=True),
    Case(b=1, hq=2, hkv=2, sq=64, skv=64, mask="bool_empty_rows", causal=True),
]
TRITON_CASES = [_bool_lists(c) for c in TRITON_CASES]


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


def test_triton_bshd_layout_matches_bhsd():
    import headsparse as hs
    from attention_cases import make_inputs

    q, k, v, do, kw = make_inputs(Case(b=2, hq=4, hkv=2, sq=20, skv=20), torch.float32)
    for backend in ("torch", "triton"):
        out = hs.attention(q, k, v, backend=backend, out_layout="bshd", **kw)
        assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(out, hs.attention(q, k, v, backend=backend, **kw), atol=0, rtol=0)


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", TRITON_CASES + [Case(b=2, hq=8, hkv=2, sq=300, skv=517, d=128, causal=True)], ids=str)
def test_triton_gpu(case, dtype):
    run_and_compare(case, dtype, "triton", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_gpu_head_dims(d, dtype):
    run_and_compare(Case(b=2, hq=4, hkv=2, sq=257, skv=257, d=d, causal=True, mask="bool_empty_rows"), dtype,
                    "triton", device="cuda")
