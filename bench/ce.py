"""``fastcyclic bench ce``: fused linear cross-entropy, forward + backward, against the alternatives.

For every shape it computes a float64 reference (F.cross_entropy of float64 logits in row chunks: no N x K
tensor, and none of fastcyclic's own code), then runs each method once for
correctness (relative error of loss, dh, dW) and times it.  One record per (shape, method); a
method that fails or runs out of memory gets a record saying so and the run goes on.

Methods:
  fastcyclic  fastcyclic.linear_cross_entropy (triton on CUDA; the chunked torch backend on CPU, or
              the Triton kernels under the interpreter with --interpret).  With the Triton kernels
              it runs twice: as it is, and as ``fastcyclic[gemm-backward]`` with
              ``LCEConfig(backward="gemm")`` (g in blocks of classes, dW and dh by cuBLAS)
  eager       F.cross_entropy((h @ W.T).float(), y): the logits in the input dtype, upcast
  compile     torch.compile of eager
  torch_lce   torch.nn.functional.linear_cross_entropy with chunking (acc_policy="accurate"),
              where the installed torch has it
  liger       Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA; optional ``bench`` extra), with
              accum_dtype=float32 where the installed version offers it
  cce         Apple's cut-cross-entropy ``linear_cross_entropy`` (CUDA; optional ``bench`` extra) with
              gradient filtering off (filter_eps=None, filter_e_grad/filter_c_grad=False) and fp32
              accumulation (accum_e_fp32/accum_c_fp32) where offered
A baseline that is not installed gets a record "unavailable: not installed"; every record's
``notes`` says how its method was configured (or why it did not run).

TFLOP/s counts 6*N*D*K (forward and the two backward GEMMs; recomputation is not credited); the
fraction of the ceiling is against the GEMM rate measured in the same run in the input dtype (on
CPU: fp32).  ce.png plots time and peak extra memory against K per method.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcyclic.bench import measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative error (of norms) vs float64 that counts as correct.  Gradients come back rounded to the input dtype
# (bf16: 1.7e-3 for eager and fastcyclic alike on the H200); exact fp32 gives a few 1e-7, so 1e-5 catches a
# weight off by 4e-5; fp32 dots in TF32 (torch.backends.cuda.matmul.allow_tf32, which the kernels follow)
# round their inputs to 10 bits.  The loss is accumulated in fp32, but a method may round the logits to the
# input dtype first (eager: 2.6e-6 to 2.5e-5 from bf16 inputs, fastcyclic 1e-8 to 1.6e-7).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
TF32_TOLERANCE = 5e-3
LOSS_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}

METHODS = ("fastcyclic", "eager", "compile", "torch_lce", "liger", "cce")
CUDA_SHAPES = ((8192, 256, 65536), (8192, 512, 131072), (16384, 128, 262144))
CPU_SHAPES = ((4096, 64, 65536),)
INTERPRET_MAX_WORK = 1 << 28  # N*D*K under --interpret: INTERPRET_SHAPE (2^25) takes 9 s on 2 cores
INTERPRET_SHAPE = (256, 64, 2048)  # --interpret's default (with or without --quick)
QUICK_SHAPES = {"cuda": ((4096, 128, 16384), (8192, 256, 65536)), "cpu": ((1024, 64, 16384),)}
# the targets on the H200, bf16 (ms), where the extra memory must also stay under 1 % of eager's
TARGET_MS = {(8192, 256, 65536): 2.2, (8192, 512, 131072): 7.0, (16384, 128, 262144): 9.0}
# and on CPU (fp32, the torch backend): under 10 % of eager's extra memory, and not slower than eager
CPU_TARGET_SHAPE = (4096, 64, 65536)


def target(n: int, d: int, k: int, dtype: torch.dtype, device: torch.device) -> dict | None:
    """The issue's target for fastcyclic at this case: bounds on median_ms and memory_vs_eager (at most) and
    speedup_vs_eager (at least), or None."""
    if device.type == "cuda" and dtype == torch.bfloat16 and (n, d, k) in TARGET_MS:
        return {"median_ms": TARGET_MS[(n, d, k)], "memory_vs_eager": 0.01}
    if device.type == "cpu" and dtype == torch.float32 and (n, d, k) == CPU_TARGET_SHAPE:
        return {"memory_vs_eager": 0.10, "speedup_vs_eager": 1.0}
    return None


def tf32(dtype: torch.dtype, device: torch.device) -> bool:
    if dtype != torch.float32 or device.type != "cuda":
        return False
    from fastcyclic.kernels.linear_ce import tf32_allowed  # (triton: imported on a GPU only)

    return tf32_allowed()


def grad_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    return TF32_TOLERANCE if tf32(dtype, device) else TOLERANCE[dtype]


Unavailable = measure.Unavailable


def shape_text(*shapes) -> str:
    """(8192, 256, 65536), ... as "8192x256x65536 and ..."."""
    return " and ".join("x".join(map(str, shape)) for shape in shapes)


def parse_shape(text: str) -> tuple[int, int, int]:
    n, d, k = measure.parse_dims(text, "NxDxK", "8192x256x65536")
    if n < 1 or d < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return n, d, k


# --------------------------------------------------------------------------------------------
# methods: each returns loss = f(h, w, y)
# --------------------------------------------------------------------------------------------


def _eager(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return "unknown version"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _require(module: str, dist: str, device: torch.device) -> None:
    """Unavailable unless module is installed and the device is CUDA (both baselines are Triton/CUDA)."""
    if not _installed(module):
        raise Unavailable(f"not installed: {dist} (pip install {dist}; from a checkout, pip install -e '.[bench]')")
    if device.type != "cuda":
        raise Unavailable(f"{dist} runs on CUDA only")


def _liger(device: torch.device):
    """Liger-Kernel's fused linear cross-entropy, configured as fairly as the installed version allows."""
    _require("liger_kernel", "liger-kernel", device)
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        raise Unavailable(f"liger-kernel {_version('liger-kernel')} failed to import: {_error(exc)}")
    kwargs = {"reduction": "mean"}
    notes = [f"liger-kernel {_version('liger-kernel')}: LigerFusedLinearCrossEntropyLoss(reduction='mean')"]
    try:
        accepted = inspect.signature(LigerFusedLinearCrossEntropyLoss.__init__).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "accum_dtype" in accepted:
        kwargs["accum_dtype"] = torch.float32
        notes.append("accum_dtype=float32 (fp32 gradient accumulation)")
    else:
        notes.append("this version offers no accum_dtype: gradients accumulate in the input dtype")
    notes.append("no gradient filtering (Liger has none)")
    loss_fn = LigerFusedLinearCrossEntropyLoss(**kwargs)
    return (lambda h, w, y: loss_fn(w, h, y)), "; ".join(notes)


