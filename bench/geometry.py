"""``fastcyclic bench geometry``: the cost of ``fastcyclic.geometry.summarize(W, E)`` at large K.

Inputs: a planted rank-2 cyclic layout, W and E (K x d, K = P) with rows on a circle at frequency
OMEGA in one random plane of R^d, plus small Gaussian noise (never zeros, never exactly degenerate),
generated in float64 on the CPU and moved to the device in the benchmark dtype.

Correctness: the summary must find what was planted (verdict "cyclic" for W and E, omega = OMEGA,
shared, rho2 >= 0.99) and agree with summarize on float64 copies on the CPU (every float field to
TOLERANCE, relative to max(1, |value|); integer, bool and string fields exactly).

GB/s counts the bytes of W and E read once, as a fraction of the copy bandwidth measured in the same
run.  On CUDA the time is also given as a fraction of 100 steps of the fastcyclic trainer at
P = 65521, d = 256 (bf16, batch 8192): the geometry summary runs every 100 steps, and issue 4 asks
that it cost < 2 % of the training time there.  That step time comes from ``fastcyclic bench
train`` when ``bench all`` ran it, from --train-step-ms, or is measured here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from fastcyclic.bench import measure

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
CUDA_SHAPES = ((8191, 256), (65521, 256), (131072, 256))
CPU_SHAPES = ((8191, 256), (131072, 256))
QUICK_SHAPES = {"cuda": ((8191, 256), (65521, 256)), "cpu": ((8191, 64),)}
OMEGA = 7
NOISE = 0.003  # per entry, against a circle of radius 1: rho2 ~ 1 - d * NOISE^2
TOLERANCE = 1e-5
TRAIN_CASE = (65521, 256)  # the trainer step the summary is compared with (every 100 steps)
TARGET_FRAC = 0.02
METHOD = "summarize"


def parse_shape(text: str) -> tuple[int, int]:
    """K x d, e.g. 131072x256."""
    k, d = measure.parse_dims(text, "KxD", "131072x256")
    if k < 2 * OMEGA + 1 or d < 2:
        raise argparse.ArgumentTypeError(f"shape needs K >= {2 * OMEGA + 1} and d >= 2, got {text!r}")
    return k, d


def planted(k: int, d: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, E), float64 on the CPU: one circle at OMEGA in a shared random plane, plus noise."""
    g = torch.Generator().manual_seed(seed)
    plane, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    index = torch.arange(k, dtype=torch.float64)
    out = []
    for radius, phase in ((1.0, 0.3), (2.0, 1.1)):
        angle = 2 * math.pi * OMEGA * index / k + phase
        x = radius * (torch.cos(angle)[:, None] * plane[:, 0] + torch.sin(angle)[:, None] * plane[:, 1])
        out.append(x + radius * NOISE * torch.randn(k, d, generator=g, dtype=torch.float64))
    return out[0], out[1]


def compare(summary, ref) -> tuple[float, list[str]]:
    """(largest relative difference of the float fields, names of fields that differ otherwise)."""
    worst, mismatched = 0.0, []
    a, b = dataclasses.asdict(summary), dataclasses.asdict(ref)
    for name, value in b.items():
        mine = a[name]
        if isinstance(value, float) and isinstance(mine, float):
            if math.isfinite(value) or math.isfinite(mine):
                diff = abs(mine - value) / max(1.0, abs(value))
                worst = max(worst, diff if math.isfinite(diff) else math.inf)
        elif mine != value:
            mismatched.append(name)
    return worst, mismatched


def planted_found(s) -> list[str]:
    """What the summary failed to find of the planted circle (empty: all of it)."""
    problems = []
    if s.verdict != "cyclic" or s.verdict_E != "cyclic":
        problems.append(f"verdicts {s.verdict}/{s.verdict_E}")
    if s.omega_W != OMEGA or s.omega_E != OMEGA or not s.shared_omega:
        problems.append(f"omega {s.omega_W}/{s.omega_E} (planted {OMEGA})")
    if not (s.rho2_W >= 0.99 and s.rho2_E >= 0.99):
        problems.append(f"rho2 {s.rho2_W:.3f}/{s.rho2_E:.3f}")
    return problems


