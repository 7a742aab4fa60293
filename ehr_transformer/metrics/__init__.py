"""Local `evaluate` metric modules (AUROC, AUPRC, Brier) and a Trainer-ready `compute_metrics`.

The modules live in this package (`metrics/<name>/<name>.py`), so `evaluate.load` reads them from
disk and never contacts the Hugging Face Hub:

    >>> from ehr_transformer.metrics import load_metric
    >>> load_metric("auroc").compute(predictions=[0.1, 0.9], references=[0, 1])
    {'auroc': 1.0}

`compute_classification_metrics` is meant for `transformers.Trainer(compute_metrics=...)` with a binary
classification head: it turns logits into probabilities (sigmoid for one logit per sample, softmax for
two) and returns AUROC, AUPRC, Brier score, expected calibration error and prevalence.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
AVAILABLE_METRICS = ("auroc", "auprc", "brier")

_CACHE: dict[str, object] = {}


def metric_path(name: str) -> Path:
    """Folder of the local metric module `name` (one of AVAILABLE_METRICS)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"unknown metric {name!r}; available local metrics: {', '.join(AVAILABLE_METRICS)}")
    return METRICS_DIR / name


def load_metric(name: str):
    """Load the local `evaluate` module `name` ("auroc", "auprc" or "brier") without network access.

    The module is read from this package's folder (a local path never reaches the Hub); the offline flag
    of `evaluate` is also set for the duration of the call. Returns an `evaluate.EvaluationModule` kept in
    memory (no cache files are written).
    """
    path = metric_path(name)
    if name in _CACHE:
        return _CACHE[name]
    previous = os.environ.get("HF_EVALUATE_OFFLINE")
    os.environ["HF_EVALUATE_OFFLINE"] = "1"
    import evaluate
    import evaluate.config

    previous_flag = evaluate.config.HF_EVALUATE_OFFLINE
    evaluate.config.HF_EVALUATE_OFFLINE = True
    try:
        module = evaluate.load(str(path), keep_in_memory=True)
    finally:
        evaluate.config.HF_EVALUATE_OFFLINE = previous_flag
        if previous is None:
            os.environ.pop("HF_EVALUATE_OFFLINE", None)
        else:
            os.environ["HF_EVALUATE_OFFLINE"] = previous
    _CACHE[name] = module
    return module


def logits_to_probabilities(logits) -> np.ndarray:
    """Positive-class probabilities (N,) from binary logits of shape (N,), (N, 1) (sigmoid) or (N, 2) (softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    if logits.ndim == 2 and logits.shape[1] == 2:
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp[:, 1] / exp.sum(axis=1)
    raise ValueError(
        f"binary classification logits must have shape (N,), (N, 1) or (N, 2); got {tuple(logits.shape)}"
    )


def compute_classification_metrics(eval_pred) -> dict[str, float]:
    """`compute_metrics` for `transformers.Trainer` on a binary task.

    Accepts an `EvalPrediction` or a `(predictions, labels)` tuple; `predictions` may itself be a tuple
    (the logits come first). Labels equal to -100 are ignored. Returns floats: auroc, auprc, brier, ece
    (10 equal-width bins, see `ehr_transformer.evaluation.expected_calibration_error`) and prevalence.
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
    from ehr_transformer.evaluation import expected_calibration_error

    return {
        "auroc": load_metric("auroc").compute(predictions=probs, references=y_true)["auroc"],
        "auprc": load_metric("auprc").compute(predictions=probs, references=y_true)["auprc"],
        "brier": load_metric("brier").compute(predictions=probs, references=y_true)["brier"],
        "ece": float(expected_calibration_error(y_true, probs)),
        "prevalence": float(y_true.mean()) if y_true.size else float("nan"),
    }


__all__ = [
    "AVAILABLE_METRICS",
    "METRICS_DIR",
    "compute_classification_metrics",
    "load_metric",
    "logits_to_probabilities",
    "metric_path",
]
