"""AUROC (area under the ROC curve) for binary classification, computed with scikit-learn.

Local `evaluate` module of ehr-transformer: load it offline with
`evaluate.load("<path>/ehr_transformer/metrics/auroc")` or `ehr_transformer.metrics.load_metric("auroc")`.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import roc_auc_score

_DESCRIPTION = """Area under the receiver operating characteristic curve of a binary classifier.
`predictions` are scores (probabilities or logits: only their order matters), `references` the 0/1 labels.
Undefined (NaN) when the references hold one class only."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): scores of the positive class.
    references (list of int): 0/1 labels.
    sample_weight (list of float, optional): per-sample weights.
Returns:
    auroc (float): the area under the ROC curve, NaN if references contain a single class.
Examples:
    >>> metric = evaluate.load("ehr_transformer/metrics/auroc")
    >>> metric.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])
    {'auroc': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Auroc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        y_true = np.asarray(references)
        if np.unique(y_true).size < 2:
            return {"auroc": float("nan")}
        return {"auroc": float(roc_auc_score(y_true, np.asarray(predictions), sample_weight=sample_weight))}
