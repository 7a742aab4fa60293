"""Inference with a checkpoint: pooled embeddings, logits, probabilities and predictions for label rows."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy.special import expit, softmax
from transformers import AutoModelForSequenceClassification

from .checkpoint_safety import check_checkpoint_folder
from .data.collators import DataCollatorForEventClassification
from .data.dataset import build_labeled_dataset
from .data.labels import LABEL_VALUE_COLUMNS, label_source_name, label_sources, read_labels, task_label_matrix
from .loading import load_pretrained
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


PREDICTION_COLUMNS_DOC = """\
Columns of `predict` (the MEDS prediction schema that `meds-evaluation` reads):

- always: subject_id Int64, prediction_time Datetime(us);
- binary task: boolean_value Boolean (the label; null where the file has none), predicted_boolean_value Boolean
  (probability >= 0.5), predicted_boolean_probability Float64;
- regression task: float_value Float64 (the label, integer labels cast; null where none), predicted_float_value
  Float64;
- multi-class task with whole-number classes: integer_value Int64 (the label), predicted_integer_value Int64 (the
  most probable class), predicted_integer_probabilities List(Float64) (softmax, in the order of the config's
  `id2label`); with named classes (categorical_value labels): categorical_value String, predicted_categorical_value
  String, predicted_categorical_probabilities List(Float64);
- multitask checkpoint: the columns above for each task, prefixed by `<task>/` (e.g.
  `mortality/predicted_boolean_probability`); a task whose label file was not given has a null label column.
"""


def _label_column(values, dtype: pl.DataType) -> pl.Series:
    """Labels stored as float32 with NaN for "no label" -> a typed column with null for "no label"."""
    series = (
        pl.Series(np.asarray(values, dtype=np.float64)) if len(values) else pl.Series([], dtype=pl.Float64)
    )
    series = series.fill_nan(None)
    if dtype == pl.Boolean:
        return (series != 0).cast(pl.Boolean)
    return series.cast(dtype)


def prediction_columns(
    kind: str, scores: np.ndarray, labels, prefix: str = "", classes: list[str] | None = None
) -> dict[str, pl.Series]:
    """The MEDS prediction columns of one task (see `PREDICTION_COLUMNS_DOC`): `kind` is "binary" (`scores` (N,)
    probabilities), "regression" ((N,) values) or "multiclass" ((N, C) probabilities, class i = `classes[i]`);
    `labels` (N,) floats (class indices for multi-class), NaN where a row has no label. Always typed, also for
    N = 0."""
    if kind == "binary":
        p = pl.Series(np.asarray(scores, dtype=np.float64).reshape(-1), dtype=pl.Float64)
        return {
            f"{prefix}boolean_value": _label_column(labels, pl.Boolean),
            f"{prefix}predicted_boolean_value": p >= 0.5,
            f"{prefix}predicted_boolean_probability": p,
        }
    if kind == "regression":
        return {
            f"{prefix}float_value": _label_column(labels, pl.Float64),
            f"{prefix}predicted_float_value": pl.Series(
                np.asarray(scores, dtype=np.float64).reshape(-1), dtype=pl.Float64
            ),
        }
    if kind == "multiclass":
        probs = np.asarray(scores, dtype=np.float64)  # (N, C)
        classes = list(classes) if classes is not None else [str(c) for c in range(probs.shape[-1])]
        named = not all(c.lstrip("-").isdigit() for c in classes)
        dtype, column = (pl.String, "categorical") if named else (pl.Int64, "integer")
        values = pl.Series(classes if named else [int(c) for c in classes], dtype=dtype)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)  # class indices, NaN = no label
        known = ~np.isnan(y)
        label = pl.Series([None] * y.size, dtype=dtype)
        if known.any():
            label = label.scatter(np.flatnonzero(known), values.gather(y[known].astype(np.int64)))
        return {
            f"{prefix}{column}_value": label,
            f"{prefix}predicted_{column}_value": values.gather(probs.argmax(axis=1).astype(np.int64))
            if y.size
            else pl.Series([], dtype=dtype),
            f"{prefix}predicted_{column}_probabilities": pl.Series(
                [row.tolist() for row in probs], dtype=pl.List(pl.Float64)
            ),
        }
    raise ValueError(f"unknown task kind {kind!r}")


def predict(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels,
    split: str | None = "held_out",
    batch_size: int = 64,
    tasks=None,
) -> pl.DataFrame:
    """Score every (subject_id, prediction_time) row of a label / prediction-time source with a checkpoint.

    `labels` is a MEDS label file, a folder of label shards or a glob (see `data.labels.read_labels`); a file with
    only subject_id and prediction_time (no label) is scored too. `split` None or "" scores every subject with
    events (no `metadata/subject_splits.parquet` needed); any split name of the data is accepted. A multitask
    checkpoint (`config.task_names`) takes one source or several named ones (`tasks=["NAME=PATH", ...]`, as
    `finetune --task`). Returns the MEDS prediction schema (`PREDICTION_COLUMNS_DOC`), one row per scored label
    row, in the tokenized dataset's order (shard by shard, then by subject and prediction time). Label rows that
    cannot be scored are counted and logged; when none is left, `NoUsableRowsError` says why.
    """

    check_checkpoint_folder(checkpoint)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    # quietly: no "Loading weights" bar or LOAD REPORT; a real weight mismatch is still logged
    model = load_pretrained(AutoModelForSequenceClassification, checkpoint, use_safetensors=True)
    if model.config.task_names is not None:
        return _predict_multitask(model, tokenizer, data_dir, labels, tasks, split, batch_size)
    if tasks:
        raise ValueError(f"{checkpoint} has one task; give its labels with --labels, not --task")
    classes = checkpoint_classes(model.config)
    dataset = build_labeled_dataset(
        data_dir, labels, tokenizer, split=split, allow_unlabeled=True, classes=classes
    )
    head = {
        "subject_id": pl.Series(dataset["subject_id"], dtype=pl.Int64),
        "prediction_time": pl.Series(dataset["prediction_time"], dtype=pl.Datetime("us")),
    }
    if model.config.problem_type == "regression":
        kind, scores = "regression", predict_dataset(model, dataset, tokenizer, batch_size)
    elif model.config.num_labels > 1:
        logits = predict_logits(model, dataset, tokenizer, batch_size)
        kind, scores = "multiclass", softmax(logits.astype(np.float64), axis=1)
    else:
        kind, scores = "binary", predict_dataset(model, dataset, tokenizer, batch_size)
    return pl.DataFrame({**head, **prediction_columns(kind, scores, dataset["labels"], classes=classes)})


def _unlabeled_times(labels) -> tuple[pl.DataFrame, str] | None:
    """One label source holding prediction times without any label value, read once: (its rows, its name); else
    None."""
    if isinstance(labels, Mapping) or (isinstance(labels, (list, tuple)) and len(labels) != 1):
        return None
    source = labels[0] if isinstance(labels, (list, tuple)) else labels
    frame = source if isinstance(source, pl.DataFrame) else read_labels(source, require_value=False)
    if any(c in frame.columns and frame[c].null_count() < frame.height for c in LABEL_VALUE_COLUMNS):
        return None
    return frame, label_source_name(source)


def checkpoint_task_type(config) -> str:
    """ "binary", "regression" or "multiclass" for a one-task checkpoint's config ("multitask" with task_names)."""
    if config.task_names is not None:
        return "multitask"
    if config.problem_type == "regression":
        return "regression"
    return "multiclass" if config.problem_type == "single_label_classification" else "binary"


