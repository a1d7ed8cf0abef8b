"""``fastcyclic bench optim``: the weight-decay optimizers' step, and the classifier update fused into
the cross-entropy backward, against torch.optim.

Optimizer step.  The parameters look like a model's: one big tensor holding most of the elements
plus a few small ones of odd sizes (``split_sizes``), random values and gradients, never zeros.
Each method first runs 3 steps from the same start as the reference (the gradients are scaled by
-0.5 between steps, exactly, so the moments see sign changes); the error is
max|p - p_ref| / max|p_ref| against torch.optim's foreach result (for bf16 parameters: foreach run
on fp32 copies of the same start and gradients with the parameters rounded to bf16 after every step,
the rule of a bf16 method with fp32 state, and the error is the largest elementwise difference in bf16
ulps; torch's own bf16 methods keep bf16 state, a different rule: reported, not judged).  Then
its step is timed.

Methods:
  fastcyclic_adamw     fastcyclic.optim.AdamW (triton on CUDA; backend "torch" on CPU, or the Triton
                       kernel under the interpreter with --interpret)
  torch_adamw_foreach  torch.optim.AdamW(foreach=True), the reference of the AdamW methods
  torch_adamw_fused    torch.optim.AdamW(fused=True), "unavailable" where this torch refuses it
  fastcyclic_sgdw      fastcyclic.optim.SGDW(momentum=0.9, weight_decay_mode="l2"): torch.optim.SGD's
                       rule, so the results compare (the decoupled mode is the same single pass)
  torch_sgd_foreach    torch.optim.SGD(momentum=0.9, foreach=True), the reference of the SGD methods
  torch_sgd_fused      torch.optim.SGD(momentum=0.9, fused=True)
  ce_update            forward + backward of fastcyclic.linear_cross_entropy then AdamW.step()
                       ("ce+step"), against the same with fastcyclic.optim.fused_update, the update
                       inside the backward so dW is never written ("ce+fused_update"); h requires
                       grad in both.  On CPU the torch backend still forms dW (the fused path only
                       skips .grad), so the saving there says nothing about the Triton epilogue

Bytes per parameter are the least a step must move, counted from the dtypes each optimizer really
holds: AdamW fp32 28 (read p, g, m, v; write p, m, v), SGD with momentum 20 (read p, g, buf; write
p, buf).  bf16 parameters: 22 and 14 with fastcyclic's fp32 state, 14 and 10 with torch's bf16
state.  GB/s = bytes / median time (1 GB = 1e9 bytes), also given as a fraction of the copy
bandwidth measured in the same run (``dst.copy_(src)`` of a large tensor, 2 x its bytes; shared with
the other suites of ``fastcyclic bench all``).  On CUDA
the L2 cache is flushed before every repetition.  On CPU the --quick sizes fit in cache, and a core
streaming several arrays at once can beat its own copy rate, so fractions above 1 happen there.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from fastcyclic.bench import ce as ce_bench
from fastcyclic.bench import measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# max|p - p_ref| / max|p_ref| after CHECK_STEPS steps that counts as correct.  fp32 differs by rounding
# only; bf16 parameters are rounded at every step (half an ulp, up to 2^-8 of max|p|, each time)
CHECK_STEPS = 3
TOLERANCE = {torch.float32: 1e-5}
# bf16 parameters: against the fp32 reference rounded to bf16 after every step (the rule of a bf16 method with
# fp32 state), elementwise in units of bf16's eps times |p_ref|: a different rounding (fp32 arithmetic in
# another order) costs <= 1 per step
ULP_TOLERANCE = 3.0
# |W_step - W_fused| / |W_step| (2-norms) after CHECK_STEPS steps: the unfused path steps on a dW
# rounded to the input dtype, the fused one on the fp32 tile, and Adam turns a gradient near
# rounding level into a full +-lr step, so a few elements may differ by 2 lr even in fp32
CE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
# the ce_update check's decay: CHECK_STEPS * LR * CE_WEIGHT_DECAY = 3e-2 of |W|, well above the bf16 tolerance
# (at WEIGHT_DECAY a fused update that forgets the decay moves W by only 3.5e-3 of |W|, inside bf16's 1e-2)
CE_WEIGHT_DECAY = 1.0
LR, WEIGHT_DECAY, MOMENTUM = 1e-2, 0.1, 0.9  # large enough that a wrong decay or moment shows above 1e-5

CUDA_SIZES = (2**25, 2**27)
CPU_SIZES = (2**22,)
QUICK_SIZES = {"cuda": (2**25,), "cpu": (2**18,)}
INTERPRET_SIZES = (2**18,)
INTERPRET_MAX_SIZE = 2**22  # --sizes under --interpret: one AdamW step of 2^18 parameters takes ~0.5 s there
CE_SHAPE = {"cuda": (8192, 256, 65536), "cpu": (1024, 64, 8192), "quick": (256, 32, 2048),
            "interpret": (256, 64, 2048)}
# the targets on the H200
TARGET_GBPS = {("fastcyclic_adamw", torch.float32): 3900.0}
TARGET_SAVING_PCT = {(8192, 256, 65536): 10.0}


Unavailable = measure.Unavailable


MAX_SIZE = 2**40  # parameters: 4 TiB of fp32 values, beyond any one device


def parse_size(text: str) -> int:
    """A parameter count: an integer, or a power written 2^25 / 2**25."""
    spelled = text.strip().lower().replace("**", "^")
    try:
        if "^" in spelled:
            base, exponent = (int(part) for part in spelled.split("^"))
            if base < 1 or exponent < 0:
                raise ValueError
            # past MAX_SIZE's bit length any base > 1 is too large (and 2^10^9 would compute for minutes)
            value = base ** min(exponent, MAX_SIZE.bit_length() + 1)
        else:
            value = int(spelled)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be a positive integer or a power like 2^25, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size must be at most 2^{MAX_SIZE.bit_length() - 1}, got {text!r}")
    return value


def split_sizes(total: int) -> list[int]:
    """A model-like split of total elements: one big tensor, a few fractions of it (embeddings,
    other layers) and odd small ones (biases, norms), so a multi-tensor step meets ragged ends."""
    small = [total // 16, total // 64, total // 256] + ([4099, 257, 17, 1] if total >= 2**16 else [])
    small = [n for n in small if n > 0]
    return [total - sum(small)] + small


# --------------------------------------------------------------------------------------------
# methods: each builds an optimizer over params
# --------------------------------------------------------------------------------------------


def _fastcyclic_backend(device: torch.device, interpret: bool) -> str:
    return "triton" if device.type == "cuda" or interpret else "torch"


def _fastcyclic_adamw(params, device, interpret):
    from fastcyclic.optim import AdamW

    return AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, backend=_fastcyclic_backend(device, interpret))


def _fastcyclic_sgdw(params, device, interpret):
    from fastcyclic.optim import SGDW

    return SGDW(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, weight_decay_mode="l2",
                backend=_fastcyclic_backend(device, interpret))


def _torch_adamw(**flags):
    def factory(params, device, interpret):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **flags)
    return factory


def _torch_sgd(**flags):
    def factory(params, device, interpret):
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **flags)
    return factory


# name -> (family, factory(params, device, interpret), optional: a failure means "unavailable")
STEP_METHODS = {
    "fastcyclic_adamw": ("adamw", _fastcyclic_adamw, False),
    "torch_adamw_foreach": ("adamw", _torch_adamw(foreach=True), False),
    "torch_adamw_fused": ("adamw", _torch_adamw(fused=True), True),
    "fastcyclic_sgdw": ("sgd", _fastcyclic_sgdw, False),
    "torch_sgd_foreach": ("sgd", _torch_sgd(foreach=True), False),
    "torch_sgd_fused": ("sgd", _torch_sgd(fused=True), True),
}
REFERENCE = {"adamw": "torch_adamw_foreach", "sgd": "torch_sgd_foreach"}
REFERENCE_NOTE = "the reference itself: not judged"  # the notes of a reference's record (and ce+step's)
METHODS = tuple(STEP_METHODS) + ("ce_update",)


# --------------------------------------------------------------------------------------------
# optimizer step
# --------------------------------------------------------------------------------------------


def make_params(numel: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Start values and gradients, split like a model's parameters (separate tensors, not views)."""
    g = torch.Generator(device=device).manual_seed(seed)
    sizes = split_sizes(numel)
    start = [t.clone() for t in torch.randn(numel, generator=g, device=device).to(dtype).split(sizes)]
    grads = [t.clone() for t in torch.randn(numel, generator=g, device=device).to(dtype).split(sizes)]
    return start, grads


