"""The checks users of `transformers` rely on, for every head of the EHR transformer."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    set_seed,
)

from ehr_transformer import (
    EHRTransformerConfig,
    EHRTransformerForMaskedEventModeling,
    EHRTransformerForSequenceClassification,
    EHRTransformerModel,
)

VOCAB = 40


def tiny_config(**kwargs) -> EHRTransformerConfig:
    defaults = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        embedding_dropout=0.0,
        classifier_dropout=0.0,
    )
    defaults.update(kwargs)
    return EHRTransformerConfig(**defaults)


def make_inputs(batch_size=3, seq_len=9, seed=0, pad_last=True):
    """A batch as the collators produce it: CLS first, NaN values where an event has none, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 3
    values = torch.randn(batch_size, seq_len, generator=g)
    values[:, ::3] = float("nan")
    times = torch.sort(torch.rand(batch_size, seq_len, generator=g) * 200, dim=1).values
    ages = 40 + times / 8760 + torch.rand(batch_size, 1, generator=g) * 30
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if pad_last:
        attention_mask[0, seq_len - 3 :] = 0
        input_ids[0, seq_len - 3 :] = 0
    return dict(input_ids=input_ids, attention_mask=attention_mask, values=values, times=times, ages=ages)


def mlm_labels(inputs):
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 2] = inputs["input_ids"][:, 2]
    labels[1:, 5] = inputs["input_ids"][1:, 5]
    return labels


def test_backbone_shapes_and_finite():
    set_seed(0)
    model = EHRTransformerModel(tiny_config()).eval()
    out = model(**make_inputs(), output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 9, 32)
    assert out.pooler_output.shape == (3, 32)
    assert len(out.hidden_states) == 3
    assert torch.isfinite(out.last_hidden_state).all()


def test_masked_event_head_sparse_and_dense_logits_agree():
    set_seed(0)
    model = EHRTransformerForMaskedEventModeling(tiny_config()).eval()
    inputs = make_inputs()
    labels = mlm_labels(inputs)
    sparse = model(**inputs, labels=labels)
    assert sparse.logits.shape == ((labels != -100).sum().item(), VOCAB)
    model.config.sparse_prediction = False
    dense = model(**inputs, labels=labels)
    assert dense.logits.shape == (3, 9, VOCAB)
    torch.testing.assert_close(dense.logits[labels != -100], sparse.logits)
    torch.testing.assert_close(dense.loss, sparse.loss)
    # an untrained model is close to uniform over the vocabulary
    assert abs(sparse.loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0


def value_labels_for(inputs):
    """Hide the values at position 4 (where the sample has one) and make them the reconstruction targets."""
    value_labels = torch.full_like(inputs["values"], float("nan"))
    value_labels[:, 4] = inputs["values"][:, 4]
    inputs = {**inputs, "values": inputs["values"].clone()}
    inputs["values"][:, 4] = float("nan")
    return inputs, value_labels


def test_every_parameter_gets_a_gradient_from_pretraining_loss():
    set_seed(0)
    model = EHRTransformerForMaskedEventModeling(tiny_config())
    inputs, value_labels = value_labels_for(make_inputs())
    out = model(**inputs, labels=mlm_labels(inputs), value_labels=value_labels)
    torch.testing.assert_close(out.loss, out.code_loss + out.value_loss)
    assert out.value_predictions.shape == (3,)
    out.loss.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_value_reconstruction_loss_is_mse_of_hidden_values():
    set_seed(0)
    model = EHRTransformerForMaskedEventModeling(tiny_config(objective_weights={"value": 0.5})).eval()
    inputs, value_labels = value_labels_for(make_inputs())
    out = model(**inputs, value_labels=value_labels)
    expected = torch.nn.functional.mse_loss(out.value_predictions, value_labels[:, 4])
    torch.testing.assert_close(out.value_loss, expected)
    torch.testing.assert_close(out.loss, 0.5 * expected)
    assert out.code_loss is None
    no_targets = model(**inputs, value_labels=torch.full_like(value_labels, float("nan")))
    assert no_targets.loss is None and no_targets.value_predictions.shape == (0,)


def test_decoder_is_tied_to_code_embeddings():
    model = EHRTransformerForMaskedEventModeling(tiny_config())
    assert model.decoder.weight.data_ptr() == model.model.embeddings.code_embeddings.weight.data_ptr()


@pytest.mark.parametrize(
    "problem_type,num_labels,labels",
    [
        ("regression", 1, torch.tensor([1.5, 20.0, 3.0])),
        ("single_label_classification", 3, torch.tensor([0, 2, 1])),
        ("multi_label_classification", 2, torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])),
        ("multi_label_classification", 1, torch.tensor([1.0, 0.0, 1.0])),
    ],
)
def test_classification_problem_types(problem_type, num_labels, labels):
    set_seed(0)
    model = EHRTransformerForSequenceClassification(
        tiny_config(num_labels=num_labels, problem_type=problem_type)
    )
    out = model(**make_inputs(), labels=labels)
    assert out.logits.shape == (3, num_labels)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    out.loss.backward()
    assert model.classifier.weight.grad is not None


