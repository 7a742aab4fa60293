"""Tabular baselines: per-code aggregates respect the prediction time, columns align, GBM learns."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehr_transformer.evaluation.baselines import (
    TabularBaseline,
    aggregate_features,
    fit_count_logistic_baseline,
    fit_gbm_baseline,
)
from ehr_transformer.evaluation.metrics import auroc

T0 = datetime(2020, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    # OpenMP spin-waiting makes gradient boosting crawl on a busy shared 2-core machine; one thread is fast here.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}


def _events(rows):
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def _labels(rows):
    return pl.DataFrame(
        rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")}, orient="row"
    )


BASE = [
    (1, None, "SEX//F", None),
    (1, datetime(1950, 1, 1), "MEDS_BIRTH", None),
    (1, T0, "LAB//k", 4.0),
    (1, T0 + timedelta(hours=1), "LAB//k", 5.0),
    (1, T0 + timedelta(hours=1), "DX//a", None),
    (1, T0 + timedelta(hours=2), "LAB//k", 3.0),
    (2, None, "SEX//M", None),
    (2, T0, "DX//b", None),
]
CUTOFF = T0 + timedelta(hours=1)


def test_aggregates_and_cutoff():
    labels = _labels([(1, CUTOFF), (2, CUTOFF), (3, CUTOFF)])
    X, names, codes = aggregate_features(_events(BASE), labels)
    f = dict(zip(names, X[0], strict=True))
    assert codes == {"DX//a": False, "DX//b": False, "LAB//k": True, "SEX//F": False, "SEX//M": False}
    # hour 2 not visible
    assert f["LAB//k/count"] == 2 and f["LAB//k/mean"] == 4.5 and f["LAB//k/last"] == 5.0
    assert f["LAB//k/min"] == 4.0 and f["LAB//k/max"] == 5.0
    assert f["DX//a/count"] == 1  # at exactly the prediction time: visible
    assert f["SEX//F/count"] == 1  # static events always visible
    assert f["age"] == pytest.approx(
        (CUTOFF - datetime(1950, 1, 1)).total_seconds() / (365.25 * 86400), rel=1e-6
    )
    assert "MEDS_BIRTH/count" not in names
    # subject 3 has no events at all: zero counts, NaN values and age; rows follow the label order
    assert X.dtype == np.float32 and X.shape == (3, len(names))
    assert X[2, names.index("LAB//k/count")] == 0 and np.isnan(X[2, names.index("LAB//k/mean")])
    assert np.isnan(X[2, names.index("age")]) and X[1, names.index("DX//b/count")] == 1


def test_event_one_second_after_prediction_time_changes_nothing():
    labels = _labels([(1, CUTOFF), (2, CUTOFF)])
    X, names, codes = aggregate_features(_events(BASE), labels)
    later = [
        (1, CUTOFF + timedelta(seconds=1), "LAB//k", 100.0),
        (2, CUTOFF + timedelta(seconds=1), "DX//a", None),
    ]
    X2, names2, _ = aggregate_features(_events(BASE + later), labels, codes=codes)
    assert names2 == names
    np.testing.assert_array_equal(X, X2)
    # ... while the same event one second earlier does change the features
    earlier = [(1, CUTOFF - timedelta(seconds=1), "LAB//k", 100.0)]
    X3, _, _ = aggregate_features(_events(BASE + earlier), labels, codes=codes)
    assert X3[0, names.index("LAB//k/max")] == 100.0


def test_columns_align_between_train_and_test():
    train_labels = _labels([(1, CUTOFF)])
    _, names, codes = aggregate_features(_events(BASE), train_labels)
    test_events = _events([(7, T0, "LAB//new", 1.0), (7, T0, "LAB//k", 2.0)])  # a code unseen in training
    X_test, names_test, _ = aggregate_features(test_events, _labels([(7, CUTOFF)]), codes=codes)
    assert names_test == names
    assert X_test[0, names.index("LAB//k/count")] == 1 and X_test[0, names.index("DX//a/count")] == 0
    assert not any("LAB//new" in n for n in names_test)
    # label order is kept even when labels are not sorted
    labels = _labels([(2, CUTOFF), (1, CUTOFF), (2, T0 - timedelta(days=1))])
    X, names, _ = aggregate_features(_events(BASE), labels, codes=codes)
    assert X[:, names.index("SEX//M/count")].tolist() == [1, 0, 1]
    assert X[:, names.index("DX//b/count")].tolist() == [1, 0, 0]


def _synthetic(n_subjects, seed):
    """Subjects with a lab whose mean shifts with the outcome, plus noise codes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n_subjects)
    rows, labels = [], []
    for s in range(n_subjects):
        rows.append((s, datetime(1940 + int(rng.integers(0, 50)), 1, 1), "MEDS_BIRTH", None))
        for h in range(int(rng.integers(3, 8))):
            rows.append((s, T0 + timedelta(hours=h), "LAB//lact", float(rng.normal(1.0 + 0.6 * y[s], 1.0))))
            rows.append((s, T0 + timedelta(hours=h), f"DX//{int(rng.integers(0, 5))}", None))
        # after the prediction time: a perfect leak that must not be used
        rows.append((s, T0 + timedelta(days=3), "LEAK", float(y[s])))
        labels.append((s, T0 + timedelta(days=1), bool(y[s])))
    events = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    labels = pl.DataFrame(
        labels,
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean},
        orient="row",
    )
    return events, labels


def test_gbm_learns_constructed_signal_without_leak():
    events, labels = _synthetic(600, seed=0)
    train, test = labels[:400], labels[400:]
    model = TabularBaseline(kind="gbm").fit(events, train)
    assert not any(n.startswith("LEAK") for n in model.feature_names)  # never visible to a label
    p = model.predict_proba(events, test)
    assert p.shape == (200,) and 0.7 < auroc(test["boolean_value"].to_numpy(), p) < 0.97
    logistic = TabularBaseline(kind="logistic").fit(events, train)
    p_log = logistic.predict_proba(events, test)
    assert p_log.shape == (200,) and np.all((p_log >= 0) & (p_log <= 1))


def test_fit_functions_and_regression():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    gbm = fit_gbm_baseline(X, y, seed=0, max_iter=50)
    assert auroc(y, gbm.predict_proba(X)[:, 1]) > 0.95
    counts = rng.poisson(2, size=(300, 3)) + (y[:, None] * 3)
    logistic = fit_count_logistic_baseline(counts, y)
    assert auroc(y, logistic.predict_proba(counts)[:, 1]) > 0.9
    events, labels = _synthetic(150, seed=1)
    reg_labels = labels.select(
        "subject_id", "prediction_time", pl.col("boolean_value").cast(pl.Float64).alias("float_value")
    )
    reg = TabularBaseline(kind="gbm", task="regression").fit(events, reg_labels)
    assert reg.predict(events, reg_labels).shape == (150,)
    with pytest.raises(ValueError, match="kind"):
        TabularBaseline(kind="svm")
