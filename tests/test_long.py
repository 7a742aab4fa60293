"""Long event tables -> MEDS: offsets to timestamps, descriptors, age, missing markers, outcomes of every shape,
outcome-side fields kept out of the inputs, cross-validation splits, one-sentence errors, real PhysioNet 2012."""

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehr_transformer.cli import main
from ehr_transformer.data.labels import read_labels
from ehr_transformer.data.long import (
    LongTableError,
    LongTableLayout,
    OutcomeSpec,
    convert_long,
    long_to_meds,
    parse_offset,
    preset,
)
from ehr_transformer.data.meds import read_events
from ehr_transformer.data.splits import assign_folds, cross_validation_splits, read_subject_splits

ANCHOR = datetime(2000, 1, 1)
PHYSIONET = Path(__file__).resolve().parents[2] / "shared" / "data" / "physionet2012"
OUTCOME_FIELDS = ("SAPS-I", "SOFA", "Length_of_stay", "Survival", "In-hospital_death")


def _rows(record, rows):
    return [(record, t, p, v) for t, p, v in rows]


def _set(extra=()):
    """A PhysioNet-2012-shaped event table of three stays (descriptors at 00:00, time series after)."""
    rows = [
        *_rows(
            1,
            [
                ("00:00", "RecordID", 1.0),
                ("00:00", "Age", 54.0),
                ("00:00", "Gender", 0.0),
                ("00:00", "Height", -1.0),
                ("00:00", "ICUType", 4.0),
                ("00:00", "Weight", 80.0),
                ("00:00", "HR", 70.0),
                ("00:07", "HR", 73.0),
                ("05:30", "Weight", 82.5),
                ("47:59", "Lactate", 2.5),
            ],
        ),
        *_rows(
            2,
            [
                ("00:00", "RecordID", 2.0),
                ("00:00", "Age", 76.0),
                ("00:00", "Gender", 1.0),
                ("00:00", "Height", 175.5),
                ("00:00", "ICUType", 2.0),
                ("00:00", "Weight", -1.0),
                ("01:00", "HR", 90.0),
                ("26:15", "Weight", 70.0),
            ],
        ),
        *_rows(3, [("00:00", "RecordID", 3.0), ("00:00", "Age", 40.0), ("12:00", "Temp", -1.0)]),
        *extra,
    ]
    return pl.DataFrame(rows, schema=["record_id", "time", "parameter", "value"], orient="row")


def _outcomes():
    return pl.DataFrame(
        {
            "RecordID": [1, 2, 3],
            "SAPS-I": [11, 20, -1],
            "SOFA": [3, 9, 1],
            "Length_of_stay": [5, -1, 12],
            "Survival": [-1, 7, -1],
            "In-hospital_death": [0, 1, 0],
        }
    )


def _physionet(**changes):
    layout = preset("physionet2012")["layout"]
    return LongTableLayout(**{**layout.__dict__, **changes})


def _convert(table=None, outcomes=None, specs=("death=In-hospital_death",), layout=None):
    return long_to_meds(
        _set() if table is None else table,
        _outcomes() if outcomes is None else outcomes,
        specs,
        layout or _physionet(),
        sources={"events": "set-a.parquet", "outcomes": "outcomes-a.parquet"},
    )


