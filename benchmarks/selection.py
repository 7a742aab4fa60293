"""Does `ehr-transformer select` pick the checkpoint that fine-tunes best on a user's data?

    python -m benchmarks.selection --output benchmarks/results/selection.json
    # or split by user hospital over processes, then joined (every summary figure recomputed from the cases):
    python -m benchmarks.selection --hospital_index 0 1 2 --output part0.json
    python -m benchmarks.selection --hospital_index 3 4 --output part1.json
    python -m benchmarks.selection --merge part0.json part1.json --output benchmarks/results/selection.json

Each of five held-out synthetic source hospitals (`HospitalProfile`: general coding, local lab codes, local
diagnosis codes with an older population dying of its history, local medication codes with sicker subjects, an
elderly emergency population) plays the user once. Its zoo holds one tiny pretrained checkpoint per degree of
mismatch with the user, graded like real hospital differences:

- `match`: the same hospital (another seed): every code known, same population and outcome mechanism;
- `mild`: 25% of the coded vocabulary written as local codes (`local_code_share`), population 5 years older;
- `moderate`: 50% local codes, 10 years older, acute illness 1.25x as severe;
- `severe`: 75% local codes, 15 years older, 1.5x as severe, frailer, the other mortality mechanism.

For every case
- the selector ranks the four checkpoints on the user's training split (coverage, prototype fit, LogME on the
  user's training labels of in-hospital mortality); it sees nothing else of the user;
- truths, each from fine-tuning every checkpoint on the user's training labels once per seed with the package's
  `finetune` (`common.finetuned_predictions`) and measuring the seeds' mean AUROC on the user's evaluation
  subjects: the user's tuning + held_out splits plus a second cohort of the same hospital (`--eval_subjects`,
  another seed), none seen by fine-tuning or the selector. Its standard error combines the test sampling error
  (bootstrap over evaluation subjects, the same resamples for all candidates, so differences are paired) and the
  fine-tuning seeds' spread (variance / seeds):
  - primary, few labels: `--finetune_label_fraction` (0.2) of the training labels, `--low_label_seeds` (4)
    seeds. The rows are drawn from the fine-tuning seed (`FinetuningArguments.label_fraction`), so at a given
    seed every candidate gets the same rows and the comparison stays paired; `finetune_epochs / fraction` epochs
    give as many optimisation steps as the full-label fine-tune;
  - `full_labels`: the whole training split, `--finetune_seeds` (3) seeds (`--no_full_label_truth` skips it);
  - `frozen_probe`: head-only, the package's few-label recipe (`fit_linear_probe` on each candidate's frozen
    mean-pooled embeddings of the primary truth's rows, `common.probe_predictions`), `--probe_seeds` (20) seeds.
    Reported beside; the goal is judged on the primary truth, as chosen before this truth was added.
    `--probe_seeds 0` skips it;
  - with `--finetune_from_probe`, the few-label and full-label fine-tunes start from the linear probe and train
    every weight (LP-FT, `FinetuningArguments.linear_probe_init`); its learning rate was chosen on `--zoo dev`
    (1e-4 over 3e-4, by mean AUROC), and its runs are committed apart (`selection_lpft.json`,
    `selection_lpft_full_labels.json`).

Why the few-label truth is primary: the users served are hospital data scientists with few labels who start
from a shared checkpoint, and with few labels the starting checkpoint matters; with the whole training split
the candidates ended within ~0.005 AUROC of each other, statistical ties on which a selector is neither right
nor wrong. This design was chosen after a full-label run gave top-1 right in 3 of 5 cases with the top-two
differences inside the noise (none of the five separable); the full-label figures are re-measured in the same
run and reported beside the primary ones.

Reported per case and truth: `top1_correct` (strict: the selector's first choice has the highest mean
fine-tuned AUROC), `spearman` (selector's combined score vs mean fine-tuned AUROC), `regret_auroc`,
`top2_separable` (best minus runner-up by the truth > 2 standard errors of that paired difference: is the
truth's winner identifiable at all), `top1_within_noise` (the choice's AUROC is within one standard error of
the paired difference from the best), each candidate's AUROC, standard error and selector scores, and the same
for each selector component alone. The goal, on the primary truth: top-1 right in >= 4 of 5 cases and mean
Spearman >= 0.7.

Tuning: nothing of the selector was tuned on these hospitals or seeds, and `ehr_transformer.selection` was not
changed for this zoo. `--zoo dev` runs the same protocol on separate development hospitals, seeds and
local-code orders (the only ones looked at while designing).

Other zoos (`--level_set`): with the graded zoo the candidates tie after fine-tuning, so two zoos whose mismatch
is larger, with the user's population kept, were tried on `--zoo dev`: `local_codes` (50%, 90% and 100% of the
coded vocabulary local) and `code_systems` (diagnoses, procedures and medications written in other systems; labs
and vitals; both). Either would have gone to the benchmark hospitals only if on the development ones its truth
put `match` first with a separable top two in at least 3 of 4; neither did (README). `replicates` measures the
truth's floor: four checkpoints of the user's own hospital that differ only in the draw of their pretraining
cohort.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import common

COMPONENTS = ("coverage", "code_coverage", "fit", "transferability")
# (name, share of the coded vocabulary written as local codes, years older, severity factor, frailty shift,
#  other mortality mechanism, code systems the candidate's hospital writes otherwise): one candidate per degree
#  of mismatch with the user's hospital. `graded` is the benchmark's zoo; `local_codes` and `code_systems` are
#  steeper zoos whose candidates might still differ after fine-tuning, tried on `--zoo dev`.
LEVEL_SETS = {
    "graded": [
        ("match", 0.0, 0.0, 1.0, 0.0, False, ()),
        ("mild", 0.25, 5.0, 1.0, 0.0, False, ()),
        ("moderate", 0.5, 10.0, 1.25, 0.0, False, ()),
        ("severe", 0.75, 15.0, 1.5, 0.5, True, ()),
    ],
    "local_codes": [  # the same population; ever more of the coded vocabulary local (nested)
        ("match", 0.0, 0.0, 1.0, 0.0, False, ()),
        ("half_local", 0.5, 0.0, 1.0, 0.0, False, ()),
        ("most_local", 0.9, 0.0, 1.0, 0.0, False, ()),
        ("all_local", 1.0, 0.0, 1.0, 0.0, False, ()),
    ],
    "code_systems": [  # the same population; whole code systems written otherwise (diagnoses, labs and vitals)
        ("match", 0.0, 0.0, 1.0, 0.0, False, ()),
        ("other_diagnoses", 0.0, 0.0, 1.0, 0.0, False, ("ICD10CM", "ICD10PCS", "RXNORM")),
        ("other_labs", 0.0, 0.0, 1.0, 0.0, False, ("LOINC",)),
        ("other_both", 0.0, 0.0, 1.0, 0.0, False, ("ICD10CM", "ICD10PCS", "RXNORM", "LOINC")),
    ],
    # no mismatch at all: four checkpoints of the user's own hospital, differing only in their pretraining cohort
    # (seed): how far apart candidates land after fine-tuning by the draw of pretraining alone
    "replicates": [
        (name, 0.0, 0.0, 1.0, 0.0, False, ()) for name in ("match", "match_b", "match_c", "match_d")
    ],
}
LEVEL_FIELDS = (
    "name",
    "local_code_share",
    "years_older",
    "severity_factor",
    "frailty_shift",
    "other_mortality_mechanism",
    "other_code_systems",
)


def sources(zoo: str):
    """The user hospitals of a zoo: (name, profile, seed). Seeds: the checkpoints' pretraining cohorts use
    seed + 10 * level, the user's cohort seed + 5, its second evaluation cohort seed + 7."""
    from ehr_transformer.data.synthetic import HospitalProfile as H

    if zoo == "dev":  # used while designing; never the reported figures
        return [
            ("dev_default", H(name="dev_default"), 30100),
            (
                "dev_two_local_systems",
                H(name="dev_two_local_systems", code_systems={"ICD10CM": "ICDX", "LOINC": "LOC"}),
                30200,
            ),
            ("dev_young_mild", H(name="dev_young_mild", age_shift=-15.0, severity_scale=0.7), 30300),
            (
                "dev_local_rx_history",
                H(name="dev_local_rx_history", code_systems={"RXNORM": "RX"}, mortality_mechanism="history"),
                30400,
            ),
        ]
    return [
        ("general", H(name="general"), 50100),
        ("local_labs", H(name="local_labs", code_systems={"LOINC": "LAB"}), 50200),
        (
            "local_diagnoses_older",
            H(
                name="local_diagnoses_older",
                code_systems={"ICD10CM": "DX", "ICD10PCS": "PX"},
                age_shift=8.0,
                mortality_mechanism="history",
            ),
            50300,
        ),
        (
            "local_meds_sicker",
            H(
                name="local_meds_sicker",
                code_systems={"RXNORM": "MED"},
                severity_scale=1.4,
                frailty_shift=0.5,
            ),
            50400,
        ),
        (
            "elderly_emergency",
            H(
                name="elderly_emergency",
                age_shift=15.0,
                severity_scale=1.5,
                emergency_share=0.85,
                mortality_mechanism="history",
            ),
            50500,
        ),
    ]