def stepped(method: str, start, grads, device, interpret, round_to=None):
    """The optimizer over copies of start, after CHECK_STEPS steps, and its parameters; round_to: round the
    parameters to that dtype after every step (a bf16 method's rule, emulated in fp32)."""
    _, factory, optional = STEP_METHODS[method]
    params = [p.clone().requires_grad_() for p in start]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    try:
        optimizer = factory(params, device, interpret)
        optimizer.step()
        _round(params, round_to)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if optional:  # e.g. fused=True on a device or dtype this torch has no kernel for
            raise Unavailable(_error(exc)) from None
        raise
    for _ in range(CHECK_STEPS - 1):
        torch._foreach_mul_([p.grad for p in params], -0.5)
        optimizer.step()
        _round(params, round_to)
    return optimizer, params


def _round(params, dtype) -> None:
    if dtype is not None:
        with torch.no_grad():
            for p in params:
                p.copy_(p.to(dtype))


def max_ulps(params, ref, dtype) -> float:
    """max over elements of |p - ref| / (eps(dtype) * |ref|)."""
    eps = torch.finfo(dtype).eps
    return measure.finite_max(
        ((p.detach().float() - r.float()).abs() / (eps * r.float().abs()).clamp_min(1e-30)).max().item()
        for p, r in zip(params, ref))


