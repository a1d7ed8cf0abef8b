"""``fastcyclic bench ce``: fused linear cross-entropy, forward + backward, against the alternatives.

For every shape it computes a float64 reference (the chunked torch backend in float64: no N x K
tensor, itself checked against materialised logits in the tests), then runs each method once for
correctness (relative error of loss, dh, dW) and times it.  One record per (shape, method); a
method that fails or runs out of memory gets a record saying so and the run goes on.

Methods:
  fastcyclic  fastcyclic.linear_cross_entropy (triton on CUDA; the chunked torch backend on CPU, or
              the Triton kernels under the interpreter with --interpret)
  eager       F.cross_entropy((h @ W.T).float(), y): the logits in the input dtype, upcast
  compile     torch.compile of eager
  torch_lce   torch.nn.functional.linear_cross_entropy with chunking (acc_policy="accurate"),
              where the installed torch has it
TFLOP/s counts 6*N*D*K (forward and the two backward GEMMs; recomputation is not credited).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcyclic.bench import measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative error vs float64 that counts as correct (eager bf16 itself sits near 4e-3)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
METHODS = ("fastcyclic", "eager", "compile", "torch_lce")
CUDA_SHAPES = ((8192, 256, 65536), (8192, 512, 131072), (16384, 128, 262144))
CPU_SHAPES = ((4096, 64, 65536),)
QUICK_SHAPES = {"cuda": ((4096, 128, 16384), (8192, 256, 65536)), "cpu": ((1024, 64, 16384),)}
# the targets on the H200, bf16 (ms)
TARGET_MS = {(8192, 256, 65536): 2.2, (8192, 512, 131072): 7.0, (16384, 128, 262144): 9.0}


class Unavailable(Exception):
    """The method cannot run here (not installed, not supported by this torch)."""


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        n, d, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like NxDxK (e.g. 8192x256x65536), got {text!r}")
    if n < 1 or d < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return n, d, k


# --------------------------------------------------------------------------------------------
# methods: each returns loss = f(h, w, y)
# --------------------------------------------------------------------------------------------


def _eager(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y)


def make_method(name: str, device: torch.device, interpret: bool):
    if name == "fastcyclic":
        from fastcyclic import linear_cross_entropy

        backend = "triton" if (device.type == "cuda" or interpret) else "torch"
        return lambda h, w, y: linear_cross_entropy(h, w, y, backend=backend, validate=False)
    if name == "eager":
        return _eager
    if name == "compile":
        return torch.compile(_eager)
    if name == "torch_lce":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        options = torch.nn.LinearCrossEntropyOptions(acc_policy="accurate")
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


def make_inputs(n, d, k, dtype, device, seed=0):
    """Random (never zero) inputs with logits of unit scale."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(k, d, generator=g) / math.sqrt(d)).to(device, dtype).requires_grad_()
    y = torch.randint(0, k, (n,), generator=g).to(device)
    return h, w, y


def reference(h, w, y):
    """Float64 loss and gradients without materialising the logits."""
    from fastcyclic import linear_cross_entropy

    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    loss = linear_cross_entropy(h64, w64, y, backend="torch", validate=False)
    dh, dw = torch.autograd.grad(loss, (h64, w64))
    return loss.detach(), dh, dw


def rel_err(x, ref):
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(method: str, fn, h, w, y, ref, *, quick: bool) -> dict:
    """Correctness, time and memory of one method on one problem."""
    def step():
        loss = fn(h, w, y)
        return loss, torch.autograd.grad(loss, (h, w))

    loss, (dh, dw) = step()  # also the warm-up (compilation, autotuning)
    errors = {"err_loss": rel_err(loss.reshape(()), ref[0]), "err_dh": rel_err(dh, ref[1]),
              "err_dw": rel_err(dw, ref[2])}
    del loss, dh, dw
    record = dict(errors, correct=max(errors.values()) <= TOLERANCE[h.dtype])
    record.update(measure.time_ms(step, h.device, budget_ms=100.0 if quick else 400.0))
    extra = measure.peak_extra_bytes(step, h.device)
    record["peak_extra_gib"] = extra / 2**30 if extra is not None else None
    return record


