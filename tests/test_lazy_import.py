"""``import headsparse`` is light: no transformers, no pipeline; the recipes load on first use."""
import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          timeout=300).stdout.strip()


def test_import_headsparse_loads_neither_transformers_nor_the_recipes():
    out = _run("import sys, headsparse as hs\n"
               "heavy = [m for m in ('transformers', 'headsparse.recipes', 'headsparse.recipes.pipeline',"
               " 'headsparse.recipes.tuning', 'headsparse.recipes.mining', 'headsparse.recipes.scoring')"
               " if m in sys.modules]\n"
               "hs.HeadPlan, hs.patch, hs.attention\n"
               "heavy += [m for m in ('transformers',) if m in sys.modules]\n"
               "print(heavy)")
    assert out == "[]"


def test_every_public_name_resolves_and_lazy_names_are_the_real_objects():
    out = _run("import headsparse as hs\n"
               "from headsparse.recipes.tuning import tune\n"
               "from headsparse.recipes.pipeline import RunConfig\n"
               "missing = [n for n in hs.__all__ if getattr(hs, n, None) is None]\n"
               "print(missing, hs.tune is tune, hs.RunConfig is RunConfig, 'run_pipeline' in dir(hs))")
    assert out == "[] True True True"
    bad = subprocess.run([sys.executable, "-c", "import headsparse; headsparse.no_such_name"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "has no attribute 'no_such_name'" in bad.stderr
