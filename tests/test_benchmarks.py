"""The benchmarks run as documented (`python -m benchmarks.NAME`, small settings) and write what the README reads;
their shared module (`benchmarks.common`) and the selection benchmark's summary and merge, checked directly."""

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import benchmarks.selection as selection_benchmark
from benchmarks import common
from ehr_transformer.data.synthetic import HospitalProfile


def run_benchmark(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<name> <args>` from the repository root, as the README runs it."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=common.REPO_ROOT, timeout=timeout)


# ------------------------------------------------------------------------------------------------ common
def test_metadata_records_the_module_command_date_wall_time_and_machine():
    started = time.perf_counter() - 2.0
    meta = common.metadata(common.command_line("selection", ["--output", "a b.json"]), started, threads=2)
    assert meta["command"] == "python -m benchmarks.selection --output 'a b.json'"
    assert meta["wall_s"] >= 2.0 and len(meta["date"]) == 10
    assert f"torch {torch.__version__}" in meta["machine"] and meta["machine"].endswith("2 thread(s)")


def test_parts_merge_only_when_their_settings_differ_in_the_split_setting_alone(tmp_path):
    def part(name: str, index: list[int], wall_s: float, date: str, **changed) -> str:
        data = {
            "protocol": "p",
            "settings": {"zoo": "dev", "hospital_index": index, **changed},
            "timings": {"pretraining_s": 1.25, "finetuning_s": wall_s},
            "wall_s": wall_s,
            "date": date,
            "machine": "test",
            "command": f"run {name}",
        }
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    first, second = part("a.json", [0], 10.0, "2026-12-01"), part("b.json", [1], 30.0, "2026-12-02")
    parts = common.read_parts([first, second], varying="hospital_index")
    meta = common.merged_metadata(parts, "merge")
    assert meta["timings"] == {"pretraining_s": 2.5, "finetuning_s": 40.0}
    assert (meta["wall_s"], meta["date"], meta["machine"]) == (30.0, "2026-12-02", "test")
    assert [p["command"] for p in meta["parts"]] == ["run a.json", "run b.json"]
    other = part("c.json", [2], 5.0, "2026-12-02", zoo="benchmark")
    with pytest.raises(SystemExit, match="differ other than in --hospital_index"):
        common.read_parts([first, other], varying="hospital_index")


def test_shared_data_says_where_it_looked_when_the_data_is_absent(capsys):
    assert common.shared_data("no_such_cohort") is None
    assert str(common.SHARED_DATA / "no_such_cohort") in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the small ones
@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message on machines without a GPU")
def test_gpu_benchmark_says_it_needs_a_gpu():
    result = run_benchmark("gpu", timeout=120)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr


def test_throughput_benchmark_json_shape(tmp_path):
    output = tmp_path / "throughput.json"
    result = run_benchmark(
        "throughput",
        *(
            "--output",
            str(output),
            "--hidden_size",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--vocab_size",
            "64",
        ),
        *("--batch_size", "4", "--batches", "2", "--repeats", "1", "--threads", "1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    for name in ("equal_lengths", "long_tailed"):
        row = data[name]
        assert row["ratio"] == pytest.approx(row["ours_events_per_s"] / row["bert_events_per_s"])
    assert data["equal_lengths"]["real_event_share_of_padded_batches"] == 1.0
    assert 0 < data["long_tailed"]["real_event_share_of_padded_batches"] < 1.0
    assert (
        data["inference"]["ours_patients_per_s"] > 0
        and data["inference"]["ours_single_patient_latency_ms"] > 0
    )
    assert data["meta"]["command"].startswith("python -m benchmarks.throughput --output")
    assert data["meta"]["settings"]["threads"] == 1 and data["meta"]["wall_s"] > 0


def test_preprocess_benchmark_json_shape(tmp_path):
    output = tmp_path / "prep.json"
    result = run_benchmark("preprocess", "--subjects", "200", "--output", str(output), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.read_text())
    assert row["subjects"] == 200 and row["events"] > 200 and row["samples"] == 200
    assert row["events_per_s"] == pytest.approx(row["events"] / row["seconds"])
    assert row["peak_rss_mib"] > 0


def test_synthetic_pretraining_benchmark_pairs_pretrained_and_random_backbones(tmp_path):
    """A tiny setting: one row per (seed, corpus, label share) with both backbones' probe and fine-tuned AUROCs,
    and the summary's paired differences recomputable from those rows."""
    output = tmp_path / "synthetic_pretraining.json"
    result = run_benchmark(
        "synthetic_pretraining",
        *("--output", str(output), "--seeds", "2", "--user_subjects", "300", "--corpus_subjects", "300"),
        *("--fractions", "0.5", "1.0", "--epochs", "1", "--probe_draws", "2", "--finetune_seeds", "1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert len(data["records"]) == 4 and data["meta"]["settings"]["seeds"] == 2
    assert data["meta"]["command"].startswith("python -m benchmarks.synthetic_pretraining --output")
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


# ------------------------------------------------------------------------------------------------ selection
def check_verdicts(verdict: dict, candidates: list[dict], seeds: int) -> None:
    """One truth's verdicts of a benchmark case checked against that truth's own fine-tuned AUROCs."""
    assert [c["checkpoint"] for c in candidates] == ["match", "mild"]
    aurocs = {c["checkpoint"]: c["finetuned_auroc"] for c in candidates}
    chosen = verdict["selected"]
    assert verdict["best_by_finetuning"] == max(aurocs, key=aurocs.get)
    assert verdict["top1_correct"] == (aurocs[chosen] == max(aurocs.values()))
    assert verdict["top1_within_noise"] or not verdict["top1_correct"]
    assert verdict["regret_auroc"] == pytest.approx(max(aurocs.values()) - aurocs[chosen])
    assert verdict["top2_separable"] == (verdict["top2_difference"] > 2 * verdict["top2_difference_se"])
    assert verdict["spearman"] is None or -1.0 <= verdict["spearman"] <= 1.0
    for c in candidates:
        assert len(c["finetuned_auroc_by_seed"]) == seeds
        assert c["finetuned_auroc"] == pytest.approx(np.mean(c["finetuned_auroc_by_seed"]))
        assert 0.0 <= c["finetuned_auroc"] <= 1.0 and 0.0 < c["finetuned_auroc_se"] < 0.5


def test_selection_benchmark_runs_and_writes_its_json(tmp_path):
    """A tiny setting (one user hospital, its two least mismatched checkpoints, half the labels with two seeds as
    the primary truth, all labels with two seeds and a frozen-feature probe on half the labels with three seeds
    beside): the JSON the README reads, each case's verdicts checked against each truth's own fine-tuned AUROCs."""
    output = tmp_path / "selection.json"
    result = run_benchmark(
        "selection",
        *("--output", str(output), "--hospitals", "1", "--hospital_index", "0", "--levels", "2"),
        *("--pretrain_subjects", "200", "--user_subjects", "200", "--eval_subjects", "200"),
        *("--pretrain_epochs", "1", "--finetune_epochs", "1", "--finetune_label_fraction", "0.5"),
        *("--low_label_seeds", "2", "--finetune_seeds", "2", "--probe_seeds", "3", "--bootstrap", "20"),
        *("--max_length", "48", "--max_labels", "200"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["n_cases"] == 1 and [c["source"] for c in data["cases"]] == ["general"]
    assert data["protocol"] == "graded_mismatch_low_label" and data["label_fraction"] == 0.5
    assert data["settings"]["hospital_index"] == [0] and "--low_label_seeds 2" in data["command"]
    assert data["command"].startswith("python -m benchmarks.selection --output")
    assert data["goal_met"] is False  # five cases are needed for the goal
    for case in data["cases"]:
        chosen = min(case["candidates"], key=lambda c: c["rank"])["checkpoint"]
        assert case["selected"] == case["full_labels"]["selected"] == chosen
        check_verdicts(case, case["candidates"], seeds=2)  # primary: half the labels
        check_verdicts(case["full_labels"], case["full_labels"]["candidates"], seeds=2)
        check_verdicts(case["frozen_probe"], case["frozen_probe"]["candidates"], seeds=3)
        assert case["frozen_probe"]["selected"] == chosen
        # the two truths are separate fine-tunes: on half the labels and on all of them
        assert [c["finetuned_auroc_by_seed"] for c in case["candidates"]] != [
            c["finetuned_auroc_by_seed"] for c in case["full_labels"]["candidates"]
        ]
        # evaluation: the user's tuning + held_out splits and the whole second cohort
        assert 200 < case["evaluation_subjects"] < 400 and case["evaluation_deaths"] > 0
        codes = {c["checkpoint"]: c["code_coverage"] for c in case["candidates"]}
        assert codes["mild"] < codes["match"]  # a quarter of the codes are local at the mild hospital
    assert data["top1_correct_cases"] == sum(c["top1_correct"] for c in data["cases"])
    full = data["full_labels"]
    assert full["top1_correct_cases"] == sum(c["full_labels"]["top1_correct"] for c in data["cases"])
    assert set(full["components_alone"]) == set(data["components_alone"])
    probe = data["frozen_probe"]
    assert probe["top1_correct_cases"] == sum(c["frozen_probe"]["top1_correct"] for c in data["cases"])
    assert "3 seeds" in probe["truth"] and data["timings"]["frozen_probe_s"] > 0
    assert data["timings"]["finetuning_low_label_s"] > 0 and data["timings"]["finetuning_full_labels_s"] > 0


def test_selection_benchmark_level_sets_build_the_hospitals_they_name():
    """The benchmark's steeper zoos: `code_systems` candidates write whole code systems under another name (the
    user's other codes unchanged, its own renames kept), `local_codes` ones an ever larger nested share of the
    coded vocabulary as local codes, with the user's population; every set starts with the user's own hospital."""
    from ehr_transformer.data.synthetic import generate_synthetic_cohort

    benchmark = selection_benchmark
    user = HospitalProfile(name="user", code_systems={"ICD10CM": "DX"}, age_shift=8.0)

    def systems(level) -> set[str]:
        events = generate_synthetic_cohort(
            40, seed=3, profile=benchmark.candidate_profile(user, level, 7)
        ).events
        codes = events["code"].unique().to_list()
        return {code.split("//")[0] for code in codes if "//" in code}

    for name, levels in benchmark.LEVEL_SETS.items():
        assert levels[0][0] == "match" and benchmark.candidate_profile(
            user, levels[0], 7
        ) == dataclasses.replace(user, name="user_match", local_code_seed=7), name
    by_name = {level[0]: level for level in benchmark.LEVEL_SETS["code_systems"]}
    assert systems(by_name["match"]) >= {"DX", "ICD10PCS", "RXNORM", "LOINC", "ADMISSION"}
    labs = systems(by_name["other_labs"])
    assert "LOINC" not in labs and {"OTHER_LOINC", "DX", "ICD10PCS", "RXNORM"} <= labs
    both = systems(by_name["other_both"])
    assert both & {"LOINC", "DX", "ICD10CM", "ICD10PCS", "RXNORM"} == set()
    assert {"OTHER_LOINC", "OTHER_ICD10CM", "OTHER_ICD10PCS", "OTHER_RXNORM", "ADMISSION"} <= both
    shares = [level[1] for level in benchmark.LEVEL_SETS["local_codes"]]
    assert shares == sorted(shares) and shares[-1] == 1.0
    assert systems(benchmark.LEVEL_SETS["local_codes"][-1]) == {"LOCAL"}  # every coded event local
    replicates = [benchmark.candidate_profile(user, level, 7) for level in benchmark.LEVEL_SETS["replicates"]]
    assert len({r.name for r in replicates}) == 4  # four checkpoints, each its own folder
    assert all(dataclasses.replace(r, name=user.name, local_code_seed=0) == user for r in replicates)
    profile = benchmark.candidate_profile(user, benchmark.LEVEL_SETS["local_codes"][1], 7)
    assert (profile.age_shift, profile.severity_scale, profile.mortality_mechanism) == (
        8.0,
        1.0,
        "physiology",
    )


def benchmark_case(
    source: str, top1_correct: bool, rho: float, full_top1_correct: bool, full_rho: float
) -> dict:
    """A hand-written case of the selection benchmark's JSON: the verdicts the summary is computed from."""

    def verdicts(correct: bool, spearman: float) -> dict:
        alone = {"top1_correct": correct, "spearman": spearman}
        components = ("coverage", "code_coverage", "fit", "transferability")
        return {
            "top1_correct": correct,
            "top1_within_noise": True,
            "top2_separable": correct,
            "spearman": spearman,
            "components_alone": dict.fromkeys(components, alone),
        }

    return {
        "source": source,
        **verdicts(top1_correct, rho),
        "full_labels": verdicts(full_top1_correct, full_rho),
    }


def test_selection_benchmark_merge_recomputes_the_summary_from_the_parts(tmp_path):
    """`--merge` joins partial outputs (no training): cases in the zoo's order, every summary figure recomputed,
    timings summed, the longest part's wall time; a source in two parts or differing settings are refused."""
    benchmark = selection_benchmark
    settings = {
        "zoo": "benchmark",
        "finetune_label_fraction": 0.2,
        "low_label_seeds": 4,
        "finetune_seeds": 3,
        "finetune_epochs": 4.0,
        "finetune_lr": 1e-3,
    }

    def part(name: str, indices: list[int], cases: list[dict], wall_s: float, **changed) -> str:
        data = {
            "cases": cases,
            "protocol": "graded_mismatch_low_label",
            "levels": [],
            "command": f"run {name}",
            "settings": {**settings, "hospital_index": indices, **changed},
            "wall_s": wall_s,
            "timings": {"pretraining_s": 1.5, "finetuning_low_label_s": wall_s},
            "date": "2026-11-26",
            "machine": "test",
        }
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    first_cases = [
        benchmark_case("local_diagnoses_older", True, 1.0, False, 0.2),
        benchmark_case("local_labs", False, 0.4, True, 0.8),
    ]
    first = part("part0.json", [2, 1], first_cases, 100.0)
    second = part("part1.json", [0], [benchmark_case("general", True, 0.7, False, -0.4)], 60.0)
    output = tmp_path / "merged.json"
    benchmark.main(["--merge", first, second, "--output", str(output)])
    data = json.loads(output.read_text())
    assert [c["source"] for c in data["cases"]] == ["general", "local_labs", "local_diagnoses_older"]
    assert data["n_cases"] == 3 and data["top1_correct_cases"] == 2 and data["top2_separable_cases"] == 2
    assert data["mean_spearman"] == pytest.approx(0.7) and data["min_spearman"] == pytest.approx(0.4)
    assert data["components_alone"]["fit"] == {"top1_correct_cases": 2, "mean_spearman": pytest.approx(0.7)}
    assert data["full_labels"]["top1_correct_cases"] == 1
    assert data["full_labels"]["mean_spearman"] == pytest.approx(0.2)
    assert data["label_fraction"] == 0.2 and data["goal_met"] is False
    assert data["settings"]["hospital_index"] == [0, 1, 2]
    assert (
        data["timings"] == {"pretraining_s": 3.0, "finetuning_low_label_s": 160.0} and data["wall_s"] == 100.0
    )
    assert [p["command"] for p in data["parts"]] == ["run part0.json", "run part1.json"]
    assert [p["sources"] for p in data["parts"]] == [["local_diagnoses_older", "local_labs"], ["general"]]
    assert data["command"].startswith("python -m benchmarks.selection --merge")
    assert (
        "20 epochs" in data["truth"]
        and "learning rate 0.001" in data["truth"]
        and "LP-FT" not in data["truth"]
    )
    assert "frozen_probe" not in data  # the parts carry no frozen-probe truth (--probe_seeds 0)

    lpft_case = [benchmark_case("general", True, 0.7, False, -0.4)]
    lpft = part("lpft.json", [0], lpft_case, 10.0, finetune_lr=1e-4, finetune_from_probe=True)
    benchmark.main(["--merge", lpft, "--output", str(tmp_path / "lpft_merged.json")])
    merged = json.loads((tmp_path / "lpft_merged.json").read_text())
    for truth in (
        merged["truth"],
        merged["full_labels"]["truth"],
    ):  # both truths fine-tune with the same recipe
        assert "learning rate 0.0001, every weight trained from the linear probe (LP-FT)" in truth
    with pytest.raises(SystemExit, match="settings"):  # an LP-FT part never joins a random-head one
        benchmark.main(["--merge", second, lpft, "--output", str(tmp_path / "refused.json")])

    again = part("part2.json", [1], [benchmark_case("local_labs", True, 0.9, True, 0.9)], 10.0)
    with pytest.raises(SystemExit, match="local_labs"):
        benchmark.main(["--merge", first, second, again, "--output", str(tmp_path / "refused.json")])
    other_case = [benchmark_case("local_meds_sicker", True, 0.9, True, 0.9)]
    other = part("part3.json", [3], other_case, 10.0, finetune_label_fraction=0.1)
    with pytest.raises(SystemExit, match="settings"):
        benchmark.main(["--merge", first, other, "--output", str(tmp_path / "refused.json")])
    assert not (tmp_path / "refused.json").exists()
