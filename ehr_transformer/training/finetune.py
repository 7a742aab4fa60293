"""Fine-tuning a classifier on MEDS labels: one binary outcome, or several tasks over one shared backbone."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..checkpoint_safety import check_checkpoint_folder
from ..configuration_ehr import EHRTransformerConfig
from ..data.collators import DataCollatorForEventClassification
from ..data.dataset import (
    NoUsableRowsError,
    build_labeled_dataset,
    ensemble_parts,
    sample_label_rows,
    subsample_labels,
)
from ..data.labels import (
    _resolve_label_column,
    infer_task_type,
    join_task_labels,
    label_classes,
    label_source_name,
    label_sources,
    read_labels,
)
from ..evaluation.metrics import (
    compute_classification_metrics,
    compute_multiclass_metrics,
    compute_regression_metrics,
)
from ..loading import ANY_HEAD, CLASSIFIER_LAYERS, load_pretrained, quiet_transformers
from ..modeling_ehr import (
    EHRTransformerEnsembleForSequenceClassification,
    EHRTransformerForSequenceClassification,
    EHRTransformerModel,
)
from ..tokenization_ehr import EHREventTokenizer
from ..utils import write_json
from .arguments import DataArguments, FinetuningArguments, ModelArguments
from .checkpoint import (
    BINARY_HEAD,
    card_for_training,
    config_for,
    fit_tokenizer,
    remove_trainer_checkpoints,
    save_classifier_checkpoint,
    training_labels_record,
    with_tasks,
)
from .linear_probe import check_probe_inputs, finetune_linear_probe, linear_probe_classifier
from .trainer import ResumableTrainer, early_stopping, seed_before_model_init

logger = logging.getLogger(__name__)


def multitask_metrics(task_names: list[str], task_types: list[str]):
    """A Trainer `compute_metrics` for (N, T) logits and labels with NaN: `<task>_auroc/_auprc/_brier/_ece` for
    binary tasks, `<task>_mse/_mae` for regression tasks, each over the rows labelled for that task."""

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = np.asarray(logits[0] if isinstance(logits, (tuple, list)) else logits, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.float64).reshape(logits.shape)
        results = {}
        for i, (name, kind) in enumerate(zip(task_names, task_types, strict=True)):
            keep = ~np.isnan(labels[:, i])
            if not keep.any():
                continue
            if kind == "binary":
                task = compute_classification_metrics((logits[keep, i], labels[keep, i]))
                results.update({f"{name}_{key}": value for key, value in task.items()})
            else:
                error = logits[keep, i] - labels[keep, i]
                results.update(
                    {f"{name}_mse": float(np.mean(error**2)), f"{name}_mae": float(np.mean(np.abs(error)))}
                )
        return results

    return compute


def task_head(task_type: str, classes: list[str] | None = None) -> tuple[dict, object, str]:
    """The classifier fields of one task's config, the Trainer's `compute_metrics` and the objective in words.

    binary: one logit, BCE (`problem_type="multi_label_classification"` with `num_labels=1`, the `transformers`
    convention for a sigmoid output); regression: one output, MSE; multiclass: one logit per class of `classes`
    (`id2label`), cross entropy."""
    if task_type == "binary":
        return BINARY_HEAD, compute_classification_metrics, "binary cross entropy on one logit"
    if task_type == "regression":
        head = {**BINARY_HEAD, "problem_type": "regression"}
        return head, compute_regression_metrics, "mean squared error on one output"
    if task_type == "multiclass":
        if not classes or len(classes) < 2:
            raise ValueError(f"a multi-class task needs at least two classes in the labels, got {classes}")
        head = {
            **BINARY_HEAD,
            "num_labels": len(classes),
            "problem_type": "single_label_classification",
            "id2label": dict(enumerate(classes)),
            "label2id": {c: i for i, c in enumerate(classes)},
        }
        return head, compute_multiclass_metrics, f"cross entropy over {len(classes)} classes"
    raise ValueError(f"unknown task type {task_type!r}")


def finetune(
    data_args: DataArguments,
    model_args: ModelArguments,
    finetuning_args: FinetuningArguments,
    training_args: TrainingArguments,
) -> EHRTransformerForSequenceClassification:
    """Fine-tune a classifier on one binary label (BCE on one logit), from a pretrained folder or from scratch.

    With several tasks (`data_args.task = ["a=a.parquet", "b=b_folder"]`) or `data_args.task_types`, multitask
    fine-tuning: one output per task over the shared backbone (`config.task_names`/`task_types`), loss = mean of
    the tasks' BCE / MSE, each ignoring rows where its task has no label. Binary outputs start at the training
    prevalence (`init_bias_to_prevalence`).

    With `finetuning_args.linear_probe`, no gradient step: a linear probe on the frozen backbone instead
    (`finetune_linear_probe`). With `finetuning_args.linear_probe_init` (LP-FT), that probe is the starting head
    (`linear_probe_classifier`, `classifier_head="linear"`) and every weight trains from there.

    With `finetuning_args.ensemble` K > 1 (the default, 5), K networks are trained cross-fitted on the training
    subjects (`train_ensemble`) and saved as one `EHRTransformerEnsembleForSequenceClassification`, which is
    returned; K = 1 trains one network, stopped early on the tuning split."""

    tasks = getattr(data_args, "task", None)
    if data_args.labels is None and not tasks:
        raise ValueError(
            "fine-tuning needs --labels (a MEDS label file, folder of label shards or glob with subject_id, "
            "prediction_time, *_value) or --task NAME=PATH ... for several tasks"
        )
    if finetuning_args.linear_probe:
        return finetune_linear_probe(data_args, model_args, finetuning_args, training_args)
    sources = label_sources(data_args.labels, tasks)
    if finetuning_args.linear_probe_init:
        check_probe_inputs("--linear_probe_init", sources, data_args, model_args)
    task_type = data_args.task_type
    classes = None
    if len(sources) > 1 or (task_type and "," in task_type):
        joined, names, types = join_task_labels(sources)
        if task_type:
            types = [t.strip() for t in task_type.split(",")]
            if len(types) != len(names) or not set(types) <= {"binary", "regression"}:
                raise ValueError(
                    f"--task_type {task_type!r}: give 'binary' or 'regression' for each of the {len(names)} tasks "
                    f"{names}, comma-separated in --task order"
                )
            for name, kind in zip(names, types, strict=True):  # never binary loss on continuous targets
                infer_task_type(joined.select(pl.col(name).alias("float_value")), "float_value", kind, name)
        head = {"task_names": names, "task_types": types, "num_labels": len(names), "problem_type": None}
        labels, compute_metrics = sources, multitask_metrics(names, types)
        objective = "multitask: mean over tasks of BCE (binary) / MSE (regression), missing labels ignored"
        described = ", ".join(f"{n} ({t})" for n, t in zip(names, types, strict=True))
    else:
        ((name, label_source),) = sources.items()
        names = [name]
        labels = read_labels(label_source) if not isinstance(label_source, pl.DataFrame) else label_source
        column = _resolve_label_column(labels, None)
        task_type = infer_task_type(labels, column, task_type, label_source_name(label_source))
        if task_type == "multiclass":
            classes = label_classes(labels, column)
        head, compute_metrics, objective = task_head(task_type, classes)
        described = f"{name} ({task_type})"
    if model_args.model_name_or_path:
        check_checkpoint_folder(
            model_args.model_name_or_path
        )  # refuse pickle-only/absurd folders before loading
        tokenizer = EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
        base = EHRTransformerConfig.from_pretrained(model_args.model_name_or_path)
        if base.ensemble_size > 1:
            raise ValueError(
                f"{model_args.model_name_or_path} is an ensemble of {base.ensemble_size} fine-tuned classifiers; "
                "fine-tune from a pretrained checkpoint (or a single fine-tuned one, --ensemble 1)"
            )
    else:
        tokenizer = fit_tokenizer(data_args)
    build = partial(  # the training and tuning rows, read and labelled the same way
        build_labeled_dataset,
        data_args.data_dir,
        labels,
        tokenizer,
        cache_dir=data_args.cache_dir,
        source_name=None if isinstance(labels, dict) else label_source_name(label_source),
        task_type=task_type,
        classes=classes,
    )
    train_dataset = subsample_labels(
        build(data_args.train_split), finetuning_args.label_fraction, training_args.seed
    )
    k = finetuning_args.ensemble
    eval_dataset = None  # an ensemble stops each network on a part of the training subjects instead
    if k == 1:
        try:
            eval_dataset = sample_label_rows(
                build(data_args.eval_split), finetuning_args.labels_per_subject, training_args.seed
            )
        except NoUsableRowsError:
            if training_args.eval_strategy != "no":
                raise
            # not evaluated during training: an eval split without labels is no reason to stop
    logger.info(
        "fine-tuning (%s) on %d labelled samples%s",
        described,
        len(train_dataset),
        f", {k} networks cross-fitted on them" if k > 1 else f", evaluating on {len(eval_dataset or [])}",
    )

    probe_penalties = []  # LP-FT: the inverse penalty C each network's probe chose, for the card

    def new_model(rows, args: TrainingArguments) -> EHRTransformerForSequenceClassification:
        """A classifier ready to train on `rows`: the pretrained backbone or a new one, its outputs starting at the
        rows' prevalence (LP-FT: its head the linear probe fitted on them)."""
        seed_before_model_init(args)
        pooling, path = finetuning_args.classifier_pooling, model_args.model_name_or_path
        if path and finetuning_args.linear_probe_init:
            backbone = load_pretrained(
                EHRTransformerModel,
                path,
                expected_unexpected=ANY_HEAD,
                attn_implementation=model_args.attn_implementation,
                use_safetensors=True,
            )
            model, probe = linear_probe_classifier(
                backbone,
                tokenizer,
                rows,
                args.seed,
                pooling,
                args.per_device_eval_batch_size,
                attn_implementation=model_args.attn_implementation,
            )
            probe_penalties.append(f"{probe.best_params_['logisticregression__C']:g}")
        elif path:
            model = load_pretrained(
                EHRTransformerForSequenceClassification,
                path,
                expected_missing=CLASSIFIER_LAYERS,
                expected_unexpected=ANY_HEAD,
                config=with_tasks(base, classifier_pooling=pooling, **head),
                attn_implementation=model_args.attn_implementation,
                ignore_mismatched_sizes=True,  # another checkpoint's classifier rows need not fit these tasks
                use_safetensors=True,
            )
        else:
            config = config_for(tokenizer, model_args, classifier_pooling=pooling, **head)
            model = EHRTransformerForSequenceClassification._from_config(
                config, attn_implementation=model_args.attn_implementation
            )
        if not finetuning_args.linear_probe_init:
            init_bias_to_prevalence(model, rows["labels"])
        # every network of an ensemble in the same units: the whole training split's target spread
        model.config.regression_target_scale = regression_target_scale(model, train_dataset["labels"])
        return model

    def train(rows, tuning_rows, args: TrainingArguments) -> ResumableTrainer:
        trainer = ResumableTrainer(
            model=new_model(rows, args),
            args=args,
            train_dataset=rows,
            eval_dataset=tuning_rows,
            data_collator=DataCollatorForEventClassification(tokenizer),
            compute_metrics=compute_metrics,
            callbacks=early_stopping(args, finetuning_args.early_stopping_patience),
            labels_per_subject=finetuning_args.labels_per_subject,
        )
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        return trainer

    if k == 1:
        trainer = train(train_dataset, eval_dataset, training_args)
        model = trainer.model
    else:
        model = train_ensemble(train_dataset, k, training_args, finetuning_args.labels_per_subject, train)
        objective += (
            f"; an ensemble of {k} networks cross-fitted on the training subjects, probabilities averaged"
        )
    if training_args.process_index == 0:
        card = card_for_training(
            data_args,
            tokenizer,
            train_dataset,
            training_args,
            objective=objective
            + (
                f" from a linear probe (LP-FT; probe C {', '.join(probe_penalties)})"
                if finetuning_args.linear_probe_init
                else ""
            ),
            labels=f"{described}, {finetuning_args.label_fraction:.0%} of training labels",
            started_from=Path(model_args.model_name_or_path).name
            if model_args.model_name_or_path
            else "random init",
        )
        card = {"kind": "fine-tuned", "task": "+".join(names), **card}
        record = None
        if len(names) == 1:  # one label file: `evaluate` fits its baseline on exactly these rows
            record = training_labels_record(
                labels,
                data_args.labels if data_args.labels is not None else str(next(iter(sources.values()))),
                train_dataset,
                data_args.train_split,
                finetuning_args.label_fraction,
                training_args.seed,
            )
        save_classifier_checkpoint(model, tokenizer, training_args.output_dir, card, record)
        if k == 1:
            trainer.save_state()  # trainer_state.json: the run's log history, kept once its checkpoints go
        remove_trainer_checkpoints(training_args.output_dir)  # a finished run needs no resume folders
        shutil.rmtree(Path(training_args.output_dir) / ENSEMBLE_MEMBERS, ignore_errors=True)
    return model


