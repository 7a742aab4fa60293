"""`evaluate` compares like with like: the baseline is fitted on the label rows that trained the checkpoint, the
difference model - baseline gets a paired subject-level interval, and subgroups come from the user's own codes."""

import json

import numpy as np
import polars as pl
import pytest
from transformers import TrainingArguments

from ehr_transformer.data.labels import read_labels, rows_fingerprint
from ehr_transformer.data.meds import read_events
from ehr_transformer.data.splits import read_subject_splits
from ehr_transformer.data.writer import write_meds
from ehr_transformer.evaluation.metrics import auroc, paired_bootstrap_difference
from ehr_transformer.evaluation.report import baseline_training_labels, evaluate_checkpoint, format_report
from ehr_transformer.evaluation.subgroups import subgroups_for
from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
from ehr_transformer.training.checkpoint import TRAINING_LABELS_FILE
from ehr_transformer.training.finetune import finetune

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def few_label_checkpoint(synthetic_meds, tmp_path_factory):
    """A classifier fine-tuned on 10% of the training labels (a few steps: the comparison, not the model, is tested)."""
    out = tmp_path_factory.mktemp("few_labels")
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    finetune(
        DataArguments(data_dir=str(synthetic_meds), labels=str(labels), max_length=64, min_code_count=3),
        ModelArguments(**TINY),
        FinetuningArguments(label_fraction=0.1),
        TrainingArguments(
            str(out / "model"), max_steps=2, report_to=[], use_cpu=True, seed=4, save_strategy="no"
        ),
    )
    return out / "model", labels


def test_checkpoint_records_its_training_rows_without_identifiers(few_label_checkpoint, synthetic_meds):
    checkpoint, labels = few_label_checkpoint
    record = json.loads((checkpoint / TRAINING_LABELS_FILE).read_text())
    assert record["label_fraction"] == 0.1 and record["seed"] == 4 and record["split"] == "train"
    assert record["label_file"] == "in_hospital_mortality.parquet"
    train = read_subject_splits(synthetic_meds).filter(pl.col("split") == "train")["subject_id"]
    n_train_labels = read_labels(labels).filter(pl.col("subject_id").is_in(train.implode())).height
    assert 0 < record["n_rows"] <= round(0.1 * n_train_labels) + 1
    text = (checkpoint / TRAINING_LABELS_FILE).read_text()
    assert "subject_id" not in text


def test_baseline_is_fitted_on_the_same_rows_as_the_model(few_label_checkpoint, synthetic_meds):
    checkpoint, labels = few_label_checkpoint
    record = json.loads((checkpoint / TRAINING_LABELS_FILE).read_text())
    rows, description = baseline_training_labels(checkpoint, synthetic_meds, labels)
    assert rows.height == record["n_rows"]
    assert rows_fingerprint(rows["subject_id"], rows["prediction_time"]) == record["rows_fingerprint"]
    assert f"{record['n_rows']} training labels (10% of the train labels, seed 4)" in description
    # the rows carry the labels of the file, not a copy made up elsewhere
    truth = rows.join(read_labels(labels), on=["subject_id", "prediction_time"], suffix="_file")
    assert truth.height == rows.height and (truth["boolean_value"] == truth["boolean_value_file"]).all()

    everything, said = baseline_training_labels(checkpoint, synthetic_meds, labels, baseline_labels="all")
    assert everything is None and "every label of the train split" in said


def test_evaluate_reports_same_rows_baseline_and_the_paired_difference(few_label_checkpoint, synthetic_meds):
    checkpoint, labels = few_label_checkpoint
    record = json.loads((checkpoint / TRAINING_LABELS_FILE).read_text())
    same = evaluate_checkpoint(checkpoint, synthetic_meds, labels, n_bootstrap=100, baseline="logistic")
    assert f"the model's own {record['n_rows']} training labels" in same["logistic_baseline"]["trained_on"]
    difference = same["model_minus_logistic_baseline"]["auroc"]
    expected = same["model"]["auroc"]["estimate"] - same["logistic_baseline"]["auroc"]["estimate"]
    assert difference["estimate"] == pytest.approx(expected, abs=1e-12)
    assert difference["ci_lower"] <= difference["estimate"] <= difference["ci_upper"]
    assert set(same["model_minus_logistic_baseline"]) == {"auroc", "auprc", "brier"}
    text = format_report(same)
    assert "model - logistic_baseline (paired, by subject):\n    AUROC" in text
    assert f"fitted on the model's own {record['n_rows']} training labels" in text

    full = evaluate_checkpoint(
        checkpoint, synthetic_meds, labels, n_bootstrap=20, baseline="logistic", baseline_labels="all"
    )
    assert "every label of the train split" in full["logistic_baseline"]["trained_on"]
    assert full["logistic_baseline"]["auroc"]["estimate"] != same["logistic_baseline"]["auroc"]["estimate"]


def test_another_label_file_is_refused_for_a_same_rows_baseline(
    few_label_checkpoint, synthetic_meds, tmp_path
):
    checkpoint, labels = few_label_checkpoint
    changed = read_labels(labels).with_columns(~pl.col("boolean_value"))
    with pytest.raises(ValueError, match="not the label file that trained"):
        baseline_training_labels(checkpoint, synthetic_meds, changed)


