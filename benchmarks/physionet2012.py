"""PhysioNet/CinC Challenge 2012 set A: in-hospital mortality from the first 48 hours, five-fold cross-validation.

    python -m benchmarks.physionet2012 --part select    # objective combination, chosen on fold 0's tuning split
    python -m benchmarks.physionet2012 --part fold0     # fold 0 at 100% of the labels (fold1 ... fold4 likewise)
    python -m benchmarks.physionet2012 --part curve     # fold 0 at 50%, 25%, 10% and 5% (the learning curve)
    python -m benchmarks.physionet2012 --merge          # physionet2012.json (summary) + the learning-curve plot

Each part writes `benchmarks/results/physionet2012_<part>.json`; a part run with `--folds`, `--seeds` or
`--shares` other than its own adds them to the name (`physionet2012_curve_share0.5_0.25.json`), so pieces run in
different sessions add up. `--merge` joins the parts found there into `benchmarks/results/physionet2012.json` and
`physionet2012_learning_curve.png`, refusing a fold, seed and share measured twice. The data is read from
`../shared/data/physionet2012` (`--data_dir`; never committed): 4,000 ICU stays, 554 in-hospital deaths.

Protocol (fixed before any run; every step is a public function of the package):

- data: `convert_long` with the `physionet2012` preset (`ehr-transformer convert-long --preset physionet2012`):
  descriptors static, age -> MEDS_BIRTH, -1 = not recorded, prediction 48 h after ICU admission; the outcome-side
  fields (SAPS-I, SOFA, Length_of_stay, Survival) never become events. Five folds, stratified by the outcome,
  fold seed 0 (`--folds 5 --fold k`): held_out = fold k (800 stays), tuning = 20% of the other folds (640),
  train = the rest (2,560).
- models, each fitted on the same label rows (`label_fraction` draws a seeded share of the training subjects;
  the JSON records the row fingerprints and `same_rows`):
  1. `gbm`: the package's gradient boosting on per-code aggregates (`fit_baseline_and_predict`, the
     `evaluate` baseline), fitted on the rows that trained `scratch`;
  2. `scratch`: `finetune` of the default model (64 wide, 2 layers) from random weights;
  3. `pretrained`: `pretrain` on the training subjects' events (the train split; the tuning split evaluates),
     then `finetune` from it;
  4. `probe`: `finetune --linear_probe` on the frozen pretrained backbone.
  Training uses the package's defaults unchanged (`recipe_training_arguments(stage=...)` and the argument
  classes' defaults, both recorded in the protocol: pretraining 4 epochs; fine-tuning the cross-fitted ensemble
  of 5 networks, each early-stopped on its own stopping part), so the figures are what a user gets from the
  commands; `--merge` refuses parts run under different recipes. One pretraining per fold and seed, reused by
  every label share of that part.
- objectives: the `select` part pretrains fold 0 (seed 0) once per candidate (`CANDIDATES`: the default
  code + value, + time, + time + feature: every objective the package offers) and scores each by the linear
  probe's AUROC on fold 0's *tuning* split at 100% and 10% of the labels (mean of the two). The probe, not a
  fine-tune, scores them because it costs a minute where a fine-tune costs about twenty. The winner is used by
  every fold. Held-out rows are never looked at for the choice; fold 0's tuning stays are held out in folds
  1-4, which this choice may flatter a little (fold 0's figures are free of it).
- label shares: 100% on all five folds; 5%, 10%, 25% and 50% on fold 0 (the learning curve, part `curve`, which
  pretrains fold 0 again with the same seed). Seed 0 only: several seeds per fold do not fit the budget with
  the five-network fine-tuning default (`--seeds` adds them).
- metrics on the held-out fold: AUROC and AUPRC with bootstrap 95% intervals (`task_report`,
  1,000 resamples), Brier, ECE; paired bootstrap differences (`paired_bootstrap_difference`) pretrained -
  scratch, pretrained - gbm, probe - gbm, scratch - gbm, pretrained - probe.
- throughput and memory: real (non-padding, capped at `max_length`) events per second of training for each
  pretraining and fine-tune (from `trainer_state.json`'s `train_runtime`) and the process's peak resident memory.

Budget with the five-network fine-tuning default, from the tasks benchmark's PhysioNet 2012 part (2026-12-07,
one thread beside another one-thread job, 2,800 training stays): pretraining about 2.5 min, a fine-tune 35-39 min
(15 epochs per network on average). A fold at 100% of the labels (pretraining, scratch, pretrained, probe) is
therefore about 80 min on one thread; `curve` (50% to 5%) about 1.5 h; the seven parts about 8.5 h of one
thread, 4.3 h of the 2 cores with two parts side by side. The earlier recipe's run (one network, 2026-12-07) is
kept in `benchmarks/results/physionet2012_earlier_recipe/`. Each part records its wall time and the epochs each
fine-tune ran, to re-plan from.

Smoke runs (`--max_stays 200 --max_steps 3`, or a synthetic table in the tests) exercise the same code with
tiny training; their JSON says so (`protocol.smoke`), and `--merge` refuses to mix them with real runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

NAME = "physionet2012"
OUTCOME = "in_hospital_death"
N_FOLDS = 5
FOLD_SEED = 0
SHARES = (0.05, 0.1, 0.25, 0.5, 1.0)
MODELS = ("gbm", "scratch", "pretrained", "probe")
METRICS = ("auroc", "auprc", "brier", "ece")
PAIRS = (
    ("pretrained", "scratch"),
    ("pretrained", "gbm"),
    ("probe", "gbm"),
    ("scratch", "gbm"),
    ("pretrained", "probe"),
)
CANDIDATES = ("code,value", "code,value,time", "code,value,time,feature")
SELECTION_SHARES = (1.0, 0.1)
RESULTS = common.REPO_ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Part:
    """What one part runs: folds x seeds x label shares (or the objective selection)."""

    folds: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    shares: tuple[float, ...] = (1.0,)
    select: bool = False


PARTS = {
    "select": Part(folds=(0,), shares=SELECTION_SHARES, select=True),
    **{f"fold{k}": Part(folds=(k,)) for k in range(N_FOLDS)},
    "curve": Part(folds=(0,), shares=tuple(s for s in SHARES if s < 1.0)),
}


# -------------------------------------------------------------------------------------------------- data
def _inputs(data_dir: Path, work: Path, max_stays: int | None) -> tuple[Path, Path]:
    """The event and outcome files: the originals, or the first `max_stays` stays of each (smoke runs)."""
    events, outcomes = data_dir / "set-a.parquet", data_dir / "outcomes-a.parquet"
    for path in (events, outcomes):
        if not path.is_file():
            raise SystemExit(
                f"{NAME}: {path} not found; put the PhysioNet 2012 set A files there or pass --data_dir "
                "(real data is never committed)"
            )
    if max_stays is None:
        return events, outcomes
    import polars as pl

    keep = pl.read_parquet(outcomes).sort("RecordID").head(max_stays)
    subset = work / "input"
    subset.mkdir(parents=True, exist_ok=True)
    pl.read_parquet(events).filter(pl.col("record_id").is_in(keep["RecordID"].implode())).write_parquet(
        subset / "set-a.parquet"
    )
    keep.write_parquet(subset / "outcomes-a.parquet")
    return subset / "set-a.parquet", subset / "outcomes-a.parquet"


def _fold_data(events: Path, outcomes: Path, work: Path, fold: int) -> tuple[Path, dict]:
    """Fold `fold`'s MEDS folder, written by `convert_long` with the physionet2012 preset."""
    from ehr_transformer.data.long import convert_long, preset

    meds = work / f"fold{fold}" / "meds"
    summary = convert_long(
        events,
        outcomes,
        meds,
        **preset("physionet2012"),
        n_folds=N_FOLDS,
        fold=fold,
        seed=FOLD_SEED,
        overwrite=True,
    )
    return meds, summary