def test_problem_type_is_inferred_as_in_bert():
    model = EHRTransformerForSequenceClassification(tiny_config(num_labels=3))
    model(**make_inputs(), labels=torch.tensor([0, 1, 2]))
    assert model.config.problem_type == "single_label_classification"
    model = EHRTransformerForSequenceClassification(tiny_config(num_labels=1))
    model(**make_inputs(), labels=torch.tensor([0.5, 1.0, 2.0]))
    assert model.config.problem_type == "regression"


def test_padding_does_not_change_real_positions():
    set_seed(0)
    model = EHRTransformerModel(tiny_config()).eval()
    inputs = make_inputs(pad_last=False)
    base = model(**inputs).last_hidden_state
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :4])], dim=1) for k, v in inputs.items()}
    padded["values"][:, -4:] = float("nan")
    out = model(**padded).last_hidden_state
    torch.testing.assert_close(out[:, :9], base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_batch_equals_samples_one_by_one(pooling):
    set_seed(0)
    model = EHRTransformerForSequenceClassification(
        tiny_config(num_labels=1, classifier_pooling=pooling)
    ).eval()
    inputs = make_inputs()
    batch_logits = model(**inputs).logits
    for i in range(3):
        length = int(inputs["attention_mask"][i].sum())
        single = {k: v[i : i + 1, :length] for k, v in inputs.items()}
        torch.testing.assert_close(model(**single).logits, batch_logits[i : i + 1], atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    set_seed(0)
    config = tiny_config(num_labels=1)
    eager = EHRTransformerForSequenceClassification._from_config(
        copy.deepcopy(config), attn_implementation="eager"
    )
    sdpa = EHRTransformerForSequenceClassification._from_config(
        copy.deepcopy(config), attn_implementation="sdpa"
    )
    eager.eval(), sdpa.eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    inputs = make_inputs()
    out_e = eager(**inputs, output_hidden_states=True)
    out_s = sdpa(**inputs, output_hidden_states=True)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(
        out_e.hidden_states[-1][real], out_s.hidden_states[-1][real], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(out_e.logits, out_s.logits, atol=1e-5, rtol=1e-5)


def test_eager_attention_weights_ignore_padding():
    model = EHRTransformerModel._from_config(tiny_config(), attn_implementation="eager").eval()
    out = model(**make_inputs(), output_attentions=True)
    assert len(out.attentions) == 2
    attn = out.attentions[0]  # (B, heads, L, L)
    assert attn.shape == (3, 4, 9, 9)
    assert torch.all(attn[0, :, :, 6:] == 0)  # sample 0's last 3 positions are padding
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 9))


def test_gradient_checkpointing_gives_same_gradients():
    set_seed(0)
    config = tiny_config()
    inputs, value_labels = value_labels_for(make_inputs())
    labels = mlm_labels(inputs)
    model = EHRTransformerForMaskedEventModeling(config).train()
    model(**inputs, labels=labels, value_labels=value_labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    model(**inputs, labels=labels, value_labels=value_labels).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_initialisation_scales_residual_projections():
    set_seed(0)
    model = EHRTransformerModel(tiny_config(num_hidden_layers=8, hidden_size=64, intermediate_size=256))
    qkv_std = model.layers[0].attn.qkv.weight.std().item()
    out_std = model.layers[0].attn.out_proj.weight.std().item()
    assert out_std < qkv_std / 2  # 1/sqrt(16) = 0.25 of the input projections' std (truncated)
    assert torch.all(model.embeddings.code_embeddings.weight[0] == 0)  # padding row


def test_time_and_age_start_no_louder_than_codes():
    """At initialisation no part of an event's embedding drowns the others: the time and age embeddings are
    about as large as a code embedding (they were 4x larger, and a classifier on real ICU values then spent
    its first epochs finding the codes and values under them)."""
    set_seed(0)
    embeddings = EHRTransformerModel(tiny_config(hidden_size=64)).embeddings
    inputs = make_inputs(batch_size=8, seq_len=32)
    code = embeddings.code_embeddings(inputs["input_ids"]).std().item()
    for part, x in (
        (embeddings.time_embeddings, inputs["times"]),
        (embeddings.age_embeddings, inputs["ages"]),
    ):
        assert 0.5 * code < part(x).std().item() < 2.0 * code


def test_save_load_round_trip_with_auto_classes(tmp_path):
    set_seed(0)
    model = EHRTransformerForSequenceClassification(tiny_config(num_labels=1)).eval()
    inputs = make_inputs()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EHRTransformerConfig)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, EHRTransformerForSequenceClassification)
    torch.testing.assert_close(reloaded(**inputs).logits, expected)


