"""Every task a user brings: per-stay and per-hour labels, binary, regression and multi-class, from a wide ICU
table through `convert-wide`, `finetune` with no tuning flag, `evaluate` and `predict`."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from ehr_transformer.cli import main
from ehr_transformer.data.labels import infer_task_type, outcome_labels
from ehr_transformer.data.wide import WideTableError, convert_wide


def _wide_cohort(tmp_path, n_stays: int = 160, hours: int = 8, seed: int = 0) -> dict:
    """A small YAIB-layout cohort whose outcomes depend on what the model can see: a per-stay severity drives
    heart rate and lactate; the per-hour label is "heart rate above 95 in the next hour" (known only through the
    severity the history shows), the per-stay length of stay and the 3-class outcome follow the severity."""
    rng = np.random.default_rng(seed)
    severity = rng.normal(size=n_stays)
    stay = np.repeat(np.arange(1, n_stays + 1), hours)
    hour = np.tile(np.arange(hours), n_stays)
    s = np.repeat(severity, hours)
    hr = 85 + 12 * s + rng.normal(0, 6, stay.size)
    lactate = np.where(rng.random(stay.size) < 0.5, 1.5 + 0.9 * s + rng.normal(0, 0.3, stay.size), np.nan)
    dyn = pl.DataFrame(
        {
            "stay_id": stay,
            "time": pl.Series([timedelta(hours=int(h)) for h in hour]),
            "hr": hr,
            "lact": lactate,
        }
    )
    sta = pl.DataFrame(
        {
            "stay_id": np.arange(1, n_stays + 1),
            "age": rng.integers(20, 90, n_stays).astype(float),
            "sex": rng.choice(["Male", "Female"], n_stays),
        }
    )
    outcomes = {
        "tachycardia": dyn.select(
            "stay_id", "time", (pl.col("hr").shift(-1).over("stay_id") > 95).cast(pl.Int32).alias("label")
        ).drop_nulls(),
        "stay_hours": pl.DataFrame(
            {"stay_id": np.arange(1, n_stays + 1), "label": 60 + 25 * severity + rng.normal(0, 8, n_stays)}
        ),
        "severity_class": pl.DataFrame(
            {"stay_id": np.arange(1, n_stays + 1), "label": np.digitize(severity, [-0.5, 0.5])}
        ),
    }
    paths = {"dyn": tmp_path / "dyn.parquet", "sta": tmp_path / "sta.parquet"}
    dyn.write_parquet(paths["dyn"])
    sta.write_parquet(paths["sta"])
    for name, frame in outcomes.items():
        paths[name] = tmp_path / f"{name}.parquet"
        frame.write_parquet(paths[name])
    return paths


def test_outcome_labels_take_the_value_column_from_the_values():
    frame = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [None, None], "y": [0, 1]})
    assert outcome_labels(frame, "y").columns[-1] == "boolean_value"
    assert outcome_labels(frame.with_columns(pl.col("y") * 2.5), "y").columns[-1] == "float_value"
    assert outcome_labels(frame, "y", "integer").columns[-1] == "integer_value"
    with pytest.raises(ValueError, match=r"<outcome>: column 'y': subject 2 has 2.5, not 0/1"):
        outcome_labels(frame.with_columns(pl.col("y") * 2.5), "y", "boolean")


def test_task_type_follows_the_label_column_and_refuses_a_mismatch():
    floats = pl.DataFrame({"float_value": [0.5, 3.7, 12.0]})
    assert infer_task_type(floats, "float_value") == "regression"
    assert infer_task_type(pl.DataFrame({"integer_value": [0, 1, 1]}), "integer_value") == "binary"
    assert infer_task_type(pl.DataFrame({"integer_value": [0, 2, 1]}), "integer_value") == "multiclass"
    assert (
        infer_task_type(pl.DataFrame({"categorical_value": ["a", "b"]}), "categorical_value") == "multiclass"
    )
    with pytest.raises(
        ValueError, match=r"labels.parquet: column 'float_value' holds 0.5 .*binary needs 0/1"
    ):
        infer_task_type(floats, "float_value", "binary", "labels.parquet")
    with pytest.raises(ValueError, match="multi-class needs whole"):
        infer_task_type(floats, "float_value", "multiclass")


def test_convert_wide_takes_every_outcome_shape(tmp_path):
    paths = _wide_cohort(tmp_path, n_stays=40, hours=6)
    common = dict(dyn_path=paths["dyn"], sta_path=paths["sta"])
    per_hour = convert_wide(**common, outc_path=paths["tachycardia"], output_dir=tmp_path / "a", task="tachy")
    labels = pl.read_parquet(tmp_path / "a" / "labels" / "tachy.parquet")
    assert per_hour["label_column"] == "boolean_value" and per_hour["n_labels"] == 40 * 5
    # every hour but the last (whose next hour is unknown) a prediction time
    assert labels.group_by("subject_id").len()["len"].unique().to_list() == [5]
    with pytest.raises(WideTableError, match=r"stay_hours.parquet: column 'label': .*prediction_hours"):
        convert_wide(**common, outc_path=paths["stay_hours"], output_dir=tmp_path / "b", task="los")
    per_stay = convert_wide(
        **common, outc_path=paths["stay_hours"], output_dir=tmp_path / "b", task="los", prediction_hours=4
    )
    labels = pl.read_parquet(tmp_path / "b" / "labels" / "los.parquet")
    assert per_stay["label_column"] == "float_value"
    hours = labels.select((pl.col("prediction_time") - pl.datetime(2000, 1, 1)).dt.total_hours().unique())
    assert hours.to_series().to_list() == [4]


@pytest.mark.parametrize(
    ("task", "convert_flags", "metric", "floor"),
    [
        ("tachycardia", [], "auroc", 0.7),  # per-hour binary labels
        ("stay_hours", ["--prediction_hours", "12"], "r2", 0.3),  # per-stay continuous outcome
        ("severity_class", ["--prediction_hours", "12", "--label_type", "integer"], "macro_auroc", 0.7),
    ],
)
def test_a_bare_default_run_learns_every_task_type(tmp_path, task, convert_flags, metric, floor):
    """convert-wide -> finetune (no tuning flag) -> evaluate -> predict; the held-out metric is clearly above the
    constant predictor's (AUROC 0.5, R² 0)."""
    paths = _wide_cohort(tmp_path)
    data = tmp_path / "meds"
    flags = ["--dyn", str(paths["dyn"]), "--sta", str(paths["sta"]), "--outc", str(paths[task])]
    assert main(["convert-wide", *flags, "--task", task, "--output_dir", str(data), *convert_flags]) == 0
    labels = str(data / "labels" / f"{task}.parquet")
    argv = ["--data_dir", str(data), "--labels", labels]
    assert main(["finetune", *argv, "--output_dir", str(tmp_path / "model"), "--use_cpu"]) == 0
    out = tmp_path / "evaluation"
    evaluate = ["evaluate", "--checkpoint", str(tmp_path / "model"), *argv, "--n_bootstrap", "200"]
    assert main([*evaluate, "--output_dir", str(out), "--update_card"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    value = report["model"][metric]["estimate"]
    print(f"{task}: held-out {metric} {value:.3f}, GBM {report['gbm_baseline'][metric]['estimate']:.3f}")
    assert value > floor
    card = (tmp_path / "model" / "README.md").read_text()
    assert {"auroc": "| AUROC |", "r2": "| R² |", "macro_auroc": "| macro AUROC"}[metric] in card
    predictions = tmp_path / "predictions.parquet"
    assert (
        main(["predict", "--checkpoint", str(tmp_path / "model"), *argv, "--output_file", str(predictions)])
        == 0
    )
    columns = pl.read_parquet(predictions).columns
    expected = {
        "auroc": "predicted_boolean_probability",
        "r2": "predicted_float_value",
        "macro_auroc": "predicted_integer_probabilities",
    }[metric]
    assert expected in columns


def test_binary_loss_on_continuous_targets_is_refused(tmp_path, capsys):
    paths = _wide_cohort(tmp_path, n_stays=30, hours=4)
    data = tmp_path / "meds"
    convert_wide(paths["dyn"], paths["sta"], paths["stay_hours"], data, task="los", prediction_hours=4)
    argv = ["finetune", "--data_dir", str(data), "--labels", str(data / "labels" / "los.parquet")]
    assert main([*argv, "--task_type", "binary", "--output_dir", str(tmp_path / "m"), "--use_cpu"]) != 0
    error = capsys.readouterr().err
    assert "los.parquet: column 'float_value' holds" in error and "binary needs 0/1" in error
    assert not (tmp_path / "m").exists()  # refused before any training


def test_label_rows_of_an_epoch_are_bounded_drawn_afresh_and_weigh_every_row_alike():
    from ehr_transformer.data.dataset import label_row_budget
    from ehr_transformer.training.trainer import LabelRowSampler

    subject_ids = np.repeat([1, 2, 3], [10, 2, 6])  # per-hour labels: 10, 2 and 6 prediction times
    n = label_row_budget(subject_ids, 4)
    assert n == 4 + 2 + 4 and label_row_budget(subject_ids, 0) == 18
    sampler = LabelRowSampler(np.arange(18) % 5 + 1, n, batch_size=2, seed=0)
    assert len(sampler) == n
    epochs, drawn = [], np.zeros(18)
    for epoch in range(400):
        sampler.epoch = epoch
        rows = list(sampler)
        assert len(rows) == len(set(rows)) == n
        drawn[rows] += 1
        epochs.append(sorted(rows))
    assert epochs[0] != epochs[1]  # other prediction times in another epoch
    sampler.epoch = 1
    assert sorted(sampler) == epochs[1]  # a function of (seed, epoch): a resumed run draws the same rows
    # every row as often as any other (10 of 18 rows an epoch): the long stay keeps 10/18 of the weight
    assert np.abs(drawn / 400 - n / 18).max() < 0.1
    assert drawn[subject_ids == 1].sum() / drawn.sum() == pytest.approx(10 / 18, abs=0.02)


def test_sampled_label_rows_keep_the_targets_of_all_rows():
    """Remaining length of stay, one label per hour: drawn k per stay, the short stays' small targets would
    dominate; drawn uniformly, the mean target is that of all rows."""
    import datasets

    from ehr_transformer.data.dataset import sample_label_rows

    hours = np.random.default_rng(0).integers(2, 80, size=300)  # stays of 2 to 79 hours
    subject_ids = np.repeat(np.arange(300), hours)
    remaining = np.concatenate([np.arange(h, 0, -1) for h in hours]).astype(float)
    dataset = datasets.Dataset.from_dict({"subject_id": subject_ids, "labels": remaining})
    sampled = sample_label_rows(dataset, 4, seed=0)
    assert len(sampled) == sum(min(h, 4) for h in hours)
    assert np.mean(sampled["labels"]) == pytest.approx(remaining.mean(), rel=0.05)
    per_stay = [np.random.default_rng(1).choice(np.arange(h, 0, -1), min(h, 4), replace=False) for h in hours]
    assert np.concatenate(per_stay).mean() < 0.75 * remaining.mean()  # what drawing k per stay gave
    assert sampled["subject_id"] == sorted(sampled["subject_id"])  # the dataset's order is kept
    assert sample_label_rows(dataset, 0, seed=0) is dataset


def test_label_fraction_draws_subjects_with_all_their_prediction_times():
    import datasets

    from ehr_transformer.data.dataset import draw_subjects, subsample_labels

    dataset = datasets.Dataset.from_dict({"subject_id": np.repeat(np.arange(20), 5), "x": np.arange(100)})
    half = subsample_labels(dataset, 0.5, seed=0)
    counts = np.bincount(half["subject_id"])
    assert (counts[counts > 0] == 5).all() and (counts > 0).sum() == 10
    # the same subjects from the label rows alone (in any order), as a benchmark or a user draws them
    shuffled = np.random.default_rng(1).permutation(np.repeat(np.arange(20), 5))
    assert sorted(draw_subjects(shuffled, 0.5, seed=0)) == np.flatnonzero(counts).tolist()
