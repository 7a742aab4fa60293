"""ROC, calibration and regression plots, written atomically as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from ..utils import atomic_path
from .metrics import (
    _as_binary,
    _as_prob,
    _bin_index,
    _check_probabilities,
    auroc,
    calibration_slope,
    expected_calibration_error,
    r2_score,
)


# ---------------------------------------------------------------------------------------------- plots
def _save_figure_atomic(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _new_figure(size=(5.0, 5.0)):
    # A bare Figure with the Agg canvas: no pyplot global state, no display needed.

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_calibration(y_true, y_prob, path, n_bins: int = 10, title: str | None = None) -> Path:
    """Reliability diagram (observed frequency vs mean predicted probability per equal-width bin, with
    the bin counts below) saved as PNG at `path` (written atomically). Returns the path."""
    y = _as_binary(y_true)
    p = _as_prob(y_prob, y.size)
    _check_probabilities(p)
    bins = _bin_index(p, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    nonempty = counts > 0
    mean_p = np.bincount(bins, weights=p, minlength=n_bins)[nonempty] / counts[nonempty]
    freq = np.bincount(bins, weights=y, minlength=n_bins)[nonempty] / counts[nonempty]
    fig = _new_figure((5.0, 6.0))
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(mean_p, freq, marker="o", label=f"model (ECE {expected_calibration_error(y, p, n_bins):.3f})")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title or f"Calibration (n={y.size}, {n_bins} bins)")
    edges = np.linspace(0, 1, n_bins + 1)
    ax_hist.bar(edges[:-1], counts, width=1.0 / n_bins, align="edge", edgecolor="black")
    ax_hist.set_xlabel("predicted probability")
    ax_hist.set_ylabel("count")
    return _save_figure_atomic(fig, path)


def plot_roc(y_true, y_prob, path, title: str | None = None) -> Path:
    """ROC curve with its AUROC saved as PNG at `path` (written atomically). Returns the path."""

    y = _as_binary(y_true)
    p = _as_prob(y_prob, y.size)
    if np.unique(y).size < 2:
        raise ValueError("plot_roc needs both classes in y_true")
    fpr, tpr, _ = roc_curve(y, p)
    fig = _new_figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.plot(fpr, tpr, label=f"model (AUROC {auroc(y, p):.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title(title or f"ROC (n={y.size}, positives={int(y.sum())})")
    return _save_figure_atomic(fig, path)


def plot_regression(y_true, y_pred, path, n_bins: int = 10, title: str | None = None) -> Path:
    """Calibration of a regression: each row as a faint dot (prediction, target), the mean target per decile of
    the prediction as a line, and the identity; R² and calibration slope in the legend. PNG at `path`."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    f = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != f.shape or y.size == 0:
        raise ValueError(
            f"plot_regression needs as many predictions as targets (got {f.size} and {y.size}), > 0"
        )
    order = np.argsort(f, kind="stable")
    parts = [part for part in np.array_split(order, min(n_bins, y.size)) if part.size]
    fig = _new_figure()
    ax = fig.subplots()
    ax.scatter(f, y, s=4, alpha=0.15, color="grey")
    lo, hi = float(min(f.min(), y.min())), float(max(f.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="black", label="identity")
    ax.plot(
        [f[part].mean() for part in parts],
        [y[part].mean() for part in parts],
        marker="o",
        label=f"mean target per decile (R² {r2_score(y, f):.3f}, slope {calibration_slope(y, f):.2f})",
    )
    ax.set_xlabel("prediction")
    ax.set_ylabel("target")
    ax.legend(loc="upper left")
    ax.set_title(title or f"Regression calibration (n={y.size})")
    return _save_figure_atomic(fig, path)


__all__ = ["plot_calibration", "plot_regression", "plot_roc"]