def step_bytes(params, optimizer) -> int:
    """The least a step moves: read and write p, read g, read and write each state tensor."""
    total = 0
    for p in params:
        total += 2 * p.nbytes + p.grad.nbytes
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:  # not the step counter
                total += 2 * value.nbytes
    return total


def max_diff(params, ref) -> tuple[float, float]:
    """max|p - ref| and that over max|ref|."""
    diff = measure.finite_max((p.detach().float() - r.float()).abs().max().item() for p, r in zip(params, ref))
    if not math.isfinite(diff):
        return math.inf, math.inf
    scale = max(r.float().abs().max().item() for r in ref)
    return diff, diff / max(scale, 1e-30)


def run_step_case(method: str, start, grads, ref, device, interpret, *, quick: bool) -> dict:
    """Correctness, time, bandwidth and memory of one optimizer on one set of parameters."""
    optimizer, params = stepped(method, start, grads, device, interpret)  # also the warm-up
    record = {}
    if ref is not None:
        diff, rel = max_diff(params, ref)
        record.update(max_abs_diff=diff, rel_diff=rel)
        if start[0].dtype == torch.float32:
            record.update(tolerance=TOLERANCE[torch.float32], correct=rel <= TOLERANCE[torch.float32])
        else:
            ulps = max_ulps(params, ref, start[0].dtype)
            record.update(ulp_diff=ulps, tolerance=ULP_TOLERANCE, correct=ulps <= ULP_TOLERANCE)
            if not method.startswith("fastcyclic"):  # torch keeps bf16 state: another rule, reported not judged
                record.update(correct=None, notes="bf16 state (torch's rule): ulp_diff reported, not judged")
    moved = step_bytes(params, optimizer)
    record.update(bytes=moved, bytes_per_param=moved / sum(p.numel() for p in params))
    record.update(measure.time_ms(optimizer.step, device, budget_ms=100.0 if quick else 400.0))
    extra = measure.peak_extra_bytes(optimizer.step, device)
    record["peak_extra_gib"] = extra / 2**30 if extra is not None else None
    record["gbps"] = moved / (record["median_ms"] * 1e6)
    return record


