"""Read, validate and write MEDS datasets (Medical Event Data Standard) with polars.

Expected schema: MEDS 0.3 / 0.4 (``meds >= 0.3``)::

    data/**/*.parquet            subject_id int64, time timestamp[us] (null = static event),
                                 code string, numeric_value float32 (nullable),
                                 text_value string (nullable, optional in files)
    metadata/codes.parquet       code string, description string, parent_codes list<string>
    metadata/subject_splits.parquet   subject_id int64, split string (train / tuning / held_out)
    metadata/dataset.json        dataset_name, dataset_version, etl_name, etl_version, meds_version, created_at
    labels/<task>.parquet        subject_id int64, prediction_time timestamp[us],
                                 exactly one of boolean_value bool / integer_value int64 / float_value float64

Columns are read by name. Validation policies (every error is a :class:`MEDSValidationError` whose
message names the file, the column and, where one subject is at fault, the ``subject_id``):

- a required column is missing -> error. The pre-0.3 name ``patient_id`` -> error saying that
  MEDS >= 0.3 calls it ``subject_id``.
- extra columns -> dropped (not read at all from parquet files).
- ``text_value`` absent -> added, all null.
- castable dtypes are cast silently: any integer dtype -> Int64 for ``subject_id``; any datetime unit
  -> Datetime("us") for ``time`` (time-zone aware times are converted to UTC and made naive; a Date
  becomes midnight); String / Categorical / Enum -> String for ``code`` and ``text_value``; any numeric
  dtype -> Float32 for ``numeric_value``; an all-null column of dtype Null -> the target dtype.
  Anything else (e.g. a string ``subject_id`` such as "abc" or "17", a string ``time``) -> error naming
  the column, its dtype and the expected dtype. We never parse strings: convert them yourself so the
  format is explicit.
- null ``subject_id`` -> error (with the row number of the first one).
- null or empty (whitespace only) ``code`` -> error naming the subject.
- +-inf ``numeric_value`` (including float64 values outside the float32 range) -> error naming the subject.
- NaN ``numeric_value`` -> treated as "no value" and set to null (many exports write NaN for missing).
- rows are sorted by ``subject_id`` then ``time`` with static (null time) events first. MEDS requires
  this order; we do not reject unsorted input but sort it *stably*, so events sharing a timestamp
  keep their file order.
- duplicate identical rows are kept (MEDS allows them).
- subjects listed in ``subject_splits`` but without any event are not an error: they are counted
  and listed by :func:`check_split_coverage` (and in :func:`summarize`).

Memory: :func:`iter_shards` validates one shard at a time; :func:`read_events` filters each shard by
subject id (lazily, with ``pl.scan_parquet``) before concatenating; :class:`MEDSWriter` writes shard
by shard. Only :func:`read_events` without ``subject_ids`` loads a whole dataset.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import secrets
import shutil
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

MEDS_VERSION = "0.3.3"
EXPECTED_SCHEMA_TEXT = (
    "MEDS 0.3 / 0.4 schema: subject_id int64, time timestamp[us], code string, "
    "numeric_value float32, text_value string"
)
LABEL_SCHEMA_TEXT = (
    "MEDS 0.3 / 0.4 label schema: subject_id int64, prediction_time timestamp[us], and exactly one of "
    "boolean_value bool / integer_value int64 / float_value float64 per row"
)
ETL_NAME = "ehr_transformer"
ETL_VERSION = "0.1.0"
SPLITS = ("train", "tuning", "held_out")

DATA_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
    "text_value": pl.String(),
}
REQUIRED_DATA_COLUMNS = ("subject_id", "time", "code")
OPTIONAL_DATA_COLUMNS = ("numeric_value", "text_value")

LABEL_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean(),
    "integer_value": pl.Int64(),
    "float_value": pl.Float64(),
}
LABEL_VALUE_COLUMNS = ("boolean_value", "integer_value", "float_value")

SPLIT_SCHEMA: dict[str, pl.DataType] = {"subject_id": pl.Int64(), "split": pl.String()}
CODES_SCHEMA: dict[str, pl.DataType] = {
    "code": pl.String(),
    "description": pl.String(),
    "parent_codes": pl.List(pl.String()),
}


class MEDSValidationError(ValueError):
    """A MEDS file or frame does not follow the schema; the message names file, column and subject."""


# --------------------------------------------------------------------------------------------------
# dtype policies


def _castable(column: str, dtype: pl.DataType) -> bool:
    """Whether ``dtype`` may be cast silently to the MEDS dtype of ``column``."""
    if dtype == pl.Null:
        return True
    if column in ("subject_id", "integer_value"):
        return dtype.is_integer()
    if column in ("time", "prediction_time"):
        return isinstance(dtype, pl.Datetime) or dtype == pl.Date
    if column in ("code", "text_value"):
        return dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)
    if column in ("numeric_value", "float_value"):
        return dtype.is_numeric()
    if column == "boolean_value":
        return dtype == pl.Boolean
    if column == "split":
        return dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)
    return False


def _cast_expr(column: str, dtype: pl.DataType, target: pl.DataType) -> pl.Expr:
    expr = pl.col(column)
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    if dtype == target:
        return expr
    return expr.cast(target)


def _schema_exprs(
    schema: Mapping[str, pl.DataType],
    target_schema: Mapping[str, pl.DataType],
    required: Collection[str],
    source: str,
    expected_text: str,
) -> list[pl.Expr]:
    """Expressions that select the target columns in order, cast, and fill absent optional ones."""
    if "subject_id" not in schema and "patient_id" in schema:
        raise MEDSValidationError(
            f"{source}: column 'subject_id' is missing but 'patient_id' is present: this looks like a "
            f"MEDS < 0.3 file. MEDS >= 0.3 names the column 'subject_id' (expected {expected_text}); "
            "rename 'patient_id' to 'subject_id'."
        )
    exprs = []
    for column, target in target_schema.items():
        if column not in schema:
            if column in required:
                raise MEDSValidationError(
                    f"{source}: required column '{column}' is missing (found columns {list(schema)}; "
                    f"expected {expected_text})"
                )
            exprs.append(pl.lit(None, dtype=target).alias(column))
            continue
        dtype = schema[column]
        if not _castable(column, dtype):
            raise MEDSValidationError(
                f"{source}: column '{column}' has dtype {dtype} which cannot be used as {target} "
                f"(expected {expected_text}); strings are never parsed, convert the column first"
            )
        exprs.append(_cast_expr(column, dtype, target).alias(column))
    return exprs


def _collect(lf: pl.LazyFrame, source: str) -> pl.DataFrame:
    try:
        return lf.collect()
    except pl.exceptions.PolarsError as err:  # e.g. a UInt64 subject_id beyond the Int64 range
        raise MEDSValidationError(
            f"{source}: could not cast the columns to the MEDS schema ({EXPECTED_SCHEMA_TEXT}): {err}"
        ) from err


def _first_subject(df: pl.DataFrame, mask: pl.Expr) -> tuple[int, object]:
    bad = df.with_row_index("_row").filter(mask)
    return bad.height, (bad.row(0, named=True) if bad.height else None)


# --------------------------------------------------------------------------------------------------
# events


def _events_lazy(lf: pl.LazyFrame, source: str) -> pl.LazyFrame:
    schema = lf.collect_schema()
    exprs = _schema_exprs(schema, DATA_SCHEMA, REQUIRED_DATA_COLUMNS, source, EXPECTED_SCHEMA_TEXT)
    return lf.select(exprs)


def _check_events(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Value checks and normalisation of a frame already in the MEDS dtypes."""
    n_null, row = _first_subject(df, pl.col("subject_id").is_null())
    if n_null:
        raise MEDSValidationError(
            f"{source}: column 'subject_id' has {n_null} null value(s) (first at row {row['_row']}); "
            "every event needs a subject"
        )
    n_bad, row = _first_subject(
        df, pl.col("code").is_null() | (pl.col("code").str.strip_chars().str.len_bytes() == 0)
    )
    if n_bad:
        raise MEDSValidationError(
            f"{source}: column 'code' has {n_bad} null or empty value(s) "
            f"(first for subject_id {row['subject_id']} at row {row['_row']})"
        )
    n_inf, row = _first_subject(df, pl.col("numeric_value").is_infinite())
    if n_inf:
        raise MEDSValidationError(
            f"{source}: column 'numeric_value' has an infinite value for subject_id {row['subject_id']} "
            f"(code {row['code']!r}, row {row['_row']}; {n_inf} infinite value(s) in all; values must be "
            "finite float32, use null for 'no value')"
        )
    df = df.with_columns(pl.col("numeric_value").fill_nan(None))
    return df.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)