def candidate_profile(source, level, seed: int):
    """The hospital behind one candidate: the user's hospital with the mismatch of `level`."""
    name, share, older, severity, frailty, other_mechanism, other_systems = level
    mechanism = source.mortality_mechanism
    if other_mechanism:
        mechanism = "physiology" if mechanism == "history" else "history"
    code_systems = {**source.code_systems, **{system: f"OTHER_{system}" for system in other_systems}}
    return dataclasses.replace(
        source,
        name=f"{source.name}_{name}",
        local_code_share=share,
        local_code_seed=seed,
        age_shift=source.age_shift + older,
        severity_scale=source.severity_scale * severity,
        frailty_shift=source.frailty_shift + frailty,
        mortality_mechanism=mechanism,
        code_systems=code_systems,
    )


def truth_with_errors(probabilities, labels, clusters, n_boot: int, seed: int) -> dict:
    """Mean AUROC over fine-tuning seeds per candidate, its standard error and the paired errors of differences.

    probabilities: `(C, S, N)` for C candidates, S seeds, N evaluation rows; labels: `(N,)`; clusters: `(N,)`
    subject index. Variance = bootstrap over subjects (same resamples for every candidate) + seeds' variance / S."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    n_cand, n_seeds, _ = probabilities.shape
    auc = np.array([[roc_auc_score(labels, p) for p in cand] for cand in probabilities])  # (C, S)
    rng = np.random.default_rng(seed)
    n_clusters = int(clusters.max()) + 1
    boot = np.empty((n_boot, n_cand))
    for b in range(n_boot):
        weights = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)[clusters]
        boot[b] = [
            np.mean([roc_auc_score(labels, p, sample_weight=weights) for p in cand]) for cand in probabilities
        ]
    seed_var = auc.var(axis=1, ddof=1) / n_seeds if n_seeds > 1 else np.zeros(n_cand)
    diff_var = np.array(
        [[np.var(boot[:, i] - boot[:, j], ddof=1) for j in range(n_cand)] for i in range(n_cand)]
    )
    diff_se = np.sqrt(diff_var + seed_var[:, None] + seed_var[None, :])
    np.fill_diagonal(diff_se, 0.0)
    return {
        "auroc": auc.mean(axis=1),
        "auroc_by_seed": auc,
        "se": np.sqrt(boot.var(axis=0, ddof=1) + seed_var),
        "diff_se": diff_se,
    }


def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def evaluate_ranking(scores: list[float], truth, diff_se, names: list[str]) -> dict:
    order = sorted(range(len(truth)), key=lambda i: -truth[i])
    best = order[0]
    chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return {
        "selected": names[chosen],
        "top1_correct": chosen == best,
        "top1_within_noise": bool(truth[best] - truth[chosen] <= diff_se[best, chosen]),
        "spearman": spearman(list(scores), list(truth)),
        "regret_auroc": float(truth[best] - truth[chosen]),
    }


def judge(runs: list, rows: list[dict], names: list[str], n_boot: int, seed: int) -> dict:
    """The selector's verdicts against one truth: `runs` holds each candidate's `finetuned_predictions` at one
    label budget, `rows` its selector scores. The case's verdicts, each component's alone, and each candidate's
    mean fine-tuned AUROC, its standard error and the seeds' AUROCs (under "candidates")."""
    import numpy as np

    labels, clusters = runs[0][1], runs[0][2]
    assert all(np.array_equal(r[1], labels) for r in runs), "evaluation rows differ between candidates"
    truth = truth_with_errors(np.stack([r[0] for r in runs]), labels, clusters, n_boot, seed)
    auroc, diff_se = truth["auroc"], truth["diff_se"]
    order = np.argsort(-auroc, kind="stable")
    verdict = evaluate_ranking([r["combined"] for r in rows], auroc, diff_se, names)
    top2 = dict.fromkeys(("top2_difference", "top2_difference_se", "top2_separable"))
    if len(names) > 1:
        difference, se = float(auroc[order[0]] - auroc[order[1]]), float(diff_se[order[0], order[1]])
        top2 = {
            "top2_difference": difference,
            "top2_difference_se": se,
            "top2_separable": difference > 2 * se,
        }
    verdict.update(best_by_finetuning=names[order[0]], **top2, mean_auroc_se=float(np.mean(truth["se"])))
    verdict["components_alone"] = {
        component: evaluate_ranking([r[component] for r in rows], auroc, diff_se, names)
        for component in COMPONENTS
    }
    verdict["candidates"] = [
        {
            "checkpoint": n,
            "finetuned_auroc": float(auroc[i]),
            "finetuned_auroc_se": float(truth["se"][i]),
            "finetuned_auroc_by_seed": [float(a) for a in truth["auroc_by_seed"][i]],
        }
        for i, n in enumerate(names)
    ]
    return verdict


