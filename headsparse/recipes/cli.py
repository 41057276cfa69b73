"""The ``headsparse`` command line."""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    from .demo import run_demo

    try:
        run_demo(batch=args.batch, q_heads=args.heads, kv_heads=args.kv_heads, seq=args.seq, head_dim=args.head_dim,
                 grad_fraction=args.grad_fraction, backend=args.backend)
    except ValueError as e:  # bad arguments: one line, no traceback
        raise SystemExit(f"headsparse demo: {e}") from None
    return 0


def _cmd_backends(args) -> int:
    from ..ops import backends

    for name, info in backends().items():
        print(f"{name:7s} {'usable' if info.usable else 'unusable':8s} devices={','.join(info.devices):10s} "
              f"{info.reason}")
    from ..ops.registry import TRITON_AUTO_SWITCH, auto_order

    orders = "; ".join(f"{dev}: {' > '.join(auto_order('attention', dev))}" for dev in ("cuda", "cpu"))
    print(f"auto picks for attention, first usable of: {orders} (triton goes first on CUDA only with "
          f"{TRITON_AUTO_SWITCH}=1, until a GPU run has validated it)")
    return 0


def _cmd_build_ext(args) -> int:
    from ..ops import extension

    try:
        mod = extension.build(verbose=args.verbose)
    except RuntimeError as e:
        raise SystemExit(f"headsparse build-ext: {e}") from None
    ok, why = extension.status()
    print(f"headsparse._C ready ({'C++ and CUDA' if mod.with_cuda() else 'C++ only'}): {why}")
    return 0


def _cmd_run(args) -> int:
    from .run_cli import cmd_run

    return cmd_run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="headsparse", description="Head-sparse attention and fine-tuning.")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="dense vs head-sparse attention on the CPU: agreement, saved bytes, time")
    demo.add_argument("--batch", type=int, default=4)
    demo.add_argument("--heads", type=int, default=16)
    demo.add_argument("--kv-heads", type=int, default=4)
    demo.add_argument("--seq", type=int, default=512)
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--grad-fraction", type=float, default=0.1)
    demo.add_argument("--backend", default="auto")
    demo.set_defaults(func=_cmd_demo)
    bk = sub.add_parser("backends", help="which attention backends are usable here, and why not")
    bk.set_defaults(func=_cmd_backends)
    be = sub.add_parser("build-ext", help="compile the C++/CUDA extension for the running torch now (otherwise it "
                                          "is compiled on first use of the cpu/cuda backends)")
    be.add_argument("--verbose", action="store_true", help="show the compiler's output")
    be.set_defaults(func=_cmd_build_ext)
    from .run_cli import add_run_arguments

    run = sub.add_parser("run", help="score heads, mine data, tune heads, evaluate vs full fine-tuning; AER report "
                                     "(no arguments: SmolLM2-135M on analogy-in-a-mix, word analogies mixed with three other tasks and news text)")
    add_run_arguments(run)
    run.set_defaults(func=_cmd_run)
    from .scoring.cli import add_parser as _add_score_parser

    _add_score_parser(sub)
    return ap


def main(argv=None) -> int:
    from ._optional import MissingPackageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MissingPackageError as e:  # an optional package: one line naming what to install, exit status 1
        raise SystemExit(f"headsparse {args.command}: {e}") from None
    except KeyboardInterrupt:
        # Reports, plans and deltas are written only when a job finishes (to a temporary name, then renamed), so an
        # interrupted job leaves none of them half-written.
        print(f"headsparse {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