# output_dir/ensemble_members/member_j: each network while the ensemble trains, removed once it is saved
ENSEMBLE_MEMBERS = "ensemble_members"
# output_dir/ensemble_state.json: per network its rows, epochs trained, best step and tuning loss (what
# trainer_state.json tells of a single network)
ENSEMBLE_STATE_FILE = "ensemble_state.json"


def train_ensemble(train_dataset, k: int, training_args: TrainingArguments, labels_per_subject: int, train):
    """Train `k` networks cross-fitted (`ensemble_parts`): network j on every part of the training subjects but j,
    stopped early on part j, with seed `seed + j`, in `output_dir/ensemble_members/member_j`; `train(rows,
    tuning_rows, args)` trains one. A network already finished there (a killed run started again) is loaded, not
    retrained. Returns the `EHRTransformerEnsembleForSequenceClassification` of the k networks."""
    members, states = [], []
    for j, (fit, stop) in enumerate(ensemble_parts(train_dataset, k, training_args.seed)):
        folder = Path(training_args.output_dir) / ENSEMBLE_MEMBERS / f"member_{j}"
        if (folder / "model.safetensors").is_file():
            members.append(
                load_pretrained(EHRTransformerForSequenceClassification, folder, use_safetensors=True)
            )
        else:
            resuming = training_args.resume_from_checkpoint and folder.is_dir()
            args = dataclasses.replace(
                training_args,
                output_dir=str(folder),
                seed=training_args.seed + j,
                resume_from_checkpoint=get_last_checkpoint(folder) if resuming else None,
            )
            stopping = sample_label_rows(train_dataset.select(stop), labels_per_subject, args.seed)
            logger.info(
                "ensemble network %d of %d: %d rows, stopping on %d", j + 1, k, len(fit), len(stopping)
            )
            trainer = train(train_dataset.select(fit), stopping, args)
            if args.process_index == 0:
                trainer.save_state()  # trainer_state.json: read into ensemble_state.json below
                with quiet_transformers():
                    trainer.model.save_pretrained(folder)
            members.append(trainer.model)
        # how long the network trained and where it stopped
        log = folder / "trainer_state.json"
        log = json.loads(log.read_text()) if log.is_file() else {}
        runs = [e["train_runtime"] for e in log.get("log_history", []) if "train_runtime" in e]
        states.append(
            {
                "network": j,
                "training_rows": len(fit),
                "stopping_rows": len(stop),
                **{key: log.get(key) for key in ("epoch", "global_step", "best_global_step", "best_metric")},
                "train_runtime": runs[-1] if runs else None,
            }
        )
    if training_args.process_index == 0:
        write_json(Path(training_args.output_dir) / ENSEMBLE_STATE_FILE, {"networks": states})
    config = copy.deepcopy(members[0].config)
    config.ensemble_size = k
    ensemble = EHRTransformerEnsembleForSequenceClassification(config)
    for target, member in zip(ensemble.members, members, strict=True):
        target.load_state_dict(member.state_dict())
    return ensemble.to(members[0].device)