def validate_events(df: pl.DataFrame, source: str = "<frame>") -> pl.DataFrame:
    """Return ``df`` in the MEDS event schema (columns, dtypes, order) or raise :class:`MEDSValidationError`.

    ``source`` names the frame in error messages (a file path for shards). See the module docstring
    for the policies (casts, NaN -> null, stable sort by subject and time, ...).
    """
    if not isinstance(df, pl.DataFrame):
        raise TypeError(f"validate_events expects a polars DataFrame, got {type(df).__name__}")
    return _check_events(_collect(_events_lazy(df.lazy(), source), source), source)


def _shard_paths(meds_dir: Path) -> list[Path]:
    data_dir = Path(meds_dir) / "data"
    paths = sorted(p for p in data_dir.glob("**/*.parquet") if p.is_file())
    if not paths:
        raise FileNotFoundError(
            f"{data_dir}: no MEDS shards found (expected data/**/*.parquet under {meds_dir})"
        )
    return paths


def _scan_shard(path: Path) -> pl.LazyFrame:
    try:
        return _events_lazy(pl.scan_parquet(path), str(path))
    except (pl.exceptions.PolarsError, OSError) as err:  # truncated, empty or non-parquet file
        raise MEDSValidationError(
            f"{path}: not a readable parquet file, so its columns cannot be read (expected {EXPECTED_SCHEMA_TEXT}): {err}"
        ) from err