def test_masked_event_checkpoint_loads_into_classifier_reusing_backbone(tmp_path):
    set_seed(0)
    pretrained = EHRTransformerForMaskedEventModeling(tiny_config())
    pretrained.save_pretrained(tmp_path)
    assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path), EHRTransformerForMaskedEventModeling)
    assert isinstance(AutoModel.from_pretrained(tmp_path), EHRTransformerModel)
    classifier = EHRTransformerForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    for name, tensor in pretrained.model.state_dict().items():
        torch.testing.assert_close(classifier.model.state_dict()[name], tensor, msg=name)
    assert classifier.classifier.weight.shape == (1, 32)


def write_legacy_value_fields(folder, **fields):
    """Add the value-bin and value-weight fields that configs written by earlier versions carry."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def test_folder_with_legacy_value_fields_loads_unless_it_used_value_bins(tmp_path):
    """An older folder with value bins off (`num_value_bins=0`) and the default `value_loss_weight` loads as
    it was saved and is written back without them; one whose model has a value-bin table is refused by name."""
    set_seed(0)
    model = EHRTransformerForMaskedEventModeling(tiny_config()).eval()
    inputs, value_labels = value_labels_for(make_inputs())
    expected = model(**inputs, labels=mlm_labels(inputs), value_labels=value_labels)
    model.save_pretrained(tmp_path / "off")
    write_legacy_value_fields(tmp_path / "off", num_value_bins=0, value_loss_weight=1.0)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "off").eval()
    out = reloaded(**inputs, labels=mlm_labels(inputs), value_labels=value_labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    reloaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "num_value_bins" not in resaved and "value_loss_weight" not in resaved

    model.save_pretrained(tmp_path / "bins")
    write_legacy_value_fields(tmp_path / "bins", num_value_bins=5, value_loss_weight=1.0)
    with pytest.raises(
        ValueError, match="num_value_bins=5: per-code value-bin embeddings are no longer supported"
    ):
        AutoModelForMaskedLM.from_pretrained(tmp_path / "bins")


def test_temperature_divides_logits_in_eval_only():
    set_seed(0)
    model = EHRTransformerForSequenceClassification(tiny_config(num_labels=1)).eval()
    inputs = make_inputs()
    base = model(**inputs).logits
    model.config.temperature = 2.0
    torch.testing.assert_close(model(**inputs).logits, base / 2.0)


def test_linear_classifier_head_is_affine_in_the_pooled_output():
    set_seed(0)
    mlp_head = EHRTransformerForSequenceClassification(tiny_config(num_labels=2))
    assert "head.dense.weight" in mlp_head.state_dict()
    model = EHRTransformerForSequenceClassification(
        tiny_config(num_labels=2, classifier_head="linear")
    ).eval()
    assert not any(name.startswith("head.") for name in model.state_dict())
    inputs = make_inputs()
    out = model(**inputs, labels=torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    assert out.logits.shape == (3, 2) and out.pooler_output.shape == (3, 32)
    expected = out.pooler_output @ model.classifier.weight.T + model.classifier.bias  # (B, C)
    torch.testing.assert_close(out.logits, expected)
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert model.model.embeddings.code_embeddings.weight.grad is not None


def test_linear_classifier_head_save_load_round_trip(tmp_path):
    from safetensors import safe_open

    set_seed(0)
    model = EHRTransformerForSequenceClassification(
        tiny_config(num_labels=1, classifier_head="linear")
    ).eval()
    inputs = make_inputs()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as weights:
        assert not any(name.startswith("head.") for name in weights.keys())
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.classifier_head == "linear" and isinstance(reloaded.head, torch.nn.Identity)
    torch.testing.assert_close(reloaded(**inputs).logits, expected)


@pytest.mark.parametrize("classifier_head", ["mlp", "linear"])
def test_trust_remote_code_load_without_the_package(tmp_path, classifier_head):
    """A saved folder carries its modeling code: it loads in a process where ehr_transformer cannot be imported."""
    set_seed(0)
    model = EHRTransformerForSequenceClassification(
        tiny_config(num_labels=1, classifier_head=classifier_head)
    ).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_ehr.py").exists()
    inputs = make_inputs()
    torch.save({k: v for k, v in inputs.items()}, tmp_path / "inputs.pt")
    expected = model(**inputs).logits
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["ehr_transformer"] = None  # make the package unimportable
        try:
            import ehr_transformer
            raise SystemExit("ehr_transformer should not be importable here")
        except ImportError:
            pass
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.classifier_head == {classifier_head!r}
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_unpadded_path_gives_same_outputs_losses_and_gradients():
    """The padding-free path (per-event layers on real events only) changes no loss, output or gradient."""
    set_seed(0)
    inputs, value_labels = value_labels_for(make_inputs())
    inputs["attention_mask"][2, 5:] = 0  # two samples with padding of different lengths
    labels = mlm_labels(inputs)
    labels[0, 5] = inputs["input_ids"][0, 5]
    labels[inputs["attention_mask"] == 0] = -100
    results = {}
    for unpad in (True, False):
        set_seed(0)
        model = EHRTransformerForMaskedEventModeling(tiny_config(unpad_inputs=unpad))
        out = model(**inputs, labels=labels, value_labels=value_labels, output_hidden_states=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[unpad] = (out, grads)
    (a, grads_a), (b, grads_b) = results[True], results[False]
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    real = inputs["attention_mask"].bool()
    for h_a, h_b in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(h_a[real], h_b[real], atol=1e-5, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------- multitask
TASKS = dict(task_names=["mortality", "length_of_stay"], task_types=["binary", "regression"])
NAN = float("nan")


def test_multitask_logits_loss_with_missing_labels_and_backward():
    set_seed(0)
    model = EHRTransformerForSequenceClassification(tiny_config(**TASKS))
    assert model.config.num_labels == 2 and model.config.id2label == {0: "mortality", 1: "length_of_stay"}
    labels = torch.tensor([[1.0, NAN], [NAN, 3.5], [0.0, 2.0]])  # (B, T), NaN = no label for that task
    out = model(**make_inputs(), labels=labels)
    assert out.logits.shape == (3, 2)
    assert torch.isfinite(out.loss) and out.task_losses.shape == (2,)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[[0, 2], 0], labels[[0, 2], 0])
    mse = torch.nn.functional.mse_loss(out.logits[[1, 2], 1], labels[[1, 2], 1])
    torch.testing.assert_close(out.task_losses, torch.stack([bce, mse]))
    torch.testing.assert_close(out.loss, (bce + mse) / 2)
    out.loss.backward()
    assert model.classifier.weight.grad.abs().sum(dim=1).gt(0).all()  # both task rows learn
    assert all(p.grad is not None for p in model.model.parameters() if p.requires_grad)


def test_multitask_task_without_labels_is_left_out_of_the_loss():
    set_seed(0)
    model = EHRTransformerForSequenceClassification(tiny_config(**TASKS))
    out = model(**make_inputs(), labels=torch.tensor([[1.0, NAN], [0.0, NAN], [1.0, NAN]]))
    assert torch.isnan(out.task_losses[1]) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.task_losses[0])
    none = model(**make_inputs(), labels=torch.full((3, 2), NAN))
    assert none.loss.item() == 0.0
    none.loss.backward()  # still connected to the graph


def test_multitask_save_load_round_trip_and_temperature_on_binary_tasks_only(tmp_path):
    set_seed(0)
    model = EHRTransformerForSequenceClassification(tiny_config(**TASKS)).eval()
    inputs = make_inputs()
    base = model(**inputs).logits
    model.config.temperature = 2.0
    scaled = model(**inputs).logits
    torch.testing.assert_close(scaled[:, 0], base[:, 0] / 2.0)
    torch.testing.assert_close(scaled[:, 1], base[:, 1])  # a regression output is not a logit
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.task_names == TASKS["task_names"]
    assert reloaded.config.task_types == TASKS["task_types"]
    torch.testing.assert_close(reloaded(**inputs).logits, scaled)


def test_single_task_classifier_has_no_task_losses():
    set_seed(0)
    config = tiny_config(num_labels=1, problem_type="multi_label_classification")
    model = EHRTransformerForSequenceClassification(config)
    labels = torch.tensor([1.0, 0.0, 1.0])
    out = model(**make_inputs(), labels=labels)
    assert out.task_losses is None and out.logits.shape == (3, 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[:, 0], labels)
    torch.testing.assert_close(out.loss, bce)


def all_objective_inputs(inputs):
    """value, time and feature targets on top of `mlm_labels`: values hidden at position 4, times and ages at 6,
    and the unmasked sequence for the teacher."""
    teacher = {f"teacher_{k}": inputs[k] for k in ("input_ids", "values", "times", "ages")}
    inputs, value_labels = value_labels_for(inputs)
    time_labels = torch.full_like(inputs["times"], float("nan"))
    time_labels[:, 6] = torch.log1p(inputs["times"][:, 6] - inputs["times"][:, 5])
    times, ages = inputs["times"].clone(), inputs["ages"].clone()
    times[:, 6] = ages[:, 6] = float("nan")
    targets = dict(labels=mlm_labels(inputs), value_labels=value_labels, time_labels=time_labels)
    return {**inputs, "times": times, "ages": ages, **teacher, **targets}


def test_every_objective_has_a_head_a_loss_and_a_gradient():
    set_seed(0)
    objectives, weights = ["code", "value", "time", "feature"], {"time": 2.0, "feature": 0.5}
    config = tiny_config(pretraining_objectives=objectives, objective_weights=weights)
    model = EHRTransformerForMaskedEventModeling(config)
    teacher = copy.deepcopy(model.model).requires_grad_(False).eval()
    model.set_feature_teacher(teacher)
    out = model(**all_objective_inputs(make_inputs(pad_last=False)))
    assert out.time_predictions.shape == (3,) and out.value_predictions.shape == (3,)
    expected = out.code_loss + out.value_loss + 2.0 * out.time_loss + 0.5 * out.feature_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained
    assert not any(k.startswith("feature_teacher") for k in model.state_dict())


def test_only_the_configured_objectives_have_heads():
    model = EHRTransformerForMaskedEventModeling(tiny_config(pretraining_objectives=["code", "time"]))
    assert model.value_head is None and model.feature_head is None and model.time_head is not None
    out = model(**all_objective_inputs(make_inputs(pad_last=False)))  # absent objectives' targets are ignored
    assert out.value_loss is None and out.feature_loss is None
    torch.testing.assert_close(out.loss, out.code_loss + out.time_loss)


def test_a_hidden_time_or_age_is_invisible():
    """A NaN time or age adds nothing to the embedding: what the hidden time was cannot change any output."""
    set_seed(0)
    model = EHRTransformerModel(tiny_config()).eval()
    inputs = make_inputs(pad_last=False)
    outputs = []
    for shift in (0.0, 500.0):
        changed = {**inputs, "times": inputs["times"].clone(), "ages": inputs["ages"].clone()}
        changed["times"][:, 4] += shift  # a different original time ...
        changed["ages"][:, 4] += shift / 8766
        changed["times"][:, 4] = changed["ages"][:, 4] = float("nan")  # ... hidden
        outputs.append(model(**changed).last_hidden_state)
    assert torch.isfinite(outputs[0]).all()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], model(**inputs).last_hidden_state)  # hiding did remove information


def test_unpadded_path_agrees_for_every_objective():
    set_seed(0)
    inputs = all_objective_inputs(make_inputs(pad_last=False))
    inputs["attention_mask"][2, 7:] = 0  # two samples of different lengths
    inputs["input_ids"][2, 7:] = inputs["teacher_input_ids"][2, 7:] = 0
    for key in ("labels", "value_labels", "time_labels"):
        assert not (~inputs[key].eq(-100) & ~inputs[key].isnan() & (inputs["attention_mask"] == 0)).any()
    results = {}
    for unpad in (True, False):
        set_seed(0)
        config = tiny_config(unpad_inputs=unpad, pretraining_objectives=["code", "value", "time", "feature"])
        model = EHRTransformerForMaskedEventModeling(config)
        model.set_feature_teacher(copy.deepcopy(model.model).requires_grad_(False).eval())
        out = model(**inputs)
        out.loss.backward()
        results[unpad] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (a, grads_a), (b, grads_b) = results[True], results[False]
    for name in ("loss", "code_loss", "value_loss", "time_loss", "feature_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=1e-5, msg=name)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------- the transformers contract, padding-free attention, packing
def long_tailed_inputs(lengths=(40, 3, 17, 9, 25, 1, 33, 5), seed=0):
    """A padded batch whose lengths fall in several length buckets of the padding-free path."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    batch_size, seq_len = len(lengths), int(lengths.max())
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()  # (B, L)
    input_ids = torch.randint(4, VOCAB, (batch_size, seq_len), generator=g) * mask
    input_ids[:, 0] = 3
    values = torch.randn(batch_size, seq_len, generator=g).masked_fill(
        torch.rand(batch_size, seq_len, generator=g) < 0.5, float("nan")
    )
    times = torch.rand(batch_size, seq_len, generator=g).cumsum(dim=1)
    ages = 50 + torch.rand(batch_size, 1, generator=g) * 30 + times / 8760
    return dict(input_ids=input_ids, attention_mask=mask, values=values, times=times, ages=ages)


