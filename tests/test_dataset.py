import datetime as dt
import logging
import math

import polars as pl
import pytest

from ehr_transformer.data.dataset import build_labeled_dataset, build_pretraining_dataset, build_stats
from ehr_transformer.data.writer import write_meds
from ehr_transformer.tokenization_ehr import EHREventTokenizer

SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
LABEL_SCHEMA = {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
T0 = dt.datetime(2021, 3, 1)
SECOND = dt.timedelta(seconds=1)


def hours(h: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=h)


def make_cohort(n_subjects: int = 12) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Small cohort: subjects 0..n-1; split by subject_id % 3 (train / tuning / held_out)."""
    rows = []
    for s in range(n_subjects):
        rows += [
            (s, None, "SEX//F", None),
            (s, dt.datetime(1950, 1, 1), "MEDS_BIRTH", None),
            (s, hours(0), "ADMISSION", None),
            (s, hours(24), "AT_PREDICTION_TIME", 1.0),
            (s, hours(24) + SECOND, "ONE_SECOND_LATE", 2.0),
            (s, hours(48), "MEDS_DEATH", None),
        ]
    events = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    splits = pl.DataFrame(
        {
            "subject_id": list(range(n_subjects)),
            "split": [("train", "tuning", "held_out")[s % 3] for s in range(n_subjects)],
        }
    )
    return events, splits


@pytest.fixture(scope="module")
def meds_dir(tmp_path_factory):
    events, splits = make_cohort()
    # subject 99 is in train but has no events
    splits = pl.concat([splits, pl.DataFrame({"subject_id": [99], "split": ["train"]})])
    return write_meds(tmp_path_factory.mktemp("meds") / "cohort", events, splits, n_shards=2)


@pytest.fixture(scope="module")
def tokenizer():
    events, splits = make_cohort()
    train = events.join(splits.filter(pl.col("split") == "train"), on="subject_id", how="semi")
    return EHREventTokenizer.fit(train, min_code_count=1, max_length=32)


def test_pretraining_dataset_one_row_per_subject_of_split(meds_dir, tokenizer, tmp_path):
    ds = build_pretraining_dataset(meds_dir, tokenizer, split="train", cache_dir=tmp_path)
    assert set(ds.column_names) == {"subject_id", "input_ids", "values", "times", "ages", "length"}
    assert sorted(ds["subject_id"]) == [s for s in range(12) if s % 3 == 0]
    row = ds[0]
    assert row["input_ids"][0] == tokenizer.cls_token_id and row["length"] == len(row["input_ids"]) == 6
    assert math.isnan(row["values"][0])
    stats = build_stats(ds)
    assert stats["n_subjects_in_split"] == 5 and stats["n_samples"] == 4 and stats["n_dropped_no_events"] == 1
    # second call hits the cache; another tokenizer does not
    again = build_pretraining_dataset(meds_dir, tokenizer, split="train", cache_dir=tmp_path)
    assert again["input_ids"] == ds["input_ids"]
    other = EHREventTokenizer(tokenizer.ids_to_codes[:5], max_length=3)
    short = build_pretraining_dataset(meds_dir, other, split="train", cache_dir=tmp_path)
    assert max(short["length"]) == 3


def test_other_splits_respected(meds_dir, tokenizer, tmp_path):
    for split, remainder in (("tuning", 1), ("held_out", 2)):
        ds = build_pretraining_dataset(meds_dir, tokenizer, split=split, cache_dir=tmp_path)
        assert ds.num_rows == 4 and all(s % 3 == remainder for s in ds["subject_id"])


def test_label_time_cutoff(meds_dir, tokenizer, tmp_path):
    labels = pl.DataFrame(
        {
            "subject_id": [0, 3],
            "prediction_time": [hours(24), hours(24) - SECOND],
            "boolean_value": [True, False],
        },
        schema=LABEL_SCHEMA,
    )
    ds = build_labeled_dataset(meds_dir, labels, tokenizer, split="train", cache_dir=tmp_path)
    assert set(ds.column_names) == {
        "subject_id",
        "prediction_time",
        "input_ids",
        "values",
        "times",
        "ages",
        "labels",
        "length",
    }
    late, at_time, death = (
        tokenizer.vocab[c] for c in ("ONE_SECOND_LATE", "AT_PREDICTION_TIME", "MEDS_DEATH")
    )
    rows = {r["subject_id"]: r for r in ds}
    for row in rows.values():
        assert late not in row["input_ids"] and death not in row["input_ids"]
    assert at_time in rows[0]["input_ids"]  # exactly at prediction_time: kept
    assert at_time not in rows[3]["input_ids"]  # one second after prediction_time: gone
    assert rows[0]["labels"] == 1.0 and rows[3]["labels"] == 0.0
    assert ds.features["labels"].dtype == "float32"


def test_splits_respected_and_drops_counted(meds_dir, tokenizer, tmp_path, caplog):
    labels = pl.DataFrame(
        {
            "subject_id": [0, 1, 2, 3, 99, 6, 500],
            "prediction_time": [hours(30), hours(30), hours(30), hours(30), hours(30), hours(-5), hours(30)],
            "boolean_value": [True, False, True, False, True, True, False],
        },
        schema=LABEL_SCHEMA,
    )
    with caplog.at_level(logging.WARNING, logger="ehr_transformer.data.dataset"):
        ds = build_labeled_dataset(meds_dir, labels, tokenizer, split="train", cache_dir=tmp_path)
    assert sorted(ds["subject_id"]) == [
        0,
        3,
        6,
    ]  # 1, 2 belong to other splits; 99 has no events; 500 no split
    stats = build_stats(ds)
    assert stats["n_labels_other_split"] == 2
    assert stats["n_labels_subject_without_split"] == 1
    assert stats["n_dropped_subject_not_in_data"] == 1
    # subject 6's label at -5 h precedes every timed event: only static events remain, which is kept
    assert stats["n_dropped_no_events_before_prediction_time"] == 0
    assert stats["n_samples"] == 3
    assert "subject without events" in caplog.text
    sample6 = next(r for r in ds if r["subject_id"] == 6)
    assert tokenizer.convert_ids_to_codes(sample6["input_ids"]) == ["[CLS]", "SEX//F"]


def test_label_without_any_event_before_prediction_time_is_dropped(tmp_path, tokenizer):
    events = pl.DataFrame(
        [(0, hours(5), "ADMISSION", None), (1, hours(0), "ADMISSION", None)], schema=SCHEMA, orient="row"
    )
    splits = pl.DataFrame({"subject_id": [0, 1], "split": ["train", "train"]})
    meds = write_meds(tmp_path / "m", events, splits)
    labels = pl.DataFrame(
        {"subject_id": [0, 1], "prediction_time": [hours(1), hours(1)], "integer_value": [2, 3]}
    )
    ds = build_labeled_dataset(meds, labels, tokenizer, cache_dir=tmp_path / "cache")
    # integer labels 2 and 3 are a multi-class task: stored as class indices of the sorted classes ["2", "3"]
    assert ds["subject_id"] == [1] and ds["labels"] == [1]
    assert ds.features["labels"].dtype == "int64"
    assert build_stats(ds)["n_dropped_no_events_before_prediction_time"] == 1


def test_labels_from_path_and_label_column_check(meds_dir, tokenizer, tmp_path):
    labels = pl.DataFrame({"subject_id": [0], "prediction_time": [hours(30)], "float_value": [2.5]})
    path = tmp_path / "task.parquet"
    labels.write_parquet(path)
    ds = build_labeled_dataset(meds_dir, path, tokenizer, cache_dir=tmp_path / "cache")
    assert ds["labels"] == [2.5]
    with pytest.raises(ValueError, match="label_column"):
        build_labeled_dataset(meds_dir, path, tokenizer, label_column="text_value", cache_dir=tmp_path / "c2")


def test_multitask_labels_joined_with_nan_where_a_task_has_none(meds_dir, tokenizer, tmp_path):
    from ehr_transformer.data.dataset import join_task_labels

    death = pl.DataFrame(
        {"subject_id": [0, 3], "prediction_time": [hours(30), hours(30)], "boolean_value": [True, False]}
    )
    stay = pl.DataFrame(
        {"subject_id": [0, 6], "prediction_time": [hours(30), hours(30)], "float_value": [2.5, 4.0]}
    )
    joined, names, types = join_task_labels({"death": death, "stay": stay})
    assert names == ["death", "stay"] and types == ["binary", "regression"] and joined.height == 3
    ds = build_labeled_dataset(meds_dir, {"death": death, "stay": stay}, tokenizer, cache_dir=tmp_path / "c")
    assert build_stats(ds)["tasks"] == ["death", "stay"]
    rows = {s: labels for s, labels in zip(ds["subject_id"], ds["labels"], strict=True)}
    assert rows[0] == [1.0, 2.5]
    assert rows[3][0] == 0.0 and math.isnan(rows[3][1])
    assert math.isnan(rows[6][0]) and rows[6][1] == 4.0
    twice = pl.concat([death, death])
    with pytest.raises(ValueError, match="subject_id 0 .* prediction_time"):
        join_task_labels({"death": twice, "stay": stay})


def test_drop_warnings_are_emitted_again_when_the_dataset_comes_from_the_cache(
    meds_dir, tokenizer, tmp_path, caplog
):
    labels = pl.DataFrame(
        {"subject_id": [0, 99], "prediction_time": [hours(30), hours(30)], "boolean_value": [True, False]},
        schema=LABEL_SCHEMA,
    )
    with caplog.at_level(logging.WARNING, logger="ehr_transformer.data.dataset"):
        first = build_labeled_dataset(meds_dir, labels, tokenizer, split="train", cache_dir=tmp_path)
    built = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert built and "subject without events" in built[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ehr_transformer.data.dataset"):
        again = build_labeled_dataset(meds_dir, labels, tokenizer, split="train", cache_dir=tmp_path)
    assert "loaded cached" in caplog.text
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == built
    assert build_stats(again) == build_stats(first)
    # the same usable rows (same cache) plus rows of a subject without a split: that warning is this call's
    caplog.clear()
    more = pl.concat([labels, labels.with_columns(pl.lit(500, dtype=pl.Int64).alias("subject_id"))])
    with caplog.at_level(logging.INFO, logger="ehr_transformer.data.dataset"):
        third = build_labeled_dataset(meds_dir, more, tokenizer, split="train", cache_dir=tmp_path)
    assert "loaded cached" in caplog.text
    assert "2 label rows belong to subjects absent from subject_splits" in caplog.text
    assert (
        build_stats(third)["n_labels_total"] == 4
        and build_stats(third)["n_labels_subject_without_split"] == 2
    )
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == built


def test_prediction_times_before_birth_or_first_event_are_counted_and_warned(
    meds_dir, tokenizer, tmp_path, caplog
):
    labels = pl.DataFrame(
        {
            "subject_id": [0, 3, 6],
            # before MEDS_BIRTH (1950); before the first timed event (ADMISSION at T0, birth aside); fine
            "prediction_time": [dt.datetime(1940, 1, 1), dt.datetime(1960, 1, 1), hours(30)],
            "boolean_value": [True, False, True],
        },
        schema=LABEL_SCHEMA,
    )
    with caplog.at_level(logging.WARNING, logger="ehr_transformer.data.dataset"):
        ds = build_labeled_dataset(meds_dir, labels, tokenizer, split="train", cache_dir=tmp_path)
    stats = build_stats(ds)
    assert stats["n_prediction_time_before_birth"] == 1
    # both precede the first timed event other than MEDS_BIRTH (ADMISSION)
    assert stats["n_prediction_time_before_first_event"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("before the subject's MEDS_BIRTH" in m for m in messages) == 1
    assert any(
        "1 of 3 label rows have a prediction_time before the subject's MEDS_BIRTH" in m for m in messages
    )


def test_no_usable_row_stops_with_the_counts(meds_dir, tokenizer, tmp_path):
    from ehr_transformer.data.dataset import NoUsableRowsError

    labels = pl.DataFrame(
        {
            "subject_id": [99, 500, 1],
            "prediction_time": [hours(30)] * 3,
            "boolean_value": [True, False, True],
        },
        schema=LABEL_SCHEMA,
    )
    path = tmp_path / "absent.parquet"
    labels.write_parquet(path)
    for _ in range(2):  # built, then from the cache
        with pytest.raises(NoUsableRowsError) as err:
            build_labeled_dataset(meds_dir, path, tokenizer, split="train", cache_dir=tmp_path / "c")
        message = str(err.value)
        assert message.startswith(f"{path}: no usable label row is left in split 'train'")
        assert "3 rows read, 2 not in split 'train'" in message
        assert "1 of subjects not in the data" in message and "0 with no event at or before" in message


def test_split_none_uses_every_subject_without_a_splits_file(tmp_path, tokenizer):
    events, _ = make_cohort(4)
    meds = write_meds(
        tmp_path / "m", events, pl.DataFrame({"subject_id": [0, 1, 2, 3], "split": ["a", "b", "c", "d"]})
    )
    labels = pl.DataFrame(
        {"subject_id": [0, 1, 2, 3, 7], "prediction_time": [hours(30)] * 5, "boolean_value": [True] * 5},
        schema=LABEL_SCHEMA,
    )
    # any split name of the data
    assert build_labeled_dataset(meds, labels, tokenizer, split="c", cache_dir=tmp_path / "c")[
        "subject_id"
    ] == [2]
    (meds / "metadata" / "subject_splits.parquet").unlink()
    for split in (None, ""):
        ds = build_labeled_dataset(meds, labels, tokenizer, split=split, cache_dir=tmp_path / "c")
        assert sorted(ds["subject_id"]) == [0, 1, 2, 3]
        assert build_stats(ds)["n_dropped_subject_not_in_data"] == 1
    assert build_pretraining_dataset(meds, tokenizer, split=None, cache_dir=tmp_path / "c")["subject_id"] == [
        0,
        1,
        2,
        3,
    ]
    with pytest.raises(FileNotFoundError, match="pass --split ''"):
        build_labeled_dataset(meds, labels, tokenizer, split="held_out", cache_dir=tmp_path / "c")