def summarize(W, E):
    """The measured function (a seam: tests plug a wrong one in here; the reference never changes)."""
    from fastcyclic import geometry

    return geometry.summarize(W, E)


def reference_summary(W64, E64):
    from fastcyclic import geometry

    return geometry.summarize(W64.double().cpu(), E64.double().cpu())


def train_step_ms(device: torch.device, *, quick: bool) -> tuple[float | None, str]:
    """ms per step of the fastcyclic trainer at TRAIN_CASE, bf16 where supported (else fp32)."""
    from fastcyclic.bench import train as train_bench

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(False) else torch.float32
    p, d = TRAIN_CASE
    try:
        data, bs, rows, E0, W0 = train_bench.make_problem(p, d, device)
        runner = train_bench.FastcyclicRunner(train_bench.Spec(p, d, dtype, device, bs, rows, data, E0, W0))
        for _ in range(3):
            runner.step()
        ms = measure.time_ms(runner.step, device, budget_ms=100.0 if quick else 300.0)["median_ms"]
        return ms, f"measured here: fastcyclic trainer P={p} d={d} {measure.dtype_name(dtype)} batch {rows}"
    except Exception as exc:
        return None, f"trainer step not measured: {measure.error_text(exc)}"
    finally:
        measure.release(device)


def run(shapes, dtype, device, *, quick=False, ceil=None, step_ms=None, step_source="", log=print,
        after_case=None) -> list[dict]:
    records = []
    copy = measure.copy_ceiling(ceil)
    for k, d in shapes:
        record = dict(bench="geometry", kind="case", case=f"K={k} d={d}", K=k, P=k, d=d,
                      dtype=measure.dtype_name(dtype), device=device.type, method=METHOD,
                      reference="summarize of float64 copies on the CPU, and the planted circle",
                      tolerance=TOLERANCE, bytes=2 * k * d * dtype.itemsize, train_step_ms=None,
                      frac_of_100_train_steps=None)
        before = measure.telemetry(device)
        if measure.out_of_time():
            record.update(status="skipped", error=measure.SKIPPED)
        else:
            try:
                W64, E64 = planted(k, d)
                ref = reference_summary(W64, E64)
                W, E = W64.to(device, dtype), E64.to(device, dtype)
                del W64, E64
                s = summarize(W, E)  # also the warm-up
                err, mismatched = compare(s, ref)
                missed = planted_found(s)
                record.update(err=err, mismatched=mismatched or None, missed=missed or None,
                              correct=err <= TOLERANCE and not mismatched and not missed,
                              rho2_W=s.rho2_W, omega_W=s.omega_W, verdict=s.verdict)
                record.update(measure.time_ms(lambda: summarize(W, E), device, min_reps=3,
                                              budget_ms=100.0 if quick else 400.0))
                extra = measure.peak_extra_bytes(lambda: summarize(W, E), device)
                record["peak_extra_gib"] = extra / 2**30 if extra is not None else None
                record["status"] = "ok"
                measure.set_rate(record, record["bytes"] / (record["median_ms"] * 1e6), "GB/s", copy)
                if step_ms:
                    record.update(train_step_ms=step_ms, train_step_source=step_source,
                                  frac_of_100_train_steps=record["median_ms"] / (100.0 * step_ms))
                    if (k, d) == TRAIN_CASE:
                        record["target"] = {"frac_of_100_train_steps": TARGET_FRAC}
                        record["meets_target"] = record["frac_of_100_train_steps"] < TARGET_FRAC
                del W, E
            except Exception as exc:
                record.update(measure.error_fields(exc))
            measure.release(device)
        measure.attach_telemetry(record, device, before)
        records.append(measure.complete(record))
        log(format_row(record))
        if after_case:
            after_case(records)
    return records


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

CSV_FIELDS = ("K", "d", "bytes", "rho2_W", "omega_W", "verdict", "mismatched", "missed", "train_step_ms",
              "frac_of_100_train_steps", "meets_target")
FILES = ("geometry.json", "geometry.csv", "geometry.png")


