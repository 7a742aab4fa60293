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
from ..data.labels import _resolve_label_column, class_index, label_fingerprint, read_labels, rows_fingerprint
from ..data.meds import read_events
from ..data.splits import split_subjects
from ..inference import checkpoint_classes, checkpoint_task_type, predict
from ..model_card import render_model_card, write_model_card
from ..tokenization_ehr import EHREventTokenizer
from ..training.checkpoint import CARD_FIELDS_FILE, read_training_labels
from ..utils import write_json
from .baselines import TabularBaseline
from .metrics import (
    _as_binary,
    _as_prob,
    _check_probabilities,
    accuracy,
    auroc,
    average_precision,
    bootstrap_ci,
    brier_score,
    calibration_slope,
    expected_calibration_error,
    macro_auroc,
    mean_absolute_error,
    multiclass_log_loss,
    paired_bootstrap_difference,
    r2_score,
    root_mean_squared_error,
)
from .plots import plot_calibration, plot_regression, plot_roc
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


# What each task type reports: (name, function, with a bootstrap interval); the first is the headline, the last
# ones per type are point estimates. Binary functions take (y, p); multi-class (class index, (N, C) probabilities).
TASK_METRICS = {
    "binary": (
        ("auroc", auroc, True),
        ("auprc", average_precision, True),
        ("brier", brier_score, False),
        ("ece", expected_calibration_error, False),
    ),
    "regression": (
        ("r2", r2_score, True),
        ("mae", mean_absolute_error, True),
        ("rmse", root_mean_squared_error, True),
        ("calibration_slope", calibration_slope, False),
    ),
    "multiclass": (
        ("macro_auroc", macro_auroc, True),
        ("accuracy", accuracy, True),
        ("log_loss", multiclass_log_loss, False),
    ),
}
# the metrics of the paired difference model - baseline
PAIRED_METRICS = {
    "binary": ("auroc", "auprc", "brier"),
    "regression": ("r2", "mae"),
    "multiclass": ("macro_auroc",),
}


def _task_metrics(kind, y, scores, clusters, n_bootstrap, seed, alpha) -> dict:
    out: dict = {"n": int(y.size)}
    if kind == "binary":
        n_pos = int(y.sum())
        out.update(n_positive=n_pos, prevalence=float(n_pos / y.size) if y.size else None)
    elif kind == "regression":
        out.update(mean_target=float(y.mean()) if y.size else None)
    else:
        out.update(class_counts=np.bincount(y.astype(np.int64), minlength=scores.shape[1]).tolist())
    for name, fn, with_interval in TASK_METRICS[kind]:
        if with_interval:
            if clusters is None and kind == "binary":  # stratified by class
                result = bootstrap_ci(y, scores, fn, n_bootstrap, alpha, seed)
            else:
                ids = np.arange(y.size) if clusters is None else clusters
                result = bootstrap_ci(y, scores, fn, n_bootstrap, alpha, seed, clusters=ids)
            out[name] = _interval(result) if y.size else None
        else:
            out[name] = _none_if_nan(fn(y, scores)) if y.size else None
    return out