def _one_sentence(error: Exception, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ------------------------------------------------------------------------------------------- events
def test_offsets_become_timestamps_from_the_anchor():
    events, _, report = _convert()
    hr = events.filter((pl.col("subject_id") == 1) & (pl.col("code") == "PHYSIONET//HR"))
    assert hr["time"].to_list() == [ANCHOR, ANCHOR + timedelta(minutes=7)]
    assert hr["numeric_value"].to_list() == [70.0, 73.0]
    lactate = events.filter(pl.col("code") == "PHYSIONET//Lactate")
    assert lactate["time"].to_list() == [ANCHOR + timedelta(hours=47, minutes=59)]  # hours past 24
    assert report["time_format"] == "offset"
    other = datetime(2100, 6, 1, 8)
    moved, _, _ = _convert(layout=_physionet(anchor=other))
    assert moved.filter(pl.col("code") == "PHYSIONET//Lactate")["time"].to_list() == [
        other + timedelta(hours=47, minutes=59)
    ]


def test_age_becomes_meds_birth_and_no_event_of_its_own():
    events, _, _ = _convert()
    birth = events.filter(pl.col("code") == "MEDS_BIRTH").sort("subject_id")
    assert birth["subject_id"].to_list() == [1, 2, 3]
    ages = [(ANCHOR - t).total_seconds() / (365.25 * 86400) for t in birth["time"].to_list()]
    np.testing.assert_allclose(ages, [54.0, 76.0, 40.0], atol=1e-6)
    assert not events.filter(pl.col("code").str.contains("Age")).height


def test_descriptors_become_static_events_coded_or_valued():
    events, _, report = _convert()
    static = events.filter(pl.col("time").is_null())
    one = dict(static.filter(pl.col("subject_id") == 1).select("code", "numeric_value").iter_rows())
    assert one == {"PHYSIONET//Gender//0": None, "PHYSIONET//ICUType//4": None, "PHYSIONET//Weight": 80.0}
    two = dict(static.filter(pl.col("subject_id") == 2).select("code", "numeric_value").iter_rows())
    assert two == {"PHYSIONET//Gender//1": None, "PHYSIONET//ICUType//2": None, "PHYSIONET//Height": 175.5}
    # -1 marks a descriptor not recorded: no event, counted
    assert report["missing_descriptors"] == {"Height": 1, "Weight": 1}
    # the id repeated as a parameter is left out, counted
    assert report["dropped_parameters"] == {"RecordID": 3}
    assert not events.filter(pl.col("code").str.contains("RecordID")).height


def test_descriptor_also_measured_later_stays_a_time_series():
    events, _, _ = _convert()
    weight = events.filter(pl.col("code") == "PHYSIONET//Weight").sort("subject_id", "time", nulls_last=False)
    assert weight.select("subject_id", "time", "numeric_value").rows() == [
        (1, None, 80.0),  # admission weight: static
        (1, ANCHOR + timedelta(hours=5, minutes=30), 82.5),  # later weights: timed, from their time on
        (2, ANCHOR + timedelta(hours=26, minutes=15), 70.0),  # descriptor missing (-1): no static weight
    ]


def test_missing_markers_in_time_series_are_kept_and_counted_unless_scope_all():
    events, _, report = _convert()
    assert events.filter(pl.col("code") == "PHYSIONET//Temp")["numeric_value"].to_list() == [-1.0]
    assert report["time_series_marker_values"] == {"Temp": 1}
    events, _, report = _convert(layout=_physionet(missing_scope="all"))
    assert not events.filter(pl.col("code") == "PHYSIONET//Temp").height
    assert report["time_series_markers_dropped"] == {"Temp": 1}


def test_every_row_is_accounted_for():
    events, _, report = _convert()
    n_ages = 3
    accounted = (
        events.height
        - n_ages  # MEDS_BIRTH replaces each Age row
        + n_ages
        + sum(report["dropped_parameters"].values())
        + sum(report["missing_descriptors"].values())
    )
    assert accounted == report["n_rows"] == _set().height


# ------------------------------------------------------------------------------ outcome-side fields
def test_outcome_fields_never_become_event_codes(tmp_path):
    leaky = _set(extra=[(1, "10:00", "SOFA", 7.0), (2, "03:00", "Length_of_stay", 9.0)])
    events, labels, report = _convert(table=leaky, specs=["death=In-hospital_death", "los=Length_of_stay"])
    codes = events["code"].to_list()
    assert not [c for c in codes if any(field in c for field in OUTCOME_FIELDS)]
    assert report["outcome_fields_left_out"] == {"Length_of_stay": 1, "SOFA": 1}
    # the values of outcome columns appear nowhere among the events of their subjects
    assert not events.filter((pl.col("subject_id") == 1) & (pl.col("numeric_value") == 7.0)).height
    # and on disk, through the command line
    table, outc = tmp_path / "set.parquet", tmp_path / "outc.parquet"
    leaky.write_parquet(table)
    _outcomes().write_parquet(outc)
    out = tmp_path / "meds"
    args = ["convert-long", "--preset", "physionet2012", "--events", str(table), "--outcomes", str(outc)]
    assert (
        main([*args, "--output_dir", str(out), "--outcome", "death=In-hospital_death", "los=Length_of_stay"])
        == 0
    )
    written = read_events(out)["code"].unique().to_list()
    assert written and not [c for c in written if any(field in c for field in OUTCOME_FIELDS)]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["death.parquet", "los.parquet"]


# ----------------------------------------------------------------------------------------- outcomes
def test_outcomes_of_every_shape_with_missing_markers_counted():
    specs = [
        "death=In-hospital_death",
        "los_days=Length_of_stay",
        "sofa_class=SOFA:integer",
        "death_float=In-hospital_death:float",
    ]
    _, labels, report = _convert(specs=specs)
    death = labels["death"]
    assert death["boolean_value"].to_list() == [False, True, False]
    assert set(death["prediction_time"].to_list()) == {ANCHOR + timedelta(hours=48)}
    assert labels["los_days"].select("subject_id", "float_value").rows() == [(1, 5.0), (3, 12.0)]
    assert report["labels"]["los_days"]["n_missing"] == 1  # the -1 of stay 2: no label, counted
    assert report["labels"]["los_days"]["value_column"] == "float_value"
    assert labels["sofa_class"]["integer_value"].to_list() == [3, 9, 1]
    assert labels["death_float"]["float_value"].to_list() == [0.0, 1.0, 0.0]
    assert report["labels"]["death"]["n_positive"] == 1
    # a text column is a categorical outcome; empty text is missing
    outc = _outcomes().with_columns(pl.Series("discharge", ["home", "", "rehab"]))
    _, labels, report = _convert(outcomes=outc, specs=["discharge=discharge"])
    assert labels["discharge"].select("subject_id", "categorical_value").rows() == [(1, "home"), (3, "rehab")]
    assert report["labels"]["discharge"]["n_missing"] == 1


def test_per_time_outcomes_take_their_prediction_time_from_a_column():
    outc = pl.DataFrame(
        {"RecordID": [1, 1, 2], "hour": ["06:00", "30:00", "12:00"], "remaining_los": [4.5, 3.5, 9.0]}
    )
    _, labels, _ = _convert(
        outcomes=outc, specs=["los=remaining_los"], layout=_physionet(outcome_time_column="hour")
    )
    assert labels["los"].select("subject_id", "prediction_time", "float_value").rows() == [
        (1, ANCHOR + timedelta(hours=6), 4.5),
        (1, ANCHOR + timedelta(hours=30), 3.5),
        (2, ANCHOR + timedelta(hours=12), 9.0),
    ]


def test_outcome_spec_parsing():
    assert OutcomeSpec.parse("death=In-hospital_death") == OutcomeSpec("death", "In-hospital_death")
    assert OutcomeSpec.parse("los=Length_of_stay:float") == OutcomeSpec("los", "Length_of_stay", "float")
    assert OutcomeSpec.parse("x=a:b") == OutcomeSpec("x", "a:b")
    with pytest.raises(ValueError, match="NAME=COLUMN"):
        OutcomeSpec.parse("death")
    assert parse_offset("48h") == timedelta(hours=48) == parse_offset("48:00") == parse_offset("2d")
    with pytest.raises(ValueError, match="unit"):
        parse_offset("48")


# --------------------------------------------------------------------------------------- time formats
def test_numeric_duration_and_datetime_times():
    base = {"subject_id": [5, 5, 5], "parameter": ["Age", "HR", "HR"], "value": [30.0, 80.0, 81.0]}
    layout = LongTableLayout(code_prefix="X//", age="Age", prediction_offset=timedelta(hours=24))
    outc = pl.DataFrame({"subject_id": [5], "died": [True]})
    numeric = pl.DataFrame({**base, "time": [0.0, 30.0, 90.0]})
    events, _, _ = long_to_meds(
        numeric, layout=LongTableLayout(**{**layout.__dict__, "time_unit": "minutes"})
    )
    assert events.filter(pl.col("code") == "X//HR")["time"].to_list() == [
        ANCHOR + timedelta(minutes=30),
        ANCHOR + timedelta(minutes=90),
    ]
    with pytest.raises(LongTableError) as error:
        long_to_meds(numeric, layout=layout)
    _one_sentence(error.value, "'time'", "unit")
    duration = pl.DataFrame({**base, "time": [timedelta(0), timedelta(hours=1), timedelta(hours=2)]})
    events, _, _ = long_to_meds(duration, layout=layout)
    assert events.filter(pl.col("code") == "X//HR")["time"].to_list()[-1] == ANCHOR + timedelta(hours=2)
    # datetimes: kept; the subject's anchor is its first event (age and prediction time count from it)
    start = datetime(2019, 3, 4, 10, 0)
    stamped = pl.DataFrame({**base, "time": [start, start + timedelta(hours=1), start + timedelta(hours=3)]})
    events, labels, report = long_to_meds(stamped, outc, ["died=died"], layout)
    assert report["time_format"] == "datetime"
    assert events.filter(pl.col("code") == "X//HR")["time"].to_list()[0] == start + timedelta(hours=1)
    birth = events.filter(pl.col("code") == "MEDS_BIRTH")["time"][0]
    assert abs((start - birth).total_seconds() / (365.25 * 86400) - 30.0) < 1e-6
    assert labels["died"]["prediction_time"].to_list() == [start + timedelta(hours=24)]
    assert labels["died"]["boolean_value"].to_list() == [True]


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("table", "outcomes", "parts"),
    [
        (_set(extra=[(2, "3:7", "HR", 80.0)]), None, ["set-a.parquet", "'time'", "subject 2", "'3:7'"]),
        (
            _set().with_columns(pl.col("value").cast(pl.String).replace("90.0", "high")),
            None,
            ["'value'", "subject 2", "'high'"],
        ),
        (_set(extra=[(1, "00:00", "Gender", 1.0)]), None, ["'parameter'", "subject 1", "'Gender'"]),
        (_set(extra=[(3, "00:00", "Age", 200.0)]), None, ["subject 3"]),
        (
            _set().with_columns(
                pl.when(pl.col("value") == 40.0).then(200.0).otherwise(pl.col("value")).alias("value")
            ),
            None,
            ["'value'", "subject 3", "implausible age"],
        ),
        (_set(extra=[(3, "10:00", "Age", 41.0)]), None, ["'time'", "subject 3", "age"]),
        (_set(extra=[(1, None, "HR", 1.0)]), None, ["'time'", "subject 1", "'HR'"]),
        (
            None,
            _outcomes().vstack(_outcomes().head(1)),
            ["outcomes-a.parquet", "'RecordID'", "subject 1", "duplicated"],
        ),
        (
            None,
            _outcomes().with_columns(pl.Series("RecordID", [1, 2, 9])),
            ["outcomes-a.parquet", "'RecordID'", "subject 9", "no row in the event table"],
        ),
        (
            None,
            _outcomes().with_columns(pl.Series("In-hospital_death", [0, 2, 0])),
            ["'In-hospital_death'", "subject 2", "0/1"],
        ),
    ],
)
def test_bad_input_is_one_sentence_naming_file_column_subject(table, outcomes, parts):
    spec = ["death=In-hospital_death:boolean"]
    with pytest.raises(LongTableError) as error:
        _convert(table=table, outcomes=outcomes, specs=spec)
    _one_sentence(error.value, *parts)


