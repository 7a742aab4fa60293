"""Inference with a checkpoint: pooled embeddings, logits, probabilities and predictions for label rows."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy.special import expit
from transformers import AutoModelForSequenceClassification

from .checkpoint_safety import check_checkpoint_folder
from .data.collators import DataCollatorForEventClassification
from .data.dataset import build_labeled_dataset
from .data.labels import label_sources, task_label_matrix
from .tokenization_ehr import EHREventTokenizer


# ------------------------------------------------------------------------------------------------ embeddings
@torch.no_grad()
def embed_sequences(model, tokenizer, rows: Any, batch_size: int = 64) -> np.ndarray:
    """Pooled backbone embeddings `(N, H)` float32 of encoded rows (a `datasets.Dataset` or a polars frame from
    `EHREventTokenizer.encode_events`, with input_ids/values/times/ages), in row order. `model` is any
    `EHRTransformer*` model (its backbone is used, with `config.classifier_pooling`)."""

    backbone = model.base_model
    was_training = backbone.training
    backbone.eval()
    collator = DataCollatorForEventClassification(tokenizer)
    columns = ["input_ids", "values", "times", "ages"]
    if isinstance(rows, pl.DataFrame):
        data = {name: rows[name].to_list() for name in columns}
    else:
        data = {name: rows[name] for name in columns}
    n = len(data["input_ids"])
    hidden = backbone.config.hidden_size
    if n == 0:
        return np.zeros((0, hidden), dtype=np.float32)
    order = np.argsort(
        [len(ids) for ids in data["input_ids"]], kind="stable"
    )  # similar lengths: little padding
    out = np.zeros((n, hidden), dtype=np.float32)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        features = [{name: data[name][i] for name in columns} for i in index]
        batch = {k: v.to(backbone.device) for k, v in collator(features).items()}
        pooled = backbone(**batch).pooler_output.float()  # (B, H)
        out[index] = pooled.cpu().numpy()
    backbone.train(was_training)
    return out


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
        return np.where(binary, expit(logits), logits).astype(np.float32)  # (N, T)
    if model.config.problem_type != "regression":
        logits = expit(logits)
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


__all__ = ["embed_sequences", "predict_logits", "predict_dataset", "predict"]
