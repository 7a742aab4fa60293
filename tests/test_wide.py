"""YAIB/ricu wide tables -> MEDS: round trip, no future leakage, clear errors, real eICU demo cohort."""

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehr_transformer.data.labels import read_labels
from ehr_transformer.data.meds import read_events
from ehr_transformer.data.splits import read_subject_splits
from ehr_transformer.data.wide import WideTableError, convert_wide, make_subject_splits, wide_to_meds

ANCHOR = datetime(2000, 1, 1)
YAIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "yaib_demo"
H = 3_600_000  # ms per hour


def _dyn(hours=3):
    return pl.DataFrame(
        {
            "stay_id": [10] * hours + [20] * hours,
            "time": [h * H for h in range(hours)] * 2,
            "hr": [80.0, None, 90.0, 70.0, 71.0, None][: 2 * hours],
            "crea": [None, 1.2, None, None, None, 2.0][: 2 * hours],
        },
        schema={"stay_id": pl.Int32, "time": pl.Duration("ms"), "hr": pl.Float64, "crea": pl.Float64},
    )


def _sta():
    return pl.DataFrame(
        {
            "stay_id": [10, 20],
            "age": [60.0, None],
            "sex": ["Male", None],
            "height": [180.0, None],
            "weight": [80.0, 70.0],
        },
        schema={
            "stay_id": pl.Int32,
            "age": pl.Float64,
            "sex": pl.String,
            "height": pl.Float64,
            "weight": pl.Float64,
        },
    )


def _outc_mort():
    return pl.DataFrame(
        {"stay_id": [10, 20], "label": [0, 1]}, schema={"stay_id": pl.Int32, "label": pl.Int32}
    )


def test_round_trip_mortality24():
    dyn = _dyn()
    events, labels = wide_to_meds(dyn, _sta(), _outc_mort(), prediction_hours=24, anchor=ANCHOR)
    measured = events.filter(pl.col("code").is_in(["YAIB//hr", "YAIB//crea"]))
    n_values = sum(dyn[c].is_not_null().sum() for c in ("hr", "crea"))
    assert measured.height == n_values  # every non-null value is exactly one event
    expected = {
        (10, ANCHOR, "YAIB//hr", 80.0),
        (10, ANCHOR + timedelta(hours=1), "YAIB//crea", 1.2),
        (10, ANCHOR + timedelta(hours=2), "YAIB//hr", 90.0),
        (20, ANCHOR, "YAIB//hr", 70.0),
        (20, ANCHOR + timedelta(hours=1), "YAIB//hr", 71.0),
        (20, ANCHOR + timedelta(hours=2), "YAIB//crea", 2.0),
    }
    got = {
        (s, t, c, round(float(v), 4))
        for s, t, c, v in measured.select("subject_id", "time", "code", "numeric_value").iter_rows()
    }
    assert got == expected
    static = events.filter(pl.col("time").is_null())
    assert set(static.select("subject_id", "code").iter_rows()) == {
        (10, "SEX//Male"),
        (10, "YAIB//height"),
        (10, "YAIB//weight"),
        (20, "YAIB//weight"),
    }
    birth = events.filter(pl.col("code") == "MEDS_BIRTH")
    assert birth["subject_id"].to_list() == [10]  # no age -> no birth event
    age = (ANCHOR - birth["time"][0]).total_seconds() / (365.25 * 86400)
    assert age == pytest.approx(60.0, abs=1e-6)
    assert events.schema["numeric_value"] == pl.Float32 and events.schema["subject_id"] == pl.Int64
    assert labels["prediction_time"].to_list() == [ANCHOR + timedelta(hours=24)] * 2
    assert labels["boolean_value"].to_list() == [False, True]


def test_los_labels_see_no_future():
    dyn = _dyn()
    outc = dyn.select("stay_id", "time", pl.Series("label", [3.0, 2.0, 1.0, 5.0, 4.0, 3.0]))
    events, labels = wide_to_meds(dyn, _sta(), outc, anchor=ANCHOR)
    assert labels.height == 6 and labels["float_value"].to_list() == [3.0, 2.0, 1.0, 5.0, 4.0, 3.0]
    assert labels["prediction_time"].to_list()[:3] == [ANCHOR + timedelta(hours=h) for h in range(3)]
    # visible history = events at or before prediction_time: contains that hour's row and nothing later
    for subject, pt in labels.select("subject_id", "prediction_time").iter_rows():
        visible = events.filter((pl.col("subject_id") == subject) & (pl.col("time") <= pt))
        assert visible["time"].max() <= pt
        same_hour = dyn.filter((pl.col("stay_id") == subject) & (pl.col("time") == pt - ANCHOR))
        n_same = sum(same_hour[c].is_not_null().sum() for c in ("hr", "crea"))
        assert visible.filter(pl.col("time") == pt).height == n_same


