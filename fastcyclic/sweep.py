"""``fastcyclic sweep``: many training runs over a grid of P, weight decay λ, seeds and other settings, and
where in that grid W and E end rank-2 cyclic (λ_crit) or collapse to zero (λ₀).

    fastcyclic sweep --p 31,61,97 --weight-decay log:1e-3:1e-1:7 --seeds 3 --steps 1500 --out DIR \\
        --set d=64 --set hidden=256 --set lr=3e-3 --set init_scale=1 --set train_fraction=0.4
    fastcyclic sweep --out DIR                   resume DIR's sweep (finished runs are skipped)
    fastcyclic sweep --out DIR --analyze-only    redo the tables and figures from what DIR holds

Grid syntax: --p 31,61,127 | primes:LO:HI:N (N primes spread evenly in log P) | primes:LO:HI (all) |
log:LO:HI:N (rounded integers); --weight-decay 1e-3,1e-2 | log:LO:HI:N (λ > 0: the analysis is in log λ);
--seeds 3 (0, 1, 2) | 0,5,7 | 4:8 (4 … 7); --set KEY=VALUE fixes any TrainConfig field, --vary KEY=V1,V2 makes
it a grid axis (betas: --set betas=0.9,0.98, --vary betas=0.9:0.98,0.9:0.999).  Fields not set take
TrainConfig's defaults, whose width-2 embedding is cyclic by construction: for the weight-decay law give the
model room, as in the example (the reproduce presets' model).

The sweep directory:
    sweep.json        the grid: its blocks and every run's id, series and config (a rerun must match it)
    runs/<id>.json    one per finished run, written atomically: status ok (final accuracies, geometry summary,
                      t_W, t_E, settling steps, parameter norms, the evaluation history) or failed (the error)
    sessions.jsonl    one line per invocation: runs done, wall time, runs per hour
    runs.csv          every finished run, one row each, with its phase (below)
    fits.json         per series and P: λ_crit, λ₀ and λ_crit_fit with bootstrap intervals, λ·K; log-log fits
                      against K
    figures/          phase_diagram.png, lambda_k.png, fractions.png

runs.csv columns (one row per finished run; a failed run fills only the first eight, seconds, error, device and its
config):
    id, block, series   the run's id, its block, and its series (the block and its --vary values)
    status, phase       "ok" or "failed"; the phase below
    p, weight_decay, seed
    train_acc, test_acc, train_loss, test_loss      at the last evaluation
    verdict_W, verdict_E        fastcyclic.geometry's verdict of W and of E
    rho2_W, rho2_E              share of the centred energy in the top-2 plane (1: rank 2)
    axis_ratio_W, axis_ratio_E  σ₂/σ₁ of that plane (1: a circle, 0: a line)
    omega_W, omega_E, shared_omega    the dominant Fourier frequency of each, and whether they agree
    freq_count_W, freq_count_E  frequencies holding 90 % of the power (1: one circle)
    top_freqs_W, top_freqs_E    those frequencies, space-separated; freq_overlap = |F_W ∩ F_E| / |F_W ∪ F_E|
    locking, locking_init       share of E's centred energy in W's top-2 plane at the end and at the first
                                evaluation (empty where W and E are not in one space)
    t_W, t_E                    first evaluation step with ρ₂ ≥ 0.9 (empty: never)
    settle_W, settle_E          first evaluation from which ρ₂ stays within 0.05 of its end value (empty:
                                still moving at the end)
    norm_W, norm_E, norm_params, norm_params_init, norm_ratio   Frobenius norms at the end, of all parameters
                                at step 0, and norm_params / norm_params_init (collapse: ≤ 0.1)
    steps_done, seconds, error  steps trained, wall time, the error of a failed run
    device                      what it ran on ("auto" resolved; a failed run: the device it was given)
    then every other TrainConfig field of the run
fits.json: {"level", "thresholds", "series": {name: {"runs", "failed", "phases", "per_p", "fit_lambda_crit",
"fit_lambda_crit_fit", "fit_lambda_0"}}, "throughput", "written"}.  Each per_p entry holds p, K, runs, a
"table" per λ (phase counts, median frequency counts, ρ₂ and accuracies) and, for each of lambda_crit,
lambda_crit_fit and lambda_0: status ("crossing", "below-grid", "none", "no-data"), value, text, bracket,
crossings (upward ones), ci and ci_times_K (bootstrap), boot_share (share of resamples with a crossing),
times_K, and the lambdas, fractions and counts it was computed from, with n_seeds.  Each fit holds status, n,
ps, slope, intercept, r2, slope_ci_ols (t), slope_ci (bootstrap) with boot_share, slope_range_grid, and
"excluded": the P values without a crossing and why.

Exit status: 0 when every run of the grid finished and none failed; 1 when a run failed or was not started
(--max-minutes) or the outputs were not written; 2 for bad input; 130 when interrupted (fastcyclic reproduce alike).

A killed sweep loses only the runs in flight: a run counts as finished once its JSON exists, so a rerun skips
finished runs (failed ones too, unless --retry-failed) and redoes the rest.  A run still training after
--run-minutes is stopped at its next evaluation and recorded as failed.

Phase of a run (``phase_of``), the first rule that holds:
    failed          the run raised (its error is recorded)
    collapsed       train accuracy at chance (≤ max(2/P, 0.01)) and the parameter norm fell to ≤ 0.1 of its
                    initial value: weight decay sent the weights to zero.  Never counted as cyclic.
    unlearned       train accuracy at chance with the weights intact (too short, or λ too small to matter)
    cyclic          W and E both "cyclic" (one frequency holds 90 % of the power, on a circle: ρ₂ ≥ 0.9 and
                    σ₂/σ₁ ≥ 0.5) at the same ω
    partly-cyclic   one of W, E cyclic
    otherwise       W's geometry verdict: multi-frequency, etf-like or unstructured

Estimators, per series (a block and its --vary values) and P, with runs grouped by λ:
    f(λ) = share of the finished runs at λ with phase "cyclic" (collapsed and unlearned runs count as not cyclic)
    λ_crit = the first λ, going up, where f rises through 1/2 to a majority: between grid points λ_i < λ_{i+1}
             with f_i ≤ 1/2 < f_{i+1}, log λ_crit = log λ_i + (1/2 − f_i)/(f_{i+1} − f_i) · (log λ_{i+1} − log λ_i)
             (where f rises through 1/2 more than once, the first is taken and the count is reported)
    λ₀     = the same for the share of "collapsed" runs (the collapse edge)
    λ_crit_fit = the same for the share of runs that end cyclic and fit the train set (train accuracy ≥
             FIT_ACC), among the runs that left chance (unlearned ones are left out): the paper's cyclic solution
             solves the task, and a cyclic run at low accuracy, or a λ where runs only start to learn, is not that
             edge (``fastcyclic reproduce`` judges claim 4 on it)
A P whose share is above 1/2 already at the smallest λ reports "below-grid"; one that never rises above 1/2
reports "none": not numbers, and left out of the fits (fastcyclic.reproduce names them beside its verdict).
Intervals: 2.5–97.5 % percentiles over bootstrap resamples of the seeds (the same resampled seeds at every λ;
resamples without a crossing are left out, their share is reported); with fewer than 10 seeds they cover the edge
well under 95 % of the time, and are labelled so (bootstrap_label).
Each crossing also reports its bracket, the two grid points around it: the seeds cannot say where inside it the edge
lies (with all seeds agreeing, the bootstrap interval has zero width).
Fits: least squares of log λ against log K (K = P) over the P with a crossing; slope, intercept, R², a t interval
(3+ points), a bootstrap interval (the fit repeated on each bootstrap replicate with a crossing at every one of
those P; a single seed gives no bootstrap) and the grid range (the least and
greatest slope with every crossing anywhere in its bracket).  λ_crit = Θ(1/K) means slope −1, λ_crit·K constant.
"""
from __future__ import annotations

import argparse
import contextlib
import concurrent.futures as cf
import csv
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from fastcyclic import files

# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

FORMAT = 1
SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"
LOCK_FILE = "sweep.lock"
ANALYSIS_LOCK_FILE = "analysis.lock"  # held while runs.csv, fits.json and the figures are rewritten
SESSIONS_FILE = "sessions.jsonl"

# set per run by the sweep itself, or by their own flags
GRID_FIELDS = ("p", "weight_decay", "seed")
FORBIDDEN_FIELDS = ("out_dir", "progress", "device", "checkpoint_every")
# how a run executes, not what it computes: left out of a run's identity, so a sweep started on CPU may be
# resumed on a GPU (numbers then differ by rounding only)
EXECUTION_FIELDS = ("device", "backend", "fused_update", "cuda_graph", "deterministic", "progress", "out_dir",
                    "checkpoint_every")

CHANCE_FACTOR = 2.0
"""Train accuracy ≤ max(CHANCE_FACTOR/P, CHANCE_FLOOR) is "at chance" (chance is 1/P)."""
CHANCE_FLOOR = 0.01
"""Keeps the chance threshold above the sampling noise of the evaluation sets at large P."""
COLLAPSE_NORM_RATIO = 0.1
"""Final ‖θ‖ ≤ this × initial ‖θ‖ (with accuracy at chance) is a collapse.  Measured at P = 61 (1500 steps, warm-up
500): collapsed runs end at 3e-4 of the initial norm; runs that fit the data end at 0.25-0.30."""
LEVEL = 0.5
PHASES = ("cyclic", "partly-cyclic", "multi-frequency", "etf-like", "unstructured", "unlearned", "collapsed",
          "failed")
FIT_ACC = 0.9
"""Train accuracy from which a run "fits the train set"."""


def _in_phase(phase: str):
    return lambda row: int(row["phase"] == phase)


def _cyclic_and_fitting(row: dict) -> Optional[int]:
    if row["phase"] == "unlearned":
        return None  # it never left chance: whether it would have ended cyclic is unknown
    return int(row["phase"] == "cyclic" and row["train_acc"] is not None and row["train_acc"] >= FIT_ACC)


# name -> the indicator of a finished run: 1 (in the phase), 0, or None (left out); see the module docstring
ESTIMATORS = {"lambda_crit": _in_phase("cyclic"), "lambda_0": _in_phase("collapsed"),
              "lambda_crit_fit": _cyclic_and_fitting}
EDGE_LABELS = {"lambda_crit": "λ_crit", "lambda_crit_fit": "λ_crit (fitting)", "lambda_0": "λ₀"}
# two-sided 95 % t quantiles for 1 … 30 degrees of freedom (least-squares intervals without scipy)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


# --------------------------------------------------------------------------------------------
# grid values: P, λ, seeds, --set / --vary
# --------------------------------------------------------------------------------------------


MAX_PRIME_BOUND = 10 ** 7  # primes:LO:HI takes HI up to this (a 10 MB sieve, under a second)
MAX_GRID_VALUES = 1000  # values one grid option (--p, --weight-decay, --seeds) may list


