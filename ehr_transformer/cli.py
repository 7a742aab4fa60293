"""The `ehr-transformer` command: argument parsing only; each command calls one public function of the package.

    ehr-transformer quickstart [--output_dir DIR]             synthetic cohort -> pretrain -> fine-tune -> evaluate
    ehr-transformer synthetic --output_dir DIR [--num_subjects N]   write a synthetic MEDS cohort
    ehr-transformer convert-wide --dyn F --sta F --outc F --task NAME [--prediction_hours H] --output_dir DIR
    ehr-transformer convert-long --events F [--outcomes F] --output_dir DIR [--preset physionet2012] [--folds K --fold k]
    ehr-transformer pretrain --data_dir MEDS --output_dir DIR [TrainingArguments ...]
    ehr-transformer finetune --data_dir MEDS --labels FILE --model_name_or_path DIR --output_dir DIR [...]
                             [--linear_probe]                 frozen backbone + logistic regression (few labels)
    ehr-transformer evaluate --checkpoint DIR --data_dir MEDS --labels FILE [--output_dir DIR]
    ehr-transformer predict --checkpoint DIR --data_dir MEDS --labels FILE --output_file predictions.parquet
    ehr-transformer adapt --checkpoint DIR --data_dir TARGET_MEDS --labels FILE --output_dir DIR [--no_refit_values]
    ehr-transformer select --data_dir MEDS --candidates DIR_OR_HUB_ID ... [--labels FILE] [--output_file F.json]

Every flag is written `--snake_case`, as `transformers`' own. `pretrain` and `finetune` take every
`transformers.TrainingArguments` flag (`--num_train_epochs`, `--per_device_train_batch_size`, `--learning_rate`,
...), default to the package's recipes (`training.arguments.PRETRAINING_RECIPE` / `FINETUNING_RECIPE`) and work under `accelerate launch`.

`--help` of every command loads neither torch nor transformers: the package's modules are imported inside each
command, and the short help of `pretrain` / `finetune` is built with argparse from the package's own dataclasses
(`--help_all` prints every `TrainingArguments` flag, and imports transformers). A mistake in the input (a missing
folder, a bad file, a refused option) prints one line, `ehr-transformer: error: ...`, and exits with 2;
`ehr-transformer --debug COMMAND ...` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from . import __version__

# Errors the package raises for bad input (`MEDSValidationError`, `UnsafeCheckpointError`, ... are ValueErrors):
# `main` prints them on one line unless --debug.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
TRAINING_COMMANDS = {"pretrain": "PretrainingArguments", "finetune": "FinetuningArguments"}


def _check_data_dir(path: str | None) -> None:
    """Refuse a `--data_dir` that is not a folder before anything reads it."""
    if path is not None and not Path(path).is_dir():
        raise FileNotFoundError(f"--data_dir {path}: no such folder")


def _training_parser(command: str) -> argparse.ArgumentParser:
    """The short parser of `pretrain` / `finetune`, built from the package's dataclasses with argparse alone: it
    serves `--help` without importing transformers and refuses a missing required flag with a short usage. The
    real parsing is `transformers.HfArgumentParser`'s (`_parse_training`)."""
    from .training import arguments

    task_arguments = getattr(arguments, TRAINING_COMMANDS[command])
    parser = argparse.ArgumentParser(
        prog=f"ehr-transformer {command}",
        usage=f"ehr-transformer {command} --data_dir MEDS --output_dir DIR "
        + ("--labels FILE [--model_name_or_path DIR] " if command == "finetune" else "")
        + "[flags]",
        description=task_arguments.__doc__,
        epilog="Every transformers.TrainingArguments flag is accepted (--seed, --max_steps, --eval_strategy, "
        "--save_strategy, --bf16, ...): --help_all lists them all, docs/cli.md explains the defaults.",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="help", help="show this help and exit")
    parser.add_argument(
        "--help_all", action="store_true", help="every flag, with every transformers.TrainingArguments flag"
    )
    for title, cls in (
        ("data", arguments.DataArguments),
        ("model", arguments.ModelArguments),
        (command, task_arguments),
    ):
        group = parser.add_argument_group(f"{title} ({cls.__name__})")
        for field in dataclasses.fields(cls):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            shown = "required" if required else f"default: {field.default}"
            help_text = f"{field.metadata.get('help', '')} ({shown})".replace("%", "%%")
            if field.type in (bool, "bool"):
                group.add_argument(
                    f"--{field.name}", nargs="?", const=True, default=field.default, help=help_text
                )
            else:
                group.add_argument(
                    f"--{field.name}", required=required, default=field.default, metavar="", help=help_text
                )
    group = parser.add_argument_group(
        "training (transformers.TrainingArguments; defaults: the package's recipe)"
    )
    group.add_argument(
        "--output_dir", required=True, metavar="", help="checkpoint folder to write (required)"
    )
    for name, default in arguments.command_defaults(command).items():
        group.add_argument(f"--{name}", default=default, metavar="", help=f"default: {default}")
    return parser