def test_paired_interval_is_by_subject():
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 60), 5)  # 60 subjects, 5 alike rows each
    a = np.clip(0.3 * y + 0.7 * np.repeat(rng.random(60), 5), 0, 1)
    b = np.repeat(rng.random(60), 5)
    by_subject = paired_bootstrap_difference(y, a, b, auroc, np.repeat(np.arange(60), 5), n_bootstrap=300)
    by_row = paired_bootstrap_difference(y, a, b, auroc, None, n_bootstrap=300)
    assert by_subject["estimate"] == pytest.approx(auroc(y, a) - auroc(y, b))
    width = lambda r: r["ci_upper"] - r["ci_lower"]  # noqa: E731
    assert width(by_subject) > 1.5 * width(by_row)  # rows of one subject are not independent evidence
    same = paired_bootstrap_difference(y, a, a, auroc, np.repeat(np.arange(60), 5), n_bootstrap=50)
    assert same["estimate"] == same["ci_lower"] == same["ci_upper"] == 0.0


@pytest.fixture(scope="module")
def renamed_sex_codes(synthetic_meds, tmp_path_factory):
    """The synthetic cohort with sex written as `P12//Gender` and a value (1 = male), as PhysioNet 2012 does."""
    events = read_events(synthetic_meds)
    truth = events.filter(pl.col("code").str.starts_with("GENDER//")).select(
        "subject_id", sex=pl.col("code").str.split("//").list.last()
    )
    renamed = events.with_columns(
        numeric_value=pl.when(pl.col("code").str.starts_with("GENDER//"))
        .then((pl.col("code") == "GENDER//M").cast(pl.Float32))
        .otherwise(pl.col("numeric_value")),
        code=pl.when(pl.col("code").str.starts_with("GENDER//"))
        .then(pl.lit("P12//Gender"))
        .otherwise(pl.col("code")),
    )
    out = write_meds(tmp_path_factory.mktemp("p12") / "meds", renamed, read_subject_splits(synthetic_meds))
    rows = read_labels(synthetic_meds / "labels" / "in_hospital_mortality.parquet").select(
        "subject_id", "prediction_time"
    )
    return out, rows, truth


def test_subgroups_from_a_non_standard_sex_code(renamed_sex_codes, caplog):
    data, rows, truth = renamed_sex_codes
    expected = rows.join(truth, on="subject_id", how="left")["sex"].replace({"M": "1", "F": "0"}).to_numpy()

    groups, notes = subgroups_for(data, rows)  # a code part "Gender" is found without a prefix
    assert (groups["sex"] == expected).all() and not notes

    groups, notes = subgroups_for(data, rows, sex_code_prefix="SEXE//")
    assert set(groups["sex"]) == {"unknown"}
    assert any("have no sex event with a code starting with SEXE//" in note for note in notes)
    assert any("--sex_code_prefix" in record.message for record in caplog.records)

    groups, notes = subgroups_for(data, rows, sex_code_prefix="P12//Gender")
    assert (groups["sex"] == expected).all() and not notes
    assert set(groups["age_band"]) <= {"18-44", "45-64", "65-79", "80+"}

    table = pl.DataFrame({"code": ["P12//Gender"], "attribute": ["icu"], "group": ["any"]})
    groups, _ = subgroups_for(data, rows, sex_code_prefix="P12//Gender", group_codes=table)
    assert set(groups["icu"]) == {"any"} and (groups["sex"] == expected).all()


def test_subgroups_find_sex_as_the_physionet_converter_writes_it(synthetic_meds, tmp_path):
    """`convert-long --preset physionet2012` writes `PHYSIONET//Gender//0` / `//1`; a code that only contains the
    letters (`LAB//SEXHORMONE`) is not sex."""
    events = read_events(synthetic_meds)
    sex = pl.col("code").str.starts_with("GENDER//")
    events = events.with_columns(
        code=pl.when(sex)
        .then(pl.concat_str(pl.lit("PHYSIONET//Gender//"), (pl.col("code") == "GENDER//M").cast(pl.Int8)))
        .otherwise(pl.col("code"))
    )
    extra = events.filter(pl.col("code") == "MEDS_BIRTH").with_columns(code=pl.lit("LAB//SEXHORMONE"))
    data = write_meds(tmp_path / "meds", pl.concat([extra, events]), read_subject_splits(synthetic_meds))
    rows = read_labels(synthetic_meds / "labels" / "in_hospital_mortality.parquet").select(
        "subject_id", "prediction_time"
    )
    truth = read_events(synthetic_meds).filter(pl.col("code").str.starts_with("GENDER//"))
    truth = truth.select(
        "subject_id", sex=pl.col("code").str.split("//").list.last().replace({"M": "1", "F": "0"})
    )
    groups, notes = subgroups_for(data, rows)
    assert (
        groups["sex"] == rows.join(truth, on="subject_id", how="left")["sex"].to_numpy()
    ).all() and not notes


def test_missing_birth_is_said_and_grouped_as_unknown(synthetic_meds, tmp_path):
    events = read_events(synthetic_meds).filter(pl.col("code") != "MEDS_BIRTH")
    data = write_meds(tmp_path / "meds", events, read_subject_splits(synthetic_meds))
    rows = read_labels(synthetic_meds / "labels" / "in_hospital_mortality.parquet").select(
        "subject_id", "prediction_time"
    )
    groups, notes = subgroups_for(data, rows)
    assert set(groups["age_band"]) == {"unknown"}
    assert any("have no MEDS_BIRTH event" in note for note in notes)
    assert set(groups["sex"]) <= {"F", "M"}
