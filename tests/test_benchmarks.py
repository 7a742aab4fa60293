"""The benchmark scripts run as documented (small settings) and write what the README reads."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message on machines without a GPU")
def test_gpu_benchmark_says_it_needs_a_gpu():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr


def test_throughput_benchmark_json_shape(tmp_path):
    output = tmp_path / "throughput.json"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "throughput.py"), "--output", str(output),
        "--hidden_size", "32", "--layers", "1", "--heads", "2", "--vocab_size", "64", "--batch_size", "4",
        "--batches", "2", "--repeats", "1", "--threads", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    for name in ("equal_lengths", "long_tailed"):
        row = data[name]
        assert row["ratio"] == pytest.approx(row["ours_events_per_s"] / row["bert_events_per_s"])
    assert data["equal_lengths"]["real_event_share_of_padded_batches"] == 1.0
    assert 0 < data["long_tailed"]["real_event_share_of_padded_batches"] < 1.0
    assert data["inference"]["ours_patients_per_s"] > 0 and data["inference"]["ours_single_patient_latency_ms"] > 0


def test_preprocess_benchmark_json_shape(tmp_path):
    output = tmp_path / "prep.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "preprocess.py"), "--subjects", "200", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.read_text())
    assert row["subjects"] == 200 and row["events"] > 200 and row["samples"] == 200
    assert row["events_per_s"] == pytest.approx(row["events"] / row["seconds"])
    assert row["peak_rss_mib"] > 0


def test_synthetic_pretraining_benchmark_pairs_pretrained_and_random_backbones(tmp_path):
    """benchmarks/synthetic_pretraining.py on a tiny setting: one row per (seed, corpus, label share) with both
    backbones' probe and fine-tuned AUROCs, and the summary's paired differences recomputable from those rows."""
    output = tmp_path / "synthetic_pretraining.json"
    command = [
        sys.executable, str(REPO_ROOT / "benchmarks" / "synthetic_pretraining.py"), "--output", str(output),
        "--seeds", "2", "--user_subjects", "300", "--corpus_subjects", "300", "--fractions", "0.5", "1.0",
        "--epochs", "1", "--probe_draws", "2", "--finetune_seeds", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert len(data["records"]) == 4 and data["meta"]["settings"]["seeds"] == 2
    for record in data["records"]:
        assert 0.0 <= record["pretrained"] <= 1.0 and 0.0 <= record["random"] <= 1.0
    cell = data["by_corpus_subjects"]["300"]["0.5"]
    rows = [r for r in data["records"] if r["fraction"] == 0.5]
    differences = [r["pretrained"] - r["random"] for r in rows]
    assert cell["pretrained_minus_random"]["mean"] == pytest.approx(sum(differences) / 2)
    assert cell["pretrained_minus_random"]["n_above_zero"] == sum(d > 0 for d in differences)
    assert cell["random"]["n"] == 2
    differences = [r["pretrained_finetuned"] - r["random_finetuned"] for r in rows]
    assert cell["pretrained_minus_scratch_finetuned"]["mean"] == pytest.approx(sum(differences) / 2)
