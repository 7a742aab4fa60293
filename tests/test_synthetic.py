"""The synthetic MEDS cohort: valid, deterministic, leak-free and learnable."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ehr_transformer.cli import main
from ehr_transformer.data.labels import read_labels, validate_labels
from ehr_transformer.data.meds import read_events, validate_events
from ehr_transformer.data.splits import check_split_coverage, read_subject_splits
from ehr_transformer.data.synthetic import generate_synthetic_cohort, write_synthetic_meds

MORTALITY = "in_hospital_mortality"


@pytest.fixture(scope="module")
def cohort():
    return generate_synthetic_cohort(n_subjects=2000, seed=0)


@pytest.fixture(scope="module")
def stays(cohort):
    """One row per admission: subject, admission time, discharge time (k-th admission <-> k-th discharge)."""
    ev = cohort.events
    adm = ev.filter(pl.col("code").str.starts_with("ADMISSION//")).select(
        "subject_id", pl.col("time").alias("admit"), pl.int_range(pl.len()).over("subject_id").alias("k")
    )
    dis = ev.filter(pl.col("code").str.starts_with("DISCHARGE//")).select(
        "subject_id",
        pl.col("time").alias("discharge"),
        pl.col("code").alias("disposition"),
        pl.int_range(pl.len()).over("subject_id").alias("k"),
    )
    return adm.join(dis, on=["subject_id", "k"], how="full", coalesce=True)


def test_deterministic_for_a_seed():
    a, b = generate_synthetic_cohort(200, seed=3), generate_synthetic_cohort(200, seed=3)
    assert a.events.equals(b.events) and a.splits.equals(b.splits)
    assert all(a.labels[t].equals(b.labels[t]) for t in a.labels)
    assert not generate_synthetic_cohort(200, seed=4).events.equals(a.events)


def test_schema_is_valid_meds(cohort):
    assert validate_events(cohort.events).equals(cohort.events)  # already typed and sorted
    for task, labels in cohort.labels.items():
        assert validate_labels(labels, source=task).equals(labels)
        assert labels["boolean_value"].null_count() == 0
    ev = cohort.events
    per_subject = ev.group_by("subject_id").len()["len"]
    assert per_subject.len() == 2000
    assert 100 <= per_subject.mean() <= 500 and per_subject.max() > 1000 and per_subject.min() >= 10
    static = ev.filter(pl.col("time").is_null())
    assert set(static["code"].str.split("//").list.first()) == {"GENDER", "ETHNICITY"}
    assert ev.filter(pl.col("code") == "MEDS_BIRTH").height == 2000
    assert ev.filter(pl.col("code") == "LOINC//600-7")["text_value"].null_count() == 0
    lactate = ev.filter(pl.col("code") == "LOINC//2524-7")["numeric_value"]
    assert lactate.null_count() == 0 and 0.3 <= lactate.min() and lactate.max() <= 20
    assert 0.5 < lactate.median() < 3.0
    prefixes = set(ev["code"].str.split("//").list.first())
    assert {"ICD10CM", "ICD10PCS", "RXNORM", "LOINC", "ADMISSION", "DISCHARGE", "MEDS_DEATH"} <= prefixes
    birth = ev.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", "time")
    first = (
        ev.filter(pl.col("code").str.starts_with("ADMISSION//"))
        .group_by("subject_id")
        .agg(pl.col("time").min())
    )
    age = birth.join(first, on="subject_id").select(
        (pl.col("time_right") - pl.col("time")).dt.total_days() / 365.25
    )
    assert 17.9 < age.min().item() and age.max().item() < 90.1


def test_splits_are_disjoint_and_complete(cohort):
    splits = cohort.splits
    assert splits["subject_id"].is_unique().all()
    assert set(splits["subject_id"]) == set(cohort.events["subject_id"])
    counts = dict(splits.group_by("split").len().iter_rows())
    assert counts == {"train": 1400, "tuning": 300, "held_out": 300}


def test_nothing_after_death(cohort, stays):
    ev = cohort.events
    death = ev.filter(pl.col("code") == "MEDS_DEATH").select("subject_id", pl.col("time").alias("death"))
    assert death["subject_id"].is_unique().all()
    after = ev.join(death, on="subject_id").filter(pl.col("time") > pl.col("death"))
    assert after.height == 0
    # the last event of a subject who dies is the death itself
    last = ev.group_by("subject_id", maintain_order=True).last().join(death, on="subject_id")
    assert (last["code"] == "MEDS_DEATH").all()
    died_in_hospital = stays.filter(pl.col("disposition") == "DISCHARGE//DIED")
    assert (
        died_in_hospital.join(death, on="subject_id").filter(pl.col("death") != pl.col("discharge")).height
        == 0
    )


def test_labels_lie_within_admissions(cohort, stays):
    for task, labels in cohort.labels.items():
        joined = labels.join(stays, on="subject_id").filter(
            (pl.col("prediction_time") - pl.col("admit")) == dt.timedelta(hours=24)
        )
        assert joined.height == labels.height, task  # each prediction time is exactly admission + 24 h
        assert (joined["discharge"] >= joined["prediction_time"]).all()
    long_stays = stays.filter((pl.col("discharge") - pl.col("admit")) >= dt.timedelta(hours=24))
    assert cohort.labels[MORTALITY].height == long_stays.height  # one label per admission >= 24 h


def test_mortality_label_matches_death_in_that_admission(cohort, stays):
    labels = (
        cohort.labels[MORTALITY]
        .join(stays, on="subject_id")
        .filter((pl.col("prediction_time") - pl.col("admit")) == dt.timedelta(hours=24))
    )
    died = labels["disposition"] == "DISCHARGE//DIED"
    assert (died == labels["boolean_value"]).all()
    los = cohort.labels["long_length_of_stay"].join(
        labels.select("subject_id", "prediction_time", "admit", "discharge"),
        on=["subject_id", "prediction_time"],
    )
    assert (los["boolean_value"] == ((los["discharge"] - los["admit"]) > dt.timedelta(days=7))).all()


def test_prevalence(cohort):
    assert 0.07 <= cohort.labels[MORTALITY]["boolean_value"].mean() <= 0.15
    assert 0.05 <= cohort.labels["long_length_of_stay"]["boolean_value"].mean() <= 0.35


def _visible_features(cohort) -> pl.DataFrame:
    labels = cohort.labels[MORTALITY].with_row_index("label_id")
    ev = cohort.events.filter(pl.col("time").is_not_null())
    window = labels.join(ev, on="subject_id").filter(
        (pl.col("time") <= pl.col("prediction_time"))
        & (pl.col("time") > pl.col("prediction_time") - dt.timedelta(hours=24))
    )
    feats = window.group_by("label_id").agg(
        pl.col("numeric_value").filter(pl.col("code") == "LOINC//2524-7").max().alias("max_lactate"),
        pl.col("numeric_value").filter(pl.col("code") == "LOINC//2160-0").max().alias("max_creatinine"),
    )
    birth = cohort.events.filter(pl.col("code") == "MEDS_BIRTH").select(
        "subject_id", pl.col("time").alias("birth")
    )
    return (
        labels.join(feats, on="label_id", how="left")
        .join(birth, on="subject_id")
        .join(cohort.splits, on="subject_id")
        .with_columns(
            ((pl.col("prediction_time") - pl.col("birth")).dt.total_days() / 365.25).alias("age"),
            pl.col("max_lactate").fill_null(1.0),
            pl.col("max_creatinine").fill_null(1.0),
        )
    )


def test_outcome_is_learnable_from_visible_history(cohort):
    data = _visible_features(cohort)
    cols = ["max_lactate", "max_creatinine", "age"]
    train, test = data.filter(pl.col("split") != "held_out"), data.filter(pl.col("split") == "held_out")
    model = LogisticRegression(max_iter=1000).fit(
        train.select(cols).to_numpy(), train["boolean_value"].to_numpy()
    )
    auroc = roc_auc_score(
        test["boolean_value"].to_numpy(), model.predict_proba(test.select(cols).to_numpy())[:, 1]
    )
    assert auroc > 0.68, auroc
    # the number of events before prediction time alone carries little signal
    counts = (
        cohort.events.filter(pl.col("time").is_not_null())
        .join(cohort.labels[MORTALITY], on="subject_id")
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .group_by("subject_id", "prediction_time")
        .len()
    )
    with_counts = cohort.labels[MORTALITY].join(counts, on=["subject_id", "prediction_time"])
    assert roc_auc_score(with_counts["boolean_value"].to_numpy(), with_counts["len"].to_numpy()) < auroc


def test_write_synthetic_meds_round_trip(tmp_path):
    out = write_synthetic_meds(tmp_path / "syn", n_subjects=150, seed=1, n_shards=2)
    cohort = generate_synthetic_cohort(150, seed=1)
    assert read_events(out).equals(cohort.events)
    assert read_subject_splits(out).equals(cohort.splits)
    for task, labels in cohort.labels.items():
        assert read_labels(out / "labels" / f"{task}.parquet").equals(labels)
    assert check_split_coverage(out).n_without_events == 0
    assert len(list((out / "data").glob("*/*.parquet"))) == 6
    codes = pl.read_parquet(out / "metadata" / "codes.parquet")
    lactate = codes.filter(pl.col("code") == "LOINC//2524-7")
    assert "mmol/L" in lactate["description"].item() and lactate["parent_codes"].item().to_list() == ["LOINC"]
    with pytest.raises(FileExistsError):
        write_synthetic_meds(out, n_subjects=10)


def test_command_line(tmp_path, capsys):
    main(["synthetic", "--num_subjects", "40", "--output_dir", str(tmp_path / "cli"), "--seed", "2"])
    assert "synthetic MEDS cohort of 40 subjects written to" in capsys.readouterr().out
    assert np.array_equal(
        read_events(tmp_path / "cli")["subject_id"].unique().sort().to_numpy(), np.arange(1, 41)
    )


# ---------------------------------------------------------------------------------------------- hospitals
def test_default_profile_changes_nothing():
    from ehr_transformer.data.synthetic import HospitalProfile

    plain, profiled = (
        generate_synthetic_cohort(300, seed=2),
        generate_synthetic_cohort(300, seed=2, profile=HospitalProfile()),
    )
    assert plain.events.equals(profiled.events) and plain.splits.equals(profiled.splits)
    assert all(plain.labels[t].equals(profiled.labels[t]) for t in plain.labels)


def test_hospital_profiles_change_coding_population_and_outcome(tmp_path):
    from ehr_transformer.data.synthetic import HospitalProfile

    base = generate_synthetic_cohort(800, seed=4)
    renamed = generate_synthetic_cohort(800, seed=4, profile=HospitalProfile(code_systems={"LOINC": "LAB"}))
    assert renamed.events.height == base.events.height
    assert not renamed.events["code"].str.starts_with("LOINC//").any()
    assert renamed.events["code"].to_list() == base.events["code"].str.replace("^LOINC//", "LAB//").to_list()
    meds = write_synthetic_meds(
        tmp_path / "lab", 50, seed=1, profile=HospitalProfile(name="lab", code_systems={"LOINC": "LAB"})
    )
    codes = pl.read_parquet(meds / "metadata" / "codes.parquet")
    assert (
        codes["code"].str.starts_with("LAB//").sum() == 17
        and not codes["code"].str.starts_with("LOINC//").any()
    )

    def first_admission_age(cohort):
        ev = cohort.events
        birth = ev.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("time").alias("birth"))
        first = (
            ev.filter(pl.col("code").str.starts_with("ADMISSION//"))
            .group_by("subject_id")
            .agg(pl.col("time").min())
        )
        return birth.join(first, on="subject_id").select(
            (pl.col("time") - pl.col("birth")).dt.total_days() / 365.25
        )

    older = generate_synthetic_cohort(
        800, seed=4, profile=HospitalProfile(age_shift=10.0, emergency_share=0.9)
    )
    assert first_admission_age(older).mean().item() > first_admission_age(base).mean().item() + 7
    assert first_admission_age(older).max().item() < 95.1

    def emergency_share(cohort):
        admissions = cohort.events.filter(pl.col("code").str.starts_with("ADMISSION//"))
        return (admissions["code"] == "ADMISSION//EMERGENCY").mean()

    assert emergency_share(older) > 0.85 > 0.7 > emergency_share(base)
    sicker = generate_synthetic_cohort(800, seed=4, profile=HospitalProfile(severity_scale=1.8))
    lactate = lambda c: c.events.filter(pl.col("code") == "LOINC//2524-7")["numeric_value"].mean()  # noqa: E731
    assert lactate(sicker) > lactate(base) * 1.15

    history = generate_synthetic_cohort(2000, seed=4, profile=HospitalProfile(mortality_mechanism="history"))
    assert 0.05 < history.labels[MORTALITY]["boolean_value"].mean() < 0.25
    with pytest.raises(ValueError, match="mortality_mechanism"):
        HospitalProfile(mortality_mechanism="luck")
    with pytest.raises(ValueError, match="code_systems"):
        HospitalProfile(code_systems={"SNOMED": "X"})


def test_local_code_share_renames_a_nested_share_of_the_coded_vocabulary():
    from ehr_transformer.data.synthetic import CODES, HospitalProfile

    base = generate_synthetic_cohort(300, seed=5)
    coded = [c for c in CODES if "//" in c and not c.startswith("MEDS_")]
    quarter, half = (
        HospitalProfile(local_code_share=share, local_code_seed=3).local_codes() for share in (0.25, 0.5)
    )
    assert len(quarter) == round(0.25 * len(coded)) and len(half) == round(0.5 * len(coded))
    assert set(quarter) < set(half) and set(half) <= set(coded)
    assert set(half) != set(HospitalProfile(local_code_share=0.5, local_code_seed=4).local_codes())
    local = generate_synthetic_cohort(
        300, seed=5, profile=HospitalProfile(local_code_share=0.5, local_code_seed=3)
    )
    assert local.events["code"].to_list() == base.events["code"].replace(half).to_list()
    assert local.events["code"].str.starts_with("LOCAL//").any()
    assert local.labels[MORTALITY].equals(base.labels[MORTALITY])  # only the coding differs
    with pytest.raises(ValueError, match="local_code_share"):
        HospitalProfile(local_code_share=1.5)
