"""Adapter from long event tables (one row per measurement) to MEDS: a hospital's own export, PhysioNet 2012.

Input:

- an **event table** (parquet or CSV), one row per measurement: a subject or stay id (integer), a time, a
  parameter name and a numeric value. The time is one of
  - a datetime (naive): kept as it is;
  - a duration, or a number with ``time_unit`` (seconds, minutes, hours, days): an offset from the anchor;
  - a string ``"HH:MM"`` or ``"HH:MM:SS"`` (hours may exceed 24, as in PhysioNet 2012): an offset from the anchor;
  - null: only for descriptor rows (below).
- an **outcome table** (optional), one row per subject (or per subject and time with ``outcome_time_column``):
  the id and one column per outcome.

The anchor: with offsets, every subject's time zero is put at ``anchor`` (default 2000-01-01 00:00; the table
holds relative times only). With datetimes, a subject's anchor is its earliest event time.

Output (MEDS event frame, one label frame per outcome):

- each subject id is a ``subject_id``; each measurement an event ``code = f"{code_prefix}{parameter}"``
  (``PHYSIONET//HR``) with ``numeric_value`` = the value, ``time = anchor + offset``.
- **descriptors** (``static``): a descriptor's row at the subject's anchor (offset 0, or a null time) becomes a
  static event (null ``time``): a numeric one keeps its value (``PHYSIONET//Weight`` 81.0); a ``categorical``
  one becomes a code with the value in it and no value (``PHYSIONET//Gender//1``; integral values are written
  without decimals). At most one such row per subject and descriptor. Rows of a descriptor at later times
  stay timed measurements with the same code (PhysioNet's ``Weight`` is a descriptor at 00:00 and a time series
  after): the value at admission is known for every prediction, later values only from their time on.
- ``age``: the age parameter (years) becomes ``MEDS_BIRTH`` at ``anchor - age * 365.25 days``; it is not an
  event of its own. One age row per subject, at the anchor or with a null time.
- ``drop``: parameters left out (an id repeated as a parameter, PhysioNet's ``RecordID``), counted.
- ``missing_values`` (e.g. ``-1``): markers of "not recorded". A descriptor or age row, or an outcome value,
  equal to one is no value: no event, no label, counted per parameter or outcome. With
  ``missing_scope="all"`` time-series values equal to a marker are dropped too (counted); by default they are
  kept as values and counted in the summary (``time_series_marker_values``), so that a real -1 is never lost.
- **outcome-side fields never become inputs**: events come only from the event table, and a parameter of the
  event table named like a column of the outcome table (``SOFA``, ``Length_of_stay``) is left out, counted
  and logged.
- labels: one MEDS label frame per ``OutcomeSpec(name, column, value_type)``: ``prediction_time`` = the
  anchor + ``prediction_offset`` (48 h for PhysioNet 2012), or the row's ``outcome_time_column`` (per-time
  outcomes, parsed like event times). The value column follows the data, as in every converter
  (``labels.outcome_labels``): 0/1 numbers or booleans -> ``boolean_value``, other numbers -> ``float_value``,
  strings -> ``categorical_value``; ``value_type`` (``boolean``, ``integer``, ``float``, ``categorical``)
  overrides. Null, NaN, empty and missing-marker values give no label row, counted (``n_missing``).

Validation errors (:class:`LongTableError`, a ``MEDSValidationError``) are one sentence naming the file, the
column and the subject: a missing column, a null or non-integer id, a null parameter, a non-numeric value, an
unparseable or null time, two descriptor rows at one anchor, an implausible age, a duplicated outcome row, a
non-binary value for a ``boolean`` outcome, an outcome for a subject without events.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from .labels import LABEL_TYPES, outcome_labels, validate_labels
from .meds import MEDSValidationError, validate_events
from .splits import cross_validation_splits
from .wide import make_subject_splits
from .writer import write_meds

logger = logging.getLogger(__name__)

DEFAULT_ANCHOR = datetime(2000, 1, 1)
DAYS_PER_YEAR = 365.25
TIME_UNITS = {"seconds": 1e6, "minutes": 60e6, "hours": 3_600e6, "days": 86_400e6}
VALUE_TYPES = tuple(t for t in LABEL_TYPES if t != "auto")  # boolean, integer, float, categorical
_CLOCK = r"^\s*(\d+):([0-5]\d)(?::([0-5]\d))?\s*$"


class LongTableError(MEDSValidationError):
    """A long event or outcome table cannot be converted; the message names the file, the column and the subject."""


def _error(source: str, column: str, message: str, subject=None) -> LongTableError:
    where = f"{source}: column {column!r}"
    if subject is not None:
        where += f": subject {subject}"
    return LongTableError(f"{where}: {message}")


@dataclass(frozen=True)
class OutcomeSpec:
    """One outcome column written as ``labels/<name>.parquet``; ``value_type`` None = from the data."""

    name: str  # the task name: the label file's name
    column: str  # the outcome table's column
    value_type: str | None = None  # boolean, integer, float or categorical; None: from the values

    @classmethod
    def parse(cls, text: str) -> OutcomeSpec:
        """``NAME=COLUMN`` or ``NAME=COLUMN:TYPE`` (TYPE boolean, integer, float or categorical)."""
        name, sep, rest = text.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise ValueError(f"--outcome {text!r}: expected NAME=COLUMN or NAME=COLUMN:TYPE")
        column, _, value_type = (
            rest.rpartition(":") if rest.rsplit(":", 1)[-1] in VALUE_TYPES else (rest, "", "")
        )
        return cls(name.strip(), column.strip(), value_type or None)

    def __post_init__(self) -> None:
        if self.value_type is not None and self.value_type not in VALUE_TYPES:
            raise ValueError(
                f"outcome {self.name!r}: value_type {self.value_type!r} is not one of {list(VALUE_TYPES)}"
            )


@dataclass(frozen=True)
class LongTableLayout:
    """How to read a long event table and its outcome table (see the module docstring)."""

    id_column: str = "subject_id"  # subject or stay id (integer)
    time_column: str = "time"  # datetime, duration, number (+ time_unit) or "HH:MM" string
    parameter_column: str = "parameter"  # what was measured
    value_column: str = "value"  # the measured number
    time_unit: str | None = None  # unit of numeric offsets: seconds, minutes, hours or days
    anchor: datetime = DEFAULT_ANCHOR  # where offset 0 goes
    code_prefix: str = ""  # code = prefix + parameter
    static: tuple[str, ...] = ()  # descriptor parameters: static events
    categorical: tuple[str, ...] = ()  # descriptors written as codes (prefix + parameter + "//" + value)
    age: str | None = None  # the age parameter (years): MEDS_BIRTH
    drop: tuple[str, ...] = ()  # parameters left out
    missing_values: tuple[float, ...] = ()  # markers of "not recorded" (descriptors, age, outcomes)
    missing_scope: str = (
        "static"  # "static": markers apply to descriptors and outcomes; "all": also time series
    )
    outcome_id_column: str | None = None  # id column of the outcome table (default: id_column)
    outcome_time_column: str | None = None  # per-time outcomes: the prediction time of each row
    prediction_offset: timedelta | None = None  # prediction time = anchor + this (per-subject outcomes)

    def __post_init__(self) -> None:
        if self.time_unit is not None and self.time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit {self.time_unit!r} is not one of {sorted(TIME_UNITS)}")
        if self.missing_scope not in ("static", "all"):
            raise ValueError(f"missing_scope must be 'static' or 'all', got {self.missing_scope!r}")
        unknown = sorted(set(self.categorical) - set(self.static))
        if unknown:
            raise ValueError(
                f"categorical descriptors {unknown} are not among the static ones {list(self.static)}"
            )
        if self.age is not None and self.age in self.static:
            raise ValueError(
                f"the age parameter {self.age!r} becomes MEDS_BIRTH: do not list it as static too"
            )


# The first use: PhysioNet/CinC Challenge 2012 (set-a.parquet + outcomes-a.parquet, see docs/data.md).
PRESETS: dict[str, dict] = {
    "physionet2012": {
        "layout": LongTableLayout(
            id_column="record_id",
            time_column="time",
            parameter_column="parameter",
            value_column="value",
            code_prefix="PHYSIONET//",
            static=("Gender", "Height", "ICUType", "Weight"),
            categorical=("Gender", "ICUType"),
            age="Age",
            drop=("RecordID",),
            missing_values=(-1.0,),
            outcome_id_column="RecordID",
            prediction_offset=timedelta(hours=48),
        ),
        "outcomes": (OutcomeSpec("in_hospital_death", "In-hospital_death"),),
        "dataset_name": "physionet2012",
    }
}


def parse_offset(text: str) -> timedelta:
    """``"48h"``, ``"2d"``, ``"90m"``, ``"30s"`` or ``"48:00"`` as a timedelta (a bare number is refused: say the unit)."""
    raw = str(text).strip()
    clock = re.match(_CLOCK, raw)
    if clock:
        hours, minutes, seconds = (int(g) if g else 0 for g in clock.groups())
        return timedelta(hours=hours, minutes=minutes, seconds=seconds)
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(s|m|min|h|d)", raw)
    if not match:
        raise ValueError(f"time offset {text!r}: expected a number with a unit (48h, 2d, 90m, 30s) or HH:MM")
    unit = {"s": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: float(match.group(1))})


# ---------------------------------------------------------------------------------------------------- checks
def _check_columns(df: pl.DataFrame, columns: Sequence[str], source: str) -> None:
    for column in columns:
        if column not in df.columns:
            raise _error(source, column, f"missing (columns are {df.columns})")


def _check_ids(df: pl.DataFrame, column: str, source: str) -> pl.DataFrame:
    dtype = df.schema[column]
    if not dtype.is_integer():
        raise _error(source, column, f"subject ids must be integers, got {dtype}")
    nulls = df[column].null_count()
    if nulls:
        row = int(df[column].is_null().arg_true()[0])
        raise _error(source, column, f"{nulls} null subject id(s), first at row {row}")
    return df.with_columns(pl.col(column).cast(pl.Int64))


def _numeric(df: pl.DataFrame, column: str, id_column: str, source: str, what: str) -> pl.Expr:
    """``column`` as Float64 (numeric, boolean or numeric strings); anything else is an error naming the subject."""
    dtype = df.schema[column]
    if dtype.is_numeric() or dtype in (pl.Boolean, pl.Null):
        values = pl.col(column).cast(pl.Float64)
    elif dtype in (pl.String, pl.Categorical):
        text = pl.col(column).cast(pl.String).str.strip_chars()
        values = text.cast(pl.Float64, strict=False)
        bad = df.filter(text.is_not_null() & (text != "") & values.is_null())
        if bad.height:
            raise _error(
                source,
                column,
                f"{what} must be numeric, got {bad[column][0]!r} ({bad.height} non-numeric value(s))",
                subject=bad[id_column][0],
            )
        values = pl.when(text == "").then(None).otherwise(values)
    else:
        raise _error(source, column, f"{what} must be numeric, got {dtype}")
    bad = df.filter(values.is_infinite())
    if bad.height:
        raise _error(source, column, f"infinite {what}", subject=bad[id_column][0])
    return values


def _times(
    df: pl.DataFrame, column: str, id_column: str, layout: LongTableLayout, source: str
) -> tuple[pl.DataFrame, str]:
    """Adds ``_offset`` (Duration us, offsets) or ``_time`` (Datetime us, datetimes); returns the kind found."""
    dtype = df.schema[column]
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            raise _error(
                source,
                column,
                f"time-zone aware times ({dtype.time_zone}); convert them to local naive times first "
                f'(pl.col("{column}").dt.convert_time_zone(zone).dt.replace_time_zone(None))',
            )
        return df.with_columns(pl.col(column).cast(pl.Datetime("us")).alias("_time")), "datetime"
    if dtype == pl.Date:
        return df.with_columns(pl.col(column).cast(pl.Datetime("us")).alias("_time")), "datetime"
    if isinstance(dtype, pl.Duration):
        return df.with_columns(pl.col(column).cast(pl.Duration("us")).alias("_offset")), "offset"
    if dtype.is_numeric():
        if layout.time_unit is None:
            raise _error(
                source,
                column,
                "numeric time offsets need a unit (time_unit / --time_unit: seconds, minutes, hours, days)",
            )
        us = (pl.col(column).cast(pl.Float64) * TIME_UNITS[layout.time_unit]).round().cast(pl.Int64)
        return df.with_columns(pl.duration(microseconds=us).alias("_offset")), "offset"
    if dtype in (pl.String, pl.Categorical):
        text = pl.col(column).cast(pl.String)
        parts = text.str.extract_groups(_CLOCK)
        clock = df.select(parts.alias("p")).unnest("p")
        hours, minutes, seconds = (clock[c].cast(pl.Int64) for c in clock.columns)
        matched = hours.is_not_null()
        present = df[column].is_not_null()
        if (matched | ~present).all():
            us = (hours * 3_600 + minutes * 60 + seconds.fill_null(0)) * 1_000_000
            return df.with_columns(pl.duration(microseconds=us).alias("_offset")), "offset"
        if matched.any():
            bad = df.filter(~matched & present)
            raise _error(
                source,
                column,
                f"time {bad[column][0]!r} is not HH:MM like the other rows",
                subject=bad[id_column][0],
            )
        parsed = text.str.to_datetime(strict=False, time_unit="us")
        out = df.with_columns(parsed.alias("_time"))
        bad = out.filter(pl.col("_time").is_null() & pl.col(column).is_not_null())
        if bad.height:
            raise _error(
                source,
                column,
                f"time {bad[column][0]!r} is neither HH:MM nor a datetime ({bad.height} such value(s))",
                subject=bad[id_column][0],
            )
        return out, "datetime"
    raise _error(
        source, column, f"times must be datetimes, durations, numbers or 'HH:MM' strings, got {dtype}"
    )


def _anchored(
    df: pl.DataFrame, kind: str, anchor: datetime, subject_anchor: pl.DataFrame | None
) -> pl.DataFrame:
    """Adds ``_t`` (the event time), ``_at_anchor`` (offset 0, or the subject's earliest time) and ``_base`` (the
    subject's anchor)."""
    if kind == "offset":
        anchor_lit = pl.lit(anchor, dtype=pl.Datetime("us"))
        return df.with_columns(
            (anchor_lit + pl.col("_offset")).alias("_t"),
            (pl.col("_offset") == pl.duration(microseconds=0)).alias("_at_anchor"),
            anchor_lit.alias("_base"),
        )
    df = df.join(subject_anchor, on="subject_id", how="left")
    return df.with_columns(
        pl.col("_time").alias("_t"),
        (pl.col("_time") == pl.col("_anchor")).alias("_at_anchor"),
        pl.col("_anchor").alias("_base"),
    )


def _code_text(values: pl.Expr) -> pl.Expr:
    """A value written into a code: integral numbers without decimals (1.0 -> "1")."""
    integral = values == values.round()
    return pl.when(integral).then(values.cast(pl.Int64).cast(pl.String)).otherwise(values.cast(pl.String))


# ------------------------------------------------------------------------------------------------ conversion
def long_to_meds(
    table: pl.DataFrame,
    outcomes_table: pl.DataFrame | None = None,
    outcomes: Sequence[OutcomeSpec | str] = (),
    layout: LongTableLayout | None = None,
    sources: Mapping[str, str] | None = None,
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame], dict]:
    """Convert a long event table (and its outcome table) to a MEDS event frame and label frames.

    `outcomes` are `OutcomeSpec`s or ``"NAME=COLUMN[:TYPE]"`` strings; `sources` names the frames in error
    messages (``{"events": ..., "outcomes": ...}``; `convert_long` passes the file paths). Returns
    `(events, {name: labels}, report)`: both validated and sorted; the report counts what was left out and why.
    """
    layout = layout or LongTableLayout()
    names = {"events": "events", "outcomes": "outcomes", **(sources or {})}
    src = names["events"]
    specs = [OutcomeSpec.parse(o) if isinstance(o, str) else o for o in outcomes]
    if specs and outcomes_table is None:
        raise ValueError("outcomes were named but no outcome table was given")
    idc, tc, pc, vc = layout.id_column, layout.time_column, layout.parameter_column, layout.value_column
    _check_columns(table, [idc, tc, pc, vc], src)
    df = _check_ids(table, idc, src)
    ptype = df.schema[pc]
    if not (ptype in (pl.String, pl.Categorical) or isinstance(ptype, pl.Enum)):
        raise _error(src, pc, f"parameter names must be strings, got {ptype}")
    df = df.select(
        pl.col(idc).alias("subject_id"),
        pl.col(tc),
        pl.col(pc).cast(pl.String).str.strip_chars().alias("parameter"),
        _numeric(df, vc, idc, src, "values").alias("value"),
    )
    bad = df.filter(pl.col("parameter").is_null() | (pl.col("parameter") == ""))
    if bad.height:
        raise _error(src, pc, f"{bad.height} null or empty parameter name(s)", subject=bad["subject_id"][0])
    report: dict = {"n_rows": table.height}

    # left out before anything else: dropped parameters and outcome-side fields
    outcome_id = layout.outcome_id_column or idc
    outcome_fields = set()
    if outcomes_table is not None:
        outcome_fields = set(outcomes_table.columns) - {outcome_id, layout.outcome_time_column}
    leaked = sorted(outcome_fields & set(df["parameter"].unique().to_list()))
    if leaked:
        logger.warning(
            "%s: parameters %s are outcome-side fields (columns of %s) and are left out of the events",
            src,
            leaked,
            names["outcomes"],
        )
    removed = df.filter(pl.col("parameter").is_in([*layout.drop, *leaked]))
    counts = dict(removed.group_by("parameter").len().sort("parameter").iter_rows())
    report["dropped_parameters"] = {p: counts[p] for p in layout.drop if p in counts}
    report["outcome_fields_left_out"] = {p: counts[p] for p in leaked}
    df = df.filter(~pl.col("parameter").is_in([*layout.drop, *leaked]))

    df, kind = _times(df, tc, "subject_id", layout, src)
    report["time_format"] = kind
    descriptors = [*layout.static, *([layout.age] if layout.age else [])]
    is_descriptor = pl.col("parameter").is_in(descriptors)
    null_time = df.filter(pl.col(tc).is_null() & ~is_descriptor)
    if null_time.height:
        raise _error(
            src,
            tc,
            f"null time for parameter {null_time['parameter'][0]!r} ({null_time.height} such row(s)); only "
            "descriptors (static / age) may have no time",
            subject=null_time["subject_id"][0],
        )
    subject_anchor = None
    if kind == "datetime":
        subject_anchor = df.group_by("subject_id").agg(pl.col("_time").min().alias("_anchor"))
        no_time = subject_anchor.filter(pl.col("_anchor").is_null())
        if no_time.height:
            raise _error(
                src,
                tc,
                "no timed row, so there is no anchor for its descriptors",
                subject=no_time["subject_id"][0],
            )
    df = _anchored(df, kind, layout.anchor, subject_anchor)
    df = df.with_columns(pl.col("_at_anchor").fill_null(True))  # null-time descriptor rows

    markers = list(layout.missing_values)
    is_marker = pl.col("value").is_in(markers) if markers else pl.lit(False)
    at_start = is_descriptor & pl.col("_at_anchor")
    starts = df.filter(at_start)
    dup = starts.filter(pl.struct("subject_id", "parameter").is_duplicated())
    if dup.height:
        raise _error(
            src,
            pc,
            f"{dup.filter(pl.col('subject_id') == dup['subject_id'][0]).height} rows of descriptor "
            f"{dup['parameter'][0]!r} at its anchor (time zero or no time); expected one",
            subject=dup["subject_id"][0],
        )
    if layout.age:
        late_age = df.filter((pl.col("parameter") == layout.age) & ~pl.col("_at_anchor"))
        if late_age.height:
            raise _error(
                src,
                tc,
                f"the age parameter {layout.age!r} has a row after the anchor ({late_age[tc][0]}); age is read "
                "at the anchor only",
                subject=late_age["subject_id"][0],
            )
    missing = starts.filter(is_marker | pl.col("value").is_null() | pl.col("value").is_nan())
    report["missing_descriptors"] = dict(missing.group_by("parameter").len().sort("parameter").iter_rows())
    starts = starts.filter(~(is_marker | pl.col("value").is_null() | pl.col("value").is_nan()))

    timed = df.filter(~at_start)
    series_markers = timed.filter(is_marker)
    marker_counts = dict(series_markers.group_by("parameter").len().sort("parameter").iter_rows())
    if layout.missing_scope == "all":
        report["time_series_markers_dropped"] = marker_counts
        timed = timed.filter(~is_marker)
    else:
        report["time_series_marker_values"] = marker_counts  # kept as values

    parts = [_static_events(starts, layout, src, tc), _timed_events(timed, layout)]
    events = pl.concat(parts, how="vertical_relaxed").with_columns(
        pl.lit(None, dtype=pl.String).alias("text_value")
    )
    events = validate_events(events, source=f"<converted from {src}>")
    report["n_static_events"] = int(events["time"].null_count())

    labels: dict[str, pl.DataFrame] = {}
    if outcomes_table is not None and specs:
        labels, report["labels"] = _labels(
            outcomes_table, specs, layout, outcome_id, names["outcomes"], events, kind, subject_anchor
        )
    return events, labels, report


