"""``fastcyclic reproduce``: run a preset sweep and write report.md, which states each claim of the paper, the
measurement that tests it, the numbers and a plain verdict (supported / not supported / inconclusive).

    fastcyclic reproduce --preset cpu --out DIR      15-25 min on 2 CPU cores (budget: 30 min), P = 31, 61, 97
    fastcyclic reproduce --preset gpu --out DIR      one GPU, P = 127 … 65521 (budget: 1 hour; not yet measured)
    fastcyclic reproduce --preset tiny --out DIR     a self-check in seconds (P = 11, 13; the numbers mean nothing)

The claims:
    1. At high λ (below collapse), W and E end rank-2 cyclic with one shared frequency.
    2. At low λ they do not.
    3. W reaches rank 2 before E (3a), and E's energy moves into W's plane (3b).
    4. λ_crit·K is roughly constant across K: the slope of log λ_crit against log K is near −1.

Every preset has a main block (the README's previous default model: embed-mlp, x², d = 64, m = 256, Adam + L2
with λ ramped over 500 steps: room for several frequencies, where TrainConfig's default d = 2 has room for one)
over P × λ × seeds, and variants of what small experiments showed to matter: decoupled instead of L2 weight decay,
no λ warm-up, a narrower embedding, longer training, and a factorised head (W in E's space, so that 3b can be
measured) evaluated often (for the layer order).  Verdict rules (thresholds in the constants below):

    claim 1  "most runs" at a λ end cyclic (fastcyclic.sweep.phase_of: W and E one frequency on a circle, ρ₂ ≥ 0.9
             and σ₂/σ₁ ≥ 0.5, the same ω; collapsed runs never count) and fit the train set (train accuracy ≥
             FIT_ACC), leaving out unlearned runs (as sweep's λ_crit_fit, claim 4's edge).  A P "shows" the
             claim when, among every run of adjacent λ of its grid, the one whose pooled runs are most lopsidedly
             such runs (least binomial tail against a share of 1/2) is more lopsided than a fair coin per run gives
             anywhere in that grid with probability ALPHA (majority_window: the choice of λ is paid for; the best of
             six cells of 3 runs is 3 of 3 more often than not).  That p takes runs as independent, while a seed
             fixes a run's initialisation, split and batches at every λ: hence MIN_P_SHOWN = 2 P values must show
             it.  P values where no λ has most runs fitting are untestable.  Supported: at least 2, and at least
             half, of the testable P show it.  Not supported: no λ at any P has most runs cyclic and fitting, and
             at every testable P the grid reached λ where most runs stop learning (else the cyclic regime may lie
             above the grid).  Otherwise, or nothing testable: inconclusive.
    claim 2  at the smallest λ of each testable P (most runs fit, 2+ λ), the share of cyclic runs.  Supported: below 1/2
             at every such P, and at 2 of them claim 1's window (same test, same grid) lies above the smallest λ
             (a contrast).  Not supported: at least 1/2 at every such P.  Otherwise inconclusive.  Stated beside
             it, not judged: at which P W has fewer frequencies at the largest λ that did not collapse than at the
             smallest.
    claim 3a per run that fits and did not collapse: t_W vs t_E (first evaluation with ρ₂ ≥ 0.9; a layer that never
             gets there comes last).  Supported: W first in ≥ 2/3 of the runs with an order (≥ MIN_ORDERED of
             them) and a one-sided sign test p < ALPHA.  Not supported: E first at least as often as W.  Otherwise
             inconclusive.  Stated beside it, not judged: where neither layer reached ρ₂ ≥ 0.9, which settled
             first (first evaluation from which ρ₂ stays within training.SETTLE_TOLERANCE = 0.05 of its end
             value; a layer settled from step 0 never moved and gives no order): settling is not rank 2.
    claim 3b runs with W and E in one space (locking defined) whose W ended cyclic and did not collapse: locking =
             share of E's energy in W's top-2 plane.  Supported: median end locking ≥ 0.5 and higher than at step 0
             in ≥ 2/3 of them (≥ 3 runs).  Not supported: median end locking < 0.2.  Otherwise, or fewer than 3 such
             runs, inconclusive.  Claim 3 = both parts (not supported if either is not supported).
    claim 4  the slope of log λ_crit vs log K (main block, P values with a crossing, at least 3) and its interval;
             λ_crit here is fastcyclic.sweep's λ_crit_fit, the edge of runs that end cyclic and fit, as claim 1
             counts them (the sweep's λ_crit, any cyclic run, is shown beside it):
             the 2.5–97.5 % bootstrap interval over seeds widened to the t interval (3+ points) and to the grid
             range (fastcyclic.sweep.fit_edges).
             Supported: the interval contains −1 and lies within [−1.5, −0.5], and no P left out of the fit (no
             crossing) contradicts the line (_censored).  Not supported: it excludes −1.  Otherwise (too wide,
             fewer than 3 P with a λ_crit, or a contradicting P) inconclusive; every P left out is named.  The
             collapse edge λ₀ is judged alike and stated beside it, with "a fall like P^−0.5" where its interval
             lies in (−1, 0) and holds −0.5.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from fastcyclic import files, geometry, sweep
from fastcyclic.sweep import Block

FIT_ACC = sweep.FIT_ACC  # train accuracy from which a run "fits the train set"
ORDER_SHARE = 2 / 3    # claim 3a: W first in at least this share of the ordered runs
MIN_ORDERED = 5
MIN_P_SHOWN = 2        # claims 1 and 2: P values that must show it (runs of one seed are alike across λ, not P)
ALPHA = 0.05           # claims 1, 2 and 3a: what chance alone (a fair coin per run) would show at most this often
NULL_DRAWS = 20000     # draws of the fair-coin grid behind majority_window's p-value
LOCK_HIGH, LOCK_LOW = 0.5, 0.2
SLOPE_BAND = (-1.5, -0.5)
VERDICTS = ("supported", "not supported", "inconclusive")


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------


@dataclass
class Preset:
    name: str
    description: str
    blocks: list             # sweep.Block, the main one first
    notes: dict              # block name → what it changes, in words
    minutes: float           # the budget it is designed to finish in
    reserve_minutes: float   # kept from the sweep for the showcase run and the report
    workers: Optional[int]   # None: the sweep's default for the device
    device: str              # the device it is designed for ("cpu", "cuda")
    duration: str            # measured or estimated duration, in words
    threads: Optional[int] = None  # torch threads per run; None: the sweep's default (cores / workers)
    main: str = "main"
    layer: str = "layer-order"


def _model(**changes) -> dict:
    """The README's previous default run (d = 64, m = 256), spelled out: TrainConfig's defaults are now a width-2
    embedding, cyclic by construction, which would make every λ look alike."""
    base = dict(model="embed-mlp", d=64, hidden=256, factorised=False, activation="square", bias=False,
                train_fraction=0.4, batch_size=None, steps=1500, optimizer="adamw", lr=3e-3, betas=(0.9, 0.98),
                weight_decay_mode="l2", weight_decay_warmup=500, init_scale=1.0, dtype="float32", eval_every=100,
                geometry_every=100)
    return {**base, **changes}


def _variants(base: dict, ps: tuple, lambdas: tuple, seeds: tuple, *, decoupled: tuple, width: int, steps: int,
              layer_ps: tuple, layer_lambdas: tuple, layer_every: int) -> list:
    return [
        Block(name="layer-order", ps=layer_ps, weight_decays=layer_lambdas, seeds=seeds,
              fixed=dict(base, factorised=True, eval_every=layer_every, geometry_every=layer_every)),
        Block(name="decoupled", ps=ps, weight_decays=decoupled, seeds=seeds,
              fixed=dict(base, weight_decay_mode="decoupled")),
        Block(name="no-warmup", ps=ps, weight_decays=lambdas, seeds=seeds, fixed=dict(base, weight_decay_warmup=0)),
        Block(name="width", ps=ps, weight_decays=lambdas, seeds=seeds, fixed=dict(base, d=width)),
        Block(name="length", ps=ps, weight_decays=lambdas, seeds=seeds, fixed=dict(base, steps=steps)),
    ]


def _notes(base: dict, width: int, steps: int, layer_every: int) -> dict:
    return {"main": f"the reference model: embed-mlp, x², d = {base['d']}, m = {base['hidden']}, Adam + L2, λ ramped "
                    f"over {base['weight_decay_warmup']} steps, {base['steps']} steps",
            "layer-order": f"factorised head (W in E's space, so locking is defined), evaluated every "
                           f"{layer_every} steps",
            "decoupled": "decoupled weight decay (AdamW) instead of L2 (its λ is on another scale)",
            "no-warmup": "λ from the first step (no warm-up)",
            "width": f"embedding width d = {width} instead of {base['d']}",
            "length": f"{steps} steps instead of {base['steps']}"}


def _count(blocks: list) -> int:
    return sum(len(b.ps) * len(b.weight_decays) * len(b.seeds) * math.prod(len(v) for v in b.vary.values())
               for b in blocks)


def _cpu() -> Preset:
    base = _model()
    lambdas = (0.003, 0.01, 0.02, 0.035, 0.06, 0.1)
    blocks = [Block(name="main", ps=(31, 61, 97), weight_decays=lambdas, seeds=(0, 1, 2), fixed=base)]
    blocks += _variants(base, (31, 61), lambdas, (0, 1), decoupled=(0.1, 0.3, 1.0, 3.0, 10.0), width=16,
                        steps=3000, layer_ps=(61, 97), layer_lambdas=(0.01, 0.02), layer_every=25)
    return Preset("cpu", f"P = 31, 61, 97, full batch, 1500 steps; {_count(blocks)} runs", blocks,
                  _notes(base, 16, 3000, 25), minutes=30, reserve_minutes=2.5, workers=None, device="cpu",
                  duration="about 2000 core-seconds of runs (measured alone: 5 s at P = 31, 12 s at P = 61, 32 s at "
                           "P = 97 per 1500-step run): ~17-25 min on 2 cores, depending on other load; no run "
                           "starts after 27.5 min")


def _gpu() -> Preset:
    ps = tuple(sweep.log_primes(127, 65521, 6))      # 127, 443, 1543, 5387, 18787, 65521
    some = (ps[0], ps[2], ps[4])
    base = _model(batch_size=4096, steps=3000, eval_every=250, geometry_every=250)
    lambdas = sweep.parse_weight_decays("log:1e-5:1e-1:9")  # half decades: spans 1/K and P^-0.5 scalings
    coarse = sweep.parse_weight_decays("log:1e-5:1e-1:5")
    blocks = [Block(name="main", ps=ps, weight_decays=lambdas, seeds=(0, 1, 2), fixed=base)]
    blocks += _variants(base, some, coarse, (0, 1), decoupled=(0.1, 0.3162, 1.0, 3.162, 10.0), width=16,
                        steps=9000, layer_ps=(ps[2], ps[4]), layer_lambdas=(1e-4, 1e-3), layer_every=50)
    return Preset("gpu", f"P = {_join(ps)}, batch 4096, 3000 steps; {_count(blocks)} runs", blocks,
                  _notes(base, 16, 9000, 50), minutes=60, reserve_minutes=4, workers=4, device="cuda",
                  duration="not measured (no GPU in the session that wrote it); estimated from the kernel "
                           "benchmarks at ~35-40 min of runs one at a time, less with 4 processes sharing the GPU; "
                           "no run starts after 56 min")


def _tiny() -> Preset:
    base = _model(d=16, hidden=32, steps=60, eval_every=20, geometry_every=20, weight_decay_warmup=20)
    blocks = [Block(name="main", ps=(11, 13), weight_decays=(0.01, 0.1, 1.0), seeds=(0, 1), fixed=base)]
    blocks += _variants(base, (11,), (0.01, 0.1), (0, 1), decoupled=(0.1, 1.0), width=8, steps=120,
                        layer_ps=(13,), layer_lambdas=(0.1,), layer_every=10)
    return Preset("tiny", f"a self-check: P = 11, 13, 60 steps; {_count(blocks)} runs (numbers mean nothing)", blocks,
                  _notes(base, 8, 120, 10), minutes=2, reserve_minutes=0.5, workers=0, device="cpu",
                  duration="about 20 s on one core", threads=1)  # tiny runs: more threads only add waiting


PRESETS: dict[str, Callable[[], Preset]] = {"cpu": _cpu, "gpu": _gpu, "tiny": _tiny}


# --------------------------------------------------------------------------------------------
# claims
# --------------------------------------------------------------------------------------------


@dataclass
class Claim:
    number: str
    statement: str
    measurement: str
    numbers: str       # markdown
    verdict: str
    reason: str


def _fits(row: dict) -> bool:
    return row["status"] == "ok" and row["train_acc"] is not None and row["train_acc"] >= FIT_ACC


def _alive(row: dict) -> bool:
    return row["status"] == "ok" and row["phase"] not in ("collapsed", "unlearned")


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _f(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _cells(rows: list, p: int) -> list:
    """Per λ (ascending) at P: the runs, and counts of cyclic, cyclic-and-fitting, fitting and collapsed ones."""
    out = []
    for lam in sorted({r["weight_decay"] for r in rows if r["p"] == p}):
        cell = [r for r in rows if r["p"] == p and r["weight_decay"] == lam and r["status"] == "ok"]
        if not cell:
            continue
        out.append(dict(lam=lam, n=len(cell), rows=cell,
                        cyclic=sum(r["phase"] == "cyclic" for r in cell),
                        cyclic_fit=sum(r["phase"] == "cyclic" and _fits(r) for r in cell),
                        fit=sum(_fits(r) for r in cell),
                        collapsed=sum(r["phase"] == "collapsed" for r in cell),
                        at_chance=sum(r["phase"] in ("collapsed", "unlearned") for r in cell),
                        # claim 1 counts among these, as sweep's λ_crit_fit (claim 4): an unlearned run might
                        # have ended either way
                        learned=sum(r["phase"] != "unlearned" for r in cell),
                        freq_W=_median(r["freq_count_W"] for r in cell if _alive(r)),
                        freq_E=_median(r["freq_count_E"] for r in cell if _alive(r)),
                        rho2_W=_median(r["rho2_W"] for r in cell if _alive(r)),
                        train=_median(r["train_acc"] for r in cell), test=_median(r["test_acc"] for r in cell)))
    return out


def _join(values) -> str:
    """31, 61, 97"""
    return ", ".join(map(str, values))


def _none_finished(rows: list, block: str) -> str:
    failed = sum(r["status"] == "failed" for r in rows)
    return f"no run of the {block} block finished" + (f" ({failed} failed)" if failed else "")


def binomial_tail(k: int, n: int) -> float:
    """P(X ≥ k) for X ~ Binomial(n, 1/2): how often a fair coin per run puts k or more of n runs in a phase."""
    return sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2 ** n


def majority_window(cells: list, key: str = "cyclic_fit", of: str = "learned", *,
                    draws: int = NULL_DRAWS) -> Optional[dict]:
    """The run of adjacent λ whose pooled runs are most lopsidedly in the phase (``key`` of the ``of`` runs of
    each cell; the least binomial tail against a share of 1/2), and ``p``: how often a fair coin per run gives a
    window that lopsided somewhere in this grid.  A fair coin everywhere is the least favourable case of "no λ
    has most runs in the phase" for independent runs, so p < ALPHA says that some λ has, allowing for the choice
    among every λ and window (the best of six cells of three runs is 3 of 3 more often than not).  Runs of one
    seed are not independent across λ (the seed fixes the initialisation, split and batches): where the seed
    decides the outcome, p is optimistic (a simulated fully seed-decided null showed at p < 0.05 in 12.5 % of
    grids), which claim 1 answers by asking for two P values.  None without runs."""
    counts = np.array([c[key] for c in cells if c[of]], dtype=np.int64)
    sizes = np.array([c[of] for c in cells if c[of]], dtype=np.int64)
    lams = [c["lam"] for c in cells if c[of]]
    if not len(sizes):
        return None
    windows = [(i, j) for i in range(len(sizes)) for j in range(i, len(sizes))]
    size = {(i, j): int(sizes[i:j + 1].sum()) for i, j in windows}
    tails = {n: np.array([binomial_tail(k, n) for k in range(n + 1)]) for n in set(size.values())}

    def window_tails(k):  # k: (draws, cells) -> (windows, draws): each window's binomial tail
        cum = np.concatenate([np.zeros((len(k), 1), np.int64), np.cumsum(k, axis=1)], axis=1)
        return np.array([tails[size[i, j]][cum[:, j + 1] - cum[:, i]] for i, j in windows])

    observed = window_tails(counts[None])[:, 0]
    best = min(range(len(windows)), key=lambda w: (observed[w], windows[w][0] - windows[w][1]))  # ties: widest
    i, j = windows[best]
    rng = np.random.default_rng(0)  # the same answer on every call
    null = window_tails(rng.binomial(sizes, 0.5, size=(draws, len(sizes)))).min(axis=0)
    p = (1 + int((null <= observed[best] * (1 + 1e-9)).sum())) / (1 + draws)
    k, n = int(counts[i:j + 1].sum()), size[i, j]
    return dict(lo=lams[i], hi=lams[j], k=k, n=n, p=p, majority=2 * k > n, windows=len(windows))


def _span(w: dict) -> str:
    """A window's λ: 0.02–0.06, or 0.02 for one λ."""
    return f"{w['lo']:g}" + (f"–{w['hi']:g}" if w["hi"] != w["lo"] else "")


