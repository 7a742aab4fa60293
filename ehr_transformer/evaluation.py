"""Evaluation people can trust: discrimination with bootstrap confidence intervals, calibration,
subgroups, regression errors and plots.

Conventions
- Binary labels are 0/1 (booleans are accepted); probabilities are in [0, 1].
- Confidence intervals are percentile intervals over `n_bootstrap` *stratified* bootstrap resamples:
  positives and negatives are resampled separately (with replacement) so that every resample keeps the
  observed prevalence and both classes. The point estimate is the metric on the full sample.
- Undefined values (AUROC of a group with one class, AUPRC of a group without positives) are `None`
  in reports (JSON-friendly), NaN in the plain metric functions.
- Expected calibration error (ECE) uses 10 equal-width probability bins [0, 0.1), [0.1, 0.2), ...,
  [0.9, 1.0] (the last bin includes 1.0): ECE = sum_b (n_b / n) * |mean(y in b) - mean(p in b)|,
  i.e. the sample-weighted mean absolute gap between observed frequency and mean predicted probability.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .utils import atomic_path

AGE_BANDS = ("18-44", "45-64", "65-79", "80+")


# ---------------------------------------------------------------------------------------------- inputs
def _as_binary(y_true, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true).reshape(-1)
    if y.dtype == bool:
        return y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name} must hold binary 0/1 labels; found values {bad.tolist()}")
    return y.astype(np.int64)


def _as_prob(y_prob, n: int, name: str = "y_prob") -> np.ndarray:
    p = np.asarray(y_prob, dtype=np.float64).reshape(-1)
    if p.shape[0] != n:
        raise ValueError(f"{name} has {p.shape[0]} values but y_true has {n}")
    if np.isnan(p).any():
        raise ValueError(f"{name} contains NaN")
    return p


def _check_probabilities(p: np.ndarray, name: str = "y_prob") -> None:
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1] (got range [{p.min():.3g}, {p.max():.3g}])")


# --------------------------------------------------------------------------------------- fast metrics
def auroc(y_true, y_score) -> float:
    """Area under the ROC curve (ties count one half), equal to scikit-learn's `roc_auc_score`; NaN with one class."""
    y = _as_binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # first index of each run of equal values, and its length
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    lengths = np.diff(np.r_[starts, s.size])
    avg = starts + (lengths + 1) / 2.0  # 1-based average rank of each run
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, lengths)
    return ranks