def test_resize_token_embeddings_resizes_every_per_code_table_and_round_trips(tmp_path):
    set_seed(0)
    model = EHRTransformerForMaskedEventModeling(tiny_config())
    model.resize_token_embeddings(VOCAB + 5)
    embeddings = model.model.embeddings
    assert embeddings.code_embeddings.weight.shape[0] == VOCAB + 5
    assert embeddings.code_value_embeddings.weight.shape[0] == VOCAB + 5
    assert embeddings.code_value_embeddings.padding_idx == 0
    assert model.decoder.weight.shape[0] == VOCAB + 5 and model.config.vocab_size == VOCAB + 5
    inputs = make_inputs()
    inputs["input_ids"][1, 4] = VOCAB + 4  # a new code that carries a value
    inputs["values"][1, 4] = 1.5
    out = model.eval()(**inputs)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, out.logits)
    model.resize_token_embeddings(VOCAB)  # and back
    assert embeddings.code_value_embeddings.weight.shape[0] == VOCAB


def test_inputs_embeds_with_input_ids_for_values():
    set_seed(0)
    model = EHRTransformerModel(tiny_config()).eval()
    inputs = make_inputs()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    expected = model(**inputs).last_hidden_state
    torch.testing.assert_close(model(**inputs, inputs_embeds=embeds.clone()).last_hidden_state, expected)
    without_values = {k: v for k, v in inputs.items() if k not in ("input_ids", "values")}
    torch.testing.assert_close(
        model(inputs_embeds=embeds, **without_values).last_hidden_state,
        model(input_ids=inputs["input_ids"], **without_values).last_hidden_state,
    )
    with pytest.raises(ValueError, match="values need input_ids"):
        model(inputs_embeds=embeds, values=inputs["values"], attention_mask=inputs["attention_mask"])
    # embedding-level attribution: a gradient reaches the embeddings through the padding-free path
    embeds = embeds.detach().requires_grad_(True)
    model(**inputs, inputs_embeds=embeds).pooler_output.sum().backward()
    assert embeds.grad[inputs["attention_mask"].bool()].abs().sum() > 0