def _window_text(p: int, w: dict) -> str:
    """P = 31 at λ = 0.02–0.06 (9 of 9 runs; chance p = 0.004)"""
    return f"P = {p} at λ = {_span(w)} ({w['k']} of {w['n']} runs; chance p = {w['p']:.2g})"


def claim_1(rows: list, main: str) -> Claim:
    mine = [r for r in rows if r["series"] == main]
    ps = sorted({r["p"] for r in mine if r["status"] == "ok"})
    lines = [f"| P | λ with the most cyclic runs | cyclic / runs there | of those, fitting (train ≥ {FIT_ACC}) | "
             "fewest frequencies of W (median over a λ's runs that fit) | λ where most runs fit | adjacent λ most "
             "lopsidedly cyclic and fitting: such runs / runs, unlearned ones left out (chance p) |",
             "|---|---|---|---|---|---|---|"]
    shows, leans, testable, unfit, short = {}, {}, [], [], []
    for p in ps:
        cells = _cells(mine, p)
        fitting = [c["lam"] for c in cells if 2 * c["fit"] > c["n"]]
        window = majority_window(cells) or dict(majority=False)  # (None: every run unlearned)
        if fitting:
            testable.append(p)
            if 2 * cells[-1]["at_chance"] <= cells[-1]["n"]:  # the largest λ did not stop learning
                short.append(f"P = {p} (λ up to {cells[-1]['lam']:g})")
        if window["majority"] and window["p"] < ALPHA:
            shows[p] = window
        elif window["majority"]:
            leans[p] = window
        if not window["majority"]:
            unfit += [f"P = {p} at λ = {c['lam']:g} (median train accuracy {c['train']:.2f})" for c in cells
                      if 2 * c["cyclic"] > c["n"]]
        best = max(cells, key=lambda c: (c["cyclic"], c["lam"]))
        counts = [(_median(r["freq_count_W"] for r in c["rows"] if _fits(r) and _alive(r)), c["lam"]) for c in cells]
        counts = [(n, lam) for n, lam in counts if n is not None]
        fewest = min(counts) if counts else None
        where = f"{best['lam']:g}" if best["cyclic"] else "none cyclic"
        lopsided = (f"{_span(window)}: {window['k']} / {window['n']} ({window['p']:.2g})" if window["majority"]
                    else "none")
        lines.append(f"| {p} | {where} | {best['cyclic']} / {best['n']} | {best['cyclic_fit']} | "
                     + (f"{fewest[0]:g} (λ = {fewest[1]:g})" if fewest else "–")
                     + f" | {', '.join(f'{v:g}' for v in fitting) or 'none'} | {lopsided} |")
    everywhere = [r for r in rows if r["phase"] == "cyclic"]
    acc = [r["train_acc"] for r in everywhere]
    extra = (f"\n\nAll blocks: {len(everywhere)} of {sum(r['status'] == 'ok' for r in rows)} finished runs end cyclic"
             + (f" (train accuracy {min(acc):.3f}–{max(acc):.3f}; {sum(_fits(r) for r in everywhere)} of them fit)"
                if everywhere else "") + ".")
    by_series = {}
    for r in everywhere:
        by_series[r["series"]] = by_series.get(r["series"], 0) + 1
    if by_series:
        extra += " By block: " + ", ".join(f"{k} {v}" for k, v in by_series.items()) + "."
    shown = [p for p in testable if p in shows]
    if not ps:
        verdict, reason = "inconclusive", _none_finished(mine, main)
    elif not testable:
        verdict, reason = "inconclusive", "at no P do most runs at any λ fit the train set; train longer"
    elif len(shown) >= MIN_P_SHOWN and 2 * len(shown) >= len(testable):
        verdict = "supported"
        reason = ("most runs end cyclic (one shared frequency) and fit at "
                  + "; ".join(_window_text(p, shows[p]) for p in shown))
        if len(shown) < len(testable):
            reason += f"; not at P = {_join(p for p in testable if p not in shows)}"
    elif not shows and not leans:
        reason = "no λ at any P made most runs end cyclic while fitting the train set"
        if unfit:
            reason += f"; most runs end cyclic only where they do not fit: {'; '.join(unfit)}"
        if short:
            verdict = "inconclusive"
            reason += (f"; but the grid stops while most runs still learn at {'; '.join(short)}: the cyclic "
                       "regime may lie at larger λ")
        else:
            verdict = "not supported"
    else:
        verdict = "inconclusive"
        parts = []
        if shows:
            others = [p for p in testable if p not in shows]
            parts.append("most runs end cyclic and fit at " + "; ".join(_window_text(p, w) for p, w in shows.items())
                         + (f", but not at the other testable P ({_join(others)})" if others else
                            f", one P: it takes {MIN_P_SHOWN} (the chance p treats runs as independent, and a "
                            "seed's runs are alike across λ)"))
        if leans:
            parts.append("most runs end cyclic and fit at " + "; ".join(_window_text(p, w) for p, w in leans.items())
                         + f", no more lopsided than chance gives (p ≥ {ALPHA:g}; more seeds would tell)")
        reason = "; ".join(parts)
    return Claim("1", "At high λ (below collapse), W and E end rank-2 cyclic with one shared frequency.",
                 f"Main block, per P and λ: the share of runs whose W and E both end with one frequency holding 90 % "
                 f"of the power, ρ₂ ≥ 0.9 with σ₂/σ₁ ≥ {geometry.CYCLIC_MIN_AXIS_RATIO:g} (a circle, not a line) "
                 f"and the same ω (collapsed runs never count), and whether those runs fit the train set (train "
                 f"accuracy ≥ {FIT_ACC}), leaving out the unlearned runs (at chance with their weights intact), as "
                 "λ_crit of claim 4 does. A P shows the "
                 "claim when some run of adjacent λ holds such a majority of these runs that a fair coin per run "
                 f"would give one as lopsided anywhere in its grid less than {ALPHA:.0%} of the time (chance p < "
                 f"{ALPHA:g}: picking the best λ is paid for). That p treats runs as independent, but a seed fixes "
                 "a run's initialisation, split and batches at every λ, so the claim needs "
                 f"{MIN_P_SHOWN} P values to show it, and at least half of those where most runs fit somewhere.",
                 "\n".join(lines) + extra, verdict, reason)


