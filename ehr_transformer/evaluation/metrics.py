"""The package's one implementation of its metrics: AUROC, AUPRC, Brier score, expected calibration error for
binary tasks; MAE, RMSE, R² and calibration slope for regression; accuracy, macro AUROC and log loss for
multi-class tasks; their bootstrap intervals, and the `compute_metrics` the Trainer calls.

Conventions
- Binary labels are 0/1 (booleans are accepted); probabilities are in [0, 1].
- AUROC and average precision are computed from ranks in numpy and equal scikit-learn's `roc_auc_score` and
  `average_precision_score` (the tests check it); they are 10-20 times faster per call, which a bootstrap of
  1,000 resamples per subgroup needs.
- Confidence intervals are percentile intervals over `n_bootstrap` bootstrap resamples. Reports resample
  subjects (every row of a drawn subject, `clusters`), so that many prediction times of one subject do not
  narrow the interval; without subjects, positives and negatives are resampled separately (stratified). The
  point estimate is the metric on the full sample.
- Undefined values (AUROC with one class, AUPRC without positives) are NaN.
- Expected calibration error (ECE) uses 10 equal-width probability bins [0, 0.1), [0.1, 0.2), ...,
  [0.9, 1.0] (the last bin includes 1.0): ECE = sum_b (n_b / n) * |mean(y in b) - mean(p in b)|,
  i.e. the sample-weighted mean absolute gap between observed frequency and mean predicted probability.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import expit, softmax


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
    clusters=None,
) -> dict:
    """Point estimate and percentile bootstrap confidence interval of `metric_fn(y_true, y_score)`.

    With `clusters` (one subject id per row), each resample draws subjects with replacement and keeps every row of
    a drawn subject: the interval of per-hour labels, where rows of one subject are alike. `y_true` may then be any
    numbers (regression) and `y_score` `(N,)` or `(N, C)`. Without `clusters`, rows are resampled stratified by
    class (binary `y_true`: positives and negatives drawn separately), so resamples keep the observed class counts.
    A resample where the metric is NaN (one class) is skipped. Returns {"estimate", "ci_lower", "ci_upper",
    "alpha", "n_bootstrap" (resamples used)}; the bounds are NaN when no valid resample remains.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if clusters is None:
        y = _as_binary(y_true)
        s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    else:
        y = np.asarray(y_true, dtype=np.float64).reshape(-1)
        s = np.asarray(y_score, dtype=np.float64)
        s = s.reshape(-1) if s.ndim == 1 or s.shape[1:] == (1,) else s
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"y_score has {s.shape[0]} values but y_true has {y.shape[0]}")
    estimate = float(metric_fn(y, s)) if y.size else float("nan")
    if clusters is None:
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        rng = np.random.default_rng(seed)
        draws = (
            (
                np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
                for _ in range(n_bootstrap)
            )
            if pos.size and neg.size
            else iter(())
        )
    else:
        draws = cluster_resamples(clusters, y.size, n_bootstrap, seed)
    values = [v for v in (float(metric_fn(y[idx], s[idx])) for idx in draws) if not np.isnan(v)]
    lower, upper = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0]) if values else (np.nan, np.nan)
    return {
        "estimate": estimate,
        "ci_lower": float(lower),
        "ci_upper": float(upper),
        "alpha": alpha,
        "n_bootstrap": len(values),
    }


def cluster_resamples(clusters, n: int, n_bootstrap: int, seed: int = 0):
    """Yield `n_bootstrap` row-index arrays, each the rows of clusters (subjects) drawn with replacement."""
    clusters = np.asarray(clusters).reshape(-1)
    if clusters.shape[0] != n:
        raise ValueError(f"clusters has {clusters.shape[0]} values but there are {n} rows")
    if n == 0:
        return
    _, cluster_index = np.unique(clusters, return_inverse=True)
    order = np.argsort(cluster_index, kind="stable")
    starts = np.searchsorted(cluster_index[order], np.arange(cluster_index.max() + 1))
    lengths = np.diff(np.r_[starts, n])
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, starts.size, starts.size)
        yield order[np.repeat(starts[drawn], lengths[drawn]) + _ranges(lengths[drawn])]


def paired_bootstrap_difference(
    y_true,
    score_a,
    score_b,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    clusters=None,
    n_bootstrap: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """`metric_fn(y, a) - metric_fn(y, b)` with a paired percentile bootstrap interval over `clusters`.

    Each resample draws clusters (subjects: pass one subject id per row) with replacement and keeps every row of a
    drawn cluster, for both scores at once, so the interval accounts for the two models being scored on the same
    rows and for rows of one subject being alike. Without `clusters` each row is its own cluster. Resamples where
    the difference is NaN (one class) or whose labels are all equal are skipped. Works for any metric: binary
    (AUROC), regression (MAE, R²) or multi-class (`(N, C)` scores). Returns {"estimate", "ci_lower", "ci_upper", "alpha",
    "n_bootstrap" (resamples used)}.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)  # 0/1 or any numbers; `metric_fn` checks its inputs
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    if a.shape[0] != y.size or b.shape[0] != y.size:
        raise ValueError(f"score_a has {a.shape[0]} rows and score_b {b.shape[0]} but y_true has {y.size}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    clusters = np.arange(y.size) if clusters is None else clusters
    estimate = float(metric_fn(y, a) - metric_fn(y, b)) if y.size else float("nan")
    values: list[float] = []
    for idx in cluster_resamples(clusters, y.size, n_bootstrap, seed):
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        value = float(metric_fn(yb, a[idx]) - metric_fn(yb, b[idx]))
        if not np.isnan(value):
            values.append(value)
    lower, upper = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0]) if values else (np.nan, np.nan)
    return {
        "estimate": estimate,
        "ci_lower": float(lower),
        "ci_upper": float(upper),
        "alpha": alpha,
        "n_bootstrap": len(values),
    }


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 for each n of `lengths`, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if ends.size else 0) - np.repeat(ends - lengths, lengths)


def logits_to_probabilities(logits) -> np.ndarray:
    """Positive-class probabilities (N,) from binary logits of shape (N,), (N, 1) (sigmoid) or (N, 2) (softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim == 1:
        return expit(logits)
    if logits.ndim == 2 and logits.shape[1] == 2:
        return softmax(logits, axis=1)[:, 1]
    raise ValueError(
        f"binary classification logits must have shape (N,), (N, 1) or (N, 2); got {tuple(logits.shape)}"
    )


def mean_absolute_error(y_true, y_pred) -> float:
    return float(np.mean(np.abs(np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64))))


def root_mean_squared_error(y_true, y_pred) -> float:
    return float(np.sqrt(np.mean((np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64)) ** 2)))


