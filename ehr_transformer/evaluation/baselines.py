"""Tabular baselines on per-code aggregates of a MEDS event frame.

A transformer result means little without a strong tabular baseline on the same split. Two are here:

- gradient boosting (`HistGradientBoostingClassifier` / `...Regressor`) on per-code aggregates
  (count, mean, min, max, last value) and age: the strong baseline;
- logistic regression on log1p per-code counts (and age), standardised: the quickstart's simple baseline.

Features for a label row `(subject_id, prediction_time)` use only that subject's events with
`time <= prediction_time` plus its static events (null time); nothing later is ever seen.

    >>> baseline = TabularBaseline(kind="gbm").fit(events, train_labels)          # doctest: +SKIP
    >>> p = baseline.predict_proba(events, test_labels)                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

AGGREGATIONS = ("count", "mean", "min", "max", "last")
VALUE_AGGREGATIONS = ("mean", "min", "max", "last")
EXCLUDED_CODES = ("MEDS_BIRTH",)  # gives the age feature instead
_STATIC_TIME = datetime(1, 1, 1)  # static events (null time) sort before, and are visible to, every label


def _label_frame(labels: pl.DataFrame) -> pl.DataFrame:
    for column in ("subject_id", "prediction_time"):
        if column not in labels.columns:
            raise ValueError(f"labels: column {column!r} missing (columns are {labels.columns})")
    return labels.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(pl.Datetime("us")),
    )


def _event_frame(events: pl.DataFrame) -> pl.DataFrame:
    for column in ("subject_id", "time", "code"):
        if column not in events.columns:
            raise ValueError(f"events: column {column!r} missing (columns are {events.columns})")
    value = pl.col("numeric_value") if "numeric_value" in events.columns else pl.lit(None)
    return events.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        value.cast(pl.Float64).fill_nan(None).alias("numeric_value"),
    )


def infer_codes(events: pl.DataFrame) -> dict[str, bool]:
    """Codes of `events` (sorted, MEDS_BIRTH excluded) -> whether the code carries numeric values."""
    ev = _event_frame(events).filter(~pl.col("code").is_in(EXCLUDED_CODES))
    per_code = (
        ev.group_by("code").agg(pl.col("numeric_value").is_not_null().any().alias("numeric")).sort("code")
    )
    return dict(zip(per_code["code"].to_list(), per_code["numeric"].to_list(), strict=True))


def visible_events(events: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    """Events visible to at least one label: the labels' subjects, static or `time <=` their last prediction_time."""
    last = _label_frame(labels).group_by("subject_id").agg(pl.col("prediction_time").max().alias("_last"))
    return (
        _event_frame(events)
        .join(last, on="subject_id", how="inner")
        .filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("_last")))
        .drop("_last")
    )


def _normalise_codes(codes) -> dict[str, bool]:
    if isinstance(codes, Mapping):
        return {str(c): bool(v) for c, v in codes.items()}
    # a plain list: value aggregations for every listed code (data-independent, so columns always align)
    return dict.fromkeys((str(c) for c in codes), True)


def aggregate_features(
    events: pl.DataFrame,
    labels: pl.DataFrame,
    codes: Sequence[str] | Mapping[str, bool] | None = None,
    aggregations: Sequence[str] = AGGREGATIONS,
    include_age: bool = True,
) -> tuple[np.ndarray, list[str], dict[str, bool]]:
    """Per-code aggregates of the history visible at each label's prediction time.

    For every row of `labels` (subject_id, prediction_time), in the same order, using only events with
    `time <= prediction_time` and static events: `"<code>/count"` for every code (0 when absent) and, for
    codes with numeric values, `"<code>/mean|min|max|last"` (NaN when no value seen; `last` is the latest
    value, ties in time broken by frame order), then `"age"` in years at prediction_time (from
    MEDS_BIRTH, NaN without one).

    `codes`: None -> taken from `events` (code -> has numeric values); pass the returned mapping when
    featurising the test split so columns align with training. A plain list of codes computes the value
    aggregations for all of them. Codes absent from `codes` are ignored.
    Returns `(X float32 (n_labels, n_features), feature_names, codes)`.
    """
    unknown = set(aggregations) - set(AGGREGATIONS)
    if unknown:
        raise ValueError(f"unknown aggregations {sorted(unknown)}; choose from {AGGREGATIONS}")
    codes = infer_codes(events) if codes is None else _normalise_codes(codes)
    value_aggs = [a for a in AGGREGATIONS if a in aggregations and a != "count"]
    feature_names: list[str] = []
    for code, numeric in codes.items():
        if "count" in aggregations:
            feature_names.append(f"{code}/count")
        if numeric:
            feature_names.extend(f"{code}/{agg}" for agg in value_aggs)
    lab = _label_frame(labels)
    ev = _event_frame(events)
    X = np.full((lab.height, len(feature_names) + int(include_age)), np.nan, dtype=np.float32)
    column = {name: i for i, name in enumerate(feature_names)}
    joined = _visible_aggregates(ev, lab, codes, value_aggs)
    rows = joined["_row"].to_numpy()
    for agg in (["count"] if "count" in aggregations else []) + value_aggs:
        mapping = {c: column[f"{c}/{agg}"] for c in codes if f"{c}/{agg}" in column}
        cols = joined["code"].replace_strict(mapping, default=-1, return_dtype=pl.Int64).to_numpy()
        keep = cols >= 0
        X[rows[keep], cols[keep]] = joined[agg].to_numpy()[keep].astype(np.float32)
    for name in feature_names:
        if name.endswith("/count"):
            j = column[name]
            X[np.isnan(X[:, j]), j] = 0.0
    if include_age:
        X[:, -1] = _age_years(ev, lab)
        feature_names = [*feature_names, "age"]
    return X, feature_names, codes


