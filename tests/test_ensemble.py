"""The cross-fitted ensemble of `finetune --ensemble K`: one classifier that averages its networks' probabilities,
saved and loaded as one folder, trained on parts of the training subjects that never split a subject."""

import json

import datasets
import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, TrainingArguments

from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification
from ehr_transformer.adaptation import adapt_checkpoint
from ehr_transformer.data.dataset import ensemble_parts
from ehr_transformer.inference import predict
from ehr_transformer.modeling_ehr import EHRTransformerEnsembleForSequenceClassification
from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
from ehr_transformer.training.finetune import ENSEMBLE_MEMBERS, ENSEMBLE_STATE_FILE, finetune

HEADS = {
    "binary": dict(num_labels=1, problem_type="multi_label_classification"),
    "multiclass": dict(num_labels=3, problem_type="single_label_classification"),
    "regression": dict(num_labels=1, problem_type="regression", regression_target_scale=[[5.0, 2.0]]),
}


def tiny(**kwargs) -> EHRTransformerConfig:
    return EHRTransformerConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        **kwargs,
    )


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, 40, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return dict(input_ids=input_ids, attention_mask=mask, values=torch.randn(3, 6, generator=generator))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_the_ensemble_answers_with_its_networks_average(kind, tmp_path):
    torch.manual_seed(0)
    ensemble = EHRTransformerEnsembleForSequenceClassification(tiny(ensemble_size=3, **HEADS[kind])).eval()
    inputs = batch()
    logits = ensemble(**inputs).logits  # (B, C)
    members = torch.stack([member(**inputs).logits for member in ensemble.members])  # (K, B, C)
    if kind == "binary":
        expected = torch.sigmoid(members).mean(0)
        torch.testing.assert_close(torch.sigmoid(logits), expected)
    elif kind == "multiclass":
        torch.testing.assert_close(logits.softmax(-1), members.softmax(-1).mean(0))
    else:
        torch.testing.assert_close(logits, members.mean(0))
    assert not torch.allclose(members[0], members[1])  # the networks differ: the average is not one of them

    ensemble.save_pretrained(tmp_path)
    for loader in (AutoModelForSequenceClassification, EHRTransformerForSequenceClassification):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, EHRTransformerEnsembleForSequenceClassification)
        torch.testing.assert_close(reloaded(**inputs).logits, logits)
    with pytest.raises(
        ValueError, match="ensemble of 3 fine-tuned classifiers, which EHRTransformerModel cannot"
    ):
        AutoModel.from_pretrained(tmp_path)


def test_the_ensemble_loss_is_the_loss_of_its_combined_output():
    ensemble = EHRTransformerEnsembleForSequenceClassification(
        tiny(ensemble_size=2, **HEADS["binary"])
    ).eval()
    labels = torch.tensor([1.0, 0.0, 1.0])
    out = ensemble(**batch(), labels=labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], labels)
    torch.testing.assert_close(out.loss, expected)


def test_ensemble_parts_keep_subjects_whole_and_spread_the_positives():
    subject_ids = np.repeat(np.arange(40), 3)  # three prediction times per subject
    labels = np.repeat((np.arange(40) % 4 == 0).astype(float), 3)  # 10 positive subjects
    rows = datasets.Dataset.from_dict({"subject_id": subject_ids, "labels": labels})
    parts = ensemble_parts(rows, 5, seed=0)
    stops = np.concatenate([stop for _, stop in parts])
    assert sorted(stops.tolist()) == list(range(120))  # every row stops exactly one network
    for fit, stop in parts:
        assert not set(subject_ids[fit]) & set(subject_ids[stop])
        assert len(fit) + len(stop) == 120
        assert labels[stop].sum() == 6  # 2 positive subjects of 10, with their 3 rows each
    assert [s.tolist() for _, s in parts] == [s.tolist() for _, s in ensemble_parts(rows, 5, seed=0)]
    with pytest.raises(ValueError, match="an ensemble of 30 needs at least 60 training subjects, got 40"):
        ensemble_parts(rows, 30, seed=0)


