"""pretrain -> finetune -> evaluate -> predict with the plain Trainer, as a user runs them (tiny model, few steps)."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from conftest import REPO_ROOT
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForSequenceClassification, TrainingArguments

from ehr_transformer import EHREventTokenizer, EHRTransformerConfig, EHRTransformerForSequenceClassification
from ehr_transformer.evaluation.report import evaluate_checkpoint
from ehr_transformer.inference import predict
from ehr_transformer.modeling_ehr import EHRTransformerEnsembleForSequenceClassification
from ehr_transformer.training.arguments import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    PretrainingArguments,
)
from ehr_transformer.training.finetune import finetune
from ehr_transformer.training.linear_probe import PROBE_PENALTIES, fit_linear_probe
from ehr_transformer.training.pretrain import pretrain

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def training_args(output_dir, **kwargs):
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        max_steps=8,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


@pytest.fixture(scope="module")
def pretrained(synthetic_meds, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrained")
    cache = tmp_path_factory.mktemp("cache")
    model = pretrain(
        DataArguments(data_dir=str(synthetic_meds), cache_dir=str(cache), max_length=64, min_code_count=3),
        ModelArguments(**TINY),
        PretrainingArguments(),
        training_args(output, eval_strategy="steps", eval_steps=8),
    )
    return output, model


def test_pretrain_writes_a_complete_checkpoint(pretrained, synthetic_meds):
    output, model = pretrained
    names = set(os.listdir(output))
    assert {"config.json", "model.safetensors", "event_tokenizer.json", "modeling_ehr.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    tokenizer = EHREventTokenizer.from_pretrained(output)
    assert model.config.vocab_size == tokenizer.vocab_size
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "ehr_transformer"
    assert "AutoModelForSequenceClassification" in config["auto_map"]


def test_tokenizer_is_fitted_on_training_subjects_only(pretrained, synthetic_meds):
    from ehr_transformer.data.splits import iter_split_events

    output, _ = pretrained
    tokenizer = EHREventTokenizer.from_pretrained(output)
    refit = EHREventTokenizer.fit(iter_split_events(synthetic_meds, "train"), min_code_count=3, max_length=64)
    assert tokenizer.vocab == refit.vocab
    with_held_out = EHREventTokenizer.fit(
        [f for split in ("train", "held_out") for f in iter_split_events(synthetic_meds, split)],
        min_code_count=3,
        max_length=64,
    )
    assert tokenizer.value_statistics != with_held_out.value_statistics


def test_finetune_from_pretrained_evaluate_and_predict(pretrained, synthetic_meds, tmp_path):
    pretrained_dir, _ = pretrained
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    model = finetune(
        DataArguments(data_dir=str(synthetic_meds), labels=str(labels), cache_dir=str(tmp_path / "cache")),
        ModelArguments(model_name_or_path=str(pretrained_dir)),
        FinetuningArguments(),
        training_args(tmp_path / "finetuned", eval_strategy="steps", eval_steps=8),
    )
    assert isinstance(model, EHRTransformerEnsembleForSequenceClassification)  # the recipe's 5 networks
    assert model.config.problem_type == "multi_label_classification" and model.config.num_labels == 1

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "finetuned")
    assert isinstance(reloaded, EHRTransformerEnsembleForSequenceClassification)
    assert len(reloaded.members) == 5
    assert (tmp_path / "finetuned" / "event_tokenizer.json").exists()

    predictions = predict(tmp_path / "finetuned", synthetic_meds, labels, split="held_out")
    assert predictions.columns == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    assert predictions["predicted_boolean_probability"].is_between(0, 1).all()
    held_out = pl.read_parquet(synthetic_meds / "metadata" / "subject_splits.parquet").filter(
        pl.col("split") == "held_out"
    )
    assert set(predictions["subject_id"].to_list()) <= set(held_out["subject_id"].to_list())

    report = evaluate_checkpoint(
        tmp_path / "finetuned",
        synthetic_meds,
        labels,
        output_dir=tmp_path / "eval",
        n_bootstrap=50,
        baseline="logistic",
    )
    assert report["n"] == len(predictions)
    for name in ("model", "logistic_baseline"):
        auroc = report[name]["auroc"]
        assert auroc["ci_lower"] <= auroc["estimate"] <= auroc["ci_upper"]
        assert set(report[name]["subgroups"]) == {"age_band", "sex"}
    assert (tmp_path / "eval" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == report["n"]


def test_finetune_from_scratch_with_label_fraction(synthetic_meds, tmp_path):
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = finetune(
            DataArguments(
                data_dir=str(synthetic_meds),
                labels=str(labels),
                cache_dir=str(tmp_path),
                max_length=64,
                min_code_count=3,
            ),
            ModelArguments(**TINY),
            FinetuningArguments(label_fraction=0.25),
            training_args(tmp_path / "scratch", max_steps=2, use_cpu=False),  # as the command line runs
        )
    assert torch.isfinite(next(model.parameters())).all()
    if not torch.accelerator.is_available():  # a CPU user's log is free of torch's pinned-memory warning
        assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_finetune_without_labels_says_what_is_missing(synthetic_meds, tmp_path):
    with pytest.raises(ValueError, match="--labels"):
        finetune(
            DataArguments(data_dir=str(synthetic_meds), max_length=64),
            ModelArguments(**TINY),
            FinetuningArguments(),
            training_args(tmp_path),
        )


def test_pretrain_refuses_bad_masking_settings_before_tokenizing_the_data(
    pretrained, synthetic_meds, tmp_path, monkeypatch
):
    """A misspelt masking setting fails in seconds, naming the field, not after the datasets are built; also when
    pretraining continues from a checkpoint (whose objectives decide which settings apply)."""
    import ehr_transformer.training.pretrain as training

    def fail(*args, **kwargs):
        raise AssertionError("the datasets were built before the collator settings were checked")

    monkeypatch.setattr(training, "build_pretraining_dataset", fail)
    data = DataArguments(data_dir=str(synthetic_meds), cache_dir=str(tmp_path / "cache"), max_length=64)
    with pytest.raises(ValueError, match="value_mask_strategy"):
        pretrain(
            data,
            ModelArguments(**TINY),
            PretrainingArguments(value_mask_strategy="past"),
            training_args(tmp_path / "a"),
        )
    continued = ModelArguments(model_name_or_path=str(pretrained[0]))
    with pytest.raises(ValueError, match="mlm_probability"):
        pretrain(data, continued, PretrainingArguments(mlm_probability=1.5), training_args(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pretrain_script_runs_as_a_command(synthetic_meds, tmp_path):
    """`python training/pretrain.py ...` with TrainingArguments flags, as the README shows."""
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "pretrain.py"),
        "--data_dir",
        str(synthetic_meds),
        "--output_dir",
        str(tmp_path / "out"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--hidden_size",
        "32",
        "--num_hidden_layers",
        "1",
        "--num_attention_heads",
        "2",
        "--intermediate_size",
        "64",
        "--max_length",
        "32",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--report_to",
        "none",
        "--use_cpu",
        "--save_strategy",
        "no",
        "--min_code_count",
        "3",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    vocab_size = json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"]
    assert vocab_size == len(EHREventTokenizer.from_pretrained(tmp_path / "out")) > 4


def test_checkpoints_carry_a_model_card_without_identifiers(pretrained, synthetic_meds, tmp_path):
    from ehr_transformer.model_card import read_card_metadata

    pretrained_dir, _ = pretrained
    metadata = read_card_metadata(pretrained_dir)
    assert metadata["library_name"] == "transformers" and "ehr-transformer" in metadata["tags"]
    card = (pretrained_dir / "README.md").read_text()
    assert "## Intended use" in card and "## Limitations and known biases" in card
    assert "masked code prediction" in card

    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    finetune(
        DataArguments(data_dir=str(synthetic_meds), labels=str(labels), cache_dir=str(tmp_path / "cache")),
        ModelArguments(model_name_or_path=str(pretrained_dir)),
        FinetuningArguments(),
        training_args(tmp_path / "finetuned", max_steps=2),
    )
    card_before = (tmp_path / "finetuned" / "README.md").read_text()
    evaluate_checkpoint(tmp_path / "finetuned", synthetic_meds, labels, n_bootstrap=20, baseline=None)
    assert (
        tmp_path / "finetuned" / "README.md"
    ).read_text() == card_before  # evaluating alone never writes it
    report = evaluate_checkpoint(
        tmp_path / "finetuned", synthetic_meds, labels, n_bootstrap=20, baseline=None, update_card=True
    )
    metadata = read_card_metadata(tmp_path / "finetuned")
    (result,) = metadata["model-index"][0]["results"]
    auroc = next(m["value"] for m in result["metrics"] if m["type"] == "roc_auc")
    assert auroc == pytest.approx(report["model"]["auroc"]["estimate"], abs=1e-4)

    # no date of a real event anywhere in the card (identifiers: see tests/test_privacy.py's scan of whole folders)
    events = pl.read_parquet(sorted((synthetic_meds / "data").glob("**/*.parquet")))
    card = (tmp_path / "finetuned" / "README.md").read_text()
    stamps = events["time"].drop_nulls().dt.strftime("%Y-%m-%d").unique().to_list()
    assert not any(stamp in card for stamp in stamps)


def test_multitask_finetune_and_predict_one_column_per_task(synthetic_meds, tmp_path):
    """Mortality (binary) and a length-of-stay target (regression, labelled for half the rows) in one model."""
    mortality = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    long_stay = pl.read_parquet(synthetic_meds / "labels" / "long_length_of_stay.parquet")
    stay = tmp_path / "stay_days.parquet"
    long_stay.gather_every(2).select(
        "subject_id",
        "prediction_time",
        (pl.col("boolean_value").cast(pl.Float64) * 7 + 2).alias("float_value"),
    ).write_parquet(stay)
    model = finetune(
        DataArguments(
            data_dir=str(synthetic_meds),
            task=[f"in_hospital_mortality={mortality}", f"stay_days={stay}"],
            cache_dir=str(tmp_path / "cache"),
            max_length=64,
            min_code_count=3,
        ),
        ModelArguments(**TINY),
        FinetuningArguments(),
        training_args(tmp_path / "multi", max_steps=4, eval_strategy="steps", eval_steps=4),
    )
    assert model.config.task_names == ["in_hospital_mortality", "stay_days"]
    assert model.config.task_types == ["binary", "regression"]

    tasks = [f"in_hospital_mortality={mortality}", f"stay_days={stay}"]
    predictions = predict(tmp_path / "multi", synthetic_meds, None, split="held_out", tasks=tasks)
    assert predictions.columns == [
        "subject_id",
        "prediction_time",
        "in_hospital_mortality/boolean_value",
        "in_hospital_mortality/predicted_boolean_value",
        "in_hospital_mortality/predicted_boolean_probability",
        "stay_days/float_value",
        "stay_days/predicted_float_value",
    ]
    assert predictions["in_hospital_mortality/predicted_boolean_probability"].is_between(0, 1).all()
    # the rows without a stay label are still scored
    assert predictions["stay_days/float_value"].null_count() > 0
    assert predictions["stay_days/predicted_float_value"].is_finite().all()
    only_mortality = predict(tmp_path / "multi", synthetic_meds, mortality, split="held_out")
    assert only_mortality["stay_days/float_value"].null_count() == only_mortality.height  # no stay file given
    assert only_mortality["in_hospital_mortality/boolean_value"].null_count() == 0
    with pytest.raises(ValueError, match="--task"):
        predict(tmp_path / "multi", synthetic_meds, f"{mortality},{stay}", split="held_out")


def test_multitask_metrics_score_each_task_on_its_labelled_rows():
    from transformers import EvalPrediction

    from ehr_transformer.training.finetune import multitask_metrics

    logits = np.array([[2.0, 1.0], [-2.0, 3.0], [1.0, 5.0], [-1.0, 0.0]])
    labels = np.array([[1.0, np.nan], [0.0, 2.0], [np.nan, 4.0], [0.0, np.nan]])
    metrics = multitask_metrics(["death", "stay"], ["binary", "regression"])(EvalPrediction(logits, labels))
    assert metrics["death_auroc"] == 1.0 and metrics["death_prevalence"] == pytest.approx(1 / 3)
    assert metrics["stay_mse"] == pytest.approx((1.0 + 1.0) / 2) and metrics["stay_mae"] == pytest.approx(1.0)


def test_init_bias_to_prevalence_starts_binary_outputs_at_the_base_rate():
    import math

    import numpy as np
    import torch

    from ehr_transformer import EHRTransformerConfig
    from ehr_transformer.training.finetune import init_bias_to_prevalence

    config = EHRTransformerConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        task_names=["death", "stay_hours"],
        task_types=["binary", "regression"],
    )
    model = EHRTransformerForSequenceClassification(config)
    regression_bias = model.classifier.bias[1].item()
    labels = np.array([[1.0, 3.0], [0.0, 5.0], [0.0, np.nan], [np.nan, 2.0], [0.0, 1.0]])
    assert init_bias_to_prevalence(model, labels) == [0.25]
    assert math.isclose(torch.sigmoid(model.classifier.bias[0].detach()).item(), 0.25, rel_tol=1e-5)
    assert model.classifier.bias[1].item() == regression_bias  # regression outputs are left alone


def test_linear_probe_finds_the_outcome_direction_in_frozen_embeddings():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20, dtype=int), np.zeros(280, dtype=int)]
    embeddings = rng.normal(size=(300, 16))
    # one direction carries the outcome (Bayes AUROC 0.98), the other 15 are noise
    embeddings[:, 3] += 3.0 * y
    order = rng.permutation(300)
    train, test = order[:200], np.sort(order[200:])
    probe = fit_linear_probe(embeddings[train], y[train], seed=0)
    assert probe.best_params_["logisticregression__C"] in PROBE_PENALTIES
    risk = probe.predict_proba(embeddings[test])[:, 1]
    assert roc_auc_score(y[test], risk) > 0.9
    weights = np.abs(probe.best_estimator_[-1].coef_[0])
    assert weights.argmax() == 3
    # the same rows and seed give the same probe
    again = fit_linear_probe(embeddings[train], y[train], seed=0)
    np.testing.assert_array_equal(
        again.decision_function(embeddings[test]), probe.decision_function(embeddings[test])
    )


def test_linear_probe_refuses_labels_it_cannot_cross_validate():
    embeddings = np.random.default_rng(1).normal(size=(10, 4))
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative rows, got 1 positive of 10"):
        fit_linear_probe(embeddings, [1] + [0] * 9)
    with pytest.raises(ValueError, match="binary 0/1"):
        fit_linear_probe(embeddings, [0] * 10)


def test_linear_probe_checkpoint_predicts_as_the_sklearn_probe(pretrained, synthetic_meds, tmp_path):
    """The probe folded into a `classifier_head="linear"` checkpoint gives the scikit-learn probe's risks, before
    and after save/load, through `predict`, on rows it was not fitted on."""
    from ehr_transformer import EHRTransformerModel
    from ehr_transformer.data.dataset import build_labeled_dataset
    from ehr_transformer.inference import embed_sequences, predict_dataset
    from ehr_transformer.training.checkpoint import save_checkpoint
    from ehr_transformer.training.linear_probe import linear_probe_classifier

    pretrained_dir, _ = pretrained
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    tokenizer = EHREventTokenizer.from_pretrained(pretrained_dir)
    train = build_labeled_dataset(synthetic_meds, labels, tokenizer, "train", cache_dir=tmp_path / "cache")
    held_out = build_labeled_dataset(
        synthetic_meds, labels, tokenizer, "held_out", cache_dir=tmp_path / "cache"
    )
    model, _ = linear_probe_classifier(pretrained_dir, tokenizer, train, seed=0)
    assert model.config.classifier_head == "linear" and model.config.num_labels == 1
    assert model.config.problem_type == "multi_label_classification"
    assert not any(name.startswith("head.") for name in model.state_dict())
    backbone = EHRTransformerModel.from_pretrained(pretrained_dir).eval()
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    probe = fit_linear_probe(embed_sequences(backbone, tokenizer, train), train["labels"], seed=0)
    expected_train = probe.predict_proba(embed_sequences(backbone, tokenizer, train))[:, 1]
    expected = probe.predict_proba(embed_sequences(backbone, tokenizer, held_out))[:, 1]
    np.testing.assert_allclose(predict_dataset(model, train, tokenizer), expected_train, atol=1e-4)
    np.testing.assert_allclose(predict_dataset(model, held_out, tokenizer), expected, atol=1e-4)

    save_checkpoint(model, tokenizer, tmp_path / "probe")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "probe")
    assert reloaded.config.classifier_head == "linear"
    np.testing.assert_allclose(predict_dataset(reloaded, held_out, tokenizer), expected, atol=1e-4)
    predictions = predict(tmp_path / "probe", synthetic_meds, labels, split="held_out")
    assert predictions["subject_id"].to_list() == held_out["subject_id"]
    np.testing.assert_allclose(predictions["predicted_boolean_probability"].to_numpy(), expected, atol=1e-4)


def test_finetune_linear_probe_saves_a_checkpoint_with_its_card(pretrained, synthetic_meds, tmp_path):
    """`ehr-transformer finetune --linear_probe`: the label_fraction rows fine-tuning would use, a complete
    folder whose card says it is a linear probe, usable by `predict`."""
    from ehr_transformer.cli import main
    from ehr_transformer.data.dataset import build_labeled_dataset
    from ehr_transformer.data.dataset import subsample_labels as _subsample_labels
    from ehr_transformer.model_card import read_card_metadata
    from ehr_transformer.training.linear_probe import linear_probe_classifier

    pretrained_dir, _ = pretrained
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    output = tmp_path / "probe"
    argv = [
        "finetune",
        "--data_dir",
        str(synthetic_meds),
        "--labels",
        str(labels),
        "--label_fraction",
        "0.5",
        "--model_name_or_path",
        str(pretrained_dir),
        "--linear_probe",
        "--output_dir",
        str(output),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--use_cpu",
        "--seed",
        "3",
        "--eval_strategy",
        "epoch",
    ]
    assert main(argv) == 0
    assert {
        "config.json",
        "model.safetensors",
        "event_tokenizer.json",
        "modeling_ehr.py",
        "README.md",
    } <= set(os.listdir(output))
    card = (output / "README.md").read_text()
    assert "linear probe on frozen features" in card and "50% of training labels" in card
    assert "linear-probe" in read_card_metadata(output)["tags"]

    tokenizer = EHREventTokenizer.from_pretrained(pretrained_dir)
    train = build_labeled_dataset(synthetic_meds, labels, tokenizer, "train", cache_dir=tmp_path / "cache")
    same_rows, _ = linear_probe_classifier(
        pretrained_dir, tokenizer, _subsample_labels(train, 0.5, 3), seed=3
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(output)
    torch.testing.assert_close(reloaded.classifier.weight, same_rows.classifier.weight)
    predictions = predict(output, synthetic_meds, labels, split="held_out")
    assert predictions["predicted_boolean_probability"].is_between(0, 1).all()


def test_linear_probe_refuses_what_is_not_one_binary_label(pretrained, synthetic_meds, tmp_path):
    from datasets import Dataset

    from ehr_transformer.training.linear_probe import linear_probe_classifier

    pretrained_dir, _ = pretrained
    with pytest.raises(ValueError, match="binary 0/1 label.*regression"):
        linear_probe_classifier(pretrained_dir, None, Dataset.from_dict({"labels": [0.0, 1.0, 2.5]}))
    with pytest.raises(ValueError, match="multitask"):
        linear_probe_classifier(pretrained_dir, None, Dataset.from_dict({"labels": [[1.0, 0.0], [0.0, 1.0]]}))
    label_dir = synthetic_meds / "labels"
    two_tasks = [
        f"mortality={label_dir / 'in_hospital_mortality.parquet'}",
        f"stay={label_dir / 'long_length_of_stay.parquet'}",
    ]
    with pytest.raises(ValueError, match="one binary label file"):
        finetune(
            DataArguments(data_dir=str(synthetic_meds), task=two_tasks),
            ModelArguments(model_name_or_path=str(pretrained_dir)),
            FinetuningArguments(linear_probe=True),
            training_args(tmp_path),
        )
    with pytest.raises(ValueError, match="--model_name_or_path"):
        finetune(
            DataArguments(
                data_dir=str(synthetic_meds), labels=str(label_dir / "in_hospital_mortality.parquet")
            ),
            ModelArguments(),
            FinetuningArguments(linear_probe=True),
            training_args(tmp_path),
        )


def test_finetune_from_a_linear_probe_starts_at_the_probe_then_trains_every_weight(
    pretrained, synthetic_meds, tmp_path
):
    """`finetune --linear_probe_init` (LP-FT): without a gradient step (learning rate 0) the checkpoint predicts
    exactly as the linear probe on the same rows; with steps, the backbone and the head both move from there;
    what it cannot start from is refused."""
    from ehr_transformer import EHRTransformerModel
    from ehr_transformer.data.dataset import build_labeled_dataset
    from ehr_transformer.data.dataset import subsample_labels as _subsample_labels
    from ehr_transformer.inference import predict_dataset
    from ehr_transformer.training.linear_probe import linear_probe_classifier

    pretrained_dir, _ = pretrained
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    data = DataArguments(data_dir=str(synthetic_meds), labels=str(labels), cache_dir=str(tmp_path / "c"))
    model_args = ModelArguments(model_name_or_path=str(pretrained_dir))
    lpft = FinetuningArguments(label_fraction=0.5, linear_probe_init=True, ensemble=1)
    tokenizer = EHREventTokenizer.from_pretrained(pretrained_dir)
    train = build_labeled_dataset(synthetic_meds, labels, tokenizer, "train", cache_dir=tmp_path / "c")
    held_out = build_labeled_dataset(synthetic_meds, labels, tokenizer, "held_out", cache_dir=tmp_path / "c")
    probe, _ = linear_probe_classifier(pretrained_dir, tokenizer, _subsample_labels(train, 0.5, 3), seed=3)

    unmoved = finetune(data, model_args, lpft, training_args(tmp_path / "lr0", learning_rate=0.0, seed=3))
    assert unmoved.config.classifier_head == "linear"
    np.testing.assert_allclose(
        predict_dataset(unmoved, held_out, tokenizer), predict_dataset(probe, held_out, tokenizer), atol=1e-5
    )

    tuned = finetune(data, model_args, lpft, training_args(tmp_path / "lpft", learning_rate=1e-3, seed=3))
    assert not torch.allclose(tuned.classifier.weight, probe.classifier.weight)
    backbone = EHRTransformerModel.from_pretrained(pretrained_dir).state_dict()
    moved = [
        name for name, tensor in tuned.model.state_dict().items() if not torch.equal(tensor, backbone[name])
    ]
    assert len(moved) > len(backbone) // 2, f"only {moved} of the backbone trained"
    assert "from a linear probe (LP-FT" in (tmp_path / "lpft" / "README.md").read_text()

    two_tasks = [f"death={labels}", f"stay={labels.parent / 'long_length_of_stay.parquet'}"]
    with pytest.raises(ValueError, match="--linear_probe_init.*one binary label file"):
        finetune(
            dataclasses.replace(data, labels=None, task=two_tasks),
            model_args,
            lpft,
            training_args(tmp_path / "x"),
        )
    with pytest.raises(ValueError, match="--linear_probe_init.*--model_name_or_path"):
        finetune(data, ModelArguments(), lpft, training_args(tmp_path / "y"))


def test_a_one_label_head_on_a_two_label_config_reports_no_mismatch(caplog):
    """Fine-tuning one binary outcome from a checkpoint whose config carries the default two label names starts
    with clean logs: the stale names are dropped, not reported as "incompatible"."""
    from transformers.utils import logging as hf_logging

    from ehr_transformer.training.checkpoint import BINARY_HEAD
    from ehr_transformer.training.checkpoint import with_tasks as _with_tasks

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            config = _with_tasks(EHRTransformerConfig(vocab_size=20), **BINARY_HEAD)
    finally:
        hf_logging.disable_propagation()
    assert "incompatible" not in caplog.text
    assert config.num_labels == 1 and config.id2label == {0: "LABEL_0"}


def test_finetune_on_labels_of_absent_subjects_stops_with_the_counts(synthetic_meds, tmp_path):
    """Was a numpy reshape error in `init_bias_to_prevalence`; now one sentence naming the file and the counts."""
    import datetime as dt

    from ehr_transformer.data.dataset import NoUsableRowsError

    absent = tmp_path / "absent.parquet"
    pl.DataFrame(
        {
            "subject_id": [10**9, 10**9 + 1],
            "prediction_time": [dt.datetime(2020, 1, 1)] * 2,
            "boolean_value": [True, False],
        }
    ).write_parquet(absent)
    with pytest.raises(
        NoUsableRowsError,
        match=r"absent\.parquet: no usable label row is left in split 'train': 2 rows read, 2 not in split 'train'",
    ):
        finetune(
            DataArguments(
                data_dir=str(synthetic_meds), labels=str(absent), cache_dir=str(tmp_path / "cache")
            ),
            ModelArguments(**TINY),
            FinetuningArguments(),
            training_args(tmp_path / "out"),
        )