def copy_record(measured: dict, device: torch.device) -> dict:
    """The ceiling as a record of this suite: bandwidth of dst.copy_(src), which reads and writes
    every byte once (measured by ``measure.ceilings``)."""
    record = dict(bench="optim", kind="ceiling", case=f"numel={measured['numel']}", optimizer=None,
                  **{k: v for k, v in measured.items() if k != "method"}, method="copy")
    record["device"] = device.type
    if record.get("status") == "ok":
        record.update(bytes_per_param=8.0, frac_copy=1.0)
        measure.set_rate(record, record["gbps"], "GB/s", ("copy", record["gbps"]))
    record["telemetry"] = measure.telemetry(device)
    return measure.complete(record)


def run_steps(sizes, dtype, device, methods, *, copy_gbps, quick=False, interpret=False, log=print) -> list[dict]:
    """Every optimizer method on every size; a failure is recorded and the run goes on."""
    records = []
    families = [f for f in ("adamw", "sgd") if any(STEP_METHODS[m][0] == f for m in methods if m in STEP_METHODS)]
    for numel in sizes:
        case = dict(bench="optim", kind="step", case=f"numel={numel}", numel=numel, tensors=len(split_sizes(numel)),
                    dtype=str(dtype).replace("torch.", ""), device=device.type)
        setup_error = None  # or the status and error of every record of this size
        if measure.out_of_time():
            setup_error = dict(status="skipped", error=measure.SKIPPED)
        else:
            try:
                start, grads = make_params(numel, dtype, device)
            except Exception as exc:  # e.g. out of memory for the inputs themselves
                setup_error = measure.error_fields(exc, "inputs: ")
        for family in families:
            ref, ref_error = None, None
            if setup_error is None:
                try:  # the reference keeps only its parameters
                    ref_start, ref_grads = start, grads
                    if dtype != torch.float32:
                        ref_start, ref_grads = [p.float() for p in start], [g.float() for g in grads]
                    ref_optimizer, ref = stepped(REFERENCE[family], ref_start, ref_grads, device, interpret,
                                                 round_to=None if dtype == torch.float32 else dtype)
                    ref = [p.detach() for p in ref]  # frees the gradients and, below, the state
                    del ref_optimizer, ref_start, ref_grads
                except Exception as exc:
                    ref_error = _error(exc)
                _release(device)
            for method in (m for m in methods if STEP_METHODS.get(m, (None,))[0] == family):
                reference = REFERENCE[family] + ("" if dtype == torch.float32 else " rounded every step [fp32]")
                backend = _fastcyclic_backend(device, interpret) if method.startswith("fastcyclic") else None
                record = dict(case, optimizer=family, method=method, backend=backend, reference=reference,
                              target_gbps=TARGET_GBPS.get((method, dtype)) if device.type == "cuda" else None)
                record["target"] = {"gbps": record["target_gbps"]} if record["target_gbps"] else None
                before = measure.telemetry(device)
                if setup_error is not None:
                    record.update(setup_error)
                else:
                    try:
                        record.update(run_step_case(method, start, grads, ref, device, interpret, quick=quick))
                        record["status"] = "ok"
                        record["frac_copy"] = record["gbps"] / copy_gbps if copy_gbps else None
                        measure.set_rate(record, record["gbps"], "GB/s", ("copy", copy_gbps) if copy_gbps else
                                         (None, None))
                        record["err"] = record.get("ulp_diff", record.get("rel_diff"))
                        if ref is None:
                            record.update(correct=None, error=f"no reference: {ref_error}")
                        elif method == REFERENCE[family] and dtype == torch.float32:  # 0 by construction
                            record.update(correct=None, notes=REFERENCE_NOTE)
                    except Unavailable as exc:
                        record.update(status="unavailable", error=str(exc))
                    except Exception as exc:  # out of memory, or a failing method: the run goes on
                        record.update(measure.error_fields(exc))
                    _release(device)
                measure.attach_telemetry(record, device, before)
                records.append(measure.complete(record))
                log(format_row(record))
            del ref
        if setup_error is None:
            del start, grads
        _release(device)
    return records


def _error(exc: BaseException) -> str:
    """The exception's type and first line, short enough for a table and a CSV cell."""
    return measure.error_text(exc)


def _release(device: torch.device) -> None:
    measure.release(device)