def primes_between(lo: int, hi: int) -> list[int]:
    """All primes p with lo ≤ p ≤ hi (a sieve; hi up to a few million)."""
    if hi < 2 or hi < lo:
        return []
    sieve = bytearray([1]) * (hi + 1)
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(hi) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(range(i * i, hi + 1, i)))
    return [i for i in range(max(lo, 2), hi + 1) if sieve[i]]


def log_primes(lo: int, hi: int, n: int) -> list[int]:
    """n distinct primes in [lo, hi], each the prime nearest (in log P) to one of n log-spaced points."""
    pool = primes_between(lo, hi)
    if len(pool) < n:
        raise ValueError(f"primes:{lo}:{hi}:{n} asks for {n} primes, but [{lo}, {hi}] holds only {len(pool)}")
    logs = np.log(np.array(pool, dtype=float))
    targets = np.linspace(math.log(lo), math.log(hi), n) if n > 1 else np.array([math.log(lo)])
    chosen = []
    for t in targets:
        order = np.argsort(np.abs(logs - t), kind="stable")
        chosen.append(next(pool[i] for i in order if pool[i] not in chosen))  # nearest not yet taken
    return sorted(chosen)


def _number(text: str, kind: type, what: str):
    try:
        value = float(text) if kind is float else int(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not {'a number' if kind is float else 'an integer'}") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not finite")
    return value


def _no_duplicates(values: list, what: str) -> list:
    seen = set()
    dup = [v for v in values if v in seen or seen.add(v)]
    if dup:
        raise ValueError(f"{what} lists {dup[0]!r} more than once")
    return values


def _log_range(text: str, what: str) -> tuple[float, float, int]:
    parts = text.split(":")
    if len(parts) != 4:
        raise ValueError(f"{what}: {text!r} should look like log:LO:HI:N")
    lo, hi = _number(parts[1], float, what), _number(parts[2], float, what)
    n = _number(parts[3], int, what)
    if lo <= 0 or hi <= 0:
        raise ValueError(f"{what}: a log grid needs positive bounds, got {text!r}")
    if n < 1 or (n == 1 and lo != hi) or (n > 1 and lo >= hi):
        raise ValueError(f"{what}: {text!r} needs N >= 2 and LO < HI (or N = 1 and LO = HI)")
    _check_grid_size(n, text, what)
    return lo, hi, n


def _check_grid_size(n: int, text: str, what: str) -> None:
    """Refused before a list of n values is made: a typo (an extra zero or ten) must not fill the memory."""
    if n > MAX_GRID_VALUES:
        raise ValueError(f"{what}: {text!r} asks for {n:,} values; at most {MAX_GRID_VALUES:,} per option")


def parse_ps(text: str) -> tuple[int, ...]:
    """P values: "31,61,127", "primes:LO:HI[:N]" or "log:LO:HI:N"; every P ≥ 3, no repeats."""
    text = text.strip()
    what = "--p"
    if text.startswith("primes:"):
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"--p: {text!r} should look like primes:LO:HI or primes:LO:HI:N")
        lo, hi = _number(parts[1], int, what), _number(parts[2], int, what)
        if lo > hi:
            raise ValueError(f"--p: {text!r} has LO > HI")
        if hi > MAX_PRIME_BOUND:  # the sieve holds a byte per integer up to HI
            raise ValueError(f"--p: {text!r} has HI above {MAX_PRIME_BOUND:,}; list larger P values explicitly")
        count = _number(parts[3], int, what) if len(parts) == 4 else None
        if count is not None and count < 1:
            raise ValueError(f"--p: {text!r} asks for {count} primes; N must be >= 1")
        if count is not None:
            _check_grid_size(count, text, what)
            if lo < 2:  # (math.log would fail with "math domain error")
                raise ValueError(f"--p: {text!r}: LO must be >= 2 with a count N (the N points are log-spaced "
                                 "from LO to HI)")
        values = log_primes(lo, hi, count) if count is not None else primes_between(lo, hi)
        if len(values) > MAX_GRID_VALUES:
            raise ValueError(f"--p: {text!r} holds {len(values)} primes; give a count (primes:LO:HI:N)")
    elif text.startswith("log:"):
        lo, hi, n = _log_range(text, what)
        values = [int(round(v)) for v in np.geomspace(lo, hi, n)]
        _no_duplicates(values, f"--p {text!r} (after rounding to integers)")
    else:
        values = [_number(t, int, what) for t in text.split(",") if t.strip()]
    if not values:
        raise ValueError(f"--p: {text!r} gives no P value")
    bad = [p for p in values if p < 3]
    if bad:
        raise ValueError(f"--p: every P must be >= 3 (a circle needs 3 classes), got {bad[0]}")
    return tuple(_no_duplicates(values, "--p"))


def parse_weight_decays(text: str) -> tuple[float, ...]:
    """λ values: "1e-3,1e-2" or "log:LO:HI:N" (rounded to 4 significant digits); every λ > 0, no repeats."""
    text = text.strip()
    what = "--weight-decay"
    if text.startswith("log:"):
        lo, hi, n = _log_range(text, what)
        values = [float(f"{v:.4g}") for v in np.geomspace(lo, hi, n)]
        _no_duplicates(values, f"--weight-decay {text!r} (after rounding to 4 significant digits)")
    else:
        texts = [t.strip() for t in text.split(",") if t.strip()]
        values = [_number(t, float, what) for t in texts]
        bad = [t for t, v in zip(texts, values) if v <= 0]
        if bad:  # the text as typed: 1e-400 is 0 in floating point, and "got 0" would puzzle
            mantissa = bad[0].lower().split("e")[0]
            underflow = float(bad[0]) == 0 and any(c in "123456789" for c in mantissa)
            raise ValueError(f"--weight-decay: every λ must be > 0 (λ_crit is interpolated in log λ), got "
                             f"{bad[0]}" + (" (0 in floating point)" if underflow else ""))
    if not values:
        raise ValueError(f"--weight-decay: {text!r} gives no value")
    return tuple(_no_duplicates(values, "--weight-decay"))


def parse_seeds(text: str) -> tuple[int, ...]:
    """Seeds: "3" (0, 1, 2), "0,5,7" or "4:8" (4 … 7); every seed ≥ 0, no repeats."""
    text = str(text).strip()
    what = "--seeds"
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"--seeds: {text!r} should look like START:STOP")
        start, stop = (_number(t, int, what) for t in parts)
        _check_grid_size(stop - start, text, what)
        values = list(range(start, stop))
    elif "," in text:
        values = [_number(t, int, what) for t in text.split(",") if t.strip()]
    else:
        count = _number(text, int, what)
        _check_grid_size(count, text, what)
        values = list(range(count))
    if not values:
        raise ValueError(f"--seeds: {text!r} gives no seed")
    if min(values) < 0:
        raise ValueError(f"--seeds: seeds must be >= 0, got {min(values)}")
    return tuple(_no_duplicates(values, "--seeds"))


def _config_types() -> dict:
    from fastcyclic.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def parse_value(key: str, text: str):
    """text as the TrainConfig field key wants it (bool, int, float, str, Optional[int], betas)."""
    types = _config_types()
    if key not in types:
        raise ValueError(f"unknown TrainConfig field {key!r}; known: {', '.join(types)}")
    hint, text = types[key], str(text).strip()
    what = f"{key}={text}"
    if key == "betas":
        parts = text.replace(":", ",").split(",")
        if len(parts) != 2:
            raise ValueError(f"{what}: betas needs two numbers (0.9,0.98)")
        return tuple(_number(t, float, what) for t in parts)
    if hint is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{what}: expected true or false")
    if hint == typing.Optional[int]:
        return None if text.lower() in ("none", "full") else _number(text, int, what)
    if hint is int:
        return _number(text, int, what)
    if hint is float:
        return _number(text, float, what)
    return None if text.lower() == "none" and hint == typing.Optional[str] else text


def _check_key(key: str, flag: str) -> None:
    if key in GRID_FIELDS:
        own = {"p": "--p", "weight_decay": "--weight-decay", "seed": "--seeds"}[key]
        raise ValueError(f"{flag} {key}: it is a grid axis of its own; use {own}")
    if key in FORBIDDEN_FIELDS:
        raise ValueError(f"{flag} {key}: the sweep sets it" + (" (use --device)" if key == "device" else ""))


def parse_assignments(items: list[str], *, vary: bool) -> dict:
    """--set KEY=VALUE (a value) or --vary KEY=V1,V2 (a tuple of values) items as a dict; repeats are errors."""
    flag = "--vary" if vary else "--set"
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE")
        key, text = (s.strip() for s in item.split("=", 1))
        key = key.replace("-", "_")
        _check_key(key, flag)
        if key in out:
            raise ValueError(f"{flag} gives {key} twice")
        if vary:
            texts = [t for t in text.split(",") if t.strip()]
            if not texts:
                raise ValueError(f"--vary {item!r}: no values")
            out[key] = tuple(_no_duplicates([parse_value(key, t) for t in texts], f"--vary {key}"))
        else:
            out[key] = parse_value(key, text)
    return out


# --------------------------------------------------------------------------------------------
# the grid: blocks → runs
# --------------------------------------------------------------------------------------------


@dataclass
class Block:
    """A Cartesian grid: every P × λ × seed × combination of the --vary values, with fixed settings."""
    ps: tuple
    weight_decays: tuple
    seeds: tuple
    fixed: dict = field(default_factory=dict)   # TrainConfig field → value
    vary: dict = field(default_factory=dict)    # TrainConfig field → tuple of values
    name: str = "sweep"

    def to_dict(self) -> dict:
        return dict(name=self.name, ps=list(self.ps), weight_decays=list(self.weight_decays), seeds=list(self.seeds),
                    fixed=_jsonable(self.fixed), vary={k: [_jsonable(v) for v in vs] for k, vs in self.vary.items()})


@dataclass
class RunSpec:
    """One run of the grid: a stable id, its block and series, and the TrainConfig fields (device left "auto")."""
    id: str
    block: str
    series: str
    config: dict

    def to_dict(self) -> dict:
        return dict(id=self.id, block=self.block, series=self.series, config=self.config)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ":".join(_fmt(v) for v in value)
    return str(value)


def identity(config: dict) -> dict:
    """The fields that decide what a run computes (all but EXECUTION_FIELDS), JSON-ready."""
    return {k: _jsonable(v) for k, v in sorted(config.items()) if k not in EXECUTION_FIELDS}


