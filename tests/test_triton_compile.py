"""The Triton kernels compile for sm_80 and sm_90 with the GPU launch configs (no GPU needed).

The interpreter accepts programs that a GPU compile rejects (for example dot
shapes below 16), so CPU-green kernels are also compiled to cubins here, in a
subprocess without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "headsparse.ops.triton_aot", "--json", *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    rows = _compile("--archs", str(arch), "--dtypes", "bfloat16", "--head-dims", "64", "128")
    kinds = {(r["kernel"], r["head_dim"]) for r in rows}
    assert kinds == {(k, d) for k in ("fwd", "dkdv", "dq", "preprocess") for d in (64, 128)}
    # shared memory is checked only when a kernel is loaded on a GPU, so check the per-block limits here
    limit = {80: 163 * 1024, 90: 227 * 1024}[arch]
    for r in rows:
        assert r["shared_bytes"] <= limit, r


def test_fp16_and_odd_head_dims_compile():
    rows = _compile("--archs", "90", "--dtypes", "float16", "--head-dims", "80")
    assert len(rows) == 10