def test_hidden_states_carry_gradients_in_the_padding_free_path():
    """Collected hidden states lie on the autograd path: their gradients equal those of the padded path."""
    inputs = long_tailed_inputs()
    real = inputs["attention_mask"].bool()
    grads = {}
    for unpad in (True, False):
        set_seed(0)
        model = EHRTransformerForSequenceClassification(tiny_config(unpad_inputs=unpad, num_labels=1))
        out = model(**inputs, output_hidden_states=True)
        assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (*real.shape, 32)
        for h in out.hidden_states:
            h.retain_grad()
        out.logits.sum().backward()
        grads[unpad] = [h.grad for h in out.hidden_states]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert a is not None and a[real].abs().sum() > 0
        torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=1e-4)


def run_with_gradients(model, inputs, labels, run=None):
    out = (model if run is None else run)(**inputs, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("call_cost", [0, 64, 10**9])  # a call per subject, a few buckets, one
def test_variable_length_attention_matches_the_padded_path(implementation, call_cost, monkeypatch):
    """The batched variable-length attention (length buckets, no loop over subjects) gives the padded path's
    outputs, losses and gradients."""
    from ehr_transformer.modeling_ehr import BUCKET_CALL_COST

    monkeypatch.setitem(BUCKET_CALL_COST, "cpu", call_cost)
    inputs = long_tailed_inputs()
    labels = torch.where(torch.rand(inputs["input_ids"].shape) < 0.3, inputs["input_ids"], -100)
    labels[inputs["attention_mask"] == 0] = -100
    results = {}
    for unpad in (True, False):
        set_seed(0)
        config = tiny_config(unpad_inputs=unpad, sparse_prediction=False)
        model = EHRTransformerForMaskedEventModeling._from_config(config, attn_implementation=implementation)
        results[unpad] = run_with_gradients(model, inputs, labels)
    (a, grads_a), (b, grads_b) = results[True], results[False]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_variable_length_attention_is_a_few_batched_calls_not_one_per_subject(monkeypatch):
    from transformers import AttentionInterface

    from ehr_transformer.modeling_ehr import BUCKET_CALL_COST, eager_attention_forward, length_buckets

    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape[0])
        if (
            attention_mask is not None and attention_mask.dtype == torch.bool
        ):  # sdpa-style mask: True = attend
            attention_mask = torch.zeros(attention_mask.shape).masked_fill(~attention_mask, torch.finfo().min)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_for_test", counting_attention)
    monkeypatch.setitem(BUCKET_CALL_COST, "cpu", 16384)
    lengths = list(range(1, 65))  # 64 subjects of 64 different lengths
    buckets = length_buckets(lengths, 16384)
    assert sorted(i for group in buckets for i in group) == list(range(64))
    model = EHRTransformerModel._from_config(tiny_config(), attn_implementation="counting_for_test").eval()
    expected = EHRTransformerModel._from_config(tiny_config(), attn_implementation="eager").eval()
    expected.load_state_dict(model.state_dict())
    inputs = long_tailed_inputs(lengths)
    out = model(**inputs).last_hidden_state
    assert len(calls) == 2 * len(buckets) <= 2 * 8 and sum(calls) == 2 * 64  # 2 layers x a few buckets
    real = inputs["attention_mask"].bool()
    expected.config.unpad_inputs = False
    torch.testing.assert_close(out[real], expected(**inputs).last_hidden_state[real], atol=1e-5, rtol=1e-5)