def r2_score(y_true, y_pred) -> float:
    """1 - SSE/SST: the share of the target's variance explained; NaN for a constant target."""
    y, f = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    sst = float(np.sum((y - y.mean()) ** 2)) if y.size else 0.0
    return float(1.0 - np.sum((f - y) ** 2) / sst) if sst > 0 else float("nan")


def calibration_slope(y_true, y_pred) -> float:
    """Slope of the least-squares line of the target on the prediction: 1 when predictions are on the target's
    scale, below 1 when they spread too far (overfitting), above 1 when too little; NaN for constant predictions."""
    y, f = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    var = float(np.var(f)) if f.size else 0.0
    return float(np.mean((f - f.mean()) * (y - y.mean())) / var) if var > 0 else float("nan")


def accuracy(y_true, probabilities) -> float:
    """Share of rows whose most probable class (`(N, C)` probabilities) is the label (class index)."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    return float(np.mean(np.argmax(probabilities, axis=1) == y)) if y.size else float("nan")


def multiclass_log_loss(y_true, probabilities) -> float:
    """Mean negative log probability of the true class (class indices, `(N, C)` probabilities)."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.clip(np.asarray(probabilities, np.float64)[np.arange(y.size), y], 1e-15, 1.0)
    return float(-np.mean(np.log(p))) if y.size else float("nan")


def macro_auroc(y_true, probabilities) -> float:
    """One-vs-rest AUROC averaged over the classes present with both outcomes; NaN if none."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probabilities, np.float64)
    per_class = [auroc(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < np.sum(y == c) < y.size]
    return float(np.mean(per_class)) if per_class else float("nan")


def _eval_arrays(eval_pred) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = (
        (eval_pred.predictions, eval_pred.label_ids) if hasattr(eval_pred, "predictions") else eval_pred
    )
    predictions = predictions[0] if isinstance(predictions, (tuple, list)) else predictions
    labels = labels[0] if isinstance(labels, (tuple, list)) else labels
    return np.asarray(predictions, dtype=np.float64), np.asarray(labels)


def compute_regression_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `transformers.Trainer` on one regression target: mae, rmse, r2, calibration_slope."""
    predictions, labels = _eval_arrays(eval_pred)
    f, y = predictions.reshape(-1), labels.astype(np.float64).reshape(-1)
    return {
        "mae": mean_absolute_error(y, f),
        "rmse": root_mean_squared_error(y, f),
        "r2": r2_score(y, f),
        "calibration_slope": calibration_slope(y, f),
    }


def compute_multiclass_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `transformers.Trainer` on a multi-class task (`(N, C)` logits, class indices):
    accuracy, macro one-vs-rest AUROC and log loss."""
    logits, labels = _eval_arrays(eval_pred)
    p = softmax(logits, axis=1)
    return {
        "accuracy": accuracy(labels, p),
        "macro_auroc": macro_auroc(labels, p),
        "log_loss": multiclass_log_loss(labels, p),
    }


def compute_classification_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `transformers.Trainer` on a binary task.

    Accepts an `EvalPrediction` or a `(predictions, labels)` tuple; `predictions` may itself be a tuple
    (the logits come first). Labels equal to -100 are ignored. Returns floats: auroc, auprc, brier, ece
    (10 equal-width bins, see `expected_calibration_error`) and prevalence.
    AUROC/AUPRC are NaN when the evaluated labels hold one class.
    """
    if hasattr(eval_pred, "predictions"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, labels = eval_pred
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    probs = logits_to_probabilities(predictions)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != probs.shape[0]:
        raise ValueError(f"got {probs.shape[0]} predictions but {labels.shape[0]} labels")
    keep = labels != -100
    probs, y_true = probs[keep], labels[keep].astype(np.int64)
    return {
        "auroc": auroc(y_true, probs),
        "auprc": average_precision(y_true, probs),
        "brier": brier_score(y_true, probs),
        "ece": float(expected_calibration_error(y_true, probs)),
        "prevalence": float(y_true.mean()) if y_true.size else float("nan"),
    }


__all__ = [
    "auroc",
    "average_precision",
    "brier_score",
    "expected_calibration_error",
    "bootstrap_ci",
    "paired_bootstrap_difference",
    "logits_to_probabilities",
    "compute_classification_metrics",
    "compute_regression_metrics",
    "compute_multiclass_metrics",
    "cluster_resamples",
    "mean_absolute_error",
    "root_mean_squared_error",
    "r2_score",
    "calibration_slope",
    "accuracy",
    "multiclass_log_loss",
    "macro_auroc",
]