def test_null_subject_id_and_missing_column():
    bad = _set().with_columns(
        pl.when(pl.col("record_id") == 2).then(None).otherwise(pl.col("record_id")).alias("record_id")
    )
    with pytest.raises(LongTableError) as error:
        _convert(table=bad)
    _one_sentence(error.value, "set-a.parquet", "'record_id'", "null")
    with pytest.raises(LongTableError) as error:
        _convert(table=_set().drop("parameter"))
    _one_sentence(error.value, "set-a.parquet", "'parameter'", "missing")


def test_failed_conversion_writes_nothing(tmp_path):
    table, outc = tmp_path / "set.parquet", tmp_path / "outc.parquet"
    _set(extra=[(2, "bad", "HR", 80.0)]).write_parquet(table)
    _outcomes().write_parquet(outc)
    out = tmp_path / "meds"
    with pytest.raises(LongTableError):
        convert_long(table, outc, out, ["death=In-hospital_death"], _physionet())
    assert not out.exists() and not list(tmp_path.glob("meds*"))
    code = main(
        [
            "convert-long",
            "--preset",
            "physionet2012",
            "--events",
            str(table),
            "--outcomes",
            str(outc),
            "--output_dir",
            str(out),
        ]
    )
    assert code == 2 and not out.exists()