def _check_best_epoch_saves(known: argparse.Namespace) -> None:
    """One sentence instead of `transformers`' strategy mismatch: the fine-tuning recipe restores its best epoch,
    so it must save whenever it evaluates. `known` holds the recipe's flags (`_training_parser`)."""
    best = str(getattr(known, "load_best_model_at_end", False)).lower() in ("true", "1", "yes")
    save, evaluate = str(getattr(known, "save_strategy", "")), str(getattr(known, "eval_strategy", ""))
    if best and save not in (evaluate, "best"):
        raise ValueError(
            f"--save_strategy {save} with --eval_strategy {evaluate}: the fine-tuning recipe restores its best epoch "
            "(--load_best_model_at_end), so it must save when it evaluates; keep --save_strategy epoch, or train a "
            "fixed number of epochs with --eval_strategy no --save_strategy no --load_best_model_at_end false"
        )


def _parse_training(command: str, argv: list[str]):
    """(DataArguments, ModelArguments, PretrainingArguments or FinetuningArguments, TrainingArguments) from the
    command line, with the package's recipe for the command (`arguments.command_defaults`) as defaults."""
    # transformers 5 folded `warmup_ratio` into `warmup_steps` (a value below 1 is a share of the steps)
    argv = [
        "--warmup_steps" if a == "--warmup_ratio" else a.replace("--warmup_ratio=", "--warmup_steps=")
        for a in argv
    ]
    light = _training_parser(command)
    if "--help_all" not in argv:
        known, _ = light.parse_known_args(argv)  # --help ends here, as does a missing required flag
        _check_data_dir(known.data_dir)
        _check_best_epoch_saves(known)

    from transformers import HfArgumentParser, TrainingArguments

    from .training import arguments

    parser = HfArgumentParser(
        (
            arguments.DataArguments,
            arguments.ModelArguments,
            getattr(arguments, TRAINING_COMMANDS[command]),
            TrainingArguments,
        ),
        prog=f"ehr-transformer {command}",
        usage=light.usage + " (--help: the package's flags, --help_all: every flag)",
    )
    parser.set_defaults(**arguments.command_defaults(command))
    if "--help_all" in argv:
        parser.print_help()
        raise SystemExit(0)
    return parser.parse_args_into_dataclasses(args=argv)


def _pretrain(argv: list[str]) -> int:
    data_args, model_args, pretraining_args, training_args = _parse_training("pretrain", argv)
    from .training.pretrain import pretrain
    from .training.trainer import finish_distributed

    pretrain(data_args, model_args, pretraining_args, training_args)
    finish_distributed()
    print(f"pretrained checkpoint written to {training_args.output_dir}")
    return 0


