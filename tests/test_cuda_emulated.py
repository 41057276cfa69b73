"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator in tests/cuda_emu, against float64.

No GPU is needed: g++ compiles the .cu files against tests/cuda_emu/hs_cuda_emu.h
(fibers for threads, barriers for __syncthreads/__syncwarp/shuffles, WMMA with its
documented semantics), and tests/_cuda_emu.py registers the result as the attention
backend "cuda_emu". This checks indexing, masking, tiling, the online softmax and the
dispatch between the tensor-core and CUDA-core kernels; it says nothing about speed,
races between blocks or tensor-core rounding, which need the GPU tests
(tests/test_attention_backends.py -m gpu, compute-sanitizer in scripts/gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch

import headsparse as hs
from headsparse.ops import extension, registry
from headsparse.ops.head_stats import gram, head_stats

import _cuda_emu as emu
from attention_cases import TOL, Case, make_inputs, run_and_compare
from test_attention_backends import SHAPE_CASES

if emu.compiler() is None:  # pragma: no cover - g++ is part of the documented setup
    pytest.skip("g++ not found", allow_module_level=True)

H100 = dict(cc_major=9, cc_minor=0, smem_optin=232448)
A10 = dict(cc_major=8, cc_minor=6, smem_optin=101376)  # sm_86: 99 KiB opt-in
T4 = dict(cc_major=7, cc_minor=5, smem_optin=65536)  # no bf16 tensor cores: CUDA-core kernels only
TC = ["attn_fwd_tc", "attn_bwd_preprocess", "attn_bwd_tc"]
SIMT = ["attn_fwd_simt", "attn_bwd_preprocess", "attn_bwd_simt"]


class EmulatedCuda(extension.CompiledBackend):
    """The ``cuda`` backend's rules (its ``limits``: no float64, head_dim <= 256) with csrc/cuda run by the
    emulator on CPU tensors."""

    def __init__(self):
        super().__init__("cuda")
        self.name = "cuda_emu"

    def devices(self):
        return ("cpu",)

    def probe(self):
        return True, "csrc/cuda under the CPU emulator"

    def forward(self, *args):
        return emu.forward(*args)

    def backward(self, *args):
        return emu.backward(*args)


@pytest.fixture(scope="module", autouse=True)
def cuda_emu_backend():
    emu.lib()  # build once, before the first timed case
    registry.register_backend(EmulatedCuda())
    yield
    registry.unregister_backend("cuda_emu")


@pytest.fixture
def device():
    def set_device(spec):
        emu.configure(**spec)
        emu.clear_launched()

    set_device(H100)
    yield set_device
    emu.configure(**H100)


def _kernels_of_one_call():
    """The (forward, preprocess, backward) kernels of the last attention call, deduplicated."""
    seen = []
    for name in emu.launched():
        if name not in seen:
            seen.append(name)
    return seen


# ---------------------------------------------------------------- the emulator itself

def test_emulator_controls_pass():
    assert emu.selftest(0)


@pytest.mark.parametrize("which", sorted(emu.SELFTESTS), ids=lambda w: emu.SELFTESTS[w].replace(" ", "-"))
def test_emulator_flags_planted_bug(which):
    assert emu.selftest(which), f"the emulator missed: {emu.SELFTESTS[which]}"


# ---------------------------------------------------------------- attention against float64

@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_kernels(case, dtype, device):
    run_and_compare(case, dtype, "cuda_emu")
    if case.pruned == "1111":  # nothing to compute
        assert emu.launched() == []
    elif case.grad == "0000":  # forward only
        assert _kernels_of_one_call() == ["attn_fwd_tc"]
    else:
        assert _kernels_of_one_call() == TC


@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
def test_cuda_core_kernels_float32(case, device):
    run_and_compare(case, torch.float32, "cuda_emu")
    assert "attn_fwd_tc" not in emu.launched() and "attn_bwd_tc" not in emu.launched()


@pytest.mark.parametrize("case", [SHAPE_CASES[0], SHAPE_CASES[6], SHAPE_CASES[12]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_core_kernels_half_on_pre_ampere(case, dtype, device):
    device(T4)
    run_and_compare(case, dtype, "cuda_emu")
    assert _kernels_of_one_call() == SIMT


@pytest.mark.parametrize("d", [16, 32, 40, 48, 64, 80, 96, 112, 128, 136, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dims_and_path(d, dtype, device):
    run_and_compare(Case(b=1, hq=2, hkv=1, sq=70, skv=75, d=d, causal=True, mask="bool_empty_rows"), dtype,
                    "cuda_emu")
    assert _kernels_of_one_call() == (TC if d % 16 == 0 and d <= 128 else SIMT)


def test_long_sequence_several_tiles(device):
    """Several key tiles per query block and several query tiles per key block, with GQA and a pruned head."""
    case = Case(b=1, hq=4, hkv=2, sq=150, skv=200, d=64, causal=True, mask="additive", pruned="0010")
    run_and_compare(case, torch.bfloat16, "cuda_emu")
    assert _kernels_of_one_call() == TC


def _compare_fp16(inputs, do, kw, ref_kw):
    """cuda_emu on fp16 ``inputs`` (q, k, v, any layout) against the float64 reference: outputs and gradients.

    For inputs that run_and_compare cannot make (other layouts, other mask dtypes); TOL[float16] tolerances.
    """
    leaves = [t.requires_grad_() for t in inputs]
    out = hs.attention(*leaves, backend="cuda_emu", **kw)
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = hs.attention_reference(*ref_leaves, **ref_kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    atol_o, atol_g = TOL[torch.float16]
    torch.testing.assert_close(out.double(), ref, atol=atol_o, rtol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, atol=atol_g, rtol=0)


# Exact multiples of the 64-row / 64-key tiles, and one row or key past them.
TILE_EDGE_CASES = [Case(b=1, hq=2, hkv=1, sq=sq, skv=skv, d=64, causal=True, mask="bool_empty_rows")
                   for sq, skv in ((64, 64), (128, 64), (64, 128), (65, 129))]


@pytest.mark.parametrize("case", TILE_EDGE_CASES, ids=str)
def test_tile_boundaries(case, device):
    run_and_compare(case, torch.bfloat16, "cuda_emu")
    assert _kernels_of_one_call() == TC


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("family", ["tc", "simt"])
def test_additive_mask_dtypes(mask_dtype, family, device):
    """fp16, bf16 and fp64 additive masks are read in their own dtype (the shared cases use fp32 masks)."""
    if family == "simt":
        device(T4)
    case = Case(b=2, hq=4, hkv=2, sq=23, skv=31, d=64, causal=True, mask="additive")
    q, k, v, do, kw = make_inputs(case, torch.float16)
    mask = kw["attention_mask"].to(mask_dtype)
    _compare_fp16([t.clone() for t in (q, k, v)], do, dict(kw, attention_mask=mask),
                  dict(kw, attention_mask=mask.double()))
    assert _kernels_of_one_call() == (TC if family == "tc" else SIMT)


def _strided_layouts(t):
    """(B, S, H, D) strides (vector loads), last-dim stride 2 and a data pointer off 16-byte alignment
    (both scalar loads)."""
    bshd = t.transpose(1, 2).contiguous().transpose(1, 2)
    stride2 = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)[..., ::2].copy_(t)
    offset = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)
    return {"bshd": bshd, "stride2": stride2, "misaligned": offset}


@pytest.mark.parametrize("layout", ["bshd", "stride2", "misaligned"])
def test_strided_inputs_both_load_paths(layout, device):
    """The Hugging Face (B, S, H, D) layout takes the 16-byte vector loads; a non-unit last stride or a
    misaligned data pointer takes the scalar loads. Outputs and gradients match float64 either way."""
    case = Case(b=2, hq=4, hkv=2, sq=33, skv=40, d=64, causal=True)
    q, k, v, do, kw = make_inputs(case, torch.float16)
    inputs = [_strided_layouts(t)[layout] for t in (q, k, v)]
    if layout == "misaligned":
        assert all(t.data_ptr() % 16 != 0 for t in inputs)
    _compare_fp16(inputs, do, kw, kw)
    assert _kernels_of_one_call() == TC


def test_shared_memory_limit_decides_each_pass(device):
    """With 64 KiB of opt-in shared memory the D=128 forward tiles (61 KiB) fit and the backward's (97 KiB)
    do not: the forward runs on tensor cores, the backward on CUDA cores, and the result is still right."""
    device(dict(cc_major=8, cc_minor=0, smem_optin=64 * 1024))
    assert emu.uses_tensor_cores(torch.float16, 128) == (True, False)
    run_and_compare(Case(b=1, hq=2, hkv=1, sq=40, skv=40, d=128, causal=True), torch.float16, "cuda_emu")
    assert _kernels_of_one_call() == ["attn_fwd_tc", "attn_bwd_preprocess", "attn_bwd_simt"]


def test_old_architecture_binary_is_never_dispatched_to_tensor_cores(device):
    """Built for sm_75 (+PTX) and run on an H100: the tensor-core kernels are a trap there, so not chosen."""
    device(dict(H100, binary_arch=75))
    assert emu.uses_tensor_cores(torch.bfloat16, 64) == (False, False)
    run_and_compare(SHAPE_CASES[0], torch.bfloat16, "cuda_emu")
    assert _kernels_of_one_call() == SIMT


@pytest.mark.parametrize("spec", [H100, A10, T4], ids=["sm90", "sm86", "sm75"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [48, 64, 72, 128, 256])
def test_path_query_matches_the_launched_kernels(spec, dtype, d, device):
    device(spec)
    fwd, bwd = emu.uses_tensor_cores(dtype, d)
    run_and_compare(Case(b=1, hq=2, hkv=1, sq=9, skv=12, d=d), dtype, "cuda_emu")
    kernels = _kernels_of_one_call()
    assert fwd == ("attn_fwd_tc" in kernels) and bwd == ("attn_bwd_tc" in kernels)
    expect_tc = dtype != torch.float32 and d % 16 == 0 and d <= 128 and spec["cc_major"] >= 8
    assert fwd == bwd == expect_tc  # the tiles fit sm_86's 99 KiB at every head dim


def test_environment_switch_forces_cuda_cores(device, monkeypatch):
    monkeypatch.setenv("HEADSPARSE_CUDA_TENSOR_CORES", "0")
    run_and_compare(SHAPE_CASES[3], torch.bfloat16, "cuda_emu")
    assert _kernels_of_one_call() == SIMT


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_statistics_from_the_backward(dtype, device):
    case = Case(b=3, hq=4, hkv=2, sq=21, skv=21, causal=True, mask="bool_empty_rows")
    q, k, v, do, kw = make_inputs(case, dtype)
    grad = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with hs.record_gate_grads() as rec:
        out = hs.attention(*leaves, grad_heads=grad, backend="cuda_emu", stats_key="layer0", **kw)
    (out * do).sum().backward()
    got = rec.by_key()["layer0"]
    expect = (out.detach().double() * do.double()).sum(dim=(2, 3))
    assert torch.isnan(got[:, 1]).all()
    torch.testing.assert_close(got[:, grad].double(), expect[:, grad], atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- statistics kernels

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_g", [True, False])
def test_head_stats_kernel(dtype, with_g):
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 3, 70, 4, 40  # 160 channels: two channel blocks, two token blocks
    x = torch.randn(b, h * d, s, generator=gen).to(dtype).transpose(1, 2)  # strided (B, S, C)
    g = torch.randn(b, s, h * d, generator=gen).to(dtype) if with_g else None
    mask = torch.rand(b, s, generator=gen) > 0.3
    mask[0] = False
    xg, xx, gg, abs_x, abs_g = emu.head_stats(x, g, h, mask)
    ref = head_stats(x.double().contiguous(), None if g is None else g.double(), h, mask, backend="torch")
    tol = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xx.double(), ref.x_sq, **tol)
    torch.testing.assert_close(abs_x.double(), ref.abs_x, **tol)
    if with_g:
        torch.testing.assert_close(xg.double(), ref.xg, **tol)
        torch.testing.assert_close(gg.double(), ref.g_sq, **tol)
        torch.testing.assert_close(abs_g.double(), ref.abs_g, **tol)
    assert (xx[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_gram_kernel(dtype, masked):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 45, 70, generator=gen).to(dtype)  # C = 70: three column tiles, a partial one
    mask = (torch.rand(2, 45, generator=gen) > 0.4) if masked else None
    out = emu.gram(x, mask)
    ref = gram(x.double(), mask, backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