# ------------------------------------------------------------------------------- writing and splits
def test_convert_long_writes_meds_with_cross_validation_splits(tmp_path):
    table, outc = tmp_path / "set.csv", tmp_path / "outc.csv"
    _set().write_csv(table)
    _outcomes().write_csv(outc)
    summary = convert_long(
        table,
        outc,
        tmp_path / "meds",
        preset("physionet2012")["outcomes"],
        _physionet(),
        n_folds=3,
        fold=1,
        dataset_name="pn",
    )
    assert summary["n_subjects"] == 3 and summary["cross_validation"]["fold"] == 1
    assert read_subject_splits(tmp_path / "meds")["split"].to_list().count("held_out") == 1
    labels = read_labels(tmp_path / "meds" / "labels" / "in_hospital_death.parquet")
    assert labels.height == 3
    assert '"dataset_name": "pn"' in (tmp_path / "meds" / "metadata" / "dataset.json").read_text()


def test_cross_validation_splits_partition_and_stratify():
    ids = np.arange(1000, 2000)
    labels = pl.DataFrame({"subject_id": ids, "boolean_value": (ids % 7 == 0)})
    folds = assign_folds(ids, labels, n_folds=5, seed=3)
    assert folds["fold"].value_counts().sort("fold")["count"].to_list() == [200] * 5
    held = []
    for fold in range(5):
        splits = cross_validation_splits(ids, labels, n_folds=5, fold=fold, seed=3, tuning_fraction=0.2)
        assert splits.equals(cross_validation_splits(ids, labels, n_folds=5, fold=fold, seed=3))
        counts = dict(splits.group_by("split").len().iter_rows())
        assert counts == {"held_out": 200, "tuning": 160, "train": 640}
        joined = splits.join(labels, on="subject_id")
        rates = dict(joined.group_by("split").agg(pl.col("boolean_value").mean()).iter_rows())
        assert max(rates.values()) - min(rates.values()) < 0.01
        held.extend(splits.filter(pl.col("split") == "held_out")["subject_id"].to_list())
    assert sorted(held) == ids.tolist()  # every subject held out exactly once
    other = cross_validation_splits(ids, labels, n_folds=5, fold=0, seed=4)
    assert not other.equals(cross_validation_splits(ids, labels, n_folds=5, fold=0, seed=3))
    with pytest.raises(ValueError, match="fold"):
        cross_validation_splits(ids, labels, n_folds=5, fold=5)