def _cce(device: torch.device):
    """Apple's cut-cross-entropy with gradient filtering off and fp32 accumulation where offered."""
    _require("cut_cross_entropy", "cut-cross-entropy", device)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_loss
    except Exception as exc:
        raise Unavailable(f"cut-cross-entropy {_version('cut-cross-entropy')} failed to import: {_error(exc)}")
    try:
        accepted = inspect.signature(cce_loss).parameters
    except (TypeError, ValueError):
        accepted = {}
    wanted = {"filter_eps": None, "filter_e_grad": False, "filter_c_grad": False, "accum_e_fp32": True,
              "accum_c_fp32": True}
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    missing = [k for k in wanted if k not in accepted]
    notes = f"cut-cross-entropy {_version('cut-cross-entropy')}: linear_cross_entropy(" + ", ".join(
        f"{k}={v}" for k, v in kwargs.items()) + ")"
    if "filter_eps" not in kwargs:
        notes += "; WARNING: no filter_eps option, its default gradient filtering is on"
    if missing:
        notes += f"; not offered by this version: {', '.join(missing)}"
    return (lambda h, w, y: cce_loss(h, w, y, **kwargs)), notes


def make_method(name: str, device: torch.device, interpret: bool):
    """(loss_fn(h, w, y), notes on how the method is configured); Unavailable where it cannot run."""
    if name == "fastcyclic":
        from fastcyclic import linear_cross_entropy

        backend = "triton" if (device.type == "cuda" or interpret) else "torch"
        return ((lambda h, w, y: linear_cross_entropy(h, w, y, backend=backend, validate=False)),
                f"fastcyclic.linear_cross_entropy(backend={backend!r}, validate=False)")
    if name == "eager":
        return _eager, "F.cross_entropy((h @ W.T).float(), y)"
    if name == "compile":
        return (measure.compile_static(_eager),
                "torch.compile(F.cross_entropy((h @ W.T).float(), y)), default mode, dynamic=False")
    if name == "torch_lce":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        # fp32 accumulation, as the other methods have: with an explicit policy torch accumulates in the input
        # dtype unless acc_dtype says otherwise (its loss sum is bf16 in bf16 whatever the options)
        kwargs = dict(acc_policy="accurate")
        if "acc_dtype" in inspect.signature(torch.nn.LinearCrossEntropyOptions).parameters:
            kwargs["acc_dtype"] = torch.float32
        options = torch.nn.LinearCrossEntropyOptions(**kwargs)
        described = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return ((lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)),
                f"F.linear_cross_entropy(options=LinearCrossEntropyOptions({described}))")
    if name == "liger":
        return _liger(device)
    if name == "cce":
        return _cce(device)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def _error(exc: BaseException) -> str:
    return measure.error_text(exc)


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