def run_id(config: dict) -> str:
    """Readable and unique: p97-wd0.01-s0-<8 hex digits of a hash of the run's identity>."""
    digest = hashlib.sha1(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()[:8]
    return f"p{config['p']}-wd{config['weight_decay']:.4g}-s{config['seed']}-{digest}"


def expand(blocks: list[Block], device: str = "cpu") -> list[RunSpec]:
    """Every run of the blocks, each config validated to run on `device`; ValueError for an empty or inconsistent
    grid."""
    from fastcyclic.training import TrainConfig, validate

    if not blocks:
        raise ValueError("the grid is empty: give --p and --weight-decay")
    _no_duplicates([b.name for b in blocks], "the sweep's block names")
    types = _config_types()
    specs, seen, short_ramps, train_counts = [], {}, {}, {}
    for block in blocks:
        _check_block(block, types)
        for series, assigned in _series(block):
            for p, wd, seed in itertools.product(block.ps, block.weight_decays, block.seeds):
                values = {**block.fixed, **assigned, "p": p, "weight_decay": float(wd), "seed": seed,
                          "device": "auto", "progress": False, "out_dir": None, "checkpoint_every": 0}
                config = TrainConfig(**values)
                try:
                    validate(dataclasses.replace(config, device=device))
                except ValueError as e:
                    raise ValueError(f"block {block.name!r}, P={p}, λ={wd:g}, seed {seed}: {e}") from None
                _check_batch(config, train_counts)
                if 0 < config.steps < config.weight_decay_warmup:
                    short_ramps.setdefault(block.name, (config.steps, config.weight_decay_warmup))
                d = config.to_dict()
                rid = run_id(d)
                if rid in seen:
                    raise ValueError(f"the grid holds the same run twice (P={p}, λ={wd:g}, seed {seed}: in block "
                                     f"{seen[rid]!r} and {block.name!r})")
                seen[rid] = block.name
                specs.append(RunSpec(rid, block.name, series, d))
    for name, (steps, warmup) in short_ramps.items():
        warnings.warn(f"block {name!r}: weight_decay_warmup={warmup} is longer than steps={steps}, so λ ramps to "
                      f"only {steps / warmup:.0%} of its value and the λ axis (λ_crit, λ₀) is nominal; set "
                      f"weight_decay_warmup (--set weight_decay_warmup=N)", stacklevel=2)
    return specs


def _check_block(block: Block, types: dict) -> None:
    """ValueError for a block with an empty or invalid axis, or --set / --vary fields that cannot be."""
    for axis, values in (("P", block.ps), ("weight decay", block.weight_decays), ("seeds", block.seeds)):
        if not values:
            raise ValueError(f"block {block.name!r}: no {axis} values: the grid is empty")
    if min(block.ps) < 3:
        raise ValueError(f"block {block.name!r}: every P must be >= 3, got {min(block.ps)}")
    if min(block.weight_decays) <= 0:
        raise ValueError(f"block {block.name!r}: every λ must be > 0 (the analysis is in log λ)")
    if min(block.seeds) < 0:
        raise ValueError(f"block {block.name!r}: seeds must be >= 0")
    for key in list(block.fixed) + list(block.vary):
        if key not in types:
            raise ValueError(f"block {block.name!r}: unknown TrainConfig field {key!r}")
        _check_key(key, "--set/--vary")
    both = set(block.fixed) & set(block.vary)
    if both:
        raise ValueError(f"block {block.name!r}: {sorted(both)[0]} is both fixed (--set) and varied (--vary)")
    for key, values in block.vary.items():
        if not values:
            raise ValueError(f"block {block.name!r}: --vary {key} has no values")
        if key in EXECUTION_FIELDS and len(values) > 1:  # (it was refused as "the same run twice", naming neither)
            raise ValueError(f"block {block.name!r}: --vary {key}: how a run executes, not what it computes (runs "
                             f"differing only in {key} are the same run); give one value with --set {key}=VALUE")
        _no_duplicates(list(values), f"--vary {key}")


def _series(block: Block):
    """(series name, {field: value}) for every combination of the block's --vary values."""
    keys = sorted(block.vary)
    names = set()
    for combo in itertools.product(*(block.vary[k] for k in keys)):
        assigned = dict(zip(keys, combo))
        series = block.name + (" [" + ", ".join(f"{k}={_fmt(v)}" for k, v in assigned.items()) + "]"
                               if assigned else "")
        if series in names:  # the analysis groups runs by series: two would merge into one
            raise ValueError(f"block {block.name!r}: two --vary combinations print alike as {series!r} (6 "
                             "significant digits); make the values differ more")
        names.add(series)
        yield series, assigned


def _check_batch(config, train_counts: dict) -> None:
    """ValueError for a batch size the run could not draw: full batch beyond the enumerated split, more than the
    P² pairs, (near the split's size, which depends on the seed: counted once per key in train_counts) more
    than the train pairs, or in the hashed split what ModularAddition.check_batch_size refuses."""
    from fastcyclic.data import ENUMERATE_LIMIT as limit  # full batch needs the enumerated split

    p, seed = config.p, config.seed
    if config.batch_size is None and p * p > limit:
        raise ValueError(f"P={p}: full-batch training (batch_size=none) needs P² ≤ {limit}; give --set batch_size=N")
    if config.batch_size is not None and config.batch_size > p * p:
        raise ValueError(f"P={p}: batch_size={config.batch_size} exceeds the {p * p} pairs")
    if config.batch_size is not None and p * p > limit:  # the hashed split: what the trainer would refuse
        from fastcyclic.data import MAX_BATCH_DRAW, candidates_for, hashed_split

        fraction, n_train = hashed_split(p, config.train_fraction)
        if config.batch_size > n_train:
            raise ValueError(f"P={p}: batch_size={config.batch_size} exceeds the about {n_train} "
                             f"train pairs (train_fraction={config.train_fraction:g})")
        if candidates_for(config.batch_size, fraction) > MAX_BATCH_DRAW:
            raise ValueError(f"P={p}: batch_size={config.batch_size} at train_fraction={config.train_fraction:g} "
                             f"draws more than {MAX_BATCH_DRAW:.3g} candidate pairs per batch")
    if config.batch_size is not None and p * p <= limit and config.batch_size > 0.9 * config.train_fraction * p * p:
        key = (p, config.train_fraction, seed)
        if key not in train_counts:
            from fastcyclic.data import ModularAddition

            train_counts[key] = ModularAddition(p, config.train_fraction, seed, "cpu").n_train
        if config.batch_size > train_counts[key]:
            raise ValueError(f"P={p}, seed {seed}: batch_size={config.batch_size} exceeds the "
                             f"{train_counts[key]} train pairs (train_fraction={config.train_fraction:g})")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def write_json(path: str, obj) -> None:
    files.write_json(path, obj, indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _run_path(out: str, rid: str) -> str:
    return os.path.join(out, RUNS_DIR, rid + ".json")


def load_sweep(out: str) -> Optional[dict]:
    """DIR's sweep.json, None if DIR has none; ValueError if it is not a sweep file."""
    path = os.path.join(out, SWEEP_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); refusing to touch {out}") from e
    if not isinstance(state, dict) or state.get("kind") != "fastcyclic-sweep" or "runs" not in state:
        raise ValueError(f"{path} is not a fastcyclic sweep file; refusing to touch {out}")
    return state


def stored_specs(state: dict) -> list[RunSpec]:
    return [RunSpec(r["id"], r["block"], r["series"], r["config"]) for r in state["runs"]]


def _field_values(specs: list[RunSpec]) -> dict:
    """config field → the set of values (as JSON text) the runs give it."""
    values: dict = {}
    for spec in specs:
        for key, value in identity(spec.config).items():
            values.setdefault(key, set()).add(json.dumps(value))
    return values


def _describe_difference(old: list[RunSpec], new: list[RunSpec]) -> str:
    a, b = {s.id: s for s in old}, {s.id: s for s in new}
    only_old, only_new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    parts = [f"{len(old)} runs there, {len(new)} here"]
    there, here = _field_values(old), _field_values(new)

    def listed(values):
        return ", ".join(sorted(values, key=lambda v: (len(v), v))[:4]) + (" …" if len(values) > 4 else "") or "-"

    for key in sorted(set(there) | set(here)):
        if there.get(key) != here.get(key):
            parts.append(f"{key}: {listed(there.get(key, ()))} there, {listed(here.get(key, ()))} here")
    if only_old:
        parts.append(f"only there: {', '.join(only_old[:3])}" + (" …" if len(only_old) > 3 else ""))
    if only_new:
        parts.append(f"only here: {', '.join(only_new[:3])}" + (" …" if len(only_new) > 3 else ""))
    moved = sorted(i for i in set(a) & set(b) if a[i].series != b[i].series)
    if moved:  # the same runs grouped otherwise: a --vary of one value, or another block name
        parts.append(f"{len(moved)} runs in another series (e.g. {moved[0]}: {a[moved[0]].series!r} there, "
                     f"{b[moved[0]].series!r} here)")
    return "; ".join(parts)


def is_unstarted(out: str) -> bool:
    """DIR is absent, empty, or holds only the lock file of a start that wrote nothing (sweep.json failed)."""
    return not os.path.isdir(out) or not set(os.listdir(out)) - {LOCK_FILE}


def plan(out: str, blocks: Optional[list[Block]], device: str = "cpu") -> tuple[list[RunSpec], Optional[dict]]:
    """The runs of DIR's sweep and, for a new sweep, the sweep.json to write.  blocks=None resumes what DIR holds.
    Every refusal (empty or inconsistent grid, DIR holding another grid or other files, a new grid's run that
    cannot run on `device`); nothing is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    state = load_sweep(out) if os.path.isdir(out) else None
    if blocks is None:
        if state is None:
            raise ValueError(f"{out!r} holds no sweep to resume; give a grid (--p and --weight-decay)")
        return stored_specs(state), None
    specs = expand(blocks, device)
    if state is not None:
        old = stored_specs(state)
        if {s.id: s.series for s in old} != {s.id: s.series for s in specs}:
            raise ValueError(f"{out!r} holds a sweep with a different grid ({_describe_difference(old, specs)}); "
                             "use another --out (rerunning the command that made it resumes it)")
        return specs, None  # the same runs (ids hash what a run computes); this invocation's execution settings
    if not is_unstarted(out):
        raise ValueError(f"{out!r} is not empty and holds no sweep; refusing to write into it")
    return specs, dict(kind="fastcyclic-sweep", format=FORMAT, created=_now(), blocks=[b.to_dict() for b in blocks],
                       runs=[s.to_dict() for s in specs])


def _check_runs_on(specs: list[RunSpec], device: str) -> None:
    """The runs to do, on this invocation's device (a grid with backend=triton made on a GPU and resumed on CPU):
    refused before any starts, not recorded as failed run after run."""
    from fastcyclic.training import TrainConfig, validate

    for spec in specs:
        try:
            validate(TrainConfig(**{**spec.config, "device": device}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"run {spec.id} cannot run on {device}: {e}") from None


def _make_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be created: {e}") from e


def prepare(out: str, blocks: Optional[list[Block]], device: str = "cpu") -> list[RunSpec]:
    """plan(), then for a new sweep DIR/sweep.json and DIR/runs/ (the JSON first: a DIR holding only runs/ would
    be refused as foreign).  run_sweep calls it holding DIR's lock, so that of two sweeps started together in a
    new DIR, one writes its grid and the other is refused."""
    specs, new_state = plan(out, blocks, device)
    if new_state is not None:
        _make_dir(out)
        write_json(os.path.join(out, SWEEP_FILE), new_state)
        os.makedirs(os.path.join(out, RUNS_DIR), exist_ok=True)
    return specs


def say(*parts) -> None:
    """print, flushed: progress lines must reach a log file while the sweep runs."""
    print(*parts, flush=True)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def load_records(out: str, specs: Optional[list[RunSpec]] = None, *, warn: Callable = say) -> dict:
    """{run id: record} for every finished run of DIR (runs/<id>.json).  An unreadable file counts as not finished
    (the run is redone); files of runs outside the grid are ignored."""
    if specs is None:
        state = load_sweep(out)
        specs = stored_specs(state) if state else []
    records = {}
    for spec in specs:
        path = _run_path(out, spec.id)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                record = json.load(f)
            if record.get("id") != spec.id or record.get("status") not in ("ok", "failed"):
                raise ValueError("not a finished run record")
        except (OSError, ValueError) as e:
            warn(f"warning: {path} is unreadable ({e}); the run will be redone")
            continue
        record["series"], record["block"] = spec.series, spec.block  # the sweep file is the authority
        records[spec.id] = record
    return records


# --------------------------------------------------------------------------------------------
# one run (in a worker process, or in this one)
# --------------------------------------------------------------------------------------------


def _norms(model) -> dict:
    """Frobenius norms of W, E and all parameters together (what weight decay shrinks)."""
    total = 0.0
    for p in model.parameters():
        total += float(p.detach().double().square().sum())
    return dict(norm_W=float(model.W.double().norm()), norm_E=float(model.E.double().norm()),
                norm_params=math.sqrt(total))


class RunTimeLimit(RuntimeError):
    """A run went past the sweep's per-run time limit (``--run-minutes``)."""


def execute(spec: dict, out: str, device: str, run_seconds: Optional[float] = None) -> dict:
    """Train one run and write runs/<id>.json atomically (status ok or failed); return a short summary.
    run_seconds: stop a run that is still training after this long (checked at every evaluation) and
    record it as failed.  KeyboardInterrupt is not recorded: an interrupted run is redone on resume."""
    import torch

    from fastcyclic.training import TrainConfig, train

    started = time.perf_counter()
    record = dict(id=spec["id"], block=spec["block"], series=spec["series"], config=spec["config"],
                  started=_now(), host=socket.gethostname(), pid=os.getpid(), torch=torch.__version__,
                  device=device)  # what it was asked to run on: a failed run's row said "auto"
    try:
        config = TrainConfig(**dict(spec["config"], device=device, progress=False, out_dir=None, checkpoint_every=0))

        def add_norms(trainer, rec):  # every evaluation, so the history shows the norm decaying
            rec.update(_norms(trainer.model))
            seconds = time.perf_counter() - started
            if run_seconds is not None and seconds > run_seconds and rec["step"] < trainer.config.steps:
                raise RunTimeLimit(f"still training at step {rec['step']} after {seconds:.3g} s, over the per-run "
                                   f"limit of {run_seconds:.3g} s (--run-minutes)")  # (a 0.3 s limit read "0 s")

        result = train(config, callbacks=[add_norms], figures=False)
        history = result.history
        init, final = history[0].get("norm_params"), result.final.get("norm_params")
        record.update(
            status="ok", device=str(result.trainer.device), final=result.final,
            geometry=result.geometry.to_dict() if result.geometry is not None else None,
            t_W=result.t_W, t_E=result.t_E, settle_W=result.settle_W, settle_E=result.settle_E,
            norms=dict(_norms(result.trainer.model), norm_params_init=init,
                       norm_ratio=final / init if init and final is not None else None),
            history=history)
    except (Exception, SystemExit) as e:  # a crashed run is data: recorded, and the sweep goes on
        # (SystemExit from a run's code passed through the worker and ended the sweep, at every rerun)
        record.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
    record["seconds"] = time.perf_counter() - started
    record["finished"] = _now()
    write_json(_run_path(out, spec["id"]), record)
    return _brief(record)


def _brief(record: dict) -> dict:
    out = dict(id=record["id"], status=record["status"], seconds=record.get("seconds", 0.0),
               series=record.get("series"))
    if record["status"] == "ok":
        row = flatten(record)
        out.update(phase=row["phase"], train_acc=row["train_acc"], test_acc=row["test_acc"],
                   freq_count_W=row["freq_count_W"], freq_count_E=row["freq_count_E"])
    else:
        out["error"] = record.get("error")
    return out


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent process has gone
    os._exit(1)


def _init_worker(threads: int, formatwarning: Optional[OneLineWarnings]) -> None:
    import torch

    if formatwarning is not None:  # the sweep command's
        warnings.formatwarning = formatwarning

    # a sweep killed outright (SIGKILL, OOM killer) cannot stop its workers: each one ends itself when the sweep
    # process goes, instead of training on unseen and writing a record that a rerun's worker writes again
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="exit-with-sweep", daemon=True).start()
    torch.set_num_threads(threads)  # run_sweep's choice: cores / workers on CPU (processes use the cores), 2 on CUDA
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """--device checked (a CUDA index this machine lacks too), "auto" resolved."""
    from fastcyclic.training import check_device

    try:
        resolved = check_device(device)
    except ValueError as e:
        raise ValueError(f"--device: {e}") from None
    return resolved.type if device == "auto" else device


def _cost(spec: RunSpec) -> float:
    """Rough relative cost, for longest-first scheduling within a block."""
    c = spec.config
    pairs = c["batch_size"] or c["train_fraction"] * c["p"] ** 2
    width = c.get("hidden") or c["d"]
    return c["steps"] * pairs * (width + c["p"])


@dataclass
class SweepOutcome:
    specs: list
    records: dict            # run id → record (every finished run, this session's and earlier ones)
    ran: list                # ids run in this session, in order of completion
    skipped: int             # finished before this session
    remaining: list          # ids not run (the time budget ran out, or interrupted)
    seconds: float
    runs_per_hour: Optional[float]
    workers: int
    device: str


def _lock(out: str):
    """An exclusive flock on DIR/sweep.lock: two sweeps must not run the same directory at once."""
    return files.exclusive_lock(os.path.join(out, LOCK_FILE), f"another sweep is running in {out!r}")


def sweep_running(out: str) -> bool:
    """Another process holds DIR's sweep lock (a sweep is running there now)."""
    try:
        with _lock(out):
            return False
    except ValueError:
        return True


def analysis_lock(out: str):
    """Waits for, then holds, DIR/analysis.lock: of two processes rewriting runs.csv, fits.json and the figures (a
    sweep that ended, --analyze-only, fastcyclic reproduce), the later one reads the records after the earlier one
    has written, so a table of fewer runs never replaces one of more.  (A file, as sweep.lock: NFS's flock takes an
    exclusive lock only on a file open for writing, which a directory cannot be.)"""
    return files.exclusive_lock(os.path.join(out, ANALYSIS_LOCK_FILE), "", wait=True, on_wait=lambda: say(
        f"waiting for another process writing the analysis of {out!r} (a sweep that ended, --analyze-only, "
        "fastcyclic reproduce) to finish; Ctrl-C stops waiting (rerun this command later to write it)"))


def reread_records(out: str, records: dict, remaining: list) -> tuple[dict, list]:
    """records with those read again from DIR, and the runs of `remaining` still not finished: under analysis_lock,
    another process may have finished runs since records were read (without this its runs would be called lost,
    or the table written would hold fewer runs than the one it replaces)."""
    records = {**records, **load_records(out, warn=lambda *_: None)}
    return records, [run_id for run_id in remaining if run_id not in records]


def run_sweep(out: str, blocks: Optional[list[Block]] = None, *, workers: Optional[int] = None,
              threads: Optional[int] = None, device: str = "auto", deadline_s: Optional[float] = None,
              run_seconds: Optional[float] = None, retry_failed: bool = False, log: Callable = say) -> SweepOutcome:
    """Run every unfinished run of the sweep in DIR (see the module docstring).

    workers: processes running at once (spawned, each with its own CUDA context on a GPU); 0 runs in this
    process, one run after another.  Default: the CPU cores on CPU (one thread each), 1 on CUDA (sequential: the
    one choice known to be safe without measuring how several processes share the GPU).  deadline_s: start no
    run after this many seconds (the running ones finish).  run_seconds: a run still training after this long is
    stopped at its next evaluation and recorded as failed."""
    started, started_at = time.perf_counter(), _now()
    device = resolve_device(device)
    plan(out, blocks, device)  # the refusals, before DIR (and its lock file) is made
    _make_dir(out)
    with _lock(out):
        specs = prepare(out, blocks, device)  # again under the lock: another sweep may have started here since
        # records a kill left mid-write: only a sweep holding the lock writes runs/ (the analysis files and
        # figures are written under analysis_lock, also by --analyze-only, so their temporaries are left alone)
        runs = os.path.join(out, RUNS_DIR)
        if os.path.isdir(runs):
            files.remove_temporaries(runs)
        records = load_records(out, specs, warn=log)
        finished = {i for i, r in records.items() if r["status"] == "ok" or (r["status"] == "failed"
                                                                             and not retry_failed)}
        order = {b: i for i, b in enumerate(dict.fromkeys(s.block for s in specs))}
        pending = sorted((s for s in specs if s.id not in finished), key=lambda s: (order[s.block], -_cost(s)))
        _check_runs_on(pending, device)
        if workers is None:
            workers = cpu_count() if device == "cpu" else 1
        workers = max(0, min(workers, len(pending))) if pending else 0
        if threads is None:
            threads = max(1, cpu_count() // max(workers, 1)) if device == "cpu" else 2
        log(f"sweep {out}: {len(specs)} runs, {len(specs) - len(pending)} finished before, {len(pending)} to run "
            f"on {device} with {workers or 'no'} worker processes" + ("" if workers else " (in this process)")
            + f", {threads} thread{'s' if threads != 1 else ''} each")
        progress = _Progress(len(specs), len(specs) - len(pending), len(pending), log)
        ran: list = []
        remaining = [s.id for s in pending]
        try:
            if workers == 0:
                import torch

                before = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    for spec in pending:
                        if deadline_s is not None and time.perf_counter() - started > deadline_s:
                            break
                        brief = execute(spec.to_dict(), out, device, run_seconds)
                        ran.append(brief["id"])
                        remaining.remove(brief["id"])
                        progress.done(brief)
                finally:
                    torch.set_num_threads(before)
            else:
                _run_pool(pending, out, device, workers, threads, deadline_s, run_seconds, started, ran, remaining,
                          progress)
        finally:
            seconds = time.perf_counter() - started
            rate = len(ran) / (seconds / 3600) if ran and seconds > 0 else None
            if pending:  # a session that had nothing to run would only dilute runs per hour
                session = dict(started=started_at, seconds=seconds, ran=len(ran), remaining=len(remaining),
                               workers=workers, threads=threads, device=device, runs_per_hour=rate,
                               host=socket.gethostname())
                with open(os.path.join(out, SESSIONS_FILE), "a") as f:
                    f.write(json.dumps(session) + "\n")
        records = load_records(out, specs, warn=log)
    if remaining:
        log(f"{len(remaining)} runs not started (time budget); rerun the same command to finish them")
    log(f"{len(ran)} runs in {seconds:.0f} s" + (f": {rate:.0f} runs per hour" if rate else ""))
    return SweepOutcome(specs, records, ran, len(specs) - len(pending), remaining, seconds, rate, workers, device)


def _run_pool(pending, out, device, workers, threads, deadline_s, run_seconds, started, ran, remaining,
              progress) -> None:
    """Keep `workers` runs in flight.  A worker process that dies (out of memory, a segfault) breaks the pool,
    and the pool cannot say which run it was running: every run in flight goes back to the front of the queue as
    a suspect, and a fresh pool takes over.  A suspect then runs alone, so a second death is its own: it is
    recorded as failed, while the runs that were only in flight beside it finish normally."""
    queue = list(pending)
    deaths: dict = {}
    returned = recorded = 0  # runs workers brought back; runs recorded as killing their worker
    context = multiprocessing.get_context("spawn")  # fork would copy this process's threads and CUDA state
    formatwarning = warnings.formatwarning if isinstance(warnings.formatwarning, OneLineWarnings) else None

    def time_left() -> bool:
        return deadline_s is None or time.perf_counter() - started <= deadline_s

    while queue and time_left():
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                      initargs=(threads, formatwarning))
        in_flight: dict = {}
        submitted: dict = {}  # future -> when it was handed to the pool (runs start at once: at most `workers`)
        broken = False
        try:
            while True:
                while queue and len(in_flight) < workers and not broken and time_left():
                    if any(spec.id in deaths for spec in in_flight.values()) or (queue[0].id in deaths and in_flight):
                        break  # a suspect runs alone
                    spec = queue.pop(0)
                    try:
                        future = pool.submit(execute, spec.to_dict(), out, device, run_seconds)
                        in_flight[future], submitted[future] = spec, time.perf_counter()
                    except cf.process.BrokenProcessPool:
                        queue.insert(0, spec)
                        broken = True
                if not in_flight:
                    break
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    spec, handed = in_flight.pop(future), submitted.pop(future)  # (a Future keeps its result)
                    try:
                        brief = future.result()
                        returned += 1
                    except cf.process.BrokenProcessPool:
                        broken = True
                        deaths[spec.id] = deaths.get(spec.id, 0) + 1
                        if deaths[spec.id] < 2:
                            queue.insert(0, spec)
                            continue
                        brief = _record_death(spec, out, device, time.perf_counter() - handed)
                        recorded += 1
                        if recorded == 3 and returned == 0:  # the sweep goes on, but say what it may mean
                            progress.log("3 runs have killed their worker process and none has come back yet; if every "
                                         "run does, the workers cannot run at all (a script without an `if __name__ "
                                         "== '__main__':` guard? see multiprocessing's spawn start method): fix that "
                                         "and rerun with --retry-failed")
                    ran.append(brief["id"])
                    remaining.remove(brief["id"])
                    progress.done(brief)
        except BaseException:
            # interrupted (Ctrl-C) or failing: stop the workers instead of waiting for their runs (a rerun redoes
            # them).  A graceful shutdown could wait forever when the interrupt landed inside the executor's own
            # bookkeeping: a worker then never receives its stop signal.
            for worker in multiprocessing.active_children():
                worker.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True, cancel_futures=True)
        if not broken:
            break


