"""``fastcyclic bench all``: the ce, optim, train and geometry suites in one run, into one directory.

    OUT/all.json            machine, ceilings, the suites asked for, "complete", and per suite: exit code,
                            status (ok, ..., running or interrupted in a run stopped early), seconds, record counts
    OUT/ce/ce.json|csv|png  OUT/optim/optim.json|csv|png  OUT/train/train.json|csv|png
    OUT/geometry/geometry.json|csv|png   (each png drawn when its suite completes)

The ceilings (copy bandwidth, GEMM rates) are measured once and shared by every suite; the geometry
suite compares the summary's cost with the trainer step the train suite measured.  A suite that
fails, or crashes, is recorded in all.json and the run goes on with the next one; each suite's files
(json and csv) are rewritten atomically as its cases finish.  With --budget-s, cases that would start after the
budget is spent are recorded as "skipped" (so a run under an outer time limit ends with complete
files: "complete" says the run ended, not that every case ran).  Exit code: 0 when every suite passed, 1
when one found fastcyclic wrong or failed, 2 for bad input (nothing written), 3 when nothing was wrong but the
budget skipped cases of ours (incomplete).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import math
import sys
import time
import traceback
from pathlib import Path

from fastcyclic.bench import measure

SUITES = ("ce", "optim", "train", "geometry")
MODULES = {"ce": "fastcyclic.bench.ce", "optim": "fastcyclic.bench.optim", "train": "fastcyclic.bench.train",
           "geometry": "fastcyclic.bench.geometry"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    measure.add_device_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="each suite's --quick: small sizes, short timing")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=None,
                        help="suites to run, in this order (default: ce optim train geometry; geometry uses the "
                             "trainer step measured by train when train ran first)")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="after S seconds, record the remaining cases as skipped instead of running them")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="input dtype of ce, optim and train (each suite's default otherwise; geometry measures "
                             "in fp32). Shapes differ per suite (NxDxK, sizes, PxD, KxD): give them to one suite")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: ce, optim and train run the Triton kernels under TRITON_INTERPRET=1, each at its "
                             "own small --interpret default")
    measure.add_out_argument(parser, ("all.json",), also=("one subdirectory per suite",))


DTYPE_SUITES = ("ce", "optim", "train")  # the suites --dtype reaches
INTERPRET_SUITES = ("ce", "optim", "train")  # the suites with Triton kernels (geometry times torch ops)


def suite_args(name: str, device: str, quick: bool, out: Path | None, threads: int | None = None,
               dtype: str | None = None, interpret: bool = False) -> tuple[object, argparse.Namespace]:
    """The suite's module and its own defaults for this device, as its CLI would parse them."""
    module = importlib.import_module(MODULES[name])
    parser = argparse.ArgumentParser(prog=f"fastcyclic bench {name}")
    module.add_arguments(parser)
    argv = ["--device", device] + (["--quick"] if quick else []) + (["--out", str(out / name)] if out else [])
    argv += ["--threads", str(threads)] if threads else []
    argv += ["--dtype", dtype] if dtype and name in DTYPE_SUITES else []
    argv += ["--interpret"] if interpret and name in INTERPRET_SUITES else []
    return module, parser.parse_args(argv)


def _train_step(records: list[dict]) -> tuple[float | None, str]:
    """The fastcyclic trainer's ms per step at the geometry suite's TRAIN_CASE (the faster dtype)."""
    from fastcyclic.bench import geometry

    p, d = geometry.TRAIN_CASE
    ok = [r for r in records if r["method"] == "fastcyclic" and r["status"] == "ok" and (r["P"], r["d"]) == (p, d)]
    if not ok:
        return None, ""
    best = min(ok, key=lambda r: r["median_ms"])
    return best["median_ms"], f"fastcyclic bench train in this run: P={p} d={d} {best['dtype']} batch {best['batch']}"


def _count(records: list[dict]) -> dict:
    counts = collections.Counter(r.get("status") for r in records)
    counts["wrong"] = sum(1 for r in records if r.get("status") == "ok" and r.get("correct") is False)
    return dict(counts)


