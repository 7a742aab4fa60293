"""Brier score (mean squared error of predicted probabilities), computed with scikit-learn.

Local `evaluate` module of ehr-transformer: load it offline with
`evaluate.load("<path>/ehr_transformer/metrics/brier")` or `ehr_transformer.metrics.load_metric("brier")`.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import brier_score_loss

_DESCRIPTION = """Brier score of a binary classifier: mean of (probability - label)^2, lower is better;
a constant prediction of the prevalence p scores p(1 - p). `predictions` must be probabilities in [0, 1]."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted probabilities of the positive class, in [0, 1].
    references (list of int): 0/1 labels.
    sample_weight (list of float, optional): per-sample weights.
Returns:
    brier (float): the Brier score.
Examples:
    >>> metric = evaluate.load("ehr_transformer/metrics/brier")
    >>> metric.compute(predictions=[0.0, 1.0, 0.5, 0.5], references=[0, 1, 0, 1])
    {'brier': 0.125}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Brier(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.brier_score_loss.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        y_prob = np.asarray(predictions, dtype=np.float64)
        if y_prob.size and (y_prob.min() < 0.0 or y_prob.max() > 1.0):
            raise ValueError("brier: predictions must be probabilities in [0, 1]; apply a sigmoid to logits first")
        score = brier_score_loss(np.asarray(references), y_prob, sample_weight=sample_weight)
        return {"brier": float(score)}
