"""The real-data benchmark script on a tiny subset of the YAIB demo cohorts (`--quick`): runs and writes the
JSON shape the README and the issue rely on. Skips where ../shared/data/yaib_demo is absent."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

MODELS = {"transformer_scratch", "transformer_pretrained", "gbm_baseline", "gbm_bagged"}


def _check_metrics(block: dict, metrics: set[str], models: set[str] = MODELS) -> None:
    assert set(block) == models
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
    _check_metrics(results["los"]["eicu_cv"], {"mae"}, MODELS - {"gbm_bagged"})  # los: single models
    for model in MODELS - {"gbm_bagged"}:
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
    # the transformers and the bagged GBM are ensembles: each member's own AUROC is kept beside the ensemble's
    for r in cv_rows:
        if r["model"] != "gbm_baseline":
            assert len(r["member_auroc"]) == 2 and all(0.0 <= a <= 1.0 for a in r["member_auroc"]), r
    # no stay of a test fold in the pretraining corpus is asserted inside the script; the protocol is recorded
    assert "excluded by stay_id" in meta["protocol"]["pretraining"]


def _part(seed: int, aurocs: dict[str, list[float]]) -> dict:
    """A one-seed results JSON as the script writes it (only what --merge reads)."""
    per_fold = [
        {"task": "mortality24", "setting": "eicu_cv", "seed": seed, "fold": k, "model": model, "auroc": value,
         "auprc": 0.2, "brier": 0.05, "ece": 0.01}
        for model, values in aurocs.items() for k, value in enumerate(values)
    ]
    per_fold += [{"task": "mortality24", "setting": "eicu_to_mimic", "seed": seed, "model": model, "auroc": 0.6,
                  "auprc": 0.3, "brier": 0.1, "ece": 0.05} for model in aurocs]
    meta = {"seeds": [seed], "folds": 2, "quick": False, "seconds": 10.0 + seed, "command": f"run {seed}",
            "machine": {"cpu_count": 2}, "protocol": {"mortality24_eicu_cv": "seeds [x]"}, "per_fold": per_fold}
    return {"meta": meta}


def test_merge_recomputes_the_tables_over_every_seed_and_fold(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import yaib_demo

    paths = []
    for seed, aurocs in ((0, {"gbm_baseline": [0.7, 0.8], "transformer_scratch": [0.5, 0.6]}),
                         (1, {"gbm_baseline": [0.9, 0.6], "transformer_scratch": [0.7, 0.8]})):
        paths.append(tmp_path / f"part{seed}.json")
        paths[-1].write_text(json.dumps(_part(seed, aurocs)))
    output = tmp_path / "merged.json"
    results = yaib_demo.main(["--merge", *map(str, paths), "--output", str(output)])
    assert json.loads(output.read_text()) == results

    cv = results["mortality24"]["eicu_cv"]
    assert cv["gbm_baseline"]["auroc"]["mean"] == pytest.approx(0.75)  # over 2 seeds x 2 folds
    assert cv["transformer_scratch"]["auroc"]["std"] == pytest.approx(0.12909944, rel=1e-6)  # ddof=1 over 4
    assert results["mortality24"]["eicu_to_mimic"]["gbm_baseline"]["auroc"] == {"mean": 0.6, "std": 0.0}
    meta = results["meta"]
    assert meta["seeds"] == [0, 1] and meta["seconds"] == 21.0 and len(meta["per_fold"]) == 12
    assert [p["command"] for p in meta["parts"]] == ["run 0", "run 1"]
    assert "[0, 1]" in meta["protocol"]["mortality24_eicu_cv"]
    paired = meta["paired_differences"]["mortality24/eicu_cv/auroc/transformer_scratch_minus_gbm"]
    assert paired["n"] == 4 and paired["n_transformer_better"] == 1  # 0.8 vs 0.6 on seed 1, fold 1

    with pytest.raises(SystemExit, match="repeat"):  # the same seed twice would count its folds twice
        yaib_demo.main(["--merge", str(paths[0]), str(paths[0]), "--output", str(tmp_path / "twice.json")])


def test_merge_joins_the_folds_of_one_seed_run_in_two_processes(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import yaib_demo

    whole = _part(0, {"gbm_baseline": [0.7, 0.8], "transformer_scratch": [0.5, 0.6]})
    rows = whole["meta"]["per_fold"]
    first = {"meta": {**whole["meta"], "per_fold": [r for r in rows if r.get("fold") == 0]}}
    second = {"meta": {**whole["meta"], "per_fold": [r for r in rows if r.get("fold") != 0]}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(part))
    results = yaib_demo.main(["--merge", *map(str, paths), "--output", str(tmp_path / "merged.json")])
    assert results["meta"]["seeds"] == [0] and len(results["meta"]["per_fold"]) == len(rows)
    assert results["mortality24"]["eicu_cv"]["transformer_scratch"]["auroc"]["mean"] == pytest.approx(0.55)
    assert results["meta"]["seconds_wall"] == 10.0


def test_development_check_scores_only_training_stays(yaib_demo, tmp_path):
    """`--dev`: out-of-fold AUROC of every model over fold 0's training stays, written without any test fold."""
    output = tmp_path / "dev.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "yaib_demo.py"), "--data", str(yaib_demo),
         "--output", str(output), "--quick", "--dev"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    development = json.loads(output.read_text())["development"]
    assert set(development) == {"gbm_bagged", "transformer_scratch", "transformer_pretrained"}
    assert all(0.0 <= v <= 1.0 for v in development.values())

    # LP-FT for the pretrained transformer changes that model alone: the others are the same runs, bit for bit
    probe_start = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "yaib_demo.py"), "--data", str(yaib_demo),
         "--output", str(tmp_path / "probe.json"), "--quick", "--dev", "--hparam", "pretrained_head_init=probe"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert probe_start.returncode == 0, probe_start.stderr[-3000:]
    result = json.loads((tmp_path / "probe.json").read_text())
    assert "--hparam pretrained_head_init=probe" in result["meta"]["command"]
    lpft = result["development"]
    assert lpft["gbm_bagged"] == development["gbm_bagged"]
    assert lpft["transformer_scratch"] == development["transformer_scratch"]
    assert lpft["transformer_pretrained"] != development["transformer_pretrained"]


def test_hparam_overrides_are_typed_and_unknown_names_refused():
    """`--hparam NAME=VALUE` changes one HParams field for a development check, parsed as that field's type."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import yaib_demo

    hp = yaib_demo.override_hparams(
        yaib_demo.HParams(), ["pretrain_epochs=10", "learning_rate=1e-3", "pretrain_cut_hours=24,48"]
    )
    assert (hp.pretrain_epochs, hp.learning_rate, hp.pretrain_cut_hours) == (10, 1e-3, (24, 48))
    assert hp.hidden_size == yaib_demo.HParams().hidden_size  # the rest untouched
    for bad in (["pretrain_epoch=10"], ["pretrain_epochs"], ["pretrain_epochs=ten"]):
        with pytest.raises(SystemExit, match="pretrain_epoch"):
            yaib_demo.override_hparams(yaib_demo.HParams(), bad)
