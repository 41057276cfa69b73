"""The command line and the demo that the README's main command runs."""
import pytest

from headsparse.recipes.cli import main
from headsparse.recipes.demo import run_demo


def test_demo_agrees_and_saves(capsys):
    res = run_demo(batch=1, q_heads=8, kv_heads=8, seq=64, head_dim=32, grad_fraction=0.125, reps=1)
    assert res["max_output_diff"] == 0.0
    assert res["max_dq_diff_trained_heads"] < 1e-5
    assert res["saved_bytes_sparse"] <= res["saved_bytes_dense"] / 8 * 1.05
    assert "saved for backward" in capsys.readouterr().out


def test_cli_backends(capsys):
    assert main(["backends"]) == 0
    assert "torch" in capsys.readouterr().out


def test_demo_rejects_bad_fraction():
    with pytest.raises(ValueError, match="grad_fraction"):
        run_demo(grad_fraction=2.0)