def reference(h, w, y, *, chunk_bytes: int = 1 << 28):
    """Float64 loss and gradients from plain PyTorch (F.cross_entropy of float64 logits, in row chunks so no
    N x K tensor exists at once): independent of fastcyclic's own backends, which it judges."""
    n, k = h.shape[0], w.shape[0]
    rows = max(1, chunk_bytes // (8 * k))
    h64, w64 = h.detach().double(), w.detach().double().requires_grad_()
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    dh, dw = torch.empty_like(h64), torch.zeros_like(w64)
    for start in range(0, n, rows):
        hc = h64[start:start + rows].requires_grad_()
        part = F.cross_entropy(hc @ w64.T, y[start:start + rows], reduction="sum") / n
        gh, gw = torch.autograd.grad(part, (hc, w64))
        loss += part.detach()
        dh[start:start + rows] = gh
        dw += gw
    return loss, dh, dw


def rel_err(x, ref):
    """||x - ref|| / ||ref||, or ||x - ref|| where ref is exactly zero (dW at K = 1: every softmax is 1)."""
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    scale = ref.norm()
    return ((x - ref).norm() / (scale if scale > 0 else 1.0)).item()


def run_case(fn, h, w, y, ref, *, quick: bool) -> dict:
    """Correctness, time and memory of one method on one problem."""
    def step():
        loss = fn(h, w, y)
        return loss, torch.autograd.grad(loss, (h, w))

    loss, (dh, dw) = step()  # also the warm-up (compilation, autotuning)
    # a loss returned in fp32 is judged at LOSS_TOLERANCE; one returned in the input dtype (a baseline's
    # choice, e.g. F.linear_cross_entropy), or from TF32 dots, carries that rounding
    tolerance = grad_tolerance(h.dtype, h.device)
    fp32_loss = loss.dtype in (torch.float32, torch.float64) and not tf32(h.dtype, h.device)
    loss_tolerance = LOSS_TOLERANCE[h.dtype] if fp32_loss else tolerance
    errors = {"err_loss": rel_err(loss.reshape(()), ref[0]), "err_dh": rel_err(dh, ref[1]),
              "err_dw": rel_err(dw, ref[2])}
    del loss, dh, dw
    record = dict(errors, loss_tolerance=loss_tolerance, correct=errors["err_loss"] <= loss_tolerance
                  and max(errors["err_dh"], errors["err_dw"]) <= tolerance)
    record.update(measure.time_ms(step, h.device, budget_ms=100.0 if quick else 400.0))
    extra = measure.peak_extra_bytes(step, h.device)
    record["peak_extra_gib"] = extra / 2**30 if extra is not None else None
    return record


def run(shapes, dtype, device, methods, *, quick=False, interpret=False, tune=False, log=print,
        after_case=None, ceil=None) -> tuple[list[dict], list[dict]]:
    """All methods on all shapes; after_case(records, tuning) is called after each record of a method that
    ran (or failed), and once per shape whose inputs failed or that the time budget skipped.
    With tune (CUDA), each kernel's tiles are tuned first and fastcyclic runs both with the tuned
    and the default tiles.  ceil: measure.ceilings(...) for the fraction of the GEMM rate."""
    records, tunings = [], []
    gemm = measure.gemm_ceiling(ceil, dtype)
    for n, d, k in shapes:
        case_target = target(n, d, k, dtype, device)
        case = dict(bench="ce", kind="case", case=f"{n}x{d}x{k}", N=n, D=d, K=k, dtype=measure.dtype_name(dtype),
                    device=device.type, flops=6 * n * d * k, reference="float64 (F.cross_entropy, row chunks)",
                    tolerance=grad_tolerance(dtype, device), target_ms=(case_target or {}).get("median_ms"))
        if measure.out_of_time():
            for method in methods:
                records.append(measure.complete(dict(case, method=method, **_not_run(method, device, interpret))))
                log(format_row(records[-1]))
            if after_case:
                after_case(records, tunings)
            continue
        try:
            h, w, y = make_inputs(n, d, k, dtype, device)
            ref = reference(h, w, y)
        except Exception as exc:  # e.g. out of memory for the inputs or the reference: every method says so
            for method in methods:
                records.append(measure.complete(dict(case, method=method,
                                                     **measure.error_fields(exc, "inputs/reference: "))))
                log(format_row(records[-1]))
            measure.release(device)
            if after_case:
                after_case(records, tunings)
            continue
        tuned = None
        if tune:
            from fastcyclic.bench import tune as tuner

            try:
                tuned, timings = tuner.tune_shape(h, w, y, log=log)
                tunings.append(dict(N=n, D=d, K=k, dtype=case["dtype"], tuned=dataclasses.asdict(tuned),
                                    timings=timings))
            except Exception as exc:  # tuning failed: time the default tiles only
                tunings.append(dict(N=n, D=d, K=k, dtype=case["dtype"], error=measure.error_text(exc)))
                measure.release(device)
        for method in methods:
            variants = [(method, None)]
            if method == "fastcyclic" and tuned is not None:
                variants = [("fastcyclic[default]", None), ("fastcyclic[tuned]", tuned)]
            if method == "fastcyclic" and (device.type == "cuda" or interpret):
                # the other backward strategy on the same forward tiles, so one run compares the two
                from fastcyclic.kernels.linear_ce import default_config

                base = tuned or default_config(n, d, k, dtype, device)
                variants.append(("fastcyclic[gemm-backward]", dataclasses.replace(base, backward="gemm")))
            for label, cfg in variants:
                record = dict(case, method=label, config=dataclasses.asdict(cfg) if cfg else None)
                if label.startswith("fastcyclic") and case_target:
                    record["target"] = case_target
                before = measure.telemetry(device)
                try:  # first, so that a baseline not installed says so even when the time budget is spent
                    fn, record["notes"] = make_method(method, device, interpret)
                    if cfg is not None:  # (the variants' notes were the plain method's)
                        record["notes"] += (" with LCEConfig(backward='gemm'): g in blocks of classes, dW and dh by "
                                            "torch matmuls (cuBLAS on CUDA)" if cfg.backward == "gemm" else
                                            " with the tiles --tune chose") + " (the tiles are in config)"
                except Exception as exc:  # not installed, or a baseline that cannot be set up: the run goes on
                    record["notes"] = f"not run: {exc}"
                    record.update(dict(status="unavailable", error=str(exc)) if isinstance(exc, Unavailable) else
                                  measure.error_fields(exc))
                    measure.attach_telemetry(record, device, before)
                    records.append(measure.complete(record))
                    log(format_row(record))
                    continue
                if measure.out_of_time():
                    records.append(measure.complete(dict(record, status="skipped", error=measure.SKIPPED)))
                    log(format_row(records[-1]))
                    continue
                try:
                    if cfg is not None:
                        from fastcyclic.linear_ce import tuning as kernel_tuning

                        with kernel_tuning(config=cfg):
                            record.update(run_case(fn, h, w, y, ref, quick=quick))
                    else:
                        record.update(run_case(fn, h, w, y, ref, quick=quick))
                    record["status"] = "ok"
                    record["tflops_per_s"] = record["flops"] / (record["median_ms"] * 1e9)
                    measure.set_rate(record, record["tflops_per_s"], "TFLOP/s", gemm)
                    # the common field in the units of `tolerance`: the gradients (the loss: err_loss, loss_tolerance)
                    record["err"] = max(record["err_dh"], record["err_dw"])
                except Exception as exc:  # out of memory, or a failing baseline: the run goes on
                    record.update(measure.error_fields(exc))
                h.grad = w.grad = None
                measure.attach_telemetry(record, device, before)
                measure.release(device)
                records.append(measure.complete(record))
                log(format_row(record))
                if after_case:
                    _speedups(records)  # so that a run cut short leaves them for the cases it finished
                    after_case(records, tunings)
        del h, w, y, ref
        measure.release(device)
    _speedups(records)
    judged = [r for r in records if "meets_target" in r]
    if judged:  # (our rows were printed before eager ran: the verdicts come last)
        log("targets:")
        for r in judged:
            log(format_row(r))
    return records, tunings


def _not_run(method: str, device: torch.device, interpret: bool) -> dict:
    """The status of a case left out for lack of time: "unavailable" still, for a method that could not run."""
    try:
        make_method(method, device, interpret)
    except Unavailable as exc:
        return dict(status="unavailable", error=str(exc), notes=f"not run: {exc}")
    except Exception:  # a setup failure shows when the method runs
        pass
    return dict(status="skipped", error=measure.SKIPPED)


def _speedups(records: list[dict]) -> None:
    """fastcyclic records get speedup_vs_<method> = that method's median / fastcyclic's and memory_vs_<method> =
    fastcyclic's peak extra memory / that method's, per shape; then meets_target where they have a target."""
    by_case: dict = {}
    for r in records:
        if r["status"] == "ok":
            by_case.setdefault(r["case"], {})[r["method"]] = r
    for methods in by_case.values():
        for name, r in methods.items():
            if name.startswith("fastcyclic"):
                for other, o in methods.items():
                    if not other.startswith("fastcyclic"):
                        r[f"speedup_vs_{other}"] = o["median_ms"] / r["median_ms"]
                        if r.get("peak_extra_gib") is not None and o.get("peak_extra_gib"):
                            r[f"memory_vs_{other}"] = r["peak_extra_gib"] / o["peak_extra_gib"]
                # judged once every figure it bounds is known (eager may not have run yet, or at all)
                r.pop("meets_target", None)
                verdict = measure.meets(r, r["target"]) if r.get("target") else None
                if verdict is not None:
                    r["meets_target"] = verdict


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

CSV_FIELDS = ("N", "D", "K", "tflops_per_s", "err_loss", "loss_tolerance", "err_dh", "err_dw", "target_ms",
              "meets_target") + tuple(f"{ratio}_vs_{m}" for ratio in ("speedup", "memory") for m in METHODS
                                      if m != "fastcyclic")
FILES = ("ce.json", "ce.csv", "ce.png")
PLOT = ("K", "K (classes)", "median time (ms), forward + backward")  # measure.write_plot's x, its label, y label


def format_row(r: dict) -> str:
    shape = f"{r['N']}x{r['D']}x{r['K']}"
    head = f"{shape:>20} {r['method']:<24}"
    if r["status"] != "ok":
        return measure.not_ok_row(head, r, 80)
    mem = measure.or_na(r.get("peak_extra_gib"), ".3f")
    frac = measure.or_na(r.get("frac_ceiling"), ".0%")
    line = (f"{head} {r['median_ms']:10.3f} ms {r['tflops_per_s']:8.2f} TF/s {frac:>5} "
            f"{mem:>8} GiB  err loss {r['err_loss']:.1e} dh {r['err_dh']:.1e} dW {r['err_dw']:.1e} "
            f"{'ok' if r['correct'] else 'WRONG'}")
    if "meets_target" in r:  # (known once eager has run on the shape)
        line += f"  target {r['target']}: {'met' if r['meets_target'] else 'not met'}"
    return line


def header() -> str:
    return (f"{'N x D x K':>20} {'method':<24} {'median':>13} {'rate':>13} {'of GEMM':>5} {'extra mem':>12}  "
            "errors vs float64")


def write_results(out: Path, machine: dict, records: list[dict], tuning: list[dict] = (), ceil: dict | None = None,
                  complete: bool = True) -> list[Path]:
    """ce.json, ce.csv and (complete) ce.png, each written to a temporary name and renamed: never half a file."""
    extra = {"tuning": list(tuning)} if tuning else None
    paths = measure.write_suite(out, "ce", machine, records, ceil=ceil, csv_fields=CSV_FIELDS, extra=extra,
                                complete=complete)
    return paths + measure.write_plot(out, "ce", machine, records, *PLOT, complete=complete)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shape, nargs="+", metavar="NxDxK",
                        help=f"problem sizes (default: the issue's targets on CUDA, {shape_text(*CPU_SHAPES)} on CPU; "
                             f"with --quick {shape_text(*QUICK_SHAPES['cuda'])} on CUDA, "
                             f"{shape_text(*QUICK_SHAPES['cpu'])} on CPU; with --interpret "
                             f"{shape_text(INTERPRET_SHAPE)})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="input dtype (default bf16 on CUDA, fp32 on CPU)")
    measure.add_device_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="methods to run (default: all; --quick skips compile on CPU)")
    measure.add_quick_argument(parser, "shapes")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: run the Triton kernels under TRITON_INTERPRET=1 (small shapes only)")
    parser.add_argument("--tune", action="store_true",
                        help="CUDA: tune each fused kernel's tiles first, then time tuned and default tiles")
    measure.add_out_argument(parser, FILES)


