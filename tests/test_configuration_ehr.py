"""What users of `EHRTransformerConfig` rely on: documented defaults, saving and loading (also through
`AutoConfig`), refusal of invalid values, the classification fields and the loading of older config files."""

import json
import logging

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig

import ehr_transformer  # noqa: F401  (registers the model type with the Auto classes)
from ehr_transformer import EHRTransformerConfig
from ehr_transformer.configuration_ehr import PRETRAINING_OBJECTIVES, PROBLEM_TYPES

# The defaults the class docstring documents (the inherited classification fields included).
DOCUMENTED_DEFAULTS = dict(
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    hidden_activation="gelu",
    hidden_dropout_prob=0.1,
    attention_dropout=0.0,
    embedding_dropout=0.1,
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    num_time_frequencies=16,
    max_time_hours=87600.0,
    classifier_pooling="mean",
    classifier_head="mlp",
    classifier_dropout=0.1,
    sparse_prediction=True,
    unpad_inputs=True,
    objective_weights=None,
    feature_target_layers=2,
    temperature=1.0,
    task_names=None,
    task_types=None,
    pad_token_id=0,
    unk_token_id=1,
    mask_token_id=2,
    cls_token_id=3,
    tie_word_embeddings=True,
    num_labels=2,
    problem_type=None,
)


def saved_fields(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def settings(config: EHRTransformerConfig) -> dict:
    """Every field of `config` but `_name_or_path`, which records the folder it was loaded from."""
    return {name: value for name, value in config.to_dict().items() if name != "_name_or_path"}


def test_defaults_are_the_documented_ones():
    config = EHRTransformerConfig()
    assert {name: getattr(config, name) for name in DOCUMENTED_DEFAULTS} == DOCUMENTED_DEFAULTS
    assert tuple(config.pretraining_objectives) == ("code", "value")
    assert config.model_type == "ehr_transformer"


def test_defaults_round_trip_through_save_pretrained_and_auto_config(tmp_path):
    config = EHRTransformerConfig()
    config.save_pretrained(tmp_path)
    fields = saved_fields(tmp_path)
    assert fields["model_type"] == "ehr_transformer" and fields["hidden_size"] == 128
    for loaded in (EHRTransformerConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is EHRTransformerConfig
        assert settings(loaded) == settings(config)
    assert type(AutoConfig.for_model("ehr_transformer")) is EHRTransformerConfig


def test_every_field_survives_a_round_trip(tmp_path):
    config = EHRTransformerConfig(
        vocab_size=300,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        intermediate_size=96,
        hidden_activation="relu",
        classifier_pooling="max",
        classifier_head="linear",
        sparse_prediction=False,
        unpad_inputs=False,
        pretraining_objectives=["code", "time", "feature"],
        objective_weights={"time": 2.0, "feature": 0.5},
        feature_target_layers=1,
        temperature=1.7,
        max_time_hours=1000.0,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert settings(loaded) == settings(config)
    assert list(loaded.pretraining_objectives) == ["code", "time", "feature"]
    assert loaded.objective_weights == {"time": 2.0, "feature": 0.5}
    assert (loaded.classifier_pooling, loaded.classifier_head, loaded.temperature) == ("max", "linear", 1.7)


def test_config_file_without_classifier_head_loads_as_mlp(tmp_path):
    EHRTransformerConfig(vocab_size=50).save_pretrained(tmp_path)
    fields = saved_fields(tmp_path)
    del fields["classifier_head"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert AutoConfig.from_pretrained(tmp_path).classifier_head == "mlp"


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(hidden_size=30, num_attention_heads=4),
            r"hidden_size \(30\) must be divisible by num_attention_heads",
        ),
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(temperature=-1.0), "temperature must be positive"),
        (dict(pretraining_objectives=[]), "pretraining_objectives must be distinct names"),
        (dict(pretraining_objectives=["code", "colour"]), "pretraining_objectives must be distinct names"),
        (dict(pretraining_objectives=["code", "code"]), "pretraining_objectives must be distinct names"),
        (
            dict(pretraining_objectives=["code"], objective_weights={"value": 1.0}),
            r"objective_weights\['value'\]",
        ),
        (dict(objective_weights={"value": -0.5}), "expected a finite weight >= 0"),
        (dict(objective_weights={"code": float("inf")}), "expected a finite weight >= 0"),
        (dict(feature_target_layers=0), "feature_target_layers must be at least 1"),
        (dict(task_names=["a", "b"], task_types=["binary"]), "must be given together"),
        (dict(task_names=["a"]), "must be given together"),
        (dict(task_names=[], task_types=[]), "must be given together"),
        (dict(task_names=["a", "a"], task_types=["binary", "binary"]), "distinct non-empty strings"),
        (dict(task_names=["a", ""], task_types=["binary", "binary"]), "distinct non-empty strings"),
        (dict(task_names=["a"], task_types=["multiclass"]), "'binary' or 'regression'"),
        (dict(problem_type="regresion"), "problem_type must be None or one of"),
        (dict(problem_type="single_label_classification", num_labels=1), "requires `num_labels > 1`"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        EHRTransformerConfig(**fields)


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(classifier_pooling="sum"), "classifier_pooling"),
        (dict(classifier_head="mlp2"), "classifier_head"),
        (dict(vocab_size="big"), "vocab_size"),
        (dict(sparse_prediction="yes"), "sparse_prediction"),
    ],
)
def test_values_of_the_wrong_kind_are_refused_by_field_name(fields, name):
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{name}'"):
        EHRTransformerConfig(**fields)


