"""Predictions out: the MEDS prediction schema (as `meds-evaluation` reads it), prediction times without labels, any
split name, no `subject_splits.parquet`, `--split ''`, and one clear sentence when no row is left."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification
from ehr_transformer.data.dataset import NoUsableRowsError
from ehr_transformer.data.writer import write_meds
from ehr_transformer.inference import predict, prediction_columns
from ehr_transformer.tokenization_ehr import EHREventTokenizer
from ehr_transformer.training.checkpoint import save_checkpoint

CODES = ["LAB//lactate", "VITAL//1", "VITAL//2"]
START = datetime(2000, 1, 1)
# meds-evaluation's binary classification schema (meds_evaluation.schema.BINARY_CLASSIFICATION_SCHEMA_DICT)
MEDS_EVALUATION_BINARY = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean,
    "predicted_boolean_value": pl.Boolean,
    "predicted_boolean_probability": pl.Float64,
}


def _checkpoint(path, **config):
    stats = {code: {"median": 2.0, "scale": 0.5, "count": 100} for code in CODES}
    tokenizer = EHREventTokenizer(CODES, stats, max_length=16, min_code_count=1)
    torch.manual_seed(0)
    defaults = dict(num_labels=1, problem_type="multi_label_classification")
    model = EHRTransformerForSequenceClassification(
        EHRTransformerConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            **{**defaults, **config},
        )
    ).eval()
    return save_checkpoint(model, tokenizer, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "binary")


@pytest.fixture()
def meds(tmp_path):
    subjects = list(range(1, 7))
    events = pl.DataFrame(
        {
            "subject_id": [s for s in subjects for _ in range(3)],
            "time": [START, START + timedelta(hours=1), START + timedelta(hours=2)] * len(subjects),
            "code": ["LAB//lactate", "VITAL//1", "VITAL//2"] * len(subjects),
            "numeric_value": [2.5, 80.0, None] * len(subjects),
        },
        schema_overrides={"numeric_value": pl.Float32},
    )
    # MEDS allows any split name
    splits = pl.DataFrame(
        {"subject_id": subjects, "split": ["train", "train", "test", "test", "test", "held_out"]}
    )
    return write_meds(tmp_path / "meds", events, splits)


def _labels(subjects, values=None) -> pl.DataFrame:
    frame = pl.DataFrame(
        {"subject_id": subjects, "prediction_time": [START + timedelta(hours=3)] * len(subjects)},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )
    if values is not None:
        frame = frame.with_columns(pl.Series("boolean_value", values, dtype=pl.Boolean))
    return frame


def test_binary_predictions_follow_the_meds_prediction_schema(checkpoint, meds, tmp_path):
    path = tmp_path / "labels.parquet"
    _labels([3, 4, 5], [True, False, True]).write_parquet(path)
    out = predict(checkpoint, meds, path, split="test", batch_size=2)
    assert dict(out.schema) == MEDS_EVALUATION_BINARY
    assert out["subject_id"].to_list() == [3, 4, 5]
    assert out["boolean_value"].to_list() == [True, False, True]
    p = out["predicted_boolean_probability"]
    assert p.is_between(0, 1).all()
    assert out["predicted_boolean_value"].to_list() == (p >= 0.5).to_list()


def test_prediction_times_without_labels_all_subjects_and_no_splits_file(checkpoint, meds, tmp_path):
    path = tmp_path / "times.parquet"
    _labels([1, 3, 6, 42]).write_parquet(path)  # no value column at all; 42 has no events
    out = predict(checkpoint, meds, path, split="test")
    assert out["subject_id"].to_list() == [3]
    assert out.schema["boolean_value"] == pl.Boolean and out["boolean_value"].null_count() == 1
    (meds / "metadata" / "subject_splits.parquet").unlink()
    for split in (None, ""):
        every = predict(checkpoint, meds, path, split=split)
        assert sorted(every["subject_id"].to_list()) == [1, 3, 6]
        assert dict(every.schema) == MEDS_EVALUATION_BINARY
    with pytest.raises(FileNotFoundError, match="pass --split ''"):
        predict(checkpoint, meds, path, split="held_out")


def test_predict_cli_split_empty_means_every_subject(checkpoint, meds, tmp_path, capsys):
    from ehr_transformer.cli import main

    labels, output = tmp_path / "times.parquet", tmp_path / "out.parquet"
    _labels([1, 2, 3, 4, 5, 6]).write_parquet(labels)
    argv = ["predict", "--checkpoint", str(checkpoint), "--data_dir", str(meds), "--labels", str(labels)]
    assert main([*argv, "--split", "", "--output_file", str(output)]) == 0
    written = pl.read_parquet(output)
    assert written.height == 6 and dict(written.schema) == MEDS_EVALUATION_BINARY
    assert main([*argv[:-1], f"{labels},{labels}", "--output_file", str(output)]) == 2
    assert "contains a comma: several tasks are no longer given by commas" in capsys.readouterr().err


def test_no_usable_row_is_one_sentence_with_the_counts(checkpoint, meds, tmp_path):
    path = tmp_path / "absent.parquet"
    _labels([40, 41, 1], [True, False, True]).write_parquet(path)
    with pytest.raises(
        NoUsableRowsError,
        match=r"absent\.parquet: no usable label row is left in split 'test': "
        r"3 rows read, 3 not in split 'test'",
    ):
        predict(checkpoint, meds, path, split="test")
    with pytest.raises(
        NoUsableRowsError,
        match=r"3 rows read, 0 not in the data, 0 without a label value, "
        r"2 of subjects not in the data",
    ):
        predict(
            checkpoint,
            meds,
            _labels([40, 41], [True, False]).vstack(
                _labels([1], [True]).with_columns(pl.lit(START - timedelta(days=1)).alias("prediction_time"))
            ),
            split=None,
        )


def test_evaluate_with_labels_of_absent_subjects_names_the_file(checkpoint, meds, tmp_path):
    from ehr_transformer.evaluation.report import evaluate_checkpoint

    path = tmp_path / "absent.parquet"
    _labels([40, 41], [True, False]).write_parquet(path)
    with pytest.raises(NoUsableRowsError, match="absent.parquet: no usable label row"):
        evaluate_checkpoint(checkpoint, meds, path, split="test", baseline=None, n_bootstrap=10)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "binary",
            {
                "boolean_value": pl.Boolean,
                "predicted_boolean_value": pl.Boolean,
                "predicted_boolean_probability": pl.Float64,
            },
        ),
        ("regression", {"float_value": pl.Float64, "predicted_float_value": pl.Float64}),
        (
            "multiclass",
            {
                "integer_value": pl.Int64,
                "predicted_integer_value": pl.Int64,
                "predicted_integer_probabilities": pl.List(pl.Float64),
            },
        ),
    ],
)
def test_prediction_columns_are_typed_also_when_empty(kind, expected):
    scores = np.zeros((0, 3)) if kind == "multiclass" else np.zeros(0)
    columns = prediction_columns(kind, scores, np.zeros(0, dtype=np.float32), prefix="t/")
    assert {name: s.dtype for name, s in columns.items()} == {f"t/{k}": v for k, v in expected.items()}
    assert all(s.dtype != pl.Null for s in columns.values())


def test_regression_and_multiclass_checkpoints(meds, tmp_path):
    labels = tmp_path / "labels.parquet"
    _labels([3, 4, 5]).with_columns(pl.Series("integer_value", [0, 2, None], dtype=pl.Int64)).write_parquet(
        labels
    )
    regression = _checkpoint(tmp_path / "regression", problem_type="regression")
    out = predict(regression, meds, labels, split="test")
    assert out.columns == ["subject_id", "prediction_time", "float_value", "predicted_float_value"]
    assert out["float_value"].to_list() == [0.0, 2.0, None]
    multiclass = _checkpoint(
        tmp_path / "multiclass", problem_type="single_label_classification", num_labels=3
    )
    out = predict(multiclass, meds, labels, split="test")
    assert out["integer_value"].to_list() == [0, 2, None]
    assert out["predicted_integer_value"].is_between(0, 2).all()
    np.testing.assert_allclose(
        [sum(p) for p in out["predicted_integer_probabilities"].to_list()], 1.0, rtol=1e-6
    )


def test_multitask_checkpoint_scores_prediction_times_without_labels(meds, tmp_path):
    tasks = dict(
        task_names=["death", "stay"], task_types=["binary", "regression"], num_labels=2, problem_type=None
    )
    checkpoint = _checkpoint(tmp_path / "multitask", **tasks)
    times = tmp_path / "times.parquet"
    _labels([3, 4]).write_parquet(times)  # subject_id and prediction_time only
    out = predict(checkpoint, meds, times, split="test")
    assert out["subject_id"].to_list() == [3, 4]
    assert out["death/boolean_value"].null_count() == 2 and out["stay/float_value"].null_count() == 2
    assert out["death/predicted_boolean_probability"].is_between(0, 1).all()


def test_named_classes_come_back_by_name(meds, tmp_path):
    classes = {"id2label": {0: "home", 1: "rehab", 2: "died"}}
    checkpoint = _checkpoint(
        tmp_path / "named", problem_type="single_label_classification", num_labels=3, **classes
    )
    labels = tmp_path / "labels.parquet"
    _labels([3, 4]).with_columns(pl.Series("categorical_value", ["died", "home"])).write_parquet(labels)
    out = predict(checkpoint, meds, labels, split="test")
    assert out["categorical_value"].to_list() == ["died", "home"]
    assert set(out["predicted_categorical_value"].to_list()) <= {"home", "rehab", "died"}
    assert out["predicted_categorical_probabilities"].list.len().to_list() == [3, 3]


def test_a_missing_data_folder_is_named(checkpoint, tmp_path):
    labels = tmp_path / "labels.parquet"
    _labels([3], [True]).write_parquet(labels)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        predict(checkpoint, tmp_path / "nowhere", labels, split="held_out")