def describe(verdict: dict) -> str:
    return (
        f"best fine-tuned {verdict['best_by_finetuning']}, top1 {verdict['top1_correct']} (within noise "
        f"{verdict['top1_within_noise']}), spearman {verdict['spearman']}, top-2 separable {verdict['top2_separable']}"
    )


def verdict_counts(cases: list[dict]) -> dict:
    """The summary figures of one truth, from each case's verdicts against it."""
    import numpy as np

    rhos = [c["spearman"] for c in cases if c["spearman"] is not None]
    return {
        "top1_correct_cases": sum(c["top1_correct"] for c in cases),
        "top1_within_noise_cases": sum(c["top1_within_noise"] for c in cases),
        "top2_separable_cases": sum(bool(c["top2_separable"]) for c in cases),
        "top1_correct_of_separable_cases": sum(c["top1_correct"] for c in cases if c["top2_separable"]),
        "mean_spearman": float(np.mean(rhos)) if rhos else None,
        "min_spearman": float(np.min(rhos)) if rhos else None,
        "components_alone": {
            component: {
                "top1_correct_cases": sum(c["components_alone"][component]["top1_correct"] for c in cases),
                "mean_spearman": float(
                    np.mean(
                        [r for c in cases if (r := c["components_alone"][component]["spearman"]) is not None]
                        or [np.nan]
                    )
                ),
            }
            for component in COMPONENTS
        },
    }


