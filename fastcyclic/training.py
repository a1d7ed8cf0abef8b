"""Training embedding + classifier models on (a + b) mod P: the config, the loop, checkpoints.

    result = fastcyclic.train(fastcyclic.TrainConfig(p=97, seed=1))

One step: sample a batch (or take the full train set), h = model.features(a, b), the fused
cross-entropy (its backward may apply the classifier's optimizer update itself), then the fused
optimizer for the other parameters.  Nothing in the step reads a value back to the host: the loss
and a NaN/Inf watch accumulate on the device and are read at evaluations only, so on CUDA
the whole step is captured once in a CUDA graph and replayed.  Weight decay is ramped on the device
over ``weight_decay_warmup`` steps (large decay otherwise sends every weight to zero before
features form).

Per run directory: config.json, metrics.jsonl (one line per evaluation), summary.json,
checkpoint.pt (atomic: temporary file, fsync, rename), figures/*.png.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from fastcyclic import geometry
from fastcyclic.data import MAX_P, ModularAddition, is_integer
from fastcyclic.files import exclusive_lock, remove_temporaries, write_atomic, write_json
from fastcyclic.kernels import BACKENDS, auto_backend, require_triton
from fastcyclic.model import ACTIVATIONS, MODELS, CyclicModel
from fastcyclic.optim import SGDW, WEIGHT_DECAY_MODES, AdamW, fused_update, fused_update_fits
from fastcyclic.sweep import chance_threshold

OPTIMIZERS = ("adamw", "sgdw")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINT = "checkpoint.pt"
FIGURES = ("circles.png", "fourier.png", "curves.png", "geometry.png")  # what a run writes under figures/
# fields that may differ when a run is resumed: they change how long it runs and how it is logged,
# not what a step computes
RESUMABLE_CHANGES = ("steps", "eval_every", "geometry_every", "checkpoint_every", "out_dir", "progress")
# no effect on CPU (CPU runs are deterministic anyway, for a given number of threads), so free to differ
# when resuming there
CPU_FREE = ("fused_update", "cuda_graph", "deterministic")
# a captured step whose baked hyper-parameters (betas, eps, momentum) changed after fewer replays than this,
# twice in a row, is not captured again: a capture costs a warm-up step, a synchronize and a compilation
MIN_REPLAYS = 10


def _option(default, help: str):
    """A TrainConfig field; its help text is the CLI's (``fastcyclic train --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that defines a run.  The defaults are the embedded CPU default (README): a run
    that groks P = 97 in about 35 s on 2 CPU cores and ends rank-2 cyclic, W and E sharing one
    Fourier frequency.  The width-2 embedding is what makes it cyclic (E can hold one circle only);
    with room for more (d >= 4: README) the same model ends with a few frequencies."""

    p: int = _option(97, "modulus: K = P classes and P tokens (3 to 2^31: a circle needs 3 points)")
    model: str = _option("embed-mlp", "embed-sum: h = act(E[a] + E[b]); embed-mlp: h = act(U [E[a]; E[b]])")
    d: int = _option(2, "embedding width")
    hidden: Optional[int] = _option(16, "hidden width m of embed-mlp (none: 4 d; ignored by embed-sum)")
    factorised: bool = _option(False, "logits = (h V^T) W^T, so W (K x d) lives in E's space and locking is defined")
    activation: str = _option("square", "relu, square (x^2) or gelu")
    bias: bool = _option(False, "give the classifier a bias (never weight-decayed)")
    train_fraction: float = _option(0.5, "share of the P^2 pairs in the train split")
    batch_size: Optional[int] = _option(None, "pairs per step; none = the full train set (small P only)")
    steps: int = _option(4500, "optimizer steps")
    optimizer: str = _option("adamw", "adamw or sgdw")
    lr: float = _option(1e-3, "learning rate")
    betas: tuple = _option((0.9, 0.98), "adamw's (beta1, beta2)")
    momentum: float = _option(0.9, "sgdw's momentum")
    weight_decay: float = _option(3e-4, "lambda, on every weight matrix (not on the bias)")
    weight_decay_mode: str = _option("l2", "l2: lambda*p joins the gradient (the penalty in the loss); "
                                           "decoupled: AdamW/SGDW")
    weight_decay_warmup: int = _option(500, "steps of linear ramp of lambda from 0 (lets large lambda survive)")
    init_scale: float = _option(0.5, "multiplies every initial standard deviation")
    dtype: str = _option("float32", "float32, or bfloat16: the classifier and loss in bf16 from fp32 master "
                                    "weights (the embedding, hidden layer and evaluations stay fp32)")
    seed: int = _option(0, "seeds the split, the initialisation and the batches")
    deterministic: bool = _option(False, "bitwise reproducible on CUDA too (torch.use_deterministic_algorithms, "
                                         "process-wide); CPU runs always are, on the same number of threads")
    device: str = _option("auto", "auto (cuda when available), cpu or cuda[:n]")
    backend: str = _option("auto", "kernels: auto (triton on CUDA, torch on CPU or without triton), triton "
                                   "or torch")
    fused_update: bool = _option(True, "on CUDA in float32, apply the classifier's update inside the CE backward")
    cuda_graph: bool = _option(True, "on CUDA with the triton backend, capture the training step once and replay it")
    eval_every: int = _option(100, "steps between evaluations (train/test loss and accuracy)")
    geometry_every: int = _option(100, "steps between geometry summaries of W and E (each with an evaluation)")
    checkpoint_every: int = _option(500, "steps between checkpoints (0: none)")
    out_dir: Optional[str] = _option(None, "run directory (none: write nothing)")
    progress: bool = _option(True, "show a progress bar")

    def __post_init__(self):
        if isinstance(self.out_dir, os.PathLike):  # a pathlib.Path is welcome; config.json stores text
            self.out_dir = os.fspath(self.out_dir)
        # NumPy scalars (a sweep over np.arange or np.logspace) become the Python numbers config.json stores
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.generic):
                setattr(self, f.name, value.item())
        # a list (JSON, the CLI) or an ndarray becomes a tuple of Python numbers: checkpoints hold Python numbers only
        if isinstance(self.betas, (tuple, list, np.ndarray)):
            self.betas = tuple(_as_float(b.item() if isinstance(b, np.generic) else b) for b in self.betas)
        # lr=1 and lr=1.0 are one run: a sweep's run id hashes the config, and the CLI always gives floats
        for f in dataclasses.fields(self):
            if f.type == "float":
                setattr(self, f.name, _as_float(getattr(self, f.name)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def _as_float(x):
    """An int (not a bool) as a float; anything else, or an int beyond float's range, as it is for validate()."""
    if isinstance(x, int) and not isinstance(x, bool):
        with contextlib.suppress(OverflowError):
            return float(x)
    return x