def _visible_aggregates(
    ev: pl.DataFrame, lab: pl.DataFrame, codes: dict[str, bool], value_aggs: list[str]
) -> pl.DataFrame:
    """One row per (label row, code seen by then): `_row`, `code`, `count` and the running value aggregates."""
    keys = ["subject_id", "code"]
    ev = ev.filter(
        pl.col("code").is_in(list(codes)) & pl.col("subject_id").is_in(lab["subject_id"].implode())
    )
    value = pl.col("numeric_value")
    # running aggregates per (subject, code) in time order; static events first
    ev = (
        ev.with_columns(pl.col("time").fill_null(_STATIC_TIME), pl.int_range(pl.len()).alias("_seq"))
        .sort([*keys, "time", "_seq"])
        .with_columns(
            (pl.int_range(pl.len()).over(keys) + 1).cast(pl.Float64).alias("count"),
            value.is_not_null().cum_sum().over(keys).alias("_n_values"),
            value.fill_null(0.0).cum_sum().over(keys).alias("_sum"),
            value.cum_min().forward_fill().over(keys).alias("min"),
            value.cum_max().forward_fill().over(keys).alias("max"),
            value.forward_fill().over(keys).alias("last"),
        )
        .with_columns(
            pl.when(pl.col("_n_values") > 0).then(pl.col("_sum") / pl.col("_n_values")).alias("mean")
        )
        .sort(["time", "_seq"])
    )
    # each label row x each code its subject has: the last running aggregate at or before prediction_time
    pairs = lab.join(ev.select(keys).unique(), on="subject_id", how="inner").sort("prediction_time")
    return pairs.join_asof(
        ev.select([*keys, "time", "count", *value_aggs]),
        left_on="prediction_time",
        right_on="time",
        by=keys,
        strategy="backward",
        check_sortedness=False,
    ).filter(pl.col("count").is_not_null())


def _age_years(ev: pl.DataFrame, lab: pl.DataFrame) -> np.ndarray:
    birth = (
        ev.filter(pl.col("code") == "MEDS_BIRTH")
        .group_by("subject_id")
        .agg(pl.col("time").min().alias("_birth"))
    )
    age = (
        lab.join(birth, on="subject_id", how="left")
        .sort("_row")
        .select(
            ((pl.col("prediction_time") - pl.col("_birth")).dt.total_seconds() / (365.25 * 86_400)).alias(
                "age"
            )
        )
    )
    return age["age"].cast(pl.Float32).fill_null(float("nan")).to_numpy()


def label_values(labels: pl.DataFrame, label_column: str | None = None) -> np.ndarray:
    """The label values as a numpy array: `label_column`, or the one of boolean/integer/float_value with values."""
    if label_column is None:
        present = [
            c
            for c in ("boolean_value", "integer_value", "float_value")
            if c in labels.columns and labels[c].null_count() < labels.height
        ]
        if len(present) != 1:
            raise ValueError(
                f"labels: cannot tell the label column (non-empty value columns: {present}); "
                "pass label_column="
            )
        label_column = present[0]
    if labels[label_column].null_count():
        raise ValueError(
            f"labels: column {label_column!r} has {labels[label_column].null_count()} null values"
        )
    return labels[label_column].to_numpy()


# ------------------------------------------------------------------------------------------- models
def fit_gbm_baseline(X, y, seed: int = 0, **params):
    """Fit a `HistGradientBoostingClassifier` with defaults for small clinical cohorts.

    learning_rate 0.05, up to 300 trees of at most 15 leaves, min_samples_leaf 20, l2_regularization 1.0;
    early stopping on a stratified 15% validation fraction (log loss, patience 20) when there are at least
    500 samples, otherwise a fixed 300 iterations. Class imbalance is left as is, so probabilities stay
    calibrated to the observed prevalence. NaN (missing aggregates) is handled natively. `params` override.
    """
    model = HistGradientBoostingClassifier(**{**_gbm_defaults(len(y), seed), **params})
    return model.fit(_fill_empty_columns(X), np.asarray(y).astype(np.int64))