def task_report(
    kind: str,
    y_true,
    scores,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Mapping[str, object] | None = None,
    alpha: float = 0.05,
    clusters=None,
) -> dict:
    """Metrics of one task, overall and per subgroup, as a JSON-serialisable dict.

    `kind` "binary" (`scores` (N,) probabilities; AUROC and AUPRC with intervals, Brier, ECE, prevalence),
    "regression" (`scores` (N,) predictions; R², MAE, RMSE with intervals, calibration slope) or "multiclass"
    (`y_true` class indices, `scores` (N, C) probabilities; macro AUROC and accuracy with intervals, log loss).
    Each interval is a percentile bootstrap interval: over `clusters` (one subject id per row: subjects are
    resampled with all their rows) when given, else over rows (stratified by class for binary). `groups` maps a
    grouping name to one value per row, e.g. {"age_band": age_band(ages)}; null/NaN values report as "unknown".
    Keys: "task_type", "n", the metrics, "ci_level", "n_bootstrap", "subgroups": {group: {value: {...}}}.
    """
    if kind == "binary":
        y = _as_binary(y_true)
        p = _as_prob(scores, y.size)
        _check_probabilities(p)
    else:
        y = np.asarray(y_true, dtype=np.float64).reshape(-1)
        p = np.asarray(scores, dtype=np.float64)
        if p.shape[0] != y.size:
            raise ValueError(f"scores have {p.shape[0]} rows but y_true has {y.size}")
    c = None if clusters is None else np.asarray(clusters).reshape(-1)
    report = {"task_type": kind, **_task_metrics(kind, y, p, c, n_bootstrap, seed, alpha)}
    report["ci_level"] = 1.0 - alpha
    report["n_bootstrap"] = n_bootstrap
    report["subgroups"] = {}
    for group_name, group_values in (groups or {}).items():
        values = _group_labels(group_values, y.size, group_name)
        report["subgroups"][group_name] = {
            value: _task_metrics(
                kind, y[mask], p[mask], None if c is None else c[mask], n_bootstrap, seed, alpha
            )
            for value in sorted(set(values.tolist()))
            for mask in [values == value]
        }
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
    kind, label_column, score_column = prediction_task(predictions, checkpoint)
    unlabeled = predictions[label_column].null_count()
    if unlabeled:
        logger.warning(
            "%s: %d of %d scored rows have no label and are left out of the report",
            labels,
            unlabeled,
            predictions.height,
        )
        predictions = predictions.filter(pl.col(label_column).is_not_null())
    if predictions.height == 0:
        raise ValueError(
            f"{labels}: no scored row has a label ({label_column}), so there is nothing to evaluate"
        )
    classes = checkpoint_classes(AutoConfig.from_pretrained(checkpoint))
    y, scores = _targets_and_scores(predictions, kind, label_column, score_column, classes)
    subjects = predictions["subject_id"].to_numpy()
    groups, notes = subgroups_for(data_dir, predictions, sex_code_prefix, group_codes)
    report = {
        "checkpoint": str(checkpoint),
        "split": split,
        "task_type": kind,
        "n": len(y),
        "n_subjects": int(np.unique(subjects).size),
        "model": task_report(kind, y, scores, n_bootstrap=n_bootstrap, groups=groups, clusters=subjects),
        "subgroup_notes": notes,
    }
    if baseline:
        if kind != "binary" and baseline != "gbm":
            raise ValueError(
                f"the {baseline} baseline is for binary tasks; use baseline='gbm' for a {kind} task"
            )
        train_labels, description = baseline_training_labels(
            checkpoint, data_dir, labels, train_split, baseline_labels
        )
        baseline_scores = fit_baseline_and_predict(
            data_dir,
            labels,
            predictions,
            kind=baseline,
            train_split=train_split,
            train_labels=train_labels,
            task_type=kind,
            classes=classes,
        )
        name = f"{baseline}_baseline"
        report[name] = task_report(
            kind, y, baseline_scores, n_bootstrap=n_bootstrap, groups=groups, clusters=subjects
        )
        report[name]["trained_on"] = description
        functions = {metric: fn for metric, fn, _ in TASK_METRICS[kind]}
        report[f"model_minus_{name}"] = {
            metric: paired_bootstrap_difference(
                y, scores, baseline_scores, functions[metric], subjects, n_bootstrap
            )
            for metric in PAIRED_METRICS[kind]
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
        if kind == "binary":
            plot_roc(y, scores, output_dir / "roc.png")
            plot_calibration(y, scores, output_dir / "calibration.png")
        elif kind == "regression":
            plot_regression(y, scores, output_dir / "calibration.png")
        write_json(output_dir / "metrics.json", report)
    return report


def prediction_task(predictions: pl.DataFrame, checkpoint="<checkpoint>") -> tuple[str, str, str]:
    """(task type, label column, score column) of `predict`'s output for a one-task checkpoint."""
    for kind, label, score in (
        ("binary", "boolean_value", "predicted_boolean_probability"),
        ("regression", "float_value", "predicted_float_value"),
        ("multiclass", "integer_value", "predicted_integer_probabilities"),
        ("multiclass", "categorical_value", "predicted_categorical_probabilities"),
    ):
        if score in predictions.columns:
            return kind, label, score
    raise ValueError(
        f"{checkpoint} is a multitask checkpoint (columns {predictions.columns[2:]}); evaluate reports one task: "
        "score it with predict() and report each task with ehr_transformer.evaluation.task_report"
    )


def _targets_and_scores(predictions, kind, label_column, score_column, classes):
    """`(N,)` targets (0/1, numbers or class indices) and the scores `task_report` takes."""
    if kind == "multiclass":
        keys = classes if label_column == "categorical_value" else [int(c) for c in classes]
        y = predictions[label_column].replace_strict(keys, list(range(len(keys))), return_dtype=pl.Int64)
        return y.to_numpy(), np.asarray(predictions[score_column].to_list(), dtype=np.float64)
    y = predictions[label_column].to_numpy().astype(int if kind == "binary" else np.float64)
    return y, predictions[score_column].to_numpy()


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
    config = AutoConfig.from_pretrained(checkpoint)
    kind, classes = checkpoint_task_type(config), checkpoint_classes(config)
    dataset = build_labeled_dataset(
        data_dir, frame, tokenizer, split=record["split"], task_type=kind, classes=classes
    )
    dataset = subsample_labels(dataset, record["label_fraction"], record["seed"])
    if rows_fingerprint(dataset["subject_id"], dataset["prediction_time"]) != record["rows_fingerprint"]:
        raise ValueError(
            f"{data_dir}: the {record['n_rows']} training rows of {checkpoint} cannot be rebuilt from this dataset "
            "(the row fingerprints differ: the data or its splits changed since fine-tuning); pass "
            "baseline_labels='all' (--baseline_labels all) to compare with a baseline on every training label"
        )
    y = np.asarray(dataset["labels"], dtype=np.float64)
    column, value, dtype = {
        "binary": ("boolean_value", y > 0.5, pl.Boolean),
        "regression": ("float_value", y, pl.Float64),
        "multiclass": ("integer_value", y.astype(np.int64), pl.Int64),  # class indices
    }[kind]
    rows = pl.DataFrame(
        {"subject_id": dataset["subject_id"], "prediction_time": dataset["prediction_time"], column: value},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), column: dtype},
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
    task_type: str = "binary",
    classes: list[str] | None = None,
) -> np.ndarray:
    """Fit a tabular baseline (`gbm` on per-code aggregates, or `logistic` on code counts) on `train_labels`
    (default: every label of `train_split`) and score exactly `rows` (subject_id, prediction_time: `predict`'s
    rows) with the same visible history. Returns what `task_report` takes for `task_type`: `(N,)` probabilities
    (binary), `(N,)` predictions (regression) or `(N, C)` probabilities over `classes` (multi-class; the training
    labels in `integer_value` as class indices, or the label file's values mapped through `classes`)."""
    if train_labels is None:
        labels = read_labels(labels) if not isinstance(labels, pl.DataFrame) else labels
        train_subjects = pl.Series(sorted(split_subjects(data_dir, train_split)), dtype=pl.Int64)
        train_labels = labels.filter(pl.col("subject_id").is_in(train_subjects.implode()))
        if task_type == "multiclass":
            column = _resolve_label_column(train_labels, None)
            train_labels = train_labels.select(
                "subject_id", "prediction_time", class_index(column, classes).alias("integer_value")
            ).drop_nulls()
    train_events = read_events(data_dir, subject_ids=train_labels["subject_id"].unique().to_list())
    task = "regression" if task_type == "regression" else "classification"
    label_column = {"binary": None, "regression": "float_value", "multiclass": "integer_value"}[task_type]
    if task_type == "regression":  # integer targets are regressed too
        column = _resolve_label_column(train_labels, None)
        train_labels = train_labels.with_columns(pl.col(column).cast(pl.Float64).alias("float_value"))
    baseline = TabularBaseline(kind=kind, task=task, seed=seed, label_column=label_column)
    baseline.fit(train_events, train_labels)
    test_rows = rows.select("subject_id", "prediction_time")
    test_events = read_events(data_dir, subject_ids=test_rows["subject_id"].unique().to_list())
    if task_type == "regression":
        return baseline.predict(test_events, test_rows)
    if task_type == "binary":
        return baseline.predict_proba(test_events, test_rows)
    present = baseline.predict_class_probabilities(test_events, test_rows)  # (N, classes seen in training)
    probabilities = np.zeros((test_rows.height, len(classes)))
    probabilities[:, baseline.model.classes_.astype(np.int64)] = present
    return probabilities