def _record_death(spec: RunSpec, out: str, device: str, seconds: float) -> dict:
    """seconds: how long the run's second (lone) attempt lasted before its worker died (a fresh worker's start
    included)."""
    record = dict(id=spec.id, block=spec.block, series=spec.series, config=spec.config, status="failed",
                  error="the worker process died twice while running this run (out of memory? a crash in native "
                        "code?)", seconds=seconds, finished=_now(), device=device)
    write_json(_run_path(out, spec.id), record)
    return _brief(record)


class _Progress:
    def __init__(self, total: int, before: int, todo: int, log: Callable):
        self.total, self.count, self.todo, self.log = total, before, todo, log
        self.started, self.done_here = time.perf_counter(), 0

    def done(self, brief: dict) -> None:
        self.count += 1
        self.done_here += 1
        elapsed = time.perf_counter() - self.started
        rate = self.done_here / elapsed * 3600 if elapsed > 0 else 0.0
        left = self.todo - self.done_here
        eta = f", ~{left / rate * 60:.0f} min left" if rate and left else ""
        if brief["status"] == "ok":
            what = (f"{brief['phase']:<15} train {brief['train_acc']:.3f} test {brief['test_acc']:.3f} "
                    f"freqs W/E {brief['freq_count_W']}/{brief['freq_count_E']}")
        else:
            what = f"FAILED: {brief.get('error')}"
        width = len(str(self.total))
        self.log(f"[{self.count:>{width}}/{self.total}] {brief['id']} ({brief['series']}): {what}  "
                 f"{brief['seconds']:.1f} s  ({rate:.0f} runs/h{eta})")


