"""MEDS label files: reading and validating them, and the mapping from tasks to label files and columns.

A label source is a MEDS label file, a folder of label shards (read recursively, as ACES writes them) or a glob;
:func:`read_labels` reads all three. Labels follow the MEDS 0.4 label schema: `subject_id`, `prediction_time`
and exactly one non-null value per row among `boolean_value`, `integer_value`, `float_value` and
`categorical_value` (the unused columns may be absent or all null). Several tasks are named explicitly,
`NAME=SOURCE` (`--task`), never by commas.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from .meds import MEDSValidationError, _collect, _first_subject, _schema_exprs

LABEL_SCHEMA_TEXT = (
    "MEDS 0.4 label schema: subject_id int64, prediction_time timestamp[us], and exactly one of "
    "boolean_value bool / integer_value int64 / float_value float64 / categorical_value string per row"
)


LABEL_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean(),
    "integer_value": pl.Int64(),
    "float_value": pl.Float64(),
    "categorical_value": pl.String(),
}


LABEL_VALUE_COLUMNS = ("boolean_value", "integer_value", "float_value", "categorical_value")
TRAINABLE_VALUE_COLUMNS = ("boolean_value", "integer_value", "float_value")


def validate_labels(df: pl.DataFrame, source: str = "<frame>", require_value: bool = True) -> pl.DataFrame:
    """Return labels in :data:`LABEL_SCHEMA` (absent value columns filled with null), sorted by subject
    and prediction time, or raise :class:`MEDSValidationError`.

    ``subject_id`` and ``prediction_time`` are required and non-null; a time-zone aware ``prediction_time`` is
    refused. At least one value column must be present and each row has exactly one non-null value (NaN
    ``float_value`` counts as null). With ``require_value=False`` (prediction times for `predict`), value columns
    may be absent and a row may have no value, but never more than one.
    """
    schema = df.collect_schema()
    present = [c for c in LABEL_VALUE_COLUMNS if c in schema]
    if not present and "subject_id" in schema and require_value:
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
    n_bad, row = _first_subject(out, (n_values != 1) if require_value else (n_values > 1))
    if n_bad:
        n = sum(row[c] is not None for c in LABEL_VALUE_COLUMNS)
        what = "no value" if n == 0 else f"{n} values"
        raise MEDSValidationError(
            f"{source}: columns {'/'.join(present)} give {what} for subject_id {row['subject_id']} at "
            f"prediction_time {row['prediction_time']} (row {row['_row']}; {n_bad} such row(s)); "
            f"expected exactly one non-null value per row ({LABEL_SCHEMA_TEXT})"
        )
    return out.sort(["subject_id", "prediction_time"], maintain_order=True)


def label_files(source: str | os.PathLike) -> list[Path]:
    """The parquet files of a label source: a file, a folder (every ``*.parquet`` below it, sorted) or a glob
    (``**`` allowed)."""
    text = os.fspath(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: label folder holds no *.parquet file (searched recursively)")
        return files
    refuse_comma(text)
    if _glob.has_magic(text):
        files = sorted(Path(p) for p in _glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"{text}: no label file matches this glob")
        return files
    raise FileNotFoundError(
        f"{path}: label file not found (expected a parquet file, a folder of them or a glob)"
    )


def read_labels(source: str | os.PathLike, require_value: bool = True) -> pl.DataFrame:
    """Read and validate MEDS labels from a file (``labels/<task>.parquet``), a folder of label shards (as ACES
    writes them, nested folders included) or a glob. Every file is validated on its own, so errors name it; the
    rows of all files are concatenated and sorted by (subject_id, prediction_time). ``require_value=False``
    accepts prediction times without a label (see :func:`validate_labels`)."""
    frames = []
    for path in label_files(source):
        try:
            frame = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as err:
            raise MEDSValidationError(f"{path}: not a readable parquet label file: {err}") from err
        frames.append(validate_labels(frame, source=str(path), require_value=require_value))
    out = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    return out.sort(["subject_id", "prediction_time"], maintain_order=True)


def label_source_name(source) -> str:
    """The name of a label source in messages: the path or glob, or ``<frame>``."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<frame>"


def _resolve_label_column(
    labels: pl.DataFrame, label_column: str | None, allow_none: bool = False
) -> str | None:
    """The value column of a label frame: `label_column`, or the one column with values. With `allow_none`,
    None when no column has a value (prediction times without labels)."""
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
    if not present and allow_none:
        return None
    if len(present) != 1:
        raise ValueError(
            f"cannot auto-detect the label column: columns with values {present} (expected exactly one of "
            f"{list(LABEL_VALUE_COLUMNS)}); pass label_column="
        )
    return present[0]


def _read_label_source(
    labels: pl.DataFrame | str | os.PathLike, source: str, require_value: bool = True
) -> tuple[pl.DataFrame, str]:
    if isinstance(labels, (str, os.PathLike)):
        return read_labels(labels, require_value=require_value), os.fspath(labels)
    if isinstance(labels, pl.DataFrame):
        return validate_labels(labels, source=source, require_value=require_value), source
    raise TypeError(f"labels must be a polars DataFrame or a path, got {type(labels).__name__}")