def iter_shards(
    meds_dir: str | Path, subject_ids: Collection[int] | pl.Series | None = None
) -> Iterator[tuple[Path, pl.DataFrame]]:
    """Yield ``(path, validated events)`` for each shard of ``meds_dir/data/**/*.parquet``, in sorted order.

    Only one shard is in memory at a time; extra columns are never read. With ``subject_ids``, a shard whose
    ``subject_id`` column holds none of them (and no null) is skipped after reading that one column, and the
    others yield only those subjects' events: building one split reads the other splits' shards only that far.
    """
    wanted = None if subject_ids is None else pl.Series("subject_id", list(subject_ids), dtype=pl.Int64)
    for path in _shard_paths(Path(meds_dir)):
        source = str(path)
        if wanted is not None and not _may_hold(path, wanted):
            continue
        events = _check_events(_collect(_scan_shard(path), source), source)
        if wanted is not None:
            events = events.filter(pl.col("subject_id").is_in(wanted.implode()))
        yield path, events


def _may_hold(path: Path, wanted: pl.Series) -> bool:
    """Whether a shard may hold one of ``wanted`` subjects (or is malformed, so that validation reports it)."""
    try:
        ids = pl.scan_parquet(path).select(pl.col("subject_id").cast(pl.Int64)).collect()["subject_id"]
    except pl.exceptions.PolarsError:
        return True
    return ids.null_count() > 0 or bool(ids.is_in(wanted.implode()).any())


