"""MEDS label files: reading and validating them, and the mapping from tasks to label files and columns.

A label file has `subject_id`, `prediction_time` and exactly one value per row in `boolean_value`,
`integer_value` or `float_value`. Several files make a multitask set, one task per file named by its stem.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl

from .meds import MEDSValidationError, _collect, _first_subject, _schema_exprs

LABEL_SCHEMA_TEXT = (
    "MEDS 0.3 / 0.4 label schema: subject_id int64, prediction_time timestamp[us], and exactly one of "
    "boolean_value bool / integer_value int64 / float_value float64 per row"
)


LABEL_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean(),
    "integer_value": pl.Int64(),
    "float_value": pl.Float64(),
}


LABEL_VALUE_COLUMNS = ("boolean_value", "integer_value", "float_value")


def validate_labels(df: pl.DataFrame, source: str = "<frame>") -> pl.DataFrame:
    """Return labels in :data:`LABEL_SCHEMA` (absent value columns filled with null), sorted by subject
    and prediction time, or raise :class:`MEDSValidationError`.

    ``subject_id`` and ``prediction_time`` are required and non-null; at least one value column must be
    present and each row has exactly one non-null value (NaN ``float_value`` counts as null).
    """
    schema = df.collect_schema()
    present = [c for c in LABEL_VALUE_COLUMNS if c in schema]
    if not present and "subject_id" in schema:
        raise MEDSValidationError(
            f"{source}: no label value column: expected one of columns {list(LABEL_VALUE_COLUMNS)} "
            f"(found {list(schema)}; expected {LABEL_SCHEMA_TEXT})"
        )
    exprs = _schema_exprs(schema, LABEL_SCHEMA, ("subject_id", "prediction_time"), source, LABEL_SCHEMA_TEXT)
    out = _collect(df.lazy().select(exprs), source).with_columns(pl.col("float_value").fill_nan(None))
    n_null, row = _first_subject(out, pl.col("subject_id").is_null())
    if n_null:
        raise MEDSValidationError(
            f"{source}: column 'subject_id' has {n_null} null value(s) (first at row {row['_row']})"
        )
    n_null, row = _first_subject(out, pl.col("prediction_time").is_null())
    if n_null:
        raise MEDSValidationError(
            f"{source}: column 'prediction_time' is null for subject_id {row['subject_id']} "
            f"(row {row['_row']}; {n_null} null(s) in all)"
        )
    n_values = pl.sum_horizontal([pl.col(c).is_not_null().cast(pl.Int8) for c in LABEL_VALUE_COLUMNS])
    n_bad, row = _first_subject(out, n_values != 1)
    if n_bad:
        n = sum(row[c] is not None for c in LABEL_VALUE_COLUMNS)
        what = "no value" if n == 0 else f"{n} values"
        raise MEDSValidationError(
            f"{source}: columns {'/'.join(present)} give {what} for subject_id {row['subject_id']} at "
            f"prediction_time {row['prediction_time']} (row {row['_row']}; {n_bad} such row(s)); "
            f"expected exactly one non-null value per row ({LABEL_SCHEMA_TEXT})"
        )
    return out.sort(["subject_id", "prediction_time"], maintain_order=True)


def read_labels(path: str | Path) -> pl.DataFrame:
    """Read and validate one MEDS label file (``labels/<task>.parquet``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    return validate_labels(pl.read_parquet(path), source=str(path))


def _resolve_label_column(labels: pl.DataFrame, label_column: str | None) -> str:
    if label_column is not None:
        if label_column not in LABEL_VALUE_COLUMNS or label_column not in labels.columns:
            raise ValueError(
                f"label_column {label_column!r} must be one of {list(LABEL_VALUE_COLUMNS)} present in the labels "
                f"(columns: {labels.columns})"
            )
        return label_column
    present = [
        c for c in LABEL_VALUE_COLUMNS if c in labels.columns and labels[c].null_count() < labels.height
    ]
    if len(present) != 1:
        raise ValueError(
            f"cannot auto-detect the label column: columns with values {present} (expected exactly one of "
            f"{list(LABEL_VALUE_COLUMNS)}); pass label_column="
        )
    return present[0]


def _read_label_source(labels: pl.DataFrame | str | os.PathLike, source: str) -> tuple[pl.DataFrame, str]:
    if isinstance(labels, (str, os.PathLike)):
        return read_labels(labels), str(labels)
    if isinstance(labels, pl.DataFrame):
        return validate_labels(labels, source=source), source
    raise TypeError(f"labels must be a polars DataFrame or a path, got {type(labels).__name__}")


def join_task_labels(
    labels: Mapping[str, pl.DataFrame | str | os.PathLike],
) -> tuple[pl.DataFrame, list[str], list[str]]:
    """Join the label files of several tasks on (subject_id, prediction_time), for multitask fine-tuning.

    `labels` maps a task name to a label frame or MEDS label file. Returns the joined frame (subject_id,
    prediction_time, one Float64 column per task, null where that task has no label at that time, sorted), the
    task names (in the mapping's order) and their types: "binary" for a `boolean_value` file, "regression" for
    `float_value` / `integer_value`. A (subject_id, prediction_time) repeated within one file is an error.
    """
    if not labels:
        raise ValueError("join_task_labels needs at least one task")
    joined: pl.DataFrame | None = None
    names, types = [], []
    for name, source in labels.items():
        if name in ("subject_id", "prediction_time", "labels") or not name:
            raise ValueError(f"task name {name!r} is reserved or empty; rename the label file")
        frame, where = _read_label_source(source, f"<labels of task {name!r}>")
        column = _resolve_label_column(frame, None)
        repeated = frame.filter(pl.struct("subject_id", "prediction_time").is_duplicated())
        if repeated.height:
            row = repeated.row(0, named=True)
            raise ValueError(
                f"{where}: subject_id {row['subject_id']} has {repeated.height} rows sharing a prediction_time "
                f"(first at {row['prediction_time']}); multitask labels need one row per (subject_id, prediction_time)"
            )
        task = frame.select("subject_id", "prediction_time", pl.col(column).cast(pl.Float64).alias(name))
        joined = (
            task
            if joined is None
            else joined.join(task, on=["subject_id", "prediction_time"], how="full", coalesce=True)
        )
        names.append(name)
        types.append("binary" if column == "boolean_value" else "regression")
    assert joined is not None
    return joined.sort(["subject_id", "prediction_time"]), names, types


def label_sources(labels) -> dict[str, str | os.PathLike | pl.DataFrame]:
    """Task name -> label source for multitask use: "a.parquet,b.parquet", a list of paths/frames, or a mapping.
    Paths are named by their file stem, frames `labels_<i>`."""
    if isinstance(labels, dict):
        return dict(labels)
    if isinstance(labels, str):
        labels = [part.strip() for part in labels.split(",") if part.strip()]
    elif isinstance(labels, (os.PathLike, pl.DataFrame)):
        labels = [labels]
    sources: dict[str, str | os.PathLike | pl.DataFrame] = {}
    for i, source in enumerate(labels):
        name = f"labels_{i}" if isinstance(source, pl.DataFrame) else Path(source).name.split(".")[0]
        if name in sources:
            raise ValueError(f"two label files are named {name!r}; each task needs its own file name")
        sources[name] = source
    return sources


def task_label_matrix(dataset, sources: dict, task_names: list[str]) -> np.ndarray:
    """`(N, T)` float labels of a dataset built from the label files `sources` (one task per file), in the
    model's task order: NaN where a row has no label for a task, or no file was given for it."""
    given = np.asarray(dataset["labels"], dtype=np.float64).reshape(len(dataset), len(sources))  # (N, files)
    y = np.full((len(dataset), len(task_names)), np.nan)
    for j, name in enumerate(sources):
        if name in task_names:
            y[:, task_names.index(name)] = given[:, j]
    return y


def label_fingerprint(labels: pl.DataFrame) -> str:
    """SHA-256 of a validated label frame's rows in a fixed order and text form: equal for the same labels
    however the file was written (row order, parquet settings, column order)."""
    columns = ["subject_id", "prediction_time", *[c for c in LABEL_VALUE_COLUMNS if c in labels.columns]]
    text = labels.select(columns).sort(["subject_id", "prediction_time"]).write_csv()
    return hashlib.sha256(text.encode()).hexdigest()


def rows_fingerprint(subject_ids, prediction_times) -> str:
    """SHA-256 of a set of (subject_id, prediction_time) rows, in any order: a record of which label rows were used
    that names no subject."""
    rows = pl.DataFrame({"subject_id": list(subject_ids), "prediction_time": list(prediction_times)})
    text = rows.sort(["subject_id", "prediction_time"]).write_csv()
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "LABEL_SCHEMA",
    "LABEL_VALUE_COLUMNS",
    "validate_labels",
    "read_labels",
    "join_task_labels",
    "label_sources",
    "task_label_matrix",
    "label_fingerprint",
    "rows_fingerprint",
]
