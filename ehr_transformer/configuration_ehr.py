"""Configuration of the EHR transformer: one documented dataclass, as in `transformers`."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Names of the pretraining objectives of `EHRTransformerForMaskedEventModeling` (see `pretraining_objectives`).
PRETRAINING_OBJECTIVES = ("code", "value", "time", "feature")
# Values of the inherited `problem_type` field, which chooses the loss of `EHRTransformerForSequenceClassification`.
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@strict
class EHRTransformerConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EHRTransformerModel`]: a bidirectional (BERT-like) pre-LN transformer over
    time-stamped clinical events. Each event is a code (from [`EHREventTokenizer`]), an optional numeric
    value, the hours since the start of the sequence and the subject's age in years.

    Defaults give a small model (~1M parameters) that trains on a laptop CPU in minutes; see the README's
    table of recommended sizes by data size.

    Args:
        vocab_size (`int`, defaults to 1024):
            Number of event codes, special tokens included. Must equal `len(tokenizer)`.
        hidden_size (`int`, defaults to 128):
            Width of the event representations and of every layer.
        num_hidden_layers (`int`, defaults to 4):
            Number of transformer blocks.
        num_attention_heads (`int`, defaults to 4):
            Attention heads per block; `hidden_size` must be divisible by it.
        intermediate_size (`int`, defaults to 512):
            Width of the feed-forward layer of each block.
        hidden_activation (`str`, defaults to `"gelu"`):
            Activation of the feed-forward layers and heads (any key of `transformers.activations.ACT2FN`).
        hidden_dropout_prob (`float`, defaults to 0.1):
            Dropout on the output of every attention and feed-forward sub-layer.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        embedding_dropout (`float`, defaults to 0.1):
            Dropout on the summed event embeddings.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the (truncated) normal initialisation; residual output projections are
            scaled by `1 / sqrt(2 * num_hidden_layers)`.
        num_time_frequencies (`int`, defaults to 16):
            Number of sinusoid frequencies used to embed each continuous quantity (time and age).
        max_time_hours (`float`, defaults to 87600.0):
            Longest time span (hours, default 10 years) the time embedding resolves; sets its lowest frequency.
        classifier_pooling (`str`, defaults to `"mean"`):
            How [`EHRTransformerForSequenceClassification`] summarises a sequence: the `[CLS]` position
            (`"cls"`), the mean over real (non-padding) events (`"mean"`), or each feature's maximum over real
            events (`"max"`: the most extreme event of a kind speaks for the sequence, as a worst lab value does).
        classifier_head (`str`, defaults to `"mlp"`):
            What [`EHRTransformerForSequenceClassification`] puts between the pooled vector and its classification
            layer: a dense + activation + LayerNorm layer (`"mlp"`), or nothing (`"linear"`: logits are an affine
            function of the pooled backbone output, the form of a linear probe on frozen features, see
            `ehr_transformer.training.linear_probe_classifier`).
        classifier_dropout (`float`, defaults to 0.1):
            Dropout before the classification layer.
        sparse_prediction (`bool`, defaults to `True`):
            Compute masked-event logits only at masked positions (labels != -100) during training: the
            vocabulary projection of the ~85% unmasked positions is never computed.
        unpad_inputs (`bool`, defaults to `True`):
            Run every per-event layer (embeddings, projections, feed-forward, norms) on the real events only, and
            attention as one variable-length operation over each subject's own events (flash varlen kernels with
            `cu_seqlens`, FlexAttention with a block mask, or length-bucketed batched calls for sdpa and eager, as
            `attn_implementation` chooses), so padding costs no compute. Returning attention weights and tracing
            (`torch.export`, `torch.compile`) run the padded batch with a mask instead. Outputs are identical
            either way (to floating-point tolerance); packed rows (an attention mask numbering the subjects of a
            row 1, 2, ...) are honoured by both.
        pretraining_objectives (`list[str]`, defaults to `("code", "value")`):
            Objectives of [`EHRTransformerForMaskedEventModeling`], among `"code"` (masked code prediction),
            `"value"` (masked value reconstruction), `"time"` (masked time-gap reconstruction) and `"feature"`
            (regression of an EMA teacher's hidden states at masked positions, data2vec-style). Only the heads of
            the chosen objectives are built.
        objective_weights (`dict[str, float]`, *optional*):
            Static weight of each objective's loss in `loss` (missing names weigh 1.0). Learned balancing
            (`ehr_transformer.pretraining`) replaces them.
        feature_target_layers (`int`, defaults to 2):
            The feature objective's target is the mean of the layer-normed outputs of the teacher's top K layers
            (all of them if the model has fewer).
        temperature (`float`, defaults to 1.0):
            Post-hoc calibration temperature; classification logits are divided by it at inference
            (`model.eval()`). Fitted on a validation split by `ehr_transformer.adaptation`; 1.0 = none.
            With `task_types`, only the logits of the "binary" tasks are divided.
        task_names (`list[str]`, *optional*):
            Multitask fine-tuning: one name per task (e.g. `["in_hospital_mortality", "length_of_stay"]`).
            [`EHRTransformerForSequenceClassification`] then gives `(B, T)` logits, one output row per task over
            the shared backbone and pooled head, and sets `id2label` to the task names. None = one task, as before.
        task_types (`list[str]`, *optional*):
            `"binary"` (BCE on the logit; predictions are probabilities) or `"regression"` (MSE) for each of
            `task_names`; required with them. Missing labels (NaN) of a task are ignored by its loss.
        regression_target_scale (`list[list[float]]`, *optional*):
            `[shift, scale]` per output: a regression output is `shift + scale * classifier(pooled)` and its loss
            the squared error divided by `scale**2`, so the head learns unit-sized weights whatever the target's
            units (hours of stay, dollars). Set by `finetune` to the training targets' mean and standard
            deviation; ignored for binary and multi-class outputs. None = `[0, 1]` everywhere.
        ensemble_size (`int`, defaults to 1):
            Number of classifiers in an [`EHRTransformerEnsembleForSequenceClassification`] (each fine-tuned on
            other rows, `finetune --ensemble`); 1 for a single [`EHRTransformerForSequenceClassification`].
        pad_token_id, unk_token_id, mask_token_id, cls_token_id (`int`):
            Ids of the tokenizer's special tokens (0, 1, 2, 3).
        tie_word_embeddings (`bool`, defaults to `True`):
            Tie the masked-event decoder to the code embeddings.

    Inherited fields that matter here: `num_labels` and `problem_type` (`"regression"`,
    `"single_label_classification"` or `"multi_label_classification"`, chosen as in BERT when unset),
    `id2label`/`label2id`.

    The binary convention: a classifier of one binary outcome (what `finetune` and the linear probe build for one
    label file) has `num_labels=1` and `problem_type="multi_label_classification"`. `problem_type` chooses the loss,
    as in `transformers`: "multi_label_classification" is the BCE-with-logits path, each output an independent
    binary outcome (here one), and the only one that trains a single logit on 0/1 labels; one logit with
    `problem_type` None or "regression" would be trained by MSE, and "single_label_classification" is a softmax over
    at least two logits (another layout and loss). So the name says "independent sigmoid outputs", not "several
    labels": the risk is `sigmoid(logit / temperature)`, as `predict` and the `ehr-risk` pipeline return it.

    Example:

    ```python
    >>> from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification
    >>> config = EHRTransformerConfig(vocab_size=300, num_labels=1, problem_type="multi_label_classification")
    >>> model = EHRTransformerForSequenceClassification(config)
    ```
    """

    model_type = "ehr_transformer"
    # per-batch losses, not predictions: left out of `Trainer.prediction_step`'s outputs
    keys_to_ignore_at_inference = ["task_losses"]

    vocab_size: int = 1024
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_activation: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_dropout: float | int = 0.0
    embedding_dropout: float | int = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    num_time_frequencies: int = 16
    max_time_hours: float | int = 87600.0
    classifier_pooling: Literal["cls", "mean", "max"] = "mean"
    classifier_head: Literal["mlp", "linear"] = "mlp"
    classifier_dropout: float | int = 0.1
    sparse_prediction: bool = True
    unpad_inputs: bool = True
    pretraining_objectives: list[str] | tuple[str, ...] = ("code", "value")
    objective_weights: dict[str, float | int] | None = None
    feature_target_layers: int = 2
    temperature: float | int = 1.0
    task_names: list[str] | None = None
    task_types: list[str] | None = None
    regression_target_scale: list[list[float]] | None = None
    ensemble_size: int = 1
    pad_token_id: int | None = 0
    unk_token_id: int = 1
    mask_token_id: int = 2
    cls_token_id: int | None = 3
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self._absorb_legacy_fields(kwargs)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        # Literal fields (classifier_pooling, classifier_head) are refused by the strict dataclass check, by name;
        # the inherited `problem_type` is not, and any other string would silently select the BCE loss
        if self.problem_type not in (None, *PROBLEM_TYPES):
            raise ValueError(
                f"problem_type must be None or one of {PROBLEM_TYPES}, got {self.problem_type!r}"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        objectives = list(self.pretraining_objectives)
        unknown = sorted(set(objectives) - set(PRETRAINING_OBJECTIVES))
        if not objectives or unknown or len(set(objectives)) != len(objectives):
            raise ValueError(
                f"pretraining_objectives must be distinct names among {PRETRAINING_OBJECTIVES}, got {objectives}"
            )
        for name, weight in (self.objective_weights or {}).items():
            if name not in objectives or not 0 <= weight < float("inf"):
                raise ValueError(
                    f"objective_weights[{name!r}] = {weight}: expected a finite weight >= 0 of one of {objectives}"
                )
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be at least 1, got {self.ensemble_size}")
        if self.feature_target_layers < 1:
            raise ValueError(f"feature_target_layers must be at least 1, got {self.feature_target_layers}")
        super().__post_init__(**kwargs)
        self._check_tasks()

    def _absorb_legacy_fields(self, kwargs: dict) -> None:
        """Take out of `kwargs` two fields that configs of earlier versions carry, so that their folders load and
        the fields are not written back.

        `num_value_bins` (per-code value-bin embeddings): 0 or 1 meant off and is dropped; a model with more bins
        has an embedding table this model has no place for, so it is refused. `value_loss_weight` (the value
        objective's weight) is dropped at 1.0, or when the value objective is off or `objective_weights` sets
        "value"; any other weight becomes `objective_weights["value"]`, which weighs the loss the same.
        """
        num_value_bins = kwargs.pop("num_value_bins", 0)
        if num_value_bins not in (None, 0, 1):
            raise ValueError(
                f"num_value_bins={num_value_bins}: per-code value-bin embeddings are no longer supported, so a model "
                "that used them cannot be loaded by this version of ehr_transformer (load it with the version that "
                "saved it, or train a model without value bins)"
            )
        value_weight = kwargs.pop("value_loss_weight", 1.0)
        weights = dict(self.objective_weights or {})
        if value_weight != 1.0 and "value" in self.pretraining_objectives and "value" not in weights:
            logger.warning(
                f"value_loss_weight={value_weight} is no longer a config field: "
                f"read as objective_weights['value'] = {value_weight}"
            )
            self.objective_weights = {**weights, "value": value_weight}

    def _check_tasks(self) -> None:
        if self.task_names is None and self.task_types is None:
            return
        names, types = list(self.task_names or []), list(self.task_types or [])
        if not names or len(names) != len(types):
            raise ValueError(
                f"task_names and task_types must be given together, one type per task; got task_names={names}, "
                f"task_types={types}"
            )
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"task_names must be distinct non-empty strings, got {names}")
        bad = [t for t in types if t not in ("binary", "regression")]
        if bad:
            raise ValueError(f"task_types must each be 'binary' or 'regression', got {bad} in {types}")
        self.task_names, self.task_types = names, types
        self.id2label = dict(enumerate(names))  # num_labels = number of tasks
        self.label2id = {name: i for i, name in enumerate(names)}


__all__ = ["EHRTransformerConfig", "PRETRAINING_OBJECTIVES"]
