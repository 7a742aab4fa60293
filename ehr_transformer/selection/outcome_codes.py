"""The codes a user's outcome depends on: which of the user's codes, seen before each prediction time, are tied
to the label beyond chance (a label-permutation null), and how much of that tie a candidate's vocabulary covers.

For each labelled row only static events and events at or before its prediction time count (the cut the
tokenizer makes). Each code gives two features, its presence and its last value (codes with values); a code's
association is the larger of |AUROC - 0.5| (binary labels; |rank correlation| for numeric ones) over the two.
Codes seen in at least `OUTCOME_MIN_SUBJECTS` subjects are tested. The labels are permuted `OUTCOME_PERMUTATIONS`
times (seeded) and the largest association of any code is kept each time; a code is an outcome code when its
association exceeds the `OUTCOME_LEVEL` quantile of those maxima, so an unrelated code passes with at most 5%
chance. Rows are permuted one by one, so several label rows of one subject make the test somewhat lenient.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import polars as pl

from ..data.labels import _resolve_label_column, read_labels, validate_labels
from .prototypes import BIRTH_CODE

OUTCOME_MIN_SUBJECTS = 10  # a code is tested for association with the outcome when this many subjects have it
OUTCOME_PERMUTATIONS = 200  # label permutations of the max-association null
OUTCOME_LEVEL = 0.95  # quantile of the permutation maxima a code's association must exceed


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, method="average")


def _association(presence, ranks, mask, y: np.ndarray, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """Association of every presence feature (F,) and value feature (V,) with each column of `y` (n, P): returns
    (F, P) and (V, P). `presence` (n, F) 0/1, `ranks` (n, V) within-feature value ranks (0 where no value) and
    `mask` (n, V) 0/1 are sparse."""
    n = y.shape[0]
    count = np.asarray(presence.sum(axis=0)).ravel()[:, None]  # (F, 1) rows with the code
    with_code = np.asarray(presence.T @ y)  # (F, P)
    m = np.asarray(mask.sum(axis=0)).ravel()[:, None]  # (V, 1) rows with a value
    rank_sum = np.asarray(ranks.T @ y)  # (V, P)
    k1 = np.asarray(mask.T @ y)  # (V, P)
    with np.errstate(divide="ignore", invalid="ignore"):
        if not regression:
            n1 = y.sum(axis=0, keepdims=True)  # (1, P): the same for every permutation
            n0 = n - n1
            presence_assoc = np.abs(with_code / n1 - (count - with_code) / n0) / 2.0
            k0 = m - k1
            auc = (rank_sum - k1 * (k1 + 1) / 2.0) / (k1 * k0)
            value_assoc = np.where((k1 > 0) & (k0 > 0), np.abs(auc - 0.5), 0.0)
        else:
            mean_y = y.mean(axis=0, keepdims=True)
            var_y = y.var(axis=0, keepdims=True)
            share = count / n
            cov = with_code / n - share * mean_y
            presence_assoc = np.abs(cov) / np.sqrt(share * (1 - share) * var_y)
            sum_a = m * (m + 1) / 2.0  # average ranks 1..m sum to this
            sum_a2 = np.asarray(ranks.multiply(ranks).sum(axis=0)).ravel()[:, None]
            sum_b, sum_b2 = k1, np.asarray(mask.T @ (y * y))
            cov_v = rank_sum - sum_a * sum_b / m
            var_a, var_b = sum_a2 - sum_a**2 / m, sum_b2 - sum_b**2 / m
            value_assoc = np.abs(cov_v) / np.sqrt(var_a * var_b)
    return np.nan_to_num(presence_assoc, nan=0.0), np.nan_to_num(value_assoc, nan=0.0)


def _outcome_target(labels: pl.Series, regression: bool) -> np.ndarray:
    """The label as float: a numeric label as is; a boolean one as 0/1; an integer or categorical one as 1 for
    every class but the most frequent (one against the rest; with two classes the association is the same
    whichever is called 1)."""
    if regression:
        return labels.cast(pl.Float64).to_numpy()
    if labels.dtype == pl.Boolean:
        return labels.cast(pl.Float64).to_numpy()
    common = labels.mode().sort()[0]
    return (labels != common).cast(pl.Float64).to_numpy()


def find_outcome_codes(
    label_rows: pl.DataFrame,
    label_events: pl.DataFrame,
    regression: bool = False,
    min_subjects: int = OUTCOME_MIN_SUBJECTS,
    n_permutations: int = OUTCOME_PERMUTATIONS,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The codes the outcome depends on (see the module docstring, (b)): from `label_rows` (subject_id,
    prediction_time, labels) and the events `label_events` of their subjects, using only static events and events
    at or before each row's prediction time. Returns the outcome codes, strongest first, each
    {"code", "association", "feature" ("presence" or "last value"), "direction" ("higher"/"lower" with the
    outcome), "subjects"}, and {"threshold", "codes_tested", "label_rows", "rule", "note"}."""
    import scipy.sparse as sparse

    rule = (
        f"{'|rank correlation|' if regression else '|AUROC - 0.5|'} of presence and last value before the "
        f"prediction time, codes of >= {min_subjects} subjects; above the {OUTCOME_LEVEL:.0%} quantile of the "
        f"maximum over all codes under {n_permutations} label permutations (seed {seed})"
    )
    info: dict[str, Any] = {
        "threshold": None,
        "codes_tested": 0,
        "label_rows": label_rows.height,
        "rule": rule,
    }
    rows = label_rows.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")), "labels"
    ).with_row_index("_row")
    y = _outcome_target(rows["labels"], regression)
    if len(y) < 2 * min_subjects or np.ptp(y) == 0:
        info["note"] = "too few labelled rows, or one label value only: no outcome code computed"
        return [], info
    events = label_events.filter(pl.col("code") != BIRTH_CODE).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float64).fill_nan(None),
    )
    # presence: the code's first event (or a static one) is at or before the prediction time; last value: an as-of
    # join on (subject, code). Neither joins every label row with every event of its subject.
    first = events.group_by("subject_id", "code").agg(
        pl.col("time").min().alias("_first"), pl.col("time").is_null().any().alias("_static")
    )
    valued = (
        events.filter(pl.col("time").is_not_null() & pl.col("numeric_value").is_not_null())
        .select("subject_id", "code", "time", pl.col("numeric_value").alias("last"))
        .sort("time")
    )
    seen = (
        rows.select("_row", "subject_id", "prediction_time")
        .join(first, on="subject_id", how="inner")
        .filter(pl.col("_static") | (pl.col("_first") <= pl.col("prediction_time")))
        .select("_row", "subject_id", "prediction_time", "code")
        .sort("prediction_time")
        .join_asof(
            valued,
            left_on="prediction_time",
            right_on="time",
            by=["subject_id", "code"],
            strategy="backward",
            check_sortedness=False,
        )
        .select("_row", "subject_id", "code", "last")
    )
    subjects = seen.group_by("code").agg(
        pl.col("subject_id").n_unique().alias("n"),
        pl.col("subject_id").filter(pl.col("last").is_not_null()).n_unique().alias("n_value"),
    )
    tested = subjects.filter(pl.col("n") >= min_subjects).sort("code")
    if tested.height == 0:
        info["note"] = f"no code is seen in {min_subjects} labelled subjects before the prediction time"
        return [], info
    codes = tested["code"].to_list()
    index = {code: i for i, code in enumerate(codes)}
    seen = seen.filter(pl.col("code").is_in(pl.Series(codes).implode())).with_columns(
        pl.col("code").replace_strict(index, return_dtype=pl.Int64).alias("_f")
    )
    n = len(y)
    presence = sparse.csr_matrix(
        (np.ones(seen.height), (seen["_row"].to_numpy(), seen["_f"].to_numpy())), shape=(n, len(codes))
    )
    value_codes = tested.filter(pl.col("n_value") >= min_subjects)["code"].to_list()
    value_index = {code: i for i, code in enumerate(value_codes)}
    values = (
        seen.filter(pl.col("code").is_in(pl.Series(value_codes, dtype=pl.String).implode()))
        .filter(pl.col("last").is_not_null())
        .with_columns(
            pl.col("last").rank("average").over("code").alias("_rank"),
            pl.col("code").replace_strict(value_index, default=0, return_dtype=pl.Int64).alias("_v"),
        )
    )
    shape = (n, len(value_codes))
    coordinates = (values["_row"].to_numpy(), values["_v"].to_numpy())
    ranks = sparse.csr_matrix((values["_rank"].to_numpy(), coordinates), shape=shape)
    mask = sparse.csr_matrix((np.ones(values.height), coordinates), shape=shape)
    target = _ranks(y) if regression else y
    rng = np.random.default_rng(seed)
    permuted = np.column_stack([target] + [rng.permutation(target) for _ in range(n_permutations)])
    presence_assoc, value_assoc = _association(presence, ranks, mask, permuted, regression)
    per_code = presence_assoc.copy()  # (F, 1 + P)
    value_rows = np.array([index[code] for code in value_codes], dtype=np.int64)
    if len(value_rows):
        per_code[value_rows] = np.maximum(per_code[value_rows], value_assoc)
    threshold = float(np.quantile(per_code[:, 1:].max(axis=0), OUTCOME_LEVEL))
    info.update(threshold=threshold, codes_tested=len(codes))
    observed = per_code[:, 0]
    value_observed = np.zeros(len(codes))
    if len(value_rows):
        value_observed[value_rows] = value_assoc[:, 0]
    # direction: is the feature higher (presence: more frequent) among rows with the outcome / higher label?
    centred = target - target.mean()
    presence_direction = np.asarray(presence.T @ centred).ravel()
    value_direction = np.zeros(len(codes))
    if len(value_rows):
        mean_rank = np.asarray(ranks.sum(axis=0)).ravel() / np.asarray(mask.sum(axis=0)).ravel()
        value_direction[value_rows] = (
            np.asarray(ranks.T @ centred).ravel() - mean_rank * np.asarray(mask.T @ centred).ravel()
        )
    counts = dict(zip(tested["code"].to_list(), tested["n"].to_list(), strict=True))
    found = []
    for i in np.flatnonzero(observed > threshold):
        by_value = value_observed[i] > presence_assoc[i, 0]
        direction = value_direction[i] if by_value else presence_direction[i]
        found.append(
            {
                "code": codes[i],
                "association": float(observed[i]),
                "feature": "last value" if by_value else "presence",
                "direction": "higher" if direction >= 0 else "lower",
                "subjects": int(counts[codes[i]]),
            }
        )
    found.sort(key=lambda item: (-item["association"], item["code"]))
    if not found:
        info["note"] = "no code is tied to the outcome beyond chance: outcome code coverage left out"
    return found, info


