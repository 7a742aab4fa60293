"""Labels in: a file, a folder of label shards (as ACES writes them), a glob, `--task NAME=PATH`, the MEDS 0.4
label schema (all value columns, null or not) and the refusal of time-zone aware prediction times."""

import datetime as dt

import polars as pl
import pytest

from ehr_transformer.data.labels import label_sources, parse_tasks, read_labels, validate_labels
from ehr_transformer.data.meds import MEDSValidationError

T0 = dt.datetime(2021, 3, 1)

# as ACES and the `meds` label schema write them: every value column present, the unused ones all null
ACES_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean,
    "integer_value": pl.Int64,
    "float_value": pl.Float64,
    "categorical_value": pl.String,
}


def aces_frame(subjects, values) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": subjects,
            "prediction_time": [T0 + dt.timedelta(hours=s) for s in subjects],
            "boolean_value": values,
            "integer_value": [None] * len(subjects),
            "float_value": [None] * len(subjects),
            "categorical_value": [None] * len(subjects),
        },
        schema=ACES_SCHEMA,
    )


def test_file_folder_of_nested_shards_and_glob_read_the_same_rows(tmp_path):
    whole = aces_frame([1, 2, 3, 4], [True, False, True, False])
    whole.write_parquet(tmp_path / "task.parquet")
    folder = tmp_path / "aces_out"
    (folder / "train").mkdir(parents=True)
    (folder / "held_out" / "0").mkdir(parents=True)
    whole.slice(0, 2).write_parquet(folder / "train" / "0.parquet")
    whole.slice(2, 2).write_parquet(folder / "held_out" / "0" / "1.parquet")
    from_file = read_labels(tmp_path / "task.parquet")
    assert from_file.columns == list(ACES_SCHEMA)
    assert read_labels(folder).equals(from_file)
    assert read_labels(str(folder / "**" / "*.parquet")).equals(from_file)
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        (tmp_path / "empty").mkdir()
        read_labels(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no label file matches"):
        read_labels(str(tmp_path / "nothing" / "*.parquet"))


def test_a_bad_shard_of_a_folder_is_named(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    aces_frame([1], [True]).write_parquet(folder / "a.parquet")
    two = aces_frame([2], [True]).with_columns(pl.lit(3, dtype=pl.Int64).alias("integer_value"))
    two.write_parquet(folder / "b.parquet")
    with pytest.raises(MEDSValidationError, match=r"b\.parquet: .*2 values for subject_id 2"):
        read_labels(folder)


def test_meds_04_label_schema_all_value_columns_null_or_not():
    # columns of dtype Null (an all-null column written without a type) are read as the schema's type
    frame = pl.DataFrame(
        {
            "subject_id": [1, 2],
            "prediction_time": [T0, T0],
            "boolean_value": [None, None],
            "integer_value": [None, None],
            "float_value": [1.5, 2.5],
            "categorical_value": [None, None],
        }
    )
    out = validate_labels(frame)
    assert dict(out.schema) == ACES_SCHEMA
    assert out["float_value"].to_list() == [1.5, 2.5]
    categorical = frame.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("float_value"), pl.lit("a").alias("categorical_value")
    )
    assert validate_labels(categorical)["categorical_value"].to_list() == ["a", "a"]
    with pytest.raises(MEDSValidationError, match="2 values for subject_id 1"):
        validate_labels(frame.with_columns(pl.lit("a").alias("categorical_value")))
    with pytest.raises(MEDSValidationError, match="no value for subject_id 1"):
        validate_labels(frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("float_value")))


def test_categorical_labels_are_a_multiclass_task_with_named_classes(tmp_path):
    from ehr_transformer.data.labels import _resolve_label_column, infer_task_type, label_classes

    frame = validate_labels(
        pl.DataFrame(
            {
                "subject_id": [1, 2, 3],
                "prediction_time": [T0] * 3,
                "categorical_value": ["sepsis", "none", "sepsis"],
            }
        )
    )
    column = _resolve_label_column(frame, None)
    assert column == "categorical_value" and infer_task_type(frame, column) == "multiclass"
    assert label_classes(frame, column) == ["none", "sepsis"]