def test_flex_attention_matches_sdpa_on_the_packed_events():
    pytest.importorskip("torch.nn.attention.flex_attention")
    inputs = long_tailed_inputs((12, 3, 7))
    outputs = {}
    for implementation in ("sdpa", "flex_attention"):
        set_seed(0)
        model = EHRTransformerModel._from_config(tiny_config(), attn_implementation=implementation).eval()
        with torch.no_grad():  # FlexAttention has no backward on CPU
            outputs[implementation] = model(**inputs).last_hidden_state
    torch.testing.assert_close(outputs["flex_attention"], outputs["sdpa"], atol=1e-5, rtol=1e-5)


def pack(inputs: dict, rows: list[list[int]]) -> dict:
    """Pack the subjects of a padded batch into rows: `rows` lists the subjects of each row; the attention mask
    numbers them 1, 2, ... within the row."""
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    seq_len = max(sum(lengths[i] for i in row) for row in rows)
    packed = {}
    for key, x in inputs.items():
        fill = float("nan") if x.is_floating_point() else (-100 if key == "labels" else 0)
        out = torch.full((len(rows), seq_len), fill, dtype=x.dtype)
        for r, row in enumerate(rows):
            start = 0
            for k, i in enumerate(row):
                out[r, start : start + lengths[i]] = k + 1 if key == "attention_mask" else x[i, : lengths[i]]
                start += lengths[i]
        packed[key] = out
    return packed


