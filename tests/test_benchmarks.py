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