def read_events(meds_dir: str | Path, subject_ids: Collection[int] | None = None) -> pl.DataFrame:
    """Validated events of ``meds_dir``, restricted to ``subject_ids`` when given.

    Each shard is filtered lazily before it is loaded, so memory is bounded by the selected subjects.
    A subject spread over several shards (not MEDS-conformant, but tolerated) is merged and sorted.
    """
    ids = None if subject_ids is None else pl.Series("ids", list(subject_ids), dtype=pl.Int64)
    frames = []
    for path in _shard_paths(Path(meds_dir)):
        source = str(path)
        lf = _scan_shard(path)
        if ids is not None:
            lf = lf.filter(pl.col("subject_id").is_in(ids.implode()) | pl.col("subject_id").is_null())
        frames.append(_check_events(_collect(lf, source), source))
    out = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=DATA_SCHEMA)
    if len(frames) > 1:
        out = out.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
    return out


# --------------------------------------------------------------------------------------------------
# labels and splits


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


def validate_subject_splits(df: pl.DataFrame, source: str = "<frame>") -> pl.DataFrame:
    """Return ``(subject_id Int64, split String)`` sorted by subject; one split per subject, split names
    in ``train`` / ``tuning`` / ``held_out``."""
    exprs = _schema_exprs(
        df.collect_schema(), SPLIT_SCHEMA, ("subject_id", "split"), source,
        "MEDS subject_splits: subject_id int64, split string",
    )
    out = _collect(df.lazy().select(exprs), source)
    n_null, row = _first_subject(out, pl.col("subject_id").is_null())
    if n_null:
        raise MEDSValidationError(f"{source}: column 'subject_id' has {n_null} null value(s)")
    n_bad, row = _first_subject(out, ~pl.col("split").is_in(list(SPLITS)) | pl.col("split").is_null())
    if n_bad:
        raise MEDSValidationError(
            f"{source}: column 'split' has value {row['split']!r} for subject_id {row['subject_id']}; "
            f"expected one of {list(SPLITS)}"
        )
    dup = out.filter(pl.col("subject_id").is_duplicated())
    if dup.height:
        raise MEDSValidationError(
            f"{source}: column 'subject_id' lists subject_id {dup['subject_id'][0]} more than once "
            "(a subject belongs to exactly one split)"
        )
    return out.sort("subject_id")


