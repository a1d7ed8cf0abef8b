"""Which geometry did the network choose: a circle (rank-2 cyclic), several circles, or a simplex (neural collapse)?

Pure functions of tensors (CPU or CUDA, float32 or float64; no training code). Work is O(n·d·min(n, d)) per matrix:
the eigen-decomposition of the smaller Gram matrix (d×d, or n×n when d > n), never a full SVD, so a summary at
K = 2^17, d = 256 takes a few seconds on one CPU core.

Notation. X is an n×d matrix whose row k belongs to residue k of Z/nZ: the classifier W (K×d, one row per class
c = (a + b) mod P) or the embedding E (P×d, one row per token). μ is its mean row and X̄ = X − 1μᵀ: a shift shared
by all rows changes no softmax and is not geometry, so every measure below uses X̄.

Spectrum. σ₁ ≥ … ≥ σ_d are the singular values of X̄, taken from the eigenvalues of the Gram X̄ᵀX̄ (float64; of
X̄X̄ᵀ when d > n, whose nonzero eigenvalues are the same).
    ρ₂ = (σ₁² + σ₂²) / Σσᵢ²         1 for a circle, 2/(K−1) for a simplex ETF, ≈ 2/d for noise
    stable rank = Σσᵢ² / σ₁²
    axis ratio  = σ₂ / σ₁            1 for a circle, 0 for points on a line (rank 1)
    dim count   = fewest principal directions holding a fraction `mass` (0.9) of Σσᵢ²

Fourier spectrum over the row index. F = rfft(X̄, dim=0). The energy of frequency f is
    p_f = w_f · Σ_j |F_fj|² / n,   w_f = 2 for 0 < f < n/2 (the bin stands for f and n − f: one circle),
                                  w_f = 1 for f = 0 and for the Nyquist bin f = n/2 (n even),
so that Σ_f p_f = ‖X̄‖_F² (Parseval) and p_f is the energy of the rows in the 2-D space of sinusoids of frequency
f. (p_0 is reported as n‖μ‖², the energy of the mean, so that Σ_f p_f = ‖X‖_F²; it is left out of every share.)
    ω     = argmax_{f ≥ 1} p_f      (the dominant frequency; 1 ≤ ω ≤ n/2, since ω and n − ω are the same circle)
    share = p_ω / Σ_{f≥1} p_f
    count = fewest frequencies whose energies reach mass · Σ_{f≥1} p_f
If m frequencies hold a fraction q of the energy, the top 2m singular directions hold at least q (each frequency's
part of X̄ has rank ≤ 2; Eckart–Young): count = 1 at mass 0.9 already implies ρ₂ ≥ 0.9.
count measures how the energy is spread, structure and noise alike: a circle plus isotropic noise holding more than
1 − mass of the energy needs many frequencies to reach `mass` (one circle with 12 % noise energy counts 7 at n = 97)
and reads as "multi-frequency" or "unstructured", not "cyclic".

Circle fit in the top-2 plane. u_k ∈ R² are the coordinates of X̄'s row k on its top-2 right singular vectors,
r_k = |u_k|, θ_k = angle(u_k). (At rank 1 the plane has one direction: the second is a zero vector, not an arbitrary
one, so that locking and phase alignment do not depend on it. When σ₂ = σ₃, e.g. a simplex ETF, the plane is not
unique and the circle fit describes whichever one the eigensolver returns: it reads a circle only where σ₂ > σ₃.)
    radius CV = std(r) / mean(r)                                                 0 on a circle
    phase R²  = max_{s = ±1} |mean_k exp(i(θ_k − s·2πωk/n))|²                   1 when θ_k = s·2πωk/n + φ
        (the squared mean resultant length of the residual angles: φ is fitted as their circular mean, s covers
        the direction of travel, i.e. ω vs −ω; ≈ 1/n for random angles)
    gap error = mean_k |g_k − 2π/n| / (2π/n) over the n gaps g_k between sorted angles (wrapping around)
        0 when the n points are evenly spaced; 2(n − 1)/n when they all coincide.

Subspace locking = ‖Ē V_W‖_F² / ‖Ē‖_F², V_W = W's top-2 right singular vectors: the share of E's energy in W's
plane (1: same plane; 0: orthogonal). Meaningful only where a model has a linear path from E to W; for a model
whose W reads a hidden layer of another width, summarize(..., same_space=False) compares frequencies only.

Phase alignment: h(a, b) and w_c, c = (a + b) mod P, both projected on W's top-2 plane (h as it is, W centred,
since logits read h·(w_c − w̄)); the angle between them, reported as mean |angle| and mean cosine.

Neural-collapse contrast for a K×d matrix M (W's rows or class means). m̃_k = (M_k − μ)/‖M_k − μ‖ (unit rows),
G = M̃M̃ᵀ (K×K, never formed). Targets, both with unit diagonal:
    T_etf = (K·I − 11ᵀ)/(K − 1)                  the simplex ETF (off-diagonal cosine −1/(K−1))
    T_cyc[c, c′] = cos(2πω(c − c′)/K)           the circle at frequency ω
    dist(G, T) = ‖G/‖G‖_F − T/‖T‖_F‖_F = sqrt(2 − 2⟨G, T⟩ / (‖G‖_F ‖T‖_F))   ∈ [0, 2], 0 iff G = T
(scale-free and bounded, so comparable across K). With S = M̃ᵀM̃ (d×d), s = Σ_k m̃_k, a = Σ_k m̃_k cos θ_k,
b = Σ_k m̃_k sin θ_k, θ_k = 2πωk/K, every term is O(K·d²) or less:
    ‖G‖_F² = ‖S‖_F²                                 (‖M̃M̃ᵀ‖_F = ‖M̃ᵀM̃‖_F)
    ⟨G, T_etf⟩ = (K·tr S − ‖s‖²)/(K − 1),   ‖T_etf‖_F² = K²/(K − 1)
    ⟨G, T_cyc⟩ = ‖a‖² + ‖b‖²                        (cos(θ − θ′) = cos θ cos θ′ + sin θ sin θ′)
    ‖T_cyc‖_F² = K²/2, or K² when 2ω ≡ 0 (mod K)
NC1 = tr(Σ_W Σ_B⁺)/K from features h and labels: Σ_W the within-class, Σ_B the between-class covariance.

Verdict for one matrix (summarize reports W's as `verdict` and E's as `verdict_E`): the first rule that holds.
    1. "unstructured"     X̄ = 0 (all rows equal, e.g. an all-zero matrix): nothing to measure
    2. "cyclic"           count == 1, ρ₂ ≥ CYCLIC_RHO2, axis ratio ≥ CYCLIC_MIN_AXIS_RATIO   one frequency, one circle
                          (ρ₂ ≥ share always; with CYCLIC_RHO2 ≤ mass the ρ₂ test only guards rounding, with a
                          larger one a count-1 layout below it ends in rule 5)
    3. "etf-like"         dist(G, T_etf) ≤ ETF_MAX_DISTANCE        a simplex (needs d ≥ K − 1)
    4. "multi-frequency"  2 ≤ count ≤ MULTI_MAX_FREQ_FRACTION · ⌊n/2⌋, axis ratio ≥ CYCLIC_MIN_AXIS_RATIO
                          a few circles, rank ≤ 2·count (the strongest circle gives σ₁ ≈ σ₂)
    5. "unstructured"     otherwise (white noise needs 2/3 to 9/10 of all frequencies to hold 90 % of its power)
One frequency on a line is not a circle (ρ₂ is trivially 1 at rank 1): e.g. a single cosine column, or the Nyquist
frequency at even n, whose sinusoids span one direction. It fails rule 2 and, having one frequency, ends in rule 5;
so do several frequencies on a line (a ramp k·v needs about 6 at any n; two cosines summed in one column), by rule
4's axis ratio.
At composite n a circle at ω with g = gcd(ω, n) > 1 has only n/g distinct points (g rows on each): rule 2 calls it
"cyclic", and its gap error, 2(1 − 1/g), shows the coincident rows. At prime n = P every ω is coprime to n.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "FREQ_MASS", "CYCLIC_RHO2", "CYCLIC_MIN_AXIS_RATIO", "ETF_MAX_DISTANCE", "MULTI_MAX_FREQ_FRACTION",
    "LAYER_ORDER_THRESHOLD", "VERDICTS",
    "Spectrum", "FourierSpectrum", "Layout", "CircleFit", "PhaseAlignment", "NCDistances", "GeometrySummary",
    "spectrum", "top2_plane", "project_top2", "fourier_spectrum", "describe", "circle_fit", "subspace_locking",
    "phase_alignment", "nc_distances", "class_means", "nc1", "classify", "summarize", "layer_order",
]

FREQ_MASS = 0.9
"""Share of the non-constant energy that `count` frequencies (or principal directions) must hold."""

CYCLIC_RHO2 = 0.9
"""ρ₂ at or above which one frequency's circle counts as rank 2 (t_W, t_E use LAYER_ORDER_THRESHOLD, also 0.9)."""

