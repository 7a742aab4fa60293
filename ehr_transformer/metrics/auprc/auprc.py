"""AUPRC (average precision, area under the precision-recall curve), computed with scikit-learn.

Local `evaluate` module of ehr-transformer: load it offline with
`evaluate.load("<path>/ehr_transformer/metrics/auprc")` or `ehr_transformer.metrics.load_metric("auprc")`.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import average_precision_score

_DESCRIPTION = """Area under the precision-recall curve of a binary classifier, estimated as the average
precision (scikit-learn's `average_precision_score`, no interpolation). Its chance level is the prevalence.
`predictions` are scores (probabilities or logits), `references` the 0/1 labels. NaN without positives."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): scores of the positive class.
    references (list of int): 0/1 labels.
    sample_weight (list of float, optional): per-sample weights.
Returns:
    auprc (float): average precision, NaN if references contain no positive.
Examples:
    >>> metric = evaluate.load("ehr_transformer/metrics/auprc")
    >>> round(metric.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])["auprc"], 4)
    0.8333
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Auprc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.average_precision_score.html"
            ],
        )

    def _compute(self, predictions, references, sample_weight=None):
        y_true = np.asarray(references)
        if not (y_true == 1).any():
            return {"auprc": float("nan")}
        score = average_precision_score(y_true, np.asarray(predictions), sample_weight=sample_weight)
        return {"auprc": float(score)}
