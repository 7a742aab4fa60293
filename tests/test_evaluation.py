"""Evaluation metrics, bootstrap intervals, subgroups, regression report and plots."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, mean_absolute_error, r2_score, roc_auc_score

from ehr_transformer.evaluation.metrics import (
    auroc,
    average_precision,
    bootstrap_ci,
    brier_score,
    expected_calibration_error,
)
from ehr_transformer.evaluation.plots import plot_calibration, plot_roc
from ehr_transformer.evaluation.report import task_report
from ehr_transformer.evaluation.subgroups import age_band

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scored(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    return y, p


def test_ece_constructed_example():
    # bin [0.8, 0.9): p = 0.8, 6/10 events -> gap 0.2; bin [0.2, 0.3): p = 0.2, 2/10 events -> gap 0
    y = np.r_[np.ones(6), np.zeros(4), np.ones(2), np.zeros(8)]
    p = np.r_[np.full(10, 0.8), np.full(10, 0.2)]
    assert expected_calibration_error(y, p) == pytest.approx(0.1)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0  # p = 1.0 falls into the last bin
    assert expected_calibration_error([1, 1], [0.0, 0.0]) == pytest.approx(1.0)


def test_fast_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert brier_score([0, 1], [0.5, 0.5]) == pytest.approx(0.25)
    assert np.isnan(auroc([1, 1], [0.2, 0.4]))


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (100, 1600):
        y, p = _scored(n)
        ci = bootstrap_ci(y, p, auroc, n_bootstrap=300, seed=0)
        assert ci["ci_lower"] <= ci["estimate"] <= ci["ci_upper"]
        assert ci["estimate"] == pytest.approx(roc_auc_score(y, p))
        assert ci["n_bootstrap"] == 300
        widths.append(ci["ci_upper"] - ci["ci_lower"])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x n -> about half; 16x n -> about a quarter
    again = bootstrap_ci(*_scored(100), auroc, n_bootstrap=300, seed=0)
    first = bootstrap_ci(*_scored(100), auroc, n_bootstrap=300, seed=0)
    assert again == first  # seeded


def test_bootstrap_single_class_gives_nan_interval():
    ci = bootstrap_ci(np.ones(10), np.linspace(0, 1, 10), auroc, n_bootstrap=50)
    assert np.isnan(ci["estimate"]) and np.isnan(ci["ci_lower"]) and ci["n_bootstrap"] == 0


def test_report_overall_and_subgroups():
    y, p = _scored(400, seed=3)
    ages = np.linspace(20, 95, 400)
    sex = np.where(np.arange(400) % 2 == 0, "Female", "Male").astype(object)
    sex[:5] = None
    # a group with a single class: AUROC undefined, reported as None
    y[ages >= 90] = 0
    report = task_report("binary", y, p, n_bootstrap=200, groups={"age_band": age_band(ages), "sex": sex})
    assert report["n"] == 400 and report["prevalence"] == pytest.approx(y.mean())
    for key in ("auroc", "auprc"):
        assert report[key]["ci_lower"] <= report[key]["estimate"] <= report[key]["ci_upper"]
    assert report["ece"] == pytest.approx(expected_calibration_error(y, p))
    assert set(report["subgroups"]["age_band"]) == {"18-44", "45-64", "65-79", "80+"}
    assert set(report["subgroups"]["sex"]) == {"Female", "Male", "unknown"}
    assert sum(g["n"] for g in report["subgroups"]["sex"].values()) == 400
    male = report["subgroups"]["sex"]["Male"]
    mask = sex == "Male"
    assert male["auroc"]["estimate"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
    only_neg = task_report("binary", np.zeros(20), np.full(20, 0.1), n_bootstrap=10)
    assert (
        only_neg["auroc"] is None and only_neg["auprc"] is None and only_neg["brier"] == pytest.approx(0.01)
    )
    import json

    json.dumps(report)  # JSON-serialisable


def test_age_band():
    bands = age_band([17, 18, 44.9, 45, 64, 65, 79.5, 80, 101, np.nan, None])
    assert bands.tolist() == [
        "<18",
        "18-44",
        "18-44",
        "45-64",
        "45-64",
        "65-79",
        "65-79",
        "80+",
        "80+",
        "unknown",
        "unknown",
    ]


def test_regression_report_matches_sklearn_and_its_intervals_resample_subjects():
    rng = np.random.default_rng(0)
    y = rng.gamma(2, 20, 300)
    f = y + rng.normal(0, 10, 300)
    r = task_report("regression", y, f, n_bootstrap=200)
    assert r["mae"]["estimate"] == pytest.approx(mean_absolute_error(y, f))
    assert r["rmse"]["estimate"] == pytest.approx(np.sqrt(np.mean((y - f) ** 2)))
    assert r["r2"]["estimate"] == pytest.approx(r2_score(y, f))
    assert r["calibration_slope"] == pytest.approx(np.polyfit(f, y, 1)[0])
    # 30 subjects with 10 near-identical rows each: resampling rows would pretend there are 300 independent ones
    subjects = np.repeat(np.arange(30), 10)
    y_hourly = np.repeat(rng.gamma(2, 20, 30), 10) + rng.normal(0, 1, 300)
    f_hourly = y_hourly + np.repeat(rng.normal(0, 10, 30), 10)
    by_row = task_report("regression", y_hourly, f_hourly, n_bootstrap=300)["mae"]
    by_subject = task_report("regression", y_hourly, f_hourly, n_bootstrap=300, clusters=subjects)["mae"]
    assert by_subject["ci_upper"] - by_subject["ci_lower"] > 2 * (by_row["ci_upper"] - by_row["ci_lower"])


def test_plots_are_valid_png_written_atomically(tmp_path):
    y, p = _scored(300)
    for fn, name in ((plot_calibration, "calibration.png"), (plot_roc, "roc.png")):
        path = fn(y, p, tmp_path / "plots" / name)
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == ["calibration.png", "roc.png"]
    with pytest.raises(ValueError, match="probabilities"):
        plot_calibration([0, 1], [0.5, 1.5], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
