"""``fastcyclic bench train``: the training step of ``fastcyclic.training.Trainer`` against a plain PyTorch loop.

The task is (a + b) mod P with h = ReLU(E[a] + E[b]), logits h W^T (no bias), AdamW with decoupled weight
decay, a batch of 8192 pairs (the full train set where it has fewer: at P = 113, 5161 of the 12769 pairs).

Methods:
  fastcyclic  fastcyclic.training.Trainer(TrainConfig(model="embed-sum", hidden=None, activation="relu", d,
              batch_size, train_fraction=0.4, optimizer="adamw", lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0,
              weight_decay_mode="decoupled", weight_decay_warmup=0, init_scale=1.0, progress=False, out_dir=None));
              its ``step()`` is timed: fused cross-entropy, fused AdamW, on CUDA the step captured in a
              CUDA graph and (fp32) the classifier's update inside the CE backward
  eager       the loop a researcher writes: nn.Embedding + nn.Linear(bias=False) + F.cross_entropy +
              torch.optim.AdamW(fused=True), zero_grad(set_to_none=True);
              bf16 = torch.autocast(bfloat16) around the forward with fp32 parameters (what the trainer's
              "bfloat16" means too: bf16 compute, fp32 master weights)
  compile     the same loop with torch.compile (default mode, static shapes) of the forward + loss; the
              fused AdamW step is already one kernel

Both start from the same parameters (the trainer's initialisation for the seed).  Correctness: each
method runs CHECK_STEPS steps on the same batches as a float64 copy of the plain loop (foreach
AdamW); the error is max over E and W of |X - X_ref| / |X_ref| (Frobenius).  Batches while timing:
the trainer samples its own on the device (inside its graph); the plain loop indexes a pre-drawn
pool of train pairs with torch.randint (full batch: the same tensors every step).

Peak extra memory (``peak_extra_gib``): what a step needs beyond the parameters and the optimizer
state (identical for all methods).  On CUDA, for a method replaying a CUDA graph, the peak allocated
over the first steps (capture included: the graph's memory pool is allocated then, and a replay
allocates nothing) minus what existed before and the optimizer state; for the others, the peak of one
step after warm-up over what exists between steps (``steady_peak_extra_gib``; torch.compile's one-off
compilation transients are left out: ``first_steps_peak_extra_gib`` shows them, and the capture's).
On CPU, the steady-state growth of the peak RSS.  TFLOP/s counts the classifier's three GEMMs,
6 * rows * d * P, against the GEMM rate measured in the same run in the compute dtype.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastcyclic.bench import measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CUDA_SHAPES = ((113, 128), (8191, 128), (65521, 256))
CPU_SHAPES = ((113, 64), (1031, 64))
QUICK_SHAPES = {"cuda": ((113, 128), (8191, 128)), "cpu": ((113, 32), (257, 32))}
INTERPRET_SHAPE = (31, 16)  # --interpret's default: 384 train pairs, full batch (a step takes ~0.3 s there)
INTERPRET_MAX_WORK = 1 << 24  # rows * d * P per step under --interpret
BATCH_SIZE = 8192
TRAIN_FRACTION = 0.4
SEED = 0
INIT_SCALE = 1.0  # the trainer's and the plain loop's initial parameters: CyclicModel at this scale
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.98), 1e-8, 1.0  # decay large enough that a wrong one shows
CHECK_STEPS = 10
POOL = 1 << 20  # train pairs drawn once for the plain loop's batches (hashed splits)
# max |X - X_ref| / |X_ref| after CHECK_STEPS steps that counts as correct.  A wrong weight decay moves
# X by CHECK_STEPS * LR * WEIGHT_DECAY = 1e-2 of |X|, a wrong update by more.  fp32 differs by rounding
# (measured ~2e-7 on CPU; on a GPU Adam may turn a gradient at rounding level into a +-lr step, ~1e-5
# of |W| a step, so 10 steps get 3x room); bf16 logits move Adam's later updates by ~2^-8 of an update
# (measured 3e-4 on CPU).
# Subtler errors are below this check's reach: beta2 0.999 for 0.98 moves X by 5e-5-2e-4 after 10 steps
# (the optimizer tests hold AdamW to torch's to rounding).
TOLERANCE = {torch.float32: 3e-4, torch.bfloat16: 2e-3}
METHOD_NAMES = ("fastcyclic", "eager", "compile")
# issue 5's targets for the fastcyclic step (H200); None: any dtype
TARGETS = {(113, 128, None): {"median_ms": 0.35}, (8191, 128, "bfloat16"): {"median_ms": 0.6},
           (65521, 256, "bfloat16"): {"median_ms": 4.1, "peak_extra_gib": 0.6}}
# the plain loop measured on the H200 (issue 5): ms per step and extra GiB
ANCHORS = {(113, 128, None): {"eager": {"median_ms": 1.92}, "compile": {"median_ms": 1.57}},
           (8191, 128, "bfloat16"): {"eager": {"median_ms": 1.89, "peak_extra_gib": 0.75},
                                     "compile": {"median_ms": 1.37, "peak_extra_gib": 0.25}},
           (65521, 256, "bfloat16"): {"eager": {"median_ms": 14.9, "peak_extra_gib": 5.9},
                                      "compile": {"median_ms": 6.16, "peak_extra_gib": 1.94}}}


Unavailable = measure.Unavailable


def parse_shape(text: str) -> tuple[int, int]:
    """P x d, e.g. 8191x128."""
    p, d = measure.parse_dims(text, "PxD", "8191x128")
    if p < 3 or d < 1:
        raise argparse.ArgumentTypeError(f"shape needs P >= 3 and d >= 1, got {text!r}")
    return p, d


def _lookup(table: dict, p: int, d: int, dtype: str):
    return table.get((p, d, dtype), table.get((p, d, None)))


# --------------------------------------------------------------------------------------------
# one problem: data, initial parameters, batches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    """Everything the methods of one case share."""
    p: int
    d: int
    dtype: torch.dtype        # compute dtype (parameters stay fp32)
    device: torch.device
    batch_size: Optional[int]  # None: the full train set
    rows: int                 # rows per step
    data: object              # fastcyclic.data.ModularAddition (the trainer builds its own, identical)
    E0: torch.Tensor          # the trainer's initial parameters for SEED
    W0: torch.Tensor
    seed: int = SEED
    backend: str = "auto"     # the trainer's: "triton" under --interpret


def make_problem(p: int, d: int, device: torch.device, batch_size: int = BATCH_SIZE):
    """(data, batch_size or None for the full batch, rows, E0, W0)."""
    from fastcyclic.data import ModularAddition
    from fastcyclic.model import CyclicModel

    data = ModularAddition(p, TRAIN_FRACTION, SEED, device)
    full = data.enumerated and data.n_train <= batch_size
    # the trainer's initialisation: CyclicModel drawn from a CPU generator seeded with the config's seed
    init = CyclicModel(p, d, model="embed-sum", activation="relu", init_scale=INIT_SCALE, device=device,
                       generator=torch.Generator().manual_seed(SEED))
    return data, None if full else batch_size, data.n_train if full else batch_size, init.E.clone(), init.W.clone()


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state (moments), which every method holds alike."""
    total = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    total += value.nbytes
    return total