@pytest.mark.parametrize(
    ("implementation", "unpad", "call_cost"),
    [("sdpa", True, 0), ("sdpa", True, 10**9), ("eager", True, 64), ("sdpa", False, 0), ("eager", False, 0)],
)
def test_packed_and_unpacked_batches_give_the_same_per_subject_losses(
    implementation, unpad, call_cost, monkeypatch
):
    from ehr_transformer.modeling_ehr import BUCKET_CALL_COST

    monkeypatch.setitem(BUCKET_CALL_COST, "cpu", call_cost)
    inputs = long_tailed_inputs((12, 3, 7, 9, 5))
    inputs["labels"] = torch.where(torch.rand(inputs["input_ids"].shape) < 0.4, inputs["input_ids"], -100)
    inputs["labels"][inputs["attention_mask"] == 0] = -100
    inputs["labels"][:, 1] = inputs["input_ids"][:, 1]  # every subject has a masked event
    rows = [[0, 2], [1, 3, 4]]
    packed = pack(inputs, rows)
    set_seed(0)
    config = tiny_config(unpad_inputs=unpad, sparse_prediction=False)
    model = EHRTransformerForMaskedEventModeling._from_config(
        config, attn_implementation=implementation
    ).eval()

    def per_subject_losses(batch, where):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, L, V)
        losses = {}
        for subject, (row, span) in where.items():
            labels = batch["labels"][row, span]
            loss = torch.nn.functional.cross_entropy(logits[row, span], labels, ignore_index=-100)
            losses[subject] = (loss, logits[row, span])
        return losses

    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    unpacked_where = {i: (i, slice(0, n)) for i, n in enumerate(lengths)}
    packed_where = {}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            packed_where[i] = (r, slice(start, start + lengths[i]))
            start += lengths[i]
    a, b = per_subject_losses(inputs, unpacked_where), per_subject_losses(packed, packed_where)
    for subject in a:
        torch.testing.assert_close(a[subject], b[subject], atol=1e-5, rtol=1e-5, msg=f"subject {subject}")
    # without the subject numbering, the packed subjects would see each other: the test can fail
    crossed = {**packed, "attention_mask": (packed["attention_mask"] > 0).long()}
    assert (per_subject_losses(crossed, packed_where)[0][1] - a[0][1]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "model_class",
    [EHRTransformerModel, EHRTransformerForMaskedEventModeling, EHRTransformerForSequenceClassification],
)
def test_torch_export_under_the_default_config_matches_eager(model_class):
    set_seed(0)
    model = model_class(tiny_config()).eval()
    assert model.config.unpad_inputs
    inputs = long_tailed_inputs((9, 3, 6))
    args, kwargs = (inputs["input_ids"],), {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        expected = model(*args, **kwargs)[0]
    batch, length = torch.export.Dim("batch", min=1, max=512), torch.export.Dim("length", min=2, max=4096)
    dynamic = {"input_ids": {0: batch, 1: length}, **{k: {0: batch, 1: length} for k in kwargs}}
    for dynamic_shapes in (None, dynamic):
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
        torch.testing.assert_close(program.module()(*args, **kwargs)[0], expected, atol=1e-5, rtol=1e-5)
    other = long_tailed_inputs((4, 11, 2, 7, 5), seed=1)  # another batch size and length, same program
    other_kwargs = {k: v for k, v in other.items() if k != "input_ids"}
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(other["input_ids"], **other_kwargs)[0],
            model(other["input_ids"], **other_kwargs)[0],
            atol=1e-5,
            rtol=1e-5,
        )


