"""Adapter from wide hourly ICU tables (the YAIB / ricu layout) to MEDS.

Input (one cohort, e.g. ``yaib_demo/mortality24/eicu_demo``):

- ``dyn.parquet``: one row per stay and hour; ``stay_id``, ``time`` (a duration since ICU admission,
  the *start* of the hourly bin the row aggregates), then one numeric column per variable (``hr``,
  ``map``, ``crea``, ...; null = not measured in that hour).
- ``sta.parquet``: one row per stay; ``age`` (years), ``sex`` ("Male"/"Female"), ``height``,
  ``weight`` (further numeric columns become numeric static events, further string columns coded
  static events).
- ``outc.parquet``: the outcome, column ``label`` (or ``label_column``): one row per stay (e.g. YAIB
  ``mortality24``, 0/1 death after the first 24 h), or one row per stay and ``time`` (e.g. YAIB ``los``, the
  remaining length of stay in hours, or a per-hour 0/1 label such as sepsis onset).

Output (MEDS event frame and label frame, see ``ehr_transformer.data.meds``):

- each stay is a subject, ``subject_id = stay_id``. ICU admission of every stay is put at the common
  ``anchor`` (default 2000-01-01 00:00): the tables carry relative times only.
- one event per non-null measurement: ``code = f"{code_prefix}{variable}"`` (default prefix
  ``"YAIB//"``, so ``"YAIB//hr"``), ``numeric_value`` = the value, ``time = anchor + time``.
- static events (null ``time``): ``"SEX//Male"`` / ``"SEX//Female"`` (no value), ``"YAIB//height"`` and
  ``"YAIB//weight"`` with their values; null static values give no event.
- ``MEDS_BIRTH`` at ``anchor - age * 365.25 days``: the age at admission is reproduced to about a day
  (YAIB ages are whole years in eICU, years with decimals in MIMIC, capped at 90). No age -> no birth event.
- labels, written as ``labels/<task>.parquet`` under the user's task name: a per-stay outcome is predicted at
  ``anchor + prediction_hours`` (YAIB's ``mortality24``: 24 h; the cohort has 25 hourly rows, hours 0..24, and
  MEDS samples see events *at or before* the prediction time, so all 25 rows are visible); a per-time outcome at
  ``anchor + time`` (the history up to and including that hour's row is visible). The MEDS value column follows
  the values (``outcome_labels``): ``boolean_value`` for 0/1, ``float_value`` for other numbers, or as asked.

Validation errors (:class:`WideTableError`, a ``MEDSValidationError``) name the file, the column and
the stay: missing ``stay_id``/``time``/``label``, null ids or times, non-numeric variable columns,
duplicated ``(stay_id, time)`` rows, duplicated stays in the static or mortality outcome table, labels
for stays without any data.
"""

from __future__ import annotations

import time as _time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from .labels import outcome_labels, validate_labels
from .meds import MEDSValidationError, validate_events
from .writer import write_meds

# prediction time of YAIB's per-stay tasks, in hours after ICU admission
YAIB_PREDICTION_HOURS = {"mortality24": 24}
DEFAULT_ANCHOR = datetime(2000, 1, 1)
DEFAULT_CODE_PREFIX = "YAIB//"
DAYS_PER_YEAR = 365.25
SPLIT_FRACTIONS = (("train", 0.70), ("tuning", 0.15), ("held_out", 0.15))


class WideTableError(MEDSValidationError):
    """A wide ICU table cannot be converted; the message names the file, the column and the stay."""


def _error(source: str, column: str, message: str, stay=None) -> WideTableError:
    where = f"{source}: column {column!r}"
    if stay is not None:
        where += f": stay_id {stay}"
    return WideTableError(f"{where}: {message}")


def _check_stay_id(df: pl.DataFrame, source: str) -> pl.DataFrame:
    if "stay_id" not in df.columns:
        raise _error(source, "stay_id", f"missing (columns are {df.columns})")
    dtype = df.schema["stay_id"]
    if not dtype.is_integer():
        raise _error(source, "stay_id", f"must be an integer column, got {dtype}")
    nulls = df["stay_id"].null_count()
    if nulls:
        row = int(df["stay_id"].is_null().arg_true()[0])
        raise _error(source, "stay_id", f"{nulls} null value(s), first at row {row}")
    return df.with_columns(pl.col("stay_id").cast(pl.Int64))


def _check_time(df: pl.DataFrame, source: str) -> pl.DataFrame:
    if "time" not in df.columns:
        raise _error(source, "time", f"missing (columns are {df.columns})")
    dtype = df.schema["time"]
    if not isinstance(dtype, pl.Duration):
        raise _error(source, "time", f"must be a duration (time since ICU admission), got {dtype}")
    bad = df.filter(pl.col("time").is_null())
    if bad.height:
        raise _error(source, "time", f"{bad.height} null time(s)", stay=bad["stay_id"][0])
    return df.with_columns(pl.col("time").cast(pl.Duration("us")))