def fit_gbm_regressor(X, y, seed: int = 0, **params):
    """Fit a `HistGradientBoostingRegressor` (e.g. remaining length of stay in hours), squared error loss,
    same defaults as `fit_gbm_baseline`."""
    model = HistGradientBoostingRegressor(**{**_gbm_defaults(len(y), seed), **params})
    return model.fit(_fill_empty_columns(X), np.asarray(y, dtype=np.float64))


def _fill_empty_columns(X) -> np.ndarray:
    # scikit-learn's binning fails on a column without any value; such a column carries no information,
    # so it is set to 0 for fitting (NaN at prediction time then follows the learned missing-value branch).
    X = np.array(X, dtype=np.float32, copy=True)
    empty = np.isnan(X).all(axis=0)
    X[:, empty] = 0.0
    return X


def _gbm_defaults(n: int, seed: int) -> dict:
    return {
        "learning_rate": 0.05,
        "max_iter": 300,
        "max_leaf_nodes": 15,
        "min_samples_leaf": 20,
        "l2_regularization": 1.0,
        "early_stopping": n >= 500,
        "validation_fraction": 0.15,
        "n_iter_no_change": 20,
        "random_state": seed,
    }


def fit_count_logistic_baseline(X_counts, y, seed: int = 0, C: float = 1.0):
    """Logistic regression on log1p(per-code counts) (and any further columns, e.g. age), each column
    median-imputed and standardised; L2 penalty with strength 1/C. Returns the fitted sklearn Pipeline."""
    model = make_pipeline(
        FunctionTransformer(_signed_log1p),
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(C=C, max_iter=2000, random_state=seed),
    )
    return model.fit(np.asarray(X_counts, dtype=np.float64), np.asarray(y).astype(np.int64))


def _signed_log1p(x):
    return np.sign(x) * np.log1p(np.abs(x))


class TabularBaseline:
    """Fit on one set of labels, predict on another, straight from a MEDS event frame.

    kind: "gbm" (gradient boosting on count/mean/min/max/last + age) or "logistic" (log1p counts + age).
    task: "classification" (binary) or "regression" (gbm only). Codes and feature columns are fixed at
    `fit` from the events visible to the training labels (see `visible_events`).
    """

    def __init__(
        self, kind: str = "gbm", task: str = "classification", seed: int = 0, label_column: str | None = None
    ):
        if kind not in ("gbm", "logistic"):
            raise ValueError(f"kind must be 'gbm' or 'logistic', got {kind!r}")
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        if kind == "logistic" and task == "regression":
            raise ValueError("the logistic baseline is for classification; use kind='gbm' for regression")
        self.kind, self.task, self.seed, self.label_column = kind, task, seed, label_column
        self.aggregations = AGGREGATIONS if kind == "gbm" else ("count",)
        self.codes: dict[str, bool] | None = None
        self.feature_names: list[str] | None = None
        self.model = None

    def featurize(self, events: pl.DataFrame, labels: pl.DataFrame) -> np.ndarray:
        X, names, _ = aggregate_features(events, labels, codes=self.codes, aggregations=self.aggregations)
        if self.feature_names is not None and names != self.feature_names:
            raise RuntimeError("feature columns differ from the ones seen at fit time")
        return X

    def fit(self, events: pl.DataFrame, labels: pl.DataFrame) -> TabularBaseline:
        self.codes = infer_codes(visible_events(events, labels))
        X, self.feature_names, _ = aggregate_features(
            events, labels, codes=self.codes, aggregations=self.aggregations
        )
        y = label_values(labels, self.label_column)
        if self.task == "regression":
            self.model = fit_gbm_regressor(X, y, seed=self.seed)
        elif self.kind == "gbm":
            self.model = fit_gbm_baseline(X, y, seed=self.seed)
        else:
            self.model = fit_count_logistic_baseline(X, y, seed=self.seed)
        return self

    def _check_fitted(self) -> None:
        if self.model is None:
            raise RuntimeError("call fit() first")

    def predict_proba(self, events: pl.DataFrame, labels: pl.DataFrame) -> np.ndarray:
        """Positive-class probabilities, shape (n_labels,), in the order of `labels`."""
        self._check_fitted()
        if self.task != "classification":
            raise RuntimeError("predict_proba is for classification; use predict()")
        return self.model.predict_proba(self.featurize(events, labels))[:, 1]

    def predict_class_probabilities(self, events: pl.DataFrame, labels: pl.DataFrame) -> np.ndarray:
        """Probabilities of every class seen in training, shape (n_labels, len(model.classes_))."""
        self._check_fitted()
        return self.model.predict_proba(self.featurize(events, labels))

    def predict(self, events: pl.DataFrame, labels: pl.DataFrame) -> np.ndarray:
        """Regression predictions (or 0/1 class predictions for classification), shape (n_labels,)."""
        self._check_fitted()
        return self.model.predict(self.featurize(events, labels))


__all__ = [
    "AGGREGATIONS",
    "TabularBaseline",
    "aggregate_features",
    "fit_count_logistic_baseline",
    "fit_gbm_baseline",
    "fit_gbm_regressor",
    "infer_codes",
    "label_values",
    "visible_events",
]