CYCLIC_MIN_AXIS_RATIO = 0.5
"""σ₂/σ₁ at or above which the top-2 plane holds a circle (or an ellipse at most 2:1), not a line. Trained circles
measure 0.94-1.0 (W and E of the cpu preset's six cyclic runs); a rank-1 layout measures ~0."""

ETF_MAX_DISTANCE = 0.2
"""dist(G, T_etf) at or below which rows are "etf-like": cosine similarity of the Grams ≥ 1 − 0.2²/2 = 0.98.
Random rows in d ≫ K dimensions are close to an ETF too (distance ≈ sqrt(K/d)); with d < K − 1 no ETF exists."""

MULTI_MAX_FREQ_FRACTION = 0.25
"""Most frequencies, as a fraction of the ⌊n/2⌋ available, that a "multi-frequency" layout may need to hold `mass`
of its energy. White noise needs 0.66 (d = 1) to 0.9 (d large) of them, so 0.25 leaves a wide margin; at n < 16 a
two-frequency layout cannot be told apart from noise and falls to "unstructured"."""

LAYER_ORDER_THRESHOLD = 0.9
"""ρ₂ that W and E must reach for `layer_order` (t_W, t_E)."""

VERDICTS = ("cyclic", "multi-frequency", "etf-like", "unstructured")

# Centred energy below this fraction of the raw energy is rounding left by subtracting the mean: rows are equal.
# Centring in float64 leaves ~1e-32 of it (amplitudes ~1e-16 of the rows'); 1e-20 called a circle of amplitude
# 1e-10 on an offset of 1 "equal rows", where the measures still resolve it (ρ₂ = 1 − 1e-11).
_DEGENERATE = 1e-24
# Below this max |x| (≈ 1e-146) squares fall under float64's normal range (times 2⁵²): the Gram loses precision and,
# further down, all of it (a circle at 1e-200 read as ρ₂ = 0). float32 never gets there.
_SQUARE_FLOOR = 2.0 ** -485

_THREADS_LOCK = threading.Lock()  # callers in several Python threads must not interleave set_num_threads


# --------------------------------------------------------------------------------------------
# input checks and the shared centred Gram
# --------------------------------------------------------------------------------------------


def _as_matrix(X, name: str) -> torch.Tensor:
    """X as a real float32/float64 matrix with ≥ 3 rows, or a ValueError that names the problem."""
    X = X.detach() if isinstance(X, torch.Tensor) else torch.as_tensor(X)  # parameters; numpy arrays, lists
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix (rows × features), got shape {tuple(X.shape)}")
    n, d = X.shape
    if n < 3:
        raise ValueError(f"{name} needs at least 3 rows (a circle or a simplex needs 3 points), got shape {(n, d)}")
    if d < 1:
        raise ValueError(f"{name} needs at least 1 column, got shape {(n, d)}")
    if X.is_complex():
        raise ValueError(f"{name} must be real, got dtype {X.dtype}")
    if not X.is_floating_point():
        X = X.double()
    elif X.dtype not in (torch.float32, torch.float64):
        X = X.float()  # float16 / bfloat16: too coarse to measure in
    return X