class _Skipped(Exception):
    """The time budget ran out before this part."""


# --------------------------------------------------------------------------------------------
# cross-entropy + update step
# --------------------------------------------------------------------------------------------


def run_ce_update(shape, dtype, device, *, quick=False, interpret=False, log=print, ceil=None) -> list[dict]:
    """Forward + backward + AdamW step of the classifier, with dW in memory and with the update
    fused into the backward: correctness (same W after CHECK_STEPS steps) and time of each."""
    from fastcyclic import linear_cross_entropy
    from fastcyclic.optim import AdamW, fused_update

    n, d, k = shape
    backend = _fastcyclic_backend(device, interpret)
    case = dict(bench="optim", kind="ce_update", case=f"{n}x{d}x{k}", optimizer="adamw", N=n, D=d, K=k,
                numel=k * d, dtype=str(dtype).replace("torch.", ""), device=device.type, ce_backend=backend,
                reference="ce+step (W after the same steps, dW in memory)", flops=6 * n * d * k,
                weight_decay=CE_WEIGHT_DECAY)
    records = [dict(case, method="ce+step"), dict(case, method="ce+fused_update")]
    before = measure.telemetry(device)
    try:
        if measure.out_of_time():
            raise _Skipped()
        # h requires grad, as a model's features do: both paths compute dh
        h, w0, y = ce_bench.make_inputs(n, d, k, dtype, device)

        def build(fused: bool):
            w = w0.detach().clone().requires_grad_()
            optimizer = AdamW([w], lr=LR, weight_decay=CE_WEIGHT_DECAY, backend=backend)
            handle = fused_update(optimizer, w) if fused else None

            def step():
                loss = linear_cross_entropy(h, w, y, backend=backend, validate=False, fused_update=handle)
                loss.backward()
                optimizer.step()
                # the fused handle refuses a second backward before step() and a W holding a .grad
                optimizer.zero_grad(set_to_none=True)
                h.grad = None

            for _ in range(CHECK_STEPS):  # also the warm-up
                step()
            return w, step

        w_step, step_plain = build(fused=False)
        w_fused, step_fused = build(fused=True)
        diff = (w_fused.detach().float() - w_step.detach().float())
        rel = (diff.norm() / w_step.detach().float().norm().clamp_min(1e-30)).item()
        moved = (w_step.detach().float() - w0.detach().float()).norm().clamp_min(1e-30)
        check = dict(max_abs_diff=diff.abs().max().item(), rel_diff=rel if math.isfinite(rel) else math.inf,
                     update_rel_diff=(diff.norm() / moved).item(), tolerance=CE_TOLERANCE[dtype])
        check["correct"] = check["rel_diff"] <= check["tolerance"]
        del diff, moved
        records[0].update(max_abs_diff=0.0, rel_diff=0.0, update_rel_diff=0.0, tolerance=check["tolerance"],
                          correct=None, notes=REFERENCE_NOTE)  # (it showed the fused update's difference, "ok")
        records[1].update(check)
        for record, step in zip(records, (step_plain, step_fused)):
            try:
                record.update(measure.time_ms(step, device, budget_ms=100.0 if quick else 400.0))
                extra = measure.peak_extra_bytes(step, device)
                record.update(status="ok", peak_extra_gib=extra / 2**30 if extra is not None else None)
            except Exception as exc:
                record.update(measure.error_fields(exc))
    except _Skipped:
        for record in records:
            record.update(status="skipped", error=measure.SKIPPED)
    except Exception as exc:  # out of memory, or e.g. the fused handle refusing: recorded, the run goes on
        for record in records:
            record.update(measure.error_fields(exc))
    plain, fused = records
    if plain["status"] == fused["status"] == "ok":
        fused["saving_pct"] = 100.0 * (1.0 - fused["median_ms"] / plain["median_ms"])
        fused["target_saving_pct"] = TARGET_SAVING_PCT.get(shape) if device.type == "cuda" else None
        if fused["target_saving_pct"]:
            fused["target"] = {"saving_pct": fused["target_saving_pct"]}
    gemm = measure.gemm_ceiling(ceil, dtype)
    for record in records:
        if record["status"] == "ok":
            measure.set_rate(record, record["flops"] / (record["median_ms"] * 1e9), "TFLOP/s", gemm)
            record["err"] = record.get("rel_diff")
        measure.attach_telemetry(record, device, before)
        measure.complete(record)
        log(format_row(record))
    _release(device)
    return records


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