def claim_2(rows: list, main: str) -> Claim:
    mine = [r for r in rows if r["series"] == main]
    ps = sorted({r["p"] for r in mine if r["status"] == "ok"})
    lines = ["| P | smallest λ | cyclic / runs | fitting | frequencies W / E (median) | ρ₂(W) | frequencies of W at "
             "the largest λ that did not collapse |", "|---|---|---|---|---|---|---|"]
    below, above = [], []
    fewer, not_fewer = [], []  # W's frequency count at the largest λ that did not collapse, against the smallest λ
    cells_at = {p: _cells(mine, p) for p in ps}
    for p, cells in cells_at.items():
        low = cells[0]
        alive = [c for c in cells if 2 * c["collapsed"] < c["n"] and c["freq_W"] is not None]
        high = alive[-1] if alive else None
        if high is not None and high is not low and low["freq_W"] is not None:
            (fewer if high["freq_W"] < low["freq_W"] else not_fewer).append(p)
        if 2 * low["fit"] > low["n"] and len(cells) >= 2:  # one λ is no contrast between low and high
            (above if 2 * low["cyclic"] >= low["n"] else below).append(p)
        lines.append(f"| {p} | {low['lam']:g} | {low['cyclic']} / {low['n']} | {low['fit']} | {_f(low['freq_W'])} / "
                     f"{_f(low['freq_E'])} | {_f(low['rho2_W'], '.2f')} | "
                     + (f"{_f(high['freq_W'])} (λ = {high['lam']:g})" if high else "–") + " |")
    if fewer or not_fewer:
        trend = [f"{word} at P = {_join(ps_)}" for word, ps_ in (("fewer", fewer), ("not fewer", not_fewer)) if ps_]
        lines += ["", "Frequencies of W as λ grows (median at the smallest λ against the largest that did not "
                  f"collapse): {'; '.join(trend)}."]
    # a contrast: at P where low λ is not cyclic, claim 1's window (same test, same grid) lies above the smallest λ
    windows = {p: majority_window(cells_at[p]) for p in below}
    higher = {p: w for p, w in windows.items() if w and w["majority"] and w["lo"] > cells_at[p][0]["lam"]}
    contrast = [p for p, w in higher.items() if w["p"] < ALPHA]
    leaning = [p for p, w in higher.items() if w["p"] >= ALPHA]
    if not ps:
        verdict, reason = "inconclusive", _none_finished(mine, main)
    elif not below and not above:
        verdict, reason = "inconclusive", "at no P do most runs at the smallest λ fit the train set"
    elif below and not above and len(contrast) < MIN_P_SHOWN:
        verdict = "inconclusive"
        if contrast:
            high = (f"larger λ made most runs cyclic and fit beyond chance only at "
                    f"{_window_text(contrast[0], windows[contrast[0]])} (claim 1's test; it takes {MIN_P_SHOWN} P)")
        else:
            high = "no larger λ made most runs cyclic and fit either (claim 1's test"
            high += f"; at {'; '.join(_window_text(p, windows[p]) for p in leaning)} no more than chance gives)" \
                if leaning else ")"
        reason = (f"at the smallest λ fewer than half of the runs end cyclic at P = {_join(below)}, but {high}: "
                  "low λ is not told apart from high λ")
    elif below and not above:
        verdict = "supported"
        reason = (f"at the smallest λ fewer than half of the runs end cyclic at P = {_join(below)}, "
                  f"while larger λ made most runs cyclic and fit at "
                  + "; ".join(_window_text(p, windows[p]) for p in contrast))
    elif above and not below:
        verdict = "not supported"
        reason = f"at least half of the runs end cyclic already at the smallest λ (P = {_join(above)})"
    else:
        verdict = "inconclusive"
        reason = (f"at least half of the runs end cyclic at the smallest λ at P = {_join(above)}, "
                  f"fewer at P = {_join(below)}")
    return Claim("2", "At low λ, W and E do not end rank-2 cyclic.",
                 "Main block, at the smallest λ of each P where most runs fit the train set: the share of cyclic "
                 "runs among all its finished runs, with the number of Fourier frequencies holding 90 % of the power "
                 f"(1 for a circle); and the contrast: at {MIN_P_SHOWN} of those P, claim 1's window (its test, on "
                 "the same grid) lies above the smallest λ.",
                 "\n".join(lines), verdict, reason)


