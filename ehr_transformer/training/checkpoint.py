"""What a checkpoint is made of and how it is written: the tokenizer and config of a new model, the saved folder
(safetensors weights, config, tokenizer, model card)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
from transformers import TrainingArguments

from ..configuration_ehr import EHRTransformerConfig
from ..data.labels import label_fingerprint, rows_fingerprint
from ..data.splits import iter_split_events, read_subject_splits
from ..loading import quiet_transformers
from ..model_card import data_summary, read_dataset_name, render_model_card, write_model_card
from ..tokenization_ehr import EHREventTokenizer
from ..utils import write_json
from .arguments import DataArguments, ModelArguments


def fit_tokenizer(data_args: DataArguments) -> EHREventTokenizer:
    """Fit the tokenizer on the training split only."""
    return EHREventTokenizer.fit(
        iter_split_events(data_args.data_dir, data_args.train_split),
        min_code_count=data_args.min_code_count,
        max_length=data_args.max_length,
    )


def config_for(tokenizer: EHREventTokenizer, model_args: ModelArguments, **fields) -> EHRTransformerConfig:
    """The config of a model trained from scratch: the tokenizer's vocabulary and special ids, the sizes of
    `model_args`, and `fields` (objectives, tasks, pooling)."""
    return EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        mask_token_id=tokenizer.mask_token_id,
        cls_token_id=tokenizer.cls_token_id,
        **fields,
    )


def save_checkpoint(
    model, tokenizer: EHREventTokenizer, output_dir: str | os.PathLike, card: dict | None = None
) -> Path:
    """Write model (safetensors + config + modeling code), tokenizer and model card (README.md) into one folder.
    `card` holds the keyword arguments of `model_card.render_model_card` other than the config."""
    output_dir = Path(output_dir)
    with quiet_transformers():  # no "Writing model shards" bar
        model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if card is not None:
        write_model_card(output_dir, render_model_card(model.config, **card))
    return output_dir


# The Trainer's resume folders (`transformers.trainer_utils.PREFIX_CHECKPOINT_DIR` + "-" + global step).
_TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")


def remove_trainer_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete the `Trainer`'s `checkpoint-N/` folders (weights, optimizer, scheduler and RNG pickles) directly under
    `output_dir`, once a run has finished and its final folder is saved. They exist only to resume a run that was
    interrupted; a finished folder holds the model, tokenizer, config, card and the package's JSON records. Other
    folders and files are left alone. Returns the names removed."""
    folder = Path(output_dir)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_dir() and not path.is_symlink() and _TRAINER_CHECKPOINT.fullmatch(path.name):
                shutil.rmtree(path)
                removed.append(path.name)
    return removed


def card_for_training(
    data_args: DataArguments,
    tokenizer: EHREventTokenizer,
    train_dataset,
    training_args: TrainingArguments,
    **details,
) -> dict:
    """Model-card fields of a training run: the dataset's name (`metadata/dataset.json`), counts of the data (never
    identifiers) and the settings used."""
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
    data = data_summary(subjects, events, tokenizer, dataset_name=read_dataset_name(data_args.data_dir))
    return {"data": data, "training": training}


# The config fields of a one-binary-outcome classifier: one logit, BCE (as `finetune` builds for one label file).
# The binary convention: `num_labels=1` with `problem_type="multi_label_classification"`. In `transformers`,
# `problem_type` picks the loss: "multi_label_classification" is its BCE-with-logits path, the only one that trains
# a single logit for a 0/1 label (one logit with problem_type None or "regression" is MSE, and
# "single_label_classification" is a softmax over >= 2 logits, another layout and another loss). Read it as "each
# output is an independent binary outcome", here one: the probability is sigmoid(logit), which `predict` and the
# `ehr-risk` pipeline return. Kept unchanged since 0.1.0 so that every saved classifier loads and scores alike
# (docs/checkpoints.md, "The binary convention").
BINARY_HEAD = {
    "task_names": None,
    "task_types": None,
    "num_labels": 1,
    "problem_type": "multi_label_classification",
}


def with_tasks(config: EHRTransformerConfig, **changes) -> EHRTransformerConfig:
    """A copy of `config` with `changes` (task_names/task_types ...) applied through the constructor's checks. A
    new `num_labels` drops the old label names, which `transformers` would otherwise report as a mismatch."""
    fields = config.to_dict()
    if "num_labels" in changes and changes["num_labels"] != len(fields.get("id2label") or {}):
        fields.pop("id2label", None)
        fields.pop("label2id", None)
    return EHRTransformerConfig.from_dict({**fields, **changes})


# What a fine-tuned folder records of its training labels, so that `evaluate` can fit its baseline on the same rows.
TRAINING_LABELS_FILE = "training_labels.json"
# The model card's fields of a classifier folder, so that `evaluate --update_card` can re-render the card.
CARD_FIELDS_FILE = "model_card_fields.json"


def save_classifier_checkpoint(
    model,
    tokenizer: EHREventTokenizer,
    output_dir: str | os.PathLike,
    card: dict,
    training_labels: dict | None = None,
) -> Path:
    """`save_checkpoint` for a classifier: also the card's fields and, where given, the training-label record."""
    output_dir = save_checkpoint(model, tokenizer, output_dir, card)
    write_json(output_dir / CARD_FIELDS_FILE, card)
    if training_labels is not None:
        write_json(output_dir / TRAINING_LABELS_FILE, training_labels)
    return output_dir


def training_labels_record(
    labels: pl.DataFrame, label_source: str, train_dataset, split: str, label_fraction: float, seed: int
) -> dict:
    """The training labels of a fine-tuning run without a subject identifier: the label file's fingerprint, the
    split, the label fraction and its seed, and the count and fingerprint of the rows drawn."""
    y = np.asarray(train_dataset["labels"], dtype=np.float64)
    return {
        "label_file": Path(label_source).name
        if isinstance(label_source, (str, os.PathLike))
        else str(label_source),
        "label_fingerprint": label_fingerprint(labels),
        "split": split,
        "label_fraction": label_fraction,
        "seed": seed,
        "n_rows": len(train_dataset),
        "n_positive": int(np.nansum(y)) if y.ndim == 1 else None,
        "rows_fingerprint": rows_fingerprint(train_dataset["subject_id"], train_dataset["prediction_time"]),
    }


def read_training_labels(folder: str | os.PathLike) -> dict | None:
    """The record of `training_labels_record` saved in a fine-tuned folder, or None for a folder without one."""
    path = Path(folder) / TRAINING_LABELS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = [
    "TRAINING_LABELS_FILE",
    "CARD_FIELDS_FILE",
    "save_classifier_checkpoint",
    "training_labels_record",
    "read_training_labels",
    "BINARY_HEAD",
    "with_tasks",
    "fit_tokenizer",
    "config_for",
    "save_checkpoint",
    "remove_trainer_checkpoints",
    "card_for_training",
]
