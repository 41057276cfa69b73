"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90, without a GPU.

The CPU interpreter is lenient (it accepts shapes and ops a GPU compile
rejects), so the tests also compile every kernel, with the launch configs the
GPU path uses, down to a cubin with Triton's bundled ptxas. The cubin's
resource usage (registers, spills, shared memory) is reported as well, which
is what block-size tuning needs first.

Run as ``python -m headsparse.ops.triton_aot`` with ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

# the last-dimension strides of contiguous q/k/v/o/dO and of a contiguous mask
_UNIT_STRIDES = {"stride_qd", "stride_kvd", "stride_od", "stride_dod", "stride_mk"}
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


@dataclass
class CompiledKernel:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    causal: bool
    mask_kind: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: Optional[int]
    spill_bytes: Optional[int]


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers and local-memory (spill) bytes from cuobjdump, when it is available."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {}
    for key, pat in (("registers", r"REG:(\d+)"), ("spill_bytes", r"LOCAL:(\d+)")):
        m = re.search(pat, out)
        if m:
            found[key] = int(m.group(1))
    return found


def _signature(fn, pointers: Dict[str, str], constexprs: Dict[str, object]):
    """Signature, constants and attributes as the launcher's JIT specialisation would produce them.

    At run time Triton specialises pointers and integers divisible by 16 and
    integers equal to 1; contiguous tensors give a unit stride for the last
    dimension and 16-divisible other strides, so that is what is assumed here.
    """
    sig, cst, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            cst[(i,)] = constexprs[name]
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name in _UNIT_STRIDES:
            sig[name] = "constexpr"
            cst[(i,)] = 1
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cst, attrs


def compile_kernels(archs: Iterable[int] = (80, 90), dtypes: Iterable[str] = ("bfloat16", "float16"),
                    head_dims: Iterable[int] = (64, 128)) -> List[CompiledKernel]:
    """Compile every kernel variant the GPU path launches; raise on the first compile error."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels as K
    from .triton_backend import _block_d, _gpu_config

    results = []
    for arch in archs:
        for dtype in dtypes:
            t = _PTR[dtype]
            for d in head_dims:
                for causal, mask_kind in ((False, K.MASK_NONE), (True, K.MASK_BOOL), (False, K.MASK_ADD)):
                    flags = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, MASK_KIND=mask_kind,
                                 CHECK_BOUNDS=mask_kind != K.MASK_NONE,
                                 DOT_MODE=K.DOT_IEEE if dtype == "float32" else K.DOT_NATIVE)
                    mask_t = "*u8" if mask_kind == K.MASK_BOOL else t
                    variants = [
                        ("fwd", K._attn_fwd, dict(Q=t, K=t, V=t, O=t, LSE="*fp32", M=mask_t, Q_IDX="*i64",
                                                  KV_IDX="*i64", M_IDX="*i64")),
                        ("dkdv", K._attn_bwd_dkdv, dict(Q=t, K=t, V=t, DO=t, DK=t, DV=t, LSE="*fp32",
                                                        DELTA="*fp32", M=mask_t, QH_PTR="*i64", QH_IDX="*i64",
                                                        M_IDX="*i64")),
                        ("dq", K._attn_bwd_dq, dict(Q=t, K=t, V=t, DO=t, DQ=t, LSE="*fp32", DELTA="*fp32",
                                                    M=mask_t, KV_POS="*i64", M_IDX="*i64")),
                    ]
                    for kind, fn, ptrs in variants:
                        cfg = _gpu_config(kind, d)
                        sig, cst, attrs = _signature(fn, ptrs, dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n))
                        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst, attrs=attrs),
                                                  target=GPUTarget("cuda", arch, 32),
                                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                        usage = _resource_usage(compiled.asm["cubin"])
                        results.append(CompiledKernel(kind, arch, dtype, d, causal, mask_kind, cfg.block_m,
                                                      cfg.block_n, cfg.num_warps, cfg.num_stages,
                                                      compiled.metadata.shared, usage.get("registers"),
                                                      usage.get("spill_bytes")))
                # the preprocessing kernel depends only on dtype and head_dim
                cfg = _gpu_config("fwd", d)
                sig, cst, attrs = _signature(K._attn_bwd_preprocess, dict(O=t, DO=t, DELTA="*fp32", STATS="*fp32"),
                                      dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cfg.block_m, HAS_STATS=True))
                compiled = triton.compile(ASTSource(fn=K._attn_bwd_preprocess, signature=sig, constexprs=cst, attrs=attrs),
                                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
                usage = _resource_usage(compiled.asm["cubin"])
                results.append(CompiledKernel("preprocess", arch, dtype, d, False, 0, cfg.block_m, 0, 4, 1,
                                              compiled.metadata.shared, usage.get("registers"),
                                              usage.get("spill_bytes")))
    return results


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows = compile_kernels(args.archs, args.dtypes, args.head_dims)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print("kernel arch dtype D causal mask BMxBN warps stages shared regs spill")
        for r in rows:
            print(f"{r.kernel} sm_{r.arch} {r.dtype} {r.head_dim} {r.causal} {r.mask_kind} {r.block_m}x{r.block_n} "
                  f"{r.num_warps} {r.num_stages} {r.shared_bytes} {r.registers} {r.spill_bytes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