def _static_events(
    starts: pl.DataFrame, layout: LongTableLayout, source: str, time_column: str
) -> pl.DataFrame:
    null_time = pl.lit(None, dtype=pl.Datetime("us")).alias("time")
    prefix = layout.code_prefix
    parts = []
    if layout.age:
        age = starts.filter(pl.col("parameter") == layout.age)
        bad = age.filter((pl.col("value") < 0) | (pl.col("value") > 130))
        if bad.height:
            raise _error(
                source,
                layout.value_column,
                f"implausible age {bad['value'][0]} (years)",
                subject=bad["subject_id"][0],
            )
        birth = (pl.col("value") * DAYS_PER_YEAR * 86_400 * 1e6).round().cast(pl.Int64)
        parts.append(
            age.select(
                "subject_id",
                (pl.col("_t").fill_null(pl.col("_base")) - pl.duration(microseconds=birth)).alias("time"),
                pl.lit("MEDS_BIRTH").alias("code"),
                pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
            )
        )
    categorical = starts.filter(pl.col("parameter").is_in(list(layout.categorical)))
    parts.append(
        categorical.select(
            "subject_id",
            null_time,
            (pl.lit(prefix) + pl.col("parameter") + pl.lit("//") + _code_text(pl.col("value"))).alias("code"),
            pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
        )
    )
    numeric = starts.filter(
        pl.col("parameter").is_in([p for p in layout.static if p not in layout.categorical])
    )
    parts.append(
        numeric.select(
            "subject_id",
            null_time,
            (pl.lit(prefix) + pl.col("parameter")).alias("code"),
            pl.col("value").cast(pl.Float32).alias("numeric_value"),
        )
    )
    return pl.concat(parts, how="vertical_relaxed")