def summarize(cases: list[dict], settings: dict) -> dict:
    """Every summary figure of an output, from its cases (a merge recomputes them all): the primary (few-label)
    truth's and the goal, and the full-label truth's under "full_labels" when the cases carry it."""
    figures = verdict_counts(cases)
    components = figures.pop("components_alone")
    fraction = settings["finetune_label_fraction"]
    recipe = f"at learning rate {settings['finetune_lr']:g}" + (
        ", every weight trained from the linear probe (LP-FT)" if settings.get("finetune_from_probe") else ""
    )
    summary = {
        "truth": (
            f"each candidate fine-tuned on {fraction:.0%} of the user's training labels (at a given seed the same rows "
            f"for every candidate), {settings['low_label_seeds']} seeds, {settings['finetune_epochs'] / fraction:g} "
            f"epochs (as many steps as on all labels) {recipe}; mean AUROC on the user's evaluation subjects"
        ),
        "label_fraction": fraction,
        "n_cases": len(cases),
        **figures,
        "goal": "top-1 right (strict) in >= 4 of 5 cases and mean Spearman >= 0.7",
        "goal_met": len(cases) >= 5
        and figures["top1_correct_cases"] >= 4
        and (figures["mean_spearman"] or 0.0) >= 0.7,
        "components_alone": components,
    }
    if cases and all("frozen_probe" in c for c in cases):
        summary["frozen_probe"] = {
            "truth": (
                f"head-only fine-tuning: a linear probe (fit_linear_probe) on each candidate's frozen "
                f"mean-pooled embeddings of {fraction:.0%} of the user's training labels (the rows of the few-label "
                f"fine-tune at the same seed), {settings['probe_seeds']} seeds; mean AUROC on the same evaluation "
                "subjects"
            ),
            **verdict_counts([c["frozen_probe"] for c in cases]),
        }
    if cases and all("full_labels" in c for c in cases):
        summary["full_labels"] = {
            "truth": (
                f"each candidate fine-tuned on all of the user's training labels, {settings['finetune_seeds']} seeds, "
                f"{settings['finetune_epochs']:g} epochs {recipe}; mean AUROC on the same evaluation subjects"
            ),
            **verdict_counts([c["full_labels"] for c in cases]),
        }
    return summary