class FastcyclicRunner:
    """fastcyclic.training.Trainer's step."""

    method = "fastcyclic"

    def __init__(self, spec: Spec):
        from fastcyclic.training import Trainer, TrainConfig

        self.config = TrainConfig(
            p=spec.p, model="embed-sum", d=spec.d, hidden=None, activation="relu", bias=False,
            train_fraction=TRAIN_FRACTION, batch_size=spec.batch_size, optimizer="adamw", lr=LR, betas=BETAS,
            weight_decay=WEIGHT_DECAY, weight_decay_mode="decoupled", weight_decay_warmup=0, init_scale=INIT_SCALE,
            dtype="bfloat16" if spec.dtype == torch.bfloat16 else "float32", seed=spec.seed, device=spec.device.type,
            backend=spec.backend, progress=False, out_dir=None, checkpoint_every=0)
        self.trainer = Trainer(self.config)
        t = self.trainer
        if not (torch.equal(t.model.E, spec.E0) and torch.equal(t.model.W, spec.W0)):
            raise RuntimeError("the trainer's initial parameters differ from the plain loop's (CyclicModel, seed)")

    @property
    def notes(self) -> str:
        """How the trainer ran, read from it (after its first steps: the graph is captured at the first)."""
        t = self.trainer
        return (f"fastcyclic.training.Trainer: backend {t.backend} (loss and AdamW), "
                f"{'CUDA graph' if t.graph_captured else 'no CUDA graph'}, "
                f"classifier update {'fused into the CE backward' if t.fused is not None else 'in AdamW.step'}, "
                f"{self.config.dtype} compute (fp32 parameters); batches sampled on the device")

    @property
    def cuda_graph(self) -> bool:
        return self.trainer.graph_captured

    @property
    def fused_update(self) -> bool:
        return self.trainer.fused is not None

    def step(self) -> None:
        self.trainer.step()

    def timing_mode(self) -> None:
        pass

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.model.E, self.trainer.model.W

    def state_bytes(self) -> int:
        return _state_bytes(self.trainer.optimizer)