def _check_finite(X: torch.Tensor, name: str, col_sums: torch.Tensor) -> None:
    """NaN/Inf anywhere makes its column sum non-finite, so the exact search runs only when one is."""
    if bool(torch.isfinite(col_sums).all()):
        return
    bad = ~torch.isfinite(X)
    count = int(bad.sum())
    if count == 0:
        raise ValueError(f"{name} has entries too large to sum in float64 (max |x| = {X.abs().max().item():.3g})")
    i, j = (int(v) for v in bad.nonzero()[0])
    raise ValueError(f"{name} has {count} non-finite entries (NaN or Inf), the first at row {i}, column {j}: "
                     f"{X[i, j].item()}")


@dataclass
class _Centred:
    """X̄ (float64) with its singular spectrum and top-2 plane, computed once and shared by all measures."""
    dtype: torch.dtype     # X's (float32 or float64): the FFT runs in it
    x: torch.Tensor        # n×d, float64, rows centred
    mean: torch.Tensor     # d, float64
    evals: torch.Tensor    # d, σᵢ², descending, ≥ 0
    plane: torch.Tensor    # d×2, the top-2 right singular vectors (a zero column where σ₂ or σ₁ is 0, or d = 1)
    energy: float          # ‖X̄‖_F²
    degenerate: bool       # X̄ = 0 up to rounding


@contextlib.contextmanager
def _lapack_on_one_thread(device: torch.device):
    """Run a small (d×d) LAPACK call on one CPU thread. Multi-threaded eigh/SVD of a 256×256 matrix is a long chain
    of tiny parallel regions: 4 ms alone, but measured up to 1.4 s when another process shares the cores, since
    every barrier waits for a preempted thread. One thread: 4 ms either way. (torch's thread count is per process.)"""
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _centre(X: torch.Tensor, name: str) -> _Centred:
    n, d = X.shape
    x = X.to(torch.float64, copy=True)  # the one float64 copy; centred in place below
    col_sums = x.sum(dim=0)
    _check_finite(X, name, col_sums)
    max_abs = float(X.abs().max())
    if 0 < max_abs < _SQUARE_FLOOR:
        raise ValueError(f"{name} has entries too small to square in float64 (max |x| = {max_abs:.3g}); the measures "
                         f"do not depend on scale: multiply it by a power of two first")
    mean = col_sums / n
    x.sub_(mean)
    wide = d > n  # then the n×n Gram X̄X̄ᵀ is the smaller one: O(n²d) instead of O(d³)
    gram = x @ x.T if wide else x.T @ x
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"{name} has entries too large to square in float64 (max |x| = {X.abs().max().item():.3g})")
    with _lapack_on_one_thread(gram.device):
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    top = evals[:2]
    # a direction whose σ² is rounding (rank 0 or 1) is left out of the plane rather than picked at random
    keep = (top > 1e-12 * evals[0]).to(x.dtype)
    if wide:  # right singular vectors from the left ones: v = X̄ᵀu / σ
        plane = (x.T @ evecs[:, :2]) * (keep / top.sqrt().clamp_min(1e-300))
        evals = torch.cat([evals, evals.new_zeros(d - n)])
    else:
        plane = evecs[:, :2] * keep
    if plane.shape[1] < 2:  # d = 1
        plane = torch.cat([plane, torch.zeros_like(plane)], dim=1)
    energy = float(evals.sum())
    raw = energy + n * float(mean @ mean)
    degenerate = energy <= _DEGENERATE * raw or raw == 0.0
    return _Centred(X.dtype, x, mean, evals, plane, energy, degenerate)


def _count_for_mass(values_desc: torch.Tensor, mass: float) -> int:
    """Fewest leading entries of a descending non-negative vector whose sum reaches mass · total."""
    total = values_desc.sum()
    if values_desc.numel() == 0 or float(total) <= 0.0:
        return 0
    cum = values_desc.cumsum(0)
    count = int(torch.searchsorted(cum, mass * total * (1 - 1e-12))) + 1  # slack: cumsum rounding at mass = 1
    return min(count, values_desc.numel())


def _check_mass(mass: float) -> None:
    if isinstance(mass, (bool, np.bool_)) or not isinstance(mass, numbers.Real):
        raise TypeError(f"mass must be a number in (0, 1], got {mass!r}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")


def _check_omega(omega, n: int) -> int:
    """A frequency the caller chose (an int, a NumPy integer, a 0-dim integer tensor): 1 … n−1 (ω and n−ω are
    one circle, run the other way)."""
    try:
        if isinstance(omega, (bool, np.bool_)) or (isinstance(omega, torch.Tensor) and (
                omega.dim() != 0 or omega.dtype == torch.bool)):
            raise TypeError
        omega = operator.index(omega)
    except TypeError:
        raise TypeError(f"omega must be an integer frequency, got {omega!r}") from None
    if not 1 <= omega < n:
        raise ValueError(f"omega must be in [1, {n - 1}] for {n} rows, got {omega}")
    return omega