def results(cases: list[dict], settings: dict, levels: list[dict], meta: dict) -> dict:
    """The output JSON: the cases, what was measured, every summary figure, the settings and `meta` (command,
    timings, wall time, date, machine)."""
    return {
        "cases": cases,
        "protocol": f"{settings.get('level_set', 'graded')}_mismatch_low_label",
        "zoo": settings["zoo"],
        "levels": levels,
        **summarize(cases, settings),
        "tuning": "none on these hospitals or seeds; ehr_transformer.selection unchanged for this zoo (formula fixed on --zoo dev)",
        "settings": settings,
        **meta,
    }


def merge(paths: list[str], command: str) -> dict:
    """One output from partial ones (`--hospital_index`, run in parallel): their cases joined in the zoo's order,
    every summary figure recomputed from them, timings summed, `wall_s` the longest part's, each part's command
    and sources kept under "parts". Refuses a source found in two parts and parts whose settings differ other
    than in `hospital_index`."""
    parts = common.read_parts(paths, varying="hospital_index")
    found = [c["source"] for p in parts for c in p["cases"]]
    repeated = sorted({s for s in found if found.count(s) > 1})
    if repeated:
        raise SystemExit(f"--merge: {repeated} found in more than one of {paths}: a case would count twice")
    settings = dict(parts[0]["settings"])
    zoo_order = [name for name, _, _ in sources(settings["zoo"])]
    cases = sorted(
        (c for p in parts for c in p["cases"]),
        key=lambda c: zoo_order.index(c["source"]) if c["source"] in zoo_order else len(zoo_order),
    )
    indices = [p["settings"].get("hospital_index") for p in parts]
    settings["hospital_index"] = None if None in indices else sorted({i for part in indices for i in part})
    meta = common.merged_metadata(parts, command)
    for described, part in zip(meta["parts"], parts, strict=True):
        described["sources"] = [c["source"] for c in part["cases"]]
    return results(cases, settings, parts[0]["levels"], meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="selection.json")
    parser.add_argument("--zoo", choices=["benchmark", "dev"], default="benchmark")
    parser.add_argument(
        "--hospitals", type=int, default=None, help="use only the first N user hospitals (smoke tests)"
    )
    parser.add_argument(
        "--hospital_index",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="run only these user hospitals (indices into the zoo's, after --hospitals; --merge joins the parts)",
    )
    parser.add_argument(
        "--level_set",
        choices=sorted(LEVEL_SETS),
        default="graded",
        help="the zoo's degrees of mismatch (graded: the benchmark's; local_codes, code_systems: steeper; "
        "replicates: none)",
    )
    parser.add_argument(
        "--levels", type=int, default=None, help="use only the first N mismatch levels (smoke tests)"
    )
    parser.add_argument("--pretrain_subjects", type=int, default=1500)
    parser.add_argument(
        "--user_subjects", type=int, default=1500, help="the user's cohort (fine-tuning: its train split)"
    )
    parser.add_argument(
        "--eval_subjects", type=int, default=1500, help="second evaluation cohort of the user's hospital"
    )
    parser.add_argument("--hidden_size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--pretrain_epochs", type=float, default=4)
    parser.add_argument("--pretrain_lr", type=float, default=1e-3)
    parser.add_argument(
        "--finetune_epochs", type=float, default=4, help="epochs on all labels (on a fraction f: epochs / f)"
    )
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    parser.add_argument(
        "--finetune_label_fraction",
        type=float,
        default=0.2,
        help="share of the user's training labels of the primary (few-label) truth",
    )
    parser.add_argument(
        "--low_label_seeds", type=int, default=4, help="few-label fine-tunes per (case, candidate), averaged"
    )
    parser.add_argument(
        "--finetune_seeds", type=int, default=3, help="full-label fine-tunes per (case, candidate), averaged"
    )
    parser.add_argument(
        "--probe_seeds",
        type=int,
        default=20,
        help="head-only fine-tunes (linear probe on frozen features) per (case, candidate), averaged (0: skip)",
    )
    parser.add_argument(
        "--finetune_from_probe",
        action="store_true",
        help="fine-tune every weight from the linear probe (LP-FT) instead of a random head",
    )
    parser.add_argument(
        "--no_full_label_truth", action="store_true", help="skip the full-label truth (smoke tests)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=200, help="subject-bootstrap resamples of the evaluation"
    )
    parser.add_argument("--max_labels", type=int, default=1000, help="user training labels given to LogME")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="PART",
        help="join the JSON outputs of --hospital_index runs into --output (nothing is run)",
    )
    args = parser.parse_args(argv)
    if not 0.0 < args.finetune_label_fraction <= 1.0:
        parser.error("--finetune_label_fraction must be in (0, 1]")
    return args


