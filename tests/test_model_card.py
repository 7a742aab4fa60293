"""Model cards: hub-valid YAML metadata (parsed offline with huggingface_hub), every section a user needs,
evaluation results that round-trip through the model-index, and no private data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import REPO_ROOT
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import TrainingArguments

from ehr_transformer import EHREventTokenizer, EHRTransformerConfig
from ehr_transformer.model_card import data_summary, read_card_metadata, render_model_card
from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
from ehr_transformer.training.pretrain import pretrain

SECTIONS = (
    "## Intended use",
    "## Out-of-scope use",
    "## Training data",
    "## Training",
    "## Population summary",
    "## Evaluation",
    "## Calibration",
    "## Limitations and known biases",
)
HUB_FIELDS = ("library_name", "license", "tags", "metrics")


@pytest.fixture(scope="module")
def pretrained(synthetic_meds, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("card") / "pretrained"
    args = TrainingArguments(
        str(output),
        max_steps=4,
        per_device_train_batch_size=16,
        save_strategy="steps",  # Trainer checkpoints during the run, removed once it has finished
        save_steps=2,
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    model_args = ModelArguments(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    data_args = DataArguments(
        data_dir=str(synthetic_meds), cache_dir=str(output.parent / "cache"), max_length=64, min_code_count=3
    )
    pretrain(data_args, model_args, PretrainingArguments(), args)
    return output


def check_hub_metadata(text: str) -> ModelCard:
    """Parse a card as the hub does (offline): YAML into ModelCardData, the model-index into EvalResults."""
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for name in HUB_FIELDS:
        assert data.get(name), f"card metadata lacks {name!r}"
    assert data["library_name"] == "transformers"
    # no pipeline_tag: none that `transformers.pipeline` knows takes MEDS events ("ehr-risk" is a tag instead)
    assert "pipeline_tag" not in data
    assert isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])
    assert ModelCardData(**data).to_dict() == data  # only fields the hub's dataclass round-trips
    return card


def test_saved_pretrained_card_is_hub_valid_and_complete(pretrained, synthetic_meds):
    text = (pretrained / "README.md").read_text()
    card = check_hub_metadata(text)
    assert card.data.datasets == ["synthetic_400_seed0"]  # the MEDS dataset's name
    assert "ehr-risk" not in card.data.tags  # a backbone, not a classifier
    # a finished run's folder: no Trainer checkpoint-N/ (optimizer pickles), its log history kept
    assert not list(pretrained.glob("checkpoint-*"))
    assert (pretrained / "trainer_state.json").is_file()
    for section in SECTIONS:
        assert section in text, section
    # training data: cohort sizes, code systems, time span (calendar years only), the subject threshold
    assert re.search(r"Subjects: .*train: \d", text)
    assert "LOINC" in text and "ICD10CM" in text
    assert re.search(r"calendar years 20\d\d-20\d\d", text)
    assert "at least 3 training" in text
    # pretraining objectives and hyperparameters
    assert (
        "masked code prediction" in text
        and "learning rate" in text
        and "Architecture: 16 wide, 2 layers" in text
    )
    # nothing of a real event's date or a subject id
    events = pl.read_parquet(sorted((synthetic_meds / "data").glob("**/*.parquet")))
    days = set(events["time"].drop_nulls().dt.strftime("%Y-%m-%d").unique().to_list())
    assert not days & set(re.findall(r"\d{4}-\d{2}-\d{2}", text))
    assert "subject_id" not in text


def test_evaluated_card_carries_a_model_index_with_intervals_and_subgroups(pretrained):
    from ehr_transformer.evaluation.report import task_report

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.2).astype(int)
    p = np.clip(0.2 + 0.3 * (y - 0.2) + rng.normal(scale=0.15, size=400), 0.01, 0.99)
    groups = {
        "sex": np.where(rng.random(400) < 0.5, "F", "M"),
        "age_band": np.where(rng.random(400) < 0.5, "18-64", "65+"),
    }
    report = task_report("binary", y, p, n_bootstrap=50, groups=groups)
    tokenizer = EHREventTokenizer.from_pretrained(pretrained)
    config = EHRTransformerConfig.from_pretrained(pretrained)
    text = render_model_card(
        config,
        kind="fine-tuned",
        task="in_hospital_mortality",
        evaluation=report,
        datasets=["my-hospital/meds"],
        data=data_summary({"train": 280, "tuning": 60, "held_out": 60}, 12345, tokenizer),
        training={"learning rate": 1e-3},
    )
    card = check_hub_metadata(text)
    assert card.data.pipeline_tag is None and "ehr-risk" in card.data.tags
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "ehr-transformer in_hospital_mortality"
    values = {r.metric_type: r.metric_value for r in results}
    assert values["roc_auc"] == pytest.approx(report["auroc"]["estimate"], abs=1e-4)
    assert values["brier_score"] == pytest.approx(report["brier"], abs=1e-4)
    assert {r.dataset_name for r in results} == {"my-hospital/meds"} and {
        r.dataset_split for r in results
    } == {"held_out"}
    assert "95% CI" in text and "By sex" in text and "By age band" in text
    assert "expected calibration error" in text


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "model_cards").glob("*.md")), ids=lambda p: p.name)
def test_example_cards_in_the_repository_are_hub_valid(path):
    if path.name == "README.md":
        pytest.skip("the folder's own README, not a card")
    text = path.read_text()
    check_hub_metadata(text)
    for section in SECTIONS:
        assert section in text, f"{path.name} lacks {section}"
    metadata = yaml.safe_load(text.split("---\n", 2)[1])
    if "model-index" in metadata:
        _, results = model_index_to_eval_results(metadata["model-index"])
        assert results and all(0.0 <= r.metric_value <= 1.0 for r in results)


def test_finetuned_folder_names_the_dataset_holds_no_trainer_checkpoints_and_loads_quietly(
    pretrained, synthetic_meds, tmp_path, capfd
):
    """A fine-tuned card names the MEDS folder's `dataset_name` (metadata/dataset.json) in `datasets` and, once
    evaluated, in its model-index; the finished folder holds no `checkpoint-N/`; loading the pretrained folder into
    a classifier prints neither transformers' LOAD REPORT nor its "Loading weights" bar."""
    import json

    from ehr_transformer.training.arguments import FinetuningArguments
    from ehr_transformer.training.finetune import finetune

    output = tmp_path / "finetuned"
    args = TrainingArguments(
        str(output),
        max_steps=4,
        per_device_train_batch_size=16,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    labels = str(synthetic_meds / "labels" / "in_hospital_mortality.parquet")
    data_args = DataArguments(
        data_dir=str(synthetic_meds), labels=labels, cache_dir=str(pretrained.parent / "cache")
    )
    capfd.readouterr()
    finetune(data_args, ModelArguments(model_name_or_path=str(pretrained)), FinetuningArguments(), args)
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed
    assert "Loading weights" not in printed
    assert not list(output.glob("checkpoint-*"))
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "event_tokenizer.json", "README.md"} <= names
    assert not [name for name in names if name.endswith((".pt", ".pth", ".bin"))]
    card = check_hub_metadata((output / "README.md").read_text())
    assert card.data.datasets == ["synthetic_400_seed0"] and "ehr-risk" in card.data.tags
    fields = json.loads((output / "model_card_fields.json").read_text())
    report = {
        "n": 100,
        "prevalence": 0.1,
        "auroc": {"estimate": 0.7},
        "auprc": {"estimate": 0.3},
        "brier": 0.09,
        "ece": 0.02,
    }
    evaluated = render_model_card(EHRTransformerConfig.from_pretrained(output), evaluation=report, **fields)
    _, results = model_index_to_eval_results(check_hub_metadata(evaluated).data.to_dict()["model-index"])
    assert {r.dataset_name for r in results} == {"synthetic_400_seed0"}