def outcome_codes(
    events: pl.DataFrame,
    labels: str | os.PathLike | pl.DataFrame,
    min_subjects: int = OUTCOME_MIN_SUBJECTS,
    n_permutations: int = OUTCOME_PERMUTATIONS,
    seed: int = 0,
) -> list[tuple[str, float]]:
    """(code, association) of the codes the outcome of `labels` (a MEDS label file or frame) depends on, strongest
    first, from the `events` of its subjects: :func:`find_outcome_codes` on every labelled row (a `float_value`
    label is treated as numeric)."""
    frame = read_labels(labels) if not isinstance(labels, pl.DataFrame) else validate_labels(labels)
    column = _resolve_label_column(frame, None)
    rows = frame.filter(pl.col(column).is_not_null()).select(
        "subject_id", "prediction_time", pl.col(column).alias("labels")
    )
    found, _ = find_outcome_codes(
        rows,
        events,
        column == "float_value",
        min_subjects=min_subjects,
        n_permutations=n_permutations,
        seed=seed,
    )
    return [(item["code"], item["association"]) for item in found]


def outcome_coverage(outcome: list[dict[str, Any]], vocabulary: set[str]) -> tuple[float, list[str]]:
    """Association-weighted share of the outcome codes in `vocabulary`, and the missing ones strongest first."""
    total = sum(item["association"] for item in outcome)
    known = sum(item["association"] for item in outcome if item["code"] in vocabulary)
    return known / total, [item["code"] for item in outcome if item["code"] not in vocabulary]


__all__ = [
    "OUTCOME_LEVEL",
    "OUTCOME_MIN_SUBJECTS",
    "OUTCOME_PERMUTATIONS",
    "find_outcome_codes",
    "outcome_codes",
    "outcome_coverage",
]
