"""The benchmarks run as documented (`python -m benchmarks.NAME`, small settings) and write what the README reads;
their shared module (`benchmarks.common`) and the selection benchmark's summary and merge, checked directly."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import benchmarks.selection as selection_benchmark
from benchmarks import common


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
def zoo_candidate(name, auroc, rank, events, systems, outcome_share=1.0) -> dict:
    """One candidate of a user's entry as `score_user` writes it (the fields the verdicts read)."""
    return {
        "name": name,
        "auroc": auroc,
        "rank": rank,
        "corpus_events": events,
        "code_systems": systems,
        "outcome_code_share": outcome_share,
    }


def test_selection_verdicts_price_each_strategy_by_its_regret():
    """Regret = best AUROC minus the chosen one's; random = the mean over candidates; the largest corpus and the
    closest code systems (Jaccard, ties to the larger corpus) as a user would choose; within noise = within two
    paired standard errors of the best; a choice that lacks the outcome's codes counts only if another has them."""
    candidates = [
        zoo_candidate("big_other_codes", 0.60, 3, 9000, ["ICD9CM", "LAB"], outcome_share=0.2),
        zoo_candidate("same_codes_small", 0.80, 2, 1000, ["ICD10CM", "LOINC"]),
        zoo_candidate("same_codes_large", 0.78, 1, 3000, ["ICD10CM", "LOINC"]),
    ]
    diff_se = np.full((3, 3), 0.02)
    verdict = selection_benchmark.judge_user(candidates, diff_se, {"ICD10CM", "LOINC"})
    assert verdict["best"] == "same_codes_small"
    assert verdict["chosen"] == {
        "selector": "same_codes_large",
        "random": None,
        "largest_corpus": "big_other_codes",
        "same_code_system": "same_codes_large",
    }
    assert verdict["regret"]["selector"] == pytest.approx(0.02)
    assert verdict["regret"]["random"] == pytest.approx(0.80 - np.mean([0.60, 0.80, 0.78]))
    assert verdict["regret"]["largest_corpus"] == pytest.approx(0.20)
    assert verdict["within_noise"] and not verdict["chosen_lacks_outcome_codes"]

    candidates[2]["rank"], candidates[0]["rank"] = 3, 1  # the selector now picks the one lacking the codes
    verdict = selection_benchmark.judge_user(candidates, diff_se, {"ICD10CM", "LOINC"})
    assert verdict["lacks_while_another_has"] and not verdict["within_noise"]
    for c in candidates:
        c["outcome_code_share"] = 0.1  # nobody has them: not the selector's fault
    assert not selection_benchmark.judge_user(candidates, diff_se, {"ICD10CM"})["lacks_while_another_has"]


def user_entry(name: str, regret: dict, within: bool, lacks: bool) -> dict:
    return {
        "user": name,
        "verdict": {
            "regret": regret,
            "within_noise": within,
            "lacks_while_another_has": lacks,
            "best": "a",
            "chosen": {"selector": "a" if regret["selector"] == 0 else "b"},
        },
    }


def test_selection_merge_recomputes_the_summary_from_the_user_parts(tmp_path, monkeypatch):
    """`--merge` joins the user parts in the protocol's user order (the zoo part has no user) and recomputes the
    summary; the goal needs eight users, a small mean regret against random's and no choice lacking the codes;
    a user in two parts is refused."""
    monkeypatch.setattr(selection_benchmark, "PART_DIR", tmp_path / "parts")
    monkeypatch.setattr(selection_benchmark, "RESULTS", tmp_path)
    (tmp_path / "parts").mkdir()
    names = [u.name for u in selection_benchmark.USERS]
    assert len(names) >= 8 and len(selection_benchmark.ZOO) >= 8
    regret = {"selector": 0.0, "random": 0.06, "largest_corpus": 0.03, "same_code_system": 0.01}
    worse = {"selector": 0.04, "random": 0.06, "largest_corpus": 0.0, "same_code_system": 0.04}
    users = [user_entry(n, regret if i else worse, within=i > 0, lacks=False) for i, n in enumerate(names)]
    meta = {"command": "c", "wall_s": 1.0, "date": "2026-12-07", "machine": "test"}
    parts = {"zoo": [], "b": users[:1:-1], "a": users[:2]}
    for part, entries in parts.items():
        data = {"part": part, "zoo": [{"name": "z"}], "users": entries, **meta}
        (tmp_path / "parts" / f"{part}.json").write_text(json.dumps(data))
    data = json.loads(selection_benchmark.merge().read_text())
    assert [u["user"] for u in data["users"]] == names
    summary = data["summary"]
    assert summary["users"] == len(names) and summary["within_noise_of_best"] == len(names) - 1
    assert summary["mean_regret"]["selector"] == pytest.approx(0.04 / len(names))
    assert summary["mean_regret"]["random"] == pytest.approx(0.06)
    assert summary["first_choice_best"] == len(names) - 1 and summary["goal_met"] is True
    assert [p["part"] for p in data["parts"]] == ["a", "b"]

    lacking = json.loads((tmp_path / "parts" / "a.json").read_text())
    lacking["users"][1]["verdict"]["lacks_while_another_has"] = True
    (tmp_path / "parts" / "a.json").write_text(json.dumps(lacking))
    assert json.loads(selection_benchmark.merge().read_text())["summary"]["goal_met"] is False

    (tmp_path / "parts" / "c.json").write_text(
        json.dumps({"part": "c", "zoo": [], "users": users[:1], **meta})
    )
    with pytest.raises(SystemExit, match="in two parts"):
        selection_benchmark.merge()


