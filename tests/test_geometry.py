"""fastcyclic.geometry and fastcyclic.plots on matrices whose geometry is known exactly.

Facts used (the project's design notes, §1): an ideal cyclic W (rows r·(cos 2πωk/K, sin 2πωk/K), rotated into d
dimensions) has two singular values r√(K/2), so ρ₂ = 1; an ideal simplex ETF has K − 1 singular values
r√(K/(K − 1)), so ρ₂ = 2/(K − 1).
The neural-collapse distances are checked against the K×K Gram matrices, formed here only, at small K.
"""
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastcyclic import geometry as g

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# constructed layouts
# --------------------------------------------------------------------------------------------


def rotation(d, gen):
    """A random d×d orthogonal matrix."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def sinusoids(n, freqs, amps=None, phases=None):
    """n × 2m matrix of columns amp·cos(2πfk/n + phase), amp·sin(…) for each frequency f."""
    k = torch.arange(n, dtype=F64)
    cols = []
    for i, f in enumerate(freqs):
        a = 1.0 if amps is None else amps[i]
        p = 0.0 if phases is None else phases[i]
        angle = 2 * math.pi * f * k / n + p
        cols += [a * torch.cos(angle), a * torch.sin(angle)]
    return torch.stack(cols, dim=1)


def embed(X, d, gen, offset=True):
    """X (n×m, m ≤ d) rotated into d dimensions by a random orthogonal matrix, plus a random shared row."""
    Q = rotation(d, gen)
    Y = X @ Q[: X.shape[1]]
    if offset:
        Y = Y + torch.randn(1, d, generator=gen, dtype=F64)
    return Y


def ideal_cyclic(K, omega, d, gen, r=None):
    r = float(0.1 + 5 * torch.rand(1, generator=gen)) if r is None else r
    phase = float(2 * math.pi * torch.rand(1, generator=gen))
    return embed(r * sinusoids(K, [omega], phases=[phase]), d, gen), r


def simplex_etf(K, d, gen, r=1.0):
    """K rows of norm r with pairwise cosine −1/(K − 1), rotated into d ≥ K dimensions."""
    M = r * math.sqrt(K / (K - 1)) * (torch.eye(K, dtype=F64) - 1.0 / K)
    return embed(M, d, gen)


def numeric_fields(summary):
    return {k: v for k, v in summary.to_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# the ideal circle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K,omega", [(31, 1), (31, 7), (31, 30), (64, 5), (64, 31), (127, 50), (12, 5), (5, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ideal_cyclic(gen, K, omega, dtype):
    W, r = ideal_cyclic(K, omega, 16, gen)
    E, _ = ideal_cyclic(K, omega, 16, gen)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    s = g.summarize(W.to(dtype), E.to(dtype))
    folded = min(omega, K - omega)  # ω and K − ω are the same circle
    assert s.verdict == "cyclic" and s.verdict_E == "cyclic"
    assert (s.omega_W, s.omega_E) == (folded, folded) and s.shared_omega
    assert s.freq_count_W == 1 and s.top_freqs_W == (folded,) and s.freq_overlap == 1.0
    assert s.rho2_W == pytest.approx(1, abs=tol) and s.rho2_E == pytest.approx(1, abs=tol)
    assert s.stable_rank_W == pytest.approx(2, abs=tol * 10) and s.dim_count_W == 2
    assert s.axis_ratio_W == pytest.approx(1, abs=tol * 10)
    assert s.freq_share_W == pytest.approx(1, abs=tol)
    assert s.radius_cv_W == pytest.approx(0, abs=tol)
    assert s.phase_r2_W == pytest.approx(1, abs=tol)
    assert s.gap_error_W == pytest.approx(0, abs=tol * K)
    assert s.cyclic_distance_W == pytest.approx(0, abs=math.sqrt(tol))
    sv = g.spectrum(W.to(dtype)).singular_values
    assert sv[:2].tolist() == pytest.approx([r * math.sqrt(K / 2)] * 2, rel=tol)
    assert float(sv[2:].abs().max()) <= math.sqrt(tol) * r * math.sqrt(K)


def single_frequency_ellipse(K, omega, axis_ratio, d, gen):
    """One frequency with its sine direction scaled by axis_ratio: an ellipse; a line (rank 1) at 0."""
    X = sinusoids(K, [omega], phases=[float(2 * math.pi * torch.rand(1, generator=gen))])
    return embed(X * torch.tensor([1.0, axis_ratio], dtype=F64), d, gen)


@pytest.mark.parametrize("axis_ratio,verdict",
                         [(1.0, "cyclic"), (0.6, "cyclic"), (0.4, "unstructured"), (0.0, "unstructured")])
def test_a_single_frequency_is_cyclic_only_as_a_circle(gen, axis_ratio, verdict):
    """ρ₂ is 1 and one frequency holds all the energy at any axis ratio, down to a line, where ρ₂ = 1 is trivial
    (rank 1): the verdict asks for a second direction, σ₂/σ₁ ≥ CYCLIC_MIN_AXIS_RATIO."""
    K, omega = 31, 7
    W = single_frequency_ellipse(K, omega, axis_ratio, 8, gen)
    s = g.summarize(W, W)
    assert s.freq_count_W == 1 and s.omega_W == omega and s.rho2_W == pytest.approx(1, abs=1e-9)
    assert s.axis_ratio_W == pytest.approx(axis_ratio, abs=1e-6)  # σ₂ from an eigenvalue: √(rounding)
    assert s.verdict == verdict and s.verdict_E == verdict


def test_nyquist_frequency_is_a_line_not_a_circle(gen):
    """At even n the frequency n/2 is (−1)^k: its sinusoids span one direction, so it is never a circle."""
    K = 64
    W = embed(sinusoids(K, [K // 2], phases=[0.3]), 8, gen)
    s = g.summarize(W, W)
    assert (s.omega_W, s.freq_count_W, s.dim_count_W) == (K // 2, 1, 1)
    assert s.rho2_W == pytest.approx(1, abs=1e-9) and s.axis_ratio_W == pytest.approx(0, abs=1e-6)
    assert s.verdict == "unstructured"


@pytest.mark.parametrize("K", [61, 1031])
def test_several_frequencies_on_a_line_are_not_circles(K, gen):
    """A ramp k·v (its energy falls as 1/f², ~6 frequencies at any K) and two cosines summed in one column: rank 1,
    so not the "few circles" of multi-frequency (they were), as one frequency on a line is not cyclic."""
    k = torch.arange(K, dtype=F64)[:, None]
    angle = 2 * math.pi * k / K
    for column in (k, torch.cos(3 * angle) + torch.cos(7 * angle)):
        s = g.summarize(embed(column, 8, gen), embed(column, 8, gen))
        assert s.freq_count_W >= 2 and s.dim_count_W == 1 and s.axis_ratio_W < 1e-6
        assert s.verdict == s.verdict_E == "unstructured"
    two_circles = embed(sinusoids(K, [3, 7], amps=[1.0, 0.6]), 8, gen)  # the real thing still is multi-frequency
    assert g.summarize(two_circles, two_circles).verdict == "multi-frequency"


def test_circle_direction_and_phase(gen):
    """Angles that run with +ω or with −ω (rows in reverse order) both fit exactly, and the fitted
    direction s and offset φ reproduce the angles seen in the top-2 plane."""
    K, omega = 29, 4
    X = embed(sinusoids(K, [omega], phases=[0.7]), 6, gen)
    k = torch.arange(K, dtype=F64)
    for Y in (X, X.flip(0)):
        fit = g.circle_fit(Y)
        assert fit.phase_r2 == pytest.approx(1, abs=1e-12) and fit.omega == omega
        u = g.project_top2(Y)
        theta = torch.atan2(u[:, 1], u[:, 0])
        fitted = fit.direction * 2 * math.pi * omega * k / K + fit.phase
        assert torch.allclose(torch.cos(theta - fitted), torch.ones(K, dtype=F64))
    # a wrong frequency gives a poor phase fit but the same evenly spaced points
    wrong = g.circle_fit(X, omega=omega + 1)
    assert wrong.phase_r2 < 0.1 and wrong.gap_error == pytest.approx(0, abs=1e-9)


def test_circle_fit_detects_uneven_points(gen):
    K = 40
    k = torch.arange(K, dtype=F64)
    angle = 2 * math.pi * 3 * k / K
    two_radii = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * (1 + 0.5 * (k % 2)).unsqueeze(1)
    fit = g.circle_fit(embed(two_radii, 5, gen))
    assert fit.radius_cv == pytest.approx(0.2, abs=1e-9)  # radii 1 and 1.5: std 0.25 / mean 1.25
    assert fit.phase_r2 == pytest.approx(1, abs=1e-12) and fit.gap_error == pytest.approx(0, abs=1e-9)
    angle = angle + 0.3 * torch.sin(2 * math.pi * k / K)  # non-linear phase on one circle
    fit = g.circle_fit(embed(torch.stack([torch.cos(angle), torch.sin(angle)], 1), 5, gen))
    assert fit.gap_error > 0.05
    assert 0.5 < fit.phase_r2 < 0.999
    # phase_r2 is |mean e^(i·phase error)|², not its modulus (0.978 here); up to the shift of the centring
    expected = float(torch.polar(torch.ones(K, dtype=F64), 0.3 * torch.sin(2 * math.pi * k / K)).mean().abs()) ** 2
    assert fit.phase_r2 == pytest.approx(expected, abs=1e-5) and expected == pytest.approx(0.9558, abs=1e-4)


# --------------------------------------------------------------------------------------------
# several circles, the simplex, noise
# --------------------------------------------------------------------------------------------


def test_two_frequencies(gen):
    K = 61
    W = embed(sinusoids(K, [3, 10], phases=[0.2, 1.1]), 16, gen)
    E = embed(sinusoids(K, [10, 17], phases=[0.5, 2.0]), 16, gen)
    s = g.summarize(W, E)
    assert s.verdict == "multi-frequency" and s.verdict_E == "multi-frequency"
    assert s.freq_count_W == 2 and set(s.top_freqs_W) == {3, 10} and set(s.top_freqs_E) == {10, 17}
    assert s.freq_overlap == pytest.approx(1 / 3)  # {3, 10} vs {10, 17}
    assert s.rho2_W == pytest.approx(0.5, abs=1e-9) and s.dim_count_W == 4
    ev = g.spectrum(W).singular_values.square()
    assert float(ev[:4].sum() / ev.sum()) == pytest.approx(1, abs=1e-12)  # rank 4
    assert ev[:4].tolist() == pytest.approx([K / 2] * 4, rel=1e-9)
    assert s.freq_share_W == pytest.approx(0.5, abs=1e-9)


def test_unequal_frequencies_count_and_mass(gen):
    """Energies 0.8, 0.15, 0.05: one frequency holds 80 %, two hold 95 %."""
    K = 64
    X = embed(sinusoids(K, [2, 9, 21], amps=[math.sqrt(0.8), math.sqrt(0.15), math.sqrt(0.05)]), 10, gen)
    assert g.fourier_spectrum(X, mass=0.9).count == 2
    assert g.fourier_spectrum(X, mass=0.75).count == 1
    assert g.fourier_spectrum(X, mass=1.0).count == 3
    fs = g.fourier_spectrum(X)
    assert fs.top.tolist() == [2, 9] and fs.share == pytest.approx(0.8)


@pytest.mark.parametrize("K,d", [(10, 12), (40, 48)])
def test_simplex_etf(gen, K, d):
    M = simplex_etf(K, d, gen, r=2.5)
    s = g.summarize(M, M)
    assert s.verdict == "etf-like"
    assert s.rho2_W == pytest.approx(2 / (K - 1), rel=1e-9)
    assert s.stable_rank_W == pytest.approx(K - 1, rel=1e-9)
    sv = g.spectrum(M).singular_values
    assert sv[: K - 1].tolist() == pytest.approx([2.5 * math.sqrt(K / (K - 1))] * (K - 1), rel=1e-9)
    assert s.etf_distance_W == pytest.approx(0, abs=1e-6)
    assert s.cyclic_distance_W > 0.5


def test_gaussian_noise_is_unstructured(gen):
    X = torch.randn(257, 16, generator=gen, dtype=F64)
    Y = torch.randn(257, 16, generator=gen, dtype=F64)
    s = g.summarize(X, Y)
    assert s.verdict == "unstructured" and s.verdict_E == "unstructured"
    assert s.freq_count_W > g.MULTI_MAX_FREQ_FRACTION * 128
    assert s.rho2_W < 0.4 and s.locking < 0.5
    assert s.etf_distance_W > 1.0  # 257 points in 16 dimensions cannot form a simplex


def test_nyquist_and_parseval(gen):
    """Energies per frequency add up to ‖X‖_F² for odd and even n; the Nyquist bin is counted once."""
    for n in (33, 34):
        X = torch.randn(n, 5, generator=gen, dtype=F64) + 3.0
        fs = g.fourier_spectrum(X)
        assert float(fs.power.sum()) == pytest.approx(float(X.square().sum()), rel=1e-12)
        assert len(fs.power) == n // 2 + 1
    n = 34
    alt = torch.tensor([(-1.0) ** k for k in range(n)], dtype=F64)
    X = torch.stack([alt, 2 * alt, torch.zeros(n, dtype=F64)], 1)  # all energy at f = n/2
    fs = g.fourier_spectrum(X)
    assert (fs.omega, fs.count) == (n // 2, 1) and fs.share == pytest.approx(1)
    assert float(fs.power[n // 2]) == pytest.approx(5 * n)
    # one cosine column at f = 5: its energy n/2 sits at f = 5 (two rfft bins f and n − f, one entry)
    cos = torch.cos(2 * math.pi * 5 * torch.arange(n, dtype=F64) / n).unsqueeze(1)
    assert float(g.fourier_spectrum(cos).power[5]) == pytest.approx(n / 2)


# --------------------------------------------------------------------------------------------
# invariances, dtypes, degenerate input
# --------------------------------------------------------------------------------------------


def test_invariant_to_rotation_and_scale(gen):
    K, d = 101, 12
    noise = torch.randn(K, d, generator=gen, dtype=F64)
    W = embed(sinusoids(K, [4, 11, 30], amps=[1.0, 0.6, 0.3]), d, gen) + 0.05 * noise
    E = embed(sinusoids(K, [4, 11], amps=[1.0, 0.8]), d, gen) + 0.1 * torch.randn(K, d, generator=gen, dtype=F64)
    h = torch.randn(50, d, generator=gen, dtype=F64)
    y = torch.randint(0, K, (50,), generator=gen)
    base = g.summarize(W, E, h=h, labels=y)
    Q = rotation(d, gen)
    moved = g.summarize(3.7 * W @ Q, 0.2 * E @ Q, h=h @ Q, labels=y)
    assert moved.verdict == base.verdict and moved.top_freqs_W == base.top_freqs_W
    a, b = numeric_fields(base), numeric_fields(moved)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-7, abs=1e-9), key


def test_float32_matches_float64(gen):
    K, d = 97, 8
    W = embed(sinusoids(K, [5, 20], amps=[1.0, 0.5]), d, gen) + 0.1 * torch.randn(K, d, generator=gen, dtype=F64)
    E = torch.randn(K, d, generator=gen, dtype=F64)
    a, b = g.summarize(W, E), g.summarize(W.float(), E.float())
    assert a.verdict == b.verdict and a.top_freqs_W == b.top_freqs_W
    for key, value in numeric_fields(a).items():
        assert numeric_fields(b)[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_all_zero_and_constant_rows():
    for X in (torch.zeros(10, 4), torch.full((9, 3), 2.5, dtype=F64)):
        s = g.summarize(X, X)
        assert s.verdict == "unstructured" and s.verdict_E == "unstructured"
        for key, value in numeric_fields(s).items():
            assert math.isfinite(value), key
        assert (s.rho2_W, s.freq_count_W, s.omega_W, s.locking) == (0.0, 0, 0, 0.0)
        assert not s.shared_omega
    json.dumps(g.summarize(torch.zeros(10, 4), torch.zeros(10, 4)).to_dict())


def test_a_small_circle_on_a_large_offset_is_measured_not_called_equal_rows(gen):
    """Rows that differ by 1e-10 of their size (float64 resolves it) read "unstructured", ρ₂ 0: the equal-rows cut-off
    was 1e-20 of the energy, 1e12 times what centring in float64 leaves."""
    X, _ = ideal_cyclic(97, 5, 8, gen, r=1e-10)
    s = g.summarize(X + 1.0, X + 1.0)
    assert s.verdict == "cyclic" and s.omega_W == 5
    assert s.rho2_W == pytest.approx(1.0, abs=1e-9) and s.cyclic_distance_W == pytest.approx(0.0, abs=1e-4)


def test_equal_rows_have_no_distances_to_measure(gen):
    """Rows equal up to rounding: the distances were measured on unit rows of rounding noise (ETF 1.3, and the
    cyclic one against ω = 0, an all-ones Gram), and nc_distances gave other numbers on the same matrix."""
    X = torch.ones(10, 4, dtype=F64) + 1e-14 * torch.randn(10, 4, generator=gen, dtype=F64)
    s = g.summarize(X, X)
    assert (s.etf_distance_W, s.cyclic_distance_W) == (math.sqrt(2), math.sqrt(2)) and s.verdict == "unstructured"
    assert g.nc_distances(X) == g.NCDistances(math.sqrt(2), math.sqrt(2), 0)
    assert g.nc_distances(X, omega=3) == g.NCDistances(math.sqrt(2), math.sqrt(2), 3)


def test_float32_frequency_share_does_not_depend_on_the_mean(gen):
    """The FFT read the raw rows: the float32 rounding of a mean of 1e4 spread over every bin (energy off ω 1.9e-4,
    where a float64 DFT of the same float32 numbers gives 4.9e-6)."""
    circle = sinusoids(97, [5]) @ rotation(64, gen)[:2]
    X = (circle + 1e4).float()
    exact = g.fourier_spectrum(X.double())  # the same numbers, transformed in float64
    assert exact.omega == 5 and 1 - exact.share > 1e-6  # the float32 rounding of the data itself
    assert g.fourier_spectrum(X).share == pytest.approx(exact.share, abs=1e-7)
    # float32 entries near its largest value: centred, they can exceed it (inf before scaling)
    big = (circle * 1e37).float()
    big[:, 0] = -3e38
    big[0, 0] = 3e38
    assert float((big.double() - big.double().mean(0)).abs().max()) > torch.finfo(torch.float32).max
    assert g.fourier_spectrum(big).share == pytest.approx(g.fourier_spectrum(big.double()).share, abs=1e-6)


def test_bad_input():
    ok = torch.randn(8, 4)
    cases = [
        (torch.randn(8), "2-D.*shape \\(8,\\)"),
        (torch.randn(2, 8, 4), "2-D.*shape \\(2, 8, 4\\)"),
        (torch.randn(2, 4), "at least 3 rows.*\\(2, 4\\)"),
        (torch.randn(8, 0), "at least 1 column"),
        (torch.randn(8, 4, dtype=torch.complex64), "real"),
    ]
    for X, match in cases:
        with pytest.raises(ValueError, match=match):
            g.summarize(X, ok)
    bad = ok.clone()
    bad[5, 2] = float("nan")
    with pytest.raises(ValueError, match="W has 1 non-finite.*row 5, column 2: nan"):
        g.summarize(bad, ok)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="E has 2 non-finite.*row 1, column 1: inf"):
        g.summarize(ok, bad)
    with pytest.raises(ValueError, match="W has d=4.*E has d=5"):
        g.summarize(ok, torch.randn(8, 5))
    with pytest.raises(ValueError, match="mass"):
        g.summarize(ok, ok, mass=0)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 8\\)"):
        g.phase_alignment(ok, torch.randn(3, 4), torch.tensor([0, 8, 1]))
    with pytest.raises(ValueError, match="both h and labels"):
        g.summarize(ok, ok, h=torch.randn(3, 4))


@pytest.mark.parametrize("call,error,match", [
    (lambda X: g.circle_fit(X, omega=0), ValueError, r"omega must be in \[1, 6\] for 7 rows, got 0"),
    (lambda X: g.circle_fit(X, omega=7), ValueError, "omega must be in"),
    (lambda X: g.circle_fit(X, omega=1.5), TypeError, "omega must be an integer frequency, got 1.5"),
    (lambda X: g.circle_fit(X, omega=torch.tensor(True)), TypeError, "omega must be an integer frequency"),
    (lambda X: g.circle_fit(X, omega=torch.tensor([3])), TypeError, "omega must be an integer frequency"),
    (lambda X: g.nc_distances(X, omega=-1), ValueError, "omega must be in .* got -1"),
    (lambda X: g.summarize(X, X, cyclic_rho2=float("nan")), ValueError, r"cyclic_rho2 must be a number in \[0, 1\]"),
    (lambda X: g.summarize(X, X, etf_max_distance=-0.1), ValueError,
     r"etf_max_distance must be a number in \[0, inf\]"),
    (lambda X: g.classify(0.95, 1, 7, 0.5, axis_ratio=1.0, cyclic_min_axis_ratio=2), ValueError,
     "cyclic_min_axis_ratio must be"),
    (lambda X: g.summarize(X, X, same_space="no"), TypeError, "same_space must be True or False, got 'no'"),
    (lambda X: g.summarize(X, X, max_listed=-1), ValueError, "max_listed must be an integer >= 0, got -1"),
    (lambda X: g.layer_order([1, 2, 3]), ValueError, "a series entry must be .* got 1"),
    (lambda X: g.class_means(X, torch.tensor([0, 1, 2, 0, 1, 2, 0]), num_classes=-1), ValueError,
     "num_classes must be an integer >= 1, got -1"),
    (lambda X: g.nc1(X, torch.tensor([0, 1, 2, 0, 1, 2, 0]), num_classes=1.5), ValueError, "num_classes must be"),
    # these gave 0.0 (perfect collapse), TypeError without the name, "etf-like", (None, None), KeyError
    (lambda X: g.nc1(X, torch.zeros(7, dtype=torch.long)), ValueError, "at least 2 classes, got 1"),
    (lambda X: g.spectrum(X, "0.9"), TypeError, "mass must be a number in \\(0, 1\\], got '0.9'"),
    (lambda X: g.spectrum(X, True), TypeError, "mass must be a number"),
    (lambda X: g.classify(float("nan"), 1, 97, 0.1, axis_ratio=1.0), ValueError,
     "rho2 must be a measured value in \\[0, 1\\], got nan"),
    (lambda X: g.classify(0.5, -1, 97, 0.5, axis_ratio=1.0), ValueError, "freq_count must be an integer >= 0"),
    (lambda X: g.classify(0.5, 2, 97, 2.5, axis_ratio=1.0), ValueError, "etf_distance must be a measured value"),
    (lambda X: g.layer_order([{"step": 1, "rho2_W": 1.0}], threshold=float("nan")), ValueError,
     "threshold must be a ρ₂ in \\(0, 1\\], got nan"),
    (lambda X: g.layer_order([{"rho2_W": 1.0}]), ValueError, "a dict with 'step', got a dict with keys \\['rho2_W'\\]"),
], ids=["omega-0", "omega-n", "omega-float", "omega-bool-tensor", "omega-1-d-tensor", "nc-omega", "rho2-nan",
        "etf-negative", "classify-ratio", "same-space", "max-listed", "layer-order-entry", "num-classes",
        "nc1-num-classes", "nc1-one-class", "mass-string", "mass-bool", "classify-nan-rho2", "classify-count",
        "classify-distance", "layer-order-nan", "layer-order-no-step"])
def test_bad_options_are_named(call, error, match):
    """Each of these returned a meaningless fit or verdict, or failed inside with another error."""
    with pytest.raises(error, match=match):
        call(torch.randn(7, 4, dtype=torch.float64))


def test_classify_takes_measures_as_0_dim_tensors_and_numpy_numbers():
    assert g.classify(torch.tensor(0.95), 1, 97, torch.tensor(0.5), axis_ratio=np.float32(1.0)) == "cyclic"


def test_integer_omegas_of_numpy_and_torch_and_a_numpy_bool_are_taken():
    X = torch.randn(7, 4, dtype=torch.float64)
    fits = [g.circle_fit(X, omega=w) for w in (2, np.int64(2), torch.tensor(2))]
    assert all(f == fits[0] for f in fits) and fits[0].omega == 2
    assert g.nc_distances(X, omega=torch.tensor(3)) == g.nc_distances(X, omega=3)
    assert g.summarize(X, X, same_space=np.bool_(True)).locking is not None


@pytest.mark.parametrize("scale", [1e-30, 1e-34, 1e20, 1e30])  # normal floats (a trainer sets flush-denormal)
def test_float32_at_extreme_scales(gen, scale):
    """Weights decayed to 1e-30 (or blown up to 1e30) in float32: the FFT's sum of squares in float32 underflowed
    (or overflowed), giving "unstructured", omega 1 and NaN in the summary's JSON."""
    W, _ = ideal_cyclic(97, 5, 8, gen, r=1.0)
    X = (W * scale).float()
    s = g.summarize(X, X)
    assert (s.verdict, s.omega_W, s.freq_count_W) == ("cyclic", 5, 1)
    # (float32 rounds the small coordinates of the rotated circle: share and distance are close, not exact)
    assert s.freq_share_W == pytest.approx(1, abs=1e-4) and s.cyclic_distance_W == pytest.approx(0, abs=1e-2)
    json.dumps(s.to_dict(), allow_nan=False)