class PlainModel(nn.Module):
    """h = ReLU(E[a] + E[b]), logits = h W^T: nn.Embedding + nn.Linear."""

    def __init__(self, p: int, d: int, device, dtype):
        super().__init__()
        self.embed = nn.Embedding(p, d, device=device, dtype=dtype)
        self.classifier = nn.Linear(d, p, bias=False, device=device, dtype=dtype)

    def forward(self, a, b):
        return self.classifier(F.relu(self.embed(a) + self.embed(b)))


class PlainRunner:
    """The plain PyTorch loop (compiled or not); reference=True: float64 parameters, no autocast."""

    cuda_graph = fused_update = False

    def __init__(self, spec: Spec, *, compiled: bool = False, reference: bool = False):
        self.method = "compile" if compiled else "eager"
        self.spec = spec
        device = spec.device
        param_dtype = torch.float64 if reference else torch.float32
        self.model = PlainModel(spec.p, spec.d, device, param_dtype)
        with torch.no_grad():
            self.model.embed.weight.copy_(spec.E0)
            self.model.classifier.weight.copy_(spec.W0)
        flags = {"foreach": True} if reference else {"fused": True}  # (fused AdamW runs on CPU too, torch >= 2.4)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                           weight_decay=WEIGHT_DECAY, **flags)
        model = self.model

        def loss_fn(a, b, c):
            return F.cross_entropy(model(a, b), c)

        self.loss_fn = measure.compile_static(loss_fn) if compiled else loss_fn
        self.autocast = spec.dtype == torch.bfloat16 and not reference
        # check mode: the trainer's batches (same sampler, same generator seed)
        self.generator = torch.Generator(device=device).manual_seed(spec.seed + 1)
        self.pool = None
        self.notes = ("nn.Embedding + nn.Linear(bias=False) + F.cross_entropy + torch.optim.AdamW("
                      f"{'fused' if 'fused' in flags else 'foreach'}=True)"
                      + (", torch.compile(forward + loss, dynamic=False)" if compiled else "")
                      + (", torch.autocast(bfloat16) with fp32 parameters" if self.autocast else "")
                      + ("; batches: torch.randint into a pool of pre-drawn train pairs" if spec.batch_size else
                         "; full batch"))

    def _batch(self):
        spec = self.spec
        if spec.batch_size is None:
            return spec.data.full_batch()
        if self.pool is None:
            return spec.data.sample_train(spec.batch_size, generator=self.generator)
        a, b, c = self.pool
        idx = torch.randint(0, a.shape[0], (spec.batch_size,), device=a.device, generator=self.generator)
        return a[idx], b[idx], c[idx]

    def timing_mode(self) -> None:
        """From here on, batches are drawn the way a researcher would: randint into a pool."""
        spec = self.spec
        if spec.batch_size is not None:
            pool = min(POOL, spec.data.n_train) if spec.data.enumerated else POOL
            self.pool = spec.data.sample_train(pool, generator=torch.Generator(device=spec.device).manual_seed(7))

    def step(self) -> None:
        a, b, c = self._batch()
        context = (torch.autocast(device_type=self.spec.device.type, dtype=torch.bfloat16) if self.autocast
                   else contextlib.nullcontext())
        with context:
            loss = self.loss_fn(a, b, c)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.embed.weight.detach(), self.model.classifier.weight.detach()

    def state_bytes(self) -> int:
        return _state_bytes(self.optimizer)


