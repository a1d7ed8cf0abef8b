"""Figures of the geometry diagnostics and of training, as PNG files (or PDF, SVG, ... by the path's extension).

One function per figure; each takes data and a path, writes the PNG atomically (a temporary file in the same
folder, then os.replace, so a reader never sees half a file) and returns the path. Figures are drawn on
matplotlib.figure.Figure with the Agg canvas: no pyplot, so the user's backend and open windows are untouched, and
matplotlib is imported only when a figure is drawn (importing fastcyclic.geometry never imports it).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

from fastcyclic import geometry
from fastcyclic.files import write_atomic

__all__ = ["plot_circles", "plot_fourier", "plot_geometry_history", "plot_training_curves"]

_COLOR = {"W": "tab:blue", "E": "tab:orange", "locking": "tab:green"}
_DPI = 120


def new_figure(ncols: int, nrows: int = 1, size: tuple[float, float] = (6.0, 5.0)):
    """A pyplot-free figure with an Agg canvas and a (nrows × ncols) grid of axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _frequencies(count: int) -> str:
    return f"{count} frequency" if count == 1 else f"{count} frequencies"


def save_png(fig, path) -> str:
    """Write fig at path atomically, as a PNG unless the path names another format matplotlib writes
    (.pdf, .svg, ...); return path.  An unknown extension is a ValueError before anything is written."""
    suffix = os.path.splitext(os.fspath(path))[1][1:].lower()
    fmt = suffix or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"cannot write a figure to {os.fspath(path)!r}: matplotlib writes "
                         f"{', '.join(sorted(fig.canvas.get_supported_filetypes()))}")
    return write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=_DPI))


# --------------------------------------------------------------------------------------------
# (1) the circles: W's and E's rows in their top-2 planes
# --------------------------------------------------------------------------------------------


def plot_circles(W, E, path, *, max_points: int = 20000, title: str | None = None) -> str:
    """Rows of W (K×d) and E (P×d), centred and projected on each matrix's own top-2 plane, coloured by row index.

    A rank-2 cyclic layout shows a ring whose colour runs ω times around it (cyclic colour map: index k and k + 1
    mod n get close colours). At most max_points rows are drawn per panel (every ⌈n/max_points⌉-th row)."""
    fig, axes = new_figure(2)
    for ax, name, X in zip(axes[0], ("W", "E"), (W, E)):
        layout = geometry.describe(X)
        u, sp, fs = layout.coords, layout.spectrum, layout.fourier
        n = u.shape[0]
        stride = max(1, math.ceil(n / max_points))
        k = list(range(0, n, stride))
        points = ax.scatter(u[k, 0].numpy(), u[k, 1].numpy(), c=k, cmap="twilight", s=max(2.0, 4000 / len(k)),
                            vmin=0, vmax=n, linewidths=0)  # cyclic map: index n (= 0 mod n) wraps to 0's colour
        label = "class c" if name == "W" else "token"
        fig.colorbar(points, ax=ax, label=f"row index ({label})", shrink=0.8)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("top singular direction 1")
        ax.set_ylabel("top singular direction 2")
        what = "classifier" if name == "W" else "embedding"
        by_construction = " (≡ 1 at ≤ 2 columns)" if len(sp.singular_values) <= 2 else ""
        ax.set_title(f"{name} ({what}, {n}×{len(sp.singular_values)}): ρ₂ = {sp.rho2:.3f}{by_construction}, "
                     f"ω = {fs.omega}, {_frequencies(fs.count)}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Rows in their top-2 plane (a circle = rank-2 cyclic)")
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# (2) the Fourier power spectrum over the row index
# --------------------------------------------------------------------------------------------


