"""Choosing and sharing checkpoints: LogME, prototypes, the selector on zoos whose answer is known, the `select`
command, the files a pretrained folder shares (and what they must never hold), and the push to the hub."""

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
from transformers import TrainingArguments

from ehr_transformer import EHREventTokenizer
from ehr_transformer.checkpoint_safety import CODE_FREQUENCIES_FILE, PROTOTYPES_FILE, check_checkpoint_folder
from ehr_transformer.data.synthetic import HospitalProfile, write_synthetic_meds
from ehr_transformer.hub import push_checkpoint_to_hub, resolve_candidate
from ehr_transformer.privacy import scan_folder_for_leaks
from ehr_transformer.selection.logme import logme
from ehr_transformer.selection.prototypes import Prototypes, fit_prototypes
from ehr_transformer.selection.selector import format_ranking, select_checkpoints
from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
from ehr_transformer.training.pretrain import pretrain

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# Three hospitals: A (default coding), B (local lab codes: LOINC written LAB) and C (A's codes, an older, much
# sicker population admitted in emergencies): C's vocabulary overlaps A's, its population does not.
HOSPITALS = {
    "A": (HospitalProfile(name="A"), 31, 41),
    "B": (HospitalProfile(name="B", code_systems={"LOINC": "LAB"}), 32, 42),
    "C": (
        HospitalProfile(
            name="C", age_shift=20.0, severity_scale=2.0, frailty_shift=1.5, emergency_share=0.95
        ),
        33,
        43,
    ),
}


def _pretrain(data: Path, output: Path, cache: Path) -> Path:
    args = TrainingArguments(
        str(output),
        num_train_epochs=3,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    pretrain(
        DataArguments(data_dir=str(data), cache_dir=str(cache), max_length=96, min_code_count=5),
        ModelArguments(**TINY),
        PretrainingArguments(),
        args,
    )
    return output


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{hospital: (pretrained checkpoint, user data of the same hospital drawn with another seed)}."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for name, (profile, pretrain_seed, user_seed) in HOSPITALS.items():
        data = write_synthetic_meds(root / f"data_{name}", 500, seed=pretrain_seed, profile=profile)
        user = write_synthetic_meds(root / f"user_{name}", 300, seed=user_seed, profile=profile)
        out[name] = (_pretrain(data, root / f"ckpt_{name}", root / "cache"), user)
    return out


# ------------------------------------------------------------------------------------------------ LogME
def test_logme_equals_the_evidence_of_bayesian_ridge():
    """Our evidence maximisation gives the log marginal likelihood sklearn's BayesianRidge (MacKay's updates, the
    same model without intercept, vanishing hyper-priors) reports."""
    from sklearn.linear_model import BayesianRidge

    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 12))
    target = features @ rng.normal(size=12) + rng.normal(scale=0.7, size=400)
    tiny = 1e-12
    ridge = BayesianRidge(
        fit_intercept=False,
        compute_score=True,
        alpha_1=tiny,
        alpha_2=tiny,
        lambda_1=tiny,
        lambda_2=tiny,
        max_iter=1000,
        tol=1e-10,
    ).fit(features, target)
    assert logme(features, target, regression=True, max_iter=1000) == pytest.approx(
        ridge.scores_[-1] / 400, rel=1e-4
    )


def test_logme_scores_informative_features_above_random_ones():
    rng = np.random.default_rng(1)
    n = 600
    labels = rng.random(n) < 0.3
    informative = rng.normal(size=(n, 16))
    informative[:, :3] += 1.5 * labels[:, None]  # three dimensions carry the class
    noise = rng.normal(size=(n, 16))
    assert logme(informative, labels) > logme(noise, labels) + 0.02
    half = informative.copy()
    half[:, :3] = rng.normal(size=(n, 3)) + 0.75 * labels[:, None]  # weaker signal: in between
    assert logme(informative, labels) > logme(half, labels) > logme(noise, labels)
    with pytest.raises(ValueError, match="at least two classes"):
        logme(noise, np.zeros(n))


# ------------------------------------------------------------------------------------------------ prototypes
def test_every_prototype_summarises_at_least_the_minimum_number_of_subjects():
    rng = np.random.default_rng(2)
    big = [rng.normal(loc=3 * i, size=(60, 8)) for i in range(3)]
    outliers = [rng.normal(loc=50 + 10 * i, size=(2, 8)) for i in range(3)]  # tiny far-away groups
    embeddings = np.concatenate(big + outliers)
    centroids, counts = fit_prototypes(embeddings, min_members=10, max_prototypes=8)
    assert counts.sum() == len(embeddings) and counts.min() >= 10
    distances = np.linalg.norm(embeddings[:, None, :] - centroids[None], axis=-1)
    assert distances.min() > 1e-3  # no centroid is any one subject's vector
    with pytest.raises(ValueError, match="fewer than the 10"):
        fit_prototypes(embeddings[:9], min_members=10)