def test_float64_too_large_to_square_is_a_value_error():
    with pytest.raises(ValueError, match="W has entries too large to square in float64 \\(max \\|x\\| = 1e\\+200"):
        g.summarize(sinusoids(31, [3]) * 1e200, sinusoids(31, [3]))


def test_float64_too_small_to_square_is_a_value_error():
    """A circle at 1e-200 in float64: its Gram underflowed and it was read as ρ₂ = 0 ("unstructured")."""
    with pytest.raises(ValueError, match="E has entries too small to square in float64 \\(max \\|x\\| = 1e-200"):
        g.summarize(sinusoids(31, [3]), sinusoids(31, [3]) * 1e-200)
    assert g.summarize(sinusoids(31, [3]) * 1e-140, sinusoids(31, [3])).verdict == "cyclic"  # above the floor


def test_one_frequency_holding_exactly_the_mass_is_cyclic():
    """Share = ρ₂ = 0.9 exactly (amplitudes 1 and 1/3): count was 1 (the share reaches 90 %) while ρ₂, computed in
    another way, came out a rounding below 0.9, so the verdict fell through to "unstructured".  (In float32 the
    FFT's share may round below 0.9 instead: then count is 2, and the verdict "multi-frequency".)"""
    for n in (31, 97, 64):
        X = sinusoids(n, [4, 9], amps=[1.0, 1 / 3])
        s = g.summarize(X, X)
        assert s.freq_count_W == 1 and s.verdict == "cyclic", (n, s.rho2_W, s.freq_share_W)
        s = g.summarize(X.float(), X.float())
        assert s.verdict == ("cyclic" if s.freq_count_W == 1 else "multi-frequency"), (n, s.rho2_W, s.freq_share_W)