def run_suite(args: argparse.Namespace, *, machine: dict | None = None) -> tuple[int, list[dict]]:
    """(exit code, records).  Bad input is refused (code 2) before anything is measured or written."""
    try:
        device = measure.setup_device(args)
        if args.tune and device.type != "cuda":
            raise measure.BenchInputError("--tune needs CUDA")
        dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        measure.check_dtype(device, dtype)
        too_big = [f"{n}x{d}x{k}" for n, d, k in args.shapes or () if n * d * k > INTERPRET_MAX_WORK]
        if args.interpret and too_big:
            raise measure.BenchInputError(
                f"--interpret runs the kernels in the Triton interpreter (milliseconds per program and loop step): "
                f"N*D*K must be <= 2^{INTERPRET_MAX_WORK.bit_length() - 1} (e.g. 512x64x8192), got "
                f"{', '.join(too_big)}")
        held = measure.take_out_dir(args.out)  # (last: a refusal above leaves no folder behind)
    except measure.BenchInputError as exc:
        return measure.fail(str(exc)), []
    shapes = args.shapes or (QUICK_SHAPES[device.type] if args.quick else
                             CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.interpret and not args.shapes:
        shapes = (INTERPRET_SHAPE,)
    methods = args.methods or [m for m in METHODS if not (m == "compile" and args.quick and device.type == "cpu")]
    # a shape or method given twice is measured once (speedups pair each case's records by method)
    shapes, methods = list(dict.fromkeys(shapes)), list(dict.fromkeys(methods))

    with held:  # --out is this run's until its results are written
        machine = machine or measure.machine_facts(device)
        print(f"fastcyclic bench ce: {measure.machine_title(machine)}, {measure.dtype_name(dtype)}")
        if args.out:  # now: an earlier run's files must not pass for this one's if it stops before its first case
            write_results(args.out, machine, [], complete=False)
        ceil = measure.print_ceilings(device, quick=args.quick or args.interpret)
        print(header())
        # results are rewritten (whole files, atomically) after every case, so a run stopped by a time
        # limit keeps what it measured
        save = ((lambda records, tuning: write_results(args.out, machine, records, tuning, ceil, complete=False))
                if args.out else None)
        records, tunings = run(shapes, dtype, device, methods, quick=args.quick, interpret=args.interpret,
                               tune=args.tune, after_case=save, ceil=ceil)
        if args.out:  # once more, complete
            write_results(args.out, machine, records, tunings, ceil)
            print(measure.wrote(args.out, FILES))
    wrong = [r for r in records if r["status"] == "ok" and r["method"].startswith("fastcyclic") and not r["correct"]]
    failed = [r for r in records if r["status"] in measure.FAILED and r["method"].startswith("fastcyclic")]
    skipped = [r for r in records if r["status"] == "skipped" and r["method"].startswith("fastcyclic")]
    return measure.exit_status(wrong, failed, "fastcyclic exceeded the error tolerance in {wrong} case(s) and failed "
                                              "in {failed}", skipped), records


def main(args: argparse.Namespace) -> int:
    return run_suite(args)[0]