def plot_fourier(W, E, path, *, mass: float = geometry.FREQ_MASS, log: bool = False, title: str | None = None) -> str:
    """Share of each frequency f = 1 … ⌊n/2⌋ in the non-constant energy of W's and of E's rows (one panel each),
    with the dominant ω marked and the number of frequencies holding `mass` of the energy in the title."""
    fig, axes = new_figure(1, nrows=2, size=(9.0, 3.2))
    for ax, name, X in zip(axes[:, 0], ("W", "E"), (W, E)):
        fs = geometry.fourier_spectrum(X, mass=mass)
        ac = fs.power[1:]
        total = float(ac.sum())
        share = (ac / total if total > 0 else ac).numpy()
        f = range(1, len(share) + 1)
        if len(share) <= 200:
            ax.vlines(f, 0, share, color=_COLOR[name], lw=1.5)
        else:
            ax.plot(f, share, color=_COLOR[name], lw=0.7)
        if fs.omega:
            ax.plot([fs.omega], [share[fs.omega - 1]], "v", color="black", ms=7,
                    label=f"ω = {fs.omega} ({100 * fs.share:.3g} % of the energy)")
            ax.legend(loc="upper right", fontsize=9)
        if log and total > 0:
            ax.set_yscale("log")
        ax.set_xlim(0, len(share) + 1)
        ax.set_xlabel("frequency f (over the row index; f and n − f are one circle)")
        ax.set_ylabel("share of energy")
        verb = "holds" if fs.count == 1 else "hold"
        ax.set_title(f"{name}: {_frequencies(fs.count)} {verb} {100 * mass:.3g} % of the energy", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Fourier power spectrum of the rows")
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# (3) geometry over training
# --------------------------------------------------------------------------------------------


def _as_record(entry) -> dict:
    """One history entry as a dict with 'step': a dict with 'step', or (step, GeometrySummary or dict)."""
    if isinstance(entry, Mapping):
        return dict(entry)
    step, s = entry
    if isinstance(s, geometry.GeometrySummary):
        s = s.to_dict()
    return {**s, "step": step}


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the records that have a finite value for key."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if v is not None and "step" in r and math.isfinite(float(v)):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def plot_geometry_history(history: Iterable, path, *, threshold: float = geometry.LAYER_ORDER_THRESHOLD,
                          title: str | None = None, e_columns: int | None = None) -> str:
    """ρ₂(W), ρ₂(E) and subspace locking against the training step, with t_W and t_E (first step each ρ₂ reaches
    threshold) marked; a second panel shows the frequency counts when the history has them.  e_columns: E's width;
    at most 2, ρ₂(E) is 1 by construction, so it is drawn grey and t_E is not marked (it would read "E first").

    history: (step, GeometrySummary), (step, dict) or dicts with 'step' and any of rho2_W, rho2_E, locking,
    freq_count_W, freq_count_E."""
    records = sorted((_as_record(e) for e in history), key=lambda r: r.get("step", 0))
    has_counts = any(r.get("freq_count_W") is not None or r.get("freq_count_E") is not None for r in records)
    fig, axes = new_figure(1, nrows=2 if has_counts else 1, size=(8.0, 4.0))
    ax = axes[0, 0]
    e_trivial = e_columns is not None and e_columns <= 2
    e_label, e_color = ((f"ρ₂(E) ≡ 1: E has {e_columns} columns (says nothing)", "lightgrey") if e_trivial else
                        ("ρ₂(E) embedding", _COLOR["E"]))
    for key, label, color in (("rho2_W", "ρ₂(W) classifier", _COLOR["W"]), ("rho2_E", e_label, e_color),
                              ("locking", "locking (E's energy in W's plane)", _COLOR["locking"])):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, "-o", ms=3, color=color, label=label)
    ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"threshold {threshold:g}")
    t_w, t_e = geometry.layer_order([r for r in records if "step" in r], threshold)
    if e_trivial:
        t_e = None
    for t, name in ((t_w, "W"), (t_e, "E")):
        if t is not None:
            ax.axvline(t, color=_COLOR[name], ls="--", lw=1.2, label=f"t_{name} = {t}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of energy")
    order = ""
    if t_w is not None and t_e is not None:
        order = ("t_W < t_E (classifier first)" if t_w < t_e else "t_E < t_W (embedding first)" if t_e < t_w else
                 "t_W = t_E (within one evaluation)")
    ax.set_title(f"Rank-2 energy share over training {order}".strip(), fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    if has_counts:
        from matplotlib.ticker import FixedLocator, NullLocator

        ax = axes[1, 0]
        counts = [1]
        for key, name in (("freq_count_W", "W"), ("freq_count_E", "E")):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, "-o", ms=3, color=_COLOR[name], label=f"frequencies in {name}")
                counts += values
        top = max(counts)
        # linear below 1 (a count of 0: nothing to measure), logarithmic above, with plain labels down to 1 (the
        # circle); a symlog axis labels only its decades (10, 100)
        ax.set_yscale("symlog", linthresh=1)
        ticks = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if t <= 2 * top]))
        ax.yaxis.set_minor_locator(NullLocator())
        # 1 in view (0 too where a count is 0), so the ticks are (counts of 30-48 showed none)
        ax.set_ylim(0 if min(counts) == 0 else 0.8, 1.3 * top)
        ax.yaxis.set_major_formatter(lambda value, position: f"{value:g}")
        ax.set_xlabel("training step")
        ax.set_ylabel("frequency count")
        ax.set_title("Frequencies holding most of the energy (1 = one circle)", fontsize=10)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Geometry over training")
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# (4) loss and accuracy curves
# --------------------------------------------------------------------------------------------


def plot_training_curves(history: Iterable[Mapping], path, *, title: str | None = None) -> str:
    """Train/test loss (log scale when positive) and accuracy against the step. history: dicts with 'step' and any
    of train_loss, test_loss, train_acc, test_acc; missing keys and None values are skipped."""
    records = sorted((dict(r) for r in history if "step" in r), key=lambda r: r["step"])
    fig, axes = new_figure(2, size=(6.0, 4.0))
    for ax, kind in zip(axes[0], ("loss", "acc")):
        drawn = []
        for split, style in (("train", "-"), ("test", "--")):
            steps, values = _series(records, f"{split}_{kind}")
            if steps:
                ax.plot(steps, values, style, lw=1.5, label=split)
                drawn.extend(values)
        finite = [v for v in drawn if math.isfinite(v)]
        if kind == "loss" and finite and min(finite) > 0 and max(finite) > 3 * min(finite):
            ax.set_yscale("log")  # (a loss flat at chance, ln K, drawn on a log axis looked like a plunge)
        if kind == "acc":
            ax.set_ylim(-0.02, 1.02)
        if drawn:  # accuracy ends near 1 (learnt) or near 0 (not): "best" put the legend over the curves at 1
            ax.legend(loc="best" if kind == "loss" else "center right")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy loss" if kind == "loss" else "accuracy")
        ax.set_title("Loss" if kind == "loss" else "Accuracy", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Training curves")
    return save_png(fig, path)
