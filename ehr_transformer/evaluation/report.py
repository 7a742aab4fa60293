"""The evaluation report of a checkpoint: discrimination with bootstrap intervals, calibration, subgroups and
plots, beside a tabular baseline scored on the same rows.

Undefined values (AUROC of a group with one class, AUPRC of a group without positives) are `None` in reports
(JSON-friendly).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
from transformers import AutoConfig

from ..data.labels import read_labels
from ..data.meds import iter_shards, read_events
from ..data.splits import split_subjects
from ..inference import predict
from ..model_card import render_model_card, write_model_card
from ..utils import write_json
from .baselines import TabularBaseline
from .metrics import (
    _as_binary,
    _as_prob,
    _check_probabilities,
    auroc,
    average_precision,
    bootstrap_ci,
    brier_score,
    expected_calibration_error,
)
from .plots import plot_calibration, plot_roc

AGE_BANDS = ("18-44", "45-64", "65-79", "80+")


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
    a = np.asarray(
        [np.nan if v is None else v for v in np.asarray(ages, dtype=object).reshape(-1)], dtype=np.float64
    )
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


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels: str | os.PathLike,
    split: str = "held_out",
    output_dir: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    baseline: str | None = "gbm",
    train_split: str = "train",
) -> dict:
    """Held-out report of a fine-tuned checkpoint: AUROC/AUPRC with bootstrap 95% intervals, Brier, ECE, by age
    band and sex, with ROC and calibration plots, beside a tabular baseline (`baseline="gbm"` or `"logistic"`,
    None for none) fitted on `train_split` and scored on exactly the same rows."""

    predictions = predict(checkpoint, data_dir, labels, split)
    if "label" not in predictions.columns:
        raise ValueError(
            f"{checkpoint} is a multitask checkpoint (columns {predictions.columns[2:]}); evaluate_checkpoint reports "
            "one binary task: score it with predict() and ehr_transformer.evaluation per task"
        )
    y = predictions["label"].to_numpy().astype(int)
    p = predictions["probability"].to_numpy()
    groups = subgroups_for(data_dir, predictions)
    report = {
        "checkpoint": str(checkpoint),
        "split": split,
        "n": len(y),
        "model": binary_classification_report(y, p, n_bootstrap=n_bootstrap, groups=groups),
    }
    if baseline:
        baseline_probabilities = fit_baseline_and_predict(data_dir, labels, predictions, kind=baseline)
        report[f"{baseline}_baseline"] = binary_classification_report(
            y, baseline_probabilities, n_bootstrap=n_bootstrap, groups=groups
        )
    fields = Path(checkpoint) / "model_card_fields.json"
    if split == "held_out" and fields.exists():  # the card of the checkpoint gets its held-out evaluation
        card = json.loads(fields.read_text())
        write_model_card(
            checkpoint,
            render_model_card(AutoConfig.from_pretrained(checkpoint), evaluation=report["model"], **card),
        )
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_roc(y, p, output_dir / "roc.png")
        plot_calibration(y, p, output_dir / "calibration.png")
        write_json(output_dir / "metrics.json", report)
    return report


def fit_baseline_and_predict(
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | pl.DataFrame,
    rows: pl.DataFrame,
    kind: str = "gbm",
    train_split: str = "train",
    seed: int = 0,
) -> np.ndarray:
    """Fit a tabular baseline (`gbm` on per-code aggregates, or `logistic` on code counts) on the training
    split's labels and score exactly `rows` (subject_id, prediction_time, label), with the same visible history."""
    labels = read_labels(labels) if not isinstance(labels, pl.DataFrame) else labels
    train_subjects = pl.Series(sorted(split_subjects(data_dir, train_split)), dtype=pl.Int64)
    train_labels = labels.filter(pl.col("subject_id").is_in(train_subjects.implode()))
    train_events = read_events(data_dir, subject_ids=train_labels["subject_id"].unique().to_list())
    baseline = TabularBaseline(kind=kind, seed=seed).fit(train_events, train_labels)
    test_rows = rows.select(
        "subject_id", "prediction_time", pl.col("label").cast(pl.Boolean).alias("boolean_value")
    )
    test_events = read_events(data_dir, subject_ids=test_rows["subject_id"].unique().to_list())
    return baseline.predict_proba(test_events, test_rows)


def subgroups_for(data_dir: str | os.PathLike, predictions: pl.DataFrame) -> dict[str, np.ndarray]:
    """Age band at prediction time and recorded sex for each prediction row (from MEDS_BIRTH and sex codes)."""

    subjects = pl.Series(predictions["subject_id"].unique().to_list(), dtype=pl.Int64)
    births, sexes = [], []
    for _, frame in iter_shards(data_dir):
        frame = frame.filter(pl.col("subject_id").is_in(subjects.implode()))
        births.append(
            frame.filter(pl.col("code") == "MEDS_BIRTH")
            .group_by("subject_id")
            .agg(birth=pl.col("time").min())
        )
        sex_events = frame.filter(pl.col("code").str.to_uppercase().str.contains(r"^(GENDER|SEX)//"))
        sexes.append(
            sex_events.group_by("subject_id").agg(sex=pl.col("code").first().str.split("//").list.last())
        )
    rows = predictions.select("subject_id", "prediction_time")
    if births:
        rows = rows.join(pl.concat(births), on="subject_id", how="left")
        rows = rows.join(pl.concat(sexes), on="subject_id", how="left")
    ages = ((rows["prediction_time"] - rows["birth"]).dt.total_hours() / (24 * 365.25)).to_numpy()
    return {
        "age_band": age_band(np.nan_to_num(ages, nan=-1.0)),
        "sex": rows["sex"].fill_null("unknown").to_numpy(),
    }


def format_report(report: dict) -> str:
    """A few readable lines from `evaluate_checkpoint`'s report."""
    lines = [f"{report['split']} split, {report['n']} predictions"]
    for name, metrics in report.items():
        if not isinstance(metrics, dict) or "auroc" not in metrics:
            continue
        lines.append(
            f"  {name:<18} AUROC {_fmt(metrics['auroc'])}  AUPRC {_fmt(metrics['auprc'])}  "
            f"Brier {metrics['brier']:.3f}  ECE {metrics['ece']:.3f}"
        )
    return "\n".join(lines)


def _fmt(metric: dict | None) -> str:
    if metric is None:
        return "  n/a"
    if metric.get("ci_lower") is None:
        return f"{metric['estimate']:.3f}"
    return f"{metric['estimate']:.3f} [{metric['ci_lower']:.3f}, {metric['ci_upper']:.3f}]"


__all__ = [
    "AGE_BANDS",
    "age_band",
    "binary_classification_report",
    "regression_report",
    "evaluate_checkpoint",
    "fit_baseline_and_predict",
    "subgroups_for",
    "format_report",
]