def _check_unique(df: pl.DataFrame, keys: list[str], source: str) -> None:
    dup = df.filter(pl.struct(keys).is_duplicated())
    if dup.height:
        first = dup.row(0, named=True)
        detail = "" if len(keys) == 1 else f" at time {first['time']}"
        raise _error(
            source,
            ", ".join(keys),
            f"duplicated row{detail} ({dup.height} duplicated rows in total)",
            stay=first["stay_id"],
        )


def _numeric_columns(df: pl.DataFrame, columns: list[str], source: str) -> None:
    for column in columns:
        dtype = df.schema[column]
        if not (dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null):
            raise _error(source, column, f"variables must be numeric, got {dtype}")
        if dtype.is_float():
            bad = df.filter(pl.col(column).is_infinite())
            if bad.height:
                raise _error(source, column, "infinite value", stay=bad["stay_id"][0])


def wide_to_meds(
    dyn: pl.DataFrame,
    sta: pl.DataFrame,
    outc: pl.DataFrame,
    anchor: datetime = DEFAULT_ANCHOR,
    code_prefix: str = DEFAULT_CODE_PREFIX,
    label_column: str = "label",
    sources: Mapping[str, str] | None = None,
    prediction_hours: float | None = None,
    label_type: str = "auto",
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Convert YAIB/ricu wide tables to a MEDS event frame and a label frame (see the module docstring).

    The outcome table holds `label_column` once per stay (predicted `prediction_hours` after admission) or once
    per stay and `time` (predicted at that time); its MEDS value column follows `label_type`
    (`data.labels.outcome_labels`: "auto" = boolean for 0/1, float otherwise). `sources` names the frames in
    error messages (default {"dyn": "dyn", "sta": "sta", "outc": "outc"}; `convert_wide` passes the file paths).
    Returns `(events, labels)`, both validated and sorted.
    """
    names = {"dyn": "dyn", "sta": "sta", "outc": "outc", **(sources or {})}

    dyn = _check_time(_check_stay_id(dyn, names["dyn"]), names["dyn"])
    _check_unique(dyn, ["stay_id", "time"], names["dyn"])
    variables = [c for c in dyn.columns if c not in ("stay_id", "time")]
    _numeric_columns(dyn, variables, names["dyn"])

    sta = _check_stay_id(sta, names["sta"])
    _check_unique(sta, ["stay_id"], names["sta"])

    outc = _check_stay_id(outc, names["outc"])
    if label_column not in outc.columns:
        raise _error(names["outc"], label_column, f"missing label column (columns are {outc.columns})")
    if label_type != "categorical":  # a text outcome is a categorical label, anything else numeric
        _numeric_columns(outc, [label_column], names["outc"])

    anchor_lit = pl.lit(anchor, dtype=pl.Datetime("us"))
    # dynamic measurements: wide -> long, one event per non-null value
    dynamic = (
        dyn.select("stay_id", "time", *[pl.col(v).cast(pl.Float64) for v in variables])
        .unpivot(index=["stay_id", "time"], on=variables, variable_name="variable", value_name="value")
        .filter(pl.col("value").is_not_null() & pl.col("value").is_not_nan())
        .select(
            pl.col("stay_id").alias("subject_id"),
            (anchor_lit + pl.col("time")).alias("time"),
            (pl.lit(code_prefix) + pl.col("variable")).alias("code"),
            pl.col("value").cast(pl.Float32).alias("numeric_value"),
        )
    )
    static = _static_events(sta, names["sta"], anchor, code_prefix)
    events = pl.concat([static, dynamic], how="diagonal_relaxed").with_columns(
        pl.lit(None, dtype=pl.String).alias("text_value")
    )
    events = validate_events(events, source=f"<converted from {names['dyn']}>")

    labels = _labels(outc, label_column, names["outc"], anchor, prediction_hours, label_type)
    known = pl.concat([dyn.select("stay_id"), sta.select("stay_id")]).unique()
    orphan = labels.join(known, left_on="subject_id", right_on="stay_id", how="anti")
    if orphan.height:
        raise _error(
            names["outc"],
            "stay_id",
            f"has a label but no row in dyn or sta ({orphan.height} label rows)",
            stay=orphan["subject_id"][0],
        )
    return events, labels


def _static_events(sta: pl.DataFrame, source: str, anchor: datetime, code_prefix: str) -> pl.DataFrame:
    parts = []
    null_time = pl.lit(None, dtype=pl.Datetime("us")).alias("time")
    for column in sta.columns:
        if column == "stay_id":
            continue
        dtype = sta.schema[column]
        if column == "age":
            if not dtype.is_numeric():
                raise _error(source, "age", f"must be numeric (years), got {dtype}")
            bad = sta.filter((pl.col("age") < 0) | (pl.col("age") > 130))
            if bad.height:
                raise _error(source, "age", f"implausible age {bad['age'][0]}", stay=bad["stay_id"][0])
            birth_offset = (
                (pl.col("age").cast(pl.Float64) * DAYS_PER_YEAR * 86_400 * 1e6).round().cast(pl.Int64)
            )
            parts.append(
                sta.filter(pl.col("age").is_not_null()).select(
                    pl.col("stay_id").alias("subject_id"),
                    (pl.lit(anchor, dtype=pl.Datetime("us")) - pl.duration(microseconds=birth_offset)).alias(
                        "time"
                    ),
                    pl.lit("MEDS_BIRTH").alias("code"),
                    pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
                )
            )
        elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            prefix = "SEX//" if column == "sex" else f"{code_prefix}{column}//"
            parts.append(
                sta.filter(
                    pl.col(column).is_not_null() & (pl.col(column).cast(pl.String).str.strip_chars() != "")
                ).select(
                    pl.col("stay_id").alias("subject_id"),
                    null_time,
                    (pl.lit(prefix) + pl.col(column).cast(pl.String).str.strip_chars()).alias("code"),
                    pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
                )
            )
        elif dtype.is_numeric() or dtype == pl.Boolean:
            parts.append(
                sta.filter(
                    pl.col(column).is_not_null() & pl.col(column).cast(pl.Float64).is_not_nan()
                ).select(
                    pl.col("stay_id").alias("subject_id"),
                    null_time,
                    pl.lit(f"{code_prefix}{column}").alias("code"),
                    pl.col(column).cast(pl.Float32).alias("numeric_value"),
                )
            )
        else:
            raise _error(
                source, column, f"unsupported static column dtype {dtype} (numeric or string expected)"
            )
    if not parts:
        return pl.DataFrame(
            schema={
                "subject_id": pl.Int64,
                "time": pl.Datetime("us"),
                "code": pl.String,
                "numeric_value": pl.Float32,
            }
        )
    return pl.concat(parts, how="vertical_relaxed")


def _labels(
    outc: pl.DataFrame,
    label_column: str,
    source: str,
    anchor: datetime,
    prediction_hours: float | None,
    label_type: str,
) -> pl.DataFrame:
    label = pl.col(label_column)
    nulls = outc.filter(label.is_null())
    if nulls.height:
        raise _error(source, label_column, "null label", stay=nulls["stay_id"][0])
    anchor_lit = pl.lit(anchor, dtype=pl.Datetime("us"))
    if "time" in outc.columns:  # one label per stay and time: predicted at that time
        if prediction_hours is not None:
            raise _error(
                source,
                "time",
                "per-time outcome: the prediction times are its time column, not prediction_hours",
            )
        outc = _check_time(outc, source)
        _check_unique(outc, ["stay_id", "time"], source)
        times = anchor_lit + pl.col("time")
    else:  # one label per stay, predicted `prediction_hours` after admission
        if prediction_hours is None:
            raise _error(
                source,
                label_column,
                "one label per stay (no time column), so the prediction time must be given: prediction_hours "
                "(--prediction_hours, hours after ICU admission; YAIB's mortality24 uses 24)",
            )
        _check_unique(outc, ["stay_id"], source)
        times = anchor_lit + pl.duration(microseconds=round(prediction_hours * 3_600_000_000))
    frame = outc.select(pl.col("stay_id").alias("subject_id"), times.alias("prediction_time"), label)
    try:
        labels = outcome_labels(frame, label_column, label_type, source)
    except ValueError as err:
        raise WideTableError(str(err)) from err
    return validate_labels(labels.sort("subject_id", "prediction_time"), source=source)


# ------------------------------------------------------------------------------------------ splitting
def make_subject_splits(
    subject_ids, labels: pl.DataFrame | None = None, seed: int = 0, fractions=SPLIT_FRACTIONS
) -> pl.DataFrame:
    """Assign subjects to train/tuning/held_out (default 70/15/15), seeded.

    With a binary label frame (``boolean_value``, or ``integer_value`` in {0, 1}; one label per subject, the
    max if several) the split is stratified by label; subjects without a label form their own stratum.
    Returns (subject_id Int64, split String), sorted by subject_id.
    """
    ids = np.unique(np.asarray(subject_ids, dtype=np.int64))
    strata = np.zeros(ids.size, dtype=np.int64)
    if labels is not None:
        value = next(
            (
                c
                for c in ("boolean_value", "integer_value")
                if c in labels.columns and labels[c].null_count() == 0
            ),
            None,
        )
        if value is not None and labels.height and labels[value].cast(pl.Int64).is_in([0, 1]).all():
            per_subject = labels.group_by("subject_id").agg(pl.col(value).cast(pl.Int64).max().alias("y"))
            lookup = dict(zip(per_subject["subject_id"].to_list(), per_subject["y"].to_list(), strict=True))
            strata = np.array([lookup.get(int(i), -1) for i in ids], dtype=np.int64)
    names = [name for name, _ in fractions]
    cum = np.cumsum([f for _, f in fractions])
    if not np.isclose(cum[-1], 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    split = np.empty(ids.size, dtype=object)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        bounds = np.round(cum * members.size).astype(int)
        for start, stop, name in zip(np.r_[0, bounds[:-1]], bounds, names, strict=True):
            split[members[start:stop]] = name
    return pl.DataFrame(
        {"subject_id": ids, "split": split.astype(str)}, schema={"subject_id": pl.Int64, "split": pl.String}
    )


def read_wide_tables(dyn_path, sta_path, outc_path) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read the three parquet files (errors name the missing file)."""
    frames = []
    for path in (dyn_path, sta_path, outc_path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        frames.append(pl.read_parquet(path))
    return frames[0], frames[1], frames[2]


def convert_wide(
    dyn_path,
    sta_path,
    outc_path,
    output_dir,
    task: str,
    splits: pl.DataFrame | None = None,
    prediction_hours: float | None = None,
    label_column: str = "label",
    label_type: str = "auto",
    seed: int = 0,
    anchor: datetime = DEFAULT_ANCHOR,
    code_prefix: str = DEFAULT_CODE_PREFIX,
    n_shards: int = 1,
    overwrite: bool = False,
    dataset_name: str | None = None,
) -> dict:
    """Read YAIB/ricu ``dyn``/``sta``/``outc`` parquet files, convert them and write a MEDS folder.

    Writes ``output_dir/data/<split>/*.parquet``, ``metadata/{codes,subject_splits}.parquet``,
    ``metadata/dataset.json`` and ``labels/<task>.parquet`` (atomically, via ``meds.write_meds``); `task` is the
    user's name for the outcome. A per-stay outcome needs `prediction_hours` (YAIB's ``mortality24`` defaults to
    24); a per-time outcome (a ``time`` column) is predicted at each of its times. Splits: the given
    ``(subject_id, split)`` frame, or 70/15/15 by subject, seeded, stratified by a binary label (see
    :func:`make_subject_splits`). Returns a summary dict (output_dir, task, label_column, n_subjects, n_events,
    n_labels, n_positive (binary), subjects per split, seconds).
    """
    if (
        prediction_hours is None
        and task in YAIB_PREDICTION_HOURS
        and "time" not in pl.read_parquet_schema(outc_path)
    ):
        prediction_hours = YAIB_PREDICTION_HOURS[task]
    start = _time.perf_counter()
    dyn, sta, outc = read_wide_tables(dyn_path, sta_path, outc_path)
    events, labels = wide_to_meds(
        dyn,
        sta,
        outc,
        anchor=anchor,
        label_column=label_column,
        prediction_hours=prediction_hours,
        label_type=label_type,
        code_prefix=code_prefix,
        sources={"dyn": str(dyn_path), "sta": str(sta_path), "outc": str(outc_path)},
    )
    subject_ids = events["subject_id"].unique()
    if splits is None:
        splits = make_subject_splits(subject_ids, labels, seed=seed)
    path = write_meds(
        output_dir,
        events,
        splits,
        labels={task: labels},
        n_shards=n_shards,
        dataset_name=dataset_name or f"yaib_{Path(dyn_path).resolve().parent.name}_{task}",
        overwrite=overwrite,
    )
    summary = {
        "output_dir": str(path),
        "task": task,
        "n_subjects": int(subject_ids.len()),
        "n_events": int(events.height),
        "n_labels": int(labels.height),
        "splits": dict(splits.group_by("split").len().sort("split").iter_rows()),
        "seconds": round(_time.perf_counter() - start, 3),
    }
    summary["label_column"] = next(c for c in labels.columns[2:] if labels[c].null_count() < labels.height)
    if summary["label_column"] == "boolean_value":
        summary["n_positive"] = int(labels["boolean_value"].sum())
    return summary


__all__ = [
    "DEFAULT_ANCHOR",
    "DEFAULT_CODE_PREFIX",
    "YAIB_PREDICTION_HOURS",
    "WideTableError",
    "convert_wide",
    "make_subject_splits",
    "read_wide_tables",
    "wide_to_meds",
]