def join_task_labels(
    labels: Mapping[str, pl.DataFrame | str | os.PathLike],
) -> tuple[pl.DataFrame, list[str], list[str]]:
    """Join the label files of several tasks on (subject_id, prediction_time), for multitask fine-tuning.

    `labels` maps a task name to a label frame or MEDS label file. Returns the joined frame (subject_id,
    prediction_time, one Float64 column per task, null where that task has no label at that time, sorted), the
    task names (in the mapping's order) and their types: "binary" for a `boolean_value` file or 0/1 integers,
    "regression" for `float_value` and other `integer_value` files (`infer_task_type`). A (subject_id, prediction_time) repeated within one file is an error.
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
        kind = infer_task_type(frame, column, source=where)
        if kind == "multiclass":
            if column == "integer_value":
                kind = "regression"  # counts: one output per task, so whole numbers are regressed
            else:
                raise ValueError(
                    f"{where}: task {name!r} is multi-class (categorical_value); multitask fine-tuning takes binary "
                    "and regression tasks: fine-tune it on its own (--labels)"
                )
        names.append(name)
        types.append(kind)
    assert joined is not None
    return joined.sort(["subject_id", "prediction_time"]), names, types


TASK_TYPES = ("binary", "multiclass", "regression")


def infer_task_type(
    labels: pl.DataFrame, column: str, task_type: str | None = None, source: str = "<labels>"
) -> str:
    """What a label column asks the model to learn: "binary", "multiclass" or "regression".

    By the column: `boolean_value` is binary, `float_value` regression, `categorical_value` multi-class, and
    `integer_value` binary when its values are 0/1, else multi-class (one class per value). `task_type` overrides,
    but never against the values: binary needs 0/1 (or boolean) labels, multi-class whole numbers or categories,
    regression numbers; a mismatch raises a `ValueError` naming the source, the column and a value."""
    values = labels[column].drop_nulls()
    if column == "boolean_value":
        natural = "binary"
    elif column == "float_value":
        natural = "regression"
    elif column == "categorical_value":
        natural = "multiclass"
    else:
        natural = "binary" if values.cast(pl.Float64).is_in([0.0, 1.0]).all() else "multiclass"
    if task_type is None:
        return natural
    if task_type not in TASK_TYPES:
        raise ValueError(f"task type {task_type!r} is not one of {list(TASK_TYPES)}")
    bad = None
    if task_type == "binary" and column != "boolean_value":
        bad = (
            values.filter(~values.cast(pl.Float64).is_in([0.0, 1.0]))
            if column != "categorical_value"
            else values
        )
        why = "binary needs 0/1 or boolean labels (use task type regression or multiclass)"
    elif task_type == "multiclass" and column in ("float_value", "boolean_value"):
        if column == "float_value":
            bad = values.filter((values != values.round(0)) | (values < 0))
            why = "multi-class needs whole, non-negative class numbers (integer_value) or categorical_value"
    elif task_type == "regression" and column == "categorical_value":
        bad = values
        why = "regression needs numeric labels"
    if bad is not None and bad.len():
        raise ValueError(f"{source}: column {column!r} holds {bad[0]!r} ({bad.len()} such rows): {why}")
    return task_type


def label_classes(labels: pl.DataFrame, column: str) -> list[str]:
    """The classes of a multi-class label column, sorted (numerically for numbers), as strings: the model's
    `id2label`; class index i stands for `classes[i]`."""
    values = labels[column].drop_nulls().unique().sort()
    if column != "categorical_value":
        values = values.cast(pl.Int64)
    return [str(v) for v in values.to_list()]


def class_index(column: str, classes: Sequence[str]) -> pl.Expr:
    """Polars expression mapping a multi-class label column to class indices (null for an unknown class)."""
    values = (
        pl.col(column).cast(pl.String) if column == "categorical_value" else pl.col(column).cast(pl.Int64)
    )
    keys = list(classes) if column == "categorical_value" else [int(c) for c in classes]
    return values.replace_strict(keys, list(range(len(keys))), default=None, return_dtype=pl.Int64)


LABEL_TYPES = ("auto", "boolean", "integer", "float", "categorical")


def outcome_labels(
    frame: pl.DataFrame, value: str, label_type: str = "auto", source: str = "<outcome>"
) -> pl.DataFrame:
    """A MEDS label frame from an outcome table's `subject_id`, `prediction_time` and `value` column.

    `label_type` picks the MEDS value column: "boolean" (0/1 or true/false), "integer", "float", "categorical"
    (strings), or "auto": boolean when every value is 0/1 (or boolean), float for other numbers, categorical for
    strings. Converters (`convert-wide`, `convert-long`) use it, so that a per-hour 0/1 outcome becomes a binary
    task and a length of stay a regression target. Values that do not fit the type raise a `ValueError` naming
    `source`, the column and the subject."""
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label type {label_type!r} is not one of {list(LABEL_TYPES)}")
    dtype = frame.schema[value]
    is_text = dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    column = pl.col(value)
    if label_type == "auto":
        if is_text:
            label_type = "categorical"
        elif dtype == pl.Boolean or frame[value].drop_nulls().cast(pl.Float64).is_in([0.0, 1.0]).all():
            label_type = "boolean"
        else:
            label_type = "float"
    if label_type == "categorical":
        out = column.cast(pl.String).alias("categorical_value")
    elif is_text:
        raise ValueError(f"{source}: column {value!r} holds text, so it can only be a categorical label")
    elif label_type == "boolean":
        bad = frame.filter(~column.cast(pl.Float64).is_in([0.0, 1.0]) & column.is_not_null())
        if bad.height:
            raise ValueError(
                f"{source}: column {value!r}: subject {bad['subject_id'][0]} has {bad[value][0]}, not 0/1, so "
                "the outcome cannot be a boolean label (use label type float or integer)"
            )
        out = (column.cast(pl.Float64) == 1.0).alias("boolean_value")
    elif label_type == "integer":
        bad = frame.filter(
            (column.cast(pl.Float64) != column.cast(pl.Float64).round(0)) & column.is_not_null()
        )
        if bad.height:
            raise ValueError(
                f"{source}: column {value!r}: subject {bad['subject_id'][0]} has {bad[value][0]}, not a whole "
                "number, so the outcome cannot be an integer label"
            )
        out = column.cast(pl.Int64).alias("integer_value")
    else:
        out = column.cast(pl.Float64).alias("float_value")
    return frame.select("subject_id", "prediction_time", out)


def refuse_comma(labels) -> None:
    """Refuse the old comma-separated `--labels a,b` (a path may contain a comma, so tasks are never split on it)."""
    if isinstance(labels, str) and "," in labels and not Path(labels).exists():
        raise ValueError(
            f"--labels {labels!r} contains a comma: several tasks are no longer given by commas, name each one with "
            "--task NAME=PATH (e.g. --task mortality=a.parquet stay=b.parquet)"
        )


def parse_tasks(tasks: Sequence[str]) -> dict[str, str]:
    """`["NAME=PATH", ...]` (the `--task` arguments) -> {name: path}, in order."""
    out: dict[str, str] = {}
    for item in tasks:
        name, sep, path = str(item).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(
                f"--task {item!r}: expected NAME=PATH (a label file, folder of label shards or glob)"
            )
        if name in out:
            raise ValueError(f"--task names {name!r} twice; each task needs its own name")
        out[name] = path
    return out


def label_sources(labels, tasks: Sequence[str] | None = None) -> dict[str, str | os.PathLike | pl.DataFrame]:
    """Task name -> label source. `labels` is one source (a file, a folder of label shards, a glob or a frame), a
    list of them, or a mapping; `tasks` is a list of "NAME=PATH" (`--task`). A file is named by its stem, a folder
    by its name, a frame `labels_<i>`; a glob must be named with NAME=. A comma in a `labels` string is refused:
    several tasks are given with `tasks`."""
    if tasks:
        if labels:
            raise ValueError(
                "give the label files either with --labels (one task) or with --task (several), not both"
            )
        return dict(parse_tasks(tasks))
    if isinstance(labels, Mapping):
        return dict(labels)
    if labels is None:
        raise ValueError("no labels given: pass --labels PATH (one task) or --task NAME=PATH ... (several)")
    refuse_comma(labels)
    if isinstance(labels, (str, os.PathLike, pl.DataFrame)):
        labels = [labels]
    sources: dict[str, str | os.PathLike | pl.DataFrame] = {}
    for i, source in enumerate(labels):
        if isinstance(source, pl.DataFrame):
            name = f"labels_{i}"
        elif _glob.has_magic(os.fspath(source)) and not Path(source).exists():
            raise ValueError(
                f"{os.fspath(source)}: name the task of a glob with --task NAME={os.fspath(source)}"
            )
        else:
            name = Path(source).name.split(".")[0]
        if name in sources:
            raise ValueError(f"two label sources are named {name!r}; name each task with --task NAME=PATH")
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
    columns = ["subject_id", "prediction_time", *[c for c in TRAINABLE_VALUE_COLUMNS if c in labels.columns]]
    if "categorical_value" in labels.columns and labels["categorical_value"].null_count() < labels.height:
        columns.append(
            "categorical_value"
        )  # only when used, so fingerprints of older label files do not change
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
    "TASK_TYPES",
    "LABEL_TYPES",
    "outcome_labels",
    "infer_task_type",
    "label_classes",
    "class_index",
    "validate_labels",
    "read_labels",
    "label_files",
    "label_source_name",
    "parse_tasks",
    "refuse_comma",
    "join_task_labels",
    "label_sources",
    "task_label_matrix",
    "label_fingerprint",
    "rows_fingerprint",
]