def read_subject_splits(meds_dir: str | Path) -> pl.DataFrame:
    """``metadata/subject_splits.parquet`` of ``meds_dir`` as ``(subject_id, split)``, validated."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: subject splits not found (MEDS metadata/subject_splits.parquet)")
    return validate_subject_splits(pl.read_parquet(path), source=str(path))


def validate_codes(df: pl.DataFrame, source: str = "<frame>") -> pl.DataFrame:
    """Return codes metadata as ``(code, description, parent_codes)``; only ``code`` is required."""
    schema = df.collect_schema()
    if "code" not in schema:
        raise MEDSValidationError(f"{source}: required column 'code' is missing (found {list(schema)})")
    exprs = [pl.col("code").cast(pl.String)]
    exprs.append(
        pl.col("description").cast(pl.String) if "description" in schema
        else pl.lit(None, dtype=pl.String).alias("description")
    )
    exprs.append(
        pl.col("parent_codes").cast(pl.List(pl.String)) if "parent_codes" in schema
        else pl.lit([], dtype=pl.List(pl.String)).alias("parent_codes")
    )
    out = _collect(df.lazy().select(exprs), source)
    if out["code"].null_count():
        raise MEDSValidationError(f"{source}: column 'code' has null values")
    return out.unique("code", keep="first", maintain_order=True).sort("code")


@dataclass
class SplitCoverage:
    """Subjects of ``subject_splits`` without events, and subjects with events but no split."""

    n_split_subjects: int
    n_event_subjects: int
    without_events: list[int] = field(default_factory=list)
    without_split: list[int] = field(default_factory=list)

    @property
    def n_without_events(self) -> int:
        return len(self.without_events)

    @property
    def n_without_split(self) -> int:
        return len(self.without_split)


def check_split_coverage(meds_dir: str | Path) -> SplitCoverage:
    """Count subjects listed in ``subject_splits`` that have no event (not an error in MEDS) and subjects
    with events missing from ``subject_splits``. Reads only the ``subject_id`` column, shard by shard."""
    splits = read_subject_splits(meds_dir)
    ids = [
        _collect(_scan_shard(p).select("subject_id").unique(), str(p)) for p in _shard_paths(Path(meds_dir))
    ]
    event_ids = pl.concat(ids)["subject_id"].drop_nulls().unique()
    split_ids = splits["subject_id"]
    return SplitCoverage(
        n_split_subjects=split_ids.len(),
        n_event_subjects=event_ids.len(),
        without_events=sorted(split_ids.filter(~split_ids.is_in(event_ids.implode())).to_list()),
        without_split=sorted(event_ids.filter(~event_ids.is_in(split_ids.implode())).to_list()),
    )


def summarize(meds_dir: str | Path) -> dict:
    """Counts of subjects, events and distinct codes, overall and per split, computed shard by shard."""
    splits = read_subject_splits(meds_dir)
    per_subject = []
    codes_by_split: dict[str, set[str]] = {}
    for _path, df in iter_shards(meds_dir):
        counts = df.group_by("subject_id").len("n_events").join(splits, on="subject_id", how="left")
        counts = counts.with_columns(pl.col("split").fill_null("<no split>"))
        per_subject.append(counts)
        codes = df.select("subject_id", "code").join(splits, on="subject_id", how="left")
        codes = codes.with_columns(pl.col("split").fill_null("<no split>"))
        for (split,), group in codes.group_by("split"):
            codes_by_split.setdefault(split, set()).update(group["code"].unique().to_list())
    counts = pl.concat(per_subject).group_by("subject_id", "split").agg(pl.col("n_events").sum())
    out: dict = {
        "n_subjects": counts["subject_id"].n_unique(),
        "n_events": int(counts["n_events"].sum()),
        "n_codes": len(set().union(*codes_by_split.values())) if codes_by_split else 0,
        "n_subjects_without_events": int((~splits["subject_id"].is_in(counts["subject_id"].implode())).sum()),
        "splits": {},
    }
    for split in sorted(codes_by_split):
        sub = counts.filter(pl.col("split") == split)
        out["splits"][split] = {
            "n_subjects": sub.height,
            "n_events": int(sub["n_events"].sum()),
            "n_codes": len(codes_by_split[split]),
        }
    return out


# --------------------------------------------------------------------------------------------------
# writing


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    """Write one parquet file (a single function so tests can make it fail)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)


def _check_task_name(task: str) -> None:
    if not task or "/" in task or "\\" in task or task.startswith("."):
        raise ValueError(f"invalid label task name {task!r}: it becomes labels/<task>.parquet")


