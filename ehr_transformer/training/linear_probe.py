"""The linear probe: a logistic regression on a frozen pretrained backbone, saved as a classifier checkpoint
(the few-label alternative to fine-tuning, and the start of LP-FT)."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import TrainingArguments

from ..checkpoint_safety import check_checkpoint_folder
from ..data.dataset import build_labeled_dataset, subsample_labels
from ..data.labels import label_sources, read_labels
from ..evaluation.metrics import compute_classification_metrics
from ..inference import embed_sequences, predict_logits
from ..loading import ANY_HEAD, load_pretrained
from ..modeling_ehr import EHRTransformerForSequenceClassification, EHRTransformerModel
from ..tokenization_ehr import EHREventTokenizer
from .arguments import DataArguments, FinetuningArguments, ModelArguments
from .checkpoint import (
    BINARY_HEAD,
    card_for_training,
    save_classifier_checkpoint,
    training_labels_record,
    with_tasks,
)

logger = logging.getLogger(__name__)

PROBE_PENALTIES = tuple(
    np.logspace(-4, 1, 11).round(6)
)  # the probe's C grid, 1e-4 ... 10 (float64: exact with float32 inputs)


def check_probe_inputs(
    flag: str, sources: dict, data_args: DataArguments, model_args: ModelArguments
) -> None:
    """The linear probe (`--linear_probe`, or as the start of `--linear_probe_init`) fits one binary label on a
    pretrained backbone: refuse several label files, task types and a start without a checkpoint, naming `flag`."""
    if len(sources) > 1 or data_args.task_type not in (None, "binary"):
        raise ValueError(
            f"{flag} fits one binary label file, got {list(sources)} (task type {data_args.task_type}): "
            "multitask and regression heads need fine-tuning from a fresh head"
        )
    if not model_args.model_name_or_path:
        raise ValueError(
            f"{flag} needs --model_name_or_path: a pretrained checkpoint whose backbone it probes"
        )


def finetune_linear_probe(
    data_args: DataArguments,
    model_args: ModelArguments,
    finetuning_args: FinetuningArguments,
    training_args: TrainingArguments,
) -> EHRTransformerForSequenceClassification:
    """`finetune --linear_probe`: the few-label alternative to fine-tuning, saved as a normal checkpoint.

    Embeds the training split's labelled rows (the same `label_fraction` sample fine-tuning would use) with the
    frozen backbone of `model_args.model_name_or_path`, fits `fit_linear_probe` (seed `training_args.seed`) and
    writes the folded `classifier_head="linear"` classifier, the checkpoint's tokenizer and a model card to
    `output_dir`, as `finetune` does. With `eval_strategy` other than "no", logs the metrics on `eval_split`."""

    sources = label_sources(data_args.labels, getattr(data_args, "task", None))
    check_probe_inputs("--linear_probe", sources, data_args, model_args)
    check_checkpoint_folder(model_args.model_name_or_path)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
    ((name, label_source),) = sources.items()
    labels = read_labels(label_source)
    build = partial(
        build_labeled_dataset,
        data_args.data_dir,
        labels,
        tokenizer,
        cache_dir=data_args.cache_dir,
        source_name=str(label_source),
    )
    train_dataset = subsample_labels(
        build(data_args.train_split), finetuning_args.label_fraction, training_args.seed
    )
    logger.info("fitting a linear probe (%s) on %d labelled samples", name, len(train_dataset))
    backbone = load_pretrained(
        EHRTransformerModel, model_args.model_name_or_path, expected_unexpected=ANY_HEAD, use_safetensors=True
    )
    model, probe = linear_probe_classifier(
        backbone.to(training_args.device),
        tokenizer,
        train_dataset,
        training_args.seed,
        finetuning_args.classifier_pooling,
        training_args.per_device_eval_batch_size,
        attn_implementation=model_args.attn_implementation,
    )
    if training_args.eval_strategy != "no":
        eval_dataset = build(data_args.eval_split)
        logits = predict_logits(model, eval_dataset, tokenizer, training_args.per_device_eval_batch_size)
        metrics = compute_classification_metrics((logits, np.asarray(eval_dataset["labels"])))
        logger.info(
            "linear probe on %s (%d rows): %s",
            data_args.eval_split,
            len(eval_dataset),
            {f"eval_{key}": round(value, 4) for key, value in metrics.items()},
        )
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
            "labels": f"{name}, {finetuning_args.label_fraction:.0%} of training labels ({len(y)} rows, {int(y.sum())} positive)",
            "seed": training_args.seed,
            "events per sequence (max_length)": tokenizer.max_length,
            "started_from": Path(model_args.model_name_or_path).name,
        }
        card = {"kind": "linear-probe", "task": name, **card}
        record = training_labels_record(
            labels,
            str(label_source),
            train_dataset,
            data_args.train_split,
            finetuning_args.label_fraction,
            training_args.seed,
        )
        save_classifier_checkpoint(model, tokenizer, training_args.output_dir, card, record)
    return model


def fit_linear_probe(
    embeddings: np.ndarray, labels, seed: int = 0, penalties=PROBE_PENALTIES, folds: int = 5
):
    """The few-label alternative to fine-tuning: an L2 logistic regression on standardised frozen embeddings
    `(N, H)` (e.g. `ehr_transformer.inference.embed_sequences(model, tokenizer, rows)`) for binary `labels` `(N,)`,
    its inverse penalty C chosen from `penalties` by stratified cross-validation (log loss) on these rows alone,
    then refitted on all of them (the CLMBR / femr evaluation protocol). Returns the fitted scikit-learn search:
    `predict_proba(X)[:, 1]` gives risks, `decision_function(X)` logits. Needs at least 2 rows of each class."""

    y = np.asarray(labels)
    if set(np.unique(y).tolist()) != {0, 1}:  # exactly the two values: no 1.5 or NaN truncated away
        raise ValueError(
            f"fit_linear_probe: labels must be binary 0/1 with both classes present, got {np.unique(y)}"
        )
    y = y.astype(int)
    n_folds = min(folds, int(y.sum()), int((1 - y).sum()))
    if n_folds < 2:
        raise ValueError(
            f"fit_linear_probe: needs at least 2 positive and 2 negative rows, got {int(y.sum())} "
            f"positive of {len(y)}"
        )
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

    y = np.asarray(train_dataset["labels"], dtype=np.float64)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(
            f"the linear probe fits one binary 0/1 label per row, got labels of shape {y.shape} with values such as "
            f"{np.unique(y)[:5].tolist()}: multitask, regression and multi-class labels need fine-tuning"
        )
    if isinstance(model, (str, os.PathLike)):
        check_checkpoint_folder(model)  # refuse pickle-only/absurd folders before loading
        model = load_pretrained(
            EHRTransformerModel, model, expected_unexpected=ANY_HEAD, use_safetensors=True
        )
    backbone = model.base_model
    config = with_tasks(
        backbone.config,
        classifier_head="linear",
        temperature=1.0,  # the logistic fit is its own calibration
        classifier_pooling=classifier_pooling or backbone.config.classifier_pooling,
        **BINARY_HEAD,
    )
    classifier = EHRTransformerForSequenceClassification._from_config(
        config, attn_implementation=attn_implementation or backbone.config._attn_implementation
    )
    classifier.model.load_state_dict(backbone.state_dict())
    classifier = classifier.to(backbone.device).eval()
    probe = fit_linear_probe(
        embed_sequences(classifier, tokenizer, train_dataset, batch_size), y.astype(int), seed
    )
    scaler, logistic = probe.best_estimator_[0], probe.best_estimator_[-1]
    w = logistic.coef_.astype(np.float64).reshape(-1)  # (H,)
    with torch.no_grad():
        classifier.classifier.weight.copy_(torch.from_numpy(w / scaler.scale_).view(1, -1))  # (1, H)
        classifier.classifier.bias.fill_(
            float(logistic.intercept_[0] - np.sum(w * scaler.mean_ / scaler.scale_))
        )
    return classifier, probe


__all__ = ["PROBE_PENALTIES", "fit_linear_probe", "linear_probe_classifier", "finetune_linear_probe"]