def test_read_card_metadata_refuses_a_card_without_yaml(tmp_path):
    (tmp_path / "README.md").write_text("# no metadata\n")
    with pytest.raises(ValueError, match="no YAML metadata"):
        read_card_metadata(tmp_path)


def test_quiet_loading_still_warns_about_weights_it_did_not_expect(pretrained, caplog, capfd):
    """`load_pretrained` hides the LOAD REPORT of expected differences only: a classifier built on a pretrained
    folder is quiet when told that its classification layer is new, and warns (one line) when it was not told."""
    import logging

    from ehr_transformer.loading import ANY_HEAD, CLASSIFIER_LAYERS, load_pretrained
    from ehr_transformer.modeling_ehr import EHRTransformerForSequenceClassification

    with caplog.at_level(logging.WARNING, logger="ehr_transformer.loading"):
        load_pretrained(
            EHRTransformerForSequenceClassification,
            pretrained,
            expected_missing=CLASSIFIER_LAYERS,
            expected_unexpected=ANY_HEAD,
            num_labels=1,
            problem_type="multi_label_classification",
        )
        assert not caplog.records
        load_pretrained(EHRTransformerForSequenceClassification, pretrained, expected_unexpected=ANY_HEAD)
    assert len(caplog.records) == 1 and "classifier.weight" in caplog.records[0].getMessage()
    printed = "".join(capfd.readouterr())
    assert "LOAD REPORT" not in printed and "Loading weights" not in printed
