"""The compiled extension: loader, registry, strided inputs, and the statistics ops against float64.

The ``cpu`` attention backend runs the shared attention suites
(tests/test_attention_backends.py, tests/test_attention_skipping.py) like every backend.

Skipped as a whole only when the extension was deliberately not built
(HEADSPARSE_SKIP_EXT=1); otherwise a missing or broken build fails here.
"""
from __future__ import annotations

import os

import pytest
import torch

import headsparse as hs
from headsparse.ops import extension, registry
from headsparse.ops.head_stats import gram, head_stats

from attention_cases import Case, run_and_compare

if os.environ.get("HEADSPARSE_SKIP_EXT", "0") not in ("", "0"):
    pytest.skip("HEADSPARSE_SKIP_EXT=1: the compiled extension is not built", allow_module_level=True)


def test_cpu_backend_matches_torch_backend_exactly_in_float64():
    case = Case(b=2, hq=6, hkv=2, sq=25, skv=31, causal=True, mask="additive", grad="110010")
    out_cpu, g_cpu = run_and_compare(case, torch.float64, "cpu")
    out_t, g_t = run_and_compare(case, torch.float64, "torch")
    torch.testing.assert_close(out_cpu, out_t, atol=1e-12, rtol=0)
    for a, b in zip(g_cpu, g_t):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- registry and loader

def test_backends_report_extension_status():
    info = hs.backends()
    assert info["cpu"].usable, info["cpu"].reason
    assert "headsparse._C" in info["cpu"].reason
    assert info["cpu"].devices == ("cpu",)
    assert not info["cuda"].usable  # no GPU here / built without CUDA / not validated
    assert info["cuda"].reason


def test_explicit_cuda_backend_on_cpu_raises_with_reason():
    q = torch.randn(1, 2, 4, 32)
    with pytest.raises(hs.BackendUnavailableError, match="cuda"):
        hs.attention(q, q, q, backend="cuda")
    with pytest.raises(hs.BackendUnavailableError, match="cuda"):
        hs.head_stats(q[0], None, 1, backend="cuda")


def test_auto_never_picks_the_cuda_backend():
    for op, orders in registry._AUTO_ORDER.items():
        for device in ("cpu", "cuda", "mps"):
            assert "cuda" not in registry.auto_order(op, device), (op, device)
        for order in orders.values():
            assert "cuda" not in order


def test_extension_abi_matches():
    mod = extension.get()
    assert mod.ABI_VERSION == extension.ABI_VERSION
    assert isinstance(mod.with_cuda(), bool)


# ---------------------------------------------------------------- statistics ops