def _order(row: dict) -> Optional[tuple]:
    """(which, source): which of W and E got there first by t (ρ₂ ≥ 0.9; a layer that never got there comes
    last) or, where neither got there, by settling (a layer still moving at the end, settle None, settles after
    one that did settle; a layer settled from step 0 never moved, and gives no order)."""
    from fastcyclic.training import first_layer

    if row["t_W"] is not None or row["t_E"] is not None:
        return first_layer(row["t_W"], row["t_E"]), "t"
    if 0 in (row["settle_W"], row["settle_E"]):
        return None
    first = first_layer(row["settle_W"], row["settle_E"])
    return None if first is None else (first, "settling")


def _judge_order(counts: dict) -> tuple[str, str]:
    """Claim 3a's (verdict, reason) from the counts of (which layer first, by "t" or "settling"): judged on t
    alone (which layer reached rank 2 first); the settling order is stated beside it, not judged (a layer that
    settles without reaching ρ₂ ≥ 0.9 has not reached rank 2)."""
    w_first, e_first, same = counts["W", "t"], counts["E", "t"], counts["same", "t"]
    ordered = w_first + e_first
    settled = counts["W", "settling"] + counts["E", "settling"]
    aside = (f" (by settling, not judged: W first in {counts['W', 'settling']} of {settled})" if settled else "")
    if ordered < MIN_ORDERED:
        return "inconclusive", (f"only {ordered} runs have an order by t_W/t_E, i.e. a layer reaching ρ₂ ≥ 0.9 "
                                f"(ties: {same}; {MIN_ORDERED} needed){aside}")
    p = binomial_tail(w_first, ordered)
    if w_first >= ORDER_SHARE * ordered and p < ALPHA:
        return "supported", f"W first in {w_first} of {ordered} ordered runs (sign test p = {p:.2g}){aside}"
    if e_first >= w_first:
        return "not supported", f"E first in {e_first}, W first in {w_first} of {ordered} ordered runs{aside}"
    return "inconclusive", (f"W first in {w_first} of {ordered} ordered runs (sign test p = {p:.2g}; "
                            f"{ORDER_SHARE:.0%} and p < {ALPHA:g} needed){aside}")