def _finetune(argv: list[str]) -> int:
    data_args, model_args, finetuning_args, training_args = _parse_training("finetune", argv)
    from .training.finetune import finetune
    from .training.trainer import finish_distributed

    finetune(data_args, model_args, finetuning_args, training_args)
    finish_distributed()
    kind = "linear-probe" if finetuning_args.linear_probe else "fine-tuned"
    print(f"{kind} checkpoint written to {training_args.output_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .data.labels import refuse_comma
    from .evaluation.report import evaluate_checkpoint, format_report

    refuse_comma(args.labels)
    report = evaluate_checkpoint(
        args.checkpoint,
        args.data_dir,
        args.labels,
        split=args.split,
        output_dir=args.output_dir,
        n_bootstrap=args.n_bootstrap,
        baseline=None if args.baseline == "none" else args.baseline,
        baseline_labels=args.baseline_labels,
        sex_code_prefix=args.sex_code_prefix,
        group_codes=args.group_codes,
        update_card=args.update_card,
    )
    print(format_report(report))
    if args.output_dir:
        print(f"metrics.json, roc.png and calibration.png written to {args.output_dir}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .evaluation.explain import explain_checkpoint
    from .inference import predict
    from .utils import atomic_path

    if args.labels is None and not args.task:
        raise ValueError(
            "predict needs --labels PATH (a label or prediction-time file, folder or glob) or --task NAME=PATH ..."
        )
    predictions = predict(
        args.checkpoint, args.data_dir, args.labels, split=args.split or None, tasks=args.task or None
    )
    if args.explain:  # the N events that moved each risk most (integrated gradients), same row order
        if args.task:
            raise ValueError("--explain explains one label source: give it with --labels, not --task")
        top_events, subject_ids = explain_checkpoint(
            args.checkpoint, args.data_dir, args.labels, split=args.split or None, top_k=args.explain
        )
        if subject_ids != predictions["subject_id"].to_list():
            raise RuntimeError("explanations and predictions are not in the same row order")
        predictions = predictions.with_columns(top_events)
    with atomic_path(args.output_file) as tmp:
        predictions.write_parquet(tmp)
    print(predictions.head(10))
    print(f"{len(predictions)} predictions written to {args.output_file}")
    return 0


def _select(args: argparse.Namespace) -> int:
    from .selection.selector import format_ranking, select_checkpoints, write_ranking

    result = select_checkpoints(
        args.data_dir,
        args.candidates,
        labels=args.labels,
        split=args.split or None,
        max_subjects=args.max_subjects,
        max_labels=args.max_labels,
        seed=args.seed,
        n_bootstrap=args.n_bootstrap,
    )
    print(format_ranking(result))
    if args.output_file:
        print(f"ranking written to {write_ranking(result, args.output_file)}")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from .adaptation import adapt_checkpoint, format_adaptation
    from .data.labels import label_sources

    labels = label_sources(args.labels, args.task) if args.task else args.labels
    if labels is None:
        raise ValueError("adapt needs --labels PATH (one task) or --task NAME=PATH ... (several)")
    result = adapt_checkpoint(
        args.checkpoint,
        args.data_dir,
        labels,
        args.output_dir,
        refit_values=not args.no_refit_values,
        continued_pretraining_epochs=args.continued_pretraining_epochs,
        continued_pretraining_max_steps=args.continued_pretraining_max_steps,
        continued_pretraining_learning_rate=args.continued_pretraining_learning_rate,
        unlabeled_split=args.unlabeled_split,
        tuning_split=args.tuning_split,
        eval_split=args.eval_split or None,
        batch_size=args.batch_size,
        seed=args.seed,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
    )
    print(format_adaptation(result))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from .data.synthetic import write_synthetic_meds

    path = write_synthetic_meds(
        args.output_dir,
        n_subjects=args.num_subjects,
        seed=args.seed,
        n_shards=args.num_shards,
        overwrite=args.overwrite,
    )
    print(f"synthetic MEDS cohort of {args.num_subjects} subjects written to {path}")
    return 0


def _convert_wide(args: argparse.Namespace) -> int:
    from .data.wide import convert_wide

    summary = convert_wide(
        args.dyn,
        args.sta,
        args.outc,
        args.output_dir,
        task=args.task,
        seed=args.seed,
        overwrite=args.overwrite,
        prediction_hours=args.prediction_hours,
        label_column=args.label_column,
        label_type=args.label_type,
    )
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _convert_long(args: argparse.Namespace) -> int:
    from datetime import datetime

    from .data.long import LongTableLayout, OutcomeSpec, convert_long, parse_offset, preset, replace_layout

    chosen = preset(args.preset) if args.preset else {"layout": LongTableLayout(), "outcomes": ()}

    def names(text: str | None) -> tuple[str, ...] | None:
        return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())

    layout = replace_layout(
        chosen["layout"],
        id_column=args.id_column,
        time_column=args.time_column,
        parameter_column=args.parameter_column,
        value_column=args.value_column,
        time_unit=args.time_unit,
        anchor=datetime.fromisoformat(args.anchor) if args.anchor else None,
        code_prefix=args.code_prefix,
        static=names(args.static),
        categorical=names(args.categorical),
        age=args.age,
        drop=names(args.drop),
        missing_values=None if args.missing is None else tuple(float(v) for v in names(args.missing)),
        missing_scope=args.missing_scope,
        outcome_id_column=args.outcome_id_column,
        outcome_time_column=args.outcome_time_column,
        prediction_offset=parse_offset(args.prediction_time) if args.prediction_time else None,
    )
    outcomes = [OutcomeSpec.parse(o) for o in args.outcome] if args.outcome else chosen["outcomes"]
    if outcomes and args.outcomes is None:
        raise ValueError("--outcome names outcome columns but --outcomes gives no outcome table")
    summary = convert_long(
        args.events,
        args.outcomes,
        args.output_dir,
        outcomes=outcomes if args.outcomes is not None else (),
        layout=layout,
        seed=args.seed,
        n_folds=args.folds,
        fold=args.fold,
        tuning_fraction=args.tuning_fraction,
        overwrite=args.overwrite,
        dataset_name=args.dataset_name or chosen.get("dataset_name"),
    )
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(output_dir=args.output_dir, n_subjects=args.num_subjects, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ehr-transformer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"ehr-transformer {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (before the command)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "pretrain", add_help=False, help="masked event pretraining (takes TrainingArguments flags)"
    )
    p.set_defaults(func=_pretrain)
    p = sub.add_parser(
        "finetune",
        add_help=False,
        help="fine-tune on a label file (takes TrainingArguments flags; --linear_probe)",
    )
    p.set_defaults(func=_finetune)

    p = sub.add_parser("quickstart", help="synthetic cohort -> pretrain -> fine-tune -> evaluate -> reload")
    p.add_argument("--output_dir", default="quickstart_output")
    p.add_argument("--num_subjects", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_quickstart)

    p = sub.add_parser(
        "select", help="rank candidate checkpoints for a dataset (coverage, outcome codes, fit, LogME)"
    )
    p.add_argument("--data_dir", required=True, help="MEDS dataset folder of the user")
    p.add_argument("--candidates", required=True, nargs="+", help="checkpoint folders or hub ids")
    p.add_argument("--labels", default=None, help="optional label file: adds LogME transferability")
    p.add_argument("--output_file", default=None, help="ranking JSON (written atomically)")
    p.add_argument("--split", default="train", help="split of the user's data to score ('' for all subjects)")
    p.add_argument("--max_subjects", type=int, default=1000, help="subjects embedded per candidate (sample)")
    p.add_argument(
        "--max_labels",
        type=int,
        default=2000,
        help="label rows used for LogME and the outcome codes (sample)",
    )
    p.add_argument(
        "--n_bootstrap",
        type=int,
        default=200,
        help="bootstrap resamples of the subjects: score intervals and the within-noise warning (0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_select)

    p = sub.add_parser(
        "adapt", help="calibrate a fine-tuned checkpoint for a new population (refit, DAPT, T)"
    )
    p.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder")
    p.add_argument("--data_dir", required=True, help="the target population's MEDS folder")
    p.add_argument("--labels", default=None, help="the target's label file, folder of label shards or glob")
    p.add_argument(
        "--task", nargs="+", default=None, metavar="NAME=PATH", help="several tasks (a multitask checkpoint)"
    )
    p.add_argument("--output_dir", required=True, help="adapted checkpoint folder (written atomically)")
    p.add_argument("--no_refit_values", action="store_true", help="keep the source's value statistics")
    p.add_argument(
        "--continued_pretraining_epochs",
        type=float,
        default=0.0,
        help="epochs of masked event pretraining on the target's unlabeled train split (0 = none)",
    )
    p.add_argument(
        "--continued_pretraining_max_steps", type=int, default=-1, help="> 0: steps instead of epochs"
    )
    p.add_argument("--continued_pretraining_learning_rate", type=float, default=1e-4)
    p.add_argument("--unlabeled_split", default="train", help="split whose events refit values / pretrain")
    p.add_argument("--tuning_split", default="tuning", help="labelled split the temperature is fitted on")
    p.add_argument(
        "--eval_split", default="held_out", help="split also reported, never fitted on ('' = none)"
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None, help="cache folder of the tokenized datasets")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.set_defaults(func=_adapt)

    p = sub.add_parser("synthetic", help="write a synthetic MEDS cohort")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_subjects", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num_shards", type=int, default=None, help="shards per split (default: 1 per 10k subjects)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_synthetic)

    p = sub.add_parser("convert-wide", help="wide hourly ICU tables (YAIB/ricu) to a MEDS dataset")
    p.add_argument("--dyn", required=True, help="dynamic table: stay_id, time, one column per variable")
    p.add_argument("--sta", required=True, help="static table: stay_id, age, sex, height, weight")
    p.add_argument(
        "--outc",
        required=True,
        help="outcome table: stay_id, [time,] label: one label per stay or per stay and time",
    )
    p.add_argument("--task", required=True, help="task name: the label file is labels/TASK.parquet")
    p.add_argument("--label_column", default="label", help="outcome column of --outc (default: label)")
    p.add_argument(
        "--label_type",
        default="auto",
        choices=["auto", "boolean", "integer", "float", "categorical"],
        help="MEDS value column of the labels; auto: boolean for 0/1, float for other numbers",
    )
    p.add_argument(
        "--prediction_hours",
        type=float,
        default=None,
        help="per-stay outcome: hours after admission when it is predicted (mortality24: 24 by default); a "
        "per-time outcome is predicted at its own times",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the subject-level 70/15/15 split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_convert_wide)

    p = sub.add_parser(
        "convert-long",
        help="long event tables (one row per measurement, e.g. PhysioNet 2012) to a MEDS dataset",
    )
    p.add_argument("--events", required=True, help="event table (parquet or csv): id, time, parameter, value")
    p.add_argument(
        "--outcomes", default=None, help="outcome table (parquet or csv): id, one column per outcome"
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--preset", default=None, choices=["physionet2012"], help="a known layout; flags override it"
    )
    p.add_argument(
        "--outcome",
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME=COLUMN[:TYPE]",
        help="label file NAME from outcome COLUMN; TYPE boolean, integer, float or categorical (default: 0/1 -> "
        "boolean, other numbers -> float, text -> categorical)",
    )
    p.add_argument(
        "--prediction_time", default=None, help="prediction time after the anchor: 48h, 2d, 90m or HH:MM"
    )
    p.add_argument(
        "--outcome_time_column", default=None, help="per-time outcomes: each row's prediction time"
    )
    p.add_argument("--id_column", default=None, help="subject or stay id column (default subject_id)")
    p.add_argument(
        "--outcome_id_column", default=None, help="id column of the outcome table (default --id_column)"
    )
    p.add_argument("--time_column", default=None, help="datetime, duration, number or HH:MM (default time)")
    p.add_argument(
        "--time_unit", default=None, choices=["seconds", "minutes", "hours", "days"], help="of numbers"
    )
    p.add_argument("--parameter_column", default=None, help="what was measured (default parameter)")
    p.add_argument("--value_column", default=None, help="the measured number (default value)")
    p.add_argument(
        "--anchor", default=None, help="where offset 0 goes, ISO datetime (default 2000-01-01T00:00)"
    )
    p.add_argument("--code_prefix", default=None, help="code = prefix + parameter (e.g. PHYSIONET//)")
    p.add_argument("--static", default=None, help="comma-separated descriptor parameters: static events")
    p.add_argument("--categorical", default=None, help="descriptors written as codes with their value")
    p.add_argument("--age", default=None, help="the age parameter (years): becomes MEDS_BIRTH")
    p.add_argument("--drop", default=None, help="comma-separated parameters to leave out (counted)")
    p.add_argument("--missing", default=None, help="comma-separated markers of 'not recorded', e.g. -1")
    p.add_argument(
        "--missing_scope",
        default=None,
        choices=["static", "all"],
        help="markers apply to descriptors and outcomes (static) or to time series too (all)",
    )
    p.add_argument("--folds", type=int, default=None, help="cross-validation: number of folds (with --fold)")
    p.add_argument("--fold", type=int, default=None, help="cross-validation: the held-out fold, 0 .. folds-1")
    p.add_argument(
        "--tuning_fraction", type=float, default=0.2, help="cross-validation: tuning share of train"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (70/15/15, or the folds)")
    p.add_argument("--dataset_name", default=None, help="metadata/dataset.json dataset_name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_convert_long)

    for name, func, help_text in (
        ("evaluate", _evaluate, "held-out metrics with 95%% intervals, subgroups and plots"),
        ("predict", _predict, "risk for every (subject_id, prediction_time) row of a file"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--data_dir", required=True)
        p.add_argument(
            "--labels",
            required=name == "evaluate",
            default=None,
            help="MEDS label file, folder of label shards or glob"
            + (" (for predict: subject_id and prediction_time suffice)" if name == "predict" else ""),
        )
        p.add_argument(
            "--split",
            default="held_out",
            help="split to score, any name of metadata/subject_splits.parquet ('' for all subjects, no split file needed)",
        )
        if name == "predict":
            p.add_argument(
                "--task",
                nargs="+",
                action="extend",
                default=None,
                metavar="NAME=PATH",
                help="multitask checkpoint: the label source of each task, e.g. --task mortality=a.parquet stay=b/",
            )
            p.add_argument("--output_file", required=True, help="predictions parquet (written atomically)")
            p.add_argument(
                "--explain",
                type=int,
                default=0,
                metavar="N",
                help="add `top_events`: the N events with the largest integrated-gradient attribution",
            )
        if name == "evaluate":
            p.add_argument("--output_dir", default=None, help="folder for metrics.json and the plots")
            p.add_argument("--n_bootstrap", type=int, default=1000)
            p.add_argument("--baseline", default="gbm", choices=["gbm", "logistic", "none"])
            p.add_argument(
                "--baseline_labels",
                default="same",
                choices=["same", "all"],
                help="fit the baseline on the label rows that trained the checkpoint (same) or on every training label",
            )
            p.add_argument(
                "--sex_code_prefix",
                default=None,
                help="codes that give sex start with this (default: codes with a part GENDER or SEX, any case, "
                "such as GENDER//F or PHYSIONET//Gender//1); the group is what follows",
            )
            p.add_argument(
                "--group_codes",
                default=None,
                help="CSV or parquet table code,attribute,group: subgroups of any static attribute",
            )
            p.add_argument(
                "--update_card",
                action="store_true",
                help="write the held-out figures into the checkpoint's card",
            )
        p.set_defaults(func=func)

    # `pretrain` and `finetune` parse their own flags: argparse reads the global flags and the command only.
    command_at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    training = command_at < len(argv) and argv[command_at] in TRAINING_COMMANDS
    args = parser.parse_args(argv[: command_at + 1] if training else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if training:
            return args.func(argv[command_at + 1 :])
        _check_data_dir(getattr(args, "data_dir", None))
        return args.func(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"ehr-transformer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main"]
