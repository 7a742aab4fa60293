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
    task_type: str | None = field(
        default=None,
        metadata={
            "help": "What the label asks for: binary, multiclass or regression (comma-separated per task with --task). "
            "Default from the label column: boolean_value = binary, float_value = regression, categorical_value = "
            "multiclass, integer_value = binary for 0/1, else multiclass (regression in multitask). A type the "
            "values cannot be (e.g. binary on 3.7) is refused."
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
    pack_sequences: bool = field(
        default=False,
        metadata={
            "help": "Sequence packing: several subjects share a row of a batch (first-fit, rows no wider than the "
            "batch's longest subject), the attention mask numbering them so that attention stays within each subject; "
            "the losses are the same as unpacked. Off by default: not faster on CPU, where the padding-free path "
            "already skips padding (docs/pretraining.md)."
        },
    )


@dataclass
class FinetuningArguments:
    """How a classifier is trained on the labels: pooling, label share, linear probe or LP-FT."""

    classifier_pooling: str | None = field(
        default=None,
        metadata={
            "help": "Sequence summary: mean, max or cls. Default max for fine-tuning (the worst value of a kind "
            "speaks for the stay, as a gradient-boosting max aggregate does), mean for --linear_probe and "
            "--linear_probe_init (the probe's features, as measured in docs/fine-tuning.md)."
        },
    )
    label_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of the training subjects whose labels are used (all their prediction times): the "
            "few-label setting."
        },
    )
    labels_per_subject: int = field(
        default=4,
        metadata={
            "help": "Bounds the label rows of a training epoch (drawn afresh every epoch) and of the tuning data "
            "(drawn once) to what this many prediction times per subject would give, drawn uniformly among all "
            "rows so that every prediction time weighs the same, as in evaluation: per-hour labels of one stay "
            "are alike, and 40 of them would cost 40 sequences an epoch. 0 = every row."
        },
    )
    early_stopping_patience: int = field(
        default=6,
        metadata={
            "help": "Stop after this many evaluations without a better tuning loss (needs --eval_strategy and "
            "--load_best_model_at_end, as in the recipe); 0 = train every epoch."
        },
    )
    ensemble: int = field(
        default=5,
        metadata={
            "help": "Train this many networks, cross-fitted, and save them as one classifier that averages their "
            "probabilities: the training subjects are dealt into K parts, network j trains on the others and stops "
            "early on part j (the tuning split is then only reported). On small cohorts one early stop on a few "
            "outcome events is a gamble the average removes (docs/fine-tuning.md). K times the training time; 1 = "
            "one network, stopped on the tuning split."
        },
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

    def __post_init__(self):
        if self.ensemble < 1:
            raise ValueError(f"--ensemble {self.ensemble}: give 1 (one network) or more")
        if self.classifier_pooling is None:
            self.classifier_pooling = "mean" if self.linear_probe or self.linear_probe_init else "max"


# The package's training recipes: the defaults of `ehr-transformer pretrain` / `finetune`, of `pretrain(...)` /
# `finetune(...)` through `recipe_training_arguments`, and what `ehr-transformer quickstart` trains with. A small
# model learns at 1e-3 with AdamW (`transformers`' own 5e-5 barely moves it); batches of similar lengths waste
# little on padding, the biggest speed-up on long-tailed timelines.
_SHARED_RECIPE = {
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "train_sampling_strategy": "group_by_length",
}
# Pretraining: 4 epochs after a 5% warm-up; the masked-event loss of a small model does not overfit that soon.
PRETRAINING_RECIPE = {**_SHARED_RECIPE, "warmup_steps": 0.05, "num_train_epochs": 4}
# Fine-tuning: learning rate 3e-3 and weight decay 0.05, a budget of 30 epochs after a 10% warm-up, evaluated on
# the tuning split every epoch, stopped after `FinetuningArguments.early_stopping_patience` (6) epochs without a
# lower tuning loss, the best epoch restored; max pooling (`FinetuningArguments.classifier_pooling`). At 1e-3 with
# a patience of 3 the tuning loss of small cohorts sat at the prevalence entropy until training stopped. Chosen on
# the development check of docs/fine-tuning.md (eICU demo mortality24, train and tuning stays only). The tuning
# loss (cross entropy, or squared error in units of the target's spread) serves every task type.
FINETUNING_RECIPE = {
    **_SHARED_RECIPE,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.1,
    "num_train_epochs": 30,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "loss",
}
RECIPES = {"pretrain": PRETRAINING_RECIPE, "finetune": FINETUNING_RECIPE}


def command_defaults(command: str) -> dict:
    """The `TrainingArguments` defaults of `ehr-transformer pretrain` or `finetune`: the stage's recipe, and no
    reporting integrations unless asked for."""
    return {**RECIPES[command], "report_to": "none"}


def recipe_training_arguments(output_dir, stage: str = "finetune", **overrides):
    """`transformers.TrainingArguments` with the package's recipe for `stage` ("pretrain" or "finetune": see
    `PRETRAINING_RECIPE` and `FINETUNING_RECIPE`), no reporting integrations; `overrides` replace or add any
    `TrainingArguments` field.

        >>> args = recipe_training_arguments("out/pretrained", stage="pretrain")
        >>> args = recipe_training_arguments("out/finetuned", num_train_epochs=30)
    """
    from transformers import TrainingArguments  # imported here: this module is read by `--help`

    return TrainingArguments(**{**command_defaults(stage), "output_dir": str(output_dir), **overrides})


__all__ = [
    "DataArguments",
    "ModelArguments",
    "PretrainingArguments",
    "FinetuningArguments",
    "PRETRAINING_RECIPE",
    "FINETUNING_RECIPE",
    "RECIPES",
    "command_defaults",
    "recipe_training_arguments",
]