def test_selection_benchmark_part_scores_a_user_against_its_zoo(tmp_path, monkeypatch):
    """A user part end to end on a tiny zoo: the candidates are pretrained (and reused by the next part), the
    selector ranks them on the user's labelled share, the truth is the package's linear probe per seed, and the
    user's entry carries what the summary and the page read."""
    import polars as pl

    from ehr_transformer.data.labels import read_labels
    from ehr_transformer.data.splits import read_subject_splits

    bench = selection_benchmark
    zoo = (
        bench.Candidate("same_codes", subjects=100, seed=11),
        bench.Candidate("local_labs", profile={"code_systems": {"LOINC": "LAB"}}, subjects=100, seed=12),
    )
    monkeypatch.setattr(bench, "ZOO", zoo)
    monkeypatch.setattr(bench, "USERS", (bench.User("user", seed=13),))
    monkeypatch.setattr(bench, "PARTS", {"tiny": ("user",)})
    monkeypatch.setattr(bench, "PART_DIR", tmp_path / "parts")
    monkeypatch.setattr(bench, "USER_SUBJECTS", 150)
    monkeypatch.setattr(bench, "LABEL_FRACTION", 0.5)
    monkeypatch.setattr(bench, "SEEDS", (0, 1))
    monkeypatch.setattr(bench, "BOOTSTRAP", 20)
    # in-process: keep the suite's torch threads and transformers logging (later tests read its warnings)
    monkeypatch.setattr(common, "quiet", lambda threads=None: None)
    data = json.loads(bench.run_part("tiny", tmp_path / "work").read_text())
    assert [c["name"] for c in data["zoo"]] == ["same_codes", "local_labs"]
    assert data["zoo"][1]["code_systems"] == [
        "ADMISSION",
        "DISCHARGE",
        "ETHNICITY",
        "GENDER",
        "ICD10CM",
        "ICD10PCS",
        "LAB",
        "RXNORM",
    ]
    (entry,) = data["users"]
    user = tmp_path / "work" / "users" / "user"
    train = read_subject_splits(user).filter(pl.col("split") == "train")["subject_id"].implode()
    labelled = read_labels(user / "labels" / f"{common.TASK}.parquet").filter(
        pl.col("subject_id").is_in(train)
    )
    assert entry["user"] == "user"
    assert entry["labelled_training_subjects"] == round(labelled["subject_id"].n_unique() * 0.5)
    by_name = {c["name"]: c for c in entry["candidates"]}
    for c in by_name.values():
        assert len(c["auroc_by_seed"]) == 2 and c["auroc"] == pytest.approx(np.mean(c["auroc_by_seed"]))
        assert 0.0 < c["auroc_se"] < 0.5 and c["reasons"]
    assert by_name["same_codes"]["code_coverage"] > by_name["local_labs"]["code_coverage"]
    verdict = entry["verdict"]
    assert verdict["chosen"]["same_code_system"] == "same_codes"
    best = max(by_name.values(), key=lambda c: c["auroc"])
    chosen = by_name[verdict["chosen"]["selector"]]
    assert verdict["regret"]["selector"] == pytest.approx(best["auroc"] - chosen["auroc"])
    # a second part finds the candidates already pretrained
    again = bench.build_candidate(zoo[0], tmp_path / "work")
    assert again["pretraining_s"] == data["zoo"][0]["pretraining_s"]


# ------------------------------------------------------------------------------------------------ tasks
def test_tasks_merge_adds_up_seeds_judges_the_goal_keeps_a_stopped_part_and_refuses_a_repeat(
    tmp_path, monkeypatch
):
    import benchmarks.tasks as tasks_benchmark

    monkeypatch.setattr(tasks_benchmark, "RESULTS", tmp_path)
    monkeypatch.setattr(tasks_benchmark, "PARTS", tmp_path / "tasks")
    run = {"type": "binary", "gbm": 0.70}
    mortality = [
        {**run, "task": "a_mortality24", "seed": 0, "transformer": 0.60, "pretrained": 0.66},
        {**run, "task": "a_mortality24", "seed": 1, "transformer": 0.64, "pretrained": 0.70},
    ]
    los = {
        "task": "b_los",
        "type": "regression",
        "seed": 0,
        "transformer": 0.30,
        "pretrained": 0.2,
        "gbm": 0.34,
    }
    started = time.perf_counter()
    # seeds run at different times land in different files and add up
    tasks_benchmark._write_part("yaib_mortality24", [0], mortality[:1], started, complete=True)
    tasks_benchmark._write_part("yaib_mortality24", [1], mortality[1:], started, complete=True)
    tasks_benchmark._write_part("yaib_los", [0], [los], started, complete=False)

    merged = json.loads(tasks_benchmark.merge().read_text())

    a, b = merged["tasks"]["a_mortality24"], merged["tasks"]["b_los"]
    assert (a["metric"], a["n_seeds"], a["transformer"], a["pretrained"]) == ("auroc", 2, 0.62, 0.68)
    assert a["best_transformer_minus_gbm"] == -0.02 and a["within_goal"]  # 0.68 is within 0.02 of 0.70
    assert (
        b["metric"] == "r2" and b["best_transformer_minus_gbm"] == -0.04 and b["within_goal"]
    )  # 0.05 for R²
    assert sorted((p["part"], p["seeds"], p["complete"]) for p in merged["parts"]) == [
        ("yaib_los", [0], False),
        ("yaib_mortality24", [0], True),
        ("yaib_mortality24", [1], True),
    ]
    # a task measured twice at one seed is refused, never averaged in twice
    tasks_benchmark._write_part("yaib_mortality24", [0, 1], mortality, started, complete=True)
    with pytest.raises(SystemExit, match="a_mortality24 at seed 0 again"):
        tasks_benchmark.merge()