# --------------------------------------------------------------------------------------------
# analysis: phases, rows, estimators, fits
# --------------------------------------------------------------------------------------------


def chance_threshold(p: int) -> float:
    return max(CHANCE_FACTOR / p, CHANCE_FLOOR)


def phase_of(row: dict) -> str:
    """The phase of a flattened run (module docstring)."""
    if row.get("status") != "ok":
        return "failed"
    at_chance = row["train_acc"] is not None and row["train_acc"] <= chance_threshold(row["p"])
    ratio = row.get("norm_ratio")
    if at_chance and ratio is not None and ratio <= COLLAPSE_NORM_RATIO:
        return "collapsed"
    if at_chance:
        return "unlearned"
    w, e = row.get("verdict_W"), row.get("verdict_E")
    if w == "cyclic" and e == "cyclic" and row.get("shared_omega"):
        return "cyclic"
    if "cyclic" in (w, e):
        return "partly-cyclic"
    return w or "unstructured"


# the CSV's columns, in order (config fields other than p, weight_decay and seed follow these)
RESULT_COLUMNS = (
    "id", "block", "series", "status", "phase", "p", "weight_decay", "seed", "train_acc", "test_acc", "train_loss",
    "test_loss", "verdict_W", "verdict_E", "rho2_W", "rho2_E", "axis_ratio_W", "axis_ratio_E", "omega_W", "omega_E",
    "shared_omega", "freq_count_W", "freq_count_E", "top_freqs_W", "top_freqs_E", "freq_overlap", "locking",
    "locking_init", "t_W", "t_E", "settle_W", "settle_E", "norm_W", "norm_E", "norm_params", "norm_params_init",
    "norm_ratio", "steps_done", "seconds", "error")


def flatten(record: dict) -> dict:
    """One record as a flat row: the RESULT_COLUMNS, then the run's config fields."""
    config = record.get("config", {})
    row = {k: None for k in RESULT_COLUMNS}
    row.update(id=record["id"], block=record.get("block"), series=record.get("series"), status=record["status"],
               p=config.get("p"), weight_decay=config.get("weight_decay"), seed=config.get("seed"),
               seconds=record.get("seconds"), error=record.get("error"))
    if record["status"] == "ok":
        final, g, norms = record.get("final") or {}, record.get("geometry") or {}, record.get("norms") or {}
        row.update({k: final.get(k) for k in ("train_acc", "test_acc", "train_loss", "test_loss")})
        row["steps_done"] = final.get("step")
        row.update(verdict_W=g.get("verdict"), verdict_E=g.get("verdict_E"))
        for k in ("rho2_W", "rho2_E", "axis_ratio_W", "axis_ratio_E", "omega_W", "omega_E", "shared_omega",
                  "freq_count_W", "freq_count_E", "freq_overlap", "locking"):
            row[k] = g.get(k)
        for k in ("top_freqs_W", "top_freqs_E"):
            row[k] = " ".join(str(f) for f in g.get(k) or ())
        row.update({k: record.get(k) for k in ("t_W", "t_E", "settle_W", "settle_E")})
        row.update({k: norms.get(k) for k in ("norm_W", "norm_E", "norm_params", "norm_params_init",
                                              "norm_ratio")})
        history = record.get("history") or []
        row["locking_init"] = next((h.get("locking") for h in history if h.get("locking") is not None), None)
    row["phase"] = phase_of(row)
    if record.get("device"):
        row["device"] = record["device"]  # what it ran on ("auto" resolved)
    for k, v in config.items():
        if k not in row and k not in ("p", "weight_decay", "seed"):
            row[k] = _fmt(v) if isinstance(v, (list, tuple)) else v
    return row


def rows_of(records) -> list[dict]:
    items = records.values() if isinstance(records, dict) else records
    return [flatten(r) for r in items]


@dataclass
class Crossing:
    status: str                 # "crossing", "below-grid" (> 1/2 at the smallest λ), "none", "no-data"
    value: Optional[float] = None
    bracket: Optional[tuple] = None  # the grid points (λ_i, λ_{i+1}) around a crossing: where it may truly lie
    crossings: int = 0          # upward crossings in the grid (more than one: the share goes up, down, up)

    def describe(self, lambdas=()) -> str:
        if self.status == "crossing":
            return f"{self.value:.3g}" + (f" (the first of {self.crossings} upward crossings)"
                                          if self.crossings > 1 else "")
        if self.status == "below-grid":
            return f"< {min(lambdas):g}" if len(lambdas) else "below the grid"
        return "no crossing" if self.status == "none" else "no data"


def first_crossing(lambdas, fractions, level: float = LEVEL) -> Crossing:
    """The first λ, going up, where the fraction rises from at most `level` to above it (a majority, as "most
    runs" in fastcyclic.reproduce), interpolated in log λ; NaN fractions (λ without finished runs) are skipped."""
    points = sorted((float(lam), float(f)) for lam, f in zip(lambdas, fractions) if f is not None and f == f)
    if not points:
        return Crossing("no-data")
    if points[0][1] > level:
        return Crossing("below-grid")
    ups = [(l0, f0, l1, f1) for (l0, f0), (l1, f1) in zip(points, points[1:]) if f0 <= level < f1]
    if not ups:
        return Crossing("none")
    l0, f0, l1, f1 = ups[0]
    t = (level - f0) / (f1 - f0)
    return Crossing("crossing", math.exp(math.log(l0) + t * (math.log(l1) - math.log(l0))), (l0, l1), len(ups))