def regression_target_scale(
    model: EHRTransformerForSequenceClassification, labels
) -> list[list[float]] | None:
    """`[mean, standard deviation]` of each regression output's training targets (`[0, 1]` for other outputs),
    the model's `config.regression_target_scale`; None when no output is a regression target."""
    regression = ~model.binary_task_mask()
    if model.config.task_types is None and model.config.problem_type != "regression":
        return None
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)  # (N, C), NaN = no label
    stats = []
    for column, is_regression in enumerate(regression.tolist()):
        known = y[:, column][~np.isnan(y[:, column])]
        if not is_regression or known.size == 0:
            stats.append([0.0, 1.0])
        else:
            stats.append([float(known.mean()), float(known.std()) if known.std() > 0 else 1.0])
    return stats


@torch.no_grad()
def init_bias_to_prevalence(model: EHRTransformerForSequenceClassification, labels) -> list[float]:
    """Set each binary output's bias to the log-odds of its prevalence in `labels` ((N,) or (N, T), NaN = no
    label), so that fine-tuning starts at the base rate instead of spending its first epochs learning it (with 5%
    positives the loss otherwise sits at the prevalence entropy for several epochs). A multi-class head starts at
    the log class frequencies; regression outputs start at the targets' mean through
    `config.regression_target_scale`. Returns the prevalence of each binary output, or the class frequencies."""
    if model.config.problem_type == "single_label_classification" and model.config.task_types is None:
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=model.num_labels) + 1.0  # (C,)
        frequencies = counts / counts.sum()
        model.classifier.bias.copy_(torch.as_tensor(np.log(frequencies), dtype=model.classifier.bias.dtype))
        return frequencies.tolist()
    binary = model.binary_task_mask().tolist()
    y = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)  # (N, T), None -> NaN
    if y.shape[1] != len(binary):
        raise ValueError(f"labels have {y.shape[1]} columns but the classifier has {len(binary)} outputs")
    prevalences = []
    for column, is_binary in enumerate(binary):
        known = y[:, column][~np.isnan(y[:, column])]
        if not is_binary or known.size == 0:
            continue
        p = float(np.clip(known.mean(), 1e-4, 1 - 1e-4))
        model.classifier.bias[column] = math.log(p / (1 - p))
        prevalences.append(p)
    return prevalences


__all__ = [
    "finetune",
    "train_ensemble",
    "init_bias_to_prevalence",
    "multitask_metrics",
    "regression_target_scale",
    "task_head",
]