def _check_measures(rho2, freq_count, n, etf_distance, axis_ratio) -> None:
    """classify's measured inputs, in their ranges (a NaN ρ₂ read as "etf-like"); a hair of rounding is let by."""
    for name, value, top in (("rho2", rho2, 1.0), ("etf_distance", etf_distance, 2.0), ("axis_ratio", axis_ratio, 1.0)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                or not 0.0 <= value <= top * (1 + 1e-9):
            raise ValueError(f"{name} must be a measured value in [0, {top:g}], got {value!r}")
    for name, value, low in (("freq_count", freq_count, 0), ("n", n, 3)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_rule(cyclic_rho2, cyclic_min_axis_ratio, etf_max_distance, multi_max_freq_fraction) -> None:
    """The verdict rule's thresholds (module docstring): shares and ratios in [0, 1], a distance >= 0."""
    for name, value, top in (("cyclic_rho2", cyclic_rho2, 1.0), ("cyclic_min_axis_ratio", cyclic_min_axis_ratio, 1.0),
                             ("etf_max_distance", etf_max_distance, math.inf),
                             ("multi_max_freq_fraction", multi_max_freq_fraction, 1.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in [0, {top:g}], got {value!r}")
        if not 0.0 <= value <= top:
            raise ValueError(f"{name} must be a number in [0, {top:g}], got {value!r}")


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------


@dataclass
class Spectrum:
    """Singular spectrum of the row-centred matrix."""
    singular_values: torch.Tensor  # σ₁ ≥ … ≥ σ_d (float64, CPU)
    rho2: float                    # (σ₁² + σ₂²)/Σσᵢ²: 1 for a circle, 2/(K−1) for a simplex ETF; 0 if X̄ = 0
    stable_rank: float             # Σσᵢ²/σ₁²: 1 for rank 1, 2 for a circle, K − 1 for an ETF; 0 if X̄ = 0
    axis_ratio: float              # σ₂/σ₁: 1 for a circle, 0 for rank 1 (and if X̄ = 0)
    dim_count: int                 # fewest principal directions holding `mass` of the energy
    energy: float                  # ‖X̄‖_F² = Σσᵢ²


def _spectrum(c: _Centred, mass: float) -> Spectrum:
    sv = c.evals.sqrt().cpu()
    if c.degenerate:
        return Spectrum(torch.zeros_like(sv), 0.0, 0.0, 0.0, 0, 0.0)
    ev = c.evals.cpu()
    axis_ratio = float(sv[1] / sv[0]) if len(sv) > 1 else 0.0
    return Spectrum(sv, float(ev[:2].sum()) / c.energy, c.energy / float(ev[0]), axis_ratio,
                    _count_for_mass(ev, mass), c.energy)


def spectrum(X, mass: float = FREQ_MASS) -> Spectrum:
    """Singular values of X − mean row (via the smaller Gram); ρ₂, stable rank, axis ratio, dim count (docstring)."""
    _check_mass(mass)
    return _spectrum(_centre(_as_matrix(X, "X"), "X"), mass)


def top2_plane(X) -> torch.Tensor:
    """The top-2 right singular vectors of X − mean row, as a d×2 float64 matrix with orthonormal columns (a zero
    column where X̄ has rank < 2 or d = 1)."""
    return _centre(_as_matrix(X, "X"), "X").plane


def project_top2(X) -> torch.Tensor:
    """n×2 float64 coordinates of X's centred rows in their own top-2 plane (the points that should form a circle)."""
    c = _centre(_as_matrix(X, "X"), "X")
    return c.x @ c.plane


# --------------------------------------------------------------------------------------------
# Fourier spectrum over the row index
# --------------------------------------------------------------------------------------------


@dataclass
class FourierSpectrum:
    """Energy per frequency of the rows, summed over columns."""
    power: torch.Tensor  # p_f for f = 0 … ⌊n/2⌋ (float64, CPU); p_0 = n‖μ‖², Σ_f p_f = ‖X‖_F²
    omega: int           # dominant frequency in 1 … ⌊n/2⌋ (0 if X̄ = 0)
    share: float         # p_ω / Σ_{f≥1} p_f
    count: int           # fewest frequencies holding `mass` of Σ_{f≥1} p_f
    top: torch.Tensor    # those frequencies (int64, CPU), by decreasing energy


def _weights(n: int, device) -> torch.Tensor:
    """w_f of the module docstring: 2 for bins that also stand for n − f, 1 for DC and the Nyquist bin."""
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _power(c: _Centred) -> torch.Tensor:
    """Σ_j |rfft(X̄[:, j])_f|² · w_f / n for each f, in float64.

    The FFT reads the centred rows (centring changes only the DC bin, which the caller replaces; the raw rows' mean
    spread its rounding over every bin: a float32 circle on an offset of 1e4 read 40× the energy off ω) in X's
    dtype: a float32 FFT's error is ~1e-7 of the amplitudes, far below anything a verdict depends on. It runs along
    contiguous memory (a transposed copy: 1.4× faster than a strided FFT over dim 0 on CPU), scaled to max |x| = 1
    first, so that the norm's sum of squares in X's dtype neither underflows (weights decayed to 1e-30) nor
    overflows (1e30); the scale goes back in float64."""
    n, d = c.x.shape
    scale = float(c.x.abs().amax()) or 1.0
    rows = torch.empty((d, n), dtype=c.dtype, device=c.x.device)
    if scale <= torch.finfo(c.dtype).max:
        rows.copy_(c.x.T).div_(scale)
    else:  # float32 entries near its largest value, whose centred values can exceed it: scaled in float64 first
        rows.copy_(c.x.T / scale)
    F = torch.view_as_real(torch.fft.rfft(rows, dim=1))  # d × (n//2 + 1) × (re, im)
    power = torch.linalg.vector_norm(F, dim=(0, 2)).double().square()  # no d × n/2 temporary
    return power * (scale * scale) * _weights(n, c.x.device) / n


def _fourier(c: _Centred, mass: float) -> FourierSpectrum:
    n = c.x.shape[0]
    if c.degenerate:
        power = torch.zeros(n // 2 + 1, dtype=torch.float64)
        power[0] = n * float(c.mean @ c.mean)
        return FourierSpectrum(power, 0, 0.0, 0, torch.zeros(0, dtype=torch.int64))
    power = _power(c).cpu()
    power[0] = n * float(c.mean @ c.mean)  # exact, and the same as X's DC bin
    ac = power[1:]
    ordered, order = ac.sort(descending=True, stable=True)
    count = _count_for_mass(ordered, mass)
    omega = int(order[0]) + 1
    return FourierSpectrum(power, omega, float(ordered[0] / ac.sum()), count, order[:count] + 1)


def fourier_spectrum(X, mass: float = FREQ_MASS) -> FourierSpectrum:
    """Energy of X's rows per frequency over the row index; dominant ω, its share, the count holding `mass`."""
    _check_mass(mass)
    return _fourier(_centre(_as_matrix(X, "X"), "X"), mass)


@dataclass
class Layout:
    """What the figures draw for one matrix, from a single centring."""
    spectrum: Spectrum
    fourier: FourierSpectrum
    coords: torch.Tensor  # n×2 float64 (CPU): centred rows in their top-2 plane


def describe(X, mass: float = FREQ_MASS) -> Layout:
    """Spectrum, Fourier spectrum and top-2 coordinates of X's centred rows (one Gram, one FFT)."""
    _check_mass(mass)
    c = _centre(_as_matrix(X, "X"), "X")
    return Layout(_spectrum(c, mass), _fourier(c, mass), (c.x @ c.plane).cpu())


# --------------------------------------------------------------------------------------------
# circle fit in the top-2 plane
# --------------------------------------------------------------------------------------------


@dataclass
class CircleFit:
    """How well the rows, seen in their top-2 plane, sit on a circle at angles 2πωk/n + φ."""
    radius_cv: float   # std/mean of the radii: 0 on a circle (0 too when all points sit at the centre)
    phase_r2: float    # circular R² of θ_k against s·2πωk/n + φ: 1 for exact linear phase, ≈ 1/n for random
    gap_error: float   # mean |sorted-angle gap − 2π/n| / (2π/n): 0 for n evenly spaced points
    direction: int     # s = ±1: whether angles run with +ω or −ω (the plane's orientation is arbitrary)
    phase: float       # the fitted offset φ in radians
    omega: int         # the frequency fitted against


def _circle_angles(n: int, omega: int, device) -> torch.Tensor:
    """2πωk/n for k = 0 … n−1, reducing ωk mod n in integers first (exact even for ωk ~ 1e10)."""
    k = torch.arange(n, dtype=torch.int64, device=device)
    return (2 * math.pi / n) * ((omega * k) % n).double()


def _circle_fit(c: _Centred, omega: int) -> CircleFit:
    n = c.x.shape[0]
    if c.degenerate:  # all points coincide at the centre: no circle, maximal gap error
        return CircleFit(0.0, 0.0, 2 * (n - 1) / n, 1, 0.0, omega)
    u = c.x @ c.plane
    r = u.norm(dim=1)
    radius_cv = float(r.std(unbiased=False) / r.mean())
    theta = torch.atan2(u[:, 1], u[:, 0])
    target = _circle_angles(n, omega, u.device)
    best = (-1.0, 1, 0.0)
    for s in (1, -1):
        z = torch.polar(torch.ones_like(theta), theta - s * target).mean()
        r2 = float(z.abs()) ** 2
        if r2 > best[0]:
            best = (r2, s, float(z.angle()))
    gaps = torch.diff(theta.sort().values)
    gaps = torch.cat([gaps, (2 * math.pi - gaps.sum()).reshape(1)])  # the gap that wraps around
    step = 2 * math.pi / n
    gap_error = float((gaps - step).abs().mean() / step)
    return CircleFit(radius_cv, min(best[0], 1.0), gap_error, best[1], best[2], omega)


def circle_fit(X, omega: int | None = None) -> CircleFit:
    """Circle fit of X's centred rows in their top-2 plane at frequency omega (default: X's dominant frequency)."""
    c = _centre(_as_matrix(X, "X"), "X")
    if omega is None:
        omega = _fourier(c, FREQ_MASS).omega
    else:
        omega = _check_omega(omega, c.x.shape[0])
    return _circle_fit(c, int(omega))


# --------------------------------------------------------------------------------------------
# subspace locking and phase alignment
# --------------------------------------------------------------------------------------------


def _check_same_d(W: torch.Tensor, other: torch.Tensor, name: str, hint: str = "") -> None:
    if W.shape[1] != other.shape[1]:
        raise ValueError(f"W and {name} must have the same number of columns d: W has d={W.shape[1]} "
                         f"(shape {tuple(W.shape)}), {name} has d={other.shape[1]} (shape {tuple(other.shape)})"
                         + hint)


def _locking(cw: _Centred, ce: _Centred) -> float:
    if ce.degenerate or cw.degenerate:  # no energy to place, or no plane to place it in
        return 0.0
    return float((ce.x @ cw.plane.to(ce.x.device)).square().sum()) / ce.energy


def subspace_locking(W, E) -> float:
    """Share of E's centred energy inside the span of W's top-2 right singular vectors: 1 same plane, 0 orthogonal."""
    W, E = _as_matrix(W, "W"), _as_matrix(E, "E")
    _check_same_d(W, E, "E")
    return _locking(_centre(W, "W"), _centre(E, "E"))


@dataclass
class PhaseAlignment:
    """Angle, inside W's top-2 plane, between a hidden feature h(a, b) and the row w_c of its class c."""
    mean_abs_angle: float  # mean |angle| in radians: 0 aligned, π/2 unrelated on average, π opposite
    mean_cos: float        # mean cos(angle): 1 aligned, 0 unrelated, −1 opposite


def _labels(labels, n: int, K: int, device) -> torch.Tensor:
    labels = torch.as_tensor(labels, device=device)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be a 1-D tensor with one label per feature row ({n}), "
                         f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"labels must lie in [0, {K}), got values from {int(labels.min())} to {int(labels.max())}")
    return labels


def _as_features(h, name: str = "h") -> torch.Tensor:
    h = h.detach() if isinstance(h, torch.Tensor) else torch.as_tensor(h)
    if h.is_complex():
        raise ValueError(f"{name} must be real, got dtype {h.dtype}")
    if h.ndim != 2 or h.shape[0] < 1:
        raise ValueError(f"{name} must be a 2-D matrix (samples × features) with at least one row, "
                         f"got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name} has {int((~torch.isfinite(h)).sum())} non-finite entries (NaN or Inf)")
    return h.double()


def _phase_alignment(cw: _Centred, h: torch.Tensor, labels: torch.Tensor) -> PhaseAlignment:
    V = cw.plane
    w2 = cw.x @ V                       # centred W rows in their plane (logits read h·(w_c − w̄))
    h2 = h.to(V.device) @ V             # h as it is: its mean is part of what the logits read
    w2 = w2[labels.to(V.device)]
    cross = h2[:, 0] * w2[:, 1] - h2[:, 1] * w2[:, 0]
    dot = (h2 * w2).sum(dim=1)
    norms = h2.norm(dim=1) * w2.norm(dim=1)
    ok = norms > 0
    angle = torch.where(ok, torch.atan2(cross, dot).abs(), torch.full_like(dot, math.pi / 2))  # a zero vector:
    cos = torch.where(ok, dot / norms.clamp_min(1e-300), torch.zeros_like(dot))                  # no alignment
    return PhaseAlignment(float(angle.mean()), float(cos.mean()))


def phase_alignment(W, h, labels) -> PhaseAlignment:
    """In-plane angle between h(a, b) (rows of h, N×d) and w_c, c = labels = (a + b) mod P, in W's top-2 plane."""
    W = _as_matrix(W, "W")
    h = _as_features(h)
    _check_same_d(W, h, "h")
    return _phase_alignment(_centre(W, "W"), h, _labels(labels, h.shape[0], W.shape[0], h.device))


# --------------------------------------------------------------------------------------------
# neural-collapse contrast
# --------------------------------------------------------------------------------------------


@dataclass
class NCDistances:
    """Distances in [0, 2] of the unit-row Gram matrix to the ideal simplex ETF and to the ideal cyclic Gram.
    When all rows are equal (X̄ = 0) there are no unit rows: both distances are √2 (like nothing), and ω is 0
    unless the caller chose one."""
    etf: float     # dist(G, T_etf): 0 for a simplex ETF
    cyclic: float  # dist(G, T_cyc(ω)): 0 for a circle at frequency ω
    omega: int     # the frequency of T_cyc


def _unit_rows(c: _Centred) -> torch.Tensor:
    """Centred rows scaled to unit norm (zero rows stay zero)."""
    norms = torch.linalg.vector_norm(c.x, dim=1)
    inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    return c.x * inv.unsqueeze(1)


def _nc_distances(c: _Centred, omega: int) -> NCDistances:
    K, d = c.x.shape
    if c.degenerate:  # unit rows of rounding noise would measure something
        return NCDistances(math.sqrt(2), math.sqrt(2), omega)
    m = _unit_rows(c)
    S = m @ m.T if d > K else m.T @ m  # the smaller Gram: ‖M̃M̃ᵀ‖_F = ‖M̃ᵀM̃‖_F, and the traces agree
    g_norm = float(torch.linalg.matrix_norm(S))  # ‖G‖_F
    if g_norm == 0.0:  # no rows left: resembles neither target
        return NCDistances(math.sqrt(2), math.sqrt(2), omega)
    theta = _circle_angles(K, omega, m.device)
    s, a, b = (m.T @ torch.stack([torch.ones_like(theta), torch.cos(theta), torch.sin(theta)], dim=1)).T
    inner_etf = (K * float(torch.trace(S)) - float(s @ s)) / (K - 1)
    norm_etf = K / math.sqrt(K - 1)
    inner_cyc = float(a @ a + b @ b)
    norm_cyc = K if (2 * omega) % K == 0 else K / math.sqrt(2)

    def dist(inner: float, t_norm: float) -> float:
        return math.sqrt(max(0.0, 2.0 - 2.0 * inner / (g_norm * t_norm)))

    return NCDistances(dist(inner_etf, norm_etf), dist(inner_cyc, norm_cyc), omega)


def nc_distances(M, omega: int | None = None) -> NCDistances:
    """Distances of the unit-row Gram of M (K×d: W's rows or class means) to the simplex ETF and to the circle at
    frequency omega, without forming K×K (module docstring). omega defaults to the nearest circle: the f ≥ 1 that
    maximises ⟨G, T_cyc(f)⟩/‖T_cyc(f)‖_F = p_f/√2 (p_f/1 at the Nyquist bin), p_f the energy of the unit rows."""
    c = _centre(_as_matrix(M, "M"), "M")
    if omega is not None:
        omega = _check_omega(omega, c.x.shape[0])
    elif c.degenerate:  # all rows equal: no dominant frequency (as fourier_spectrum says), nothing to measure
        omega = 0
    else:
        score = _power(_centre(_unit_rows(c), "M")).cpu()[1:] / _weights(c.x.shape[0], "cpu")[1:].sqrt()
        omega = int(score.argmax()) + 1
    return _nc_distances(c, omega)


def class_means(h, labels, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(K×d float64 class means, K per-class counts) of features h (N×d); classes without samples get a zero row."""
    h = _as_features(h)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    K = num_classes if num_classes is not None else int(torch.as_tensor(labels).max()) + 1
    labels = _labels(labels, h.shape[0], K, h.device)
    counts = torch.bincount(labels, minlength=K)
    sums = torch.zeros((K, h.shape[1]), dtype=torch.float64, device=h.device).index_add_(0, labels, h)
    return sums / counts.clamp_min(1).unsqueeze(1).double(), counts


def nc1(h, labels, num_classes: int | None = None) -> float:
    """NC1 = tr(Σ_W Σ_B⁺)/K: within-class spread measured in units of the between-class spread (0 = collapse).
    Σ_W = mean over samples of (h − μ_y)(h − μ_y)ᵀ; Σ_B = mean over the K classes present of (μ_c − μ)(μ_c − μ)ᵀ.
    Needs samples of at least 2 classes (ValueError); NaN when their means coincide exactly (no unit to measure in:
    Σ_B⁺ = 0 read as 0, perfect collapse, for any spread); means equal up to rounding give a huge value."""
    h = _as_features(h)
    means, counts = class_means(h, labels, num_classes)
    labels = torch.as_tensor(labels, device=h.device).long()
    present = counts > 0
    K = int(present.sum())
    if K < 2:
        raise ValueError(f"nc1 needs samples of at least 2 classes, got {K}")
    resid = h - means[labels]
    sigma_w = resid.T @ resid / h.shape[0]
    mu = means[present]
    mu = mu - mu.mean(dim=0)
    sigma_b = mu.T @ mu / K
    # drop directions with no between-class spread beyond rounding (float32 features leave ~1e-14 relative)
    with _lapack_on_one_thread(sigma_b.device):
        pinv = torch.linalg.pinv(sigma_b, hermitian=True, rtol=1e-10)
    if not bool(pinv.any()):
        return math.nan
    return float(torch.trace(sigma_w @ pinv)) / K


# --------------------------------------------------------------------------------------------
# verdict and summary
# --------------------------------------------------------------------------------------------


def classify(rho2: float, freq_count: int, n: int, etf_distance: float, *, axis_ratio: float,
             degenerate: bool = False, cyclic_rho2: float = CYCLIC_RHO2,
             cyclic_min_axis_ratio: float = CYCLIC_MIN_AXIS_RATIO, etf_max_distance: float = ETF_MAX_DISTANCE,
             multi_max_freq_fraction: float = MULTI_MAX_FREQ_FRACTION) -> str:
    """The verdict rule of the module docstring, for one matrix with n rows."""
    _check_rule(cyclic_rho2, cyclic_min_axis_ratio, etf_max_distance, multi_max_freq_fraction)
    _check_measures(rho2, freq_count, n, etf_distance, axis_ratio)
    if degenerate or freq_count == 0:
        return "unstructured"
    # ρ₂ ≥ share holds exactly, but share comes from an FFT and ρ₂ from a Gram: at share = ρ₂ = 0.9 the two
    # can differ by rounding, and a one-frequency layout must not fall through to "unstructured" for it
    if freq_count == 1 and rho2 >= cyclic_rho2 * (1 - 1e-6) and axis_ratio >= cyclic_min_axis_ratio:
        return "cyclic"
    if etf_distance <= etf_max_distance:
        return "etf-like"
    if 2 <= freq_count <= multi_max_freq_fraction * (n // 2) and axis_ratio >= cyclic_min_axis_ratio:
        return "multi-frequency"
    return "unstructured"


@dataclass
class GeometrySummary:
    """Everything `summarize` measures, as plain Python numbers (see the module docstring for each formula).
    Fields ending in _W describe the classifier W (K×d), in _E the embedding E (P×d)."""
    verdict: str            # W's geometry: "cyclic", "multi-frequency", "etf-like" or "unstructured"
    verdict_E: str          # E's, by the same rule
    K: int                  # rows of W (classes)
    P: int                  # rows of E (tokens)
    d: int                  # columns of W (E has as many unless summarize ran with same_space=False)
    mass: float             # the share of energy that the counts below must hold
    rho2_W: float           # top-2 energy share of the centred rows
    rho2_E: float
    stable_rank_W: float    # Σσᵢ²/σ₁²
    stable_rank_E: float
    axis_ratio_W: float     # σ₂/σ₁: 1 for a circle, 0 for points on a line
    axis_ratio_E: float
    dim_count_W: int        # fewest principal directions holding `mass` of the energy (2 per circle)
    dim_count_E: int
    omega_W: int            # dominant frequency over the row index, 1 … ⌊n/2⌋ (0 if the matrix has no energy)
    omega_E: int
    freq_share_W: float     # its share of the non-constant energy
    freq_share_E: float
    freq_count_W: int       # fewest frequencies holding `mass` of the non-constant energy: 1 for one circle
    freq_count_E: int
    top_freqs_W: tuple      # the strongest of those frequencies, by decreasing energy (at most `max_listed`)
    top_freqs_E: tuple
    shared_omega: bool      # omega_W == omega_E (> 0): the layers chose the same dominant frequency
    freq_overlap: float     # |F_W ∩ F_E| / |F_W ∪ F_E| of the full sets of freq_count_W and freq_count_E frequencies
    radius_cv_W: float      # circle fit at omega_W in W's own top-2 plane
    radius_cv_E: float
    phase_r2_W: float
    phase_r2_E: float
    gap_error_W: float
    gap_error_E: float
    locking: float | None   # share of E's centred energy in W's top-2 plane (None: W and E in different spaces)
    etf_distance_W: float   # dist of W's unit-row Gram to the simplex ETF, in [0, 2]
    cyclic_distance_W: float  # … to the circle at omega_W
    etf_distance_E: float
    cyclic_distance_E: float
    phase_angle: float | None = None  # mean |in-plane angle| between h(a, b) and w_c (when h, labels are given)
    phase_cos: float | None = None    # mean cos of that angle
    nc1: float | None = None          # tr(Σ_W Σ_B⁺)/K of h (when h, labels are given)

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index of two sets of frequencies."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    size = int(max(a.max() if a.numel() else 0, b.max() if b.numel() else 0)) + 1
    in_a = torch.zeros(size, dtype=torch.bool)
    in_b = torch.zeros(size, dtype=torch.bool)
    in_a[a] = True
    in_b[b] = True
    return int((in_a & in_b).sum()) / int((in_a | in_b).sum())


def summarize(W, E, *, h=None, labels=None, mass: float = FREQ_MASS, cyclic_rho2: float = CYCLIC_RHO2,
              cyclic_min_axis_ratio: float = CYCLIC_MIN_AXIS_RATIO, etf_max_distance: float = ETF_MAX_DISTANCE,
              multi_max_freq_fraction: float = MULTI_MAX_FREQ_FRACTION, max_listed: int = 8,
              same_space: bool = True) -> GeometrySummary:
    """Measure W (K×d classifier) and E (P×d embedding) and name the geometry.

    h, labels: hidden features (N×d) of a sample of pairs (a, b) and their labels (a + b) mod P; when given, the
    phase alignment with W and NC1 are filled in. The threshold keywords are those of the verdict rule (module
    docstring; defaults FREQ_MASS, CYCLIC_RHO2, CYCLIC_MIN_AXIS_RATIO, ETF_MAX_DISTANCE, MULTI_MAX_FREQ_FRACTION).
    max_listed caps the top_freqs tuples (the counts and the overlap use the full sets).

    same_space=False: W and E live in different spaces (a nonlinearity or a hidden layer between them, e.g.
    embed-mlp's W is K×m while E is P×d); their widths may differ and locking is None (frequencies are still
    compared). With the default True, different widths are a ValueError."""
    _check_mass(mass)
    _check_rule(cyclic_rho2, cyclic_min_axis_ratio, etf_max_distance, multi_max_freq_fraction)
    if not isinstance(same_space, (bool, np.bool_)):
        raise TypeError(f"same_space must be True or False, got {same_space!r}")
    if isinstance(max_listed, bool) or not isinstance(max_listed, numbers.Integral) or max_listed < 0:
        raise ValueError(f"max_listed must be an integer >= 0, got {max_listed!r}")
    if (h is None) != (labels is None):
        raise ValueError("give both h and labels, or neither")
    W, E = _as_matrix(W, "W"), _as_matrix(E, "E")
    if same_space:
        _check_same_d(W, E, "E", hint="; for W and E in different spaces (embed-mlp) pass same_space=False")
    cw, ce = _centre(W, "W"), _centre(E, "E")
    fields, freqs = {}, {}
    for tag, c in (("W", cw), ("E", ce)):
        sp, fs = _spectrum(c, mass), _fourier(c, mass)
        cf = _circle_fit(c, fs.omega)
        ncd = _nc_distances(c, fs.omega)
        freqs[tag] = fs
        fields.update({
            f"rho2_{tag}": sp.rho2, f"stable_rank_{tag}": sp.stable_rank, f"axis_ratio_{tag}": sp.axis_ratio,
            f"dim_count_{tag}": sp.dim_count,
            f"omega_{tag}": fs.omega, f"freq_share_{tag}": fs.share, f"freq_count_{tag}": fs.count,
            f"top_freqs_{tag}": tuple(int(f) for f in fs.top[:max_listed]),
            f"radius_cv_{tag}": cf.radius_cv, f"phase_r2_{tag}": cf.phase_r2, f"gap_error_{tag}": cf.gap_error,
            f"etf_distance_{tag}": ncd.etf, f"cyclic_distance_{tag}": ncd.cyclic,
        })
        fields[f"verdict_{tag}"] = classify(
            sp.rho2, fs.count, c.x.shape[0], ncd.etf, axis_ratio=sp.axis_ratio, degenerate=c.degenerate,
            cyclic_rho2=cyclic_rho2, cyclic_min_axis_ratio=cyclic_min_axis_ratio, etf_max_distance=etf_max_distance,
            multi_max_freq_fraction=multi_max_freq_fraction)
    fw, fe = freqs["W"], freqs["E"]
    fields["verdict"] = fields.pop("verdict_W")
    extra = {}
    if h is not None:
        h = _as_features(h)
        _check_same_d(W, h, "h")
        y = _labels(labels, h.shape[0], W.shape[0], h.device)
        pa = _phase_alignment(cw, h, y)
        extra = dict(phase_angle=pa.mean_abs_angle, phase_cos=pa.mean_cos, nc1=nc1(h, y, W.shape[0]))
    return GeometrySummary(
        K=W.shape[0], P=E.shape[0], d=W.shape[1], mass=mass,
        shared_omega=fw.omega == fe.omega and fw.omega > 0, freq_overlap=_overlap(fw.top, fe.top),
        locking=_locking(cw, ce) if same_space else None, **fields, **extra)


# --------------------------------------------------------------------------------------------
# layer order
# --------------------------------------------------------------------------------------------


def _rho2_pair(item) -> tuple[int, float | None, float | None]:
    """(step, ρ₂(W), ρ₂(E)) from one entry of a training series (see layer_order)."""
    expected = "a series entry must be (step, summary), (step, W, E) or a dict with 'step'"
    if isinstance(item, Mapping):
        if "step" not in item:
            raise ValueError(f"{expected}, got a dict with keys {sorted(item)}")
        return int(item["step"]), item.get("rho2_W"), item.get("rho2_E")
    try:
        item = tuple(item)
    except TypeError:
        raise ValueError(f"{expected}, got {item!r}") from None
    if len(item) == 3:
        step, W, E = item
        return int(step), spectrum(W).rho2, spectrum(E).rho2
    if len(item) != 2:
        raise ValueError(f"{expected}, got a sequence of length {len(item)}")
    step, s = item
    if isinstance(s, GeometrySummary):
        return int(step), s.rho2_W, s.rho2_E
    if isinstance(s, Mapping):
        return int(step), s.get("rho2_W"), s.get("rho2_E")
    raise ValueError(f"cannot read rho2 from a {type(s).__name__} at step {step}")


def layer_order(series: Iterable, threshold: float = LAYER_ORDER_THRESHOLD) -> tuple[int | None, int | None]:
    """(t_W, t_E): the first step at which ρ₂(W), resp. ρ₂(E), reaches `threshold`; None if it never does.

    series: entries (step, GeometrySummary), (step, dict with rho2_W / rho2_E), (step, W, E) tensors, or dicts with
    'step', 'rho2_W', 'rho2_E', in any order. The claim to test is t_W < t_E (the classifier first)."""
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a ρ₂ in (0, 1], got {threshold!r}")  # NaN: never reached, silently
    t_w = t_e = None
    for step, rw, re in sorted((_rho2_pair(item) for item in series), key=lambda r: r[0]):
        if t_w is None and rw is not None and rw >= threshold:
            t_w = step
        if t_e is None and re is not None and re >= threshold:
            t_e = step
    return t_w, t_e