CSV_FIELDS = ("kind", "optimizer", "method", "status", "numel", "N", "D", "K", "dtype", "device", "median_ms",
              "q25_ms", "q75_ms", "bytes_per_param", "gbps", "frac_copy", "target_gbps", "peak_extra_gib",
              "max_abs_diff", "rel_diff", "ulp_diff", "correct", "saving_pct", "target_saving_pct", "error")
FILES = ("optim.json", "optim.csv", "optim.png")


def header() -> str:
    return (f"{'opt':<6} {'method':<20} {'size':>17} {'dtype':>8} {'median':>13} {'GB/s':>9} {'of copy':>8} "
            f"{'B/param':>7} {'extra mem':>10}  max|p - p_ref| / max|p_ref|")


def format_row(r: dict) -> str:
    size = f"{r['N']}x{r['D']}x{r['K']}" if r["kind"] == "ce_update" else str(r["numel"])
    head = f"{r['optimizer'] or '':<6} {r['method']:<20} {size:>17} {r['dtype']:>8}"
    if r["status"] != "ok":
        return measure.not_ok_row(head, r, 80)
    line = f"{head} {r['median_ms']:10.3f} ms"
    mem = measure.or_na(r.get("peak_extra_gib"), ".3f")
    if r["kind"] == "ce_update":
        saving = f"saving {r['saving_pct']:5.1f} %" if r.get("saving_pct") is not None else ""
        if r.get("notes") == REFERENCE_NOTE:
            return line + f" {saving:>26} {mem:>14} GiB  (the reference)"
        line += f" {saving:>26} {mem:>14} GiB  |W - W_ref| / |W_ref| {r['rel_diff']:.1e}"
    else:
        line += f" {r['gbps']:9.1f} {measure.or_na(r.get('frac_copy'), '.0%'):>8} {r['bytes_per_param']:7.1f}"
        if r["kind"] == "ceiling":
            return line + "  (ceiling)"
        line += f" {mem:>6} GiB"
        if r.get("correct") is None and r.get("ulp_diff") is None:
            return line + ("  (the reference)" if r.get("notes") == REFERENCE_NOTE else "  no reference")
        if r.get("ulp_diff") is not None:
            verdict = "" if r["correct"] is None else " ok" if r["correct"] else " WRONG"
            return line + f"  {r['ulp_diff']:.1f} ulp{verdict}"
        line += f"  {r['rel_diff']:.1e}"
    return line + f" {'ok' if r['correct'] else 'WRONG'}"


write_results = measure.suite_writer("optim", CSV_FIELDS,
                                     ("numel", "parameters (elements)", "median time per step (ms)"))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=parse_size, nargs="+", metavar="N",
                        help="parameter counts, e.g. 2^25 or 33554432 (default: 2^25 2^27 on CUDA, 2^22 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype (default: fp32 for the optimizer step; for ce_update bf16 on CUDA, "
                             "fp32 on CPU)")
    measure.add_device_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="methods to run (default: all)")
    parser.add_argument("--ce-shape", type=ce_bench.parse_shape, default=None, metavar="NxDxK",
                        help=f"ce_update problem (default: {ce_bench.shape_text(CE_SHAPE['cuda'])} on CUDA, "
                             f"{ce_bench.shape_text(CE_SHAPE['cpu'])} on CPU, {ce_bench.shape_text(CE_SHAPE['quick'])} "
                             f"with --quick on CPU, {ce_bench.shape_text(CE_SHAPE['interpret'])} with --interpret)")
    measure.add_quick_argument(parser, "sizes")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: run fastcyclic's Triton kernels under TRITON_INTERPRET=1 (small sizes only)")
    measure.add_out_argument(parser, FILES)