def test_pretrained_folder_is_complete_and_holds_only_aggregates(zoo):
    checkpoint, _ = zoo["A"]
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    frequencies = json.loads((checkpoint / CODE_FREQUENCIES_FILE).read_text())
    counts = frequencies["subject_count_by_code"]
    assert set(counts) == {c for c in tokenizer.vocab if not c.startswith("[")}  # only vocabulary codes
    assert min(counts.values()) >= tokenizer.min_code_count
    prototypes = Prototypes.load(checkpoint)
    assert prototypes.counts.min() >= max(tokenizer.min_code_count, 10) and prototypes.reference_distance > 0
    assert prototypes.centroids.shape[1] == TINY["hidden_size"]
    checked = check_checkpoint_folder(checkpoint)
    assert [p.name for p in checked.weight_files] == ["model.safetensors"]  # prototypes are not weights
    card = (checkpoint / "README.md").read_text()
    assert "## Population summary" in card and "k-means centroids" in card


def test_no_subject_identifier_timestamp_or_rare_code_in_a_pretrained_folder(tmp_path):
    """A cohort with 10-digit subject ids (any occurrence is a leak) and a code per subject seen once: neither
    they nor an event time appears in any file of the folder, prototypes and code frequencies included."""
    from ehr_transformer.data.synthetic import generate_synthetic_cohort
    from ehr_transformer.data.writer import write_meds

    cohort = generate_synthetic_cohort(150, seed=5)
    shift = pl.col("subject_id") + 8_100_000_000
    events = cohort.events.with_columns(shift)
    rare = (
        events.group_by("subject_id")
        .agg(pl.col("time").max())
        .with_columns(
            ("RARE//S" + pl.col("subject_id").cast(pl.String)).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"),
            pl.lit(None, pl.String).alias("text_value"),
        )
    )
    events = pl.concat([events, rare.select(events.columns)])
    meds = write_meds(tmp_path / "meds", events, cohort.splits.with_columns(shift))
    folder = tmp_path / "pretrained"
    _pretrain(meds, folder, tmp_path / "cache")
    assert {PROTOTYPES_FILE, CODE_FREQUENCIES_FILE} <= set(os.listdir(folder))
    train_ids = cohort.splits.filter(pl.col("split") == "train")["subject_id"] + 8_100_000_000
    train = events.filter(pl.col("subject_id").is_in(train_ids.implode()))
    findings = scan_folder_for_leaks(
        folder, train_ids.to_list(), rare["code"].to_list(), train["time"].drop_nulls().to_list()
    )
    assert findings == []


# ------------------------------------------------------------------------------------------------ the selector
@pytest.mark.parametrize("user", ["A", "B", "C"])
def test_selector_ranks_the_matching_checkpoint_first(zoo, user):
    candidates = [str(zoo[name][0]) for name in HOSPITALS]
    result = select_checkpoints(
        zoo[user][1], candidates, labels=zoo[user][1] / "labels" / "in_hospital_mortality.parquet"
    )
    ranking = result["ranking"]
    assert ranking[0]["candidate"] == str(zoo[user][0]), format_ranking(result)
    outcome = (
        ["outcome_code_coverage"] if result["settings"]["outcome_codes"] else []
    )  # none on too few labels
    assert result["components"] == ["code_coverage", *outcome, "fit", "transferability"]
    assert all(row["reasons"] and row["combined_interval"] for row in ranking)
    scores = {Path(row["candidate"]).name: row for row in ranking}
    if user == "B":  # B's lab codes are unknown to A and C
        assert scores["ckpt_B"]["coverage"] > 0.99 > 0.6 > scores["ckpt_A"]["coverage"]


def test_same_vocabulary_different_population_is_told_apart_by_the_fit(zoo):
    """A and C code alike (coverage within 2 points for both users), so the fit must do the separating."""
    for user, other in (("A", "C"), ("C", "A")):
        result = select_checkpoints(zoo[user][1], [str(zoo[user][0]), str(zoo[other][0])])
        rows = {Path(row["candidate"]).name: row for row in result["ranking"]}
        own, foreign = rows[f"ckpt_{user}"], rows[f"ckpt_{other}"]
        assert abs(own["coverage"] - foreign["coverage"]) < 0.02
        assert own["fit"] > foreign["fit"], format_ranking(result)
        assert result["ranking"][0]["candidate"] == str(zoo[user][0])