@dataclass
class EdgeEstimate:
    """λ_crit or λ₀ at one P: the point estimate, its bootstrap interval and what it was computed from."""
    crossing: Crossing
    lambdas: list               # the λ grid (with finished runs)
    fractions: list             # share of runs in the phase, per λ
    counts: list                # finished runs per λ
    n_seeds: int
    ci: Optional[tuple] = None  # (low, high) percentiles of the bootstrap crossings
    boot_share: float = 0.0     # share of bootstrap resamples with a crossing
    boot: Optional[np.ndarray] = None  # per replicate: the crossing, NaN where none (for the slope bootstrap)

    def to_dict(self, p: int) -> dict:
        c = self.crossing
        ci = self.ci if c.status == "crossing" else None  # no interval around a value that is not there
        return dict(status=c.status, value=c.value, text=c.describe(self.lambdas),
                    bracket=list(c.bracket) if c.bracket else None, crossings=c.crossings,
                    ci=list(ci) if ci else None, boot_share=self.boot_share,
                    times_K=c.value * p if c.value is not None else None,
                    ci_times_K=[v * p for v in ci] if ci else None,
                    lambdas=self.lambdas, fractions=self.fractions, counts=self.counts, n_seeds=self.n_seeds)


def estimate_edge(indicator: dict, *, n_boot: int = 1000, rng: Optional[np.random.Generator] = None,
                  level: float = LEVEL) -> EdgeEstimate:
    """indicator: {λ: {seed: 0 or 1}} (1 = the run is in the phase).  The first crossing of `level` by the share
    of 1s, and its bootstrap over seeds (rows of seeds resampled with replacement, the same rows at every λ)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    lambdas = sorted(indicator)
    seeds = sorted({s for by_seed in indicator.values() for s in by_seed})
    M = np.full((len(seeds), len(lambdas)), np.nan)
    for j, lam in enumerate(lambdas):
        for s, v in indicator[lam].items():
            M[seeds.index(s), j] = float(v)
    counts = [int(np.isfinite(M[:, j]).sum()) for j in range(len(lambdas))]
    with np.errstate(all="ignore"), _quiet_nanmean():
        fractions = np.nanmean(M, axis=0) if len(seeds) else np.full(len(lambdas), np.nan)
    crossing = first_crossing(lambdas, fractions, level)
    est = EdgeEstimate(crossing, lambdas, [None if f != f else float(f) for f in fractions], counts, len(seeds))
    if n_boot <= 0 or len(seeds) < 2:  # one seed: nothing to resample, no interval
        return est
    idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    with np.errstate(all="ignore"), _quiet_nanmean():
        boot_fr = np.nanmean(M[idx], axis=1)  # (n_boot, λ)
    boot = np.array([first_crossing(lambdas, row, level).value or np.nan for row in boot_fr])
    finite = boot[np.isfinite(boot)]
    est.boot, est.boot_share = boot, len(finite) / n_boot
    if len(finite):
        est.ci = tuple(float(v) for v in np.exp(np.percentile(np.log(finite), [2.5, 97.5])))
    return est


@contextlib.contextmanager
def _quiet_nanmean():
    """nanmean of an all-NaN column is NaN (a λ without runs in a resample); numpy warns about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def loglog_fit(K, values) -> dict:
    """Least squares log(value) = slope · log K + intercept; with a t interval for the slope (3+ points)."""
    K, values = np.asarray(K, dtype=float), np.asarray(values, dtype=float)
    n = len(K)
    if not (np.all(np.isfinite(K) & (K > 0)) and np.all(np.isfinite(values) & (values > 0))):
        return dict(status="not-positive", n=n)  # no logarithm (the estimates passed in are always > 0)
    x, y = np.log(K), np.log(values)
    if n < 2 or np.ptp(x) == 0:
        return dict(status="too-few-points", n=n)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - ym) ** 2).sum())
    # no spread in the values (every crossing at one grid point): R² is undefined, not a perfect fit
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else None
    fit = dict(status="ok", n=n, slope=slope, intercept=intercept, r2=r2, slope_ci_ols=None)
    if n >= 3:
        se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx)
        t = _t975(n - 2)
        fit["slope_ci_ols"] = [slope - t * se, slope + t * se]
    return fit


def fit_edges(ps: list, estimates: list) -> dict:
    """The log-log fit of the estimates with a crossing against K = P, plus a bootstrap interval for the slope:
    the fit redone on every bootstrap replicate that has a crossing at every one of those P (so every replicate
    is the same estimator)."""
    chosen = [(p, e) for p, e in zip(ps, estimates) if e.crossing.status == "crossing"]
    fit = loglog_fit([p for p, _ in chosen], [e.crossing.value for _, e in chosen])
    fit["ps"] = [p for p, _ in chosen]
    fit["excluded"] = {str(p): e.crossing.describe(e.lambdas) for p, e in zip(ps, estimates)
                       if e.crossing.status != "crossing"}
    if fit["status"] == "ok":
        # the OLS slope is linear in the log λ values, Σ w_i log λ_i: its extremes over the brackets are exact
        x = np.log([p for p, _ in chosen])
        w = (x - x.mean()) / ((x - x.mean()) ** 2).sum()
        lo = np.log([e.crossing.bracket[0] for _, e in chosen])
        hi = np.log([e.crossing.bracket[1] for _, e in chosen])
        fit["slope_range_grid"] = [float(np.minimum(w * lo, w * hi).sum()), float(np.maximum(w * lo, w * hi).sum())]
    boots = [e.boot for _, e in chosen if e.boot is not None]
    if fit["status"] != "ok" or len(boots) != len(chosen):
        return fit
    B = np.stack(boots)  # (P, replicate)
    K = np.array([p for p, _ in chosen], dtype=float)
    # a replicate is the same estimator on resampled seeds: a crossing at every P of the fit, not a fit over a subset
    slopes = [loglog_fit(K, B[:, b])["slope"] for b in range(B.shape[1]) if np.isfinite(B[:, b]).all()]
    fit["boot_share"] = len(slopes) / B.shape[1]
    fit["slope_ci"] = [float(v) for v in np.percentile(slopes, [2.5, 97.5])] if slopes else None
    return fit