def run_suite(args: argparse.Namespace, *, machine: dict | None = None) -> tuple[int, list[dict]]:
    """(exit code, records).  Bad input is refused (code 2) before anything is measured or written."""
    try:
        device = measure.setup_device(args)
        dtype = DTYPES[args.dtype] if args.dtype else torch.float32
        ce_dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        for t in (dtype, ce_dtype):
            measure.check_dtype(device, t)
        if args.interpret:  # the Triton interpreter takes milliseconds per program: hours at the CUDA sizes
            too_big = [str(n) for n in args.sizes or () if n > INTERPRET_MAX_SIZE]
            if too_big:
                raise measure.BenchInputError(f"--interpret: --sizes must be <= 2^{INTERPRET_MAX_SIZE.bit_length() - 1}"
                                              f", got {', '.join(too_big)}")
            if args.ce_shape and math.prod(args.ce_shape) > ce_bench.INTERPRET_MAX_WORK:
                raise measure.BenchInputError(
                    f"--interpret: --ce-shape N*D*K must be <= 2^{ce_bench.INTERPRET_MAX_WORK.bit_length() - 1}, got "
                    + "x".join(map(str, args.ce_shape)))
        held = measure.take_out_dir(args.out)  # (last: a refusal above leaves no folder behind)
    except measure.BenchInputError as exc:
        return measure.fail(str(exc)), []
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported
    sizes = args.sizes or (INTERPRET_SIZES if args.interpret else QUICK_SIZES[device.type] if args.quick else
                           CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    # on a GPU the target shape takes a few ms, so --quick keeps it
    ce_shape = args.ce_shape or CE_SHAPE["cuda" if device.type == "cuda" else "interpret" if args.interpret else
                                         "quick" if args.quick else "cpu"]
    methods = list(dict.fromkeys(args.methods or METHODS))  # given twice: measured once
    sizes = list(dict.fromkeys(sizes))

    with held:  # --out is this run's until its results are written
        machine = machine or measure.machine_facts(device)
        print(f"fastcyclic bench optim: {measure.machine_title(machine)}, lr {LR}, weight decay {WEIGHT_DECAY}, "
              f"SGD momentum {MOMENTUM}")
        if args.out:  # now: an earlier run's files must not pass for this one's if it stops before its first case
            write_results(args.out, machine, [], complete=False)
        ceil = measure.print_ceilings(device, quick=args.quick or args.interpret)
        print(header())
        # results are rewritten (whole files, atomically) after every part, so a run stopped by a time
        # limit keeps what it measured
        records = []
        save = ((lambda complete=False: write_results(args.out, machine, records, ceil, complete=complete)) if args.out
                else (lambda complete=False: None))
        copy = copy_record(ceil["copy"], device)
        records.append(copy)
        print(format_row(copy))
        copy_gbps = copy.get("gbps") if copy["status"] == "ok" else None
        save()
        if any(m in STEP_METHODS for m in methods):
            records += run_steps(sizes, dtype, device, methods, copy_gbps=copy_gbps, quick=args.quick,
                                 interpret=args.interpret)
            save()
        if "ce_update" in methods:
            records += run_ce_update(ce_shape, ce_dtype, device, quick=args.quick, interpret=args.interpret, ceil=ceil)
            save()
        save(complete=True)
        if args.out:
            print(measure.wrote(args.out, FILES))
    ours = [r for r in records if r["method"].startswith(("fastcyclic", "ce+"))]
    wrong = [r for r in ours if r["status"] == "ok" and r.get("correct") is False]  # (ce+step is the reference)
    # a fastcyclic optimizer whose reference failed was not checked (correct None, only then): that is no pass
    unchecked = [r for r in ours if r["status"] == "ok" and r["method"].startswith("fastcyclic")
                 and r.get("correct") is None]
    failed = [r for r in ours if r["status"] in measure.FAILED] + unchecked
    skipped = [r for r in ours if r["status"] == "skipped"]
    return measure.exit_status(wrong, failed, "fastcyclic was wrong in {wrong} case(s) and failed (or could not be "
                                              "checked) in {failed}", skipped), records


def main(args: argparse.Namespace) -> int:
    return run_suite(args)[0]