def test_finetune_trains_an_ensemble_that_loads_predicts_and_cannot_be_fine_tuned_again(
    synthetic_meds, tmp_path
):
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    data = DataArguments(
        data_dir=str(synthetic_meds), labels=str(labels), cache_dir=str(tmp_path / "c"), max_length=64
    )
    size = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "ens"), max_steps=3, eval_strategy="steps", eval_steps=3, save_strategy="steps",
        save_steps=3, load_best_model_at_end=True, report_to=[], use_cpu=True, disable_tqdm=True, seed=4,
    )  # fmt: skip
    model = finetune(data, ModelArguments(**size), FinetuningArguments(ensemble=3), args)
    assert isinstance(model, EHRTransformerEnsembleForSequenceClassification)
    assert model.config.ensemble_size == 3 and len(model.members) == 3
    weights = [m.classifier.weight for m in model.members]
    assert not torch.equal(weights[0], weights[1])  # other seeds and other rows
    folder = tmp_path / "ens"
    assert not (folder / ENSEMBLE_MEMBERS).exists()  # the networks live in the one saved model
    assert "an ensemble of 3 networks" in (folder / "README.md").read_text()
    networks = json.loads((folder / ENSEMBLE_STATE_FILE).read_text())["networks"]
    assert [n["global_step"] for n in networks] == [3, 3, 3]
    assert (
        sum(n["stopping_rows"] for n in networks)
        == networks[0]["training_rows"] + networks[0]["stopping_rows"]
    )

    predictions = predict(folder, synthetic_meds, labels, split="held_out")
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert isinstance(reloaded, EHRTransformerEnsembleForSequenceClassification)
    assert predictions["predicted_boolean_probability"].is_between(0, 1).all()
    assert (
        predictions.height
        == pl.read_parquet(labels)
        .join(
            pl.read_parquet(synthetic_meds / "metadata" / "subject_splits.parquet").filter(
                pl.col("split") == "held_out"
            ),
            on="subject_id",
        )
        .height
    )

    adapted = adapt_checkpoint(folder, synthetic_meds, labels, tmp_path / "adapted", cache_dir=tmp_path / "c")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "adapted")
    assert reloaded.config.temperature == adapted.temperature != 1.0
    with pytest.raises(
        ValueError, match="ensemble of 3 networks and continued pretraining adapts one network's"
    ):
        adapt_checkpoint(folder, synthetic_meds, labels, tmp_path / "a2", continued_pretraining_max_steps=1)
    with pytest.raises(
        ValueError, match="is an ensemble of 3 fine-tuned classifiers; fine-tune from a pretrained"
    ):
        finetune(data, ModelArguments(model_name_or_path=str(folder)), FinetuningArguments(), args)


def test_a_network_already_trained_is_loaded_not_trained_again(synthetic_meds, tmp_path, caplog):
    """A killed ensemble run started again keeps the networks it finished."""
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    data = DataArguments(
        data_dir=str(synthetic_meds), labels=str(labels), cache_dir=str(tmp_path / "c"), max_length=64
    )
    size = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "ens"), max_steps=2, eval_strategy="no", save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    first = finetune(data, ModelArguments(**size), FinetuningArguments(ensemble=2), args)
    member = tmp_path / "ens" / ENSEMBLE_MEMBERS / "member_0"
    left = EHRTransformerForSequenceClassification(
        first.members[0].config.__class__(**first.config.to_dict())
    )
    left.config.ensemble_size = 1  # as the network's own folder holds it
    left.load_state_dict(first.members[0].state_dict())
    with torch.no_grad():
        left.classifier.weight.fill_(0.5)  # no training run would give this: proof the folder was read
    left.save_pretrained(member)  # as a killed run leaves its first network
    with caplog.at_level("INFO", logger="ehr_transformer.training.finetune"):
        again = finetune(data, ModelArguments(**size), FinetuningArguments(ensemble=2), args)
    assert torch.all(again.members[0].classifier.weight == 0.5)
    assert "ensemble network 1 of 2" not in caplog.text and "ensemble network 2 of 2" in caplog.text
    assert not member.exists()  # removed once the ensemble is saved