def header() -> str:
    return (f"{'case':>16} {'dtype':>8} {'median':>12} {'GB/s':>8} {'of copy':>7} {'extra GiB':>9} "
            f"{'of 100 steps':>12}  error vs float64")


def format_row(r: dict) -> str:
    head = f"{r['case']:>16} {r['dtype']:>8}"
    if r["status"] != "ok":
        return measure.not_ok_row(head, r, 90)
    mem = measure.or_na(r.get("peak_extra_gib"), ".3f")
    frac = measure.or_na(r.get("frac_ceiling"), ".1%")
    steps = measure.or_na(r.get("frac_of_100_train_steps"), ".2%")
    line = (f"{head} {r['median_ms']:9.2f} ms {r['rate']:8.2f} {frac:>7} {mem:>9} {steps:>12}  {r['err']:.1e} "
            f"{'ok' if r['correct'] else 'WRONG'}")
    for key in ("mismatched", "missed"):
        if r.get(key):
            line += f" {key}: {r[key]}"
    return line


write_results = measure.suite_writer("geometry", CSV_FIELDS, ("K", "K (rows of W)", "median time of summarize (ms)"))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shape, nargs="+", metavar="KxD",
                        help="K = P rows and width d of W and E (default: 8191x256 65521x256 131072x256 on CUDA, "
                             "8191x256 131072x256 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of W and E (default fp32)")
    measure.add_device_arguments(parser)
    measure.add_quick_argument(parser, "cases")
    parser.add_argument("--train-step-ms", type=float, default=None, metavar="MS",
                        help="the trainer's ms per step at P=65521 d=256 to compare with (default on CUDA: "
                             "measured; on CPU: no comparison)")
    measure.add_out_argument(parser, FILES)


def run_suite(args: argparse.Namespace, *, machine: dict | None = None, step_source: str = "--train-step-ms",
              ) -> tuple[int, list[dict]]:
    """(exit code, records).  Bad input is refused (code 2) before anything is measured or written."""
    try:
        device = measure.setup_device(args)
        dtype = DTYPES[args.dtype]
        measure.check_dtype(device, dtype)
        if args.train_step_ms is not None and not (math.isfinite(args.train_step_ms) and args.train_step_ms > 0):
            raise measure.BenchInputError(f"--train-step-ms must be > 0, got {args.train_step_ms}")
        held = measure.take_out_dir(args.out)  # (last: a refusal above leaves no folder behind)
    except measure.BenchInputError as exc:
        return measure.fail(str(exc)), []
    shapes = list(dict.fromkeys(args.shapes or (QUICK_SHAPES[device.type] if args.quick else
                                                CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)))
    with held:  # --out is this run's until its results are written
        machine = machine or measure.machine_facts(device)
        print(f"fastcyclic bench geometry: {measure.machine_title(machine, triton=False)}, "
              f"{measure.dtype_name(dtype)}, planted circle at omega {OMEGA}")
        if args.out:  # now: an earlier run's files must not pass for this one's if it stops before its first case
            write_results(args.out, machine, [], complete=False)
        ceil = measure.print_ceilings(device, quick=args.quick)
        step_ms = args.train_step_ms
        if device.type == "cuda" and step_ms is None and not measure.out_of_time():
            step_ms, step_source = train_step_ms(device, quick=args.quick)
            print(f"trainer step: {step_ms:.3f} ms ({step_source})" if step_ms else step_source)
        print(header())
        save = (lambda records: write_results(args.out, machine, records, ceil, complete=False)) if args.out else None
        records = run(shapes, dtype, device, quick=args.quick, ceil=ceil, step_ms=step_ms, step_source=step_source,
                      after_case=save)
        if args.out:
            write_results(args.out, machine, records, ceil)
            print(measure.wrote(args.out, FILES))
    wrong = [r for r in records if r["status"] == "ok" and not r["correct"]]
    failed = [r for r in records if r["status"] in measure.FAILED]
    skipped = [r for r in records if r["status"] == "skipped"]
    return measure.exit_status(wrong, failed, "summarize was wrong in {wrong} case(s) and failed in {failed}",
                               skipped), records


def main(args: argparse.Namespace) -> int:
    return run_suite(args)[0]