def _judge_locking(same_space: list, locked: list, end: Optional[float], random_share: str) -> tuple[str, str]:
    """Claim 3b's (verdict, reason) from the runs with W and E in one space, those of them whose W is cyclic, and
    their median locking at the end."""
    rose = sum(r["locking_init"] is not None and r["locking"] > r["locking_init"] for r in locked)
    if len(locked) >= 3 and end >= LOCK_HIGH and rose >= ORDER_SHARE * len(locked):
        return "supported", f"median locking {end:.2f} in {len(locked)} runs with a cyclic W, up in {rose}"
    if len(locked) >= 3 and end < LOCK_LOW:
        return "not supported", f"median locking {end:.2f} in {len(locked)} runs with a cyclic W"
    if len(locked) >= 3:
        return "inconclusive", f"median locking {end:.2f}, up in {rose} of {len(locked)} runs with a cyclic W"
    if same_space:
        return "inconclusive", (
            f"W ended cyclic in only {len(locked)} of {len(same_space)} runs with W and E in one space; their "
            f"locking is {_f(_median(r['locking'] for r in same_space), '.2f')} (median; a random plane holds "
            f"{random_share}), which says nothing about rank-2 W")
    return "inconclusive", "no run had W and E in one space (locking undefined)"


def claim_3(rows: list, layer: str) -> Claim:
    from fastcyclic.training import SETTLE_TOLERANCE

    orders = [(r, _order(r)) for r in rows if _fits(r) and _alive(r)]
    orders = [(r, o) for r, o in orders if o]
    counts = {(w, s): 0 for w in ("W", "same", "E") for s in ("t", "settling")}
    for _, o in orders:
        counts[o] += 1
    v_a, r_a = _judge_order(counts)

    same_space = [r for r in rows if _alive(r) and r["locking"] is not None]
    locked = [r for r in same_space if r["verdict_W"] == "cyclic"]
    end = _median(r["locking"] for r in locked)
    d = _median(r.get("d") for r in same_space)
    random_share = f"{2 / d:.3f}" if d else "2/d"
    v_b, r_b = _judge_locking(same_space, locked, end, random_share)
    verdict = ("not supported" if "not supported" in (v_a, v_b) else "supported" if v_a == v_b == "supported"
               else "inconclusive")
    by_series = {}
    for r, o in orders:
        s = by_series.setdefault(r["series"], [0, 0, 0])
        s[("W", "same", "E").index(o[0])] += 1
    lines = ["Which layer first, by t (or by settling where neither layer reached ρ₂ ≥ 0.9):", "",
             "| block | W first | same evaluation | E first |", "|---|---|---|---|"]
    lines += [f"| {k} | {v[0]} | {v[1]} | {v[2]} |" for k, v in by_series.items()]
    lines.append("")
    lines.append(f"By t_W/t_E (one or both reached ρ₂ ≥ 0.9): W first {counts['W', 't']}, same {counts['same', 't']}, "
                 f"E first {counts['E', 't']} (judged); by settling steps (the rest; not judged): W first "
                 f"{counts['W', 'settling']}, same {counts['same', 'settling']}, E first {counts['E', 'settling']}.")
    layer_rows = [r for r in same_space if r["series"] == layer]
    if same_space:
        lines.append("")
        lines.append(f"Locking (share of E's energy in W's top-2 plane; random: {random_share}): runs with W and E "
                     f"in one space that did not collapse: {len(same_space)} (layer-order block: {len(layer_rows)}), "
                     f"median at step 0 {_f(_median(r['locking_init'] for r in same_space), '.3f')}, at the end "
                     f"{_f(_median(r['locking'] for r in same_space), '.3f')}; with a cyclic W: {len(locked)}"
                     + (f", median at the end {end:.3f}" if locked else "") + ".")
    return Claim("3", "W reaches rank 2 before E (3a), and E's energy moves into W's plane (3b).",
                 "3a: in every run that fits the train set and did not collapse, which of W and E reaches ρ₂ ≥ 0.9 "
                 "first (t_W vs t_E; a layer that never does comes last; resolution: the evaluation interval), "
                 "judged with a sign test; where neither does, which settles first is stated, not judged (ρ₂ within "
                 f"{SETTLE_TOLERANCE:g} of its end value; a layer still moving at the end settles last; one settled "
                 "from step 0 never moved and gives no order). "
                 "3b: in runs with W and E in one space (factorised head) whose W ends cyclic, the share of E's "
                 "centred energy in W's top-2 plane, at the end vs at step 0.",
                 "\n".join(lines), verdict, f"3a {v_a}: {r_a}. 3b {v_b}: {r_b}.")


def _pvalues(n: int) -> str:
    return f"{n} P value" if n == 1 else f"{n} P values"


def _slope_text(fit: dict) -> str:
    if fit.get("status") != "ok":
        return f"no fit ({_pvalues(fit.get('n', 0))} with a crossing)"
    # every interval that slope_interval (the verdict's) takes in
    parts = [f"{name} {v[0]:.2f} to {v[1]:.2f}" for name, v in (
        ("2.5–97.5 % bootstrap interval", fit.get("slope_ci")), ("95 % t interval", fit.get("slope_ci_ols")),
        ("grid range", fit.get("slope_range_grid"))) if v]
    return (f"slope {fit['slope']:.2f}" + (f" ({'; '.join(parts)})" if parts else "")
            + f" over {_pvalues(fit['n'])}, R² " + ("n/a (no spread)" if fit["r2"] is None else f"{fit['r2']:.2f}"))


def slope_interval(fit: dict) -> Optional[tuple]:
    """The interval claim 4 judges: the smallest one holding the bootstrap interval over seeds, the t interval
    (scatter about the line) and the grid range (every crossing anywhere between its two grid points); each is a
    source of doubt the others do not see."""
    parts = [v for v in (fit.get("slope_ci"), fit.get("slope_ci_ols"), fit.get("slope_range_grid")) if v]
    return (min(v[0] for v in parts), max(v[1] for v in parts)) if parts else None