def run(shapes, dtype, device, methods, *, quick=False, interpret=False, tune=False, log=print,
        after_shape=None) -> tuple[list[dict], list[dict]]:
    """All methods on all shapes; after_shape(records, tuning) is called whenever a shape is done.
    With tune (CUDA), each kernel's tiles are tuned first and fastcyclic runs both with the tuned
    and the default tiles."""
    records, tunings = [], []
    for n, d, k in shapes:
        h, w, y = make_inputs(n, d, k, dtype, device)
        ref = reference(h, w, y)
        case = dict(bench="ce", N=n, D=d, K=k, dtype=str(dtype).replace("torch.", ""), device=device.type,
                    flops=6 * n * d * k, target_ms=TARGET_MS.get((n, d, k)) if device.type == "cuda" else None)
        tuned = None
        if tune:
            from fastcyclic.bench import tune as tuner

            tuned, timings = tuner.tune_shape(h, w, y, log=log)
            tunings.append(dict(N=n, D=d, K=k, dtype=case["dtype"], tuned=dataclasses.asdict(tuned), timings=timings))
        for method in methods:
            variants = [(method, None)]
            if method == "fastcyclic" and tuned is not None:
                variants = [("fastcyclic[default]", None), ("fastcyclic[tuned]", tuned)]
            for label, cfg in variants:
                record = dict(case, method=label, config=dataclasses.asdict(cfg) if cfg else None)
                try:
                    fn = make_method(method, device, interpret)
                    if cfg is not None:
                        from fastcyclic.linear_ce import tuning as kernel_tuning

                        with kernel_tuning(config=cfg):
                            record.update(run_case(label, fn, h, w, y, ref, quick=quick))
                    else:
                        record.update(run_case(label, fn, h, w, y, ref, quick=quick))
                    record["status"] = "ok"
                    record["tflops_per_s"] = record["flops"] / (record["median_ms"] * 1e9)
                except Unavailable as exc:
                    record.update(status="unavailable", error=str(exc))
                except torch.OutOfMemoryError as exc:
                    record.update(status="oom", error=str(exc).splitlines()[0])
                except Exception as exc:  # a failing baseline must not stop the run
                    record.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                if device.type == "cuda":
                    record["telemetry"] = measure.gpu_telemetry()
                    torch.cuda.empty_cache()
                records.append(record)
                log(format_row(record))
        del h, w, y, ref
        if after_shape:
            after_shape(records, tunings)
    return records, tunings


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

COLUMNS = ("shape", "method", "status", "median_ms", "tflops_per_s", "peak_extra_gib", "err_loss", "err_dh",
           "err_dw", "correct")


def format_row(r: dict) -> str:
    shape = f"{r['N']}x{r['D']}x{r['K']}"
    if r["status"] != "ok":
        return f"{shape:>20} {r['method']:<24} {r['status']}: {r.get('error', '')[:80]}"
    mem = f"{r['peak_extra_gib']:.3f}" if r.get("peak_extra_gib") is not None else "n/a"
    return (f"{shape:>20} {r['method']:<24} {r['median_ms']:10.3f} ms {r['tflops_per_s']:8.2f} TF/s "
            f"{mem:>8} GiB  err loss {r['err_loss']:.1e} dh {r['err_dh']:.1e} dW {r['err_dw']:.1e} "
            f"{'ok' if r['correct'] else 'WRONG'}")


def header() -> str:
    return f"{'N x D x K':>20} {'method':<24} {'median':>13} {'rate':>13} {'extra mem':>12}  errors vs float64"


def write_results(out: Path, machine: dict, records: list[dict], tuning: list[dict] = ()) -> list[Path]:
    """ce.json and ce.csv, each written to a temporary name and renamed: never half a file."""
    out.mkdir(parents=True, exist_ok=True)
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=["N", "D", "K", "dtype", "device"] + list(COLUMNS[1:]) +
                            ["q25_ms", "q75_ms", "target_ms", "error"], extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow(r)
    paths = []
    results = {"machine": machine, "records": records}
    if tuning:
        results["tuning"] = list(tuning)
    for name, text in (("ce.json", json.dumps(results, indent=1)),
                       ("ce.csv", csv_text.getvalue())):
        path = out / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shape, nargs="+", metavar="NxDxK",
                        help="problem sizes (default: the issue's targets on CUDA, 4096x64x65536 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="input dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="methods to run (default: all; --quick skips compile on CPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing: a self-check")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: run the Triton kernels under TRITON_INTERPRET=1 (small shapes only)")
    parser.add_argument("--tune", action="store_true",
                        help="CUDA: tune each fused kernel's tiles first, then time tuned and default tiles")
    parser.add_argument("--out", type=Path, default=None, help="directory for ce.json and ce.csv")


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available on this machine", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.interpret and device.type == "cuda":
        print("error: --interpret runs the Triton kernels on CPU; use it with --device cpu", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        print("error: this GPU does not support bfloat16; use --dtype fp16 or fp32", file=sys.stderr)
        return 2
    shapes = args.shapes or (QUICK_SHAPES[device.type] if args.quick else
                             CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.interpret and not args.shapes:
        shapes = ((256, 64, 2048),)
    methods = args.methods or [m for m in METHODS if not (m == "compile" and args.quick and device.type == "cpu")]
    if args.tune and device.type != "cuda":
        print("error: --tune needs CUDA", file=sys.stderr)
        return 2

    machine = measure.machine_facts(device)
    print(f"fastcyclic bench ce: {machine.get('gpu', machine['cpu'])}, torch {machine['torch']}, "
          f"triton {machine['triton']}, {dtype}")
    print(header())
    # results are rewritten (whole files, atomically) after every shape, so a run stopped by a time
    # limit keeps what it measured
    save = (lambda records, tuning: write_results(args.out, machine, records, tuning)) if args.out else None
    records, _ = run(shapes, dtype, device, methods, quick=args.quick, interpret=args.interpret, tune=args.tune,
                     after_shape=save)
    wrong = [r for r in records if r["status"] == "ok" and r["method"].startswith("fastcyclic") and not r["correct"]]
    if args.out:
        print(f"wrote {args.out / 'ce.json'} and {args.out / 'ce.csv'}")
    if wrong:
        print(f"FAILED: fastcyclic exceeded the error tolerance in {len(wrong)} case(s)", file=sys.stderr)
        return 1
    return 0
