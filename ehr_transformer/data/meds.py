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
  -> Datetime("us") for ``time`` (a Date becomes midnight); String / Categorical / Enum -> String for ``code`` and ``text_value``; any numeric
  dtype -> Float32 for ``numeric_value``; an all-null column of dtype Null -> the target dtype.
  Anything else (e.g. a string ``subject_id`` such as "abc" or "17", a string ``time``) -> error naming
  the column, its dtype and the expected dtype. We never parse strings: convert them yourself so the
  format is explicit.
- null ``subject_id`` -> error (with the row number of the first one).
- null or empty (whitespace only) ``code`` -> error naming the subject.
- +-inf ``numeric_value`` (including float64 values outside the float32 range) -> error naming the subject.
- NaN ``numeric_value`` -> treated as "no value" and set to null (many exports write NaN for missing).
- time-zone aware ``time`` / ``prediction_time`` -> error naming the file and column, with the polars
  conversion to use (``.dt.convert_time_zone(zone).dt.replace_time_zone(None)``); never converted silently.
- rows are sorted by ``subject_id`` then ``time`` with static (null time) events first. MEDS requires
  this order; like the MEDS tools we do not reject unsorted shards but sort them *stably* (events sharing a
  timestamp keep their file order) and log one warning naming the file and the number of rows out of order.
- duplicate identical rows are kept (MEDS allows them).
- subjects listed in ``subject_splits`` but without any event are not an error: they are counted
  and listed by :func:`check_split_coverage` (and in :func:`summarize`).

Memory: :func:`iter_shards` validates one shard at a time; :func:`read_events` filters each shard by
subject id (lazily, with ``pl.scan_parquet``) before concatenating; :class:`MEDSWriter` writes shard
by shard. Only :func:`read_events` without ``subject_ids`` loads a whole dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import polars as pl

logger = logging.getLogger(__name__)

MEDS_VERSION = "0.3.3"
EXPECTED_SCHEMA_TEXT = (
    "MEDS 0.3 / 0.4 schema: subject_id int64, time timestamp[us], code string, "
    "numeric_value float32, text_value string"
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
    if column in ("code", "text_value", "categorical_value"):
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
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
            raise MEDSValidationError(
                f"{source}: column '{column}' is time-zone aware ({dtype}), but MEDS times are naive local times "
                f"and are never converted silently; convert it yourself, e.g. with polars "
                f"`pl.col('{column}').dt.convert_time_zone('<the zone your events use>').dt.replace_time_zone(None)`"
            )
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


def _rows_out_of_order(df: pl.DataFrame) -> int:
    """Rows that sort before the row above them by (subject_id, time), static (null time) events first."""
    if df.height < 2:
        return 0
    key = df.select(
        pl.col("subject_id"),
        pl.col("time").dt.epoch("us").fill_null(-(2**63)).alias("_t"),
    )
    prev_s, prev_t = pl.col("subject_id").shift(1), pl.col("_t").shift(1)
    bad = (pl.col("subject_id") < prev_s) | ((pl.col("subject_id") == prev_s) & (pl.col("_t") < prev_t))
    return int(key.select(bad.fill_null(False).sum()).item())


def _check_events(df: pl.DataFrame, source: str, warn_unsorted: bool = False) -> pl.DataFrame:
    """Value checks and normalisation of a frame already in the MEDS dtypes. With ``warn_unsorted`` (shards read
    from disk), a frame not sorted by (subject_id, time) is sorted with one warning naming ``source`` and the number
    of rows out of order, as the MEDS tools do."""
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
    if warn_unsorted:
        n_out = _rows_out_of_order(df)
        if n_out == 0:
            return df
        logger.warning(
            "%s: %d of %d rows are not sorted by (subject_id, time) as MEDS requires; sorted them in memory "
            "(stable, static events first)",
            source,
            n_out,
            df.height,
        )
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
    if not Path(meds_dir).is_dir():
        raise FileNotFoundError(f"{meds_dir}: no such folder (expected a MEDS dataset: data/, metadata/)")
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
        events = _check_events(_collect(_scan_shard(path), source), source, warn_unsorted=True)
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
        frames.append(_check_events(_collect(lf, source), source, warn_unsorted=True))
    out = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=DATA_SCHEMA)
    if len(frames) > 1:
        out = out.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
    return out


# --------------------------------------------------------------------------------------------------
# labels and splits


def validate_subject_splits(df: pl.DataFrame, source: str = "<frame>") -> pl.DataFrame:
    """Return ``(subject_id Int64, split String)`` sorted by subject; one split per subject. Any non-empty split
    name is allowed (MEDS allows any); ``train`` / ``tuning`` / ``held_out`` are the usual ones."""
    exprs = _schema_exprs(
        df.collect_schema(),
        SPLIT_SCHEMA,
        ("subject_id", "split"),
        source,
        "MEDS subject_splits: subject_id int64, split string",
    )
    out = _collect(df.lazy().select(exprs), source)
    n_null, row = _first_subject(out, pl.col("subject_id").is_null())
    if n_null:
        raise MEDSValidationError(f"{source}: column 'subject_id' has {n_null} null value(s)")
    n_bad, row = _first_subject(out, pl.col("split").is_null() | (pl.col("split").str.strip_chars() == ""))
    if n_bad:
        raise MEDSValidationError(
            f"{source}: column 'split' is null or empty for subject_id {row['subject_id']}; every subject listed "
            f"needs a split name (MEDS allows any name; {list(SPLITS)} are the usual ones)"
        )
    dup = out.filter(pl.col("subject_id").is_duplicated())
    if dup.height:
        raise MEDSValidationError(
            f"{source}: column 'subject_id' lists subject_id {dup['subject_id'][0]} more than once "
            "(a subject belongs to exactly one split)"
        )
    return out.sort("subject_id")


def validate_codes(df: pl.DataFrame, source: str = "<frame>") -> pl.DataFrame:
    """Return codes metadata as ``(code, description, parent_codes)``; only ``code`` is required."""
    schema = df.collect_schema()
    if "code" not in schema:
        raise MEDSValidationError(f"{source}: required column 'code' is missing (found {list(schema)})")
    exprs = [pl.col("code").cast(pl.String)]
    exprs.append(
        pl.col("description").cast(pl.String)
        if "description" in schema
        else pl.lit(None, dtype=pl.String).alias("description")
    )
    exprs.append(
        pl.col("parent_codes").cast(pl.List(pl.String))
        if "parent_codes" in schema
        else pl.lit([], dtype=pl.List(pl.String)).alias("parent_codes")
    )
    out = _collect(df.lazy().select(exprs), source)
    if out["code"].null_count():
        raise MEDSValidationError(f"{source}: column 'code' has null values")
    return out.unique("code", keep="first", maintain_order=True).sort("code")


# --------------------------------------------------------------------------------------------------
# writing


__all__ = [
    "DATA_SCHEMA",
    "MEDS_VERSION",
    "SPLITS",
    "MEDSValidationError",
    "iter_shards",
    "read_events",
    "validate_codes",
    "validate_events",
    "validate_subject_splits",
]
