"""The evaluation report of a checkpoint: discrimination with bootstrap intervals, calibration, subgroups and
plots, beside a tabular baseline scored on the same rows.

Undefined values (AUROC of a group with one class, AUPRC of a group without positives) are `None` in reports
(JSON-friendly).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
from transformers import AutoConfig

from ..data.dataset import build_labeled_dataset, subsample_labels
from ..data.labels import label_fingerprint, read_labels, rows_fingerprint
from ..data.meds import read_events
from ..data.splits import split_subjects
from ..inference import predict
from ..model_card import render_model_card, write_model_card
from ..tokenization_ehr import EHREventTokenizer
from ..training.checkpoint import CARD_FIELDS_FILE, read_training_labels
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
    paired_bootstrap_difference,
)
from .plots import plot_calibration, plot_roc
from .subgroups import subgroups_for

logger = logging.getLogger(__name__)


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
    baseline_labels: str = "same",
    sex_code_prefix: str | None = None,
    group_codes: str | os.PathLike | pl.DataFrame | None = None,
    update_card: bool = False,
) -> dict:
    """Held-out report of a fine-tuned checkpoint: AUROC/AUPRC with bootstrap 95% intervals, Brier, ECE, overall
    and by subgroup (age band, sex and the attributes of `group_codes`, see `subgroups_for`), with ROC and
    calibration plots, beside a tabular baseline (`baseline="gbm"` or `"logistic"`, None for none) scored on
    exactly the same rows, and the paired difference model - baseline with a subject-level bootstrap interval.

    `baseline_labels="same"` fits the baseline on the label rows that trained the checkpoint (recorded in its
    `training_labels.json`: the same split, label fraction and seed); "all" on every label of `train_split`. A
    checkpoint without the record gets the "all" baseline, and the report says so. `update_card` writes the
    held-out figures into the checkpoint's model card (only for `split="held_out"`)."""
    if baseline_labels not in ("same", "all"):
        raise ValueError(f"baseline_labels must be 'same' or 'all', got {baseline_labels!r}")
    predictions = predict(checkpoint, data_dir, labels, split)
    if "predicted_boolean_probability" not in predictions.columns:
        raise ValueError(
            f"{checkpoint} is not a one-task binary checkpoint (columns {predictions.columns[2:]}); "
            "evaluate_checkpoint reports one binary task: score it with predict() and ehr_transformer.evaluation "
            "per task"
        )
    unlabeled = predictions["boolean_value"].null_count()
    if unlabeled:
        logger.warning(
            "%s: %d of %d scored rows have no label and are left out of the report",
            labels,
            unlabeled,
            predictions.height,
        )
        predictions = predictions.filter(pl.col("boolean_value").is_not_null())
    if predictions.height == 0:
        raise ValueError(
            f"{labels}: no scored row has a label (boolean_value), so there is nothing to evaluate"
        )
    y = predictions["boolean_value"].to_numpy().astype(int)
    p = predictions["predicted_boolean_probability"].to_numpy()
    subjects = predictions["subject_id"].to_numpy()
    groups, notes = subgroups_for(data_dir, predictions, sex_code_prefix, group_codes)
    report = {
        "checkpoint": str(checkpoint),
        "split": split,
        "n": len(y),
        "n_subjects": int(np.unique(subjects).size),
        "model": binary_classification_report(y, p, n_bootstrap=n_bootstrap, groups=groups),
        "subgroup_notes": notes,
    }
    if baseline:
        train_labels, description = baseline_training_labels(
            checkpoint, data_dir, labels, train_split, baseline_labels
        )
        baseline_probabilities = fit_baseline_and_predict(
            data_dir, labels, predictions, kind=baseline, train_split=train_split, train_labels=train_labels
        )
        name = f"{baseline}_baseline"
        report[name] = binary_classification_report(
            y, baseline_probabilities, n_bootstrap=n_bootstrap, groups=groups
        )
        report[name]["trained_on"] = description
        report[f"model_minus_{name}"] = {
            metric: paired_bootstrap_difference(y, p, baseline_probabilities, fn, subjects, n_bootstrap)
            for metric, fn in (("auroc", auroc), ("auprc", average_precision), ("brier", brier_score))
        }
    fields = Path(checkpoint) / CARD_FIELDS_FILE
    if update_card and split == "held_out" and fields.exists():
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


