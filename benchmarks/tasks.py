"""Every development task, the bare-default command line against the package's gradient boosting.

    python -m benchmarks.tasks --part yaib_mortality24     # ~11 min a seed on 1 thread (2026-12-07)
    python -m benchmarks.tasks --part yaib_los             # ~1 h 30 min a seed on 1 thread
    python -m benchmarks.tasks --part physionet2012        # ~2 h 30 min a seed on 1 thread
    python -m benchmarks.tasks --merge                     # -> benchmarks/results/tasks.json
    python -m benchmarks.tasks --part recipe               # ~20 min: the fine-tuning recipe's development check

Protocol (fixed before the first run, 2026-12-07):
- Tasks. YAIB demo cohorts (`../shared/data/yaib_demo`), each source on its own: `mortality24` (binary, one label
  per stay at 24 h) and `los` (remaining length of stay in hours, a regression label every hour), converted with
  `ehr-transformer convert-wide --task NAME`; PhysioNet 2012 set A (`../shared/data/physionet2012`):
  in-hospital death (binary) and length of stay in days (regression), both at 48 h, converted with
  `ehr-transformer convert-long --preset physionet2012`. Every conversion uses its converter's seeded 70/15/15
  subject split (seed 0, stratified by a binary outcome); the held-out 15% is scored, the tuning 15% is what
  early stopping sees.
- Models, all by the package's command line with no tuning flag (`--seed` and `--output_dir` aside): "transformer"
  = `finetune` from scratch; "pretrained" = `pretrain` on the training split's events, then `finetune
  --model_name_or_path` (one pretraining per cohort and seed, shared by the cohort's tasks); "gbm" = the
  gradient boosting `evaluate` fits on the same training rows and scores on the same held-out rows.
- Seeds 0, 1, 2 (the training seed; the split stays fixed). Metric: held-out AUROC (binary) or R² (regression),
  mean and standard deviation over the seeds; the GBM's figure is the mean of its (seed-independent) fits.
- Parts run in separate processes and write `benchmarks/results/tasks/<part>_seed<seeds>.json` (so that seeds
  run at different times add up); `--merge` joins them into
  `benchmarks/results/tasks.json`: {"tasks": {NAME: {"type", "metric", "transformer", "pretrained", "gbm",
  "runs": [...]}}}. A part may run fewer seeds (`--seeds`); the JSON says how many each figure has.

Part `recipe` (the development check that chose the fine-tuning recipe, docs/fine-tuning.md; written before its
run): the eICU demo mortality24 cohort's train and tuning stays only (its held-out stays are never read), in 4
folds by `cross_validation_splits` (seed 0, stratified; tuning = 20% of the other folds). In each fold, from
scratch, seed 0: "earlier" = `finetune` with the earlier recipe's flags (`EARLIER_RECIPE`), "single" = `finetune
--ensemble 1`, "default" = `finetune` with no flag; each scored on the fold by `evaluate`, whose GBM is fitted on
the model's training rows. Written to `benchmarks/results/tasks_recipe.json` (not merged into tasks.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED_DATA, command_line, mean_sd, metadata, quiet

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = RESULTS / "tasks"
YAIB_SOURCES = ("eicu_demo", "mimic_demo")
PHYSIONET_OUTCOMES = {"in_hospital_death": "binary", "length_of_stay": "regression"}
METRIC = {"binary": "auroc", "regression": "r2"}


def cohorts(part: str, data_root: Path, work: Path) -> list[dict]:
    """The part's cohorts: a MEDS folder each (converted here by the package's converters) with its tasks."""
    from ehr_transformer.cli import main as cli

    out = []
    if part.startswith("yaib_"):
        task = part.removeprefix("yaib_")
        for source in YAIB_SOURCES:
            folder = data_root / "yaib_demo" / task / source
            meds = work / f"{source}_{task}"
            flags = [f"--{name}" for name in ("dyn", "sta", "outc")]
            tables = [str(folder / f"{name}.parquet") for name in ("dyn", "sta", "outc")]
            argv = ["convert-wide", *[x for pair in zip(flags, tables, strict=True) for x in pair]]
            _run(cli, [*argv, "--task", task, "--output_dir", str(meds)])
            kind = "binary" if task == "mortality24" else "regression"
            out.append({"name": f"{source}_{task}", "meds": meds, "tasks": {task: kind}})
    elif part == "physionet2012":
        folder = data_root / "physionet2012"
        meds = work / "physionet2012"
        argv = ["convert-long", "--preset", "physionet2012", "--events", str(folder / "set-a.parquet")]
        argv += ["--outcomes", str(folder / "outcomes-a.parquet"), "--output_dir", str(meds), "--outcome"]
        _run(cli, [*argv, "in_hospital_death=In-hospital_death", "length_of_stay=Length_of_stay:float"])
        out.append({"name": "physionet2012", "meds": meds, "tasks": dict(PHYSIONET_OUTCOMES)})
    else:
        raise SystemExit(f"unknown part {part!r}: yaib_mortality24, yaib_los or physionet2012")
    return out


def _run(cli, argv: list[str]) -> None:
    if cli(argv) != 0:
        raise SystemExit(f"ehr-transformer {' '.join(argv)} failed")


def run_part(part: str, seeds: list[int], data_root: Path, keep: Path | None) -> Path:
    from ehr_transformer.cli import main as cli

    started = time.perf_counter()
    work = Path(keep or tempfile.mkdtemp(prefix=f"tasks_{part}_"))
    runs = []
    try:
        for cohort in cohorts(part, data_root, work):
            meds = cohort["meds"]
            for seed in seeds:
                common = ["--data_dir", str(meds), "--seed", str(seed)]
                pretrained = work / f"{cohort['name']}_pretrained_{seed}"
                t0 = time.perf_counter()
                _run(cli, ["pretrain", *common, "--output_dir", str(pretrained)])
                pretrain_s = time.perf_counter() - t0
                for task, kind in cohort["tasks"].items():
                    labels = str(meds / "labels" / f"{task}.parquet")
                    name = (
                        f"{cohort['name']}" if cohort["name"].endswith(task) else f"{cohort['name']}_{task}"
                    )
                    run = {"task": name, "type": kind, "seed": seed, "pretrain_s": round(pretrain_s, 1)}
                    for model, start in (("transformer", None), ("pretrained", pretrained)):
                        folder = work / f"{name}_{model}_{seed}"
                        argv = ["finetune", *common, "--labels", labels, "--output_dir", str(folder)]
                        t0 = time.perf_counter()
                        _run(cli, argv + (["--model_name_or_path", str(start)] if start else []))
                        run[f"{model}_finetune_s"] = round(time.perf_counter() - t0, 1)
                        run[f"{model}_epochs"] = _epochs(folder)
                        report_dir = work / f"{name}_{model}_{seed}_evaluation"
                        evaluate = ["evaluate", "--checkpoint", str(folder), "--data_dir", str(meds)]
                        _run(cli, [*evaluate, "--labels", labels, "--output_dir", str(report_dir)])
                        report = json.loads((report_dir / "metrics.json").read_text())
                        metric = METRIC[kind]
                        run[model] = report["model"][metric]["estimate"]
                        run[f"{model}_interval"] = report["model"][metric]
                        run[f"{model}_minus_gbm"] = report["model_minus_gbm_baseline"][metric]
                        run["gbm"] = report["gbm_baseline"][metric]["estimate"]
                        run["n_held_out"], run["n_subjects_held_out"] = report["n"], report["n_subjects"]
                    print(_line(run), flush=True)
                    runs.append(run)
                    _write_part(part, seeds, runs, started, complete=False)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    path = _write_part(part, seeds, runs, started, complete=True)
    print(f"wrote {path}")
    return path


def _write_part(part: str, seeds: list[int], runs: list[dict], started: float, complete: bool) -> Path:
    """The part's JSON, rewritten after every finished task so that a stopped part keeps what it measured."""
    PARTS.mkdir(parents=True, exist_ok=True)
    path = PARTS / f"{part}_seed{'_'.join(map(str, seeds))}.json"
    result = {
        **metadata(command_line("tasks"), started, threads=_threads()),
        "part": part,
        "seeds": seeds,
        "complete": complete,
        "protocol": __doc__.split("Protocol (fixed before the first run, 2026-12-07):")[1].strip(),
        "runs": runs,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# The fine-tuning recipe before 2026-12-07, as flags of today's `finetune`.
EARLIER_RECIPE = [
    "--ensemble", "1", "--classifier_pooling", "mean", "--learning_rate", "1e-3", "--weight_decay", "0.01",
    "--num_train_epochs", "20", "--early_stopping_patience", "3",
]  # fmt: skip
RECIPE_CANDIDATES = {"earlier": EARLIER_RECIPE, "single": ["--ensemble", "1"], "default": []}


def run_recipe_check(data_root: Path, keep: Path | None, n_folds: int = 4) -> Path:
    """Part `recipe` (module docstring)."""
    import polars as pl

    from ehr_transformer.cli import main as cli
    from ehr_transformer.data.splits import cross_validation_splits

    started = time.perf_counter()
    work = Path(keep or tempfile.mkdtemp(prefix="tasks_recipe_"))
    folder = data_root / "yaib_demo" / "mortality24" / "eicu_demo"
    source = work / "eicu_demo_mortality24"
    tables = [x for name in ("dyn", "sta", "outc") for x in (f"--{name}", str(folder / f"{name}.parquet"))]
    _run(cli, ["convert-wide", *tables, "--task", "mortality24", "--output_dir", str(source)])
    labels = source / "labels" / "mortality24.parquet"
    splits = pl.read_parquet(source / "metadata" / "subject_splits.parquet")
    development = splits.filter(pl.col("split") != "held_out")["subject_id"]
    runs = []
    try:
        for fold in range(n_folds):
            meds = work / f"fold{fold}"
            (meds / "metadata").mkdir(parents=True, exist_ok=True)
            if not (meds / "data").exists():
                (meds / "data").symlink_to(source / "data")
            for path in (source / "metadata").iterdir():
                if path.name != "subject_splits.parquet" and not (meds / "metadata" / path.name).exists():
                    (meds / "metadata" / path.name).symlink_to(path)
            folds = cross_validation_splits(development, pl.read_parquet(labels), n_folds, fold, seed=0)
            folds.write_parquet(meds / "metadata" / "subject_splits.parquet")
            run = {"fold": fold}
            for name, flags in RECIPE_CANDIDATES.items():
                out = work / f"fold{fold}_{name}"
                argv = ["finetune", "--data_dir", str(meds), "--labels", str(labels), "--seed", "0"]
                t0 = time.perf_counter()
                _run(cli, [*argv, "--output_dir", str(out), *flags])
                run[f"{name}_s"] = round(time.perf_counter() - t0, 1)
                evaluate = [
                    "evaluate",
                    "--checkpoint",
                    str(out),
                    "--data_dir",
                    str(meds),
                    "--labels",
                    str(labels),
                ]
                _run(cli, [*evaluate, "--output_dir", str(out / "evaluation")])
                report = json.loads((out / "evaluation" / "metrics.json").read_text())
                run[name] = report["model"]["auroc"]["estimate"]
                run[f"gbm_{name}"] = report["gbm_baseline"]["auroc"]["estimate"]
            print(json.dumps(run), flush=True)
            runs.append(run)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {name: mean_sd([run[name] for run in runs]) for name in (*RECIPE_CANDIDATES, "gbm_default")}
    result = {
        **metadata(command_line("tasks"), started, threads=_threads()),
        "part": "recipe",
        "protocol": __doc__.split("Part `recipe`")[1].strip(),
        "candidates": RECIPE_CANDIDATES,
        "runs": runs,
        "summary": summary,
    }
    path = RESULTS / "tasks_recipe.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary), f"\nwrote {path}", sep="")
    return path


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _epochs(folder: Path) -> float | None:
    """Epochs trained: the Trainer's count of a single network, the mean over the networks of an ensemble."""
    from ehr_transformer.training.finetune import ENSEMBLE_STATE_FILE

    state, ensemble = folder / "trainer_state.json", folder / ENSEMBLE_STATE_FILE
    if ensemble.is_file():
        return round(statistics.fmean(n["epoch"] for n in json.loads(ensemble.read_text())["networks"]), 2)
    return json.loads(state.read_text()).get("epoch") if state.is_file() else None


def _line(run: dict) -> str:
    metric = METRIC[run["type"]]
    return (
        f"{run['task']:<36} seed {run['seed']}  {metric} transformer {run['transformer']:.3f}  "
        f"pretrained {run['pretrained']:.3f}  gbm {run['gbm']:.3f}  (epochs {run['transformer_epochs']}, "
        f"{run['pretrained_epochs']})"
    )


def merge() -> Path:
    parts = sorted(PARTS.glob("*.json"))
    if not parts:
        raise SystemExit(f"--merge: no part in {PARTS}; run --part first")
    tasks: dict[str, dict] = {}
    sources = []
    for path in parts:
        part = json.loads(path.read_text())
        sources.append(
            {k: part.get(k) for k in ("part", "command", "date", "wall_s", "machine", "seeds", "complete")}
        )
        for run in part["runs"]:
            tasks.setdefault(run["task"], {"type": run["type"], "metric": METRIC[run["type"]], "runs": []})
            if any(seen["seed"] == run["seed"] for seen in tasks[run["task"]]["runs"]):
                raise SystemExit(
                    f"--merge: {path} measures {run['task']} at seed {run['seed']} again; "
                    "remove the part file that should not count"
                )
            tasks[run["task"]]["runs"].append(run)
    for entry in tasks.values():
        for model in ("transformer", "pretrained", "gbm"):
            summary = mean_sd([run[model] for run in entry["runs"]])
            sd = summary["sd"]
            entry[model], entry[f"{model}_sd"] = round(summary["mean"], 4), sd if sd is None else round(sd, 4)
            entry["n_seeds"] = summary["n"]
        best = max(entry["transformer"], entry["pretrained"])
        margin = 0.02 if entry["type"] == "binary" else 0.05
        entry["best_transformer_minus_gbm"] = round(best - entry["gbm"], 4)
        entry["within_goal"] = best >= entry["gbm"] - margin
    out = RESULTS / "tasks.json"
    out.write_text(json.dumps({"parts": sources, "tasks": tasks}, indent=2) + "\n")
    for name, entry in tasks.items():
        print(
            f"{name:<36} {entry['metric']:<5} transformer {entry['transformer']:.3f}  pretrained "
            f"{entry['pretrained']:.3f}  gbm {entry['gbm']:.3f}  ({entry['n_seeds']} seeds; within goal: "
            f"{entry['within_goal']})"
        )
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["yaib_mortality24", "yaib_los", "physionet2012", "recipe"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data_root", type=Path, default=SHARED_DATA)
    parser.add_argument(
        "--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--merge", action="store_true")
    args = parser.parse_args(argv)
    if args.merge:
        merge()
        return 0
    if args.part is None:
        parser.error("give --part or --merge")
    needed = args.data_root / ("physionet2012" if args.part == "physionet2012" else "yaib_demo")
    if not needed.is_dir():
        raise SystemExit(f"{needed}: not found; this benchmark needs the shared real data (see its README)")
    quiet(args.threads)
    if args.part == "recipe":
        run_recipe_check(args.data_root, args.keep)
    else:
        run_part(args.part, args.seeds, args.data_root, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
