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
from .data.dataset import build_labeled_dataset, build_pretraining_dataset, build_stats
from .data.meds import iter_shards, read_labels, read_subject_splits
from .modeling_ehr import EHRTransformerForMaskedEventModeling, EHRTransformerForSequenceClassification
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
        metadata={"help": "MEDS label file (subject_id, prediction_time, *_value) for fine-tuning."},
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
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    classifier_pooling: str = field(default="mean", metadata={"help": "mean or cls pooling for fine-tuning."})


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


def pretrain(
    data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> EHRTransformerForMaskedEventModeling:
    """Masked event modeling on the unlabeled timelines of the training split; saves to `output_dir`."""
    tokenizer = fit_tokenizer(data_args, model_args)
    seed_before_model_init(training_args)
    train_dataset = build_pretraining_dataset(
        data_args.data_dir, tokenizer, data_args.train_split, data_args.cache_dir
    )
    eval_dataset = build_pretraining_dataset(
        data_args.data_dir, tokenizer, data_args.eval_split, data_args.cache_dir
    )
    logger.info("pretraining on %d subjects, evaluating on %d", len(train_dataset), len(eval_dataset))
    config = EHRTransformerConfig(
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
    )
    model = EHRTransformerForMaskedEventModeling._from_config(
        config, attn_implementation=model_args.attn_implementation
    )
    trainer = ResumableTrainer(  # a Trainer whose killed runs resume bit-identically (see safety.py)
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if len(eval_dataset) else None,
        data_collator=ReproducibleMasking(
            DataCollatorForMaskedEventModeling(
                tokenizer,
                mlm_probability=model_args.mlm_probability,
                value_mask_probability=model_args.value_mask_probability,
            ),
            seed=training_args.seed,
        ),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        card = card_for_training(
            data_args, tokenizer, train_dataset, training_args,
            objectives=f"masked code prediction ({model_args.mlm_probability:.0%} of events, 80/10/10) + value "
            f"reconstruction ({model_args.value_mask_probability:.0%} of valued events, MSE)",
        )  # fmt: skip
        save_checkpoint(trainer.model, tokenizer, training_args.output_dir, {"kind": "pretrained", **card})
    return trainer.model


def _subsample_labels(dataset, fraction: float, seed: int):
    if fraction >= 1.0:
        return dataset
    n = max(1, round(len(dataset) * fraction))
    return dataset.shuffle(seed=seed).select(range(n))


def finetune(
    data_args: DataArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> EHRTransformerForSequenceClassification:
    """Fine-tune a classifier on one binary label (BCE on one logit), from a pretrained folder or from scratch."""
    from .metrics import compute_classification_metrics

    if data_args.labels is None:
        raise ValueError(
            "fine-tuning needs --labels: a MEDS label file with subject_id, prediction_time, *_value"
        )
    seed_before_model_init(training_args)
    if model_args.model_name_or_path:
        check_checkpoint_folder(
            model_args.model_name_or_path
        )  # refuse pickle-only/absurd folders before loading
        tokenizer = EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
        model = EHRTransformerForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            num_labels=1,
            problem_type="multi_label_classification",
            classifier_pooling=model_args.classifier_pooling,
            attn_implementation=model_args.attn_implementation,
            use_safetensors=True,
        )
    else:
        tokenizer = fit_tokenizer(data_args, model_args)
        config = EHRTransformerConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size,
            classifier_pooling=model_args.classifier_pooling,
            num_labels=1,
            problem_type="multi_label_classification",
        )
        model = EHRTransformerForSequenceClassification._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
    labels = read_labels(data_args.labels)
    train_dataset = build_labeled_dataset(
        data_args.data_dir, labels, tokenizer, data_args.train_split, cache_dir=data_args.cache_dir
    )
    train_dataset = _subsample_labels(train_dataset, data_args.label_fraction, training_args.seed)
    eval_dataset = build_labeled_dataset(
        data_args.data_dir, labels, tokenizer, data_args.eval_split, cache_dir=data_args.cache_dir
    )
    logger.info("fine-tuning on %d labelled samples, evaluating on %d", len(train_dataset), len(eval_dataset))
    trainer = ResumableTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DataCollatorForEventClassification(tokenizer),
        compute_metrics=compute_classification_metrics,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        card = card_for_training(
            data_args, tokenizer, train_dataset, training_args,
            objective="binary cross entropy on one logit",
            labels=f"{Path(data_args.labels).stem}, {data_args.label_fraction:.0%} of training labels",
            started_from=Path(model_args.model_name_or_path).name if model_args.model_name_or_path else "random init",
        )  # fmt: skip
        card = {"kind": "fine-tuned", "task": Path(data_args.labels).stem, **card}
        save_checkpoint(trainer.model, tokenizer, training_args.output_dir, card)
        write_json(Path(training_args.output_dir) / "model_card_fields.json", card)
    return trainer.model


@torch.no_grad()
def predict_dataset(model, dataset, tokenizer: EHREventTokenizer, batch_size: int = 64) -> np.ndarray:
    """Probabilities (sigmoid of the single logit) or regression outputs for every row of a tokenized dataset."""
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
        logits = model(**batch).logits.float()
        if model.config.problem_type == "regression":
            outputs.append(logits.squeeze(-1).cpu().numpy())
        else:
            outputs.append(torch.sigmoid(logits).squeeze(-1).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros(0, dtype=np.float32)


def predict(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels: str | os.PathLike | pl.DataFrame,
    split: str | None = "held_out",
    batch_size: int = 64,
) -> pl.DataFrame:
    """Score every (subject_id, prediction_time) row of a label/prediction-time file with a checkpoint.

    Returns subject_id, prediction_time, probability (and the true label where the file has one).
    """
    from transformers import AutoModelForSequenceClassification

    check_checkpoint_folder(checkpoint)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, use_safetensors=True)
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
    "predict",
    "predict_dataset",
    "evaluate_checkpoint",
    "save_checkpoint",
    "build_stats",
]