def baseline_training_labels(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | pl.DataFrame,
    train_split: str = "train",
    baseline_labels: str = "same",
) -> tuple[pl.DataFrame | None, str]:
    """The label rows a baseline should be fitted on, and a sentence saying which: with "same", the rows that
    trained `checkpoint` (rebuilt from its `training_labels.json` and checked against the recorded fingerprints);
    with "all", or for a checkpoint without that record, None (every label of `train_split`)."""
    frame = read_labels(labels) if not isinstance(labels, pl.DataFrame) else labels
    record = read_training_labels(checkpoint)
    everything = f"every label of the {train_split} split"
    if baseline_labels == "all":
        return None, f"{everything} (asked for with baseline_labels='all')"
    if record is None:
        logger.warning("%s records no training labels: the baseline is fitted on %s", checkpoint, everything)
        return (
            None,
            f"{everything}: the checkpoint records no training labels, so the model may have seen fewer",
        )
    if record["label_fingerprint"] != label_fingerprint(frame):
        raise ValueError(
            f"{labels}: not the label file that trained {checkpoint} ({record['label_file']}; the fingerprints "
            "differ), so the baseline cannot be fitted on the same rows; pass baseline_labels='all' "
            "(--baseline_labels all) to compare with a baseline on every training label"
        )
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    dataset = build_labeled_dataset(data_dir, frame, tokenizer, split=record["split"])
    dataset = subsample_labels(dataset, record["label_fraction"], record["seed"])
    if rows_fingerprint(dataset["subject_id"], dataset["prediction_time"]) != record["rows_fingerprint"]:
        raise ValueError(
            f"{data_dir}: the {record['n_rows']} training rows of {checkpoint} cannot be rebuilt from this dataset "
            "(the row fingerprints differ: the data or its splits changed since fine-tuning); pass "
            "baseline_labels='all' (--baseline_labels all) to compare with a baseline on every training label"
        )
    rows = pl.DataFrame(
        {
            "subject_id": dataset["subject_id"],
            "prediction_time": dataset["prediction_time"],
            "boolean_value": np.asarray(dataset["labels"], dtype=np.float64) > 0.5,
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean},
    )
    share = f"{record['label_fraction']:.0%} of the {record['split']} labels, seed {record['seed']}"
    return rows, f"the model's own {len(rows)} training labels ({share})"


def fit_baseline_and_predict(
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | pl.DataFrame,
    rows: pl.DataFrame,
    kind: str = "gbm",
    train_split: str = "train",
    seed: int = 0,
    train_labels: pl.DataFrame | None = None,
) -> np.ndarray:
    """Fit a tabular baseline (`gbm` on per-code aggregates, or `logistic` on code counts) on `train_labels`
    (default: every label of `train_split`) and score exactly `rows` (subject_id, prediction_time, boolean_value:
    `predict`'s columns), with
    the same visible history."""
    if train_labels is None:
        labels = read_labels(labels) if not isinstance(labels, pl.DataFrame) else labels
        train_subjects = pl.Series(sorted(split_subjects(data_dir, train_split)), dtype=pl.Int64)
        train_labels = labels.filter(pl.col("subject_id").is_in(train_subjects.implode()))
    train_events = read_events(data_dir, subject_ids=train_labels["subject_id"].unique().to_list())
    baseline = TabularBaseline(kind=kind, seed=seed).fit(train_events, train_labels)
    test_rows = rows.select("subject_id", "prediction_time", pl.col("boolean_value").cast(pl.Boolean))
    test_events = read_events(data_dir, subject_ids=test_rows["subject_id"].unique().to_list())
    return baseline.predict_proba(test_events, test_rows)


def format_report(report: dict) -> str:
    """Readable lines from `evaluate_checkpoint`'s report: each model, the paired difference, the subgroups."""
    lines = [
        f"{report['split']} split, {report['n']} predictions of {report.get('n_subjects', '?')} subjects"
    ]
    models = [
        name
        for name, metrics in report.items()
        if isinstance(metrics, dict) and "auroc" in metrics and not name.startswith("model_minus_")
    ]
    for name in models:
        metrics = report[name]
        lines.append(
            f"  {name:<18} AUROC {_fmt(metrics['auroc'])}  AUPRC {_fmt(metrics['auprc'])}  "
            f"Brier {metrics['brier']:.3f}  ECE {metrics['ece']:.3f}"
        )
        if "trained_on" in metrics:
            lines.append(f"  {'':<18} fitted on {metrics['trained_on']}")
    for name, difference in report.items():
        if name.startswith("model_minus_"):
            parts = [f"{_NAMES[metric]} {_fmt_signed(value)}" for metric, value in difference.items()]

            lines.append(f"  model - {name[len('model_minus_') :]} (paired, by subject):")
            lines.append("    " + "  ".join(parts))
    if models:
        lines.append("  subgroups (n, positives, AUROC of " + " / ".join(models) + "):")
        for group_name, per_value in report[models[0]]["subgroups"].items():
            for value, metrics in per_value.items():
                aurocs = " / ".join(_fmt(report[m]["subgroups"][group_name][value]["auroc"]) for m in models)
                lines.append(
                    f"    {group_name:<9} {value:<8} n {metrics['n']:>5}  positives {metrics['n_positive']:>4}  {aurocs}"
                )
    lines += [f"  note: {note}" for note in report.get("subgroup_notes", [])]
    return "\n".join(lines)


_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "brier": "Brier"}


def _fmt_signed(metric: dict) -> str:
    if metric["ci_lower"] is None or np.isnan(metric["ci_lower"]):
        return f"{metric['estimate']:+.3f}"
    return f"{metric['estimate']:+.3f} [{metric['ci_lower']:+.3f}, {metric['ci_upper']:+.3f}]"


def _fmt(metric: dict | None) -> str:
    if metric is None:
        return "  n/a"
    if metric.get("ci_lower") is None:
        return f"{metric['estimate']:.3f}"
    return f"{metric['estimate']:.3f} [{metric['ci_lower']:.3f}, {metric['ci_upper']:.3f}]"


__all__ = [
    "binary_classification_report",
    "regression_report",
    "evaluate_checkpoint",
    "baseline_training_labels",
    "fit_baseline_and_predict",
    "format_report",
]
