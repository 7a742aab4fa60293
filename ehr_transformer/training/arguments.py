"""The arguments of `pretrain` and `finetune`, one dataclass per concern, parsed by `transformers.HfArgumentParser`.

`ehr-transformer pretrain` takes `DataArguments`, `ModelArguments`, `PretrainingArguments` and
`transformers.TrainingArguments`; `ehr-transformer finetune` takes `DataArguments`, `ModelArguments`,
`FinetuningArguments` and `transformers.TrainingArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataArguments:
    """Where the data is and how it becomes sequences. `data_dir` is a MEDS folder (data/, metadata/subject_splits.parquet)."""

    data_dir: str = field(
        metadata={"help": "MEDS dataset folder (data/**/*.parquet, metadata/subject_splits.parquet)."}
    )
    labels: str | None = field(
        default=None,
        metadata={
            "help": "MEDS labels for fine-tuning (subject_id, prediction_time, *_value): a parquet file, a folder of "
            "label shards (as ACES writes them, nested folders included) or a glob. One task; for several use --task."
        },
    )
    task: list[str] | None = field(
        default=None,
        metadata={
            "help": "Multitask fine-tuning: one NAME=PATH per task (PATH a label file, folder or glob), e.g. "
            "--task mortality=labels/mortality.parquet stay=labels/stay/; rows are joined on "
            "(subject_id, prediction_time)."
        },
    )
    task_types: str | None = field(
        default=None,
        metadata={
            "help": "Multitask only: comma-separated 'binary' or 'regression' per task, in --task order; default from "
            "each task's value column (boolean_value = binary, float_value / integer_value = regression)."
        },
    )
    train_split: str = field(
        default="train", metadata={"help": "Split used for training and fitting the tokenizer."}
    )
    eval_split: str = field(default="tuning", metadata={"help": "Split used for evaluation during training."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the tokenized datasets."})
    max_length: int = field(
        default=512, metadata={"help": "Events per sequence; longer timelines keep the latest."}
    )
    min_code_count: int = field(
        default=5, metadata={"help": "Codes seen in fewer training subjects map to [UNK]."}
    )


@dataclass
class ModelArguments:
    """What model to build or start from. The size fields are used only when training from scratch; their defaults
    are the quickstart's small model (64 wide, 2 layers), which trains in minutes on a CPU."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained checkpoint folder to start from; none = from scratch."}
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of the model."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=256, metadata={"help": "Feed-forward width."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})


@dataclass
class PretrainingArguments:
    """What pretraining learns: the objectives, their masking and how their losses are balanced."""

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


@dataclass
class FinetuningArguments:
    """How a classifier is trained on the labels: pooling, label share, linear probe or LP-FT."""

    classifier_pooling: str = field(
        default="mean", metadata={"help": "Sequence summary for fine-tuning: mean, max or cls."}
    )
    label_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of training labels used for fine-tuning (low-label experiments)."},
    )
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


# The package's training recipe: what `ehr-transformer quickstart` trains with, and the defaults of `ehr-transformer
# pretrain` / `finetune` and of `pretrain(...)` / `finetune(...)` called without `training_args`. A small model on
# a few thousand subjects learns in 4 epochs at 1e-3 (`transformers`' own 5e-5 barely moves it); batches of similar
# lengths waste little on padding, the biggest speed-up on long-tailed timelines.
TRAINING_RECIPE = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "weight_decay": 0.01,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "linear",
    "num_train_epochs": 4,
    "train_sampling_strategy": "group_by_length",
}

# Defaults of the command line that differ from `TrainingArguments`': the recipe, and no reporting integrations
# unless asked for.
TRAINING_DEFAULTS = {**TRAINING_RECIPE, "report_to": "none"}


def recipe_training_arguments(output_dir, **overrides):
    """`transformers.TrainingArguments` with the package's recipe (`TRAINING_RECIPE`, no reporting integrations);
    `overrides` replace or add any `TrainingArguments` field.

        >>> args = recipe_training_arguments("out/finetuned", num_train_epochs=2, eval_strategy="epoch")
    """
    from transformers import TrainingArguments  # imported here: this module is read by `--help`

    return TrainingArguments(**{**TRAINING_DEFAULTS, "output_dir": str(output_dir), **overrides})


__all__ = [
    "DataArguments",
    "ModelArguments",
    "PretrainingArguments",
    "FinetuningArguments",
    "TRAINING_RECIPE",
    "TRAINING_DEFAULTS",
    "recipe_training_arguments",
]