def test_prediction_times_without_labels_only_when_asked(tmp_path):
    times = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [T0, T0]})
    times.write_parquet(tmp_path / "times.parquet")
    with pytest.raises(MEDSValidationError, match="no label value column"):
        read_labels(tmp_path / "times.parquet")
    out = read_labels(tmp_path / "times.parquet", require_value=False)
    assert out.height == 2 and out["boolean_value"].null_count() == 2


def test_time_zone_aware_prediction_time_is_refused_with_the_conversion(tmp_path):
    aware = aces_frame([1], [True]).with_columns(
        pl.col("prediction_time").dt.replace_time_zone("Europe/Paris")
    )
    aware.write_parquet(tmp_path / "aware.parquet")
    with pytest.raises(MEDSValidationError) as err:
        read_labels(tmp_path / "aware.parquet")
    message = str(err.value)
    assert "aware.parquet" in message and "'prediction_time'" in message
    assert ".dt.convert_time_zone(" in message and ".dt.replace_time_zone(None)" in message


def test_several_tasks_are_named_never_split_on_commas(tmp_path):
    with pytest.raises(ValueError, match="contains a comma.*--task NAME=PATH"):
        label_sources("a.parquet,b.parquet")
    assert label_sources(None, ["death=a.parquet", "stay=labels/stay/"]) == {
        "death": "a.parquet",
        "stay": "labels/stay/",
    }
    assert list(label_sources(str(tmp_path / "mortality.parquet"))) == ["mortality"]
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_tasks(["a.parquet"])
    with pytest.raises(ValueError, match="twice"):
        parse_tasks(["a=x", "a=y"])
    with pytest.raises(ValueError, match="--task NAME="):
        label_sources(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="not both"):
        label_sources("a.parquet", ["b=b.parquet"])


def test_hf_argument_parser_gives_task_as_a_list():
    from transformers import HfArgumentParser

    from ehr_transformer.training.arguments import DataArguments

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        args=["--data_dir", "m", "--task", "a=x.parquet", "b=y"]
    )
    assert args.task == ["a=x.parquet", "b=y"] and args.labels is None


def test_labelled_dataset_from_a_folder_of_label_shards(tmp_path):
    from ehr_transformer.data.dataset import build_labeled_dataset
    from ehr_transformer.data.writer import write_meds
    from ehr_transformer.tokenization_ehr import EHREventTokenizer

    events = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 2],
            "time": [T0, T0 + dt.timedelta(hours=1), T0, T0 + dt.timedelta(hours=1)],
            "code": ["A", "B", "A", "B"],
            "numeric_value": [None, 1.0, None, 2.0],
        },
        schema_overrides={"numeric_value": pl.Float32},
    )
    meds = write_meds(
        tmp_path / "meds", events, pl.DataFrame({"subject_id": [1, 2], "split": ["train", "train"]})
    )
    tokenizer = EHREventTokenizer.fit(events, min_code_count=1, max_length=16)
    folder = tmp_path / "aces"
    (folder / "0").mkdir(parents=True)
    labels = aces_frame([1, 2], [True, False]).with_columns(
        pl.lit(T0 + dt.timedelta(hours=2)).alias("prediction_time")
    )
    labels.slice(0, 1).write_parquet(folder / "0" / "a.parquet")
    labels.slice(1, 1).write_parquet(folder / "b.parquet")
    ds = build_labeled_dataset(meds, folder, tokenizer, split="train", cache_dir=tmp_path / "cache")
    assert sorted(zip(ds["subject_id"], ds["labels"], strict=True)) == [(1, 1.0), (2, 0.0)]