# name -> factory(spec) -> runner with step(), timing_mode(), params(), state_bytes(), notes
METHODS: dict[str, Callable] = {
    "fastcyclic": FastcyclicRunner,
    "eager": lambda spec: PlainRunner(spec, compiled=False),
    "compile": lambda spec: PlainRunner(spec, compiled=True),
}


def reference_params(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """E and W of the float64 plain loop after CHECK_STEPS steps on the trainer's batches."""
    ref = PlainRunner(spec, reference=True)
    for _ in range(CHECK_STEPS):
        ref.step()
    E, W = (t.clone() for t in ref.params())
    del ref
    return E, W


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (x.double() - ref).norm().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / max(ref.norm().item(), 1e-30)


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


def _first_steps(runner, device: torch.device, steps: int) -> Optional[int]:
    """Run the first steps; on CUDA return their peak allocation beyond what existed before them,
    less the optimizer state they create (graph capture, compilation and gradients included)."""
    if device.type != "cuda":
        for _ in range(steps):
            runner.step()
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        runner.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base - runner.state_bytes()


def run_method(name: str, spec: Spec, ref: tuple, *, quick: bool) -> dict:
    """Correctness (CHECK_STEPS steps against the float64 loop), time and memory of one method."""
    try:
        factory = METHODS[name]
    except KeyError:
        raise Unavailable(f"unknown method {name!r}")
    runner = factory(spec)
    first_extra = _first_steps(runner, spec.device, CHECK_STEPS)  # also the warm-up
    record = {"notes": runner.notes}
    E, W = runner.params()
    errors = {"err_E": _rel(E, ref[0]), "err_W": _rel(W, ref[1])}
    moved = max((ref[0] - spec.E0.double()).norm().item(), (ref[1] - spec.W0.double()).norm().item(), 1e-30)
    update_err = measure.finite_max(((E.double() - ref[0]).norm().item(), (W.double() - ref[1]).norm().item())) / moved
    record.update(errors, err=max(errors.values()), update_err=update_err)
    record["tolerance"] = TOLERANCE[spec.dtype]
    record["correct"] = record["err"] <= record["tolerance"]
    runner.timing_mode()
    runner.step()  # the timing batches' first step (a compiled loop may see new inputs)
    budget = 100.0 if quick else 200.0 if spec.device.type == "cuda" else 400.0  # CUDA steps take ms: 200 ms is plenty
    record.update(measure.time_ms(runner.step, spec.device, budget_ms=budget))
    steady = measure.peak_extra_bytes(runner.step, spec.device)
    record["steady_peak_extra_gib"] = steady / 2**30 if steady is not None else None
    record["first_steps_peak_extra_gib"] = first_extra / 2**30 if first_extra is not None else None
    record.update(cuda_graph=runner.cuda_graph, fused_update=runner.fused_update)
    if runner.cuda_graph:
        # a replayed graph allocates nothing (its memory pool was allocated at capture): the capture's peak
        record["peak_extra_gib"] = max(first_extra, steady or 0) / 2**30
        record["memory_method"] = "CUDA graph: peak allocated over the first steps (capture included) - before - state"
    else:
        # one step after warm-up: torch.compile's one-off compilation transients are not what a step needs
        record["peak_extra_gib"] = record["steady_peak_extra_gib"]
        record["memory_method"] = ("CUDA: peak allocated during one step after warm-up - allocated before it"
                                   if spec.device.type == "cuda" else
                                   "CPU: growth of the peak RSS over one step after warm-up")
    record["state_gib"] = runner.state_bytes() / 2**30
    del runner
    return record


def run(shapes, dtypes, device, methods, *, quick=False, batch_size=BATCH_SIZE, ceil=None, log=print,
        after_case=None, interpret=False) -> list[dict]:
    """Every method at every (P, d), dtype by dtype (the first dtype's cases come first, so a time budget
    cuts the later ones); a failure is recorded and the run goes on.  interpret: the trainer on its Triton
    backend (TRITON_INTERPRET=1, set by the caller)."""
    records = []
    # (p, d) -> (data, batch_size or None, rows, E0, W0, reference), or {"status": ..., "error": ...}
    problems: dict = {}

    def problem_for(p, d):
        if (p, d) not in problems:
            try:
                data, bs, rows, E0, W0 = make_problem(p, d, device, batch_size)
                ref = reference_params(Spec(p, d, torch.float64, device, bs, rows, data, E0, W0))
                problems[(p, d)] = (data, bs, rows, E0, W0, ref)
            except Exception as exc:
                problems[(p, d)] = measure.error_fields(exc, "data/reference: ")
            measure.release(device)
        return problems[(p, d)]

    for dtype in dtypes:
        dname = measure.dtype_name(dtype)
        gemm = measure.gemm_ceiling(ceil, dtype)
        for p, d in shapes:
            problem = None if measure.out_of_time() else problem_for(p, d)
            for name in methods:
                record = dict(bench="train", kind="case", case=f"P={p} d={d}", P=p, d=d, dtype=dname,
                              device=device.type, method=name,
                              reference=f"float64 plain loop (same start, same batches, foreach AdamW), "
                                        f"{CHECK_STEPS} steps")
                if isinstance(problem, tuple):
                    record.update(batch=problem[2], full_batch=problem[1] is None, flops=6 * problem[2] * d * p)
                if device.type == "cuda":
                    target = _lookup(TARGETS, p, d, dname) if name == "fastcyclic" else None
                    anchor = (_lookup(ANCHORS, p, d, dname) or {}).get(name)
                    record.update(target=target, anchor_h200=anchor)
                before = measure.telemetry(device)
                if problem is None or measure.out_of_time():
                    record.update(status="skipped", error=measure.SKIPPED)
                elif isinstance(problem, dict):
                    record.update(problem)
                else:
                    data, bs, rows, E0, W0, ref = problem
                    spec = Spec(p, d, dtype, device, bs, rows, data, E0, W0,
                                backend="triton" if interpret else "auto")
                    try:
                        record.update(run_method(name, spec, ref, quick=quick))
                        record["status"] = "ok"
                        record["steps_per_s"] = 1e3 / record["median_ms"]
                        measure.set_rate(record, record["flops"] / (record["median_ms"] * 1e9), "TFLOP/s", gemm)
                        verdict = measure.meets(record, record["target"]) if record.get("target") else None
                        if verdict is not None:  # (a figure not measured: no verdict)
                            record["meets_target"] = verdict
                    except Unavailable as exc:
                        record.update(status="unavailable", error=str(exc))
                    except Exception as exc:  # out of memory, or a failing method: the run goes on
                        record.update(measure.error_fields(exc))
                    measure.release(device)
                measure.attach_telemetry(record, device, before)
                records.append(measure.complete(record))
                log(format_row(record))
                if after_case:
                    _speedups(records)  # so that a run cut short leaves them for the cases it finished
                    after_case(records)
    problems.clear()
    measure.release(device)
    _speedups(records)
    return records


def _speedups(records: list[dict]) -> None:
    groups: dict = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["case"], r["dtype"]), {})[r["method"]] = r
    for methods in groups.values():
        ours = methods.get("fastcyclic")
        if ours:
            for other in ("eager", "compile"):
                if other in methods:
                    ours[f"speedup_vs_{other}"] = methods[other]["median_ms"] / ours["median_ms"]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

