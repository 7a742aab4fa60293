"""MEDS reading, validation and atomic writing."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehr_transformer.data import labels as meds_labels
from ehr_transformer.data import meds
from ehr_transformer.data import writer as meds_writer
from ehr_transformer.data.labels import read_labels, validate_labels
from ehr_transformer.data.meds import (
    DATA_SCHEMA,
    MEDSValidationError,
    iter_shards,
    read_events,
    validate_events,
)
from ehr_transformer.data.splits import check_split_coverage, read_subject_splits, summarize
from ehr_transformer.data.writer import write_meds

T0 = dt.datetime(2020, 1, 1, 8, 0)


def _events() -> pl.DataFrame:
    h = dt.timedelta(hours=1)
    return pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 1, 2, 2, 2, 3, 3],
            "time": [None, T0 - 40 * 365 * 24 * h, T0, T0 + h, None, T0, T0 + 2 * h, T0, T0 + 3 * h],
            "code": [
                "GENDER//F",
                "MEDS_BIRTH",
                "ADMISSION//EMERGENCY",
                "LOINC//2524-7",
                "GENDER//M",
                "LOINC//2160-0",
                "LOINC//2160-0",
                "ADMISSION//ELECTIVE",
                "MEDS_DEATH",
            ],
            "numeric_value": [None, None, None, 4.5, None, 1.2, 1.4, None, None],
            "text_value": [None, None, None, None, None, None, "hemolysed", None, None],
        },
        schema=DATA_SCHEMA,
    )


def _splits() -> pl.DataFrame:
    return pl.DataFrame({"subject_id": [1, 2, 3, 4], "split": ["train", "train", "held_out", "tuning"]})


def _labels() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": [1, 3],
            "prediction_time": [T0 + dt.timedelta(hours=2), T0 + dt.timedelta(hours=1)],
            "boolean_value": [False, True],
        }
    )


def _write_shard(tmp_path: Path, df: pl.DataFrame, name: str = "data/train/0.parquet") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)
    return path


# ------------------------------------------------------------------------------------------- round trip


def test_write_then_read_round_trip(tmp_path):
    out = write_meds(
        tmp_path / "meds", _events(), _splits(), {"mortality": _labels()}, n_shards=2, dataset_name="toy"
    )
    assert out == tmp_path / "meds"
    shards = list(iter_shards(out))
    assert [p.relative_to(out).as_posix() for p, _ in shards] == [
        "data/held_out/0.parquet",
        "data/train/0.parquet",
        "data/train/1.parquet",
    ]
    per_shard = [set(df["subject_id"]) for _, df in shards]
    assert per_shard == [{3}, {1}, {2}]  # a subject never spans shards
    assert read_events(out).equals(_events())
    assert read_events(out, subject_ids=[2]).equals(_events().filter(pl.col("subject_id") == 2))
    assert read_events(out, subject_ids=[]).height == 0
    assert read_labels(out / "labels" / "mortality.parquet")["boolean_value"].to_list() == [False, True]
    assert read_subject_splits(out).equals(_splits())
    info = json.loads((out / "metadata" / "dataset.json").read_text())
    assert info["meds_version"] == "0.3.3" and info["etl_name"] == "ehr_transformer"
    assert info["dataset_name"] == "toy" and "created_at" in info
    codes = pl.read_parquet(out / "metadata" / "codes.parquet")
    assert codes.columns == ["code", "description", "parent_codes"]
    assert set(codes["code"]) == set(_events()["code"])
    assert not list(tmp_path.glob("meds.tmp-*"))


def test_summarize_and_subjects_without_events_are_reported(tmp_path):
    out = write_meds(tmp_path / "meds", _events(), _splits())
    coverage = check_split_coverage(out)  # subject 4 is listed in the splits but has no event
    assert coverage.without_events == [4] and coverage.n_without_events == 1 and coverage.without_split == []
    summary = summarize(out)
    assert (
        summary["n_subjects"] == 3 and summary["n_events"] == 9 and summary["n_subjects_without_events"] == 1
    )
    assert summary["splits"]["train"]["n_subjects"] == 2 and summary["splits"]["held_out"]["n_events"] == 2


def test_read_tolerates_extra_columns_and_missing_text_value(tmp_path):
    df = _events().drop("text_value").with_columns(pl.lit("x").alias("hospital"))
    _write_shard(tmp_path, df)
    ((_, got),) = list(iter_shards(tmp_path))
    assert got.columns == list(DATA_SCHEMA) and got["text_value"].null_count() == got.height


def test_castable_dtypes_are_cast(tmp_path):
    df = _events().with_columns(
        pl.col("subject_id").cast(pl.Int32),
        pl.col("time").cast(pl.Datetime("ns")),
        pl.col("code").cast(pl.Categorical),
        pl.col("numeric_value").cast(pl.Float64),
    )
    _write_shard(tmp_path, df)
    ((_, got),) = list(iter_shards(tmp_path))
    assert got.schema == pl.Schema(DATA_SCHEMA)
    assert got.equals(_events())
    ms = validate_events(_events().with_columns(pl.col("time").cast(pl.Datetime("ms"))))
    assert ms.equals(_events())


# ------------------------------------------------------------------------------------------- bad input


def test_missing_column_names_file_and_column(tmp_path):
    path = _write_shard(tmp_path, _events().drop("code"))
    with pytest.raises(MEDSValidationError, match=r"0\.parquet: required column 'code' is missing") as err:
        list(iter_shards(tmp_path))
    assert str(path) in str(err.value) and "MEDS 0.3 / 0.4" in str(err.value)


def test_old_patient_id_schema_is_explained(tmp_path):
    path = _write_shard(tmp_path, _events().rename({"subject_id": "patient_id"}))
    with pytest.raises(MEDSValidationError) as err:
        list(iter_shards(tmp_path))
    msg = str(err.value)
    assert str(path) in msg and "'patient_id'" in msg and "MEDS >= 0.3" in msg and "subject_id" in msg


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("subject_id", ["abc"] * 9),
        ("subject_id", ["17"] * 9),
        ("time", ["2020-01-01"] * 9),
        ("numeric_value", ["1.0"] * 9),
    ],
)
def test_uncastable_dtype_names_column(tmp_path, column, values):
    path = _write_shard(tmp_path, _events().with_columns(pl.Series(column, values)))
    with pytest.raises(MEDSValidationError, match=f"column '{column}' has dtype String") as err:
        list(iter_shards(tmp_path))
    assert str(path) in str(err.value)


def test_null_subject_id(tmp_path):
    df = _events().with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(None).otherwise(pl.col("subject_id")).alias("subject_id")
    )
    path = _write_shard(tmp_path, df)
    with pytest.raises(
        MEDSValidationError, match=r"column 'subject_id' has 1 null value\(s\) \(first at row 4\)"
    ) as err:
        list(iter_shards(tmp_path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("bad_code", [None, "", "  "])
def test_null_or_empty_code_names_subject(tmp_path, bad_code):
    df = _events().with_columns(
        pl.when(pl.int_range(pl.len()) == 6)
        .then(pl.lit(bad_code, dtype=pl.String))
        .otherwise(pl.col("code"))
        .alias("code")
    )
    path = _write_shard(tmp_path, df)
    with pytest.raises(MEDSValidationError, match="column 'code' has 1 null or empty value") as err:
        list(iter_shards(tmp_path))
    assert str(path) in str(err.value) and "subject_id 2" in str(err.value)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, 1e300])
def test_infinite_value_names_subject(tmp_path, bad):
    df = _events().with_columns(pl.col("numeric_value").cast(pl.Float64))
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 5)
        .then(bad)
        .otherwise(pl.col("numeric_value"))
        .alias("numeric_value")
    )
    path = _write_shard(tmp_path, df)
    with pytest.raises(
        MEDSValidationError, match="column 'numeric_value' has an infinite value for subject_id 2"
    ) as e:
        list(iter_shards(tmp_path))
    assert str(path) in str(e.value)


def test_nan_value_means_no_value():
    df = _events().with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(float("nan"))
        .otherwise(pl.col("numeric_value"))
        .alias("numeric_value")
    )
    got = validate_events(df)
    assert got["numeric_value"].is_nan().sum() == 0
    assert (
        got["numeric_value"][3] is None
        and got["numeric_value"].null_count() == _events()["numeric_value"].null_count() + 1
    )


def test_unsorted_times_are_sorted_stably():
    df = pl.DataFrame(
        {
            "subject_id": [2, 1, 1, 1, 1],
            "time": [T0, T0 + dt.timedelta(hours=5), T0, None, T0],
            "code": ["E", "C", "A", "S", "B"],
        }
    )
    got = validate_events(df)
    assert got["subject_id"].to_list() == [1, 1, 1, 1, 2]
    assert got["code"].to_list() == ["S", "A", "B", "C", "E"]  # static first; A before B (file order kept)


def test_unsorted_shard_is_sorted_with_one_warning_naming_file_and_count(tmp_path, caplog):
    import logging

    meds_dir = write_meds(tmp_path / "meds", _events(), _splits())
    shard = sorted((meds_dir / "data").glob("**/*.parquet"))[0]
    frame = pl.read_parquet(shard)
    frame.reverse().write_parquet(shard)  # rows in reverse: out of order
    with caplog.at_level(logging.WARNING, logger="ehr_transformer.data.meds"):
        (_, events), *_ = list(iter_shards(meds_dir))
    assert events.equals(validate_events(frame))
    warnings = [r.getMessage() for r in caplog.records if "not sorted" in r.getMessage()]
    assert len(warnings) == 1
    out_of_order = meds._rows_out_of_order(frame.reverse())
    assert (
        out_of_order > 0
        and str(shard) in warnings[0]
        and f"{out_of_order} of {frame.height} rows" in warnings[0]
    )
    caplog.clear()
    frame.write_parquet(shard)  # sorted: no warning
    with caplog.at_level(logging.WARNING, logger="ehr_transformer.data.meds"):
        list(iter_shards(meds_dir))
        read_events(meds_dir)
    assert "not sorted" not in caplog.text


def test_time_zone_aware_event_times_are_refused_not_converted(tmp_path):
    aware = _events().with_columns(pl.col("time").dt.replace_time_zone("America/New_York"))
    with pytest.raises(MEDSValidationError, match="column 'time' is time-zone aware") as err:
        validate_events(aware, source="shard_0.parquet")
    assert "shard_0.parquet" in str(err.value) and ".dt.replace_time_zone(None)" in str(err.value)
    meds_dir = write_meds(tmp_path / "meds", _events(), _splits())
    shard = sorted((meds_dir / "data").glob("**/*.parquet"))[0]
    pl.read_parquet(shard).with_columns(pl.col("time").dt.replace_time_zone("UTC")).write_parquet(shard)
    with pytest.raises(MEDSValidationError, match=f"{shard}: column 'time' is time-zone aware"):
        list(iter_shards(meds_dir))


def test_duplicate_rows_are_kept():
    df = pl.concat([_events(), _events().head(2)])
    assert validate_events(df).height == _events().height + 2


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(9))))
def test_row_order_does_not_matter(perm):
    """Any permutation of rows with distinct (subject, time, code) validates to the same sorted frame."""
    df = _events()
    assert validate_events(df[list(perm)]).equals(validate_events(df))


# ------------------------------------------------------------------------------------------- labels, splits


def test_labels_missing_value_column(tmp_path):
    path = tmp_path / "labels" / "task.parquet"
    path.parent.mkdir()
    _labels().drop("boolean_value").write_parquet(path)
    with pytest.raises(MEDSValidationError, match="no label value column") as err:
        read_labels(path)
    assert str(path) in str(err.value) and "boolean_value" in str(err.value)


def test_labels_need_exactly_one_value_per_row():
    two = _labels().with_columns(pl.Series("float_value", [0.5, None]))
    with pytest.raises(MEDSValidationError, match="give 2 values for subject_id 1") as err:
        validate_labels(two, source="labels/x.parquet")
    assert "labels/x.parquet" in str(err.value) and "boolean_value/float_value" in str(err.value)
    none = _labels().with_columns(pl.Series("boolean_value", [True, None]))
    with pytest.raises(MEDSValidationError, match="give no value for subject_id 3"):
        validate_labels(none)
    no_time = _labels().with_columns(pl.Series("prediction_time", [None, T0], dtype=pl.Datetime("us")))
    with pytest.raises(MEDSValidationError, match="column 'prediction_time' is null for subject_id 1"):
        validate_labels(no_time)
    ok = validate_labels(
        _labels().drop("boolean_value").with_columns(pl.Series("integer_value", [0, 2], dtype=pl.Int32))
    )
    assert ok.columns == list(meds_labels.LABEL_SCHEMA) and ok["integer_value"].dtype == pl.Int64


def test_splits_are_validated(tmp_path):
    # MEDS allows any split name; a null or empty one is refused
    any_name = meds.validate_subject_splits(pl.DataFrame({"subject_id": [1, 2], "split": ["train", "test"]}))
    assert any_name["split"].to_list() == ["train", "test"]
    with pytest.raises(MEDSValidationError, match="null or empty for subject_id 2"):
        meds.validate_subject_splits(pl.DataFrame({"subject_id": [1, 2], "split": ["train", " "]}))
    with pytest.raises(MEDSValidationError, match="subject_id 1 more than once"):
        meds.validate_subject_splits(pl.DataFrame({"subject_id": [1, 1], "split": ["train", "tuning"]}))
    with pytest.raises(MEDSValidationError, match="subject_id 3 has events but is not in subject_splits"):
        write_meds(tmp_path / "meds", _events(), _splits().filter(pl.col("subject_id") != 3))
    assert not (tmp_path / "meds").exists()


# ------------------------------------------------------------------------------------------- atomic writes


def test_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    calls = []

    def failing(df, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        path.parent.mkdir(parents=True, exist_ok=True)
        df.write_parquet(path)

    monkeypatch.setattr(meds_writer, "_write_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        write_meds(tmp_path / "meds", _events(), _splits(), {"mortality": _labels()})
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept_unless_overwrite(tmp_path, monkeypatch):
    out = write_meds(tmp_path / "meds", _events(), _splits())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_meds(out, _events().filter(pl.col("subject_id") == 1), _splits())
    assert read_events(out).equals(_events())

    real = meds_writer._write_parquet

    def fail_on_metadata(df, path):
        if path.name == "codes.parquet":
            raise OSError("boom")
        real(df, path)

    monkeypatch.setattr(meds_writer, "_write_parquet", fail_on_metadata)
    with pytest.raises(OSError, match="boom"):
        write_meds(out, _events().filter(pl.col("subject_id") == 1), _splits(), overwrite=True)
    assert read_events(out).equals(_events())  # the old folder survives a failed overwrite
    monkeypatch.setattr(meds_writer, "_write_parquet", real)

    write_meds(out, _events().filter(pl.col("subject_id") == 1), _splits(), overwrite=True)
    assert read_events(out)["subject_id"].unique().to_list() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meds"]


def test_writer_rejects_subject_spanning_shards(tmp_path):
    with pytest.raises(MEDSValidationError, match="subject_id 1 spans several shards"):
        with meds_writer.MEDSWriter(tmp_path / "meds") as writer:
            writer.write_shard(_events().filter(pl.col("subject_id") == 1).head(2), "train")
            writer.write_shard(_events().filter(pl.col("subject_id") == 1).tail(2), "train")
            writer.commit(_splits())
    assert list(tmp_path.iterdir()) == []


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MEDS shards found"):
        list(iter_shards(tmp_path))


def test_iter_shards_with_subject_ids_skips_other_shards_and_filters(tmp_path):
    """Building one split reads only the shards that hold its subjects, and only their events."""
    from ehr_transformer.data.synthetic import generate_synthetic_cohort

    cohort = generate_synthetic_cohort(n_subjects=60, seed=1)
    root = meds_writer.write_meds(tmp_path / "meds", cohort.events, cohort.splits, n_shards=1)
    held_out = cohort.splits.filter(pl.col("split") == "held_out")["subject_id"].to_list()
    shards = list(meds.iter_shards(root, subject_ids=held_out))
    assert len(shards) == 1 and "held_out" in str(shards[0][0])
    assert set(shards[0][1]["subject_id"].unique().to_list()) == set(held_out)
    expected = meds.read_events(root, subject_ids=held_out)
    assert shards[0][1].equals(expected)
