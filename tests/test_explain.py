"""Integrated-gradient explanations: completeness, zero attribution of padding, and a planted driver event."""

import math
from datetime import datetime, timedelta

import polars as pl
import pytest
import torch

from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification
from ehr_transformer.data.collators import DataCollatorForEventClassification
from ehr_transformer.evaluation.explain import explain, format_events, integrated_gradients
from ehr_transformer.tokenization_ehr import EHREventTokenizer

CODES = ["LAB//lactate", *[f"VITAL//{i}" for i in range(12)]]
DRIVER = "LAB//lactate"


def make_tokenizer() -> EHREventTokenizer:
    stats = {code: {"median": 2.0, "scale": 0.5, "count": 100} for code in CODES}
    return EHREventTokenizer(CODES, stats, max_length=32, min_code_count=1)


def make_model(tokenizer, seed=0, layers=2, unpad=True) -> EHRTransformerForSequenceClassification:
    torch.manual_seed(seed)
    config = EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
        problem_type="multi_label_classification",
        hidden_dropout_prob=0.0,
        embedding_dropout=0.0,
        classifier_dropout=0.0,
        initializer_range=0.2,
        unpad_inputs=unpad,
    )
    return EHRTransformerForSequenceClassification(config).eval()


def make_rows(tokenizer, n, seed=0, driver_every=2):
    """Rows as the dataset builder makes them: [CLS], then events with a value, times in hours."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    driver = tokenizer.convert_codes_to_ids(DRIVER)
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(driver + 1, tokenizer.vocab_size, (length,), generator=g).tolist()
        positive = i % driver_every == 0
        if positive:
            ids[int(torch.randint(0, length, (1,), generator=g))] = driver
        values = torch.randn(length, generator=g).tolist()
        rows.append(
            {
                "input_ids": [tokenizer.cls_token_id, *ids],
                "values": [float("nan"), *values],
                "times": [0.0, *sorted(torch.rand(length, generator=g).mul(24).tolist())],
                "ages": [60.0] * (length + 1),
            }
        )
        labels.append(float(positive))
    return rows, labels


@pytest.mark.parametrize("unpad", [True, False])
def test_completeness_attributions_sum_to_logit_difference(unpad):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, unpad=unpad)
    rows, _ = make_rows(tokenizer, 6, seed=1)
    batch = DataCollatorForEventClassification(tokenizer)(rows)
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of the check
    attributions, logits, baseline = integrated_gradients(model, batch, steps=128)
    assert attributions.shape == batch["input_ids"].shape
    gap = logits - baseline
    assert gap.abs().max() > 1e-2  # a non-trivial check
    tolerance = 2e-3 + 0.01 * gap.abs().max().item()
    torch.testing.assert_close(attributions.sum(dim=1), gap, atol=tolerance, rtol=0)


def test_an_ensembles_attributions_sum_to_its_logit_difference():
    """The default fine-tuned model is an ensemble: its networks' embeddings move along one path together."""
    from ehr_transformer.modeling_ehr import EHRTransformerEnsembleForSequenceClassification

    tokenizer = make_tokenizer()
    config = make_model(tokenizer).config
    config.ensemble_size = 3
    torch.manual_seed(0)
    model = EHRTransformerEnsembleForSequenceClassification(config).eval()
    rows, _ = make_rows(tokenizer, 6, seed=1)
    batch = DataCollatorForEventClassification(tokenizer)(rows)
    attributions, logits, baseline = integrated_gradients(model, batch, steps=128)
    gap = logits - baseline
    assert gap.abs().max() > 1e-2
    torch.testing.assert_close(logits, model(**batch).logits[:, 0])
    tolerance = 2e-3 + 0.01 * gap.abs().max().item()
    torch.testing.assert_close(attributions.sum(dim=1), gap, atol=tolerance, rtol=0)


@pytest.mark.parametrize("unpad", [True, False])
def test_padding_gets_zero_attribution_and_is_never_reported(unpad):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, unpad=unpad)
    rows, _ = make_rows(tokenizer, 4, seed=2)
    rows[0] = {k: v[:3] for k, v in rows[0].items()}  # much shorter than the others: lots of padding
    batch = DataCollatorForEventClassification(tokenizer)(rows)
    pad = batch["attention_mask"] == 0
    assert pad.any()
    attributions, logits, baseline = integrated_gradients(model, batch, steps=64)
    assert torch.all(attributions[pad] == 0)
    # the real events alone account for the whole logit difference: padding carried nothing
    gap = logits - baseline
    torch.testing.assert_close(
        attributions.sum(dim=1), gap, atol=5e-3 + 0.02 * gap.abs().max().item(), rtol=0
    )
    # and padding does not change any attribution of the short row
    alone, _, _ = integrated_gradients(
        model, DataCollatorForEventClassification(tokenizer)(rows[:1]), steps=64
    )
    torch.testing.assert_close(attributions[0, :3], alone[0], atol=1e-4, rtol=1e-3)
    top = explain(model, tokenizer, rows, top_k=50, steps=8)
    assert len(top[0]) == 2  # 3 positions: [CLS] + 2 events
    for events in top:
        assert all(e["code"] not in ("[PAD]", "[CLS]") for e in events)


