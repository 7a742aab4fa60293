"""The `ehr-risk` pipeline: `transformers.pipeline("ehr-risk", model=folder)` scores a patient's MEDS events from a
local folder, offline, with the probabilities that `predict` gives; and the binary head's convention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import REPO_ROOT

from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification
from ehr_transformer.data.dataset import build_labeled_dataset
from ehr_transformer.data.meds import read_events
from ehr_transformer.data.splits import iter_split_events
from ehr_transformer.inference import predict_dataset
from ehr_transformer.pipeline_ehr import EHRRiskPipeline  # registers "ehr-risk"
from ehr_transformer.tokenization_ehr import EHREventTokenizer
from ehr_transformer.training.checkpoint import BINARY_HEAD, with_tasks

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def tokenizer(synthetic_meds) -> EHREventTokenizer:
    return EHREventTokenizer.fit(iter_split_events(synthetic_meds, "train"), min_code_count=3, max_length=48)


def classifier(tokenizer, **head) -> EHRTransformerForSequenceClassification:
    torch.manual_seed(0)
    config = EHRTransformerConfig(vocab_size=tokenizer.vocab_size, temperature=1.7, **TINY, **head)
    return EHRTransformerForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def binary_folder(tokenizer, tmp_path_factory) -> Path:
    from ehr_transformer.training.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("pipeline") / "finetuned"
    save_checkpoint(
        classifier(tokenizer, **{k: v for k, v in BINARY_HEAD.items() if v is not None}), tokenizer, folder
    )
    return folder


@pytest.fixture(scope="module")
def held_out(synthetic_meds, tokenizer):
    labels = pl.read_parquet(synthetic_meds / "labels" / "in_hospital_mortality.parquet")
    dataset = build_labeled_dataset(synthetic_meds, labels, tokenizer, split="held_out").select(range(5))
    events = read_events(synthetic_meds, subject_ids=sorted(set(dataset["subject_id"])))
    frames = [events.filter(pl.col("subject_id") == s) for s in dataset["subject_id"]]
    return dataset, frames, list(dataset["prediction_time"])


def test_pipeline_in_a_fresh_offline_process_scores_as_predict(binary_folder, held_out, tmp_path):
    dataset, frames, times = held_out
    model = EHRTransformerForSequenceClassification.from_pretrained(binary_folder)
    expected = predict_dataset(model, dataset, EHREventTokenizer.from_pretrained(binary_folder))
    for i, frame in enumerate(frames):
        frame.write_parquet(tmp_path / f"{i}.parquet")
    script = textwrap.dedent(
        f"""
        import json, sys
        import polars as pl
        from transformers import pipeline
        from ehr_transformer.pipeline_ehr import register_pipeline

        register_pipeline()
        register_pipeline()  # twice: harmless
        risk = pipeline("ehr-risk", model={str(binary_folder)!r}, device="cpu")
        frames = [pl.read_parquet({str(tmp_path)!r} + f"/{{i}}.parquet") for i in range({len(frames)})]
        times = [{", ".join(repr(t) for t in times)}]
        out = {{
            "one": risk(frames[0], prediction_time=times[0]),
            "lists": risk(frames, prediction_time=times),
            "dicts": risk([{{"events": f, "prediction_time": t}} for f, t in zip(frames, times)], batch_size=2),
            "pandas": risk(frames[1].to_pandas(), prediction_time=times[1].isoformat()),
            "type": type(risk).__name__,
        }}
        json.dump(out, sys.stdout)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HOME": str(tmp_path / "hf_home"),  # an empty cache: nothing comes from the hub
    }
    run = subprocess.run(
        [sys.executable, "-c", "import datetime\n" + script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["type"] == "EHRRiskPipeline"
    assert set(out["one"]) == {"probability"}
    assert out["one"]["probability"] == pytest.approx(float(expected[0]), abs=1e-6)
    np.testing.assert_allclose([r["probability"] for r in out["lists"]], expected, atol=1e-6)
    np.testing.assert_allclose([r["probability"] for r in out["dicts"]], expected, atol=1e-6)
    assert out["pandas"]["probability"] == pytest.approx(float(expected[1]), abs=1e-6)


def test_pipeline_outputs_by_head(tokenizer, held_out):
    from transformers import pipeline

    _, frames, times = held_out
    encoding = tokenizer(frames[0], prediction_time=times[0])
    heads = {
        "multitask": dict(
            task_names=["mortality", "length_of_stay"], task_types=["binary", "regression"], num_labels=2
        ),
        "regression": dict(num_labels=1, problem_type="regression"),
        "multiclass": dict(num_labels=3, problem_type="single_label_classification"),
        "multilabel": dict(num_labels=2, problem_type="multi_label_classification"),
    }
    for name, head in heads.items():
        model = classifier(tokenizer, **head)
        risk = pipeline("ehr-risk", model=model, tokenizer=tokenizer, device="cpu")
        assert isinstance(risk, EHRRiskPipeline)
        out = risk(frames[0], prediction_time=times[0])
        with torch.no_grad():
            logits = model(**encoding).logits[0]  # temperature-scaled in eval mode, as the pipeline
        if name == "multitask":
            assert list(out) == ["mortality", "length_of_stay"]
            assert out["mortality"] == pytest.approx(float(torch.sigmoid(logits[0])), abs=1e-6)
            assert out["length_of_stay"] == pytest.approx(float(logits[1]), abs=1e-6)
        elif name == "regression":
            assert out == {"value": pytest.approx(float(logits[0]), abs=1e-6)}
        elif name == "multiclass":
            assert list(out["probabilities"]) == ["LABEL_0", "LABEL_1", "LABEL_2"]
            assert sum(out["probabilities"].values()) == pytest.approx(1.0)
        else:
            np.testing.assert_allclose(list(out["probabilities"].values()), torch.sigmoid(logits), atol=1e-6)


def test_pipeline_needs_the_event_tokenizer(tokenizer):
    from transformers import pipeline

    with pytest.raises(ValueError, match="needs the checkpoint's event tokenizer"):
        pipeline("ehr-risk", model=classifier(tokenizer, num_labels=1), device="cpu")


def test_binary_convention_is_one_logit_bce_unchanged(tokenizer, held_out):
    """The binary head stays `num_labels=1, problem_type="multi_label_classification"`: transformers' BCE path on one
    logit, bit-identical to BCE-with-logits on that logit; the probability is its sigmoid."""
    dataset, frames, times = held_out
    config = with_tasks(EHRTransformerConfig(vocab_size=tokenizer.vocab_size, **TINY), **BINARY_HEAD)
    assert (config.num_labels, config.problem_type) == (1, "multi_label_classification")
    torch.manual_seed(0)
    model = EHRTransformerForSequenceClassification(config).eval()
    batch = tokenizer(frames, prediction_time=times)
    y = torch.tensor(dataset["labels"], dtype=torch.float32)
    with torch.no_grad():
        out = model(**batch, labels=y)
    assert out.logits.shape == (len(frames), 1)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], y)
    assert torch.equal(out.loss, manual)
    docs = (REPO_ROOT / "docs" / "checkpoints.md").read_text()
    assert "## The binary convention" in docs and "multi_label_classification" in docs
    assert "binary convention" in EHRTransformerConfig.__doc__