CSV_FIELDS = ("P", "d", "batch", "full_batch", "steps_per_s", "steady_peak_extra_gib", "state_gib", "err_E",
              "err_W", "update_err", "meets_target", "anchor_h200", "speedup_vs_eager", "speedup_vs_compile")
FILES = ("train.json", "train.csv", "train.png")


def header() -> str:
    return (f"{'case':>15} {'dtype':>8} {'method':<11} {'ms/step':>10} {'steps/s':>9} {'TF/s':>7} {'of GEMM':>7} "
            f"{'extra GiB':>9}  |X - X_ref| / |X_ref| vs float64")


def format_row(r: dict) -> str:
    head = f"{r['case']:>15} {r['dtype']:>8} {r['method']:<11}"
    if r["status"] != "ok":
        return measure.not_ok_row(head, r, 90)
    mem = measure.or_na(r.get("peak_extra_gib"), ".3f")
    frac = measure.or_na(r.get("frac_ceiling"), ".1%")
    line = (f"{head} {r['median_ms']:10.3f} {r['steps_per_s']:9.1f} {r['rate']:7.3f} {frac:>7} {mem:>9}  "
            f"{r['err']:.1e} {'ok' if r['correct'] else 'WRONG'}")
    if r.get("target"):
        verdict = {None: "not judged (a figure was not measured)", True: "met", False: "not met"}[r.get("meets_target")]
        line += f"  target {r['target']}: {verdict}"
    return line