def _stats_inputs(dtype, b=3, s=11, h=4, d=16, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # a (B, S, C) view with non-unit channel stride
        x = torch.randn(b, h * d, s, generator=gen).to(dtype).transpose(1, 2)
        g = torch.randn(b, h * d, s, generator=gen).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(b, s, h * d, generator=gen).to(dtype)
        g = torch.randn(b, s, h * d, generator=gen).to(dtype)
    mask = torch.rand(b, s, generator=gen) > 0.3
    mask[0, :] = False  # a sample with no tokens
    mask[1, 0] = True
    return x, g, mask


STATS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def _check_stats(res, x, g, mask, h, dtype):
    ref = head_stats(x.double(), None if g is None else g.double(), h, mask, backend="torch")
    rtol = STATS_TOL[dtype]
    fields = ["x_sq", "abs_x"] + ([] if g is None else ["xg", "g_sq", "abs_g"])
    for f in fields:
        torch.testing.assert_close(getattr(res, f).double(), getattr(ref, f), rtol=rtol, atol=rtol * 10,
                                   msg=lambda m: f"{f}: {m}")
    if g is None:
        assert res.xg is None and res.g_sq is None and res.abs_g is None


@pytest.mark.parametrize("backend", ["cpu", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_head_stats_match_float64(backend, dtype, strided):
    x, g, mask = _stats_inputs(dtype, strided=strided)
    res = hs.head_stats(x, g, num_heads=4, token_mask=mask, backend=backend)
    _check_stats(res, x, g, mask, 4, dtype)
    assert (res.xg[0] == 0).all() and (res.x_sq[0] == 0).all()  # sample 0 has no tokens
    # definitions, spelled out independently
    xd, gd = x.double() * mask[..., None], g.double() * mask[..., None]
    xg = (xd.view(3, 11, 4, 16) * gd.view(3, 11, 4, 16)).sum(dim=(1, 3))
    torch.testing.assert_close(res.xg.double(), xg, rtol=1e-5, atol=1e-4)
    apt = (xd.abs().sum(dim=(0, 1)) * gd.abs().sum(dim=(0, 1))).view(4, 16).sum(-1)
    torch.testing.assert_close(res.apt_salience().double(), apt, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_head_stats_without_g_and_mask(backend):
    x, _, _ = _stats_inputs(torch.float32, b=2, s=7, h=3, d=8)
    res = hs.head_stats(x, num_heads=3, backend=backend)
    _check_stats(res, x, None, None, 3, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_gram_matches_float64(backend, dtype, masked):
    x, _, mask = _stats_inputs(dtype, b=3, s=13, h=3, d=8, strided=True)
    m = mask if masked else None
    res = hs.gram(x, token_mask=m, backend=backend)
    rows = x.double().reshape(-1, 24)
    if m is not None:
        rows = rows[m.reshape(-1)]
    ref = rows.T @ rows
    assert res.shape == (24, 24)
    torch.testing.assert_close(res.double(), ref, rtol=STATS_TOL[dtype], atol=STATS_TOL[dtype] * 10)
    blocks = hs.head_gram_blocks(res, 3)
    assert blocks.shape == (3, 8, 8)
    torch.testing.assert_close(blocks[1].double(), ref[8:16, 8:16], rtol=1e-5, atol=1e-4)
    cross = hs.cross_head_inner(res, 3)
    xh = rows.view(-1, 3, 8)
    torch.testing.assert_close(cross.double(), torch.einsum("nid,njd->ij", xh, xh), rtol=1e-5, atol=1e-4)


def test_gram_cpu_many_tokens_accumulates_over_blocks():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3000, 16, generator=gen)  # 9000 tokens: more than one 4096-token block
    mask = torch.rand(3, 3000, generator=gen) > 0.2
    ref = gram(x.double(), mask, backend="torch")
    torch.testing.assert_close(hs.gram(x, mask, backend="cpu").double(), ref, rtol=1e-4, atol=1e-2)


def test_stats_bad_input():
    x = torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match="num_heads"):
        hs.head_stats(x, num_heads=5)
    with pytest.raises(ValueError, match="num_heads is required"):
        hs.head_stats(x)
    with pytest.raises(ValueError, match="token_mask"):
        hs.head_stats(x, num_heads=3, token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="g must match"):
        hs.head_stats(x, torch.randn(2, 5, 6), num_heads=3)
    with pytest.raises(ValueError, match="3 dims"):
        hs.gram(x[0])
    with pytest.raises(ValueError, match="backend"):
        hs.gram(x, backend="fast")


# ---------------------------------------------------------------- loader failure modes

@pytest.fixture
def fresh_loader(monkeypatch):
    """Reset the loader's cache (and every backend's cached status) so that a test can load again under new
    conditions; monkeypatch puts both back afterwards."""
    for name, val in (("_loaded", False), ("_module", None), ("_error", None), ("_pending", None), ("_aot_note", "")):
        monkeypatch.setattr(extension, name, val)
    for backend in registry._BACKENDS.values():
        monkeypatch.setattr(backend, "_status", None)
    yield


def test_loader_reports_stale_build(fresh_loader, monkeypatch):
    monkeypatch.setattr(extension, "ABI_VERSION", 10**6)
    ok, why = extension.status()
    assert not ok and "stale" in why
    info = hs.backends()["cpu"]
    assert not info.usable and "stale" in info.reason
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(hs.BackendUnavailableError, match="stale"):
        hs.attention(q, q, q, backend="cpu")
    assert torch.isfinite(hs.attention(q, q, q)).all()  # auto / torch still work


def test_loader_compiles_on_first_use_when_this_torch_has_no_build(fresh_loader, monkeypatch, tmp_path, capsys):
    """No build for this torch in the cache: usable, compiled by the first get() (the compile itself is faked with
    the module already loaded; tests/test_packaging.py compiles from an installed sdist)."""
    built = extension.get()
    _forget(monkeypatch)
    monkeypatch.setenv("HEADSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(extension, "_PKG_DIR", str(tmp_path))  # no ahead-of-time build either
    calls = []
    monkeypatch.setattr(extension._build, "jit_load", lambda torch_, cuda, verbose=False: calls.append(cuda) or built)
    ok, why = extension.status()
    assert ok and "compiled on first use" in why and "build-ext" in why and str(tmp_path) in why, why
    assert not calls  # probing never compiles
    assert "compiled on first use" in hs.backends()["cpu"].reason
    assert extension.get() is built and calls == [False]
    assert "compiling the C++ extension for torch" in capsys.readouterr().err
    reason = hs.backends()["cpu"].reason  # the cached status is renewed after the build
    assert "compiled on first use" not in reason and "headsparse._C" in reason, reason


def test_loader_reports_missing_compiler_in_one_line(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setenv("HEADSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(extension, "_PKG_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-hs")
    ok, why = extension.status()
    assert not ok and "no C++ compiler ('no-such-compiler-hs' is not on PATH" in why and "\n" not in why, why
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        extension.get()
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(hs.BackendUnavailableError, match="no C\\+\\+ compiler"):
        hs.attention(q, q, q, backend="cpu")


def _forget(monkeypatch):
    for name, val in (("_loaded", False), ("_module", None), ("_error", None), ("_pending", None), ("_aot_note", "")):
        monkeypatch.setattr(extension, name, val)


def _fake_aot(tmp_path, record):
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a library")
    if record is not None:
        (tmp_path / "_C.build.json").write_text(__import__("json").dumps(record))


def test_loader_refuses_an_ahead_of_time_build_for_another_torch(fresh_loader, monkeypatch, tmp_path, capsys):
    """A headsparse._C built (HEADSPARSE_BUILD_EXT=1) against torch 2.14.1+cu130 is never imported by another torch:
    the reason names both versions and how to rebuild, and the JIT build for the running torch is used instead."""
    _fake_aot(tmp_path, {"torch": "2.14.1+cu130", "torch_cuda": "13.0", "with_cuda": True, "python": "3.11"})
    monkeypatch.setattr(extension, "_PKG_DIR", str(tmp_path))
    imported = []
    real_import = extension.importlib.import_module
    monkeypatch.setattr(extension.importlib, "import_module", lambda n, *a: imported.append(n) or real_import(n, *a))
    ok, why = extension.status()
    print(why)
    assert f"built for torch 2.14.1+cu130, running torch {torch.__version__}" in why, why
    assert "HEADSPARSE_BUILD_EXT=1" in why and "headsparse build-ext" in why
    assert "headsparse._C" not in imported
    assert ok == (extension._module is not None or extension._pending is not None)


def test_loader_ignores_an_ahead_of_time_build_without_record(fresh_loader, monkeypatch, tmp_path):
    _fake_aot(tmp_path, None)
    monkeypatch.setattr(extension, "_PKG_DIR", str(tmp_path))
    ok, why = extension.status()
    assert "has no build record" in why, why


def test_loader_uses_an_ahead_of_time_build_for_this_torch(fresh_loader, monkeypatch, tmp_path):
    from headsparse.ops import _build

    built = extension.get()
    _forget(monkeypatch)
    _fake_aot(tmp_path, _build.build_record(torch, False))
    monkeypatch.setattr(extension, "_PKG_DIR", str(tmp_path))
    real_import = extension.importlib.import_module
    monkeypatch.setattr(extension.importlib, "import_module",
                        lambda n, *a: built if n == "headsparse._C" else real_import(n, *a))
    assert extension.get() is built
    assert extension.status()[0]


def test_forcing_cuda_with_a_cpu_torch_fails_in_one_sentence(fresh_loader, monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("needs a CPU-only torch")
    monkeypatch.setenv("HEADSPARSE_FORCE_CUDA", "1")
    monkeypatch.setattr(extension, "_PKG_DIR", "/nonexistent")
    ok, why = extension.status()
    assert not ok and why.startswith("HEADSPARSE_FORCE_CUDA=1 cannot work with torch") and "CPU-only" in why, why
    assert why.count(". ") == 0 and "\n" not in why


def test_loader_respects_skip_env(fresh_loader, monkeypatch):
    monkeypatch.setenv("HEADSPARSE_SKIP_EXT", "1")
    ok, why = extension.status()
    assert not ok and "HEADSPARSE_SKIP_EXT" in why
    x = torch.randn(2, 3, 8)
    with pytest.raises(hs.BackendUnavailableError, match="HEADSPARSE_SKIP_EXT"):
        hs.gram(x, backend="cpu")
    torch.testing.assert_close(hs.gram(x), gram(x, backend="torch"))  # auto still works



def test_unvalidated_cuda_switch_counts_when_set_after_the_first_probe(fresh_loader, monkeypatch):
    """HEADSPARSE_ENABLE_UNVALIDATED_CUDA set (or unset) after the cuda backend's status was first probed takes
    effect, as head_stats' own check did before statuses were cached; the cached probe must not keep telling the
    user to set a variable that is set. (A CUDA build and a GPU are faked: only the switch is under test.)"""
    monkeypatch.setattr(extension, "with_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", raising=False)
    cuda = registry.get("cuda")
    usable, reason = cuda.status()
    assert not usable and "HEADSPARSE_ENABLE_UNVALIDATED_CUDA=1" in reason
    monkeypatch.setenv("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "1")
    assert cuda.status()[0], cuda.status()[1]
    x = torch.randn(2, 3, 8)
    with pytest.raises(hs.BackendUnavailableError, match="runs on cuda tensors, got cpu"):  # past the switch
        hs.gram(x, backend="cuda")
    monkeypatch.setenv("HEADSPARSE_ENABLE_UNVALIDATED_CUDA", "0")
    assert not cuda.status()[0]

@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_backend_additive_mask_dtypes(mask_dtype):
    """Additive masks in other float dtypes than q (read as float32 in the kernel), broadcast over heads and rows."""
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, sq, skv, d = 2, 4, 2, 9, 14, 32
    q, k, v = (torch.randn(b, h, s, d, generator=gen) for h, s in ((hq, sq), (hkv, skv), (hkv, skv)))
    mask = torch.randn(b, 1, 1, skv, generator=gen).to(mask_dtype)  # stride 0 over heads and rows
    mask[1, 0, 0, :4] = float("-inf")
    out = hs.attention(q, k, v, attention_mask=mask, causal=True, backend="cpu")
    ref = hs.attention_reference(q.double(), k.double(), v.double(), attention_mask=mask.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


def test_without_ninja_the_extension_is_compiled_through_setuptools(fresh_loader, monkeypatch, tmp_path):
    """No ninja (torch's load() needs it): the same sources go through setuptools and torch's BuildExtension; the
    compile itself is faked here (it was run once by hand: same reference check)."""
    from torch.utils import cpp_extension

    from headsparse.ops import _build

    built = extension.get()
    _forget(monkeypatch)
    monkeypatch.setenv("HEADSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(extension, "_PKG_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("load() needs ninja"))
    calls = []
    monkeypatch.setattr(_build, "_setuptools_build", lambda sources, depends, *a: calls.append((sources, depends)) or built)
    ok, why = extension.status()
    assert ok and "compiled on first use" in why, why
    assert extension.get() is built
    (sources, depends), = calls
    assert any(s.endswith("bind.cpp") for s in sources) and not any(s.endswith(".cu") for s in sources)
    assert any(d.endswith("hs_cpu.h") for d in depends)


def test_cuda_is_compiled_only_where_it_can_run(monkeypatch):
    """A CUDA torch with nvcc but no visible GPU (and no TORCH_CUDA_ARCH_LIST) compiles the C++ part only; a GPU,
    the architecture list or HEADSPARSE_FORCE_CUDA=1 add the CUDA part; a CPU torch never does."""
    from types import SimpleNamespace

    from headsparse.ops import _build

    fake = SimpleNamespace(__version__="2.14.1+cu130", version=SimpleNamespace(cuda="13.0"),
                           cuda=SimpleNamespace(is_available=lambda: False))
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/usr/local/cuda")
    for var in ("TORCH_CUDA_ARCH_LIST", "HEADSPARSE_FORCE_CUDA"):
        monkeypatch.delenv(var, raising=False)
    assert _build.cuda_plan(fake) == (False, "no GPU is visible and TORCH_CUDA_ARCH_LIST is unset "
                                              "(HEADSPARSE_FORCE_CUDA=1 compiles it)")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.cuda_plan(fake)[0]
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    fake.cuda.is_available = lambda: True
    assert _build.cuda_plan(fake)[0]
    fake.cuda.is_available = lambda: False
    monkeypatch.setenv("HEADSPARSE_FORCE_CUDA", "1")
    assert _build.cuda_plan(fake) == (True, "HEADSPARSE_FORCE_CUDA=1")
    monkeypatch.setattr(_build, "find_cuda_home", lambda: None)
    with pytest.raises(_build.BuildError, match="no CUDA toolkit"):
        _build.cuda_plan(fake)
    monkeypatch.delenv("HEADSPARSE_FORCE_CUDA")
    assert _build.cuda_plan(fake) == (False, "nvcc was not found (set CUDA_HOME)")
    assert _build.build_dir(fake, True).endswith("-torch2.14.1+cu130-cuda")  # one directory per torch and choice