def truths(args: argparse.Namespace, checkpoint: Path, user: Path, evaluation: list, work: Path, full: bool):
    """One candidate's fine-tuned predictions for a truth: few labels (`--finetune_label_fraction`,
    `--low_label_seeds`) or, with `full`, all of them (`--finetune_seeds`)."""
    return common.finetuned_predictions(
        checkpoint,
        user,
        evaluation,
        work,
        fraction=1.0 if full else args.finetune_label_fraction,
        seeds=args.finetune_seeds if full else args.low_label_seeds,
        epochs=args.finetune_epochs,
        learning_rate=args.finetune_lr,
        from_probe=args.finetune_from_probe,
    )


def run(args: argparse.Namespace, command: str) -> dict:
    """The benchmark: pretrain each case's zoo, select, fine-tune for every truth; the output JSON."""
    from ehr_transformer.data.synthetic import write_synthetic_meds
    from ehr_transformer.selection.selector import select_checkpoints
    from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
    from ehr_transformer.training.pretrain import pretrain

    logging.basicConfig(level=logging.WARNING)
    common.quiet(args.threads)
    started = time.perf_counter()
    hospitals = sources(args.zoo)[: args.hospitals]
    if args.hospital_index is not None:
        if not all(0 <= i < len(hospitals) for i in args.hospital_index):
            raise SystemExit(
                f"--hospital_index {args.hospital_index}: the zoo has hospitals 0..{len(hospitals) - 1}"
            )
        hospitals = [hospitals[i] for i in sorted(set(args.hospital_index))]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="selection_benchmark_"))
    work.mkdir(parents=True, exist_ok=True)
    levels = LEVEL_SETS[args.level_set][: args.levels]
    model_args = ModelArguments(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        intermediate_size=2 * args.hidden_size,
    )
    timings = dict.fromkeys(
        (
            "pretraining_s",
            "selection_s",
            "finetuning_low_label_s",
            "frozen_probe_s",
            "finetuning_full_labels_s",
        ),
        0.0,
    )
    names = [level[0] for level in levels]
    cases = []
    for source, profile, seed in hospitals:
        checkpoints = {}
        for k, level in enumerate(levels):
            t0 = time.perf_counter()
            data = write_synthetic_meds(
                work / "data" / source / level[0],
                args.pretrain_subjects,
                seed=seed + 10 * k,
                profile=candidate_profile(profile, level, seed),
                overwrite=True,
            )
            checkpoints[level[0]] = work / "zoo" / source / level[0]
            pretrain(
                DataArguments(
                    data_dir=str(data),
                    cache_dir=str(work / "cache"),
                    max_length=args.max_length,
                    min_code_count=5,
                ),
                model_args,
                PretrainingArguments(),
                common.training_args(checkpoints[level[0]], args.pretrain_epochs, 0, 32, args.pretrain_lr),
            )
            shutil.rmtree(data)
            timings["pretraining_s"] += time.perf_counter() - t0
            print(f"pretrained {source}/{level[0]} in {time.perf_counter() - t0:.0f} s", flush=True)
        user = write_synthetic_meds(
            work / "users" / source, args.user_subjects, seed=seed + 5, profile=profile, overwrite=True
        )
        second = write_synthetic_meds(
            work / "eval" / source, args.eval_subjects, seed=seed + 7, profile=profile, overwrite=True
        )
        evaluation = [(user, "tuning"), (user, "held_out")] + [
            (second, split) for split in ("train", "tuning", "held_out")
        ]
        t0 = time.perf_counter()
        result = select_checkpoints(
            user,
            [str(checkpoints[n]) for n in names],
            labels=user / "labels" / f"{common.TASK}.parquet",
            split="train",
            max_labels=args.max_labels,
            seed=0,
        )
        timings["selection_s"] += time.perf_counter() - t0
        by_path = {row["candidate"]: row for row in result["ranking"]}
        rows = [by_path[str(checkpoints[n])] for n in names]
        t0 = time.perf_counter()
        runs = [truths(args, checkpoints[n], user, evaluation, work, full=False) for n in names]
        timings["finetuning_low_label_s"] += time.perf_counter() - t0
        labels, clusters = runs[0][1], runs[0][2]
        case = {"source": source, **judge(runs, rows, names, args.bootstrap, seed)}
        case.update(
            evaluation_rows=int(labels.size),
            evaluation_deaths=int(labels.sum()),
            evaluation_subjects=int(clusters.max() + 1),
        )
        scores = (
            "coverage",
            "code_coverage",
            "distance_ratio",
            "occupancy_overlap",
            "fit",
            "transferability",
        )
        case["candidates"] = [
            {"checkpoint": n, **{k: r[k] for k in (*scores, "combined", "rank")}, **truth}
            for n, r, truth in zip(names, rows, case["candidates"], strict=True)
        ]
        if args.probe_seeds > 0:
            t0 = time.perf_counter()
            runs = [
                common.probe_predictions(
                    checkpoints[n], user, evaluation, args.finetune_label_fraction, args.probe_seeds
                )
                for n in names
            ]
            timings["frozen_probe_s"] += time.perf_counter() - t0
            case["frozen_probe"] = judge(runs, rows, names, args.bootstrap, seed)
        if not args.no_full_label_truth:
            t0 = time.perf_counter()
            runs = [truths(args, checkpoints[n], user, evaluation, work, full=True) for n in names]
            timings["finetuning_full_labels_s"] += time.perf_counter() - t0
            case["full_labels"] = judge(runs, rows, names, args.bootstrap, seed)
        cases.append(case)
        report_case(case, args.finetune_label_fraction, time.perf_counter() - started)

    settings = {k: v for k, v in vars(args).items() if k not in ("output", "work", "merge")}
    meta = {"command": command, "timings": {k: round(v, 1) for k, v in timings.items()}}
    meta |= {k: v for k, v in common.metadata(command, started, args.threads).items() if k != "command"}
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return results(cases, settings, [dict(zip(LEVEL_FIELDS, level, strict=True)) for level in levels], meta)


