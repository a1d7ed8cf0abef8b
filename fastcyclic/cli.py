"""The ``fastcyclic`` command.

    fastcyclic train [--p 97 --weight-decay 0.01 ...]     train (a + b) mod P and report the geometry
    fastcyclic sweep --p 31,61,127 --weight-decay 1e-3,1e-2,1e-1 --seeds 3 --steps 2000 --out DIR
    fastcyclic reproduce --preset cpu|gpu --out DIR        test the paper's claims, write report.md
    fastcyclic bench ce [--shapes NxDxK ...] [--dtype bf16] [--device cuda] [--quick] [--out DIR]
    fastcyclic bench optim [--sizes 2^25 2^27] [--dtype fp32] [--quick] [--out DIR]
    fastcyclic bench train [--shapes PxD ...] [--dtype fp32 bf16] [--quick] [--out DIR]
    fastcyclic bench geometry [--shapes KxD ...] [--quick] [--out DIR]
    fastcyclic bench all [--device cuda] [--quick] [--budget-s S] [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing


def _help_text(docstring: str) -> str:
    """A module docstring as --help shows it: without reST's double backticks."""
    return docstring.replace("``", "")


def _parse_optional_int(text: str):
    return None if text.lower() in ("none", "full") else int(text)


def _parse_optional_str(text: str):
    return None if text.lower() == "none" else text


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--weight-decay for weight_decay), with its default and help."""
    from fastcyclic.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, help_text = hints[f.name], f.metadata.get("help", "")
        kwargs = dict(default=f.default, dest=f.name, help=help_text)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "betas":
            kwargs.update(type=float, nargs=2, metavar=("BETA1", "BETA2"))
        elif hint == typing.Optional[int]:
            kwargs.update(type=_parse_optional_int, metavar="N|none")
        elif f.name == "out_dir":  # the command writes its runs under runs/ unless told otherwise
            kwargs.update(type=_parse_optional_str, metavar="DIR|none", default="runs/p{p}-seed{seed}",
                          help=help_text + "; {p} and {seed} are filled in")
        else:
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/checkpoint.pt. The config may differ only in steps, logging "
                             "intervals, --out-dir (a moved folder), the progress bar, 'auto' against what it "
                             "resolves to, fields the run ignores (--hidden of embed-sum, --momentum of adamw, "
                             "--betas of sgdw) and, on CPU, --fused-update, --cuda-graph and --deterministic")
    # SUPPRESS: the defaults formatter would print "(default: True)" beside a flag that turns figures off
    parser.add_argument("--no-figures", dest="figures", action="store_false", default=argparse.SUPPRESS,
                        help="skip the PNG figures")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's, one per core). On a CPU that other jobs share, "
                             "use 1: threads waiting for a descheduled one can make a run many times slower")


def versions() -> str:
    """fastcyclic's version and those of what it runs on, for a bug report (``fastcyclic --version``).
    Read from the modules: triton may come from another distribution (pytorch-triton)."""
    import importlib
    import platform

    from fastcyclic import __version__

    parts = [f"fastcyclic {__version__}"]
    for module in ("torch", "triton", "numpy"):
        try:
            parts.append(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            parts.append(f"{module} not installed")
    return ", ".join(parts + [f"Python {platform.python_version()}"])


class _PrintVersions(argparse.Action):
    """--version: like argparse's "version" action, with the versions read only when asked (importing triton
    takes a while)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcyclic", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (a + b) mod P at large K with fused Triton kernels, sweep the weight decay, test the "
                    "paper's claims, and benchmark the kernels against eager PyTorch.",
        epilog="examples:\n" + _help_text(__doc__.split("\n", 1)[1].strip("\n")))
    parser.add_argument("--version", action=_PrintVersions,
                        help="print the versions of fastcyclic, torch, triton, numpy and Python, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train (a + b) mod P and report whether W and E end rank-2 cyclic",
        description="Train an embedding + classifier model on (a + b) mod P with K = P classes, then report "
                    "accuracies and the geometry of the classifier W and the embedding E. With no arguments: "
                    "the embedded default (P = 97, about 35 s on a 2-core CPU; it ends rank-2 cyclic), written to "
                    "runs/p97-seed0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_train_arguments(train)
    from fastcyclic import reproduce, sweep  # light: torch loads when a run starts

    sweep.add_arguments(commands.add_parser(
        "sweep", help="a grid of training runs over P, weight decay and seeds; lambda_crit and the collapse edge",
        description=_help_text(sweep.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter))
    reproduce.add_arguments(commands.add_parser(
        "reproduce", help="a preset sweep and report.md with a verdict on each of the paper's claims",
        description=_help_text(reproduce.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter))
    bench = commands.add_parser("bench", help="check fused kernels against eager PyTorch and time them")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    # import no kernels: fastcyclic's API is loaded on first use
    from fastcyclic.bench import all_suites, ce, geometry, optim
    from fastcyclic.bench import train as train_bench

    for name, module, help_text in (
            ("ce", ce, "fused linear cross-entropy, forward + backward"),
            ("optim", optim, "optimizer step and the fused classifier update vs torch.optim"),
            ("train", train_bench, "the fastcyclic trainer's step vs a plain PyTorch loop and torch.compile"),
            ("geometry", geometry, "cost of fastcyclic.geometry.summarize at large K"),
            ("all", all_suites, "ce, optim, train and geometry into one output directory")):
        module.add_arguments(suites.add_parser(name, help=help_text, description=_help_text(module.__doc__),
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    _read_negative_numbers_as_values(parser)
    return parser


# argparse (before Python 3.13) takes "-1e-3" for an option, so `--weight-decay -1e-3` failed with
# "expected one argument" instead of reaching the check that names the bad value.  No option of ours
# starts with "-" and a digit, so every such token is a value: -1e-3, -0.5,1, and also -1:3 or -4x4x4.
_NUMBER = re.compile(r"^-\.?\d")


def _read_negative_numbers_as_values(parser: argparse.ArgumentParser) -> None:
    parser._negative_number_matcher = _NUMBER
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _read_negative_numbers_as_values(sub)


def _run_directory(template: str, values: dict) -> str:
    """--out-dir with {p} and {seed} filled in; ValueError for any other use of braces."""
    try:
        return template.format(p=values["p"], seed=values["seed"])
    # what {q}, {0}, {p (unclosed), {p.x} and {p[0]} raise
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"--out-dir {template!r}: only {{p}} and {{seed}} may appear in braces (write {{{{ and }}}} "
                         f"for a literal brace): {type(e).__name__}: {e}") from None


def run_train(args: argparse.Namespace) -> int:
    """`fastcyclic train`, with --threads set for the run (and put back: tests call main in-process)."""
    import torch

    if args.threads is not None and args.threads < 1:
        print(f"fastcyclic train: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _train_and_report(args)
    finally:
        torch.set_num_threads(threads)


def _train_and_report(args: argparse.Namespace) -> int:
    from fastcyclic.training import CHECKPOINT, TrainConfig, TrainingDiverged, report, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    try:
        if values["out_dir"] is not None:
            values["out_dir"] = _run_directory(values["out_dir"], values)
        config = TrainConfig(**values)
        result = train(config, resume=args.resume, figures=getattr(args, "figures", True))
    except TrainingDiverged as e:
        print(f"fastcyclic train: {e}", file=sys.stderr)
        return 3
    except ValueError as e:
        print(f"fastcyclic train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (main runs this under sweep.interruptible)
        if values["out_dir"] is None or not values["checkpoint_every"]:
            hint = "nothing was checkpointed (no --out-dir, or --checkpoint-every 0): a rerun starts from step 0"
        elif not os.path.exists(os.path.join(values["out_dir"], CHECKPOINT)):
            hint = "stopped before its first checkpoint: a rerun starts from step 0"
        else:
            hint = "rerun the same command with --resume to continue from the last checkpoint"
        print(f"fastcyclic train: interrupted; {hint}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError on CUDA; the CPU allocator's RuntimeError
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "can't allocate memory" not in str(e):
            raise
        first_line = (str(e) or type(e).__name__).splitlines()[0]
        print(f"fastcyclic train: out of memory with P={values['p']}, d={values['d']}, hidden={values['hidden']}, "
              f"batch_size={values['batch_size']} ({first_line}); try a smaller P, width or --batch-size",
              file=sys.stderr)
        return 1
    print(report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a command set up its own handling: importing torch takes seconds
        print("fastcyclic: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from fastcyclic.sweep import interruptible

        # SIGTERM (kill, a job scheduler) stops it like Ctrl-C; a full disk or read-only folder is one line
        return interruptible("train", run_train, args)
    if args.command in ("sweep", "reproduce"):
        from fastcyclic import reproduce, sweep

        return {"sweep": sweep, "reproduce": reproduce}[args.command].main(args)
    if args.command == "bench":
        if getattr(args, "interpret", False):
            os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
        from fastcyclic.bench import all_suites, ce, geometry, optim
        from fastcyclic.bench import train as train_bench

        from fastcyclic.sweep import interruptible

        suites = {"ce": ce, "optim": optim, "train": train_bench, "geometry": geometry, "all": all_suites}
        hint = ("the files in --out hold the cases that finished (marked \"complete\": false)" if args.out else
                "nothing was written (no --out)")
        return interruptible(f"bench {args.suite}", suites[args.suite].main, args, hint=hint)
    return 2


if __name__ == "__main__":
    sys.exit(main())