def _timed_events(timed: pl.DataFrame, layout: LongTableLayout) -> pl.DataFrame:
    categorical = pl.col("parameter").is_in(list(layout.categorical))
    code = pl.lit(layout.code_prefix) + pl.col("parameter")
    return timed.select(
        "subject_id",
        pl.col("_t").alias("time"),
        pl.when(categorical & pl.col("value").is_not_null())
        .then(code + pl.lit("//") + _code_text(pl.col("value")))
        .otherwise(code)
        .alias("code"),
        pl.when(categorical).then(None).otherwise(pl.col("value")).cast(pl.Float32).alias("numeric_value"),
    )


def _labels(
    outc: pl.DataFrame,
    specs: Sequence[OutcomeSpec],
    layout: LongTableLayout,
    id_column: str,
    source: str,
    events: pl.DataFrame,
    kind: str,
    subject_anchor: pl.DataFrame | None,
) -> tuple[dict[str, pl.DataFrame], dict]:
    _check_columns(outc, [id_column, *(s.column for s in specs)], source)
    outc = _check_ids(outc, id_column, source).rename(
        {id_column: "subject_id"} if id_column != "subject_id" else {}
    )
    known = events.select(pl.col("subject_id").unique())
    orphan = outc.join(known, on="subject_id", how="anti")
    if orphan.height:
        raise _error(
            source,
            id_column,
            f"has an outcome but no row in the event table ({orphan.height} outcome row(s) of such subjects)",
            subject=orphan["subject_id"][0],
        )
    if layout.outcome_time_column:
        tcol = layout.outcome_time_column
        _check_columns(outc, [tcol], source)
        bad = outc.filter(pl.col(tcol).is_null())
        if bad.height:
            raise _error(source, tcol, "null prediction time", subject=bad["subject_id"][0])
        outc, outcome_kind = _times(outc, tcol, "subject_id", layout, source)
        if outcome_kind != kind:
            raise _error(
                source,
                tcol,
                f"times are {outcome_kind}s but the event table's are {kind}s; use one kind for both",
            )
        outc = _anchored(outc, kind, layout.anchor, subject_anchor).with_columns(
            pl.col("_t").alias("_prediction")
        )
        keys = ["subject_id", tcol]
    else:
        if layout.prediction_offset is None:
            raise ValueError(
                "outcomes need a prediction time: prediction_offset (--prediction_time, e.g. 48h after the "
                "anchor) or outcome_time_column (--outcome_time_column)"
            )
        shift = pl.lit(layout.prediction_offset, dtype=pl.Duration("us"))
        if kind == "offset":
            outc = outc.with_columns(
                (pl.lit(layout.anchor, dtype=pl.Datetime("us")) + shift).alias("_prediction")
            )
        else:
            outc = outc.join(subject_anchor, on="subject_id", how="left").with_columns(
                (pl.col("_anchor") + shift).alias("_prediction")
            )
        keys = ["subject_id"]
    dup = outc.filter(pl.struct(keys).is_duplicated())
    if dup.height:
        detail = "" if len(keys) == 1 else f" at time {dup[keys[1]][0]}"
        raise _error(
            source,
            ", ".join([id_column, *keys[1:]]),
            f"duplicated outcome row{detail} ({dup.height} duplicated rows)",
            subject=dup["subject_id"][0],
        )
    markers = list(layout.missing_values)
    labels, report = {}, {}
    for spec in specs:
        dtype = outc.schema[spec.column]
        text = dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
        if text and spec.value_type in (
            None,
            "categorical",
        ):  # a categorical outcome: its strings as they are
            raw = pl.col(spec.column).cast(pl.String).str.strip_chars()
            gone = raw.is_null() | (raw == "")
        else:
            raw = _numeric(outc, spec.column, "subject_id", source, "outcome values")
            gone = raw.is_null() | raw.is_nan() | (raw.is_in(markers) if markers else pl.lit(False))
        values = outc.select(
            "subject_id",
            pl.col("_prediction").alias("prediction_time"),
            raw.alias(spec.column),
            gone.alias("_gone"),
        )
        n_missing = int(values["_gone"].sum())
        values = values.filter(~pl.col("_gone")).drop("_gone")
        try:  # the MEDS value column, chosen as every converter chooses it
            frame = outcome_labels(values, spec.column, spec.value_type or "auto", source=source)
        except MEDSValidationError:
            raise
        except ValueError as error:
            raise LongTableError(str(error)) from error
        value_column = frame.columns[2]
        frame = validate_labels(
            frame.sort("subject_id", "prediction_time"), source=f"{source} ({spec.column})"
        )
        if n_missing:
            logger.warning(
                "%s: column %r: %d row(s) without a value (null or a missing marker %s) give no %r label",
                source,
                spec.column,
                n_missing,
                markers,
                spec.name,
            )
        labelled = frame["subject_id"].n_unique()
        after = events.join(
            frame.select("subject_id", "prediction_time")
            .group_by("subject_id")
            .agg(pl.col("prediction_time").max()),
            on="subject_id",
        )
        entry = {
            "column": spec.column,
            "value_column": value_column,
            "n_labels": frame.height,
            "n_missing": n_missing,
            "n_subjects_without_label": int(known.height - labelled),
            "n_events_after_prediction_time": int(
                after.filter(pl.col("time") > pl.col("prediction_time")).height
            ),
        }
        if value_column == "boolean_value":
            entry["n_positive"] = int(frame["boolean_value"].sum())
        labels[spec.name] = frame
        report[spec.name] = entry
    return labels, report