def report_case(case: dict, fraction: float, elapsed: float) -> None:
    """One case's verdicts and each candidate's scores and AUROCs, printed as the run goes."""
    line = f"user {case['source']}: selected {case['selected']}; {fraction:.0%} of labels: {describe(case)}"
    if "frozen_probe" in case:
        line += f"; frozen probe: {describe(case['frozen_probe'])}"
    if "full_labels" in case:
        line += f"; all labels: {describe(case['full_labels'])}"
    print(f"{line}; {elapsed:.0f} s so far", flush=True)
    full = {c["checkpoint"]: c for c in case.get("full_labels", {}).get("candidates", [])}
    probe = {c["checkpoint"]: c for c in case.get("frozen_probe", {}).get("candidates", [])}
    for c in case["candidates"]:
        print(
            f"    {c['checkpoint']:<9} codes {c['code_coverage']:.3f} fit {c['fit']:.3f} logme "
            f"{c['transferability']:.4f} combined {c['combined']:.3f} auroc {c['finetuned_auroc']:.3f} "
            f"± {c['finetuned_auroc_se']:.3f}"
            + (f" (frozen probe {probe[c['checkpoint']]['finetuned_auroc']:.3f})" if probe else "")
            + (f" (all labels {full[c['checkpoint']]['finetuned_auroc']:.3f})" if full else ""),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    from ehr_transformer.utils import write_json

    args = parse_args(argv)
    command = common.command_line("selection", argv)
    summary = merge(args.merge, command) if args.merge else run(args, command)
    write_json(args.output, summary)
    line = (
        f"{summary['label_fraction']:.0%} of labels: top-1 right in {summary['top1_correct_cases']} of "
        f"{summary['n_cases']} cases ({summary['top1_within_noise_cases']} within noise, "
        f"{summary['top2_separable_cases']} with a separable top two), mean Spearman {summary['mean_spearman']}"
    )
    for key, name in (("frozen_probe", "frozen probe"), ("full_labels", "all labels")):
        if key in summary:
            truth = summary[key]
            line += (
                f"; {name}: top-1 right in {truth['top1_correct_cases']}, {truth['top2_separable_cases']} "
                f"separable, mean Spearman {truth['mean_spearman']}"
            )
    print(f"{line}; wall {summary['wall_s']} s; written to {args.output}")


if __name__ == "__main__":
    main()