def test_explain_fields_and_raw_values():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    rows, _ = make_rows(tokenizer, 3, seed=3)
    top = explain(model, tokenizer, rows, top_k=3, steps=8)
    assert [len(t) for t in top] == [3, 3, 3]
    for events, row in zip(top, rows, strict=True):
        magnitudes = [abs(e["attribution"]) for e in events]
        assert magnitudes == sorted(magnitudes, reverse=True)
        for e in events:
            assert set(e) == {"code", "time", "value", "value_normalized", "attribution"}
            assert e["code"] in CODES
            assert 0.0 <= e["time"] <= 24.0
            assert math.isclose(e["value"], 2.0 + 0.5 * e["value_normalized"], rel_tol=1e-5)
            assert any(math.isclose(e["value_normalized"], v, rel_tol=1e-5) for v in row["values"][1:])
    assert "@" in format_events(top[0])
    # a collated batch gives the same answer as the rows
    batch = DataCollatorForEventClassification(tokenizer)(rows)
    assert explain(model, tokenizer, batch, top_k=3, steps=8) == top
    with pytest.raises(ValueError, match="unknown method"):
        explain(model, tokenizer, rows, method="attention_rollout")


def test_planted_driver_event_ranks_first():
    """Label = 'a lactate event is present': after a little training, lactate gets the largest attribution."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=0, layers=1)
    rows, labels = make_rows(tokenizer, 256, seed=4)
    collator = DataCollatorForEventClassification(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(12):
        for start in range(0, len(rows), 32):
            features = [
                {**r, "labels": y}
                for r, y in zip(rows[start : start + 32], labels[start : start + 32], strict=True)
            ]
            loss = model(**collator(features)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    test_rows, test_labels = make_rows(tokenizer, 16, seed=5)
    positives = [r for r, y in zip(test_rows, test_labels, strict=True) if y == 1.0]
    top = explain(model, tokenizer, positives, top_k=3, steps=32)
    firsts = [events[0]["code"] for events in top]
    assert firsts.count(DRIVER) == len(positives), firsts
    assert all(events[0]["attribution"] > 0 for events in top)


def test_predict_cli_explain_column(tmp_path):
    """`ehr-transformer predict --explain N` adds a `top_events` column (list of structs)."""
    from ehr_transformer.cli import main
    from ehr_transformer.data.writer import write_meds
    from ehr_transformer.training.checkpoint import save_checkpoint

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "checkpoint")
    subjects = list(range(1, 7))
    start = datetime(2000, 1, 1)
    events = pl.DataFrame(
        {
            "subject_id": [s for s in subjects for _ in range(4)],
            "time": [None, start, start + timedelta(hours=1), start + timedelta(hours=2)] * len(subjects),
            "code": ["VITAL//1", DRIVER, "VITAL//2", "VITAL//3"] * len(subjects),
            "numeric_value": [None, 2.5, 80.0, None] * len(subjects),
        },
        schema_overrides={"numeric_value": pl.Float32},
    )
    labels = pl.DataFrame(
        {
            "subject_id": subjects,
            "prediction_time": [start + timedelta(hours=3)] * 6,
            "boolean_value": [True, False] * 3,
        }
    )
    splits = pl.DataFrame({"subject_id": subjects, "split": ["held_out"] * 6})
    meds = write_meds(tmp_path / "meds", events, splits, labels={"task": labels})
    output = tmp_path / "predictions.parquet"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--data_dir",
                str(meds),
                "--labels",
                str(meds / "labels" / "task.parquet"),
                "--output_file",
                str(output),
                "--explain",
                "2",
            ]
        )
        == 0
    )
    predictions = pl.read_parquet(output)
    assert predictions.height == 6
    top = predictions["top_events"].to_list()
    assert all(len(events) == 2 for events in top)
    assert {e["code"] for events in top for e in events} <= {DRIVER, "VITAL//1", "VITAL//2", "VITAL//3"}
    lactate = [e for events in top for e in events if e["code"] == DRIVER]
    assert all(math.isclose(e["value"], 2.5, rel_tol=1e-4) for e in lactate)