# --------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not PHYSIONET.is_dir(), reason=f"PhysioNet 2012 set A not found at {PHYSIONET}")
def test_real_physionet2012_set_a(tmp_path):
    out = tmp_path / "meds"
    code = main(
        [
            "convert-long",
            "--preset",
            "physionet2012",
            "--events",
            str(PHYSIONET / "set-a.parquet"),
            "--outcomes",
            str(PHYSIONET / "outcomes-a.parquet"),
            "--output_dir",
            str(out),
            "--outcome",
            "in_hospital_death=In-hospital_death",
            "los_days=Length_of_stay",
        ]
    )
    assert code == 0
    labels = read_labels(out / "labels" / "in_hospital_death.parquet")
    assert labels.height == 4000 and int(labels["boolean_value"].sum()) == 554
    assert set(labels["prediction_time"].to_list()) == {ANCHOR + timedelta(hours=48)}
    events = pl.scan_parquet(out / "data" / "**" / "*.parquet")
    codes = events.select(pl.col("code").unique()).collect()["code"].to_list()
    assert not [c for c in codes if any(field in c for field in (*OUTCOME_FIELDS, "RecordID", "Age"))]
    assert events.filter(pl.col("code") == "MEDS_BIRTH").select(pl.len()).collect().item() == 4000
    latest = events.select(pl.col("time").max()).collect().item()
    assert latest <= ANCHOR + timedelta(hours=48)