def test_select_command_prints_a_table_and_writes_json(zoo, tmp_path, capsys):
    from ehr_transformer.cli import main

    output = tmp_path / "ranking.json"
    candidates = [str(zoo[name][0]) for name in ("B", "A")]
    assert (
        main(
            [
                "select",
                "--data_dir",
                str(zoo["A"][1]),
                "--candidates",
                *candidates,
                "--output_file",
                str(output),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "coverage" in printed and "combined" in printed and "ranking written" in printed
    assert "Why each candidate ranks where it does:" in printed and "The first choice leads" in printed
    result = json.loads(output.read_text())
    assert [row["rank"] for row in result["ranking"]] == [1, 2]
    assert result["ranking"][0]["reasons"][0].startswith(candidates[1] + " reads")
    assert result["top_within_noise"] is False and result["warning"] is None
    assert result["ranking"][0]["candidate"] == candidates[1]
    assert result["components"] == ["code_coverage", "fit"]  # no labels: no LogME
    assert not list(tmp_path.glob(".ranking.json.*"))  # written through a temporary file, none left behind


def test_a_component_one_candidate_lacks_is_left_out_for_all(zoo, tmp_path):
    import shutil

    bare = tmp_path / "no_prototypes"
    shutil.copytree(zoo["B"][0], bare)
    (bare / PROTOTYPES_FILE).unlink()  # e.g. a fine-tuned checkpoint: no population summary
    result = select_checkpoints(zoo["A"][1], [str(zoo["A"][0]), str(bare)])
    assert result["components"] == ["code_coverage"]
    rows = {Path(row["candidate"]).name: row for row in result["ranking"]}
    assert rows["no_prototypes"]["fit"] is None and rows["ckpt_A"]["fit"] is not None
    assert all(row["combined"] == row["code_coverage"] for row in result["ranking"])
    assert any("no prototypes.safetensors" in note for note in rows["no_prototypes"]["notes"])


# ------------------------------------------------------------------------------------------------ outcome codes
def _renamed(source: Path, target: Path, codes) -> Path:
    """A copy of checkpoint `source` whose vocabulary writes `codes` otherwise (weights, prototypes and size
    unchanged): the same model, blind to those codes."""
    import shutil

    shutil.copytree(source, target)
    file = target / "event_tokenizer.json"
    data = json.loads(file.read_text())
    renamed = {code: f"HIDDEN//{code}" for code in codes}
    data["vocab"] = {renamed.get(code, code): i for code, i in data["vocab"].items()}
    data["value_statistics"] = {renamed.get(code, code): v for code, v in data["value_statistics"].items()}
    file.write_text(json.dumps(data))
    return target


def _lactate_labels(data: Path) -> pl.DataFrame:
    """The mortality label rows of `data`, relabelled: is the last lactate before the prediction time in the top
    quarter? An outcome that depends on one code above all."""
    from ehr_transformer.data.labels import read_labels
    from ehr_transformer.data.meds import read_events

    rows = read_labels(data / "labels" / "in_hospital_mortality.parquet").select(
        "subject_id", "prediction_time"
    )
    lactate = (
        rows.join(read_events(data).filter(pl.col("code") == "LOINC//2524-7"), on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .sort("time")
        .group_by("subject_id", "prediction_time")
        .agg(pl.col("numeric_value").last())
    )
    high = pl.col("numeric_value") > lactate["numeric_value"].quantile(0.75)
    return rows.join(lactate, on=["subject_id", "prediction_time"], how="left").select(
        "subject_id", "prediction_time", high.fill_null(False).alias("boolean_value")
    )


def test_outcome_association_is_the_auroc_and_rank_correlation():
    """The vectorised statistics equal sklearn's AUROC (presence over all rows, last value over the rows with a
    value) and scipy's Spearman correlation (presence against a numeric label)."""
    import scipy.sparse as sparse
    from scipy.stats import rankdata, spearmanr
    from sklearn.metrics import roc_auc_score

    from ehr_transformer.selection.outcome_codes import _association

    rng = np.random.default_rng(3)
    n = 300
    y = (rng.random(n) < 0.3).astype(float)
    present = (rng.random((n, 2)) < 0.5 + 0.2 * y[:, None]).astype(float)
    value = np.where(present[:, 1] > 0, rng.normal(size=n) + y, 0.0)
    has = present[:, 1] > 0
    ranks = np.zeros(n)
    ranks[has] = rankdata(value[has])
    presence, value_ranks = sparse.csr_matrix(present), sparse.csr_matrix(ranks[:, None])
    mask = sparse.csr_matrix(has[:, None].astype(float))
    by_presence, by_value = _association(presence, value_ranks, mask, y[:, None], regression=False)
    for j in range(2):
        assert by_presence[j, 0] == pytest.approx(abs(roc_auc_score(y, present[:, j]) - 0.5))
    assert by_value[0, 0] == pytest.approx(abs(roc_auc_score(y[has], value[has]) - 0.5))
    target = rng.normal(size=n) + present[:, 0]
    by_presence, _ = _association(presence, value_ranks, mask, rankdata(target)[:, None], regression=True)
    assert by_presence[0, 0] == pytest.approx(abs(spearmanr(present[:, 0], target).statistic))


def test_outcome_codes_use_only_events_before_the_prediction_time(synthetic_meds):
    """A code written one hour after every positive row's prediction time (it equals the label) is not an outcome
    code, nor are death and discharge to death; the same code one hour before is the strongest one."""
    from ehr_transformer.data.labels import read_labels
    from ehr_transformer.data.meds import read_events
    from ehr_transformer.selection.outcome_codes import outcome_codes

    labels = read_labels(synthetic_meds / "labels" / "in_hospital_mortality.parquet")
    events = read_events(synthetic_meds)
    positive = labels.filter(pl.col("boolean_value"))

    def planted(code: str, shift: pl.Expr) -> pl.DataFrame:
        return positive.select(
            "subject_id",
            (pl.col("prediction_time") + shift).alias("time"),
            pl.lit(code).alias("code"),
        )

    planted_events = pl.concat(
        [planted("LEAK//AFTER", pl.duration(hours=1)), planted("SEEN//BEFORE", -pl.duration(hours=1))]
    )
    events = pl.concat([events, planted_events], how="diagonal_relaxed").sort("subject_id", "time")
    found = dict(outcome_codes(events, labels))
    assert "LEAK//AFTER" not in found and "MEDS_DEATH" not in found and "DISCHARGE//DIED" not in found
    assert max(found, key=found.get) == "SEEN//BEFORE" and found["SEEN//BEFORE"] == pytest.approx(0.5)
    # the window alone keeps it out: with the prediction times ten years later the leak is the strongest code
    later = labels.with_columns(pl.col("prediction_time") + pl.duration(days=3650))
    assert "LEAK//AFTER" in dict(outcome_codes(events, later))


def test_outcome_coverage_is_a_factor_of_the_combined_score():
    """Comparable candidates (the blind one even slightly ahead on everything else): the one that lacks most of
    the outcome's codes cannot rank first."""
    from ehr_transformer.selection.selector import CandidateScore, combine_scores

    knows = CandidateScore("knows", 0.95, 0.95, fit=0.80, transferability=-0.300, outcome_code_coverage=1.0)
    blind = CandidateScore("blind", 0.97, 0.96, fit=0.82, transferability=-0.295, outcome_code_coverage=0.4)
    ranked, used = combine_scores([blind, knows])
    assert used == ["code_coverage", "outcome_code_coverage", "fit", "transferability"]
    assert [s.candidate for s in ranked] == ["knows", "blind"]
    assert ranked[1].combined == pytest.approx(0.96 * 0.4 * 0.82)


def test_a_candidate_blind_to_the_outcome_code_ranks_below_the_same_model_that_knows_it(zoo, tmp_path):
    checkpoint, user = zoo["A"]
    blind = _renamed(checkpoint, tmp_path / "blind_to_lactate", ["LOINC//2524-7"])
    result = select_checkpoints(user, [str(blind), str(checkpoint)], labels=_lactate_labels(user))
    assert result["settings"]["outcome_codes"][0]["code"] == "LOINC//2524-7", format_ranking(result)
    assert result["components"] == ["code_coverage", "outcome_code_coverage", "fit", "transferability"]
    rows = {Path(row["candidate"]).name: row for row in result["ranking"]}
    own, lacking = rows["ckpt_A"], rows["blind_to_lactate"]
    assert abs(own["code_coverage"] - lacking["code_coverage"]) < 0.05  # otherwise the same model
    assert own["rank"] == 1 and own["outcome_code_coverage"] == 1.0 > lacking["outcome_code_coverage"]
    assert lacking["outcome_codes_missing"] == ["LOINC//2524-7"]
    assert "LOINC//2524-7" in lacking["reasons"][-1] and "lacks" in lacking["reasons"][-1]
    assert "knows all" in own["reasons"][-1]
    printed = format_ranking(result)
    assert "Your outcome depends most on" in printed and "LOINC//2524-7 (higher last values" in printed


def test_within_noise_warning_for_two_copies_and_not_for_a_clearly_worse_candidate(zoo, tmp_path):
    import shutil

    checkpoint, user = zoo["A"]
    twin = tmp_path / "twin"
    shutil.copytree(checkpoint, twin)
    result = select_checkpoints(user, [str(checkpoint), str(twin)], n_bootstrap=50)
    assert result["top_within_noise"] is True and set(result["within_noise"]) == {str(checkpoint), str(twin)}
    assert result["ranking"][1]["share_at_least_first"] >= 0.1
    assert result["ranking"][0]["combined_interval"] == result["ranking"][1]["combined_interval"]
    printed = format_ranking(result)
    assert (
        "Warning: the top 2 candidates are within noise of each other" in printed
        and "either will do" in printed
    )
    assert result["warning"] in printed

    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    unreadable = _renamed(checkpoint, tmp_path / "unreadable", [c for c in tokenizer.vocab if "//" in c])
    result = select_checkpoints(user, [str(unreadable), str(checkpoint)], n_bootstrap=50)
    rows = {Path(row["candidate"]).name: row for row in result["ranking"]}
    assert rows["unreadable"]["code_coverage"] < 0.05 and rows["ckpt_A"]["rank"] == 1
    assert result["top_within_noise"] is False and result["within_noise"] == [] and result["warning"] is None
    assert rows["unreadable"]["share_at_least_first"] == 0.0
    printed = format_ranking(result)
    assert "within noise of each other" not in printed and "The first choice leads" in printed
    assert "cannot read most of your data" in rows["unreadable"]["reasons"][0]


def test_unknown_candidate_fails_clearly_without_network(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-owner/no-such-model"):
        resolve_candidate("no-such-owner/no-such-model")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_candidate(str(tmp_path / "missing" / "folder"))


# ------------------------------------------------------------------------------------------------ sharing
def test_push_to_hub_uploads_the_complete_folder_and_nothing_else(zoo, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    folder = tmp_path / "ckpt"
    shutil.copytree(zoo["A"][0], folder)
    (folder / "training_args.bin").write_bytes(b"pickle")  # Trainer leftovers must stay local
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"pickle")
    (folder / "trainer_state.json").write_text("{}")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        calls["message"] = kwargs.get("commit_message")
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    assert push_checkpoint_to_hub(folder, "someone/ehr-general") == "commit"
    assert calls["repo"] == "someone/ehr-general"
    assert set(calls["files"]) == {
        "config.json",
        "model.safetensors",
        "event_tokenizer.json",
        "README.md",
        "configuration_ehr.py",
        "modeling_ehr.py",
        PROTOTYPES_FILE,
        CODE_FREQUENCIES_FILE,
    }
    assert calls["files"]["README.md"] == (folder / "README.md").read_bytes()  # our card, not a generated one


def test_pretrained_folder_loads_with_trust_remote_code_where_the_package_is_missing(zoo, tmp_path):
    checkpoint, _ = zoo["A"]
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["ehr_transformer"] = None  # the package (installed editable here) cannot be imported
        try:
            import ehr_transformer
            raise SystemExit("ehr_transformer should not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(checkpoint)!r}, trust_remote_code=True,
                                                                   num_labels=1).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.tensor([[3, 5, 6, 7]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert logits.shape == (1, 1) and torch.isfinite(logits).all()
        print("loaded", type(model).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded EHRTransformerForSequenceClassification" in result.stdout


def test_logme_stays_finite_on_features_that_carry_nothing():
    """Features that carry nothing (all zero, as a resample of identical rows of an uninformative candidate can
    give) leave LogME a finite, low evidence instead of dividing by a vanished precision."""
    labels = np.array([0, 1] * 5)
    nothing = logme(np.zeros((10, 8)), labels)
    informative = logme(np.column_stack([labels, np.zeros((10, 7))]).astype(float), labels)
    assert np.isfinite(nothing) and informative > nothing