write_results = measure.suite_writer("train", CSV_FIELDS,
                                     ("P", "K = P (classes)", "median time per training step (ms)"))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shape, nargs="+", metavar="PxD",
                        help="(P, d) cases (default: 113x128 8191x128 65521x256 on CUDA, 113x64 1031x64 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=None,
                        help="compute dtypes, run in this order (default: bf16 fp32 on CUDA, fp32 on CPU)")
    measure.add_device_arguments(parser)
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=None,
                        help="methods to run (default: all; --quick skips compile on CPU)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="pairs per step (the full train set where it is smaller)")
    measure.add_quick_argument(parser, "cases")
    parser.add_argument("--interpret", action="store_true",
                        help=f"CPU: the trainer on its Triton backend under TRITON_INTERPRET=1, small cases only "
                             f"(default {INTERPRET_SHAPE[0]}x{INTERPRET_SHAPE[1]})")
    measure.add_out_argument(parser, FILES)


def run_suite(args: argparse.Namespace, *, machine: dict | None = None) -> tuple[int, list[dict]]:
    """(exit code, records).  Bad input is refused (code 2) before anything is measured or written."""
    try:
        device = measure.setup_device(args)
        dtypes = [DTYPES[t] for t in dict.fromkeys(args.dtype or (["bf16", "fp32"] if device.type == "cuda"
                                                                  else ["fp32"]))]
        for dtype in dtypes:
            measure.check_dtype(device, dtype)
        if args.batch_size < 1:
            raise measure.BenchInputError(f"--batch-size must be >= 1, got {args.batch_size}")
        too_big = [f"{p}x{d}" for p, d in args.shapes or ()
                   if min(args.batch_size, p * p) * d * p > INTERPRET_MAX_WORK]
        if args.interpret and too_big:
            raise measure.BenchInputError(
                f"--interpret runs the kernels in the Triton interpreter (milliseconds per program and loop step): "
                f"batch*d*P must be <= 2^{INTERPRET_MAX_WORK.bit_length() - 1}, got {', '.join(too_big)} at batch "
                f"{args.batch_size}")
        held = measure.take_out_dir(args.out)  # (last: a refusal above leaves no folder behind)
    except measure.BenchInputError as exc:
        return measure.fail(str(exc)), []
    shapes = args.shapes or ((INTERPRET_SHAPE,) if args.interpret else QUICK_SHAPES[device.type] if args.quick else
                             CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    methods = args.methods or [m for m in METHOD_NAMES if not (m == "compile" and args.quick and device.type == "cpu")]
    shapes, methods = list(dict.fromkeys(shapes)), list(dict.fromkeys(methods))  # given twice: measured once

    with held:  # --out is this run's until its results are written
        machine = machine or measure.machine_facts(device)
        print(f"fastcyclic bench train: {measure.machine_title(machine)}, batch {args.batch_size}, AdamW lr {LR} "
              f"betas {BETAS} decoupled weight decay {WEIGHT_DECAY}")
        if args.out:  # now: an earlier run's files must not pass for this one's if it stops before its first case
            write_results(args.out, machine, [], complete=False)
        ceil = measure.print_ceilings(device, quick=args.quick)
        print(header())
        save = (lambda records: write_results(args.out, machine, records, ceil, complete=False)) if args.out else None
        records = run(shapes, dtypes, device, methods, quick=args.quick, batch_size=args.batch_size, ceil=ceil,
                      after_case=save, interpret=args.interpret)
        if args.out:
            write_results(args.out, machine, records, ceil)
            print(measure.wrote(args.out, FILES))
    ours = [r for r in records if r["method"] == "fastcyclic"]
    wrong = [r for r in ours if r["status"] == "ok" and not r["correct"]]
    failed = [r for r in ours if r["status"] in measure.FAILED]
    skipped = [r for r in ours if r["status"] == "skipped"]
    return measure.exit_status(wrong, failed, "the fastcyclic trainer was wrong in {wrong} case(s) and failed "
                                              "(or ran out of memory) in {failed}", skipped), records


def main(args: argparse.Namespace) -> int:
    return run_suite(args)[0]