def analyse(records, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per series: per P the λ grid, the phase shares, λ_crit and λ₀ (EdgeEstimate.to_dict); fits against K."""
    rows = rows_of(records)
    rng = np.random.default_rng(seed)
    result = dict(level=LEVEL, thresholds=dict(chance_factor=CHANCE_FACTOR, chance_floor=CHANCE_FLOOR,
                                               collapse_norm_ratio=COLLAPSE_NORM_RATIO, fit_acc=FIT_ACC), series={})
    for series in dict.fromkeys(r["series"] for r in rows):
        mine = [r for r in rows if r["series"] == series]
        ok = [r for r in mine if r["status"] == "ok"]
        entry = dict(runs=len(mine), failed=len(mine) - len(ok),
                     phases={ph: sum(r["phase"] == ph for r in mine) for ph in PHASES if any(
                         r["phase"] == ph for r in mine)}, per_p=[])
        ps = sorted({r["p"] for r in mine if r["p"] is not None})  # a P whose runs all failed: "no data"
        estimates = {name: [] for name in ESTIMATORS}
        for p in ps:
            at_p = [r for r in ok if r["p"] == p]
            per_p = dict(p=p, K=p, runs=len(at_p))
            for name, in_phase in ESTIMATORS.items():
                indicator: dict = {}
                for r in at_p:
                    value = in_phase(r)
                    if value is not None:
                        indicator.setdefault(r["weight_decay"], {})[r["seed"]] = value
                est = estimate_edge(indicator, n_boot=n_boot, rng=rng)
                estimates[name].append(est)
                per_p[name] = est.to_dict(p)
            per_p["table"] = _cell_table(at_p)
            entry["per_p"].append(per_p)
        for name in ESTIMATORS:
            entry["fit_" + name] = fit_edges(ps, estimates[name])
        result["series"][series] = entry
    return result


def _cell_table(rows: list) -> list:
    """Per λ at one P: counts per phase, median frequency counts and accuracies of the non-collapsed runs."""
    table = []
    for lam in sorted({r["weight_decay"] for r in rows}):
        cell = [r for r in rows if r["weight_decay"] == lam]
        alive = [r for r in cell if r["phase"] not in ("collapsed", "unlearned")]

        def median(key, among=alive):
            values = [r[key] for r in among if r[key] is not None]
            return float(np.median(values)) if values else None

        table.append(dict(weight_decay=lam, runs=len(cell),
                          phases={ph: sum(r["phase"] == ph for r in cell) for ph in PHASES
                                  if any(r["phase"] == ph for r in cell)},
                          freq_count_W=median("freq_count_W"), freq_count_E=median("freq_count_E"),
                          rho2_W=median("rho2_W"), train_acc=median("train_acc", cell),
                          test_acc=median("test_acc", cell)))
    return table


# --------------------------------------------------------------------------------------------
# outputs: CSV, fits.json, figures
# --------------------------------------------------------------------------------------------


def write_csv(path: str, rows: list) -> str:
    columns = list(RESULT_COLUMNS)
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in sorted(rows, key=lambda r: (str(r["series"]), r["p"] or 0, r["weight_decay"] or 0, r["seed"] or 0)):
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    files.write_bytes(path, buf.getvalue().encode())
    return path


def throughput(out: str) -> dict:
    """Runs per hour from sessions.jsonl: the last session's and over all sessions."""
    path = os.path.join(out, SESSIONS_FILE)
    sessions = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    sessions.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a kill
    ran = sum(s.get("ran", 0) for s in sessions)
    seconds = sum(s.get("seconds", 0.0) for s in sessions)
    last = sessions[-1] if sessions else {}
    return dict(sessions=len(sessions), runs=ran, seconds=seconds,
                runs_per_hour=ran / (seconds / 3600) if ran and seconds else None,
                last_runs_per_hour=last.get("runs_per_hour"), last_workers=last.get("workers"),
                last_device=last.get("device"))


def write_outputs(out: str, records, analysis: dict, *, figures: bool = True) -> dict:
    """runs.csv, fits.json and (figures=True) the PNGs in DIR/figures; returns their paths."""
    rows = rows_of(records)
    paths = dict(csv=write_csv(os.path.join(out, "runs.csv"), rows))
    doc = dict(analysis, throughput=throughput(out), written=_now())
    paths["fits"] = os.path.join(out, "fits.json")
    write_json(paths["fits"], doc)
    if figures and rows:
        folder = os.path.join(out, "figures")
        paths["phase_diagram"] = plot_phase_diagram(rows, analysis, os.path.join(folder, "phase_diagram.png"))
        paths["lambda_k"] = plot_lambda_k(analysis, os.path.join(folder, "lambda_k.png"))
        paths["fractions"] = plot_fractions(analysis, os.path.join(folder, "fractions.png"))
    return paths


def _panels(n: int, size=(5.5, 4.2)):
    from fastcyclic.plots import new_figure

    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(ncols, nrows=nrows, size=size)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def phase_cell(cell: list) -> dict:
    """How the phase diagram draws one (P, λ) cell of rows: "failed" when no run finished, "collapsed" or
    "chance" (at chance with its weights intact) when most finished runs sit at chance or no finished run has a
    frequency count, else "alive" with the median frequency count; `failed` counts the failed runs, `cyclic` and
    `n` the cyclic and finished ones."""
    done = [r for r in cell if r["status"] == "ok"]
    at_chance = [r for r in done if r["phase"] in ("collapsed", "unlearned")]
    alive = [r["freq_count_W"] for r in done if r["phase"] not in ("collapsed", "unlearned") and r["freq_count_W"]]
    mark = dict(failed=len(cell) - len(done), n=len(done), cyclic=sum(r["phase"] == "cyclic" for r in done))
    if not done:
        return dict(mark, kind="failed")
    if len(at_chance) * 2 > len(done) or not alive:
        dead = sum(r["phase"] == "collapsed" for r in at_chance) * 2 >= len(at_chance)
        return dict(mark, kind="collapsed" if dead else "chance")
    return dict(mark, kind="alive", freq_count=float(np.median(alive)))


def plot_phase_diagram(rows: list, analysis: dict, path: str) -> str:
    """Per series: P × λ cells coloured by the median frequency count of W (runs that did not collapse), collapsed
    cells grey with ×, cells where most runs are cyclic ringed in red, cells with failed runs marked in red;
    λ_crit (▲) and λ₀ (|) on each P row."""
    from matplotlib.colors import LogNorm

    from fastcyclic.plots import save_png

    series = list(analysis["series"])
    fig, axes = _panels(len(series))
    top = max([r["freq_count_W"] for r in rows if r.get("freq_count_W")] + [2])
    norm = LogNorm(vmin=1, vmax=top)
    mappable = None
    for ax, name in zip(axes, series):
        mine = [r for r in rows if r["series"] == name and r["p"] is not None and r["weight_decay"] is not None]
        ps = sorted({r["p"] for r in mine})
        y = {p: i for i, p in enumerate(ps)}
        for p in ps:
            for lam in sorted({r["weight_decay"] for r in mine if r["p"] == p}):
                cell = phase_cell([r for r in mine if r["p"] == p and r["weight_decay"] == lam])
                if cell["kind"] == "failed":
                    ax.scatter([lam], [y[p]], s=420, marker="s", color="white", edgecolors="red")
                    ax.scatter([lam], [y[p]], s=90, marker="x", color="red")
                elif cell["kind"] in ("collapsed", "chance"):
                    ax.scatter([lam], [y[p]], s=420, marker="s", color="lightgrey", edgecolors="grey")
                    if cell["kind"] == "collapsed":
                        ax.scatter([lam], [y[p]], s=90, marker="x", color="black")
                    else:
                        ax.scatter([lam], [y[p]], s=70, marker="o", facecolors="none", edgecolors="black")
                else:
                    ringed = cell["cyclic"] * 2 > cell["n"]  # most, as claim 1 counts
                    mappable = ax.scatter([lam], [y[p]], s=420, marker="s", c=[cell["freq_count"]],
                                          cmap="viridis", norm=norm, edgecolors="red" if ringed else "none",
                                          linewidths=2.5 if ringed else 0)
                if cell["cyclic"] and len(mine) <= 400:
                    ax.annotate(f"{cell['cyclic']}/{cell['n']}", (lam, y[p]), ha="center", va="center",
                                fontsize=7, color="white")
                if cell["failed"] and cell["n"]:  # some failed beside finished ones: say how many, under the cell
                    ax.annotate(f"{cell['failed']} failed", (lam, y[p] - 0.38), ha="center", va="center",
                                fontsize=6, color="red")
        for entry in analysis["series"][name]["per_p"]:
            if entry["p"] not in y:
                continue
            for key, marker, color in (("lambda_crit", "^", "red"), ("lambda_0", "|", "black")):
                if entry[key]["status"] == "crossing":
                    ax.scatter([entry[key]["value"]], [y[entry["p"]] + 0.38], marker=marker, s=70, color=color,
                               zorder=5)
        ax.set_xscale("log")
        ax.set_yticks(range(len(ps)), [str(p) for p in ps])
        ax.set_ylim(-0.6, len(ps) - 0.2)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("P (= K classes)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, label="frequencies holding 90 % of W's power (median)", shrink=0.8)
        # plain labels at 1, 2, 5, 10, ... (a log colorbar labels only its decades: a cell's 3 could not be read)
        ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= top]
        bar.set_ticks(ticks)
        bar.set_ticklabels([str(t) for t in ticks])
        bar.minorticks_off()
    fig.suptitle("Phase diagram. Grey ×: collapsed; grey o: at chance, weights intact;\n"
                 "red ×: every run failed; red ring: most runs cyclic; ▲ λ_crit, | λ₀", fontsize=10)
    return save_png(fig, path)


def plot_lambda_k(analysis: dict, path: str) -> str:
    """Per series: λ_crit·K (any cyclic run, and cyclic runs that fit) and λ₀·K against K (log-log) with bootstrap
    intervals and the fitted power laws; a flat line is λ ∝ 1/K."""
    from fastcyclic.plots import save_png

    series = list(analysis["series"])
    fig, axes = _panels(len(series))
    for ax, name in zip(axes, series):
        entry = analysis["series"][name]
        missing = []
        for key, color, marker, label in (("lambda_crit", "tab:red", "o", "λ_crit·K"),
                                          ("lambda_crit_fit", "tab:blue", "^", "λ_crit·K, runs that fit"),
                                          ("lambda_0", "black", "s", "λ₀·K")):
            pts = [(e["p"], e[key]) for e in entry["per_p"] if e[key]["status"] == "crossing"]
            missing += [f"{EDGE_LABELS[key]} at P={e['p']}: {e[key]['text']}" for e in entry["per_p"]
                        if e[key]["status"] != "crossing"]
            if not pts:
                continue
            K = np.array([p for p, _ in pts], dtype=float)
            v = np.array([e["times_K"] for _, e in pts])
            lo = np.array([e["ci_times_K"][0] if e["ci_times_K"] else t for (_, e), t in zip(pts, v)])
            hi = np.array([e["ci_times_K"][1] if e["ci_times_K"] else t for (_, e), t in zip(pts, v)])
            fit = entry["fit_" + key]
            text = f" (slope of log λ vs log K: {fit['slope']:.2f})" if fit.get("status") == "ok" else ""
            b_lo = np.array([e["bracket"][0] * p for p, e in pts])
            b_hi = np.array([e["bracket"][1] * p for p, e in pts])
            ax.errorbar(K, v, yerr=[np.maximum(v - b_lo, 0), np.maximum(b_hi - v, 0)], fmt="none", ecolor=color,
                        alpha=0.25, elinewidth=6)
            ax.errorbar(K, v, yerr=[np.maximum(v - lo, 0), np.maximum(hi - v, 0)], fmt=marker, color=color,
                        capsize=3, label=label + text)
            if fit.get("status") == "ok":
                xs = np.geomspace(K.min(), K.max(), 50)
                ax.plot(xs, np.exp(fit["intercept"]) * xs ** (fit["slope"] + 1), "--", color=color, lw=1)
        if missing:
            ax.text(0.02, 0.02, "\n".join(missing[:6]) + ("\n…" if len(missing) > 6 else ""),
                    transform=ax.transAxes, fontsize=7, va="bottom", color="dimgrey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_ticks(ax)
        ax.set_xlabel("K (classes = P)")
        ax.set_ylabel("λ · K")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    seeds = [e[key]["n_seeds"] for entry in analysis["series"].values() for e in entry["per_p"]
             for key in ("lambda_crit", "lambda_crit_fit", "lambda_0") if e[key]["ci"]]
    fig.suptitle("λ_crit·K and λ₀·K against K (flat: λ ∝ 1/K)\nbars: "
                 + bootstrap_label(min(seeds, default=FEW_SEEDS), max(seeds, default=None)) + " (dark), grid "
                 "bracket (light)", fontsize=10)
    return save_png(fig, path)


def _plain_ticks(ax) -> None:
    """Log axes labelled 0.5, 2, 300 rather than 5×10⁻¹."""
    from matplotlib.ticker import FuncFormatter

    def some(v, _):  # minor ticks at 2, 3, 5 × 10^k only: a range inside one decade still gets labels
        lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
        return f"{v:g}" if lead in (2, 3, 5) else ""

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(some))


def plot_fractions(analysis: dict, path: str) -> str:
    """Per series and P: the share of cyclic runs (solid) and of collapsed runs (dashed) against λ, the 1/2 line
    the estimators rise through."""
    from fastcyclic.plots import save_png

    series = list(analysis["series"])
    fig, axes = _panels(len(series))
    for ax, name in zip(axes, series):
        per_p = analysis["series"][name]["per_p"]
        colors = [f"C{i % 10}" for i in range(len(per_p))]
        for entry, color in zip(per_p, colors):
            for key, style in (("lambda_crit", "-o"), ("lambda_0", "--s")):
                e = entry[key]
                pts = [(lam, f) for lam, f in zip(e["lambdas"], e["fractions"]) if f is not None]
                if pts:
                    label = f"P={entry['p']}" if key == "lambda_crit" else None
                    ax.plot([a for a, _ in pts], [b for _, b in pts], style, color=color, ms=3, lw=1.2,
                            label=label)
        ax.axhline(LEVEL, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("weight decay λ")
        ax.set_ylabel("share of runs")
        ax.set_title(name + ": cyclic (solid), collapsed (dashed)", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a series whose runs all failed draws nothing to label
            ax.legend(fontsize=7, loc="center left")
    fig.suptitle("Share of runs per phase against λ;\nλ_crit and λ₀ are where they first rise above 1/2",
                 fontsize=10)
    return save_png(fig, path)


FEW_SEEDS = 10  # below this many seeds a percentile bootstrap interval covers the edge well under 95 % of the time


def bootstrap_label(n_seeds: int, most: Optional[int] = None) -> str:
    """What an edge's interval is, from n_seeds (to `most`, where panels differ) seeds.  With few seeds it is
    narrower than a 95 % interval: simulated logistic edges with 3 seeds were inside it 45-93 % of the time, and
    2 seeds have only 3 distinct resamples."""
    label = "2.5–97.5 % bootstrap over seeds"
    counts = f"{n_seeds}-{most}" if most is not None and most != n_seeds else f"{n_seeds}"
    return label if n_seeds >= FEW_SEEDS else label + f" (from {counts} seeds: covers less than 95 %)"


def interval_text(edge: dict) -> str:
    """An edge's bootstrap interval, " [low, high]", naming the share of resamples it comes from when some had no
    crossing (the rest put the edge outside the grid: the interval alone would look tighter than it is)."""
    if not edge["ci"] or edge["status"] != "crossing":
        return ""
    share = f" from {edge['boot_share']:.0%} of resamples" if edge["boot_share"] < 1 else ""
    return f" [{edge['ci'][0]:.3g}, {edge['ci'][1]:.3g}{share}]"


def summary_text(analysis: dict) -> str:
    """A few lines per series: λ_crit, λ_crit among fitting runs and λ₀ per P, the slopes."""
    lines = []
    for name, entry in analysis["series"].items():
        phases = ", ".join(f"{k} {v}" for k, v in entry["phases"].items())
        lines.append(f"{name}: {entry['runs']} runs ({phases})")
        for e in entry["per_p"]:
            parts = []
            for key, label in EDGE_LABELS.items():
                d = e[key]
                ci = interval_text(d)
                if d["bracket"]:
                    ci += f" (grid {d['bracket'][0]:g}-{d['bracket'][1]:g})"
                kk = f", ·K = {d['times_K']:.3g}" if d["times_K"] is not None else ""
                parts.append(f"{label} {d['text']}{ci}{kk}")
            lines.append(f"  P={e['p']:<6} " + ";  ".join(parts))
        for key, label in EDGE_LABELS.items():
            fit = entry["fit_" + key]
            if fit.get("status") == "ok":
                intervals = ", ".join(f"{name} [{v[0]:.2f}, {v[1]:.2f}]" for name, v in (
                    ("bootstrap", fit.get("slope_ci")), ("t", fit.get("slope_ci_ols")),
                    ("grid range", fit.get("slope_range_grid"))) if v)
                lines.append(f"  log {label} vs log K: slope {fit['slope']:.2f}" + (f" ({intervals})" if intervals
                             else "") + f" over {fit['n']} P values")
            else:
                lines.append(f"  log {label} vs log K: no fit ({fit['n']} P value{'s' if fit['n'] != 1 else ''} "
                             "with a crossing)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_argument_group("grid (omit all of these to resume the sweep in --out)")
    grid.add_argument("--p", help="31,61,127 | primes:LO:HI[:N] | log:LO:HI:N (every P >= 3)")
    grid.add_argument("--weight-decay", help="1e-3,1e-2 | log:LO:HI:N (every λ > 0)")
    grid.add_argument("--seeds", default=None, help="N (seeds 0..N-1; default 1) | 0,5,7 | START:STOP")
    grid.add_argument("--steps", type=int, default=None, help="training steps of every run (TrainConfig's default)")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="fix a TrainConfig field for every run (repeatable), e.g. --set optimizer=sgdw")
    grid.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                      help="make a TrainConfig field a grid axis (repeatable), e.g. --vary d=16,64")
    parser.add_argument("--out", required=True, type=directory_name,
                        help="the sweep directory (created; a rerun resumes it)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once, each in its own process (default: CPU cores on CPU, 1 on CUDA; "
                             "0 = one after another in this process, where a run that crashes the process, e.g. a "
                             "segfault, ends the sweep instead of being recorded as failed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: cores/workers on CPU, 2 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:n]")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no run after this many minutes (rerun to continue)")
    parser.add_argument("--run-minutes", type=float, default=None,
                        help="stop a run still training after this many minutes (checked at every evaluation) and "
                             "record it as failed")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    parser.add_argument("--analyze-only", action="store_true", help="run nothing; redo tables and figures")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the intervals (default 1000)")
    parser.add_argument("--no-figures", dest="figures", action="store_false", help="skip the PNG figures")


def _grid_given(args: argparse.Namespace) -> bool:
    """Whether any grid flag is given."""
    given = [args.p, args.weight_decay, args.seeds, args.steps] + list(args.set) + list(args.vary)
    return any(v is not None and v != [] for v in given)


def blocks_from_args(args: argparse.Namespace) -> Optional[list[Block]]:
    """The grid the flags describe, or None when no grid flag is given (resume)."""
    if not _grid_given(args):
        return None
    if args.p is None or args.weight_decay is None:
        raise ValueError("a grid needs both --p and --weight-decay (or no grid options at all, to resume --out)")
    fixed = parse_assignments(args.set, vary=False)
    if args.steps is not None:
        if "steps" in fixed:
            raise ValueError("steps given by both --steps and --set")
        fixed["steps"] = args.steps
    vary = parse_assignments(args.vary, vary=True)
    for steps in (fixed.get("steps"),) + tuple(vary.get("steps", ())):
        if isinstance(steps, int) and steps < 1:  # (other values are TrainConfig's to refuse)
            raise ValueError(f"every run of a sweep needs steps >= 1 (a run of 0 steps measures its initialisation), "
                             f"got {steps}")
    return [Block(ps=parse_ps(args.p), weight_decays=parse_weight_decays(args.weight_decay),
                  seeds=parse_seeds(args.seeds if args.seeds is not None else "1"), fixed=fixed, vary=vary)]


def check_pool_args(args: argparse.Namespace) -> None:
    """--workers, --threads and --max-minutes (shared with `fastcyclic reproduce`): ValueError naming the value."""
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_minutes is not None and not args.max_minutes >= 0:
        raise ValueError(f"--max-minutes must be >= 0, got {args.max_minutes}")


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def directory_name(text: str) -> str:
    """--out's type: "" would mean the current directory without the emptiness check that "." gets."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a directory (use . for this one), got {text!r}")
    return text


_STANDARD_FORMATWARNING = warnings.formatwarning


class OneLineWarnings:
    """A warnings.formatwarning for a command: a warning raised by our code prints as one line, like the command's
    errors ('fastcyclic sweep: warning: ...'), not with the path, line and source that raised it; other libraries'
    warnings keep their usual form.  Picklable, so that sweep workers print theirs alike."""

    def __init__(self, command: str):
        self.command = command

    def __call__(self, message, category, filename, lineno, line=None) -> str:
        import fastcyclic
        import fastcyclic.bench
        import fastcyclic.kernels

        ours = tuple(os.path.dirname(os.path.abspath(package.__file__)) + os.sep
                     for package in (fastcyclic, fastcyclic.kernels, fastcyclic.bench))
        if os.path.abspath(filename).startswith(ours):
            return f"fastcyclic {self.command}: warning: {message}\n"
        return _STANDARD_FORMATWARNING(message, category, filename, lineno, line)


def interruptible(command: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                  hint: str = "rerun the same command to continue") -> int:
    """body(args), or exit code 130 with a message on Ctrl-C or SIGTERM (`kill`, a job scheduler), while running
    or while writing the analysis: the workers are stopped, the session is logged, and a rerun picks up from the
    records (`fastcyclic sweep` and `fastcyclic reproduce`; `fastcyclic bench` with its own hint).  Our warnings
    print as one line meanwhile (OneLineWarnings)."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers may be set
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt) if in_main_thread else None
    formatwarning, warnings.formatwarning = warnings.formatwarning, OneLineWarnings(command)
    try:
        return body(args)
    except KeyboardInterrupt:
        print(f"fastcyclic {command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or read-only folder: one line (records written so far stay whole)
        if files.write_error_text(e) is None:
            raise
        print(f"fastcyclic {command}: error: {files.write_error_text(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def lost_runs(out: str, records: dict) -> Optional[str]:
    """Why rewriting out's runs.csv and fits.json from ``records`` would drop runs that runs.csv lists but whose
    records are gone (a copy of a results directory without runs/, as git keeps them), or None."""
    path = os.path.join(out, "runs.csv")
    if not os.path.exists(path):
        return None
    with open(path, newline="") as f:
        listed = {row["id"] for row in csv.DictReader(f) if row.get("id")}
    missing = listed - set(records)
    if not missing:
        return None
    return (f"runs.csv lists {len(listed)} runs but {len(missing)} of them have no record in "
            f"{os.path.join(out, 'runs')!r} (e.g. {sorted(missing)[0]}): rewriting it would drop them from runs.csv "
            "and fits.json")


def _check_nothing_lost(out: str, records: dict) -> None:
    problem = lost_runs(out, records)
    if problem:
        raise ValueError(problem + "; nothing was written")


def main(args: argparse.Namespace) -> int:
    """0: every run finished and none failed; 1: some failed or were not started; 2: bad input; 130: interrupted."""
    return interruptible("sweep", _main, args)


def _main(args: argparse.Namespace) -> int:
    """main, less the handling of an interrupt."""
    try:
        if args.bootstrap < 0:  # (both branches analyse)
            raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        if args.analyze_only:
            state = load_sweep(args.out)
            if state is None:
                raise ValueError(f"{args.out!r} holds no sweep")
            running = sweep_running(args.out)
            if _grid_given(args):
                print("fastcyclic sweep: --analyze-only analyses the sweep in --out as it is; the grid options are "
                      "ignored", file=sys.stderr)
            records = load_records(args.out)
            _check_nothing_lost(args.out, records)
            remaining = [s.id for s in stored_specs(state) if s.id not in records]
            if remaining and running:
                print(f"a sweep is running in {args.out!r}: {len(remaining)} of {len(records) + len(remaining)} runs "
                      "have not finished yet; this analysis covers the others, and the sweep rewrites it when it ends")
            elif remaining:
                print(f"{len(remaining)} of {len(records) + len(remaining)} runs have not finished (interrupted or "
                      "out of time); rerun the sweep to finish them")
        else:
            check_pool_args(args)
            if args.run_minutes is not None and not args.run_minutes > 0:
                raise ValueError(f"--run-minutes must be > 0, got {args.run_minutes}")
            outcome = run_sweep(args.out, blocks_from_args(args), workers=args.workers, threads=args.threads,
                                device=args.device, retry_failed=args.retry_failed,
                                deadline_s=args.max_minutes * 60 if args.max_minutes is not None else None,
                                run_seconds=args.run_minutes * 60 if args.run_minutes is not None else None)
            records, remaining = outcome.records, outcome.remaining
    except ValueError as e:
        print(f"fastcyclic sweep: error: {e}", file=sys.stderr)
        return 2
    with analysis_lock(args.out):
        records, remaining = reread_records(args.out, records, remaining)
        failed = sum(r["status"] == "failed" for r in records.values())
        problem = lost_runs(args.out, records)
        if problem:  # (after a run that stopped before redoing them: a budget, --max-minutes)
            print(f"fastcyclic sweep: {problem}; runs.csv, fits.json and the figures were left as they were (the "
                  "runs' own records are in runs/: rerun to finish the others)", file=sys.stderr)
            return 1
        analysis = analyse(records, n_boot=args.bootstrap)
        paths = write_outputs(args.out, records, analysis, figures=args.figures)
    print(summary_text(analysis))
    print("wrote " + ", ".join(os.path.relpath(p, args.out) for p in paths.values()) + f" in {args.out}")
    if failed:
        print(f"{failed} runs failed (their errors are in runs.csv)")
    return 1 if failed or remaining else 0


__all__ = ["Block", "RunSpec", "SweepOutcome", "Crossing", "EdgeEstimate", "parse_ps", "parse_weight_decays",
           "parse_seeds", "parse_assignments", "primes_between", "log_primes", "expand", "prepare", "run_sweep",
           "load_records", "execute", "flatten", "phase_of", "first_crossing", "estimate_edge", "loglog_fit",
           "fit_edges", "analyse", "write_outputs", "summary_text", "add_arguments", "interruptible", "main"]