def test_verdict_thresholds_are_inclusive():
    """The verdict rules' bounds hold at equality: axis ratio = CYCLIC_MIN_AXIS_RATIO is a circle, and
    count = MULTI_MAX_FREQ_FRACTION · ⌊n/2⌋ is still multi-frequency (module docstring, rules 2 and 4)."""
    far = 1.0  # dist(G, T_etf) above ETF_MAX_DISTANCE: rule 3 never applies
    ratio = g.CYCLIC_MIN_AXIS_RATIO
    assert g.classify(1.0, 1, 31, far, axis_ratio=ratio) == "cyclic"
    assert g.classify(1.0, 1, 31, far, axis_ratio=math.nextafter(ratio, 0)) == "unstructured"
    for n in (16, 97):  # ⌊n/2⌋ · 0.25 = 2 and 12
        most = int(g.MULTI_MAX_FREQ_FRACTION * (n // 2))
        assert most == g.MULTI_MAX_FREQ_FRACTION * (n // 2)
        assert g.classify(0.5, most, n, far, axis_ratio=1.0) == "multi-frequency"
        assert g.classify(0.5, most + 1, n, far, axis_ratio=1.0) == "unstructured"
    # one frequency below the cyclic rho2 is not "multi-frequency" (rule 4 needs two): it ends in rule 5
    assert g.classify(0.5, 1, 97, far, axis_ratio=1.0) == "unstructured"


def test_the_frequency_count_forgives_a_rounding_at_exactly_the_mass():
    """mass = a/(a+b) reached by the first value alone: mass·total rounds a hair above a in 6 % of such pairs."""
    a, b = 0.4765969541523558, 0.2780381031114573
    assert a / (a + b) * (a + b) > a  # the case: without the slack the count would be 2
    assert g._count_for_mass(torch.tensor([a, b], dtype=F64), a / (a + b)) == 1


def test_wide_matrices_match_the_svd(gen):
    """d > n takes the n×n Gram (O(n²d), not O(d³)); its spectrum, plane and locking equal the SVD's."""
    n, d = 31, 200
    W = embed(sinusoids(n, [3, 7], amps=[1.0, 0.4]), d, gen) + 0.05 * torch.randn(n, d, generator=gen, dtype=F64)
    E = W + 0.3 * torch.randn(n, d, generator=gen, dtype=F64)
    U, S, Vh = torch.linalg.svd(W - W.mean(0), full_matrices=False)
    sp = g.spectrum(W)
    assert sp.singular_values.shape == (d,)
    torch.testing.assert_close(sp.singular_values[:n] ** 2, S ** 2, rtol=1e-9, atol=1e-12 * float(S[0]) ** 2)
    assert float(sp.singular_values[n:].abs().max()) == 0.0
    V = g.top2_plane(W)
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(V @ V.T, Vh[:2].T @ Vh[:2], rtol=0, atol=1e-10)  # the same plane
    Ec = E - E.mean(0)
    expected = float((Ec @ Vh[:2].T).square().sum() / Ec.square().sum())
    assert g.subspace_locking(W, E) == pytest.approx(expected, rel=1e-10)
    # W in an orthonormal basis of its row space (n×n: through the d×d Gram) has the same geometry
    Q, _ = torch.linalg.qr(W.T)
    wide, square = g.summarize(W, W), g.summarize(W @ Q, W @ Q)
    assert wide.verdict == square.verdict and wide.top_freqs_W == square.top_freqs_W
    a, b = numeric_fields(wide), numeric_fields(square)
    for key in set(a) - {"d"}:
        assert b[key] == pytest.approx(a[key], rel=1e-7, abs=1e-9), key


def test_rank_one_w_has_no_second_direction(gen):
    """W on a line (one cosine column): its "plane" is one direction, not that plus an arbitrary null vector, so
    the locking of a circle orthogonal to it is 0 whichever order the columns come in (it was 0 or 0.5)."""
    n = 31
    k = torch.arange(n, dtype=F64)
    W = torch.zeros(n, 4, dtype=F64)
    W[:, 0] = torch.cos(2 * math.pi * 3 * k / n)
    E = torch.zeros(n, 4, dtype=F64)
    E[:, 2:] = sinusoids(n, [5])
    for perm in ([0, 1, 2, 3], [0, 3, 1, 2], [0, 2, 3, 1]):
        assert g.subspace_locking(W[:, perm], E[:, perm]) == pytest.approx(0, abs=1e-12)
    assert float(g.top2_plane(W)[:, 1].abs().max()) == 0.0


def test_accepts_integer_and_numpy_input():
    X = sinusoids(12, [5]).numpy()
    assert g.fourier_spectrum(X).omega == 5
    assert g.spectrum(torch.arange(12).reshape(6, 2)).rho2 == pytest.approx(1)


# --------------------------------------------------------------------------------------------
# locking, phase alignment, neural collapse
# --------------------------------------------------------------------------------------------


def test_subspace_locking(gen):
    K, d = 37, 10
    W, _ = ideal_cyclic(K, 5, d, gen)
    V = g.top2_plane(W)  # d×2
    Q, _ = torch.linalg.qr(torch.cat([V, torch.randn(d, d - 2, generator=gen, dtype=F64)], 1))
    N = Q[:, 2:]  # orthonormal complement of W's plane
    inside = torch.randn(K, 2, generator=gen, dtype=F64) @ V.T
    outside = torch.randn(K, d - 2, generator=gen, dtype=F64) @ N.T
    assert g.subspace_locking(W, inside) == pytest.approx(1, abs=1e-12)
    assert g.subspace_locking(W, outside) == pytest.approx(0, abs=1e-12)
    mixed = inside + outside
    inside_c, mixed_c = inside - inside.mean(0), mixed - mixed.mean(0)
    share = float(inside_c.square().sum() / mixed_c.square().sum())  # the two parts are orthogonal
    assert g.subspace_locking(W, mixed) == pytest.approx(share, rel=1e-10)
    assert g.summarize(W, mixed).locking == pytest.approx(share, rel=1e-10)
    # a W with no plane (all rows equal) holds none of E's energy, whatever eigh returns for its zero Gram
    assert g.subspace_locking(torch.ones(K, d, dtype=F64), mixed) == 0.0


def test_different_spaces(gen):
    """W (K×m) read from a hidden layer, E (P×d): frequencies are compared, locking is not measured."""
    W, _ = ideal_cyclic(31, 6, 12, gen)
    E, _ = ideal_cyclic(31, 6, 5, gen)
    with pytest.raises(ValueError, match="W has d=12.*E has d=5"):
        g.summarize(W, E)
    s = g.summarize(W, E, same_space=False)
    assert s.locking is None and s.shared_omega and s.verdict == s.verdict_E == "cyclic"
    json.dumps(s.to_dict())


def test_phase_alignment(gen):
    K, d, N = 37, 8, 400
    W, _ = ideal_cyclic(K, 5, d, gen)
    V = g.top2_plane(W)
    w2 = (W - W.mean(0)) @ V  # centred W rows in the plane
    labels = torch.randint(0, K, (N,), generator=gen)
    out_of_plane = torch.randn(N, d, generator=gen, dtype=F64)
    out_of_plane -= out_of_plane @ V @ V.T  # invisible in W's plane
    for alpha in (0.0, 0.4, -0.4, 2.5):
        rot = torch.tensor([[math.cos(alpha), -math.sin(alpha)], [math.sin(alpha), math.cos(alpha)]], dtype=F64)
        scale = 0.5 + torch.rand(N, 1, generator=gen, dtype=F64)
        h = (scale * w2[labels] @ rot.T) @ V.T + out_of_plane
        pa = g.phase_alignment(W, h, labels)
        assert pa.mean_abs_angle == pytest.approx(abs(alpha), abs=1e-9)
        assert pa.mean_cos == pytest.approx(math.cos(alpha), abs=1e-9)
    s = g.summarize(W, W, h=h, labels=labels)
    assert s.phase_angle == pytest.approx(2.5, abs=1e-9) and s.phase_cos == pytest.approx(math.cos(2.5), abs=1e-9)


def brute_nc(M, omega):
    """dist(G, T) of the module docstring with the K×K matrices formed."""
    K = M.shape[0]
    X = M - M.mean(0)
    norms = X.norm(dim=1, keepdim=True)
    X = torch.where(norms > 0, X / norms.clamp_min(1e-300), X)
    G = X @ X.T
    T_etf = (K * torch.eye(K, dtype=F64) - 1) / (K - 1)
    c = torch.arange(K, dtype=F64)
    T_cyc = torch.cos(2 * math.pi * omega * (c[:, None] - c[None, :]) / K)

    def dist(T):
        return float((G / G.norm() - T / T.norm()).norm())

    return dist(T_etf), dist(T_cyc)


@pytest.mark.parametrize("K,omega", [(12, 1), (12, 5), (12, 6), (13, 4), (7, 3)])
def test_nc_distances_match_brute_force(gen, K, omega):
    layouts = [
        torch.randn(K, 5, generator=gen, dtype=F64),
        embed(sinusoids(K, [omega]), 6, gen) + 0.03 * torch.randn(K, 6, generator=gen, dtype=F64),
        simplex_etf(K, K + 2, gen),
    ]
    M = torch.randn(K, 4, generator=gen, dtype=F64)
    M[0] = M[1:].mean(0)  # row 0 is the mean: a zero row after centring
    layouts.append(M)
    layouts.append(torch.randn(K, 3 * K, generator=gen, dtype=F64))  # wider than tall: the K x K Gram
    for X in layouts:
        got = g.nc_distances(X, omega=omega)
        want = brute_nc(X, omega)
        assert (got.etf, got.cyclic) == pytest.approx(want, abs=1e-7)
    default = g.nc_distances(layouts[1])  # the dominant frequency of the rows: the nearest circle
    assert default.omega == min(omega, K - omega) and default.cyclic < 0.2
    assert default.cyclic == min(g.nc_distances(layouts[1], omega=f).cyclic for f in range(1, K // 2 + 1))


def test_nc1(gen):
    K, d, per = 8, 4, 20
    means = torch.randn(K, d, generator=gen, dtype=F64) * 3
    labels = torch.arange(K).repeat(per)
    assert g.nc1(means[labels], labels) == pytest.approx(0, abs=1e-12)
    h = means[labels] + torch.randn(K * per, d, generator=gen, dtype=F64)
    mu = torch.stack([h[labels == c].mean(0) for c in range(K)])
    resid = h - mu[labels]
    sw = resid.T @ resid / len(h)
    b = mu - mu.mean(0)
    sb = b.T @ b / K
    want = float(torch.trace(sw @ torch.linalg.inv(sb))) / K  # Σ_B has full rank d < K
    assert g.nc1(h, labels) == pytest.approx(want, rel=1e-9)
    cm, counts = g.class_means(h, labels)
    assert torch.allclose(cm, mu) and counts.tolist() == [per] * K
    # classes without samples (a sample of h that misses some) are left out of Σ_B's mean, not counted as zeros
    present = labels < K - 2
    assert g.nc1(h[present], labels[present], num_classes=K) == pytest.approx(g.nc1(h[present], labels[present]),
                                                                              rel=1e-12)
    # classes with the same mean (exactly: integers): no between-class spread to measure in (it read 0.0, collapse)
    spread = torch.randint(-5, 6, (K, d), generator=gen).double()
    assert math.isnan(g.nc1(torch.cat([3.0 + spread, 3.0 - spread]), torch.arange(K).repeat(2)))


# --------------------------------------------------------------------------------------------
# layer order
# --------------------------------------------------------------------------------------------


def test_layer_order(gen):
    dicts = [{"step": s, "rho2_W": w, "rho2_E": e} for s, w, e in
             [(300, 0.95, 0.5), (0, 0.1, 0.1), (100, 0.5, 0.2), (200, 0.91, 0.3), (400, 0.97, 0.92), (500, 0.8, 0.99)]]
    assert g.layer_order(dicts) == (200, 400)
    assert g.layer_order(dicts, threshold=0.96) == (400, 500)
    assert g.layer_order(dicts, threshold=0.999) == (None, None)
    assert g.layer_order([(d["step"], d) for d in dicts]) == (200, 400)
    assert g.layer_order([]) == (None, None)
    circle, _ = ideal_cyclic(16, 3, 6, gen)
    noise = torch.randn(16, 6, generator=gen, dtype=F64)
    snapshots = [(0, noise, noise), (10, circle, noise), (20, circle, circle)]
    assert g.layer_order(snapshots) == (10, 20)
    summaries = [(step, g.summarize(W, E)) for step, W, E in snapshots]
    assert g.layer_order(summaries) == (10, 20)


def test_layer_order_counts_reaching_the_threshold_exactly():
    """t_W and t_E are the first steps at which ρ₂ reaches the threshold: equal to it counts."""
    at = g.LAYER_ORDER_THRESHOLD
    series = [dict(step=0, rho2_W=0.5, rho2_E=0.5), dict(step=100, rho2_W=at, rho2_E=0.8),
              dict(step=200, rho2_W=0.95, rho2_E=at), dict(step=300, rho2_W=0.99, rho2_E=0.99)]
    assert g.layer_order(series) == (100, 200)
    assert g.layer_order(series, threshold=0.95) == (200, 300)


# --------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------


def test_moderate_size(gen):
    """K = 8191, d = 64: a noisy circle is still found (the K×K Gram would hold 67 M entries; it is never formed)."""
    K, d = 8191, 64
    W = embed(sinusoids(K, [1234]), d, gen).float() + 0.02 * torch.randn(K, d, generator=gen)
    E = embed(sinusoids(K, [1234, 77], amps=[1.0, 0.9]), d, gen).float() + 0.02 * torch.randn(K, d, generator=gen)
    s = g.summarize(W, E)
    assert s.verdict == "cyclic" and s.omega_W == 1234 and s.rho2_W > 0.95
    assert s.verdict_E == "multi-frequency" and set(s.top_freqs_E) == {1234, 77} and s.shared_omega
    assert s.phase_r2_W > 0.99 and s.radius_cv_W < 0.05


@pytest.mark.cuda
def test_cuda_matches_cpu(gen):
    K, d = 1031, 32
    W = embed(sinusoids(K, [17, 200], amps=[1.0, 0.3]), d, gen) + 0.05 * torch.randn(K, d, generator=gen, dtype=F64)
    E = torch.randn(K, d, generator=gen, dtype=F64)
    h = torch.randn(64, d, generator=gen, dtype=F64)
    y = torch.randint(0, K, (64,), generator=gen)
    for dtype in (torch.float32, torch.float64):
        cpu = g.summarize(W.to(dtype), E.to(dtype), h=h, labels=y)
        gpu = g.summarize(W.to("cuda", dtype), E.to("cuda", dtype), h=h.cuda(), labels=y.cuda())
        assert gpu.verdict == cpu.verdict and gpu.top_freqs_W == cpu.top_freqs_W
        for key, value in numeric_fields(cpu).items():
            assert numeric_fields(gpu)[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def check_png(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert 300 <= width <= 4000 and 200 <= height <= 4000
    assert len(data) > 5000
    pixels = imread(path)
    assert float(pixels[..., :3].std()) > 0.02  # not a flat colour


def test_figures(gen, tmp_path):
    import matplotlib

    from fastcyclic import plots

    backend = matplotlib.get_backend()
    K = 61
    W = embed(sinusoids(K, [5]), 8, gen) + 0.05 * torch.randn(K, 8, generator=gen, dtype=F64)
    E = embed(sinusoids(K, [5, 12], amps=[1, 0.5]), 8, gen)
    history = [(step, g.summarize(W * min(1, step / 300) + (1 - min(1, step / 300)) * E, E)) for step in
               range(0, 600, 100)]
    curves = [{"step": s, "train_loss": 4.0 / (1 + s), "test_loss": 4.5 / (1 + 0.5 * s), "train_acc": min(1, s / 300),
               "test_acc": min(1, s / 500) if s > 100 else None} for s in range(0, 600, 50)]
    curves.append({"step": 700, "train_loss": 0.001})  # missing keys are skipped
    outputs = [
        plots.plot_circles(W, E, tmp_path / "circles.png"),
        plots.plot_circles(W.tolist(), E.numpy(), tmp_path / "lists.png"),  # what geometry takes, plots take
        plots.plot_fourier(W, E, tmp_path / "fourier.png"),
        plots.plot_fourier(torch.randn(999, 8, generator=gen), E, str(tmp_path / "sub" / "fourier_log.png"), log=True),
        plots.plot_geometry_history(history, tmp_path / "history.png"),
        plots.plot_geometry_history([{"step": 0, "rho2_W": 0.2}, {"step": 5, "rho2_W": 0.95}], tmp_path / "h2.png"),
        plots.plot_training_curves(curves, tmp_path / "curves.png"),
        plots.plot_training_curves([{"step": 1}], tmp_path / "empty.png"),
    ]
    for path in outputs:
        check_png(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary files left
        ["circles.png", "lists.png", "fourier.png", "sub", "history.png", "h2.png", "curves.png", "empty.png"])
    assert matplotlib.get_backend() == backend


def test_figures_take_their_format_from_the_extension(gen, tmp_path):
    from fastcyclic import plots

    W = torch.randn(31, 4, generator=gen, dtype=F64)
    plots.plot_circles(W, W, tmp_path / "c.pdf")
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match="cannot write a figure to .*c.xyz.*pdf, .*png"):
        plots.plot_circles(W, W, tmp_path / "c.xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pdf"]


def drawn(monkeypatch, draw):
    """The figure a plots function draws, taken before it is saved."""
    from fastcyclic import plots

    figures = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figures.append(fig) or path)
    draw(plots, "unused.png")
    return figures[0]


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_figures_without_an_extension_are_png_and_extensions_are_case_blind(gen, tmp_path):
    from fastcyclic import plots

    W = torch.randn(31, 4, generator=gen, dtype=F64)
    plots.plot_training_curves([{"step": 0, "train_loss": 1.0}], tmp_path / "curves")
    plots.plot_circles(W, W, tmp_path / "C.PDF")
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "C.PDF").read_bytes().startswith(b"%PDF")


def test_loss_axis_is_logarithmic_only_when_every_loss_is_positive(monkeypatch):
    def scale(losses):
        history = [{"step": s, "train_loss": v} for s, v in enumerate(losses)]
        return drawn(monkeypatch, lambda plots, path: plots.plot_training_curves(history, path)).axes[0].get_yscale()

    assert (scale([2.0, 0.5]), scale([2.0, 0.0])) == ("log", "linear")
    assert scale([4.5765, 4.5747]) == "linear"  # flat at chance (ln 97): a log axis drew it as a plunge


def test_geometry_history_is_drawn_in_step_order_without_non_finite_values(monkeypatch):
    """Records in any order, a NaN skipped; t_W = t_E: the title claims no order."""
    history = [{"step": 20, "rho2_W": 0.95, "rho2_E": 0.95}, {"step": 0, "rho2_W": 0.1, "rho2_E": float("nan")},
               {"step": 10, "rho2_W": 0.5, "rho2_E": 0.5}]
    ax = drawn(monkeypatch, lambda plots, path: plots.plot_geometry_history(history, path)).axes[0]
    lines = lines_by_label(ax)
    assert list(lines["ρ₂(W) classifier"].get_xdata()) == [0, 10, 20]
    assert list(lines["ρ₂(E) embedding"].get_xdata()) == [10, 20]
    assert "t_W = 20" in lines and "t_E = 20" in lines
    assert ax.get_title() == "Rank-2 energy share over training t_W = t_E (within one evaluation)"


def test_geometry_history_says_which_layer_came_first_and_not_for_an_e_of_two_columns(monkeypatch):
    """E first was not said at all; with E of <= 2 columns (the default d = 2) rho2(E) is 1 by construction, and
    its flat line and "t_E = 0" read as "the embedding first"."""
    history = [{"step": 0, "rho2_W": 0.2, "rho2_E": 1.0}, {"step": 10, "rho2_W": 0.95, "rho2_E": 1.0}]
    ax = drawn(monkeypatch, lambda plots, path: plots.plot_geometry_history(history, path)).axes[0]
    assert ax.get_title().endswith("t_E < t_W (embedding first)")
    ax = drawn(monkeypatch, lambda plots, path: plots.plot_geometry_history(history, path, e_columns=2)).axes[0]
    lines = lines_by_label(ax)
    assert "ρ₂(E) ≡ 1: E has 2 columns (says nothing)" in lines and "t_E = 0" not in lines and "t_W = 10" in lines
    assert ax.get_title() == "Rank-2 energy share over training"


@pytest.mark.parametrize("counts", [[48, 30, 31], [6, 6, 6], [40, 3, 1], [12, 0, 0]])
def test_frequency_counts_are_read_off_labelled_ticks(counts, monkeypatch):
    """The symlog axis labelled only 10 (1 and 4 could not be told apart), then, with fixed ticks, none at all for
    counts of 30-48."""
    history = [{"step": s, "rho2_W": 0.5, "freq_count_W": c} for s, c in enumerate(counts)]
    ax = drawn(monkeypatch, lambda plots, path: plots.plot_geometry_history(history, path)).axes[1]
    low, high = ax.get_ylim()
    shown = [t for t in ax.get_yticks() if low <= t <= high]
    assert 1 in shown and max(counts) <= high and any(t >= max(counts) / 2.5 for t in shown)
    assert (0 in shown) == (0 in counts)


def test_circles_draw_every_ceil_n_over_max_points_th_row(gen, monkeypatch):
    W = embed(sinusoids(61, [5]), 4, gen)
    fig = drawn(monkeypatch, lambda plots, path: plots.plot_circles(W, W, path, max_points=20))
    assert len(fig.axes[0].collections[0].get_offsets()) == 16  # rows 0, 4, ..., 60


def test_fourier_panel_shows_shares_of_the_energy_and_marks_omega(gen, monkeypatch):
    """Shares summing to 1, ω's marker on ω's bar, "1 frequency holds"; a matrix without energy stays linear."""
    W = embed(sinusoids(61, [5]), 4, gen)
    Z = torch.zeros(61, 4, dtype=F64)
    fig = drawn(monkeypatch, lambda plots, path: plots.plot_fourier(W, Z, path, log=True))
    ax_w, ax_z = fig.axes[:2]
    tops = [segment[1][1] for segment in ax_w.collections[0].get_segments()]
    assert sum(tops) == pytest.approx(1.0) and ax_w.get_title() == "W: 1 frequency holds 90 % of the energy"
    marker = next(line for label, line in lines_by_label(ax_w).items() if label.startswith("ω = 5"))
    assert list(marker.get_xdata()) == [5] and list(marker.get_ydata()) == [pytest.approx(max(tops))]
    assert (ax_w.get_yscale(), ax_z.get_yscale()) == ("log", "linear")


def test_geometry_does_not_import_matplotlib():
    code = "import sys, fastcyclic.geometry; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nc_default_omega_is_the_nearest_circle(gen):
    """Even K: a Nyquist layout (±1 rows) is a circle at f = K/2 whose Gram is ±1 everywhere."""
    K = 12
    alt = torch.tensor([(-1.0) ** k for k in range(K)], dtype=F64).unsqueeze(1)
    X = embed(torch.cat([alt, 0.3 * sinusoids(K, [2])], 1), 5, gen)
    default = g.nc_distances(X)
    by_omega = [g.nc_distances(X, omega=f).cyclic for f in range(1, K // 2 + 1)]
    assert default.cyclic == min(by_omega) and default.omega == 6
    for f, dist in zip(range(1, K // 2 + 1), by_omega):
        assert dist == pytest.approx(brute_nc(X, f)[1], abs=1e-7)


def test_max_listed_caps_the_top_frequencies_but_not_the_count_or_overlap(gen):
    """max_listed shortens top_freqs_W/E only; freq_count and freq_overlap still use every frequency."""
    K = 61
    W = embed(sinusoids(K, [3, 10, 17], amps=[1.0, 0.9, 0.8]), 8, gen)
    E = embed(sinusoids(K, [17, 10, 3], amps=[1.0, 0.9, 0.8]), 8, gen)
    full, capped = g.summarize(W, E), g.summarize(W, E, max_listed=2)
    assert full.top_freqs_W == (3, 10, 17) and full.top_freqs_E == (17, 10, 3)
    assert capped.top_freqs_W == (3, 10) and capped.top_freqs_E == (17, 10)
    assert capped.freq_count_W == capped.freq_count_E == 3 and capped.freq_overlap == full.freq_overlap == 1.0


def test_etf_threshold_is_inclusive_and_etf_rule_precedes_multi_frequency():
    far = 1.0
    # dist(G, T_etf) == ETF_MAX_DISTANCE is still etf-like (docstring: "dist <= ETF_MAX_DISTANCE")
    assert g.classify(0.5, 40, 97, g.ETF_MAX_DISTANCE, axis_ratio=1.0) == "etf-like"
    assert g.classify(0.5, 40, 97, math.nextafter(g.ETF_MAX_DISTANCE, 1), axis_ratio=1.0) == "unstructured"
    # rule 3 comes before rule 4: a count that would be multi-frequency with an ETF-close Gram is etf-like
    assert g.classify(0.5, 3, 97, 0.1, axis_ratio=1.0) == "etf-like"
    assert g.classify(0.5, 3, 97, far, axis_ratio=1.0) == "multi-frequency"


@pytest.mark.parametrize("amp", [0.3, 1.15])
def test_nc_default_omega_weighs_the_nyquist_bin(gen, amp):
    """1 < p_2/p_6 = amp² < √2: the Nyquist circle (‖T‖ = K) is still nearer than f = 2 (‖T‖ = K/√2)."""
    K = 12
    alt = torch.tensor([(-1.0) ** k for k in range(K)], dtype=F64).unsqueeze(1)
    X = embed(torch.cat([alt, amp * sinusoids(K, [2])], 1), 5, gen)
    default = g.nc_distances(X)
    by_omega = [g.nc_distances(X, omega=f).cyclic for f in range(1, K // 2 + 1)]
    assert default.omega == 6 and default.cyclic == min(by_omega)


@pytest.mark.parametrize("K,omega,gcd", [(12, 4, 4), (12, 3, 3), (30, 10, 10), (12, 6, 6)])
def test_circle_with_coincident_rows_at_composite_n(gen, K, omega, gcd):
    """Module docstring: at composite n a circle at ω with g = gcd(ω, n) > 1 is "cyclic" and its gap error is
    2(1 − 1/g) (mean over the n gaps, not the worst gap)."""
    W = embed(2.0 * sinusoids(K, [omega]), 8, gen)
    s = g.summarize(W, W)
    fit = g.circle_fit(W)
    assert fit.gap_error == pytest.approx(2 * (1 - 1 / gcd), abs=1e-9)
    if 2 * omega != K:
        assert s.verdict == "cyclic"