def average_precision(y_true, y_score) -> float:
    """Area under the precision-recall curve as average precision (equal to scikit-learn's
    `average_precision_score`: sum over distinct thresholds of recall increment x precision); NaN without positives."""
    y = _as_binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tps = np.cumsum(y_sorted)[last_of_run]
    predicted = last_of_run + 1
    precision = tps / predicted
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier_score(y_true, y_prob) -> float:
    """Mean squared difference between probability and outcome (lower is better)."""
    y = _as_binary(y_true)
    p = _as_prob(y_prob, y.size)
    _check_probabilities(p)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def expected_calibration_error(y_true, y_prob, n_bins: int = 10) -> float:
    """Expected calibration error with `n_bins` equal-width bins on [0, 1] (last bin closed).

    ECE = sum over non-empty bins of (n_b / n) * |observed frequency in b - mean predicted probability in b|.
    0 for a perfectly calibrated predictor; e.g. predicting 0.8 for a group where 60% have the event adds
    0.2 x (share of that group).
    """
    y = _as_binary(y_true)
    p = _as_prob(y_prob, y.size)
    _check_probabilities(p)
    if y.size == 0:
        return float("nan")
    bins = _bin_index(p, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    nonempty = counts > 0
    gaps = np.abs(sum_y[nonempty] - sum_p[nonempty])  # = n_b * |freq_b - conf_b|
    return float(gaps.sum() / y.size)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


# ------------------------------------------------------------------------------------------ bootstrap
def bootstrap_ci(
    y_true,
    y_score,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Point estimate and percentile bootstrap confidence interval of `metric_fn(y_true, y_score)`.

    Resampling is stratified by class (positives and negatives drawn separately with replacement), so
    resamples keep the observed class counts; any resample that still has one class, or where the metric
    is NaN, is skipped. Returns {"estimate", "ci_lower", "ci_upper", "alpha", "n_bootstrap" (resamples
    used)}; the interval bounds are NaN when the input has a single class or no valid resample remains.
    """
    y = _as_binary(y_true)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"y_score has {s.shape[0]} values but y_true has {y.shape[0]}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    estimate = float(metric_fn(y, s)) if y.size else float("nan")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values: list[float] = []
    if pos.size and neg.size and n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_bootstrap):
            idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
            yb = y[idx]
            if yb.min() == yb.max():
                continue
            value = float(metric_fn(yb, s[idx]))
            if not np.isnan(value):
                values.append(value)
    if values:
        lower, upper = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    else:
        lower = upper = float("nan")
    return {
        "estimate": estimate,
        "ci_lower": float(lower),
        "ci_upper": float(upper),
        "alpha": alpha,
        "n_bootstrap": len(values),
    }


# ---------------------------------------------------------------------------------------------- reports
def _none_if_nan(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def _interval(result: dict) -> dict | None:
    if np.isnan(result["estimate"]):
        return None
    return {
        "estimate": result["estimate"],
        "ci_lower": _none_if_nan(result["ci_lower"]),
        "ci_upper": _none_if_nan(result["ci_upper"]),
    }


def _binary_metrics(y: np.ndarray, p: np.ndarray, n_bootstrap: int, seed: int, alpha: float) -> dict:
    n_pos = int(y.sum())
    return {
        "n": int(y.size),
        "n_positive": n_pos,
        "prevalence": float(n_pos / y.size) if y.size else None,
        "auroc": _interval(bootstrap_ci(y, p, auroc, n_bootstrap, alpha, seed)),
        "auprc": _interval(bootstrap_ci(y, p, average_precision, n_bootstrap, alpha, seed)),
        "brier": _none_if_nan(brier_score(y, p)),
        "ece": _none_if_nan(expected_calibration_error(y, p)),
    }


def binary_classification_report(
    y_true,
    y_prob,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Mapping[str, object] | None = None,
    alpha: float = 0.05,
) -> dict:
    """Metrics of a binary classifier, overall and per subgroup.

    Returns a JSON-serialisable dict:
        {"n", "n_positive", "prevalence",
         "auroc": {"estimate", "ci_lower", "ci_upper"} | None,   # None when only one class is present
         "auprc": {...} | None,                                   # None without positives
         "brier", "ece" (10 equal-width bins), "ci_level" (0.95), "n_bootstrap",
         "subgroups": {group_name: {group_value: {same keys except subgroups}}}}
    `groups` maps a grouping name to one value per sample, e.g.
    {"age_band": age_band(ages), "sex": sexes}; null/NaN group values are reported under "unknown".
    Bootstrap intervals are stratified percentile intervals (see `bootstrap_ci`).
    """
    y = _as_binary(y_true)
    p = _as_prob(y_prob, y.size)
    _check_probabilities(p)
    report = _binary_metrics(y, p, n_bootstrap, seed, alpha)
    report["ci_level"] = 1.0 - alpha
    report["n_bootstrap"] = n_bootstrap
    report["subgroups"] = {}
    for group_name, group_values in (groups or {}).items():
        values = _group_labels(group_values, y.size, group_name)
        per_value = {}
        for value in sorted(set(values.tolist())):
            mask = values == value
            per_value[value] = _binary_metrics(y[mask], p[mask], n_bootstrap, seed, alpha)
        report["subgroups"][group_name] = per_value
    return report


def _group_labels(group_values, n: int, group_name: str) -> np.ndarray:
    values = np.asarray(list(group_values), dtype=object).reshape(-1)
    if values.shape[0] != n:
        raise ValueError(f"group {group_name!r} has {values.shape[0]} values but there are {n} samples")
    out = np.empty(n, dtype=object)
    for i, v in enumerate(values):
        missing = v is None or (isinstance(v, float) and np.isnan(v))
        out[i] = "unknown" if missing else str(v)
    return out


def age_band(ages) -> np.ndarray:
    """Age bands "18-44", "45-64", "65-79", "80+" (years, lower bound inclusive); "<18" below, "unknown" for NaN/None."""
    a = np.asarray([np.nan if v is None else v for v in np.asarray(ages, dtype=object).reshape(-1)], dtype=np.float64)
    out = np.full(a.shape, "unknown", dtype=object)
    out[a < 18] = "<18"
    out[(a >= 18) & (a < 45)] = "18-44"
    out[(a >= 45) & (a < 65)] = "45-64"
    out[(a >= 65) & (a < 80)] = "65-79"
    out[a >= 80] = "80+"
    return out


def regression_report(y_true, y_pred) -> dict:
    """Mean absolute error, root mean squared error and R² (1 - SSE/SST; NaN if y_true is constant)."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    f = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != f.shape:
        raise ValueError(f"y_pred has {f.size} values but y_true has {y.size}")
    if y.size == 0:
        raise ValueError("regression_report needs at least one sample")
    err = f - y
    sst = float(np.sum((y - y.mean()) ** 2))
    return {
        "n": int(y.size),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1.0 - np.sum(err**2) / sst) if sst > 0 else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- plots
def _save_figure_atomic(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _new_figure(size=(5.0, 5.0)):
    # A bare Figure with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    from sklearn.metrics import roc_curve

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


__all__ = [
    "AGE_BANDS",
    "age_band",
    "auroc",
    "average_precision",
    "binary_classification_report",
    "bootstrap_ci",
    "brier_score",
    "expected_calibration_error",
    "plot_calibration",
    "plot_roc",
    "regression_report",
]
