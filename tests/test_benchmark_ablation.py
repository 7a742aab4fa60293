"""The pretraining ablation script on a tiny subset of the YAIB demo cohorts (`--quick`): every configuration runs
on the same rows, `pretrained_best` is chosen on validation data, and the JSON has the shape the README and the
issue rely on. Skips where ../shared/data/yaib_demo is absent."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

FRACTIONS = ["0.05", "0.1", "0.25", "0.5", "1.0"]
PRETRAINED = {"code", "value", "time", "feature", "all_static", "all_uncertainty", "all_gradnorm", "all_pcgrad"}
METRICS = {"auroc", "auprc", "ece", "brier"}


def test_quick_ablation_writes_the_results_json(yaib_demo, tmp_path):
    output = tmp_path / "ablation.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "pretraining_ablation.py"), "--data", str(yaib_demo),
         "--output", str(output), "--quick"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results) == {"low_label", "transfer", "meta"}
    assert list(results["low_label"]) == FRACTIONS
    for fraction, block in results["low_label"].items():
        expected = {"scratch", "scratch+probe", "gbm_baseline", "pretrained_best"}
        if fraction in ("0.1", "1.0"):  # the fractions at which every configuration runs, fine-tuned and probed
            expected |= PRETRAINED | {f"{c}+probe" for c in PRETRAINED}
        assert set(block) == expected, fraction
        for config, cell in block.items():
            assert set(cell) == METRICS, (fraction, config)
            assert 0.0 <= cell["auroc"]["mean"] <= 1.0 and cell["auroc"]["std"] >= 0.0
    transfer = results["transfer"]
    assert {"scratch", "gbm_baseline", "pretrained_best", "uncalibrated", "calibrated"} <= set(transfer)
    assert transfer["uncalibrated"] == transfer["pretrained_best"]
    for config in {f"{c}{head}" for c in PRETRAINED | {"scratch"} for head in ("", "+probe")}:
        # each distribution-calibration step alone and together, for the fine-tuned and the probed backbone
        assert {config, f"{config}+values_refit", f"{config}+temperature_only", f"{config}+calibrated"} <= set(transfer)

    meta = results["meta"]
    (choice,) = meta["choices"]
    # chosen on validation only: the objectives at 100% of labels (best head), then the head at each budget
    validation = choice["validation_auroc"]
    assert choice["pretrained_best"] == max(validation, key=lambda c: max(validation[c].values()))
    assert set(choice["heads"]) == set(FRACTIONS) and set(choice["heads"].values()) <= {"finetune", "probe"}
    rows = [r for r in meta["records"] if r["part"] == "low_label"]
    for fraction, head in choice["heads"].items():
        best = {r["head"]: r for r in rows if r["fraction"] == fraction and r["config"] == choice["pretrained_best"]}
        assert best[head]["validation_auroc"] == max(r["validation_auroc"] for r in best.values())
        assert results["low_label"][fraction]["pretrained_best"]["auroc"]["mean"] == best[head]["auroc"]
    rows = [r for r in meta["records"] if r["part"] == "low_label"]
    # all configurations of one fraction were trained on the same labelled stays
    for fraction in FRACTIONS:
        assert len({(r["n_labels"], r["n_positive"]) for r in rows if r["fraction"] == fraction}) == 1
    # each pretraining run logged its objectives' losses and weights
    assert {log["config"] for log in meta["pretraining_logs"]} == PRETRAINED
    for log in meta["pretraining_logs"]:
        objectives = ["code", "value", "time", "feature"] if log["config"].startswith("all_") else [log["config"]]
        assert {f"{o}_weight" for o in objectives} | {f"{o}_loss" for o in objectives} <= set(log["last_log"]), log
    assert (tmp_path / "ablation_learning_curve.png").stat().st_size > 0

    # the paired differences are the table's own figures, seed by seed (one seed here)
    paired = meta["paired_differences"]
    for fraction in FRACTIONS:
        low = results["low_label"][fraction]
        for reference in ("scratch", "scratch+probe", "gbm_baseline"):
            d = paired[f"low_label/{fraction}/auroc/pretrained_best_minus_{reference}"]
            assert d["n"] == 1
            assert abs(d["mean"] - (low["pretrained_best"]["auroc"]["mean"] - low[reference]["auroc"]["mean"])) < 1e-4
    d = paired["transfer/ece/pretrained_best_calibrated_minus_uncalibrated"]
    assert abs(d["mean"] - (transfer["calibrated"]["ece"]["mean"] - transfer["uncalibrated"]["ece"]["mean"])) < 1e-4

    # merging a seed with itself would count it twice: refused
    merged = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "pretraining_ablation.py"), "--merge", str(output), str(output),
         "--output", str(tmp_path / "merged.json")],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert merged.returncode != 0 and "count twice" in merged.stderr
    assert not (tmp_path / "merged.json").exists()