def _events_per_subject(meds: Path, max_length: int) -> dict[int, int]:
    """Tokens a sequence of each subject holds: its events but MEDS_BIRTH, plus [CLS], at most `max_length`."""
    import polars as pl

    counts = (
        pl.scan_parquet(meds / "data" / "**" / "*.parquet")
        .filter(pl.col("code") != "MEDS_BIRTH")
        .group_by("subject_id")
        .len()
        .collect()
    )
    return {s: min(n + 1, max_length) for s, n in counts.iter_rows()}


# ---------------------------------------------------------------------------------------------- training
def _training_args(output_dir: Path, stage: str, seed: int, max_steps: int | None):
    from ehr_transformer.training.arguments import recipe_training_arguments

    extra = {} if max_steps is None else {"max_steps": max_steps}
    return recipe_training_arguments(
        output_dir, stage=stage, seed=seed, use_cpu=True, disable_tqdm=True, **extra
    )


def _throughput(output_dir: Path, tokens: int, wall_s: float) -> dict:
    """Events per second of `train_runtime` (trainer_state.json; an ensemble's networks summed, each over its
    share of the training rows), epochs run (an ensemble: the mean), wall time and peak memory."""
    from ehr_transformer.training.finetune import ENSEMBLE_STATE_FILE

    if (output_dir / ENSEMBLE_STATE_FILE).is_file():
        networks = json.loads((output_dir / ENSEMBLE_STATE_FILE).read_text())["networks"]
        runtime = sum(n["train_runtime"] or 0.0 for n in networks) or wall_s
        shares = [n["training_rows"] / (n["training_rows"] + n["stopping_rows"]) for n in networks]
        epochs = sum(n["epoch"] * share for n, share in zip(networks, shares, strict=True)) / len(networks)
        tokens *= len(networks)  # events per second over every network's passes
    else:
        state = json.loads((output_dir / "trainer_state.json").read_text())
        last = next((e for e in reversed(state["log_history"]) if "train_runtime" in e), {})
        runtime = float(last.get("train_runtime", wall_s))
        epochs = float(last.get("epoch", state.get("epoch") or 0.0))
    return {
        "epochs": round(epochs, 3),
        "train_runtime_s": round(runtime, 1),
        "wall_s": round(wall_s, 1),
        "events_per_s": round(tokens * epochs / runtime, 1) if runtime > 0 else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _pretrain(meds: Path, out: Path, objectives: str, seed: int, args, tokens: dict[int, int]) -> dict:
    from ehr_transformer.data.splits import split_subjects
    from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments
    from ehr_transformer.training.pretrain import pretrain

    started = time.perf_counter()
    pretrain(
        DataArguments(data_dir=str(meds), cache_dir=str(meds.parent / "cache")),
        ModelArguments(),
        PretrainingArguments(objectives=objectives),
        _training_args(out, "pretrain", seed, args.max_steps),
    )
    per_epoch = sum(tokens.get(s, 0) for s in split_subjects(meds, "train"))
    return {"objectives": objectives, **_throughput(out, per_epoch, time.perf_counter() - started)}


def _finetune(meds: Path, out: Path, share: float, seed: int, args, start: Path | None, probe: bool) -> float:
    """`finetune` (or `--linear_probe`) on `share` of the training labels; returns the wall seconds."""
    from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
    from ehr_transformer.training.finetune import finetune

    started = time.perf_counter()
    finetune(
        DataArguments(
            data_dir=str(meds),
            labels=str(meds / "labels" / f"{OUTCOME}.parquet"),
            cache_dir=str(meds.parent / "cache"),
        ),
        ModelArguments(model_name_or_path=str(start) if start else None),
        FinetuningArguments(label_fraction=share, linear_probe=probe),
        _training_args(out, "finetune", seed, args.max_steps),
    )
    return time.perf_counter() - started


def _scores(checkpoint: Path, meds: Path, split: str):
    """`predict` on `split`, sorted by subject and prediction time."""
    from ehr_transformer.inference import predict

    rows = predict(checkpoint, meds, meds / "labels" / f"{OUTCOME}.parquet", split=split)
    return rows.filter(rows["boolean_value"].is_not_null()).sort("subject_id", "prediction_time")


def _report(y, p, subjects, n_bootstrap: int) -> dict:
    from ehr_transformer.evaluation.report import task_report

    full = task_report("binary", y, p, n_bootstrap=n_bootstrap, clusters=subjects)
    return {k: full[k] for k in ("n", "n_positive", *METRICS)}


def _differences(y, scores: dict, subjects, n_bootstrap: int) -> dict:
    from ehr_transformer.evaluation.metrics import (
        auroc,
        average_precision,
        brier_score,
        expected_calibration_error,
        paired_bootstrap_difference,
    )

    fns = {
        "auroc": auroc,
        "auprc": average_precision,
        "brier": brier_score,
        "ece": expected_calibration_error,
    }
    return {
        f"{a}-{b}": {
            m: paired_bootstrap_difference(y, scores[a], scores[b], fn, subjects, n_bootstrap)
            for m, fn in fns.items()
        }
        for a, b in PAIRS
    }


def run_share(meds: Path, work: Path, pretrained: Path, share: float, seed: int, args, tokens) -> dict:
    """The four models at one label share on one fold and seed: metrics, paired differences, throughput."""
    import numpy as np

    from ehr_transformer.evaluation.report import baseline_training_labels, fit_baseline_and_predict
    from ehr_transformer.training.checkpoint import read_training_labels

    labels = meds / "labels" / f"{OUTCOME}.parquet"
    folders = {m: work / f"{m}_{share}" for m in ("scratch", "pretrained", "probe")}
    wall = {
        m: _finetune(meds, f, share, seed, args, None if m == "scratch" else pretrained, m == "probe")
        for m, f in folders.items()
    }
    held = {m: _scores(folder, meds, "held_out") for m, folder in folders.items()}
    reference = held["scratch"]
    for model, frame in held.items():
        if not frame.select("subject_id", "prediction_time").equals(
            reference.select("subject_id", "prediction_time")
        ):
            raise RuntimeError(
                f"{model}: held-out rows differ from scratch's; the comparison would not be paired"
            )
    started = time.perf_counter()
    train_rows, described = baseline_training_labels(folders["scratch"], meds, labels, "train", "same")
    gbm = fit_baseline_and_predict(meds, labels, reference, kind="gbm", seed=seed, train_labels=train_rows)
    runs = {"gbm": {"wall_s": round(time.perf_counter() - started, 1), "trained_on": described}}
    row_tokens = sum(tokens.get(s, 0) for s in train_rows["subject_id"].to_list())
    for model, folder in folders.items():
        record = read_training_labels(folder) or {}
        runs[model] = (
            {"wall_s": round(wall[model], 1)}
            if model == "probe"
            else _throughput(folder, row_tokens, wall[model])
        )
        runs[model].update(
            rows_fingerprint=record.get("rows_fingerprint"), n_training_rows=record.get("n_rows")
        )
    y = reference["boolean_value"].to_numpy().astype(int)
    subjects = reference["subject_id"].to_numpy()
    scores = {
        "gbm": np.asarray(gbm),
        **{m: f["predicted_boolean_probability"].to_numpy() for m, f in held.items()},
    }
    fingerprints = {runs[m]["rows_fingerprint"] for m in folders}
    return {
        "share": share,
        "seed": seed,
        "same_rows": len(fingerprints) == 1 and None not in fingerprints,
        "models": {m: _report(y, scores[m], subjects, args.n_bootstrap) for m in MODELS},
        "differences": _differences(y, scores, subjects, args.n_bootstrap),
        "training": runs,
    }


def select_objectives(meds: Path, work: Path, seed: int, shares, args, tokens) -> dict:
    """Pretrain once per candidate and score each by the linear probe's tuning AUROC (mean over `shares`)."""
    from ehr_transformer.evaluation.metrics import auroc

    candidates = {}
    for objectives in args.candidates:
        out = work / f"pretrained_{objectives.replace(',', '+')}"
        entry = {"pretraining": _pretrain(meds, out, objectives, seed, args, tokens), "tuning_auroc": {}}
        for share in shares:
            probe = work / f"probe_{objectives.replace(',', '+')}_{share}"
            _finetune(meds, probe, share, seed, args, out, True)
            rows = _scores(probe, meds, "tuning")
            entry["tuning_auroc"][str(share)] = auroc(
                rows["boolean_value"].to_numpy().astype(int), rows["predicted_boolean_probability"].to_numpy()
            )
            shutil.rmtree(probe, ignore_errors=True)
        entry["score"] = sum(entry["tuning_auroc"].values()) / len(entry["tuning_auroc"])
        candidates[objectives] = entry
        shutil.rmtree(out, ignore_errors=True)
    chosen = max(candidates, key=lambda c: candidates[c]["score"])
    return {"split": "tuning", "fold": 0, "seed": seed, "candidates": candidates, "chosen": chosen}


# ------------------------------------------------------------------------------------------------- parts
def _chosen_objectives(args) -> str:
    if args.objectives:
        return args.objectives
    path = Path(args.output_dir) / f"{NAME}_select.json"
    if not path.is_file():
        raise SystemExit(f"{NAME}: run `--part select` first (no {path}), or pass --objectives")
    return json.loads(path.read_text())["selection"]["chosen"]


def protocol(args) -> dict:
    """What every part of one benchmark shares; `--merge` refuses parts whose protocols differ."""
    from dataclasses import asdict

    from ehr_transformer.training.arguments import FinetuningArguments, PretrainingArguments, command_defaults

    return {
        "n_folds": N_FOLDS,
        "fold_seed": FOLD_SEED,
        "tuning_fraction": 0.2,
        "model": "ModelArguments() defaults",
        "training": "recipe_training_arguments(stage=...) unchanged"
        + ("" if args.max_steps is None else f", max_steps={args.max_steps}"),
        "recipes": {
            "pretrain": {**command_defaults("pretrain"), **asdict(PretrainingArguments())},
            "finetune": {**command_defaults("finetune"), **asdict(FinetuningArguments())},
        },
        "n_bootstrap": args.n_bootstrap,
        "max_stays": args.max_stays,
        "smoke": args.max_steps is not None or args.max_stays is not None,
    }


def run_part(args) -> Path:
    """Run `args.part` (or the folds/seeds/shares given) and write its JSON; returns the path."""
    import tempfile

    started = time.perf_counter()
    common.quiet(args.threads)
    part = PARTS[args.part]
    folds = tuple(args.folds) if args.folds is not None else part.folds
    seeds = tuple(args.seeds) if args.seeds is not None else part.seeds
    shares = tuple(args.shares) if args.shares is not None else part.shares
    work = Path(args.work_dir or tempfile.mkdtemp(prefix=f"{NAME}_"))
    data_dir = Path(args.data_dir)
    events, outcomes = _inputs(data_dir, work, args.max_stays)
    result: dict = {
        "benchmark": NAME,
        "part": args.part,
        "protocol": protocol(args),
        "settings": {"folds": list(folds), "seeds": list(seeds), "shares": list(shares)},
        "data": str(data_dir),
    }
    try:
        if part.select:
            meds, summary = _fold_data(events, outcomes, work, folds[0])
            tokens = _events_per_subject(meds, 512)
            result["conversion"] = summary
            result["selection"] = select_objectives(meds, work / "select", seeds[0], shares, args, tokens)
        else:
            objectives = _chosen_objectives(args)
            result["objectives"] = objectives
            result["runs"] = []
            for fold in folds:
                meds, summary = _fold_data(events, outcomes, work, fold)
                result.setdefault("conversion", summary)
                tokens = _events_per_subject(meds, 512)
                for seed in seeds:
                    run_dir = work / f"fold{fold}" / f"seed{seed}"
                    pretrained = run_dir / "pretrained"
                    pretraining = _pretrain(meds, pretrained, objectives, seed, args, tokens)
                    for share in sorted(shares, reverse=True):
                        run = run_share(meds, run_dir, pretrained, share, seed, args, tokens)
                        result["runs"].append({"fold": fold, "pretraining": pretraining, **run})
                        print(_line(result["runs"][-1]), flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result.update(common.metadata(common.command_line(NAME), started, args.threads))
    out = Path(args.output_dir) / f"{part_name(args.part, folds, seeds, shares)}.json"
    from ehr_transformer.utils import write_json

    write_json(out, result)
    return out


def part_name(part: str, folds, seeds, shares) -> str:
    """The part file's stem: `physionet2012_<part>`, plus what was overridden (`_seed1_2`, `_share0.5_0.25`), so
    that pieces of one part run in different sessions add up instead of overwriting each other."""
    name = f"{NAME}_{part}"
    default = PARTS[part]
    if default.select:  # one decision, read back by the other parts under this name
        return name
    for label, given, usual in (
        ("fold", folds, default.folds),
        ("seed", seeds, default.seeds),
        ("share", shares, default.shares),
    ):
        if tuple(given) != tuple(usual):
            name += f"_{label}" + "_".join(f"{v:g}" for v in given)
    return name


def _line(run: dict) -> str:
    models = "  ".join(
        f"{m} {run['models'][m]['auroc']['estimate']:.3f}" for m in MODELS if run["models"][m]["auroc"]
    )
    return f"fold {run['fold']} seed {run['seed']} share {run['share']}: AUROC {models}"


# ------------------------------------------------------------------------------------------------- merge
def _value(metric) -> float | None:
    return metric["estimate"] if isinstance(metric, dict) else metric


def summarize(runs: list[dict]) -> dict:
    """`{share: {model: {metric: {mean, sd, n}}, "differences": {pair: {metric: {mean, sd, n}}}, "folds"}}` over
    the runs (folds x seeds) of each label share."""
    summary: dict = {}
    for share in sorted({r["share"] for r in runs}):
        these = [r for r in runs if r["share"] == share]
        entry: dict = {
            m: {k: common.mean_sd([_value(r["models"][m][k]) for r in these]) for k in METRICS}
            for m in MODELS
        }
        entry["differences"] = {
            pair: {k: common.mean_sd([r["differences"][pair][k]["estimate"] for r in these]) for k in METRICS}
            for pair in these[0]["differences"]
        }
        entry["folds"] = sorted({r["fold"] for r in these})
        entry["n_runs"] = len(these)
        entry["same_rows"] = all(r["same_rows"] for r in these)
        summary[str(share)] = entry
    return summary


def goals(summary: dict) -> dict:
    """The issue's goals, each a boolean with the figures it was judged on (None where a share is missing)."""

    def mean(share, model, metric):
        return summary.get(share, {}).get(model, {}).get(metric, {}).get("mean")

    out = {}
    full, tenth = "1.0", "0.1"
    if full in summary:
        out["full_labels"] = {
            "pretrained_auroc_at_least_gbm": mean(full, "pretrained", "auroc") >= mean(full, "gbm", "auroc"),
            "pretrained_auprc_at_least_gbm": mean(full, "pretrained", "auprc") >= mean(full, "gbm", "auprc"),
            "pretrained_auroc_at_least_0.85": mean(full, "pretrained", "auroc") >= 0.85,
            "pretrained_ece_at_most_gbm": mean(full, "pretrained", "ece") <= mean(full, "gbm", "ece"),
        }
    if tenth in summary:
        gain = summary[tenth]["differences"]["pretrained-scratch"]["auroc"]["mean"]
        out["tenth_of_labels"] = {
            "pretrained_minus_scratch_auroc": gain,
            "pretrained_gain_at_least_0.03": gain >= 0.03,
            "pretrained_auroc_at_least_gbm": mean(tenth, "pretrained", "auroc")
            >= mean(tenth, "gbm", "auroc"),
            "pretrained_ece_at_most_gbm": mean(tenth, "pretrained", "ece") <= mean(tenth, "gbm", "ece"),
        }
    return out


def plot_learning_curve(summary: dict, path: Path) -> Path:
    """AUROC and AUPRC (mean +- sd over runs) against the label share, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted(summary, key=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("auroc", "auprc"), strict=True):
        for model in MODELS:
            means = [summary[s][model][metric]["mean"] for s in shares]
            sds = [summary[s][model][metric]["sd"] or 0.0 for s in shares]
            ax.errorbar([float(s) for s in shares], means, yerr=sds, marker="o", capsize=3, label=model)
        ax.set_xscale("log")
        ax.set_xlabel("share of training labels")
        ax.set_ylabel(metric.upper())
        ax.set_xticks([float(s) for s in shares], [f"{float(s):.0%}" for s in shares])
    axes[0].legend()
    runs = ", ".join(f"{float(s):.0%}: {summary[s]['n_runs']}" for s in shares)
    fig.suptitle(f"PhysioNet 2012 set A, held-out folds (runs per share: {runs})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def merge(args) -> Path:
    """Join the part JSONs of `args.output_dir` into physionet2012.json with the summary, goals and plot."""
    started = time.perf_counter()
    directory = Path(args.output_dir)
    paths = sorted(directory.glob(f"{NAME}_*.json"))
    if not any(p.stem != f"{NAME}_select" for p in paths):
        raise SystemExit(f"{NAME} --merge: no part results in {directory}")
    parts = [json.loads(p.read_text()) for p in paths]
    for path, part in zip(paths, parts, strict=True):
        if part["protocol"] != parts[0]["protocol"]:
            raise SystemExit(
                f"{NAME} --merge: {path} was run under another protocol than {paths[0]} (a smoke run, or an "
                "earlier recipe?); move the part that should not count out of the folder"
            )
    runs, measured = [], {}
    for path, part in zip(paths, parts, strict=True):
        for run in part.get("runs", []):
            key = (run["fold"], run["seed"], run["share"])
            if key in measured:
                raise SystemExit(
                    f"{NAME} --merge: fold {key[0]} seed {key[1]} share {key[2]} is in both {measured[key].name} "
                    f"and {path.name}; move the one that should not count out of the folder"
                )
            measured[key] = path
            runs.append(run)
    objectives = {p["objectives"] for p in parts if "objectives" in p}
    if len(objectives) > 1:
        raise SystemExit(f"{NAME} --merge: parts pretrained with different objectives {sorted(objectives)}")
    summary = summarize(runs)
    plot = plot_learning_curve(summary, directory / f"{NAME}_learning_curve.png")
    merged = {
        "benchmark": NAME,
        "protocol": parts[0]["protocol"],
        "objectives": objectives.pop() if objectives else None,
        "selection": next((p["selection"] for p in parts if "selection" in p), None),
        "summary": summary,
        "goals": goals(summary),
        "plot": str(plot.relative_to(common.REPO_ROOT))
        if plot.is_relative_to(common.REPO_ROOT)
        else str(plot),
        "runs": runs,
        **common.merged_metadata(parts, common.command_line(NAME)),
    }
    merged["wall_s"] = round(sum(p["wall_s"] for p in parts), 1)  # the parts run one after another
    merged["merge_s"] = round(time.perf_counter() - started, 1)
    from ehr_transformer.utils import write_json

    return write_json(directory / f"{NAME}.json", merged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--part", choices=sorted(PARTS), help="the part to run (see the module docstring)")
    parser.add_argument("--merge", action="store_true", help="join the parts into physionet2012.json + plot")
    parser.add_argument(
        "--data_dir", default=str(common.SHARED_DATA / NAME), help="set-a + outcomes-a parquet"
    )
    parser.add_argument("--output_dir", default=str(RESULTS), help="where part and merged JSONs go")
    parser.add_argument(
        "--work_dir", default=None, help="keep MEDS folders and checkpoints here (default: temp)"
    )
    parser.add_argument(
        "--objectives", default=None, help="skip the selection: pretrain with these objectives"
    )
    parser.add_argument(
        "--candidates", nargs="+", default=list(CANDIDATES), help="objective sets for --part select"
    )
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="override the part's folds")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the part's seeds")
    parser.add_argument(
        "--shares", type=float, nargs="+", default=None, help="override the part's label shares"
    )
    parser.add_argument("--n_bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_stays", type=int, default=None, help="smoke: only the first N stays")
    parser.add_argument("--max_steps", type=int, default=None, help="smoke: N optimizer steps per training")
    args = parser.parse_args(argv)
    if args.merge == (args.part is not None):
        parser.error("give either --part NAME or --merge")
    path = merge(args) if args.merge else run_part(args)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["PARTS", "Part", "goals", "main", "merge", "part_name", "protocol", "run_part", "summarize"]