def _is_number(x) -> bool:
    """A finite int or float (not a bool, not a string, not an int beyond float's range)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


_FLAGS = ("factorised", "bias", "deterministic", "fused_update", "cuda_graph", "progress")


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the field for a config that cannot run, before anything is built or written."""
    c = config
    checks = [
        # P = 2 trains, but its geometry (a circle, a simplex) needs three classes
        (lambda: is_integer(c.p) and 3 <= c.p <= MAX_P, f"p must be an integer in [3, 2^31], got {c.p!r}"),
        (lambda: is_integer(c.d) and c.d >= 1, f"d must be an integer >= 1, got {c.d!r}"),
        (lambda: c.hidden is None or (is_integer(c.hidden) and c.hidden >= 1),
         f"hidden must be None or an integer >= 1, got {c.hidden!r}"),
        (lambda: c.model in MODELS, f"model must be one of {MODELS}, got {c.model!r}"),
        (lambda: c.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {c.activation!r}"),
        (lambda: c.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}"),
        (lambda: c.weight_decay_mode in WEIGHT_DECAY_MODES,
         f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {c.weight_decay_mode!r}"),
        (lambda: _is_number(c.train_fraction) and 0.0 < c.train_fraction < 1.0,
         f"train_fraction must be in (0, 1), got {c.train_fraction!r}"),
        (lambda: c.batch_size is None or (is_integer(c.batch_size) and c.batch_size >= 1),
         f"batch_size must be None or an integer >= 1, got {c.batch_size!r}"),
        (lambda: is_integer(c.steps) and c.steps >= 0, f"steps must be an integer >= 0, got {c.steps!r}"),
        (lambda: _is_number(c.lr) and c.lr >= 0, f"lr must be a finite number >= 0, got {c.lr!r}"),
        (lambda: len(c.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in c.betas),
         f"betas must be two numbers in [0, 1), got {c.betas!r}"),
        (lambda: _is_number(c.momentum) and 0 <= c.momentum < 1,  # (torch's SGD takes >= 1, and diverges)
         f"momentum must be a number in [0, 1), got {c.momentum!r}"),
        (lambda: _is_number(c.weight_decay) and c.weight_decay >= 0,
         f"weight_decay must be a finite number >= 0, got {c.weight_decay!r}"),
        (lambda: is_integer(c.weight_decay_warmup) and c.weight_decay_warmup >= 0,
         f"weight_decay_warmup must be an integer >= 0, got {c.weight_decay_warmup!r}"),
        (lambda: _is_number(c.init_scale) and c.init_scale >= 0,
         f"init_scale must be a finite number >= 0, got {c.init_scale!r}"),
        (lambda: is_integer(c.seed) and -2**63 <= c.seed < 2**63 - 1,  # torch.manual_seed(seed + 1) takes int64
         f"seed must be an integer in [-2^63, 2^63 - 2], got {c.seed!r}"),
        (lambda: c.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {c.dtype!r}"),
        (lambda: c.backend in BACKENDS,
         f"backend must be 'auto', 'triton' or 'torch', got {c.backend!r}"),
        (lambda: all(is_integer(v) and v >= 1 for v in (c.eval_every, c.geometry_every)),
         f"eval_every and geometry_every must be integers >= 1, got {c.eval_every!r}, {c.geometry_every!r}"),
        (lambda: is_integer(c.checkpoint_every) and c.checkpoint_every >= 0,
         f"checkpoint_every must be an integer >= 0, got {c.checkpoint_every!r}"),
        (lambda: all(isinstance(getattr(c, name), bool) for name in _FLAGS),
         "factorised, bias, deterministic, fused_update, cuda_graph and progress must be True or False, got "
         + ", ".join(f"{name}={getattr(c, name)!r}" for name in _FLAGS)),
        (lambda: c.out_dir is None or isinstance(c.out_dir, str), f"out_dir must be a path or None, got {c.out_dir!r}"),
    ]
    for ok, message in checks:
        try:
            passed = ok()
        except (TypeError, ValueError, AttributeError):  # a value of the wrong type
            passed = False
        if not passed:
            raise ValueError(message)
    device = check_device(c.device)
    backend = _resolve_backend(c, device)
    if backend == "triton":
        require_triton()
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if c.dtype == "bfloat16" and backend == "triton" and capability < (8, 0):
            raise ValueError(f"dtype='bfloat16' needs a GPU of compute capability 8.0 or newer for the Triton "
                             f"kernels' bf16 dots; {torch.cuda.get_device_name(device)} is {capability[0]}."
                             f"{capability[1]}: use dtype='float32' (or backend='torch')")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                         "starting Python (or use backend='torch')")


def check_device(name: str) -> torch.device:
    """The device that a config's ``device`` names, "auto" resolved; ValueError for a name other than auto, cpu
    and cuda[:n], and for a CUDA device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # "cudax", None
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _resolve_device(config: TrainConfig) -> torch.device:
    """As check_device, unchecked (a checkpoint's device may be one this machine lacks)."""
    return check_device("auto") if config.device == "auto" else torch.device(config.device)


def _resolve_backend(config: TrainConfig, device: torch.device) -> str:
    return auto_backend(device) if config.backend == "auto" else config.backend


def _device_key(device: torch.device) -> str:
    """cuda without an index is the current CUDA device: "cuda" and "cuda:0" may name one device."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _as_resume_compares(config: dict, device: torch.device) -> dict:
    """A config's fields as a resume compares them: choices that resolve alike ("auto" and what it picks,
    "cuda" and "cuda:0", hidden None and 4 d) made equal, and fields the run ignores (hidden of embed-sum,
    momentum of adamw, betas of sgdw) left out."""
    view = dict(config)
    view["device"] = _device_key(device)
    if view.get("backend") == "auto":
        view["backend"] = auto_backend(device)
    if view.get("model") != "embed-mlp":
        view["hidden"] = None
    elif view.get("hidden") is None:
        view["hidden"] = 4 * view.get("d", 0)
    view["momentum" if view.get("optimizer") == "adamw" else "betas"] = None
    return view


def _check_out_dir(path: str) -> None:
    """Create out_dir and prove it writable before any training starts."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out_dir {path!r} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"out_dir {path!r} is not writable: {e}") from e


def _check_holds_a_run_or_nothing(path: str) -> None:
    """A fresh run removes and replaces a run's files (checkpoint, summary, figures): in a folder that holds
    other files and no run, they are someone else's.  Hidden files (.gitkeep, our temporaries) do not count."""
    others = sorted(name for name in os.listdir(path) if not name.startswith("."))
    if not others or _is_run_config(os.path.join(path, "config.json")):
        return
    why = ""
    if os.path.exists(os.path.join(path, CHECKPOINT)):  # a Trainer's own save_checkpoint, without train()
        try:
            # memory-mapped, and without the CRC pass: what it holds is not read (a resume reads it in full)
            state = torch.load(os.path.join(path, CHECKPOINT), map_location="cpu", weights_only=True, mmap=True)
            if _is_training_state(state):
                return
            why = f"; its {CHECKPOINT} is not a fastcyclic training checkpoint"
        except Exception as e:  # not a torch file, or damaged: torch raises many kinds
            why = f"; its {CHECKPOINT} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    raise ValueError(f"out_dir {path!r} is not empty ({shown}) and holds no fastcyclic run (neither a run's "
                     f"config.json nor a training {CHECKPOINT}{why}); refusing to write into it: give a new or "
                     "empty directory")


def _is_run_config(path: str) -> bool:
    """path is a run's config.json (TrainConfig.to_dict, the file a run writes first)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"p", "seed", "weight_decay", "out_dir"} <= set(saved)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step.  The last good checkpoint and the
    metrics up to the last evaluation are kept."""


@dataclass
class TrainResult:
    """What ``fastcyclic.train`` returns: the run's final metrics and geometry, its history, what it wrote."""
    config: TrainConfig
    final: dict                                   # the last evaluation: step, losses, accuracies, ...
    geometry: Optional[geometry.GeometrySummary]  # of the final W and E
    history: list = field(default_factory=list)   # every evaluation record (dicts)
    t_W: Optional[int] = None                     # first step whose geometry (every geometry_every) has rho2(W) >= 0.9
    t_E: Optional[int] = None
    settle_W: Optional[int] = None                # first step from which rho2(W) stays near its end value (None:
    settle_E: Optional[int] = None                # still moving at the end)
    paths: dict = field(default_factory=dict)     # what was written: config, metrics, summary, checkpoint, figures
    seconds: float = 0.0                          # wall time, including the runs it resumed
    stopped_early: bool = False                   # a callback set trainer.should_stop before config.steps
    trainer: Optional["Trainer"] = field(default=None, repr=False)  # to keep stepping or to analyse the model


def _plain(value) -> bool:
    """Whether value is JSON's kind of data (what an evaluation record may hold)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _plain(v) for k, v in value.items())


class Trainer:
    """The training loop, usable step by step: ``step()`` (one optimizer step; it returns nothing, the loss is
    read by ``evaluate()``: ``batch_loss`` is the mean since the last evaluation), ``evaluate()`` (a record,
    also appended to ``history``, the list of every evaluation so far), ``state_dict()`` and
    ``load_state_dict()`` (continue elsewhere, bit for bit), ``save_checkpoint(path)`` (what ``resume`` reads;
    ``fastcyclic.training.load_checkpoint`` reads one back as a state dict).

    ``fastcyclic.train`` runs it to the end; research code can drive it directly, e.g. to look at
    ``trainer.model.W`` between steps.  It keeps its own copy of ``config``.  A callback may set
    ``trainer.should_stop = True``: ``fastcyclic.train`` then ends after that evaluation, writing the checkpoint,
    summary and figures as at the last step (a resume continues from there).  On CPU it turns on
    ``torch.set_flush_denormal(True)`` for the process (weights decaying toward zero go denormal and make
    CPU arithmetic ~10x slower)."""

    def __init__(self, config: TrainConfig, *, callbacks: Optional[list] = None):
        cuda_started = torch.cuda.is_initialized()  # before validate() and set_device() start it themselves
        # the run's own copy: a caller reusing its config (config.weight_decay = wd in a loop) changes neither this
        # run nor its TrainResult; replace() re-runs __post_init__, which makes NumPy scalars assigned after
        # construction Python numbers (a checkpoint loads with weights_only=True)
        config = dataclasses.replace(config)
        validate(config)
        self.config = config
        if callbacks is not None and not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"callbacks must be a list of functions f(trainer, record), got {callbacks!r}")
        self.callbacks = list(callbacks or [])
        for callback in self.callbacks:
            if not callable(callback):
                raise TypeError(f"each callback must be a function f(trainer, record), got {callback!r}")
        self.should_stop = False  # set by a callback: fastcyclic.train ends after this evaluation
        self.device = _resolve_device(config)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # see the class docstring
        elif self.device.type == "cuda" and self.device.index is not None:
            # streams, graph capture and Triton launches use the current device, not the tensors'
            torch.cuda.set_device(self.device)
        if config.deterministic:
            # the embedding's backward (index_put with accumulate) uses atomics on CUDA unless told not to;
            # cuBLAS needs a fixed workspace, read once when cuBLAS starts: setting it here only works if no
            # CUDA matmul ran before in this process (else torch raises at the first matmul)
            if "CUBLAS_WORKSPACE_CONFIG" not in os.environ and self.device.type == "cuda" and cuda_started:
                warnings.warn("deterministic=True on CUDA: set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment "
                              "before the process's first CUDA matmul; setting it now works only if none ran yet")
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.compute_dtype = DTYPES[config.dtype]
        self.data = ModularAddition(config.p, config.train_fraction, config.seed, self.device)
        if config.batch_size is None and not self.data.enumerated:
            raise ValueError(f"batch_size=None (full batch) needs the enumerated split, but P={config.p} has "
                             f"{self.data.n_pairs} pairs; set batch_size")
        if config.batch_size is not None:
            self.data.check_batch_size(config.batch_size)
        init = torch.Generator().manual_seed(config.seed)
        self.model = CyclicModel(config.p, config.d, model=config.model,
                                 hidden=config.hidden if config.model == "embed-mlp" else None,
                                 activation=config.activation, bias=config.bias, factorised=config.factorised,
                                 init_scale=config.init_scale, device=self.device, generator=init)
        self.backend = _resolve_backend(config, self.device)
        self.batch_generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)

        # lambda lives on the device (ramped there, readable by a captured graph)
        self._weight_decay = torch.zeros((), device=self.device)
        decayed = [p for name, p in self.model.named_parameters() if name != "bias"]
        groups = [{"params": decayed, "weight_decay": self._weight_decay}]
        if self.model.bias is not None:
            groups.append({"params": [self.model.bias], "weight_decay": 0.0})
        common = dict(lr=config.lr, weight_decay_mode=config.weight_decay_mode, backend=self.backend)
        if config.optimizer == "adamw":
            self.optimizer = AdamW(groups, betas=tuple(config.betas), **common)
        else:
            self.optimizer = SGDW(groups, momentum=config.momentum, **common)
        # the classifier update inside the CE backward: CUDA, fp32 (in bf16 the loss sees a bf16 copy of W)
        self.fused = None
        if config.fused_update and self.device.type == "cuda" and self.compute_dtype == torch.float32:
            width = self.model.weight.shape[1]
            if fused_update_fits(width, torch.float32, self.device):
                self.fused = fused_update(self.optimizer, self.model.weight)
            else:  # the run is still right, only without the fusion
                warnings.warn(f"fused_update: the classifier width D={width} is too wide for the fused update's "
                              "tile (float32: D <= 1024, 512 with TF32); the classifier is updated by optimizer.step()")

        # device-side accumulators, read at evaluations only
        self.step_count = 0
        self._step = torch.zeros((), dtype=torch.int64, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_steps = 0
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._graph = None
        self._graph_hyper = None  # the optimizer's host hyper-parameters the graph was captured with
        self._no_capture = False  # a capture failed, or baked hyper-parameters change every few steps
        self._replays = 0  # of the current graph
        self._short_graphs = 0  # graphs in a row dropped after fewer than MIN_REPLAYS replays
        # on CUDA the gradients stay allocated (zeroed, not freed): the optimizer's launch tables keep their
        # addresses, so eager steps do not rebuild them (4 synchronous host-to-device copies), and a capture can
        # reuse them
        self._keep_grads = self.device.type == "cuda"
        self.history: list[dict] = []
        self._timer = (time.perf_counter(), 0)
        self._seconds_before, self._built = 0.0, time.perf_counter()  # earlier segments (resumed), this one's start
        if config.out_dir is not None:  # last: a config refused above leaves no directory behind
            _check_out_dir(config.out_dir)

    # ---- one step -----------------------------------------------------------------------------
    def _batch(self):
        if self.config.batch_size is None:
            return self.data.full_batch()
        return self.data.sample_train(self.config.batch_size, generator=self.batch_generator)

    def _loss(self, a, b, c, fused=None):
        h = self.model.features(a, b)
        weight, bias = self.model.weight, self.model.bias
        if self.compute_dtype != torch.float32:  # bf16 compute, fp32 master weights
            h, weight = h.to(self.compute_dtype), weight.to(self.compute_dtype)
            bias = bias.to(self.compute_dtype) if bias is not None else None
        from fastcyclic.linear_ce import linear_cross_entropy

        return linear_cross_entropy(h, weight, c, bias=bias, backend=self.backend, validate=False,
                                    fused_update=fused)

    def _set_weight_decay(self, steps: torch.Tensor) -> None:
        """lambda once `steps` (a device tensor) steps have run: ramped linearly from 0 over the warm-up."""
        warmup = self.config.weight_decay_warmup
        ramp = (steps.double() / warmup).clamp(max=1.0) if warmup > 0 else torch.ones((), device=self.device)
        self._weight_decay.copy_(ramp * self.config.weight_decay)

    def _train_step(self) -> None:
        """The step exactly as captured: no host reads, fixed shapes."""
        self._set_weight_decay(self._step + 1)
        loss = self._loss(*self._batch(), fused=self.fused)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self._keep_grads)
        bad = ~torch.isfinite(loss.detach())
        self._first_bad_step.copy_(torch.where(bad & (self._first_bad_step < 0), self._step, self._first_bad_step))
        self._loss_sum.add_(loss.detach().double())
        self._step.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (state, tables and gradients get allocated), then capture one step.  A capture
        that fails is a RuntimeError naming the error and cuda_graph=False, the warm-up step counted."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        self._keep_grads = True
        with torch.cuda.stream(stream):
            self._train_step()
        torch.cuda.current_stream().wait_stream(stream)
        self.step_count += 1  # the warm-up step was a real step; the capture itself runs nothing
        self._loss_steps += 1
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.batch_generator)  # replays must advance the batch sampler's RNG
        current = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                self._train_step()
        except Exception as e:
            # Nothing captured ran; the step's host-side bookkeeping is undone, so the trainer's counts stay
            # right.  It does not go on: a capture the driver invalidated (a sync, an uncapturable call) leaves
            # torch.cuda.graph's side stream current (restored here) and, in torch <= 2.11, the CUDA generators
            # in capture mode for the rest of the process, which no trainer can undo.
            self._no_capture = True
            if self.fused is not None:
                self.fused._pending, self.fused._stepped = None, True
            torch.cuda.set_stream(current)
            raise RuntimeError(f"capturing the training step in a CUDA graph failed ({type(e).__name__}: {e}); "
                               "run without it: cuda_graph=False (fastcyclic train --no-cuda-graph, fastcyclic "
                               "sweep --set cuda_graph=false)") from e
        self._graph, self._replays = graph, 0
        self._graph_hyper = self._host_hyper()
        # the tensors whose ids _graph_hyper holds, kept alive (a freed one's id may name the next tensor made)
        self._graph_tensors = [v for group in self.optimizer.param_groups for v in group.values()
                               if isinstance(v, torch.Tensor)]

    def _host_hyper(self) -> list:
        """What a captured step bakes in: the groups' host hyper-parameters but float lr and weight decay
        (refresh_scalars writes those), and which tensor a tensor value is (the graph reads that one).  Compared
        at every replay, so a plain loop rather than optim._hyper_snapshot (which is ~3x slower)."""
        baked = []
        for group in self.optimizer.param_groups:
            for key, value in group.items():
                if key == "params":
                    continue
                if isinstance(value, torch.Tensor):
                    baked.append(id(value))  # _capture holds the tensor: its id cannot go to a new one
                elif key in ("lr", "weight_decay"):
                    baked.append(key)
                elif isinstance(value, list):
                    baked.append(tuple(value))
                elif isinstance(value, np.ndarray):  # (betas may be one: == on two arrays has no truth value)
                    baked.append(tuple(value.tolist()))
                else:
                    baked.append(value)
        return baked

    def _can_capture(self) -> bool:
        """The step is captured on CUDA with the Triton kernels (the torch backend syncs with the host), and
        with SGDW momentum only from the second step on (its first step runs a kernel variant of its own,
        which must be compiled before a capture)."""
        c = self.config
        first_step_variant = c.optimizer == "sgdw" and c.momentum != 0 and self.step_count == 0
        return c.cuda_graph and self.device.type == "cuda" and self.backend == "triton" and not first_step_variant \
            and not self._no_capture

    @property
    def graph_captured(self) -> bool:
        """Whether step() replays a captured CUDA graph (from the first step on, where it can)."""
        return self._graph is not None

    def step(self) -> None:
        """One optimizer step (replays the captured graph on CUDA)."""
        if self._graph is not None and self._host_hyper() != self._graph_hyper:
            self._graph = None  # betas, eps, momentum, ... changed since the capture: capture again with them
            self._short_graphs = self._short_graphs + 1 if self._replays < MIN_REPLAYS else 0
            if self._short_graphs >= 2:  # a schedule of them (OneCycleLR's momentum): a capture every step
                self._no_capture = True
                warnings.warn(f"the optimizer's betas, eps or momentum changed within {MIN_REPLAYS} steps of each "
                              "of the last two CUDA-graph captures of the training step (a graph bakes them in): the "
                              "run goes on without a graph (cuda_graph=False does so from the start)", stacklevel=2)
        if self._graph is None and self._can_capture():
            self._capture()  # a warm-up step, then the capture
            return
        if self._graph is not None:
            self.optimizer.refresh_scalars()  # a float lr or weight decay changed since the capture
            self._graph.replay()
            self._replays += 1
        else:
            self._train_step()
        self.step_count += 1
        self._loss_steps += 1

    # ---- measurements -------------------------------------------------------------------------
    def check_finite(self) -> None:
        """Raise TrainingDiverged if any step so far had a NaN/Inf loss, or the parameters or the optimizer
        state are NaN/Inf now: an update can overflow the weights, and overflowing gradients (g^2 in Adam's
        second moment) freeze them, while the loss stays finite.  A sync: at evaluations and checkpoints."""
        kept = ("the metrics and the last good checkpoint (if one was written) are kept" if self.config.out_dir else
                "nothing was written (out_dir=None)")
        first_bad = int(self._first_bad_step)
        if first_bad >= 0:
            raise TrainingDiverged(f"the training loss became NaN/Inf at step {first_bad + 1}; {kept}")
        for what, tensors in (("parameters", [p.detach() for p in self.model.parameters()]),
                              ("optimizer state", [v for state in self.optimizer.state.values()
                                                   for v in state.values() if torch.is_tensor(v) and v.numel()])):
            if tensors and not bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()):
                raise TrainingDiverged(f"the {what} became NaN/Inf by step {self.step_count}; {kept}")

    @torch.no_grad()
    def _loss_and_accuracy(self, pairs, chunk: int = 8192) -> tuple[float, float]:
        from fastcyclic.linear_ce import linear_cross_entropy_stats

        a_all, b_all, c_all = pairs
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for i in range(0, a_all.shape[0], chunk):
            a, b, c = a_all[i:i + chunk], b_all[i:i + chunk], c_all[i:i + chunk]
            h = self.model.features(a, b)
            loss, _, argmax = linear_cross_entropy_stats(h, self.model.weight, c, bias=self.model.bias,
                                                         backend=self.backend, validate=False)
            loss_sum += loss.double().sum()
            correct += (argmax == c).sum()
        n = max(a_all.shape[0], 1)
        return float(loss_sum) / n, int(correct) / n

    def add_geometry(self, record: dict) -> dict:
        """The geometry fields of an evaluation record, from the current W and E."""
        summary = self.summarize_geometry()
        record.update(rho2_W=summary.rho2_W, rho2_E=summary.rho2_E, locking=summary.locking,
                      freq_count_W=summary.freq_count_W, freq_count_E=summary.freq_count_E,
                      omega_W=summary.omega_W, omega_E=summary.omega_E, verdict=summary.verdict)
        return record

    def summarize_geometry(self) -> geometry.GeometrySummary:
        """Geometry of the current W and E (``fastcyclic.geometry.summarize``)."""
        W, E = self.model.W.float(), self.model.E.float()
        # W meets E's space only through a factorised readout or embed-sum (there with a nonlinearity between);
        # embed-mlp's W reads the hidden layer, whatever its width
        same_space = self.config.factorised or self.config.model == "embed-sum"
        return geometry.summarize(W, E, same_space=same_space)

    def evaluate(self, *, with_geometry: Optional[bool] = None) -> dict:
        """Train/test loss and accuracy (fixed evaluation sets), the mean training loss since the last
        evaluation, steps/s, and the geometry when due.  Raises TrainingDiverged after a NaN/Inf loss."""
        start, steps_then = self._timer
        self.check_finite()
        now = time.perf_counter()
        train_loss, train_acc = self._loss_and_accuracy(self.data.train_eval_pairs())
        test_loss, test_acc = self._loss_and_accuracy(self.data.test_pairs())
        record = dict(step=self.step_count, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                      test_acc=test_acc,
                      batch_loss=float(self._loss_sum) / self._loss_steps if self._loss_steps else None,
                      steps_per_s=(self.step_count - steps_then) / max(now - start, 1e-9),
                      weight_decay=float(self._weight_decay))
        self._loss_sum.zero_()
        self._loss_steps = 0
        if with_geometry is None:
            with_geometry = self.step_count % self.config.geometry_every == 0 or self.step_count == self.config.steps
        if with_geometry:
            self.add_geometry(record)
        self.history.append(record)
        for callback in self.callbacks:
            callback(self, record)
        # what callbacks added as NumPy or one-element torch numbers, as Python numbers: metrics.jsonl writes
        # them, and a checkpoint (loaded with weights_only=True) could not hold NumPy objects
        for key, value in record.items():
            if (isinstance(value, (np.generic, np.ndarray)) and value.size == 1) or \
                    (isinstance(value, torch.Tensor) and value.numel() == 1):  # an ndarray: what tensor.numpy() gives
                record[key] = value.item()
            elif not _plain(value):  # (it failed later: in metrics.jsonl, or loading the checkpoint)
                self.history.pop()
                raise TypeError(f"a callback stored {key!r} = {type(value).__name__} in the evaluation record at step "
                                f"{self.step_count}: records hold numbers, strings, None and lists or dicts of them "
                                "(metrics.jsonl and the checkpoint store them); store e.g. value.tolist()")
        self._timer = (time.perf_counter(), self.step_count)
        return record

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs.  As with torch's state dicts, the model's and optimizer's tensors are
        references to the live ones (``copy.deepcopy`` it to keep an in-memory snapshot); the rest are copies."""
        return dict(
            format=1, config=self.config.to_dict(), step=self.step_count,
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            # every random draw has its own seeded generator: the global RNGs, which the caller owns, are left alone
            batch_generator=self.batch_generator.get_state(),
            history=[dict(record) for record in self.history],
            # the mean training loss since the last evaluation spans the resume point
            loss_sum=self._loss_sum.clone(), loss_steps=self._loss_steps, seconds=self.seconds,
            cpu_threads=torch.get_num_threads(),
        )

    @property
    def seconds(self) -> float:
        """Wall-clock seconds since this Trainer was built, plus those of the run it resumed."""
        return self._seconds_before + time.perf_counter() - self._built

    def load_state_dict(self, state: dict) -> None:
        keys = ("config", "model", "optimizer", "batch_generator", "step", "history")
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and all(k in state for k in keys)):
            shown = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a Trainer state dict (one has the keys {', '.join(keys)}, ...), got {shown}")
        saved_device = _resolve_device(TrainConfig(device=state["config"].get("device", "auto")))
        saved = _as_resume_compares(state["config"], saved_device)
        mine = _as_resume_compares(self.config.to_dict(), self.device)
        free = RESUMABLE_CHANGES + (CPU_FREE if self.device.type == "cpu" else ())
        different = sorted(k for k in mine if k not in free and saved.get(k) != mine[k])
        if different:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in different)
            raise ValueError(f"cannot resume with a different config ({details})")
        if self._graph is not None:
            raise RuntimeError("load_state_dict must come before the first step")
        saved_threads = state.get("cpu_threads")
        if self.device.type == "cpu" and saved_threads not in (None, torch.get_num_threads()):
            # a CPU matmul sums in an order that depends on how many threads share it
            warnings.warn(f"resuming on {torch.get_num_threads()} CPU threads a run checkpointed on {saved_threads}: "
                          "it continues, but not bit for bit as the uninterrupted run would; "
                          f"torch.set_num_threads({saved_threads}) (fastcyclic train --threads {saved_threads}) "
                          "would", stacklevel=2)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # the loaded groups hold a copy of the lambda tensor; the ramp writes ours
        self.optimizer.param_groups[0]["weight_decay"] = self._weight_decay
        self.batch_generator.set_state(state["batch_generator"])
        self.step_count = int(state["step"])
        self._step.fill_(self.step_count)
        self.history = [dict(record) for record in state["history"]]
        # the loaded state's own loss sum (the mean loss since the last evaluation spans the resume point); a
        # diverged trainer rolled back to a good state is not diverged
        self._first_bad_step.fill_(-1)
        self._loss_sum.copy_(state.get("loss_sum", torch.zeros((), dtype=torch.float64)))
        self._loss_steps = int(state.get("loss_steps", 0))
        if self.step_count > 0:  # what the last step used (a trainer that has not stepped has lambda 0)
            self._set_weight_decay(self._step)
        else:
            self._weight_decay.zero_()
        self._timer = (time.perf_counter(), self.step_count)
        self._seconds_before, self._built = float(state.get("seconds", 0.0)), time.perf_counter()

    def save_checkpoint(self, path: str) -> None:
        state = self.state_dict()
        # Ctrl-C or SIGTERM inside torch.save's zip writer surfaces as a RuntimeError ("unexpected pos"), not as
        # KeyboardInterrupt: hold them until the write is done (a few ms to a second)
        with _signals_held():
            write_atomic(path, lambda f: torch.save(state, f))


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM arriving inside the block are handled when it ends.  (Masking them with pthread_sigmask
    is not enough: the kernel then hands a process-directed signal to another thread -- torch's intra-op workers,
    tqdm's monitor -- whose C handler still makes the main thread raise at its next bytecode.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append((signum, frame)))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if received:
            signum, frame = received[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _check_crc32s(path: str) -> None:
    """torch.save writes a zip whose records carry CRC-32s that torch.load does not check: a flipped bit in a
    tensor would load silently.  Records stored with CRC 0 are skipped: torch.serialization.set_crc32_options(False)
    saves without them."""
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.CRC == 0 and record.file_size:
                continue
            with archive.open(record) as f:
                while f.read(1 << 20):  # zipfile raises BadZipFile at the end of a record whose CRC-32 differs
                    pass


def load_checkpoint(path: str) -> dict:
    """A checkpoint's contents, or a ValueError saying why it cannot be used (nothing is written)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist" if not os.path.exists(path) else
                         f"checkpoint {path!r} is not a file")
    try:
        _check_crc32s(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, damaged or foreign file: torch raises many kinds
        raise ValueError(f"checkpoint {path!r} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    if not _is_training_state(state):
        raise ValueError(f"checkpoint {path!r} is not a fastcyclic training checkpoint")
    return state


def _is_training_state(state) -> bool:
    """What Trainer.state_dict writes (format 1), by its markers."""
    return isinstance(state, dict) and state.get("format") == 1 and "model" in state


def _figures(trainer: Trainer, folder: str) -> dict:
    from fastcyclic import plots

    os.makedirs(folder, exist_ok=True)
    W, E = trainer.model.W.float().cpu(), trainer.model.E.float().cpu()
    paths = dict(
        circles=plots.plot_circles(W, E, os.path.join(folder, FIGURES[0])),
        fourier=plots.plot_fourier(W, E, os.path.join(folder, FIGURES[1])),
        curves=plots.plot_training_curves(trainer.history, os.path.join(folder, FIGURES[2])),
    )
    geometry_records = [r for r in trainer.history if "rho2_W" in r]
    if geometry_records:
        paths["geometry"] = plots.plot_geometry_history(geometry_records, os.path.join(folder, FIGURES[3]),
                                                        e_columns=E.shape[1])
    return paths


def train(config: TrainConfig, *, callbacks: Optional[list] = None, resume: bool = False,
          figures: bool = True) -> TrainResult:
    """Run ``config`` to the end (see the module docstring).  ``resume=True`` continues from
    ``out_dir/checkpoint.pt`` when it exists.  ``callbacks``: functions ``f(trainer, record)`` called
    after every evaluation; one may set ``trainer.should_stop = True`` to end the run there (see Trainer), and
    add entries to the record (numbers, strings, None, lists or dicts of them).  ``figures=False`` draws none."""
    trainer = Trainer(config, callbacks=callbacks)
    out = trainer.config.out_dir
    # two runs must not write one out_dir at once: the lock is on the directory itself
    with exclusive_lock(out, f"another run is writing to out_dir {out!r}") if out else contextlib.nullcontext():
        return _train(trainer, resume=resume, figures=figures)


def _train(trainer: Trainer, *, resume: bool, figures: bool) -> TrainResult:
    """train()'s body, under out_dir's lock: pick up the checkpoint, set out_dir up, run the loop, finish."""
    out = trainer.config.out_dir
    checkpoint = os.path.join(out, CHECKPOINT) if out else None
    if out:
        _check_holds_a_run_or_nothing(out)  # under the lock, before anything in out_dir is removed or written
    if resume:
        _resume_from(trainer, out, checkpoint)
    paths = _prepare_out_dir(trainer, figures) if out else {}
    _run_loop(trainer, paths, checkpoint)
    return _finish(trainer, paths, checkpoint, figures)


def _resume_from(trainer: Trainer, out: Optional[str], checkpoint: Optional[str]) -> None:
    """Load out_dir's checkpoint into the trainer; a directory without one starts from step 0, unless it holds a
    finished run (which a fresh start would replace)."""
    if not out:
        raise ValueError("resume=True needs out_dir")
    if os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint)
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError) as e:  # e.g. written on another device, or other shapes
            raise ValueError(f"checkpoint {checkpoint!r} does not fit this run ({type(e).__name__}: {e})") from e
        if trainer.step_count > trainer.config.steps:
            raise ValueError(f"the checkpoint in {out!r} is at step {trainer.step_count}, past steps="
                             f"{trainer.config.steps}: resume with steps >= {trainer.step_count}")
    elif os.path.exists(os.path.join(out, "summary.json")):
        # a finished run without a checkpoint (checkpoint_every=0): starting again would replace it
        raise ValueError(f"resume=True: {out!r} holds a finished run but no {CHECKPOINT} to continue from "
                         "(checkpoint_every=0?); run without resume to replace it, or use another out_dir")


def _prepare_out_dir(trainer: Trainer, figures: bool) -> dict:
    """Remove what an earlier run left that this one would not overwrite, write config.json and the history so
    far; the paths of the config and metrics files."""
    config, out = trainer.config, trainer.config.out_dir
    stale = []
    if trainer.step_count == 0:
        # a fresh run replaces whatever run out_dir held: its checkpoint and results would otherwise sit beside
        # this run's config until this run overwrote them, and a resume after a kill would find them
        stale = [os.path.join(out, name) for name in (CHECKPOINT, "summary.json")]
    if trainer.step_count == 0 or (not figures and trainer.step_count < config.steps):
        # figures of an earlier step would sit beside the new summary (a finished run resumed keeps its own)
        stale += [os.path.join(out, "figures", name) for name in FIGURES]
    for path in stale:
        if os.path.isdir(path):  # before anything is removed
            raise ValueError(f"{path!r} is a directory, where the run writes a file; move it away")
    for path in stale:
        if os.path.exists(path):
            os.remove(path)
    for folder in (out, os.path.join(out, "figures")):  # what a kill left mid-write (checkpoint, figures)
        if os.path.isdir(folder):
            remove_temporaries(folder)
    paths = dict(config=os.path.join(out, "config.json"), metrics=os.path.join(out, "metrics.jsonl"))
    write_json(paths["config"], config.to_dict())
    _write_metrics(paths["metrics"], trainer.history)  # from the checkpoint's history: no duplicate lines
    return paths


def _run_loop(trainer: Trainer, paths: dict, checkpoint: Optional[str]) -> None:
    """Step to config.steps (or until a callback stops the run), evaluating and checkpointing on schedule."""
    config = trainer.config
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=trainer.step_count, desc=f"P={config.p}", unit="step",
                   dynamic_ncols=True)
    try:
        if trainer.step_count == 0 and not trainer.history:
            _log(trainer.evaluate(with_geometry=True), paths, bar)
        while trainer.step_count < config.steps and not trainer.should_stop:
            before = trainer.step_count
            trainer.step()
            if bar is not None:
                bar.update(trainer.step_count - before)
            due_eval = (trainer.step_count % config.eval_every == 0 or trainer.step_count == config.steps
                        or trainer.step_count % config.geometry_every == 0)  # a geometry record is an evaluation
            if due_eval:
                _log(trainer.evaluate(), paths, bar)  # raises TrainingDiverged on NaN/Inf; callbacks may stop the run
            due_checkpoint = checkpoint and config.checkpoint_every and (
                trainer.step_count % config.checkpoint_every == 0 or trainer.step_count == config.steps
                or trainer.should_stop)
            if due_checkpoint:
                trainer.check_finite()  # a diverged state never overwrites the last good checkpoint
                trainer.save_checkpoint(checkpoint)
                paths["checkpoint"] = checkpoint
    finally:
        if bar is not None:
            bar.close()


def _finish(trainer: Trainer, paths: dict, checkpoint: Optional[str], figures: bool) -> TrainResult:
    """The final record with its geometry, the summary (and summary.json, figures) of the run."""
    config, out = trainer.config, trainer.config.out_dir
    # a resume with steps = the checkpoint's step ends where the last record may be older, or lack the
    # geometry that a run's final record has: evaluate, or measure the geometry, where the model is
    if not trainer.history or trainer.history[-1]["step"] != trainer.step_count:
        _log(trainer.evaluate(with_geometry=True), paths, None)
    elif "rho2_W" not in trainer.history[-1]:
        trainer.add_geometry(trainer.history[-1])
        if "metrics" in paths:
            _write_metrics(paths["metrics"], trainer.history)
    if checkpoint and config.checkpoint_every and trainer.step_count == 0:  # steps=0: the loop saved nothing
        trainer.save_checkpoint(checkpoint)
        paths["checkpoint"] = checkpoint
    elif checkpoint and not config.checkpoint_every and os.path.exists(checkpoint):
        # resumed with checkpoint_every=0: the checkpoint it resumed from would sit beside this summary, and a
        # second --resume would silently train again from its step; it is brought to the end instead
        trainer.save_checkpoint(checkpoint)
        paths["checkpoint"] = checkpoint
    final = trainer.history[-1]
    summary = trainer.summarize_geometry()
    t_w, t_e = geometry.layer_order([r for r in trainer.history if "rho2_W" in r])
    result = TrainResult(config=config, final=final, geometry=summary, history=list(trainer.history), t_W=t_w,
                         t_E=t_e, settle_W=settling_step(trainer.history, "rho2_W"),
                         settle_E=settling_step(trainer.history, "rho2_E"), paths=paths,
                         seconds=trainer.seconds, stopped_early=trainer.step_count < config.steps, trainer=trainer)
    if out:
        paths["summary"] = os.path.join(out, "summary.json")
        write_json(paths["summary"], dict(final=final, geometry=summary.to_dict(), t_W=t_w, t_E=t_e,
                                          settle_W=result.settle_W, settle_E=result.settle_E,
                                          seconds=result.seconds, steps=trainer.step_count,
                                          stopped_early=result.stopped_early))
        if figures:
            paths["figures"] = _figures(trainer, os.path.join(out, "figures"))
    return result


SETTLE_TOLERANCE = 0.05
"""A layer has settled from the first step where its rho2 stays within this of its end value."""


def settling_step(history: list, key: str, tolerance: float = SETTLE_TOLERANCE) -> Optional[int]:
    """The first evaluated step from which ``key`` (e.g. rho2_W) stays within ``tolerance`` of its
    final value; None when only the last record is within it (still moving when the run ended) or
    there is none.  Where rho2 never reaches the 0.9 of t_W / t_E (several frequencies), this still
    says which layer found its layout first."""
    series = sorted((r["step"], r[key]) for r in history if r.get(key) is not None and math.isfinite(r[key]))
    if len(series) < 2:
        return None
    final = series[-1][1]
    settled = None
    for step, value in reversed(series[:-1]):
        if abs(value - final) > tolerance:
            break
        settled = step
    return settled


def _write_metrics(path: str, history: list) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in history)
    write_atomic(path, lambda f: f.write(lines.encode()))


def _append_line(path: str, line: str) -> None:
    """Append one whole line, or nothing: a write cut short (disk full, Ctrl-C) is cut back off."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = memoryview(line.encode())
        try:
            while data:
                data = data[os.write(fd, data):]
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _log(record: dict, paths: dict, bar) -> None:
    if "metrics" in paths:
        _append_line(paths["metrics"], json.dumps(record) + "\n")
    if bar is not None:
        shown = dict(loss=f"{record['train_loss']:.3g}", train=f"{record['train_acc']:.3f}",
                     test=f"{record['test_acc']:.3f}")
        if "rho2_W" in record:
            shown.update(rho2_W=f"{record['rho2_W']:.2f}", rho2_E=f"{record['rho2_E']:.2f}")
        shown["it/s"] = f"{record['steps_per_s']:.0f}"
        bar.set_postfix(shown, refresh=False)


def first_layer(step_w: Optional[int], step_e: Optional[int]) -> Optional[str]:
    """"W", "E" or "same": which layer got there first, a None step (never, or still moving at the end)
    counting as last; None when neither did."""
    if step_w is None and step_e is None:
        return None
    w, e = (math.inf if s is None else s for s in (step_w, step_e))
    return "W" if w < e else "E" if w > e else "same"


def _settling_text(settle_w, settle_e) -> str:
    """Where rho2 settled in each layer, and which first (a layer still moving at the end settles last)."""
    def at(step):
        return f"at step {step}" if step is not None else "not yet (still moving at the end)"

    text = f"rho2 settles (within {SETTLE_TOLERANCE:g} of its end value) for W {at(settle_w)}, for E {at(settle_e)}"
    first = first_layer(settle_w, settle_e)
    return text + ("" if first is None else " (together)" if first == "same" else f" ({first} first)")


def report(result: TrainResult) -> str:
    """A few lines saying what the run found."""
    f, g = result.final, result.geometry
    lines = [
        f"P={result.config.p}  steps={f['step']}  {result.seconds:.1f} s",
        f"accuracy: train {f['train_acc']:.4f}  test {f['test_acc']:.4f}   loss: train {f['train_loss']:.3g}  "
        f"test {f['test_loss']:.3g}",
    ]
    if g is not None:
        lines += [
            f"geometry: W {g.verdict}, E {g.verdict_E}",
            f"  W: rho2 {g.rho2_W:.3f}, dominant frequency {g.omega_W}, {g.freq_count_W} frequencies hold "
            f"{g.mass:.0%} of the power, top {list(g.top_freqs_W)}",
            f"  E: rho2 {g.rho2_E:.3f}, dominant frequency {g.omega_E}, {g.freq_count_E} frequencies hold "
            f"{g.mass:.0%} of the power, top {list(g.top_freqs_E)}",
            f"  shared dominant frequency: {'yes' if g.shared_omega else 'no'}; frequency overlap "
            f"{g.freq_overlap:.2f}" + (f"; locking {g.locking:.3f}" if g.locking is not None else ""),
        ]
    lines.append(f"layer order: rho2 >= 0.9 first at t_W={result.t_W}, t_E={result.t_E}; "
                 + _settling_text(result.settle_W, result.settle_E))
    narrow = [name for name, width in (("W", g.d if g is not None else None), ("E", result.config.d))
              if width is not None and width <= 2]
    if narrow:
        layers = " and ".join(narrow)
        lines.append(f"note: {layers} {'have' if len(narrow) > 1 else 'has'} at most 2 columns, so rho2 of {layers} is "
                     f"1 by construction (0 if all zero): t and settling of {layers} and the layer order say "
                     "nothing; a verdict there rests on the one frequency and the roundness")
    if f["train_acc"] <= chance_threshold(result.config.p):
        # such runs can pass rho2 >= 0.9 while their weights decay toward zero: say what that is worth
        lines.append("note: train accuracy is at chance, so nothing was learned: the geometry above (and t_W, t_E) "
                     "describes noise or weights decaying to zero (a sweep calls that 'collapsed' or "
                     "'unlearned'), not a learned solution; try a smaller weight decay or a longer warm-up")
    if result.paths.get("figures"):
        lines.append(f"figures: {os.path.dirname(next(iter(result.paths['figures'].values())))}")
    return "\n".join(lines)


__all__ = ["TrainConfig", "TrainResult", "Trainer", "TrainingDiverged", "train", "validate", "report",
           "load_checkpoint"]