def test_torch_compile_full_graph_under_the_default_config_gives_the_eager_loss_and_gradients():
    inputs = long_tailed_inputs((9, 3, 6))
    labels = torch.where(torch.rand(inputs["input_ids"].shape) < 0.4, inputs["input_ids"], -100)
    labels[:, 1] = inputs["input_ids"][:, 1]
    labels[inputs["attention_mask"] == 0] = -100
    results = []
    for compiled in (False, True):
        set_seed(0)
        model = EHRTransformerForMaskedEventModeling(tiny_config())
        # aot_eager traces forward and backward as inductor does, without generating C++ (fast on CPU)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        results.append(run_with_gradients(model, inputs, labels, run))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_keeps_time_and_age_embeddings_in_float32(tmp_path, dtype):
    set_seed(0)
    model = EHRTransformerForSequenceClassification(tiny_config(num_labels=1)).eval()
    model.save_pretrained(tmp_path)
    half = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=dtype).eval()
    embeddings = half.model.embeddings
    assert embeddings.code_embeddings.weight.dtype == dtype
    assert embeddings.time_embeddings.proj.weight.dtype == torch.float32
    assert embeddings.age_embeddings.proj.weight.dtype == torch.float32
    inputs = make_inputs()
    with torch.no_grad():
        logits = half(**inputs).logits
    assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), model(**inputs).logits, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("call_cost", [0, 50, 400, 10**6])
def test_length_buckets_minimise_padded_work_plus_calls(call_cost):
    import itertools

    from ehr_transformer.modeling_ehr import length_buckets

    lengths = [9, 3, 12, 3, 7, 1, 12, 5]

    def cost(groups):
        work = [
            len(g) * max(lengths[i] for i in g) ** 2 * (1.1 if len({lengths[i] for i in g}) > 1 else 1)
            for g in groups
        ]
        return sum(work) + call_cost * len(groups)

    groups = length_buckets(lengths, call_cost, mask_cost=0.1)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # brute force over the cuts of the subjects sorted by length (ties kept together)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cut_points = [k for k in range(1, len(order)) if lengths[order[k]] != lengths[order[k - 1]]]
    best = min(
        cost([order[a:b] for a, b in itertools.pairwise([0, *cuts, len(order)])])
        for r in range(len(cut_points) + 1)
        for cuts in itertools.combinations(cut_points, r)
    )
    assert cost(groups) == pytest.approx(best)
    if call_cost == 0:
        assert len(groups) == len(set(lengths))  # no padding at all
    if call_cost == 10**6:
        assert len(groups) == 1  # one call
