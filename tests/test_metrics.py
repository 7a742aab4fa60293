"""The package's one metric implementation equals scikit-learn, and the Trainer's `compute_metrics` uses it."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from ehr_transformer.evaluation.metrics import (
    auroc,
    average_precision,
    brier_score,
    compute_classification_metrics,
    logits_to_probabilities,
)

Y = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.5, 0.5, 0.5, 0.05, 0.7, 0.3, 0.6, 0.15, 0.25, 0.95])


@pytest.mark.parametrize(
    ("metric", "reference"),
    [(auroc, roc_auc_score), (average_precision, average_precision_score), (brier_score, brier_score_loss)],
)
def test_metric_equals_sklearn(metric, reference):
    assert metric(Y, P) == pytest.approx(reference(Y, P), abs=1e-12)


def test_single_class_gives_nan_and_bad_probabilities_are_refused():
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))
    assert np.isnan(average_precision([0, 0], [0.2, 0.3]))
    with pytest.raises(ValueError, match="probabilities"):
        brier_score([0, 1], [-1.0, 2.0])


@pytest.mark.parametrize("shape", ["n", "n1", "n2"])
def test_compute_classification_metrics_logit_shapes(shape):
    logits = np.log(P / (1 - P))
    if shape == "n1":
        logits = logits[:, None]
    elif shape == "n2":
        logits = np.stack([np.zeros_like(logits), logits], axis=1)  # softmax of (0, z) = sigmoid(z)
    out = compute_classification_metrics((logits, Y.astype(np.float32)))
    assert out["auroc"] == pytest.approx(roc_auc_score(Y, P))
    assert out["auprc"] == pytest.approx(average_precision_score(Y, P))
    assert out["brier"] == pytest.approx(brier_score_loss(Y, P))
    assert out["prevalence"] == pytest.approx(Y.mean())
    assert set(out) == {"auroc", "auprc", "brier", "ece", "prevalence"}


def test_compute_classification_metrics_eval_prediction_and_ignored_labels():
    from transformers import EvalPrediction

    logits = np.r_[np.log(P / (1 - P)), 5.0]
    labels = np.r_[Y, -100]
    out = compute_classification_metrics(EvalPrediction(predictions=(logits, np.zeros(17)), label_ids=labels))
    assert out["auroc"] == pytest.approx(roc_auc_score(Y, P))


def test_logits_to_probabilities_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        logits_to_probabilities(np.zeros((4, 3)))