# ----------------------------------------------------------------------------------------------- files
def read_table(path: str | Path) -> pl.DataFrame:
    """A parquet or CSV file (by suffix; errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".csv", ".txt"):
        return pl.read_csv(path, infer_schema_length=10_000)
    if path.suffix.lower() in (".parquet", ".pq"):
        return pl.read_parquet(path)
    raise ValueError(f"{path}: unknown table format {path.suffix!r} (parquet or csv expected)")


def convert_long(
    events_path,
    outcomes_path,
    output_dir,
    outcomes: Sequence[OutcomeSpec | str] = (),
    layout: LongTableLayout | None = None,
    splits: pl.DataFrame | None = None,
    seed: int = 0,
    n_folds: int | None = None,
    fold: int | None = None,
    tuning_fraction: float = 0.2,
    n_shards: int = 1,
    overwrite: bool = False,
    dataset_name: str | None = None,
) -> dict:
    """Read a long event table (and its outcome table), convert it (`long_to_meds`) and write a MEDS folder.

    Writes ``output_dir/data/<split>/*.parquet``, ``metadata/{codes,subject_splits}.parquet``,
    ``metadata/dataset.json`` and ``labels/<name>.parquet`` per outcome, atomically (``write_meds``).
    Splits: the given ``(subject_id, split)`` frame; with `n_folds`, fold `fold` of a `n_folds`-fold
    cross-validation (held_out = that fold; tuning = `tuning_fraction` of the other folds;
    `splits.cross_validation_splits`); otherwise 70/15/15 by subject. Both are seeded and stratified by the first
    boolean outcome. Returns a summary dict: counts of subjects, events, labels and of everything left out.
    """
    start = _time.perf_counter()
    layout = layout or LongTableLayout()
    if (n_folds is None) != (fold is None):
        raise ValueError("cross-validation needs both n_folds (--folds) and fold (--fold)")
    table = read_table(events_path)
    outcomes_table = read_table(outcomes_path) if outcomes_path is not None else None
    events, labels, report = long_to_meds(
        table,
        outcomes_table,
        outcomes,
        layout,
        sources={"events": str(events_path), "outcomes": str(outcomes_path)},
    )
    subject_ids = events["subject_id"].unique()
    stratify = next((f for f in labels.values() if f["boolean_value"].null_count() == 0), None)
    if splits is None and n_folds is not None:
        splits = cross_validation_splits(
            subject_ids, stratify, n_folds=n_folds, fold=fold, seed=seed, tuning_fraction=tuning_fraction
        )
    elif splits is None:
        splits = make_subject_splits(subject_ids, stratify, seed=seed)
    path = write_meds(
        output_dir,
        events,
        splits,
        labels=labels,
        n_shards=n_shards,
        dataset_name=dataset_name or f"long_{Path(events_path).stem}",
        overwrite=overwrite,
    )
    summary = {
        "output_dir": str(path),
        "n_subjects": int(subject_ids.len()),
        "n_events": int(events.height),
        "n_codes": int(events["code"].n_unique()),
        **report,
        "splits": dict(splits.group_by("split").len().sort("split").iter_rows()),
        "seconds": round(_time.perf_counter() - start, 3),
    }
    if n_folds is not None:
        summary["cross_validation"] = {
            "n_folds": n_folds,
            "fold": fold,
            "seed": seed,
            "tuning_fraction": tuning_fraction,
        }
    return summary


def preset(name: str) -> dict:
    """A named layout: ``{"layout": LongTableLayout, "outcomes": (OutcomeSpec, ...), "dataset_name": str}``, the
    keyword arguments of :func:`convert_long` (``convert_long(events, outcomes, out, **preset(name))``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])


def replace_layout(layout: LongTableLayout, **changes) -> LongTableLayout:
    """`layout` with the fields of `changes` that are not None replaced."""
    return dataclasses.replace(layout, **{k: v for k, v in changes.items() if v is not None})


__all__ = [
    "DEFAULT_ANCHOR",
    "PRESETS",
    "LongTableError",
    "LongTableLayout",
    "OutcomeSpec",
    "convert_long",
    "long_to_meds",
    "parse_offset",
    "preset",
    "read_table",
    "replace_layout",
]
