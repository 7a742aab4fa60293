"""Pretraining, fine-tuning, evaluation and prediction as Python functions over the plain `transformers.Trainer`.

The scripts in `training/` and the `ehr-transformer` command only parse arguments and call these functions, so a
user can run the same steps from a notebook:

    >>> from transformers import TrainingArguments
    >>> from ehr_transformer.training import DataArguments, ModelArguments, pretrain, finetune
    >>> pretrain(DataArguments(data_dir="meds/"), ModelArguments(), TrainingArguments("out/pretrained"))
    >>> finetune(DataArguments(data_dir="meds/", labels="meds/labels/in_hospital_mortality.parquet"),
    ...          ModelArguments(model_name_or_path="out/pretrained"), TrainingArguments("out/finetuned"))

A checkpoint folder holds `config.json`, `model.safetensors`, `event_tokenizer.json` and the modeling code for
`trust_remote_code`: it is complete and shareable.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from transformers import TrainingArguments
from transformers.trainer_utils import enable_full_determinism, set_seed

from .configuration_ehr import EHRTransformerConfig
from .data.collators import DataCollatorForEventClassification, DataCollatorForMaskedEventModeling
from .data.dataset import build_labeled_dataset, build_pretraining_dataset, build_stats, join_task_labels
from .data.meds import iter_shards, read_labels, read_subject_splits
from .modeling_ehr import (
    EHRTransformerForMaskedEventModeling,
    EHRTransformerForSequenceClassification,
    EHRTransformerModel,
)
from .safety import ReproducibleMasking, ResumableTrainer, check_checkpoint_folder
from .tokenization_ehr import EHREventTokenizer
from .utils import write_json

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """Where the data is. `data_dir` is a MEDS folder (data/, metadata/subject_splits.parquet)."""

    data_dir: str = field(
        metadata={"help": "MEDS dataset folder (data/**/*.parquet, metadata/subject_splits.parquet)."}
    )
    labels: str | None = field(
        default=None,
        metadata={
            "help": "MEDS label file (subject_id, prediction_time, *_value) for fine-tuning. Several files separated "
            "by commas (a.parquet,b.parquet) = multitask fine-tuning, one task per file named by its stem, joined on "
            "(subject_id, prediction_time)."
        },
    )
    task_types: str | None = field(
        default=None,
        metadata={
            "help": "Multitask only: comma-separated 'binary' or 'regression' per label file; default from each "
            "file's value column (boolean_value = binary, float_value / integer_value = regression)."
        },
    )
    train_split: str = field(
        default="train", metadata={"help": "Split used for training and fitting the tokenizer."}
    )
    eval_split: str = field(default="tuning", metadata={"help": "Split used for evaluation during training."})
    label_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of training labels used for fine-tuning (low-label experiments)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the tokenized datasets."})


@dataclass
class ModelArguments:
    """What model to build or start from. The size fields are used only when training from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained checkpoint folder to start from; none = from scratch."}
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of the model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=512, metadata={"help": "Feed-forward width."})
    max_length: int = field(
        default=512, metadata={"help": "Events per sequence; longer timelines keep the latest."}
    )
    min_code_count: int = field(
        default=5, metadata={"help": "Codes seen in fewer training subjects map to [UNK]."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Share of events masked in pretraining."})
    value_mask_probability: float = field(
        default=0.3,
        metadata={"help": "Share of valued events whose value is hidden and reconstructed (0 = off)."},
    )
    value_mask_strategy: str = field(
        default="random",
        metadata={
            "help": "Which values are hidden: random (each independently) or future (the latest ones: forecasting)."
        },
    )
    objectives: str = field(
        default="code,value",
        metadata={"help": "Pretraining objectives, comma-separated among code, value, time, feature."},
    )
    objective_weights: str | None = field(
        default=None, metadata={"help": "Static objective weights, e.g. 'code=1,value=0.5' (others weigh 1)."}
    )
    loss_balancing: str = field(
        default="static",
        metadata={"help": "How objectives are balanced: static, uncertainty, gradnorm or pcgrad."},
    )
    balancing_learning_rate: float = field(
        default=0.025,
        metadata={"help": "Learning rate of the learned objective weights (uncertainty, gradnorm)."},
    )
    time_mask_probability: float = field(
        default=0.15,
        metadata={"help": "Share of events whose time is hidden and reconstructed (objective time)."},
    )
    ema_decay: float = field(
        default=0.999, metadata={"help": "Decay of the EMA teacher per optimizer step (objective feature)."}
    )
    feature_target_layers: int = field(
        default=2, metadata={"help": "Teacher layers averaged into the feature target (objective feature)."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    classifier_pooling: str = field(default="mean", metadata={"help": "Sequence summary for fine-tuning: mean, max or cls."})
    linear_probe: bool = field(
        default=False,
        metadata={
            "help": "Instead of fine-tuning, fit an L2 logistic regression on the frozen pretrained backbone's pooled "
            "embeddings of the (label_fraction) training labels, penalty cross-validated (the few-label choice), and "
            "save it as a classifier checkpoint (classifier_head 'linear'). One binary label file and "
            "--model_name_or_path needed; the TrainingArguments optimiser settings are unused."
        },
    )
    linear_probe_init: bool = field(
        default=False,
        metadata={
            "help": "Fine-tune from the linear probe (LP-FT): fit --linear_probe's logistic regression on the frozen "
            "backbone first, then train every weight from there, so that the first steps do not distort the "
            "pretrained features through a random head. Use a small learning rate (e.g. 1e-4). One binary label "
            "file and --model_name_or_path needed."
        },
    )


# Defaults of the command line that differ from `TrainingArguments`': batches of similar lengths (little padding,
# the biggest speed-up on long-tailed timelines) and no reporting integrations unless asked for.
TRAINING_DEFAULTS = {"train_sampling_strategy": "group_by_length", "report_to": "none"}


def split_subjects(data_dir: str | os.PathLike, split: str) -> set[int]:
    splits = read_subject_splits(data_dir)
    return set(splits.filter(pl.col("split") == split)["subject_id"].to_list())


def iter_split_events(data_dir: str | os.PathLike, split: str) -> Iterator[pl.DataFrame]:
    """The events of one split, one validated shard at a time (never the whole dataset in memory)."""
    for _, frame in iter_shards(data_dir, subject_ids=sorted(split_subjects(data_dir, split))):
        yield frame


def fit_tokenizer(data_args: DataArguments, model_args: ModelArguments) -> EHREventTokenizer:
    """Fit the tokenizer on the training split only."""
    return EHREventTokenizer.fit(
        iter_split_events(data_args.data_dir, data_args.train_split),
        min_code_count=model_args.min_code_count,
        max_length=model_args.max_length,
    )


def config_for(tokenizer: EHREventTokenizer, model_args: ModelArguments, **fields) -> EHRTransformerConfig:
    """The config of a model trained from scratch: the tokenizer's vocabulary and special ids, the sizes of
    `model_args`, and `fields` (objectives, tasks)."""
    return EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        classifier_pooling=model_args.classifier_pooling,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        mask_token_id=tokenizer.mask_token_id,
        cls_token_id=tokenizer.cls_token_id,
        **fields,
    )


def finish_distributed() -> None:
    """End a multi-process run cleanly: wait for every process, then destroy the process group. A process that
    exits with its gloo/NCCL group still alive can abort at interpreter shutdown ("terminate called without an
    active exception") after its work is done. Call it at the end of a script run under `accelerate launch`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def seed_before_model_init(training_args: TrainingArguments) -> None:
    """Seed (or make fully deterministic) before the model is built: the Trainer seeds only inside its own
    `__init__`, after our model's random initialisation, so two runs with one seed would otherwise differ."""
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)


def save_checkpoint(
    model, tokenizer: EHREventTokenizer, output_dir: str | os.PathLike, card: dict | None = None
) -> Path:
    """Write model (safetensors + config + modeling code), tokenizer and model card (README.md) into one folder.
    `card` holds the keyword arguments of `model_card.render_model_card` other than the config."""
    from .model_card import render_model_card, write_model_card

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if card is not None:
        write_model_card(output_dir, render_model_card(model.config, **card))
    return output_dir


def card_for_training(
    data_args: DataArguments,
    tokenizer: EHREventTokenizer,
    train_dataset,
    training_args: TrainingArguments,
    **details,
) -> dict:
    """Model-card fields of a training run: counts of the data (never identifiers) and the settings used."""
    from .model_card import data_summary

    counts = read_subject_splits(data_args.data_dir).group_by("split").len()
    subjects = dict(zip(counts["split"].to_list(), counts["len"].to_list(), strict=True))
    events = int(sum(train_dataset["length"])) if "length" in train_dataset.column_names else None
    training = {
        "epochs": training_args.num_train_epochs
        if training_args.max_steps <= 0
        else f"{training_args.max_steps} steps",
        "batch size per device": training_args.per_device_train_batch_size,
        "learning rate": training_args.learning_rate,
        "weight decay": training_args.weight_decay,
        "seed": training_args.seed,
        "events per sequence (max_length)": tokenizer.max_length,
        **details,
    }
    return {"data": data_summary(subjects, events, tokenizer), "training": training}


def parse_objectives(model_args: ModelArguments) -> dict:
    """The config fields of `--objectives`, `--objective_weights` and `--feature_target_layers`."""
    objectives = [name.strip() for name in model_args.objectives.split(",") if name.strip()]
    weights = None
    if model_args.objective_weights:
        try:
            pairs = [item.split("=") for item in model_args.objective_weights.split(",") if item.strip()]
            weights = {name.strip(): float(value) for name, value in pairs}
        except ValueError as error:
            raise ValueError(
                f"--objective_weights {model_args.objective_weights!r}: expected name=weight pairs separated by "
                "commas, e.g. 'code=1,value=0.5'"
            ) from error
    return {
        "pretraining_objectives": objectives,
        "objective_weights": weights,
        "feature_target_layers": model_args.feature_target_layers,
    }


def describe_objectives(model: EHRTransformerForMaskedEventModeling, model_args: ModelArguments) -> str:
    """The model card's `objectives` line: each objective with its masking ratio, and the loss balancing."""
    config = model.config
    parts = {
        "code": f"masked code prediction ({model_args.mlm_probability:.0%} of events, 80/10/10)",
        "value": f"value reconstruction ({model_args.value_mask_probability:.0%} of valued events, "
        f"{'the latest' if model_args.value_mask_strategy == 'future' else 'at random'}, MSE)",
        "time": f"time-gap reconstruction ({model_args.time_mask_probability:.0%} of events, MSE of log1p hours)",
        "feature": f"feature reconstruction (EMA teacher, decay {model_args.ema_decay}, mean of its top "
        f"{config.feature_target_layers} layers, MSE at masked events)",
    }
    weights = ", ".join(f"{name} {weight:g}" for name, weight in model.loss_weights().items())
    if model_args.loss_balancing in ("uncertainty", "gradnorm"):
        weights = "learned"
    described = " + ".join(parts[name] for name in config.pretraining_objectives)
    return f"{described}; loss balancing: {model_args.loss_balancing} (weights: {weights})"


def pretrain(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: TrainingArguments,
    tokenizer: EHREventTokenizer | None = None,
) -> EHRTransformerForMaskedEventModeling:
    """Pretraining on the unlabeled timelines of the training split (`model_args.objectives`, balanced by
    `model_args.loss_balancing`); saves to `output_dir`.

    From scratch, the tokenizer is fitted on the training split. With `model_args.model_name_or_path`, pretraining
    continues from that checkpoint (domain-adaptive pretraining on a new population): its weights, its architecture
    and its tokenizer, or `tokenizer` when given (e.g. the checkpoint's vocabulary with value statistics refitted
    on the new data; its vocabulary size must equal the checkpoint's). Heads of objectives the checkpoint lacks
    start fresh."""
    from .pretraining import PretrainingTrainer

    objective_fields = parse_objectives(model_args)
    if model_args.model_name_or_path:
        check_checkpoint_folder(model_args.model_name_or_path)  # refuse pickle-only/absurd folders
        tokenizer = tokenizer or EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer = tokenizer or fit_tokenizer(data_args, model_args)
    seed_before_model_init(training_args)
    if model_args.model_name_or_path:
        model = EHRTransformerForMaskedEventModeling.from_pretrained(
            model_args.model_name_or_path,
            **objective_fields,
            attn_implementation=model_args.attn_implementation,
            use_safetensors=True,
        )
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} codes but {model_args.model_name_or_path} has vocab_size "
                f"{model.config.vocab_size}: continued pretraining keeps the checkpoint's vocabulary"
            )
    else:
        config = config_for(tokenizer, model_args, **objective_fields)
        model = EHRTransformerForMaskedEventModeling._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
    objectives = model.config.pretraining_objectives
    # The collator checks its settings: built before the datasets, a bad one is refused in seconds.
    collator = DataCollatorForMaskedEventModeling(
        tokenizer,
        mlm_probability=model_args.mlm_probability,
        value_mask_probability=model_args.value_mask_probability if "value" in objectives else 0.0,
        value_mask_strategy=model_args.value_mask_strategy,
        time_mask_probability=model_args.time_mask_probability if "time" in objectives else 0.0,
        return_teacher_inputs="feature" in objectives,
    )
    train_dataset = build_pretraining_dataset(
        data_args.data_dir, tokenizer, data_args.train_split, data_args.cache_dir
    )
    eval_dataset = build_pretraining_dataset(
        data_args.data_dir, tokenizer, data_args.eval_split, data_args.cache_dir
    )
    logger.info("pretraining on %d subjects, evaluating on %d", len(train_dataset), len(eval_dataset))
    trainer = PretrainingTrainer(  # a ResumableTrainer: killed runs resume bit-identically (see safety.py)
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if len(eval_dataset) else None,
        data_collator=ReproducibleMasking(collator, seed=training_args.seed),
        loss_balancing=model_args.loss_balancing,
        balancing_learning_rate=model_args.balancing_learning_rate,
        ema_decay=model_args.ema_decay,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        started_from = Path(model_args.model_name_or_path or "random init").name
        card = card_for_training(
            data_args, tokenizer, train_dataset, training_args,
            objectives=describe_objectives(trainer.model, model_args), started_from=started_from,
        )  # fmt: skip
        from .selection import write_population_summary  # prototypes + code frequencies for model selection

        card["population"] = write_population_summary(trainer.model, tokenizer, train_dataset, eval_dataset, data_args.data_dir, training_args.output_dir, data_args.train_split, training_args.seed)  # fmt: skip
        save_checkpoint(trainer.model, tokenizer, training_args.output_dir, {"kind": "pretrained", **card})
    return trainer.model


def _subsample_labels(dataset, fraction: float, seed: int):
    if fraction >= 1.0:
        return dataset
    n = max(1, round(len(dataset) * fraction))
    return dataset.shuffle(seed=seed).select(range(n))


def label_sources(labels) -> dict[str, str | os.PathLike | pl.DataFrame]:
    """Task name -> label source for multitask use: "a.parquet,b.parquet", a list of paths/frames, or a mapping.
    Paths are named by their file stem, frames `labels_<i>`."""
    if isinstance(labels, dict):
        return dict(labels)
    if isinstance(labels, str):
        labels = [part.strip() for part in labels.split(",") if part.strip()]
    elif isinstance(labels, (os.PathLike, pl.DataFrame)):
        labels = [labels]
    sources: dict[str, str | os.PathLike | pl.DataFrame] = {}
    for i, source in enumerate(labels):
        name = f"labels_{i}" if isinstance(source, pl.DataFrame) else Path(source).name.split(".")[0]
        if name in sources:
            raise ValueError(f"two label files are named {name!r}; each task needs its own file name")
        sources[name] = source
    return sources


def multitask_metrics(task_names: list[str], task_types: list[str]):
    """A Trainer `compute_metrics` for (N, T) logits and labels with NaN: `<task>_auroc/_auprc/_brier/_ece` for
    binary tasks, `<task>_mse/_mae` for regression tasks, each over the rows labelled for that task."""
    from .metrics import compute_classification_metrics

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


# The config fields of a one-binary-outcome classifier: one logit, BCE (as `finetune` builds for one label file).
BINARY_HEAD = {"task_names": None, "task_types": None, "num_labels": 1, "problem_type": "multi_label_classification"}


def _with_tasks(config: EHRTransformerConfig, **changes) -> EHRTransformerConfig:
    """A copy of `config` with `changes` (task_names/task_types ...) applied through the constructor's checks. A
    new `num_labels` drops the old label names, which `transformers` would otherwise report as a mismatch."""
    fields = config.to_dict()
    if "num_labels" in changes and changes["num_labels"] != len(fields.get("id2label") or {}):
        fields.pop("id2label", None)
        fields.pop("label2id", None)
    return EHRTransformerConfig.from_dict({**fields, **changes})


def finetune(
    data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> EHRTransformerForSequenceClassification:
    """Fine-tune a classifier on one binary label (BCE on one logit), from a pretrained folder or from scratch.

    With several label files (`data_args.labels = "a.parquet,b.parquet"`) or `data_args.task_types`, multitask
    fine-tuning: one output per task over the shared backbone (`config.task_names`/`task_types`), loss = mean of
    the tasks' BCE / MSE, each ignoring rows where its task has no label. Binary outputs start at the training
    prevalence (`init_bias_to_prevalence`).

    With `model_args.linear_probe`, no gradient step: a linear probe on the frozen backbone instead
    (`finetune_linear_probe`). With `model_args.linear_probe_init` (LP-FT), that probe is the starting head
    (`linear_probe_classifier`, `classifier_head="linear"`) and every weight trains from there."""
    from .metrics import compute_classification_metrics

    if data_args.labels is None:
        raise ValueError(
            "fine-tuning needs --labels: a MEDS label file with subject_id, prediction_time, *_value"
        )
    if model_args.linear_probe:
        return finetune_linear_probe(data_args, model_args, training_args)
    sources = label_sources(data_args.labels)
    if model_args.linear_probe_init:
        check_probe_inputs("--linear_probe_init", sources, data_args, model_args)
    if len(sources) > 1 or data_args.task_types:
        _, names, types = join_task_labels(sources)
        if data_args.task_types:
            types = [t.strip() for t in data_args.task_types.split(",")]
            if len(types) != len(names):
                raise ValueError(f"--task_types gives {len(types)} types for {len(names)} label files {names}")
        head = {"task_names": names, "task_types": types, "num_labels": len(names), "problem_type": None}
        labels, compute_metrics = sources, multitask_metrics(names, types)
        objective = "multitask: mean over tasks of BCE (binary) / MSE (regression), missing labels ignored"
        described = ", ".join(f"{n} ({t})" for n, t in zip(names, types, strict=True))
    else:
        names = [Path(data_args.labels).stem]
        head = BINARY_HEAD
        labels, compute_metrics = read_labels(data_args.labels), compute_classification_metrics
        objective, described = "binary cross entropy on one logit", names[0]
    seed_before_model_init(training_args)
    if model_args.model_name_or_path:
        check_checkpoint_folder(model_args.model_name_or_path)  # refuse pickle-only/absurd folders before loading
        tokenizer = EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
        if model_args.linear_probe_init:  # the backbone only: `linear_probe_classifier` builds the classifier
            model = EHRTransformerModel.from_pretrained(
                model_args.model_name_or_path, attn_implementation=model_args.attn_implementation, use_safetensors=True
            )
        else:
            base = EHRTransformerConfig.from_pretrained(model_args.model_name_or_path)
            model = EHRTransformerForSequenceClassification.from_pretrained(
                model_args.model_name_or_path,
                config=_with_tasks(base, classifier_pooling=model_args.classifier_pooling, **head),
                attn_implementation=model_args.attn_implementation,
                ignore_mismatched_sizes=True,  # another checkpoint's classifier rows need not fit these tasks
                use_safetensors=True,
            )
    else:
        tokenizer = fit_tokenizer(data_args, model_args)
        config = config_for(tokenizer, model_args, **head)
        model = EHRTransformerForSequenceClassification._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
    train_dataset = build_labeled_dataset(
        data_args.data_dir, labels, tokenizer, data_args.train_split, cache_dir=data_args.cache_dir
    )
    train_dataset = _subsample_labels(train_dataset, data_args.label_fraction, training_args.seed)
    eval_dataset = build_labeled_dataset(
        data_args.data_dir, labels, tokenizer, data_args.eval_split, cache_dir=data_args.cache_dir
    )
    logger.info("fine-tuning (%s) on %d labelled samples, evaluating on %d", described, len(train_dataset),
                len(eval_dataset))  # fmt: skip
    if model_args.linear_probe_init:
        model, probe = linear_probe_classifier(
            model, tokenizer, train_dataset, training_args.seed, model_args.classifier_pooling,
            training_args.per_device_eval_batch_size, attn_implementation=model_args.attn_implementation,
        )  # fmt: skip
        objective += f" from a linear probe (LP-FT; probe C {probe.best_params_['logisticregression__C']:g})"
    else:
        init_bias_to_prevalence(model, train_dataset["labels"])
    trainer = ResumableTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForEventClassification(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        card = card_for_training(
            data_args, tokenizer, train_dataset, training_args, objective=objective,
            labels=f"{described}, {data_args.label_fraction:.0%} of training labels",
            started_from=Path(model_args.model_name_or_path).name if model_args.model_name_or_path else "random init",
        )  # fmt: skip
        card = {"kind": "fine-tuned", "task": "+".join(names), **card}
        save_checkpoint(trainer.model, tokenizer, training_args.output_dir, card)
        write_json(Path(training_args.output_dir) / "model_card_fields.json", card)
    return trainer.model


def check_probe_inputs(flag: str, sources: dict, data_args: DataArguments, model_args: ModelArguments) -> None:
    """The linear probe (`--linear_probe`, or as the start of `--linear_probe_init`) fits one binary label on a
    pretrained backbone: refuse several label files, task types and a start without a checkpoint, naming `flag`."""
    if len(sources) > 1 or data_args.task_types:
        raise ValueError(
            f"{flag} fits one binary label file, got {list(sources)} (task_types {data_args.task_types}): "
            "multitask and regression heads need fine-tuning from a fresh head"
        )
    if not model_args.model_name_or_path:
        raise ValueError(f"{flag} needs --model_name_or_path: a pretrained checkpoint whose backbone it probes")


def finetune_linear_probe(
    data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> EHRTransformerForSequenceClassification:
    """`finetune --linear_probe`: the few-label alternative to fine-tuning, saved as a normal checkpoint.

    Embeds the training split's labelled rows (the same `label_fraction` sample fine-tuning would use) with the
    frozen backbone of `model_args.model_name_or_path`, fits `fit_linear_probe` (seed `training_args.seed`) and
    writes the folded `classifier_head="linear"` classifier, the checkpoint's tokenizer and a model card to
    `output_dir`, as `finetune` does. With `eval_strategy` other than "no", logs the metrics on `eval_split`."""
    from .metrics import compute_classification_metrics

    sources = label_sources(data_args.labels)
    check_probe_inputs("--linear_probe", sources, data_args, model_args)
    check_checkpoint_folder(model_args.model_name_or_path)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
    labels, name = read_labels(data_args.labels), Path(data_args.labels).stem
    train_dataset = build_labeled_dataset(
        data_args.data_dir, labels, tokenizer, data_args.train_split, cache_dir=data_args.cache_dir
    )
    train_dataset = _subsample_labels(train_dataset, data_args.label_fraction, training_args.seed)
    logger.info("fitting a linear probe (%s) on %d labelled samples", name, len(train_dataset))
    backbone = EHRTransformerModel.from_pretrained(model_args.model_name_or_path, use_safetensors=True)
    model, probe = linear_probe_classifier(
        backbone.to(training_args.device), tokenizer, train_dataset, training_args.seed, model_args.classifier_pooling,
        training_args.per_device_eval_batch_size, attn_implementation=model_args.attn_implementation,
    )  # fmt: skip
    if training_args.eval_strategy != "no":
        eval_dataset = build_labeled_dataset(
            data_args.data_dir, labels, tokenizer, data_args.eval_split, cache_dir=data_args.cache_dir
        )
        logits = predict_logits(model, eval_dataset, tokenizer, training_args.per_device_eval_batch_size)
        metrics = compute_classification_metrics((logits, np.asarray(eval_dataset["labels"])))
        logger.info("linear probe on %s (%d rows): %s", data_args.eval_split, len(eval_dataset),
                    {f"eval_{key}": round(value, 4) for key, value in metrics.items()})  # fmt: skip
    if training_args.process_index == 0:
        card = card_for_training(data_args, tokenizer, train_dataset, training_args)
        y, grid = np.asarray(train_dataset["labels"]), probe.param_grid["logisticregression__C"]
        card["training"] = {
            "head": "linear probe on frozen features: L2 logistic regression on the standardised pooled "
            f"({model.config.classifier_pooling}) embeddings of the frozen backbone, folded into the classification "
            "layer (classifier_head 'linear'); backbone weights unchanged from the starting checkpoint",
            "inverse penalty C": f"{probe.best_params_['logisticregression__C']:g}, chosen by {probe.n_splits_}-fold "
            f"stratified cross-validation (log loss) among {len(grid)} values from {min(grid):g} to {max(grid):g}",
            "objective": "binary cross entropy with an L2 penalty on the probe's weights",
            "labels": f"{name}, {data_args.label_fraction:.0%} of training labels ({len(y)} rows, {int(y.sum())} positive)",
            "seed": training_args.seed,
            "events per sequence (max_length)": tokenizer.max_length,
            "started_from": Path(model_args.model_name_or_path).name,
        }
        card = {"kind": "linear-probe", "task": name, **card}
        save_checkpoint(model, tokenizer, training_args.output_dir, card)
        write_json(Path(training_args.output_dir) / "model_card_fields.json", card)
    return model


@torch.no_grad()
def init_bias_to_prevalence(model: EHRTransformerForSequenceClassification, labels) -> list[float]:
    """Set each binary output's bias to the log-odds of its prevalence in `labels` ((N,) or (N, T), NaN = no
    label), so that fine-tuning starts at the base rate instead of spending its first epochs learning it (with 5%
    positives the loss otherwise sits at the prevalence entropy for several epochs). Regression and multi-class
    outputs are left alone. Returns the prevalence of each output set."""
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


PROBE_PENALTIES = tuple(np.logspace(-4, 1, 11).round(6))  # the probe's C grid, 1e-4 ... 10 (float64: exact with float32 inputs)


def fit_linear_probe(embeddings: np.ndarray, labels, seed: int = 0, penalties=PROBE_PENALTIES, folds: int = 5):
    """The few-label alternative to fine-tuning: an L2 logistic regression on standardised frozen embeddings
    `(N, H)` (e.g. `ehr_transformer.selection.embed_sequences(model, tokenizer, rows)`) for binary `labels` `(N,)`,
    its inverse penalty C chosen from `penalties` by stratified cross-validation (log loss) on these rows alone,
    then refitted on all of them (the CLMBR / femr evaluation protocol). Returns the fitted scikit-learn search:
    `predict_proba(X)[:, 1]` gives risks, `decision_function(X)` logits. Needs at least 2 rows of each class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    if set(np.unique(y).tolist()) != {0, 1}:  # exactly the two values: no 1.5 or NaN truncated away
        raise ValueError(f"fit_linear_probe: labels must be binary 0/1 with both classes present, got {np.unique(y)}")
    y = y.astype(int)
    n_folds = min(folds, int(y.sum()), int((1 - y).sum()))
    if n_folds < 2:
        raise ValueError(f"fit_linear_probe: needs at least 2 positive and 2 negative rows, got {int(y.sum())} "
                         f"positive of {len(y)}")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    grid = {"logisticregression__C": list(penalties)}
    cv = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    return GridSearchCV(probe, grid, cv=cv, scoring="neg_log_loss").fit(np.asarray(embeddings), y)


def linear_probe_classifier(
    model,
    tokenizer: EHREventTokenizer,
    train_dataset,
    seed: int = 0,
    classifier_pooling: str | None = None,
    batch_size: int = 64,
    attn_implementation: str | None = None,
):
    """The few-label linear probe as a deployable checkpoint. Embeds the labelled rows of `train_dataset` (from
    `build_labeled_dataset`, one binary label) with the frozen backbone of `model` (a pretrained checkpoint folder
    or any `EHRTransformer*` model; eval mode, pooled with `classifier_pooling` or the model's own), fits
    `fit_linear_probe` and folds its scaler into a `classifier_head="linear"` classifier (`num_labels=1`, as
    `finetune` builds for one binary label): w' = w / scale, b' = b - sum(w * mean / scale). The backbone weights
    are copied unchanged. Returns the classifier, whose `predict_dataset` probabilities are the probe's
    `predict_proba(X)[:, 1]`, and the fitted scikit-learn search."""
    from .selection import embed_sequences

    y = np.asarray(train_dataset["labels"], dtype=np.float64)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(
            f"the linear probe fits one binary 0/1 label per row, got labels of shape {y.shape} with values such as "
            f"{np.unique(y)[:5].tolist()}: multitask, regression and multi-class labels need fine-tuning"
        )
    if isinstance(model, (str, os.PathLike)):
        check_checkpoint_folder(model)  # refuse pickle-only/absurd folders before loading
        model = EHRTransformerModel.from_pretrained(model, use_safetensors=True)
    backbone = model.base_model
    config = _with_tasks(
        backbone.config, classifier_head="linear", temperature=1.0,  # the logistic fit is its own calibration
        classifier_pooling=classifier_pooling or backbone.config.classifier_pooling, **BINARY_HEAD,
    )  # fmt: skip
    classifier = EHRTransformerForSequenceClassification._from_config(
        config, attn_implementation=attn_implementation or backbone.config._attn_implementation
    )
    classifier.model.load_state_dict(backbone.state_dict())
    classifier = classifier.to(backbone.device).eval()
    probe = fit_linear_probe(embed_sequences(classifier, tokenizer, train_dataset, batch_size), y.astype(int), seed)
    scaler, logistic = probe.best_estimator_[0], probe.best_estimator_[-1]
    w = logistic.coef_.astype(np.float64).reshape(-1)  # (H,)
    with torch.no_grad():
        classifier.classifier.weight.copy_(torch.from_numpy(w / scaler.scale_).view(1, -1))  # (1, H)
        classifier.classifier.bias.fill_(float(logistic.intercept_[0] - np.sum(w * scaler.mean_ / scaler.scale_)))
    return classifier, probe


@torch.no_grad()
def predict_logits(model, dataset, tokenizer: EHREventTokenizer, batch_size: int = 64) -> np.ndarray:
    """`(N, C)` float32 logits of a classifier in eval mode (so divided by `config.temperature`) for every row of a
    tokenized dataset, in row order."""
    model.eval()
    collator = DataCollatorForEventClassification(tokenizer)
    columns = ["input_ids", "values", "times", "ages"]
    outputs = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select_columns(columns)[start : start + batch_size]
        features = [
            dict(zip(rows.keys(), values, strict=True)) for values in zip(*rows.values(), strict=True)
        ]
        batch = {k: v.to(model.device) for k, v in collator(features).items()}
        outputs.append(model(**batch).logits.float().cpu().numpy())  # (B, C)
    return np.concatenate(outputs) if outputs else np.zeros((0, model.config.num_labels), dtype=np.float32)


def predict_dataset(model, dataset, tokenizer: EHREventTokenizer, batch_size: int = 64) -> np.ndarray:
    """Probabilities (sigmoid of the single logit) or regression outputs for every row of a tokenized dataset:
    `(N,)` for one output. Multitask models (`config.task_types`) give `(N, T)`: the probability for a binary
    task, the predicted value for a regression task."""
    logits = predict_logits(model, dataset, tokenizer, batch_size)  # (N, C)
    if model.config.task_types is not None:
        binary = np.array([t == "binary" for t in model.config.task_types])
        return np.where(binary, 1.0 / (1.0 + np.exp(-logits)), logits).astype(np.float32)  # (N, T)
    if model.config.problem_type != "regression":
        logits = 1.0 / (1.0 + np.exp(-logits))
    return logits[:, 0] if logits.shape[1] == 1 else logits


def predict(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | pl.DataFrame,
    split: str | None = "held_out",
    batch_size: int = 64,
) -> pl.DataFrame:
    """Score every (subject_id, prediction_time) row of a label/prediction-time file with a checkpoint.

    Returns subject_id, prediction_time, probability (and the true label where the file has one).
    A multitask checkpoint (`config.task_names`) takes one or several files (as `finetune`'s `labels`), scores
    every (subject_id, prediction_time) of any of them and returns subject_id, prediction_time, one column per
    task named by the task (probability for binary, value for regression) and `<task>_label` for each task whose
    label file was given (NaN where that file has no label at that time).
    """
    from transformers import AutoModelForSequenceClassification

    check_checkpoint_folder(checkpoint)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, use_safetensors=True)
    if model.config.task_names is not None:
        return _predict_multitask(model, tokenizer, data_dir, labels, split, batch_size)
    dataset = build_labeled_dataset(data_dir, labels, tokenizer, split=split)
    scores = predict_dataset(model, dataset, tokenizer, batch_size)
    return pl.DataFrame(
        {
            "subject_id": dataset["subject_id"],
            "prediction_time": dataset["prediction_time"],
            "probability": scores,
            "label": dataset["labels"],
        }
    )


def task_label_matrix(dataset, sources: dict, task_names: list[str]) -> np.ndarray:
    """`(N, T)` float labels of a dataset built from the label files `sources` (one task per file), in the
    model's task order: NaN where a row has no label for a task, or no file was given for it."""
    given = np.asarray(dataset["labels"], dtype=np.float64).reshape(len(dataset), len(sources))  # (N, files)
    y = np.full((len(dataset), len(task_names)), np.nan)
    for j, name in enumerate(sources):
        if name in task_names:
            y[:, task_names.index(name)] = given[:, j]
    return y


def _predict_multitask(model, tokenizer, data_dir, labels, split, batch_size) -> pl.DataFrame:
    sources = label_sources(labels)
    dataset = build_labeled_dataset(data_dir, sources, tokenizer, split=split)
    scores = predict_dataset(model, dataset, tokenizer, batch_size).reshape(len(dataset), -1)  # (N, T)
    y = task_label_matrix(dataset, sources, model.config.task_names).astype(np.float32)  # (N, T)
    columns = {"subject_id": dataset["subject_id"], "prediction_time": dataset["prediction_time"]}
    for i, name in enumerate(model.config.task_names):
        columns[name] = scores[:, i]
    for name in sources:  # the label of each task whose file was given
        if name in model.config.task_names:
            columns[f"{name}_label"] = y[:, model.config.task_names.index(name)]
    return pl.DataFrame(columns)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels: str | os.PathLike,
    split: str = "held_out",
    output_dir: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    baseline: str | None = "gbm",
    train_split: str = "train",
) -> dict:
    """Held-out report of a fine-tuned checkpoint: AUROC/AUPRC with bootstrap 95% intervals, Brier, ECE, by age
    band and sex, with ROC and calibration plots, beside a tabular baseline (`baseline="gbm"` or `"logistic"`,
    None for none) fitted on `train_split` and scored on exactly the same rows."""
    from .evaluation import binary_classification_report, plot_calibration, plot_roc

    predictions = predict(checkpoint, data_dir, labels, split)
    if "label" not in predictions.columns:
        raise ValueError(
            f"{checkpoint} is a multitask checkpoint (columns {predictions.columns[2:]}); evaluate_checkpoint reports "
            "one binary task: score it with predict() and ehr_transformer.evaluation per task"
        )
    y = predictions["label"].to_numpy().astype(int)
    p = predictions["probability"].to_numpy()
    groups = subgroups_for(data_dir, predictions)
    report = {
        "checkpoint": str(checkpoint),
        "split": split,
        "n": len(y),
        "model": binary_classification_report(y, p, n_bootstrap=n_bootstrap, groups=groups),
    }
    if baseline:
        baseline_probabilities = fit_baseline_and_predict(data_dir, labels, predictions, kind=baseline)
        report[f"{baseline}_baseline"] = binary_classification_report(
            y, baseline_probabilities, n_bootstrap=n_bootstrap, groups=groups
        )
    fields = Path(checkpoint) / "model_card_fields.json"
    if split == "held_out" and fields.exists():  # the card of the checkpoint gets its held-out evaluation
        from transformers import AutoConfig

        from .model_card import render_model_card, write_model_card

        card = json.loads(fields.read_text())
        write_model_card(
            checkpoint,
            render_model_card(AutoConfig.from_pretrained(checkpoint), evaluation=report["model"], **card),
        )
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_roc(y, p, output_dir / "roc.png")
        plot_calibration(y, p, output_dir / "calibration.png")
        write_json(output_dir / "metrics.json", report)
    return report


def fit_baseline_and_predict(
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | pl.DataFrame,
    rows: pl.DataFrame,
    kind: str = "gbm",
    train_split: str = "train",
    seed: int = 0,
) -> np.ndarray:
    """Fit a tabular baseline (`gbm` on per-code aggregates, or `logistic` on code counts) on the training
    split's labels and score exactly `rows` (subject_id, prediction_time, label), with the same visible history."""
    from .baselines import TabularBaseline
    from .data.meds import read_events

    labels = read_labels(labels) if not isinstance(labels, pl.DataFrame) else labels
    train_subjects = pl.Series(sorted(split_subjects(data_dir, train_split)), dtype=pl.Int64)
    train_labels = labels.filter(pl.col("subject_id").is_in(train_subjects.implode()))
    train_events = read_events(data_dir, subject_ids=train_labels["subject_id"].unique().to_list())
    baseline = TabularBaseline(kind=kind, seed=seed).fit(train_events, train_labels)
    test_rows = rows.select(
        "subject_id", "prediction_time", pl.col("label").cast(pl.Boolean).alias("boolean_value")
    )
    test_events = read_events(data_dir, subject_ids=test_rows["subject_id"].unique().to_list())
    return baseline.predict_proba(test_events, test_rows)


def subgroups_for(data_dir: str | os.PathLike, predictions: pl.DataFrame) -> dict[str, np.ndarray]:
    """Age band at prediction time and recorded sex for each prediction row (from MEDS_BIRTH and sex codes)."""
    from .evaluation import age_band

    subjects = pl.Series(predictions["subject_id"].unique().to_list(), dtype=pl.Int64)
    births, sexes = [], []
    for _, frame in iter_shards(data_dir):
        frame = frame.filter(pl.col("subject_id").is_in(subjects.implode()))
        births.append(
            frame.filter(pl.col("code") == "MEDS_BIRTH")
            .group_by("subject_id")
            .agg(birth=pl.col("time").min())
        )
        sex_events = frame.filter(pl.col("code").str.to_uppercase().str.contains(r"^(GENDER|SEX)//"))
        sexes.append(
            sex_events.group_by("subject_id").agg(sex=pl.col("code").first().str.split("//").list.last())
        )
    rows = predictions.select("subject_id", "prediction_time")
    if births:
        rows = rows.join(pl.concat(births), on="subject_id", how="left")
        rows = rows.join(pl.concat(sexes), on="subject_id", how="left")
    ages = ((rows["prediction_time"] - rows["birth"]).dt.total_hours() / (24 * 365.25)).to_numpy()
    return {
        "age_band": age_band(np.nan_to_num(ages, nan=-1.0)),
        "sex": rows["sex"].fill_null("unknown").to_numpy(),
    }


__all__ = [
    "DataArguments",
    "ModelArguments",
    "TRAINING_DEFAULTS",
    "fit_tokenizer",
    "pretrain",
    "finetune",
    "finetune_linear_probe",
    "fit_linear_probe",
    "linear_probe_classifier",
    "predict",
    "predict_dataset",
    "predict_logits",
    "label_sources",
    "task_label_matrix",
    "multitask_metrics",
    "evaluate_checkpoint",
    "save_checkpoint",
    "build_stats",
]