def _judge_slope(fit: dict) -> tuple[str, str]:
    if fit.get("status") != "ok" or fit["n"] < 3:
        return "inconclusive", f"only {_pvalues(fit.get('n', 0))} with a crossing (3 needed)"
    ci = slope_interval(fit)
    if ci is None:
        return "inconclusive", "no interval for the slope"
    lo, hi = ci
    if lo <= -1 <= hi and SLOPE_BAND[0] <= lo and hi <= SLOPE_BAND[1]:
        return "supported", f"slope {fit['slope']:.2f}, interval {lo:.2f} to {hi:.2f} contains −1"
    if not lo <= -1 <= hi:
        return "not supported", f"slope {fit['slope']:.2f}, interval {lo:.2f} to {hi:.2f} excludes −1"
    return "inconclusive", f"slope {fit['slope']:.2f}, interval {lo:.2f} to {hi:.2f}: too wide to tell"


def _censored(per_p: list, fit: dict) -> tuple[list, list]:
    """The main block's P values without a λ_crit (left out of the fit), as (those that contradict the fitted
    line, the others), in words.  The line predicts λ̂ = e^intercept · K^slope: "below-grid" (most runs already
    cyclic at the smallest λ) contradicts it where λ̂ lies above the grid's second point, and "none" (never most
    runs) where λ̂ lies below its second-largest point: the law says that a grid step past λ̂ most runs end
    cyclic, and they did not."""
    against, aside = [], []
    for e in per_p:
        d = e["lambda_crit_fit"]
        if d["status"] == "crossing":
            continue
        grid, text = d["lambdas"], f"P = {e['p']}: {d['text']}"
        if fit.get("status") != "ok" or fit["n"] < 3 or len(grid) < 2 or d["status"] == "no-data":
            aside.append(text)  # (no line to hold it against)
            continue
        predicted = math.exp(fit["intercept"]) * e["p"] ** fit["slope"]
        if (d["status"] == "below-grid" and predicted > grid[1]) or (d["status"] == "none" and predicted < grid[-2]):
            against.append(f"{text}, but the line puts λ_crit at {predicted:.3g}, a grid step or more "
                           f"{'above its smallest' if d['status'] == 'below-grid' else 'below its largest'} λ "
                           f"(its grid: {grid[0]:g}–{grid[-1]:g})")
        else:
            aside.append(f"{text}, as the line predicts ({predicted:.3g})")
    return against, aside


def claim_4(analysis: dict, main: str) -> Claim:
    entry = analysis["series"].get(main)
    if entry is None:
        return Claim("4", "λ_crit·K is roughly constant across K.", "–", "no runs", "inconclusive", "no runs")
    seeds = [e["lambda_crit_fit"]["n_seeds"] for e in entry["per_p"] if e["lambda_crit_fit"]["n_seeds"]]
    label = sweep.bootstrap_label(min(seeds, default=0), max(seeds, default=None))
    lines = [f"| P = K | λ_crit: cyclic and fitting ({label}; grid points around it) | "
             "λ_crit·K | cyclic, fitting or not (same) | λ₀ (same) | λ₀·K |", "|---|---|---|---|---|---|"]
    for e in entry["per_p"]:
        cells = []
        for key in ("lambda_crit_fit", "lambda_crit", "lambda_0"):
            d = e[key]
            grid = f"; grid {d['bracket'][0]:g}–{d['bracket'][1]:g}" if d["bracket"] else ""
            cells.append(d["text"] + sweep.interval_text(d) + grid)
            if key != "lambda_crit":
                cells.append(_f(d["times_K"]))
        lines.append(f"| {e['p']} | " + " | ".join(cells) + " |")
    # judged on the runs claim 1 counts: cyclic and fitting.  Cyclic runs at low accuracy (next to collapse), and
    # runs that never left chance (too short to tell), would put the edge where runs stop or start learning.
    fc, f0 = entry["fit_lambda_crit_fit"], entry["fit_lambda_0"]
    lines += ["", f"log λ_crit vs log K: {_slope_text(fc)}.",
              f"(Counting every cyclic run, fitting or not: {_slope_text(entry['fit_lambda_crit'])}.)",
              f"log λ₀ vs log K (the collapse edge): {_slope_text(f0)}."]
    verdict, reason = _judge_slope(fc)
    v0, r0 = _judge_slope(f0)
    if fc.get("status") != "ok" or fc["n"] < 3:
        reason = f"λ_crit exists at {fc.get('n', 0)} of {len(entry['per_p'])} P values; a slope needs 3"
    against, aside = _censored(entry["per_p"], fc)
    if against and verdict == "supported":
        verdict = "inconclusive"
        reason += f", but the P values without a crossing do not follow the line: {'; '.join(against)}"
    elif against or aside:
        reason += f" (P values without a crossing: {'; '.join(against + aside)})"
    edge = {"supported": "falls like 1/K", "not supported": "does not fall like 1/K",
            "inconclusive": "cannot be told from 1/K"}[v0]
    if f0.get("status") == "ok":
        reason += f". The collapse edge λ₀ {edge} ({r0})"
        interval0 = slope_interval(f0)
        if v0 == "not supported" and interval0[0] <= -0.5 <= interval0[1] < 0:  # it falls, slower than 1/K
            reason += "; its slope interval holds −0.5, a fall like P^−0.5"
    return Claim("4", "λ_crit·K is roughly constant across K (the slope of log λ_crit vs log K is near −1).",
                 "Main block: λ_crit per P where the share of runs that end cyclic and fit the train set (as claim 1 "
                 "counts them; runs still at chance are left out) rises above 1/2 (interpolated in log λ; "
                 "bootstrap over seeds), the least-squares slope of log λ_crit against log K; its interval spans the "
                 "bootstrap interval, the t interval and the grid range (each crossing anywhere between its two grid "
                 "points). The same for the collapse edge λ₀.", "\n".join(lines), verdict, reason)


def assess(rows: list, analysis: dict, preset: Preset) -> list:
    return [claim_1(rows, preset.main), claim_2(rows, preset.main), claim_3(rows, preset.layer),
            claim_4(analysis, preset.main)]


# --------------------------------------------------------------------------------------------
# the showcase run and the layer-order figures
# --------------------------------------------------------------------------------------------


def pick_showcase(rows: list, main: str) -> Optional[dict]:
    """The main block's largest P with a run that fits: the λ with the most cyclic runs there (ties: the largest λ
    whose runs mostly fit), seed 0 if it ran; None without such a run."""
    mine = [r for r in rows if r["series"] == main and r["status"] == "ok"]
    for p in sorted({r["p"] for r in mine}, reverse=True):
        cells = [c for c in _cells(mine, p) if 2 * c["fit"] > c["n"] or c["cyclic_fit"]]
        if cells:
            best = max(cells, key=lambda c: (c["cyclic_fit"], c["lam"]))
            return min(best["rows"], key=lambda r: r["seed"])
    return None


def run_showcase(row: dict, records: dict, out: str, device: str) -> Optional[dict]:
    """Retrain one run with figures into DIR/showcase/<id> (skipped when already there); its figure paths."""
    from fastcyclic.training import TrainConfig, train

    folder = os.path.join(out, "showcase", row["id"])
    figures = {name: os.path.join(folder, "figures", name + ".png") for name in ("circles", "fourier", "geometry")}
    if all(os.path.exists(p) for p in figures.values()):
        return figures
    values = dict(records[row["id"]]["config"], device=device, progress=False, out_dir=folder, checkpoint_every=0)
    train(TrainConfig(**values), figures=True)
    return {k: p for k, p in figures.items() if os.path.exists(p)}


