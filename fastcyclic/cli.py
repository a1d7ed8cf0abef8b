"""The ``fastcyclic`` command.

    fastcyclic bench ce [--shapes NxDxK ...] [--dtype bf16] [--device cuda] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcyclic", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser("bench", help="check fused kernels against eager PyTorch and time them")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    from fastcyclic.bench import ce  # imports no kernels: fastcyclic's API is loaded on first use

    ce.add_arguments(suites.add_parser("ce", help="fused linear cross-entropy, forward + backward",
                                       description=ce.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        if getattr(args, "interpret", False):
            os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
        from fastcyclic.bench import ce

        return ce.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
