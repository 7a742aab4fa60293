"""benchmarks.physionet2012 end to end on a tiny synthetic table in the PhysioNet 2012 layout: the objective
selection, one fold with two label shares, the merge into the summary the issue asks for, and the plot."""

import argparse
import json

import numpy as np
import polars as pl
import pytest

from benchmarks import physionet2012

N_STAYS = 60


def _write_set_a(folder):
    """set-a.parquet and outcomes-a.parquet for N_STAYS stays: descriptors at 00:00, vitals and labs after, death
    more likely with a high lactate."""
    rng = np.random.default_rng(0)
    rows, outcomes = [], []
    for record in range(140_000, 140_000 + N_STAYS):
        died = int(rng.random() < 0.3)
        rows += [
            (record, "00:00", "RecordID", float(record)),
            (record, "00:00", "Age", float(rng.integers(20, 90))),
            (record, "00:00", "Gender", float(rng.integers(0, 2))),
            (record, "00:00", "Height", -1.0 if rng.random() < 0.5 else 170.0),
            (record, "00:00", "ICUType", float(rng.integers(1, 5))),
            (record, "00:00", "Weight", 80.0),
        ]
        for minute in np.sort(rng.integers(1, 48 * 60, 24)):
            clock = f"{minute // 60:02d}:{minute % 60:02d}"
            rows.append((record, clock, "HR", float(rng.normal(80 + 15 * died, 5))))
            if minute % 3 == 0:
                rows.append((record, clock, "Lactate", float(rng.normal(1.5 + 2 * died, 0.3))))
        outcomes.append((record, 10, 3, 7, -1 if not died else 5, died))
    pl.DataFrame(rows, schema=["record_id", "time", "parameter", "value"], orient="row").write_parquet(
        folder / "set-a.parquet"
    )
    pl.DataFrame(
        outcomes,
        schema=["RecordID", "SAPS-I", "SOFA", "Length_of_stay", "Survival", "In-hospital_death"],
        orient="row",
    ).write_parquet(folder / "outcomes-a.parquet")


@pytest.fixture
def torch_threads():
    """The benchmark sets torch's thread count for its process; give the test session its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_benchmark_parts_and_merge(tmp_path, torch_threads):
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    _write_set_a(data)
    tiny = ["--data_dir", str(data), "--output_dir", str(results), "--max_steps", "2", "--n_bootstrap", "20"]
    tiny += ["--threads", "1"]
    assert physionet2012.main(["--part", "select", *tiny, "--candidates", "code", "--shares", "1.0"]) == 0
    selection = json.loads((results / "physionet2012_select.json").read_text())["selection"]
    assert selection["chosen"] == "code" and selection["split"] == "tuning"
    # fold 0 pretrains with the selected objectives; two label shares reuse its pretraining
    assert physionet2012.main(["--part", "fold0", *tiny, "--shares", "1.0", "0.5"]) == 0
    part = json.loads((results / "physionet2012_fold0_share1_0.5.json").read_text())  # shares in the name
    assert part["objectives"] == "code" and part["protocol"]["smoke"] is True
    assert [r["share"] for r in part["runs"]] == [1.0, 0.5]
    assert part["runs"][0]["pretraining"] == part["runs"][1]["pretraining"]
    for run in part["runs"]:
        assert run["same_rows"] is True  # every model learned from the same label rows
        assert run["training"]["pretrained"]["events_per_s"] > 0
        assert run["training"]["scratch"]["peak_rss_mb"] > 0
    half = part["runs"][1]["training"]["scratch"]["n_training_rows"]
    assert half == round(part["conversion"]["splits"]["train"] * 0.5)
    # outcome-side fields never became events of the converted data
    assert part["conversion"]["outcome_fields_left_out"] == {}
    assert part["conversion"]["dropped_parameters"] == {"RecordID": N_STAYS}

    assert physionet2012.main(["--merge", "--output_dir", str(results)]) == 0
    merged = json.loads((results / "physionet2012.json").read_text())
    assert set(merged["summary"]) == {"1.0", "0.5"}
    for share in ("1.0", "0.5"):
        for model in ("gbm", "scratch", "pretrained", "probe"):
            for metric in ("auroc", "auprc", "brier", "ece"):
                entry = merged["summary"][share][model][metric]
                assert set(entry) >= {"mean", "sd"} and 0.0 <= entry["mean"] <= 1.0
        assert merged["summary"][share]["differences"]["pretrained-scratch"]["auroc"]["n"] == 1
    assert set(merged["goals"]["full_labels"]) >= {
        "pretrained_auroc_at_least_gbm",
        "pretrained_auroc_at_least_0.85",
    }
    assert merged["selection"]["chosen"] == "code"
    assert (results / "physionet2012_learning_curve.png").stat().st_size > 0

    # the same fold, seed and share again (here: the default fold0 part at 100%) would count twice
    assert physionet2012.main(["--part", "fold0", *tiny, "--shares", "1.0"]) == 0
    assert (results / "physionet2012_fold0.json").is_file()
    with pytest.raises(SystemExit, match="fold 0 seed 0 share 1.0 is in both physionet2012_fold0.json and"):
        physionet2012.main(["--merge", "--output_dir", str(results)])


def test_missing_data_and_parts_of_another_recipe_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="set-a.parquet not found"):
        physionet2012.main(["--part", "fold0", "--data_dir", str(tmp_path), "--objectives", "code"])
    results = tmp_path / "results"
    results.mkdir()
    current = physionet2012.protocol(argparse.Namespace(max_steps=None, n_bootstrap=1000, max_stays=None))
    earlier = json.loads(json.dumps(current))
    earlier["recipes"]["finetune"]["ensemble"] = 1  # a part run before the five-network default
    for part, protocol in (("fold0", current), ("fold1", earlier)):
        record = {"protocol": protocol, "runs": [], "wall_s": 1.0, "date": "2026-12-07", "machine": "x"}
        (results / f"physionet2012_{part}.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="physionet2012_fold1.json was run under another protocol"):
        physionet2012.main(["--merge", "--output_dir", str(results)])
