"""Distribution calibration for a new population: temperature scaling, value refit, `adapt` end to end."""

import json
import logging
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from ehr_transformer import EHREventTokenizer
from ehr_transformer.adaptation import adapt_checkpoint, binary_nll, calibration_metrics, fit_temperature
from ehr_transformer.checkpoint_safety import check_checkpoint_folder
from ehr_transformer.cli import main
from ehr_transformer.data.splits import iter_split_events
from ehr_transformer.inference import predict
from ehr_transformer.privacy import scan_folder_for_leaks
from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
from ehr_transformer.training.finetune import finetune

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TASK = "in_hospital_mortality"


def overconfident_example(n=4000, seed=0):
    """Labels drawn from sigmoid(z), and logits 3 * z: the ranking is right, the probabilities far too extreme."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return 3.0 * z, y


def test_temperature_scaling_lowers_calibration_error_and_keeps_auroc():
    logits, y = overconfident_example()
    temperature = fit_temperature(logits, y)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = calibration_metrics(y, 1 / (1 + np.exp(-logits)))
    after = calibration_metrics(y, 1 / (1 + np.exp(-logits / temperature)))
    assert after["ece"] < 0.5 * before["ece"] and before["ece"] > 0.05
    assert after["brier"] < before["brier"]
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-12)
    # the fit is the minimum of the NLL, not just better than T = 1
    best = binary_nll(logits, y, temperature)
    assert best < binary_nll(logits, y, 1.0)
    assert best <= binary_nll(logits, y, temperature * 1.05) and best <= binary_nll(
        logits, y, temperature / 1.05
    )


def test_underconfident_logits_get_a_temperature_below_one():
    logits, y = overconfident_example(seed=1)
    assert fit_temperature(logits / 9.0, y) == pytest.approx(1 / 3, rel=0.1)


def test_fit_temperature_skips_missing_labels_and_refuses_one_class():
    logits, y = overconfident_example(n=1000)
    with_nan = np.stack([logits, logits], axis=1)  # two binary tasks share one temperature
    labels = np.stack([y, np.full_like(y, np.nan)], axis=1)
    assert fit_temperature(with_nan, labels) == pytest.approx(fit_temperature(logits, y), rel=1e-6)
    with pytest.raises(ValueError, match="both outcomes"):
        fit_temperature(logits, np.ones_like(y))
    with pytest.raises(ValueError, match="binary labels"):
        fit_temperature(logits, y * 2)


@pytest.fixture(scope="module")
def target_meds(synthetic_meds, tmp_path_factory):
    """The same cohort measured by another hospital: every numeric value is 2 x + 5 (other units, other lab)."""
    target = tmp_path_factory.mktemp("target") / "meds"
    shutil.copytree(synthetic_meds, target)
    for shard in sorted((target / "data").glob("**/*.parquet")):
        pl.read_parquet(shard).with_columns(pl.col("numeric_value") * 2 + 5).write_parquet(shard)
    return target


def test_refit_value_statistics_keeps_ids_and_follows_the_target(synthetic_meds, target_meds):
    source = EHREventTokenizer.fit(
        iter_split_events(synthetic_meds, "train"), min_code_count=3, max_length=64
    )
    refit = source.refit_value_statistics(iter_split_events(target_meds, "train"))
    assert refit.vocab == source.vocab and refit.ids_to_codes == source.ids_to_codes
    assert set(refit.value_statistics) == set(source.value_statistics) and source.value_statistics
    for code, stats in source.value_statistics.items():
        assert refit.value_statistics[code]["median"] == pytest.approx(
            2 * stats["median"] + 5, rel=1e-5, abs=1e-4
        )
        assert refit.value_statistics[code]["scale"] == pytest.approx(2 * stats["scale"], rel=1e-5)
    # so a target timeline encodes as its source twin did: same ids, same normalised values
    subject = pl.col("subject_id") == 3
    events = [next(iter_split_events(d, "train")).filter(subject) for d in (synthetic_meds, target_meds)]
    if events[0].height == 0:
        pytest.skip("subject 3 is not in the first training shard")
    a, b = source.encode(events[0]), refit.encode(events[1])
    assert a["input_ids"] == b["input_ids"]
    np.testing.assert_allclose(a["values"], b["values"], rtol=1e-4, atol=1e-4)
    stale = source.encode(events[1])  # the source's statistics on target values: shifted inputs
    assert not np.allclose(np.nan_to_num(stale["values"]), np.nan_to_num(a["values"]), atol=1e-2)


@pytest.fixture(scope="module")
def finetuned(synthetic_meds, tmp_path_factory):
    output = tmp_path_factory.mktemp("finetuned") / "model"
    args = TrainingArguments(
        output_dir=str(output),
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        max_steps=6,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    finetune(
        DataArguments(
            data_dir=str(synthetic_meds),
            labels=str(synthetic_meds / "labels" / f"{TASK}.parquet"),
            cache_dir=str(tmp_path_factory.mktemp("cache")),
            max_length=64,
            min_code_count=3,
        ),
        ModelArguments(**TINY),
        FinetuningArguments(ensemble=1),  # continued pretraining adapts one network's backbone
        args,
    )
    return output


def test_adapt_writes_a_loadable_folder_whose_predictions_use_the_temperature(
    finetuned, target_meds, tmp_path
):
    labels = target_meds / "labels" / f"{TASK}.parquet"
    output = tmp_path / "adapted"
    warnings = []  # transformers' own log records (its loggers do not propagate to pytest's caplog)
    collector = logging.Handler(logging.WARNING)
    collector.emit = warnings.append
    logging.getLogger("transformers").addHandler(collector)
    try:
        result = adapt_checkpoint(
            finetuned,
            target_meds,
            labels,
            output,
            continued_pretraining_max_steps=2,
            cache_dir=tmp_path / "cache",
        )
    finally:
        logging.getLogger("transformers").removeHandler(collector)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapted", "cache"]  # no staging folder left behind
    # continued pretraining loads the classifier without transformers' table of (expected) missing heads
    assert not [r for r in warnings if "LOAD REPORT" in r.getMessage()]
    check_checkpoint_folder(output)
    config = json.loads((output / "config.json").read_text())
    assert config["temperature"] == pytest.approx(result.temperature) and result.temperature != 1.0

    source_tokenizer = EHREventTokenizer.from_pretrained(finetuned)
    tokenizer = EHREventTokenizer.from_pretrained(output)
    assert tokenizer.vocab == source_tokenizer.vocab
    code, stats = next(iter(source_tokenizer.value_statistics.items()))
    assert tokenizer.value_statistics[code]["median"] == pytest.approx(
        2 * stats["median"] + 5, rel=1e-5, abs=1e-4
    )

    splits = pl.read_parquet(target_meds / "metadata" / "subject_splits.parquet").group_by("split").len()
    n_train = splits.filter(pl.col("split") == "train")["len"].item()
    assert result.counts["value_refit_subject_count"] == n_train
    assert result.continued_pretraining["steps"] == 2
    card = (output / "README.md").read_text()
    assert f"Task: {TASK}" in card and "- adapted\n" in card  # the card's task and its hub tag
    assert (
        f"refitted on {n_train} target subjects" in card and "2 steps of pretraining (code,value) on" in card
    )
    assert f"{result.temperature:.4f}, fitted on {result.counts['temperature_rows']} labelled" in card
    assert json.loads((output / "adaptation.json").read_text())["temperature"] == pytest.approx(
        result.temperature
    )
    subjects = pl.read_parquet(target_meds / "metadata" / "subject_splits.parquet")["subject_id"].to_list()

    def findings(folder):  # (file, kind, value): the card's counts can look like ids (e.g. "ADMISSION (3)")
        return {
            (f.file.rsplit("/", 1)[-1], f.kind, f.value)
            for f in scan_folder_for_leaks(folder, subjects, [], [])
        }

    assert findings(output) <= findings(finetuned)  # adapting adds no possible identifier

    # predict() of the folder gives sigmoid(raw logit / T): compare with the same weights at T = 1
    adapted = predict(output, target_meds, labels, split="tuning")
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    model.config.temperature = 1.0
    from ehr_transformer.data.dataset import build_labeled_dataset
    from ehr_transformer.inference import predict_logits

    raw = predict_logits(model, build_labeled_dataset(target_meds, labels, tokenizer, "tuning"), tokenizer)[
        :, 0
    ]
    np.testing.assert_allclose(
        adapted["predicted_boolean_probability"].to_numpy(),
        1 / (1 + np.exp(-raw / result.temperature)),
        atol=1e-5,
    )
    tuning = calibration_metrics(
        adapted["boolean_value"].to_numpy(), adapted["predicted_boolean_probability"].to_numpy()
    )
    assert tuning == pytest.approx(result.after["tuning"])

    with pytest.raises(FileExistsError, match="overwrite"):
        adapt_checkpoint(finetuned, target_meds, labels, output)


def test_temperature_only_adaptation_keeps_auroc_and_lowers_nll(finetuned, target_meds, tmp_path):
    labels = target_meds / "labels" / f"{TASK}.parquet"
    result = adapt_checkpoint(finetuned, target_meds, labels, tmp_path / "t_only", refit_values=False)
    for split in ("tuning", "held_out"):
        assert result.after[split]["auroc"] == pytest.approx(result.before[split]["auroc"], abs=1e-9)
    assert EHREventTokenizer.from_pretrained(tmp_path / "t_only") == EHREventTokenizer.from_pretrained(
        finetuned
    )
    assert result.continued_pretraining is None and "value_refit_subject_count" not in result.counts


def test_adapt_command_prints_before_and_after(finetuned, target_meds, tmp_path, capsys):
    labels = target_meds / "labels" / f"{TASK}.parquet"
    argv = [
        "adapt",
        "--checkpoint",
        str(finetuned),
        "--data_dir",
        str(target_meds),
        "--labels",
        str(labels),
        "--output_dir",
        str(tmp_path / "cli"),
        "--no_refit_values",
        "--eval_split",
        "",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "before  AUROC" in out and "after   AUROC" in out and "held_out" not in out
    assert (tmp_path / "cli" / "model.safetensors").exists()
    torch_config = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cli").config
    assert torch_config.temperature != 1.0
    assert torch.isfinite(torch.tensor(torch_config.temperature))
