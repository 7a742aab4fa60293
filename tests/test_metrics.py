"""The local evaluate metric modules equal scikit-learn and load without network access."""

import socket

import evaluate
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

import ehr_transformer.metrics as metrics
from ehr_transformer.metrics import compute_classification_metrics, load_metric, logits_to_probabilities

Y = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.5, 0.5, 0.5, 0.05, 0.7, 0.3, 0.6, 0.15, 0.25, 0.95])


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(metrics, "_CACHE", {})


@pytest.mark.parametrize(
    ("name", "reference"),
    [("auroc", roc_auc_score), ("auprc", average_precision_score), ("brier", brier_score_loss)],
)
def test_metric_module_equals_sklearn(no_network, name, reference):
    result = load_metric(name).compute(predictions=P, references=Y)
    assert result[name] == pytest.approx(reference(Y, P), abs=1e-12)


def test_evaluate_load_local_path_offline(no_network, monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    module = evaluate.load(str(metrics.metric_path("auroc")), keep_in_memory=True)
    assert module.compute(predictions=P, references=Y)["auroc"] == pytest.approx(roc_auc_score(Y, P))
    module = evaluate.load(str(metrics.metric_path("brier") / "brier.py"), keep_in_memory=True)
    assert module.compute(predictions=P, references=Y)["brier"] == pytest.approx(brier_score_loss(Y, P))


def test_single_class_gives_nan_and_unknown_metric_is_rejected(no_network):
    assert np.isnan(load_metric("auroc").compute(predictions=[0.2, 0.3], references=[1, 1])["auroc"])
    assert np.isnan(load_metric("auprc").compute(predictions=[0.2, 0.3], references=[0, 0])["auprc"])
    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("roc_auc")
    with pytest.raises(ValueError, match="probabilities"):
        load_metric("brier").compute(predictions=[-1.0, 2.0], references=[0, 1])


@pytest.mark.parametrize("shape", ["n", "n1", "n2"])
def test_compute_classification_metrics_logit_shapes(no_network, shape):
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


def test_compute_classification_metrics_eval_prediction_and_ignored_labels(no_network):
    from transformers import EvalPrediction

    logits = np.r_[np.log(P / (1 - P)), 5.0]
    labels = np.r_[Y, -100]
    out = compute_classification_metrics(EvalPrediction(predictions=(logits, np.zeros(17)), label_ids=labels))
    assert out["auroc"] == pytest.approx(roc_auc_score(Y, P))


def test_logits_to_probabilities_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        logits_to_probabilities(np.zeros((4, 3)))