def plot_layer_order(rows: list, path: str) -> Optional[str]:
    """Settling (or t) step of W against E for every run that fits and did not collapse: above the diagonal means
    W first.  A layer still moving at the end (settle None) is drawn at the run's last step."""
    from fastcyclic.plots import new_figure, save_png

    runs = [(r, _order(r)) for r in rows if _fits(r) and _alive(r)]
    runs = [(r, o) for r, o in runs if o]
    if not runs:
        return None
    fig, axes = new_figure(1, size=(6.5, 5.5))
    ax = axes[0, 0]
    series = list(dict.fromkeys(r["series"] for r, _ in runs))
    rng = np.random.default_rng(0)
    top = 1
    for i, name in enumerate(series):
        for source, marker in (("t", "o"), ("settling", "s")):
            pts = [(r["t_W"], r["t_E"]) if source == "t" else
                   tuple(r["steps_done"] if r[k] is None else r[k] for k in ("settle_W", "settle_E"))
                   for r, o in runs if r["series"] == name and o[1] == source]
            if not pts:
                continue
            x, y = (np.array(v, dtype=float) for v in zip(*pts))
            top = max(top, x.max(), y.max())
            jitter = rng.uniform(-0.01, 0.01, size=(2, len(x))) * max(top, 1)  # ties would hide each other
            ax.scatter(x + jitter[0], y + jitter[1], marker=marker, color=f"C{i % 10}", alpha=0.7, s=25,
                       label=f"{name} ({'t: ρ₂ ≥ 0.9' if source == 't' else 'settling'})")
    ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", ls=":", lw=1)
    ax.set_xlabel("step at which W got there (t_W, or settling step; still moving: the last step)")
    ax.set_ylabel("step at which E got there (t_E, or settling step; still moving: the last step)")
    ax.set_title("Layer order: points above the diagonal = W first", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_layer_history(records: dict, rows: list, layer: str, path: str) -> Optional[str]:
    """ρ₂(W), ρ₂(E), locking and the frequency counts over training for one layer-order run (the largest P; a
    cyclic W preferred, then the highest ρ₂(W))."""
    from fastcyclic import plots

    candidates = [r for r in rows if r["series"] == layer and _alive(r)]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: (r["p"], r["verdict_W"] == "cyclic", r["rho2_W"] or 0))
    record = records[best["id"]]
    history = [h for h in record.get("history") or [] if "rho2_W" in h]
    if not history:
        return None
    return plots.plot_geometry_history(history, path, title=f"Layer order: {best['id']} ({layer}, "
                                                            f"λ = {best['weight_decay']:g}, P = {best['p']})",
                                       e_columns=(record.get("config") or {}).get("d"))


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def _variant_table(rows: list, analysis: dict, preset: Preset) -> str:
    lines = ["| block | what changes | P | runs | phases | λ_crit | λ₀ | most cyclic at one λ | frequencies of W at "
             "the smallest λ | median test accuracy (best λ) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in analysis["series"].items():
        block = next((r["block"] for r in rows if r["series"] == name), name)
        for e in entry["per_p"]:
            cells = _cells([r for r in rows if r["series"] == name], e["p"])
            phases = {}
            for c in cells:
                for r in c["rows"]:
                    phases[r["phase"]] = phases.get(r["phase"], 0) + 1
            best = max((c["cyclic"] / c["n"] for c in cells), default=0.0)
            test = max((c["test"] for c in cells if c["test"] is not None), default=None)
            note = preset.notes.get(block, "") if e is entry["per_p"][0] else "″"
            lines.append(f"| {name} | {note} | {e['p']} | {e['runs']} | "
                         + ", ".join(f"{k} {v}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
                         + f" | {e['lambda_crit']['text']} | {e['lambda_0']['text']} | {best:.0%} | "
                         f"{_f(cells[0]['freq_W']) if cells else '–'} | {_f(test, '.3f')} |")
    slopes = [f"- {name}: λ_crit {_slope_text(e['fit_lambda_crit'])}; λ₀ {_slope_text(e['fit_lambda_0'])}"
              for name, e in analysis["series"].items()]
    return "\n".join(lines) + "\n\nFits against K per block:\n\n" + "\n".join(slopes)


def _machine(device: str) -> str:
    import torch

    parts = [platform.node(), f"{sweep.cpu_count()} CPU cores", f"torch {torch.__version__}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return ", ".join(parts)


def write_report(out: str, preset: Preset, claims: list, rows: list, analysis: dict, *, figures: dict,
                 outcome: Optional[sweep.SweepOutcome], seconds: float, device: str, notes: list) -> str:
    """DIR/report.md; figure paths are written relative to DIR."""
    def rel(path):
        return os.path.relpath(path, out)

    ok = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    total = len(outcome.specs) if outcome else len(rows)
    tp = sweep.throughput(os.path.join(out, "sweep"))
    rate = tp["runs_per_hour"]
    lines = [f"# fastcyclic reproduce: preset `{preset.name}`", "",
             f"{preset.description}. Written {sweep._now()} on {_machine(device)}, device {device}.", "",
             f"- Runs: {ok} finished, {failed} failed, {total - ok - failed} not run, of {total}"
             + (f"; this invocation took {seconds / 60:.1f} min" if seconds else "")
             + (f"; {rate:.0f} runs per hour over {tp['seconds'] / 60:.1f} min of sweeping"
                f" ({tp['sessions']} session{'s' if tp['sessions'] != 1 else ''})" if rate else "") + ".",
             f"- Designed duration: {preset.duration}.",
             "- Data: `sweep/runs.csv` (one row per run), `sweep/fits.json` (estimates and fits), `sweep/runs/*.json` "
             "(each run's history).", ""]
    lines += [f"- Note: {n}" for n in notes]
    lines += ["", "## Verdicts", "", "| claim | verdict | why |", "|---|---|---|"]
    lines += [f"| {c.number}. {c.statement} | **{c.verdict}** | {c.reason} |" for c in claims]
    for c in claims:
        lines += ["", f"## Claim {c.number}: {c.statement}", "", f"**Measurement.** {c.measurement}", "",
                  c.numbers, "", f"**Verdict: {c.verdict}.** {c.reason.rstrip('.')}."]
    lines += ["", "## What the variants change", "", _variant_table(rows, analysis, preset), "", "## Figures", ""]
    captions = dict(phase_diagram="Phase diagram (P × λ per block): colour = median number of frequencies holding 90 % "
                                  "of W's power; grey × = collapsed; red × = every run failed; red ring = most "
                                  "runs cyclic.",
                    fractions="Share of cyclic (solid) and collapsed (dashed) runs against λ; the estimators read "
                              "where they cross 1/2.",
                    lambda_k="λ_crit·K and λ₀·K against K: flat means Θ(1/K).",
                    layer_order="Layer order: W's step against E's step per run (above the diagonal: W first).",
                    layer_history="ρ₂ and locking over training in one layer-order run.",
                    circles="Showcase run: W's and E's rows in their top-2 planes.",
                    fourier="Showcase run: Fourier power of W and E.",
                    geometry="Showcase run: ρ₂ of W and E over training.")
    for name, path in figures.items():
        if path and os.path.exists(path):
            lines += [f"![{name}]({rel(path)})", "", captions.get(name, name), ""]
    lines += ["## Definitions", "",
              "- Phase of a run (`fastcyclic.sweep.phase_of`): collapsed = train accuracy ≤ "
              f"max({sweep.CHANCE_FACTOR:g}/P, {sweep.CHANCE_FLOOR}) and the parameter norm ≤ "
              f"{sweep.COLLAPSE_NORM_RATIO} × its initial value; "
              "unlearned = accuracy at chance with the weights intact; cyclic = W and E each with one frequency "
              "holding 90 % of the power, ρ₂ ≥ 0.9 and "
              f"σ₂/σ₁ ≥ {geometry.CYCLIC_MIN_AXIS_RATIO:g}, the same ω; otherwise W's geometry verdict "
              "(`fastcyclic.geometry`).",
              f"- A run fits when its train accuracy is ≥ {FIT_ACC}.",
              "- λ_crit (λ₀): the first λ, going up, where the share of cyclic (collapsed) runs rises from at most "
              "1/2 to a majority, interpolated in log λ; intervals are 2.5-97.5 % bootstrap percentiles over seeds "
              f"(with fewer than {sweep.FEW_SEEDS} seeds they cover the edge well under 95 % of the time). \"no "
              "crossing\" and \"< λ_min\" are not numbers and are left out of the fits (claim 4 names them).",
              "- Chance p: how often a fair coin per run would give a window of adjacent λ (claims 1, 2) or a "
              "layer order (claim 3a) at least as lopsided; the choice among windows is included. It takes runs "
              "as independent, while a seed fixes a run's initialisation, split and batches at every λ: claims 1 "
              f"and 2 therefore need {MIN_P_SHOWN} P values.",
              "- λ_crit (fitting), the edge claim 4 is judged on: the same crossing for the share of runs that are "
              f"cyclic and fit (train accuracy ≥ {FIT_ACC}), with the unlearned runs (at chance, weights intact) "
              "left out: whether they would have ended cyclic is unknown.",
              "- Verdict rules: see `fastcyclic/reproduce.py`'s docstring. A verdict is never forced: too few data "
              "give \"inconclusive\"."]
    path = os.path.join(out, "report.md")
    files.write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True,
                        help="cpu: 2 CPU cores, < 30 min; gpu: one GPU, P up to 65521, < 1 hour; tiny: a self-check")
    parser.add_argument("--out", required=True, type=sweep.directory_name,
                        help="output directory (report.md, verdicts.json, sweep/, figures/, showcase/); a rerun "
                             "resumes its sweep")
    parser.add_argument("--workers", type=int, default=None, help="runs at once (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the preset's, else cores / workers)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda[:n] (default: the preset's)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no sweep run after this many minutes (default: the preset's budget minus a reserve "
                             "for the report)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the intervals (default 1000)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun the sweep's runs recorded as failed")
    parser.add_argument("--no-showcase", dest="showcase", action="store_false",
                        help="skip the extra run that draws circles and spectra")


def main(args: argparse.Namespace) -> int:
    """0: report written from a complete sweep; 1: report written, but runs failed or were not started; 2: bad
    input; 130: interrupted (rerun to continue)."""
    return sweep.interruptible("reproduce", _main, args)


def _main(args: argparse.Namespace) -> int:
    """main, less the handling of an interrupt."""
    started = time.perf_counter()
    preset = PRESETS[args.preset]()
    out = args.out
    sweep_dir = os.path.join(out, "sweep")
    try:
        device = sweep.resolve_device(args.device or ("cuda" if preset.device == "cuda" else "auto"))
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out!r} is a file")
        contents = set(os.listdir(out)) if os.path.isdir(out) else set()
        if sweep.load_sweep(sweep_dir) is None and not (contents <= {"sweep"} and sweep.is_unstarted(sweep_dir)):
            raise ValueError(f"{out!r} is not empty and holds no reproduce run; refusing to write into it")
        sweep.check_pool_args(args)
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        budget = args.max_minutes if args.max_minutes is not None else preset.minutes - preset.reserve_minutes
        sweep.say(f"fastcyclic reproduce --preset {preset.name}: {preset.description}; expected {preset.duration}")
        outcome = sweep.run_sweep(sweep_dir, preset.blocks, workers=args.workers if args.workers is not None
                                  else preset.workers, threads=args.threads if args.threads is not None
                                  else preset.threads, device=device, deadline_s=budget * 60,
                                  retry_failed=args.retry_failed)
    except ValueError as e:
        print(f"fastcyclic reproduce: error: {e}", file=sys.stderr)
        return 2
    with sweep.analysis_lock(sweep_dir):  # (a --analyze-only of sweep/ at the same time: see sweep.analysis_lock)
        records, remaining = sweep.reread_records(sweep_dir, outcome.records, outcome.remaining)
        problem = sweep.lost_runs(sweep_dir, records)
        if problem:
            print(f"fastcyclic reproduce: {problem}; nothing else was written (rerun to finish the runs)",
                  file=sys.stderr)
            return 1
        rows = sweep.rows_of(records)
        analysis = sweep.analyse(records, n_boot=args.bootstrap)
        paths = sweep.write_outputs(sweep_dir, records, analysis)
    figures = {k: paths.get(k) for k in ("phase_diagram", "fractions", "lambda_k")}
    figures["layer_order"] = plot_layer_order(rows, os.path.join(out, "figures", "layer_order.png"))
    figures["layer_history"] = plot_layer_history(records, rows, preset.layer,
                                                  os.path.join(out, "figures", "layer_history.png"))
    notes = []
    if remaining:
        notes.append(f"{len(remaining)} runs were not started within the time budget; the verdicts use the "
                     "runs that finished (rerun the same command to complete the sweep)")
    choice = pick_showcase(rows, preset.main) if args.showcase else None
    if choice is not None:
        left = preset.minutes * 60 - (time.perf_counter() - started)
        if args.max_minutes is None and (choice["seconds"] or 0) * 1.5 > left:
            notes.append("the showcase run was skipped: not enough of the time budget left")
        else:
            try:
                shown = run_showcase(choice, records, out, device)
                figures.update(shown or {})
                notes.append(f"showcase figures: run {choice['id']} (P = {choice['p']}, λ = "
                             f"{choice['weight_decay']:g}) retrained with figures")
            except Exception as e:  # the report matters more than the pictures
                notes.append(f"the showcase run failed: {type(e).__name__}: {e}")
    claims = assess(rows, analysis, preset)
    seconds = time.perf_counter() - started
    path = write_report(out, preset, claims, rows, analysis, figures=figures, outcome=outcome, seconds=seconds,
                        device=device, notes=notes)
    sweep.write_json(os.path.join(out, "verdicts.json"),
                     dict(preset=preset.name, seconds=seconds, claims=[dataclasses.asdict(c) for c in claims]))
    for c in claims:
        print(f"claim {c.number}: {c.verdict} — {c.reason}")
    print(f"wrote {path} ({seconds / 60:.1f} min)")
    failed = sum(r["status"] == "failed" for r in rows)
    return 1 if failed or remaining else 0


__all__ = ["PRESETS", "Preset", "Claim", "assess", "claim_1", "claim_2", "claim_3", "claim_4", "write_report",
           "add_arguments", "main"]