def test_every_pretraining_objective_and_problem_type_is_accepted():
    config = EHRTransformerConfig(pretraining_objectives=list(PRETRAINING_OBJECTIVES))
    assert list(config.pretraining_objectives) == ["code", "value", "time", "feature"]
    for problem_type in PROBLEM_TYPES:
        num_labels = 1 if problem_type != "single_label_classification" else 3
        assert (
            EHRTransformerConfig(problem_type=problem_type, num_labels=num_labels).problem_type
            == problem_type
        )


@pytest.mark.parametrize(
    "problem_type, num_labels",
    [("regression", 1), ("single_label_classification", 3), ("multi_label_classification", 1), (None, 4)],
)
def test_problem_type_and_num_labels_round_trip(tmp_path, problem_type, num_labels):
    config = EHRTransformerConfig(problem_type=problem_type, num_labels=num_labels)
    assert config.num_labels == num_labels
    assert config.id2label == {i: f"LABEL_{i}" for i in range(num_labels)}
    assert config.label2id == {f"LABEL_{i}": i for i in range(num_labels)}
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.problem_type, loaded.num_labels) == (problem_type, num_labels)
    assert loaded.id2label == config.id2label  # integer keys again after JSON


def test_num_labels_given_at_load_time_overrides_the_saved_one(tmp_path):
    EHRTransformerConfig().save_pretrained(tmp_path)  # a pretraining config: 2 labels by default
    loaded = AutoConfig.from_pretrained(tmp_path, num_labels=1, problem_type="multi_label_classification")
    assert loaded.num_labels == 1 and loaded.problem_type == "multi_label_classification"


def test_task_names_set_the_labels_and_round_trip(tmp_path):
    config = EHRTransformerConfig(
        task_names=["mortality", "length_of_stay"], task_types=["binary", "regression"]
    )
    assert config.num_labels == 2
    assert config.id2label == {0: "mortality", 1: "length_of_stay"}
    assert config.label2id == {"mortality": 0, "length_of_stay": 1}
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.task_names == config.task_names and loaded.task_types == config.task_types
    assert loaded.num_labels == 2 and loaded.id2label == config.id2label


# --------------------------------------------------------------------------------- config files of earlier versions
def legacy_folder(folder, **legacy_fields) -> EHRTransformerConfig:
    """Write into `folder` a config.json as earlier versions wrote it, with the value-bin and value-weight fields
    added to those of the returned config."""
    config = EHRTransformerConfig(vocab_size=50)
    config.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**saved_fields(folder), **legacy_fields}))
    return config


@pytest.mark.parametrize("num_value_bins", [0, 1])
def test_legacy_config_without_value_bins_loads_and_drops_the_fields(tmp_path, num_value_bins):
    """`num_value_bins` 0 or 1 meant no value-bin table, and `value_loss_weight` 1.0 is the weight every
    objective has: both are read quietly and not written back."""
    saved = legacy_folder(tmp_path, num_value_bins=num_value_bins, value_loss_weight=1.0)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is EHRTransformerConfig
    assert settings(config) == settings(saved)
    assert not hasattr(config, "num_value_bins") and not hasattr(config, "value_loss_weight")
    config.save_pretrained(tmp_path / "resaved")
    fields = saved_fields(tmp_path / "resaved")
    assert "num_value_bins" not in fields and "value_loss_weight" not in fields


def test_legacy_config_that_used_value_bins_is_refused(tmp_path):
    legacy_folder(tmp_path, num_value_bins=5, value_loss_weight=1.0)
    with pytest.raises(
        ValueError, match="num_value_bins=5: per-code value-bin embeddings are no longer supported"
    ):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_value_bins=5"):
        EHRTransformerConfig(num_value_bins=5)


def test_legacy_value_loss_weight_becomes_the_value_objective_weight(tmp_path, caplog):
    legacy_folder(tmp_path, num_value_bins=0, value_loss_weight=0.5)
    with caplog.at_level(logging.WARNING):
        config = AutoConfig.from_pretrained(tmp_path)
    assert config.objective_weights == {"value": 0.5}
    assert "objective_weights['value'] = 0.5" in caplog.text


@pytest.mark.parametrize(
    "fields",
    [
        dict(objective_weights={"value": 2.0}),  # set explicitly: it took precedence
        dict(pretraining_objectives=["code", "time"]),  # no value objective to weigh
    ],
)
def test_legacy_value_loss_weight_that_weighed_nothing_is_dropped(fields):
    config = EHRTransformerConfig(value_loss_weight=0.5, **fields)
    assert config.objective_weights == fields.get("objective_weights")
    assert "value_loss_weight" not in config.to_dict()