def format_report(report: dict) -> str:
    """Readable lines from `evaluate_checkpoint`'s report: each model, the paired difference, the subgroups."""
    kind = report.get("task_type", "binary")
    lines = [
        f"{report['split']} split, {report['n']} predictions of {report.get('n_subjects', '?')} subjects "
        f"({kind} task; intervals resample subjects)"
    ]
    models = [
        name
        for name, metrics in report.items()
        if isinstance(metrics, dict) and "subgroups" in metrics and not name.startswith("model_minus_")
    ]
    for name in models:
        metrics = report[name]
        parts = [
            f"{_NAMES.get(metric, metric)} {_fmt(metrics[metric]) if interval else _fmt_point(metrics[metric])}"
            for metric, _, interval in TASK_METRICS[kind]
        ]
        lines.append(f"  {name:<18} " + "  ".join(parts))
        if "trained_on" in metrics:
            lines.append(f"  {'':<18} fitted on {metrics['trained_on']}")
    for name, difference in report.items():
        if name.startswith("model_minus_"):
            parts = [
                f"{_NAMES.get(metric, metric)} {_fmt_signed(value)}" for metric, value in difference.items()
            ]
            lines.append(f"  model - {name[len('model_minus_') :]} (paired, by subject):")
            lines.append("    " + "  ".join(parts))
    headline = TASK_METRICS[kind][0][0]
    if models:
        counts = "n, positives" if kind == "binary" else "n"
        lines.append(
            f"  subgroups ({counts}, {_NAMES.get(headline, headline)} of " + " / ".join(models) + "):"
        )
        for group_name, per_value in report[models[0]]["subgroups"].items():
            for value, metrics in per_value.items():
                scores = " / ".join(_fmt(report[m]["subgroups"][group_name][value][headline]) for m in models)
                positives = f"  positives {metrics['n_positive']:>4}" if kind == "binary" else ""
                lines.append(f"    {group_name:<9} {value:<8} n {metrics['n']:>5}{positives}  {scores}")
    lines += [f"  note: {note}" for note in report.get("subgroup_notes", [])]
    return "\n".join(lines)


_NAMES = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "brier": "Brier",
    "ece": "ECE",
    "r2": "R²",
    "mae": "MAE",
    "rmse": "RMSE",
    "calibration_slope": "slope",
    "macro_auroc": "macro AUROC",
    "accuracy": "accuracy",
    "log_loss": "log loss",
}


def _fmt_point(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
    "TASK_METRICS",
    "task_report",
    "prediction_task",
    "evaluate_checkpoint",
    "baseline_training_labels",
    "fit_baseline_and_predict",
    "format_report",
]