def checkpoint_classes(config) -> list[str] | None:
    """The class names of a multi-class checkpoint in output order (`config.id2label`; "0", "1", ... for
    `transformers`' default names), else None."""
    if config.problem_type != "single_label_classification" or config.task_names is not None:
        return None
    names = [str(config.id2label[i]) for i in range(config.num_labels)]
    # transformers' default names (LABEL_0, ...) stand for the class indices themselves
    return (
        [str(i) for i in range(config.num_labels)]
        if names == [f"LABEL_{i}" for i in range(len(names))]
        else names
    )


def _predict_multitask(model, tokenizer, data_dir, labels, tasks, split, batch_size) -> pl.DataFrame:
    task_names = model.config.task_names
    times = None if tasks else _unlabeled_times(labels)
    if times is not None:  # score every task at these times, no label to report
        frame, name = times
        dataset = build_labeled_dataset(
            data_dir, frame, tokenizer, split=split, allow_unlabeled=True, source_name=name
        )
        y = np.full((len(dataset), len(task_names)), np.nan)
    else:
        sources = label_sources(labels, tasks)
        dataset = build_labeled_dataset(data_dir, sources, tokenizer, split=split)
        y = task_label_matrix(dataset, sources, task_names)  # (N, T), NaN where no label / no file
    scores = predict_dataset(model, dataset, tokenizer, batch_size).reshape(len(dataset), -1)  # (N, T)
    columns = {
        "subject_id": pl.Series(dataset["subject_id"], dtype=pl.Int64),
        "prediction_time": pl.Series(dataset["prediction_time"], dtype=pl.Datetime("us")),
    }
    for i, (name, kind) in enumerate(zip(model.config.task_names, model.config.task_types, strict=True)):
        columns.update(prediction_columns(kind, scores[:, i], y[:, i], prefix=f"{name}/"))
    return pl.DataFrame(columns)


__all__ = [
    "embed_sequences",
    "predict_logits",
    "predict_dataset",
    "predict",
    "prediction_columns",
    "checkpoint_classes",
    "checkpoint_task_type",
    "PREDICTION_COLUMNS_DOC",
]