class MEDSWriter:
    """Write a MEDS folder shard by shard, atomically.

    Everything goes into ``<output_dir>.tmp-<random>``; :meth:`commit` writes the metadata and renames
    the folder into place (replacing an existing ``output_dir`` only when ``overwrite=True``, and only
    after the new folder is complete). Leaving the ``with`` block without :meth:`commit` (or with an
    exception) removes the temporary folder and leaves ``output_dir`` untouched.

        with MEDSWriter("out/meds") as writer:
            writer.write_shard(events_chunk, split="train")
            writer.write_labels("mortality", labels)
            writer.commit(splits)
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        overwrite: bool = False,
        dataset_name: str = "ehr_transformer_dataset",
        dataset_version: str = "0.1.0",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.dataset_name = dataset_name
        self.dataset_version = dataset_version
        if self.output_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.output_dir} already exists; pass overwrite=True to replace it")
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.output_dir.with_name(f"{self.output_dir.name}.tmp-{secrets.token_hex(4)}")
        self.tmp_dir.mkdir()
        self._shard_counts: dict[str, int] = {}
        self._subject_split: list[pl.DataFrame] = []
        self._codes: set[str] = set()
        self._labels: set[str] = set()
        self._done = False

    def __enter__(self) -> MEDSWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()
            if exc_type is None:
                raise RuntimeError(f"MEDSWriter for {self.output_dir} closed without commit(); nothing written")

    def abort(self) -> None:
        """Remove the temporary folder; ``output_dir`` is left as it was."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True

    def write_shard(self, events: pl.DataFrame, split: str, *, validated: bool = False) -> Path | None:
        """Validate ``events`` and write them as the next shard ``data/<split>/<k>.parquet``.

        Every subject must be complete in this shard (a subject never spans shards). Empty frames write
        nothing. ``validated=True`` skips validation for frames that come out of :func:`validate_events`.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not validated:
            events = validate_events(events, source=f"<events for {split} shard>")
        if events.height == 0:
            return None
        k = self._shard_counts.get(split, 0)
        path = self.tmp_dir / "data" / split / f"{k}.parquet"
        _write_parquet(events, path)
        self._shard_counts[split] = k + 1
        self._subject_split.append(
            events.select(pl.col("subject_id").unique(), pl.lit(split).alias("split"), pl.lit(str(path)).alias("shard"))
        )
        self._codes.update(events["code"].unique().to_list())
        return path

    def write_labels(self, task: str, labels: pl.DataFrame) -> Path:
        """Validate and write ``labels/<task>.parquet``."""
        _check_task_name(task)
        labels = validate_labels(labels, source=f"<labels {task!r}>")
        path = self.tmp_dir / "labels" / f"{task}.parquet"
        _write_parquet(labels, path)
        self._labels.add(task)
        return path

    def commit(self, splits: pl.DataFrame, codes: pl.DataFrame | None = None) -> Path:
        """Check shard subjects against ``splits``, write the metadata and move the folder into place."""
        if self._done:
            raise RuntimeError("MEDSWriter already committed or aborted")
        try:
            splits = validate_subject_splits(splits, source="<splits>")
            written = (
                pl.concat(self._subject_split)
                if self._subject_split
                else pl.DataFrame(schema={"subject_id": pl.Int64, "split": pl.String, "shard": pl.String})
            )
            spread = written.filter(pl.col("subject_id").is_duplicated())
            if spread.height:
                raise MEDSValidationError(
                    f"{self.output_dir}: column 'subject_id': subject_id {spread['subject_id'][0]} spans "
                    "several shards; a subject's events must be written in one shard"
                )
            check = written.join(splits, on="subject_id", how="left", suffix="_listed")
            missing = check.filter(pl.col("split_listed").is_null())
            if missing.height:
                raise MEDSValidationError(
                    f"{self.output_dir}: column 'split': subject_id {missing['subject_id'][0]} has events but "
                    f"is not in subject_splits ({missing.height} such subject(s))"
                )
            wrong = check.filter(pl.col("split_listed") != pl.col("split"))
            if wrong.height:
                row = wrong.row(0, named=True)
                raise MEDSValidationError(
                    f"{self.output_dir}: column 'split': subject_id {row['subject_id']} is in split "
                    f"{row['split_listed']!r} but its events were written to a {row['split']!r} shard"
                )
            if codes is None:
                codes = pl.DataFrame({"code": sorted(self._codes)}, schema={"code": pl.String})
            codes = validate_codes(codes, source="<codes>")
            extra = sorted(self._codes - set(codes["code"].to_list()))
            if extra:  # every code in the data gets a metadata row
                codes = validate_codes(pl.concat([codes, pl.DataFrame({"code": extra})], how="diagonal_relaxed"))
            meta = self.tmp_dir / "metadata"
            _write_parquet(codes, meta / "codes.parquet")
            _write_parquet(splits, meta / "subject_splits.parquet")
            dataset = {
                "dataset_name": self.dataset_name,
                "dataset_version": self.dataset_version,
                "etl_name": ETL_NAME,
                "etl_version": ETL_VERSION,
                "meds_version": MEDS_VERSION,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            }
            (meta / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
            (self.tmp_dir / "data").mkdir(exist_ok=True)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.output_dir

    def _move_into_place(self) -> None:
        target = self.output_dir
        if not target.exists():
            self.tmp_dir.rename(target)
            return
        if not self.overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        old = target.with_name(f"{target.name}.old-{secrets.token_hex(4)}")
        target.rename(old)
        try:
            self.tmp_dir.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)


def write_meds(
    output_dir: str | Path,
    events: pl.DataFrame,
    splits: pl.DataFrame,
    labels: Mapping[str, pl.DataFrame] | None = None,
    codes: pl.DataFrame | None = None,
    n_shards: int = 1,
    dataset_name: str = "ehr_transformer_dataset",
    dataset_version: str = "0.1.0",
    overwrite: bool = False,
) -> Path:
    """Write ``events`` (+ splits, labels, codes) as a MEDS folder, atomically; return ``output_dir``.

    Events are validated first. Shards are split by subject (a subject never spans shards): each split
    gets ``min(n_shards, n_subjects_in_split)`` files ``data/<split>/<k>.parquet`` with contiguous
    ranges of subject ids. Every subject with events must be listed in ``splits``; subjects listed
    without events are allowed. ``codes`` defaults to the distinct codes (null description, no parents).
    If ``output_dir`` exists, raise :class:`FileExistsError` unless ``overwrite=True``; the old folder
    is replaced only once the new one is complete, and a failure leaves no partial folder behind.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    events = validate_events(events, source="<events>")
    splits = validate_subject_splits(splits, source="<splits>")
    labels = {task: validate_labels(df, source=f"<labels {task!r}>") for task, df in (labels or {}).items()}
    for task in labels:
        _check_task_name(task)
    events = events.join(splits, on="subject_id", how="left", maintain_order="left")
    missing = events.filter(pl.col("split").is_null())
    if missing.height:
        raise MEDSValidationError(
            f"<events>: column 'subject_id': subject_id {missing['subject_id'][0]} has events but is not in "
            f"subject_splits ({missing['subject_id'].n_unique()} such subject(s))"
        )
    with MEDSWriter(output_dir, overwrite=overwrite, dataset_name=dataset_name, dataset_version=dataset_version) as w:
        for split in SPLITS:
            part = events.filter(pl.col("split") == split).drop("split")
            if part.height == 0:
                continue
            ids = part["subject_id"].unique(maintain_order=True).to_numpy()
            k = min(n_shards, len(ids))
            bounds = [ids[b[0]] for b in np.array_split(np.arange(len(ids)), k)]
            shard_index = np.searchsorted(np.asarray(bounds), part["subject_id"].to_numpy(), side="right") - 1
            part = part.with_columns(pl.Series("_shard", shard_index))
            for i in range(k):
                w.write_shard(part.filter(pl.col("_shard") == i).drop("_shard"), split, validated=True)
        for task, df in labels.items():
            w.write_labels(task, df)
        return w.commit(splits, codes)


def shard_count_for(n_subjects: int, subjects_per_shard: int = 10_000) -> int:
    """A reasonable number of shards for ``n_subjects`` (about ``subjects_per_shard`` per shard)."""
    return max(1, math.ceil(n_subjects / subjects_per_shard))


__all__ = [
    "DATA_SCHEMA",
    "LABEL_SCHEMA",
    "MEDS_VERSION",
    "SPLITS",
    "MEDSValidationError",
    "MEDSWriter",
    "SplitCoverage",
    "check_split_coverage",
    "iter_shards",
    "read_events",
    "read_labels",
    "read_subject_splits",
    "shard_count_for",
    "summarize",
    "validate_codes",
    "validate_events",
    "validate_labels",
    "validate_subject_splits",
    "write_meds",
]