def test_errors_name_file_column_and_stay():
    src = {"dyn": "cohort/dyn.parquet", "sta": "cohort/sta.parquet", "outc": "cohort/outc.parquet"}
    with pytest.raises(WideTableError, match=r"cohort/dyn.parquet: column 'stay_id'.*missing"):
        wide_to_meds(_dyn().drop("stay_id"), _sta(), _outc_mort(), sources=src)
    bad = _dyn().with_columns(pl.col("hr").cast(pl.String))
    with pytest.raises(WideTableError, match=r"cohort/dyn.parquet: column 'hr'.*numeric"):
        wide_to_meds(bad, _sta(), _outc_mort(), sources=src)
    dup = pl.concat(
        [_dyn(), _dyn().filter((pl.col("stay_id") == 20) & (pl.col("time") == pl.duration(hours=1)))]
    )
    with pytest.raises(
        WideTableError, match=r"cohort/dyn.parquet: column 'stay_id, time': stay_id 20.*duplicated"
    ):
        wide_to_meds(dup, _sta(), _outc_mort(), sources=src)
    with pytest.raises(WideTableError, match=r"cohort/outc.parquet: column 'label'.*missing"):
        wide_to_meds(_dyn(), _sta(), _outc_mort().rename({"label": "y"}), sources=src)
    orphan = pl.DataFrame({"stay_id": [10, 20, 30], "label": [0, 1, 0]})
    with pytest.raises(WideTableError, match=r"cohort/outc.parquet: column 'stay_id': stay_id 30"):
        wide_to_meds(_dyn(), _sta(), orphan, sources=src, prediction_hours=24)
    with pytest.raises(WideTableError, match="per-time outcome: the prediction times are its time column"):
        wide_to_meds(
            _dyn(), _sta(), _dyn().select("stay_id", "time", pl.lit(1.0).alias("label")), prediction_hours=24
        )
    with pytest.raises(WideTableError, match=r"cohort/outc.parquet: column 'label': .*prediction_hours"):
        wide_to_meds(_dyn(), _sta(), _outc_mort(), sources=src)


def test_convert_wide_writes_meds(tmp_path):
    paths = {}
    for name, df in {"dyn": _dyn(), "sta": _sta(), "outc": _outc_mort()}.items():
        paths[name] = tmp_path / f"{name}.parquet"
        df.write_parquet(paths[name])
    summary = convert_wide(paths["dyn"], paths["sta"], paths["outc"], tmp_path / "meds", task="mortality24")
    assert summary["n_subjects"] == 2 and summary["n_labels"] == 2 and summary["n_positive"] == 1
    assert read_events(tmp_path / "meds").height == summary["n_events"]
    assert read_labels(tmp_path / "meds" / "labels" / "mortality24.parquet").height == 2
    assert set(read_subject_splits(tmp_path / "meds")["subject_id"].to_list()) == {10, 20}


def test_stratified_splits():
    ids = np.arange(1000)
    labels = pl.DataFrame({"subject_id": ids, "boolean_value": ids % 10 == 0})
    splits = make_subject_splits(ids, labels, seed=0)
    counts = dict(splits.group_by("split").len().iter_rows())
    assert counts == {"train": 700, "tuning": 150, "held_out": 150}
    positives = splits.join(labels, on="subject_id").group_by("split").agg(pl.col("boolean_value").sum())
    assert dict(positives.iter_rows()) == {"train": 70, "tuning": 15, "held_out": 15}
    assert splits.equals(make_subject_splits(ids, labels, seed=0))


def test_real_eicu_demo_mortality24(tmp_path):
    cohort = YAIB / "mortality24" / "eicu_demo"
    if not (cohort / "dyn.parquet").is_file():
        pytest.skip(
            f"real YAIB demo data not found at {cohort} (it lives in ../shared/data, outside the repo)"
        )
    summary = convert_wide(
        cohort / "dyn.parquet",
        cohort / "sta.parquet",
        cohort / "outc.parquet",
        tmp_path / "meds",
        task="mortality24",
    )
    assert summary["n_subjects"] == 1367 and summary["n_labels"] == 1367 and summary["n_positive"] == 70
    dyn = pl.read_parquet(cohort / "dyn.parquet")
    n_values = sum(dyn.height - dyn[c].null_count() for c in dyn.columns if c not in ("stay_id", "time"))
    events = read_events(tmp_path / "meds")
    assert events.filter(pl.col("time") >= ANCHOR).height == n_values
    assert events.filter(pl.col("time") > ANCHOR + timedelta(hours=24)).height == 0  # all visible at 24 h
