"""The real-data benchmark script on a tiny subset of the YAIB demo cohorts (`--quick`): runs and writes the
JSON shape the README and the issue rely on. Skips where ../shared/data/yaib_demo is absent."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

MODELS = {"transformer_scratch", "transformer_pretrained", "gbm_baseline"}


def _check_metrics(block: dict, metrics: set[str]) -> None:
    assert set(block) == MODELS
    for model, values in block.items():
        assert set(values) == metrics, model
        for metric, summary in values.items():
            assert set(summary) == {"mean", "std"}, (model, metric)
            assert isinstance(summary["mean"], float) and isinstance(summary["std"], float)
            assert summary["std"] >= 0.0


def test_quick_benchmark_writes_the_results_json(yaib_demo, tmp_path):
    output = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "yaib_demo.py"), "--data", str(yaib_demo),
         "--output", str(output), "--quick"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) == {"mortality24", "los", "meta"}
    assert set(results["mortality24"]) == {"eicu_cv", "eicu_to_mimic"}
    binary = {"auroc", "auprc", "brier", "ece"}
    _check_metrics(results["mortality24"]["eicu_cv"], binary)
    _check_metrics(results["mortality24"]["eicu_to_mimic"], binary)
    assert set(results["los"]) == {"eicu_cv"}
    _check_metrics(results["los"]["eicu_cv"], {"mae"})
    for model in MODELS:
        cv = results["mortality24"]["eicu_cv"][model]
        assert 0.0 <= cv["auroc"]["mean"] <= 1.0 and 0.0 <= cv["brier"]["mean"] <= 1.0
        assert results["los"]["eicu_cv"][model]["mae"]["mean"] > 0.0

    meta = results["meta"]
    assert meta["quick"] is True and meta["folds"] == 2 and meta["seeds"] == [0]
    assert meta["seconds"] > 0 and "yaib_demo.py" in meta["command"]
    assert {"cpu_count", "torch_threads", "load_average_at_start"} <= set(meta["machine"])
    # every model scored on the same folds: one row per (model, fold) in the CV, one per model in the transfer
    cv_rows = [r for r in meta["per_fold"] if r["task"] == "mortality24" and r["setting"] == "eicu_cv"]
    assert sorted((r["model"], r["fold"]) for r in cv_rows) == sorted((m, k) for m in MODELS for k in (0, 1))
    # no stay of a test fold in the pretraining corpus is asserted inside the script; the protocol is recorded
    assert "excluded by stay_id" in meta["protocol"]["pretraining"]