def run_suite(args: argparse.Namespace) -> tuple[int, list[dict]]:
    """(exit code, one summary entry per suite)."""
    try:
        device = measure.setup_device(args)
        if device.type == "cuda" or args.dtype:  # bf16: the CUDA defaults of ce and train
            measure.check_dtype(device, measure.DTYPE_NAMES[args.dtype or "bf16"])
        if args.budget_s is not None and not 0 < args.budget_s < math.inf:  # (inf: all.json would not be JSON)
            raise measure.BenchInputError(f"--budget-s must be a finite number of seconds > 0, got {args.budget_s}")
        names = list(dict.fromkeys(args.suites or SUITES))  # in the order given
        for name in names if args.out else ():  # each suite's folder, before all.json or any suite is written
            measure.check_out_dir(args.out / name, importlib.import_module(MODULES[name]).FILES)
        for name in names if args.out else ():  # in another bench's use: refused now, not after the ceilings and
            if (args.out / name).is_dir():  # the suites before it (each suite locks it again)
                with measure.take_out_dir(args.out / name):
                    pass
        held = measure.take_out_dir(args.out)  # (last: a refusal above leaves no folder behind)
    except measure.BenchInputError as exc:
        return measure.fail(str(exc)), []
    with held:  # --out is this run's until its results are written
        measure.set_budget(args.budget_s)
        start = time.monotonic()
        machine = measure.machine_facts(device)
        print(f"fastcyclic bench all: {', '.join(names)} on {measure.machine_title(machine)}"
              + (" (quick)" if args.quick else ""))
        ceil = measure.print_ceilings(device, quick=args.quick)  # once: every suite reuses this measurement
        summary: list[dict] = []

        def save(complete=False):
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                results = {"suite": "all", "complete": complete, "requested": names, "machine": machine,
                           "ceilings": ceil, "quick": args.quick, "budget_s": args.budget_s,
                           "seconds": time.monotonic() - start, "suites": summary}
                measure.write_atomic(args.out / "all.json", json.dumps(measure._json_safe(results), indent=1))

        save()
        train_records: list[dict] = []
        try:
            for name in names:
                print(f"\n==== fastcyclic bench {name} ====", flush=True)
                t0 = time.monotonic()
                entry = {"suite": name, "out": str(args.out / name) if args.out else None, "status": "running"}
                summary.append(entry)
                save()  # a run killed from here on says which suite it was in
                try:
                    module, ns = suite_args(name, args.device, args.quick, args.out, args.threads, args.dtype,
                                            args.interpret)
                    kwargs = {}
                    if name == "geometry" and device.type == "cuda":
                        step_ms, source = _train_step(train_records)
                        if step_ms:
                            ns.train_step_ms, kwargs["step_source"] = step_ms, source
                    rc, records = module.run_suite(ns, machine=machine, **kwargs)
                    if name == "train":
                        train_records = records
                    entry.update(rc=rc, status={0: "ok", 1: "fastcyclic wrong or failed",
                                                measure.INCOMPLETE: "incomplete (time budget)"}.get(rc, "refused"),
                                 records=_count(records))
                except Exception as exc:  # a crashing suite is recorded; the next one runs
                    entry.update(rc=None, status="crashed", error=measure.error_text(exc),
                                 traceback=traceback.format_exc()[-3000:])
                    print(f"fastcyclic bench {name} crashed:\n{traceback.format_exc()}", file=sys.stderr)
                entry["seconds"] = time.monotonic() - t0
                measure.release(device)
                save()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (an outer time limit): all.json says where it stopped
            for entry in summary:
                if entry["status"] == "running":
                    entry.update(status="interrupted", rc=None)
            save()
            raise
        finally:
            measure.set_budget(None)
        save(complete=True)
    print("\n==== fastcyclic bench all: summary ====")
    print(f"{'suite':<10} {'status':<28} {'seconds':>8}  records")
    for e in summary:
        counts = ", ".join(f"{k} {v}" for k, v in sorted((e.get("records") or {}).items()) if v)
        print(f"{e['suite']:<10} {e['status']:<28} {e['seconds']:8.1f}  {counts or e.get('error', '')}")
    print(f"total {time.monotonic() - start:.1f} s" + (f"; wrote {args.out}/all.json" if args.out else ""))
    codes = {e.get("rc") for e in summary}
    return (0 if codes <= {0} else measure.INCOMPLETE if codes <= {0, measure.INCOMPLETE} else 1), summary


def main(args: argparse.Namespace) -> int:
    return run_suite(args)[0]
