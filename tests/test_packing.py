"""Sequence packing for pretraining: the collator packs several subjects per row without dropping, truncating or
reordering an event, attention never crosses subjects, and packed and unpacked batches of the same subjects give
the same per-subject and total losses of every masked-event objective (code, value, time, feature)."""

import copy

import pytest
import torch
from transformers import set_seed

from ehr_transformer import EHRTransformerConfig, EHRTransformerForMaskedEventModeling
from ehr_transformer.data.collators import DataCollatorForMaskedEventModeling, pack_batch, pack_rows
from ehr_transformer.tokenization_ehr import EHREventTokenizer

NAN = float("nan")
LENGTHS = (23, 5, 17, 9, 30, 2, 12, 30, 1, 8)
OBJECTIVES = ["code", "value", "time", "feature"]


def make_tokenizer(n_codes: int = 40) -> EHREventTokenizer:
    return EHREventTokenizer([f"C{i}" for i in range(n_codes)], max_length=64)


def make_features(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    """CLS + events with ids from 4 on, values on about half of them, increasing times, one age per subject."""
    g = torch.Generator().manual_seed(seed)
    features = []
    for subject, n in enumerate(lengths):
        ids = [3] + torch.randint(4, 40, (n - 1,), generator=g).tolist()
        values = torch.randn(n, generator=g).masked_fill(torch.rand(n, generator=g) < 0.5, NAN)
        values[0] = NAN
        times = torch.cat([torch.zeros(1), (torch.rand(n - 1, generator=g) * 5).cumsum(0)])
        age = 40.0 + 10 * subject
        features.append(
            {
                "subject_id": subject,
                "input_ids": ids,
                "values": values.tolist(),
                "times": times.tolist(),
                "ages": (age + times / 8760).tolist(),
            }
        )
    return features


def collate(features, pack: bool, max_length=None, seed: int = 0, **kwargs):
    settings = dict(
        mlm_probability=0.3,
        value_mask_probability=0.4,
        time_mask_probability=0.3,
        return_teacher_inputs=True,
    )
    settings.update(kwargs)
    collator = DataCollatorForMaskedEventModeling(
        make_tokenizer(),
        pack_sequences=pack,
        pack_max_length=max_length,
        generator=torch.Generator().manual_seed(seed),
        **settings,
    )
    return collator(features)


def spans(unpacked: dict, max_length=None) -> dict[int, tuple[int, slice, slice]]:
    """subject -> (packed row, its span there, its span in the unpacked row), from the placement `pack_batch` gives
    for the collator's row budget."""
    lengths = (unpacked["attention_mask"] != 0).sum(dim=1).tolist()
    _, placement = pack_batch(unpacked, pad_token_id=0, max_length=max_length)
    return {
        i: (int(placement[i, 0]), slice(int(placement[i, 1]), int(placement[i, 1]) + n), slice(0, n))
        for i, n in enumerate(lengths)
        if n
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        torch.equal(a, b)
        if not a.is_floating_point()
        else torch.allclose(a, b, equal_nan=True, atol=0, rtol=0)
    )


def test_pack_rows_is_first_fit_decreasing_within_the_budget():
    rows = pack_rows([5, 9, 3, 7, 0, 4], max_length=12)
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 5]  # the empty subject gets no place
    assert all(sum([5, 9, 3, 7, 0, 4][i] for i in row) <= 12 for row in rows)
    assert rows == [[1, 2], [0, 3], [5]]  # 9 and 7 open rows, 5 joins the 7, 4 opens a row, 3 joins the 9
    assert pack_rows([20, 3], max_length=10) == [[0], [1]]  # longer than the budget: a row of its own


@pytest.mark.parametrize("max_length", [None, 30, 45, 1000])
@pytest.mark.parametrize("strategy", ["random", "future"])
def test_packing_keeps_every_event_once_in_order_with_its_masks_and_targets(max_length, strategy):
    features = make_features()
    unpacked = collate(features, pack=False, value_mask_strategy=strategy)
    packed = collate(features, pack=True, max_length=max_length, value_mask_strategy=strategy)
    assert set(packed) == set(unpacked)
    assert {"labels", "value_labels", "time_labels", "teacher_input_ids"} <= set(packed)
    budget = max_length or max(LENGTHS)
    assert packed["input_ids"].shape[1] <= budget
    assert packed["input_ids"].shape[0] < len(LENGTHS)  # it packs
    assert (packed["attention_mask"] != 0).sum() == sum(LENGTHS)  # no event dropped nor repeated
    covered = torch.zeros_like(packed["attention_mask"], dtype=torch.bool)
    for subject, (row, span, own) in spans(unpacked, max_length).items():
        assert not covered[row, span].any()  # subjects do not overlap
        covered[row, span] = True
        segment = packed["attention_mask"][row, span]
        assert (segment == segment[0]).all() and segment[0] > 0  # one subject number over its events
        for neighbour in (span.start - 1, span.stop):  # and another one beside them
            if 0 <= neighbour < packed["attention_mask"].shape[1]:
                assert packed["attention_mask"][row, neighbour] != segment[0]
        for key, x in unpacked.items():
            if key != "attention_mask":
                assert same(packed[key][row, span], x[subject, own]), (key, subject)
    assert torch.equal(covered, packed["attention_mask"] != 0)
    padding = packed["attention_mask"] == 0
    assert (packed["input_ids"][padding] == make_tokenizer().pad_token_id).all()
    assert (packed["labels"][padding] == -100).all()
    assert packed["value_labels"][padding].isnan().all() and packed["time_labels"][padding].isnan().all()
    # the first event of every subject has no previous time: never a time target, packed or not
    for row, span, _ in spans(unpacked, max_length).values():
        assert packed["time_labels"][row, span.start].isnan()


def tiny_model(implementation, unpad: bool) -> EHRTransformerForMaskedEventModeling:
    set_seed(0)
    config = EHRTransformerConfig(
        vocab_size=make_tokenizer().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        embedding_dropout=0.0,
        pretraining_objectives=OBJECTIVES,
        unpad_inputs=unpad,
    )
    kwargs = {} if implementation is None else {"attn_implementation": implementation}
    model = EHRTransformerForMaskedEventModeling._from_config(config, **kwargs).eval()
    model.set_feature_teacher(copy.deepcopy(model.model))
    return model


def per_subject_losses(model, batch: dict, where: dict) -> dict[int, dict[str, tuple[torch.Tensor, int]]]:
    """subject -> objective -> (the loss summed over the subject's targets, their count), from the model's own heads
    on the batch's hidden states; and the subject's final hidden states under "hidden"."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "values", "times", "ages")}
    hidden = model.model(**inputs).last_hidden_state  # (B, L, H)
    targets = model.feature_targets(
        batch["teacher_input_ids"],
        batch["attention_mask"],
        batch["teacher_values"],
        batch["teacher_times"],
        batch["teacher_ages"],
    )  # (B, L, H)
    losses = {}
    for subject, (row, span) in where.items():
        h = hidden[row, span]  # (n, H)
        labels = batch["labels"][row, span]
        masked = labels != -100
        code = torch.nn.functional.cross_entropy(
            model.decoder(model.head(h[masked])), labels[masked], reduction="sum"
        )
        out = {"code": (code, int(masked.sum())), "hidden": (h, 0)}
        for name, head, decoder in (
            ("value", model.value_head, model.value_decoder),
            ("time", model.time_head, model.time_decoder),
        ):
            labels_x = batch[f"{name}_labels"][row, span]
            is_target = ~labels_x.isnan()
            predictions = decoder(head(h[is_target])).squeeze(-1)
            out[name] = (((predictions - labels_x[is_target]) ** 2).sum(), int(is_target.sum()))
        feature = ((model.feature_head(h[masked]) - targets[row, span][masked]) ** 2).mean(dim=-1).sum()
        out["feature"] = (feature, int(masked.sum()))
        losses[subject] = out
    return losses


@pytest.mark.parametrize(
    ("implementation", "unpad"),
    [(None, True), ("sdpa", True), ("eager", True), ("sdpa", False), ("eager", False)],
)
def test_packed_and_unpacked_batches_give_the_same_per_subject_and_total_losses(implementation, unpad):
    features = make_features()
    unpacked = collate(features, pack=False)
    packed = collate(features, pack=True, max_length=40)
    assert packed["input_ids"].shape[0] < len(LENGTHS)
    model = tiny_model(implementation, unpad)
    packed_where = {i: (row, span) for i, (row, span, _) in spans(unpacked, 40).items()}
    unpacked_where = {i: (i, own) for i, (_, _, own) in spans(unpacked, 40).items()}
    with torch.no_grad():
        a = per_subject_losses(model, unpacked, unpacked_where)
        b = per_subject_losses(model, packed, packed_where)
        totals = {name: model(**batch) for name, batch in (("unpacked", unpacked), ("packed", packed))}
    for subject in a:
        for name in ("hidden", *OBJECTIVES):
            torch.testing.assert_close(
                b[subject][name][0], a[subject][name][0], atol=1e-5, rtol=1e-5, msg=f"{subject} {name}"
            )
            assert a[subject][name][1] == b[subject][name][1]
    # Every loss is a mean over the batch's targets (the same targets packed or not): the sum of the subjects'
    # summed losses over the number of targets, identical in both layouts.
    for name in OBJECTIVES:
        count = sum(a[s][name][1] for s in a)
        assert count > 0, name
        expected = sum(a[s][name][0] for s in a) / count
        for layout, output in totals.items():
            torch.testing.assert_close(
                getattr(output, f"{name}_loss"), expected, atol=1e-5, rtol=1e-5, msg=f"{layout} {name}"
            )
    torch.testing.assert_close(totals["packed"].loss, totals["unpacked"].loss, atol=1e-5, rtol=1e-5)


def attention_cases() -> list:
    # FlexAttention on packed events (its block mask) is checked against sdpa in test_modeling_ehr.py; on CPU it
    # costs ~10 s here, so this file keeps to the default (sdpa), sdpa and eager
    return [(implementation, unpad) for implementation in (None, "sdpa", "eager") for unpad in (True, False)]


@pytest.mark.parametrize(("implementation", "unpad"), attention_cases())
def test_attention_never_crosses_the_subjects_of_a_packed_row(implementation, unpad):
    features = make_features()
    unpacked = collate(features, pack=False)
    packed = collate(features, pack=True, max_length=40)
    where = spans(unpacked, 40)
    row_of = {}
    for subject, (row, _, _) in where.items():
        row_of.setdefault(row, []).append(subject)
    row, subjects = next((r, s) for r, s in row_of.items() if len(s) >= 2)
    changed, kept = subjects[0], subjects[1:]
    model = tiny_model(implementation, unpad)
    inputs = {k: packed[k] for k in ("input_ids", "attention_mask", "values", "times", "ages")}
    perturbed = {k: v.clone() for k, v in inputs.items()}
    _, span, _ = where[changed]
    perturbed["input_ids"][row, span.start + 1 : span.stop] = 5
    perturbed["values"][row, span] = 3.0
    perturbed["times"][row, span] += 100.0
    with torch.no_grad():
        before = model.model(**inputs).last_hidden_state
        after = model.model(**perturbed).last_hidden_state
        crossed = model.model(**{**inputs, "attention_mask": (inputs["attention_mask"] != 0).long()})
    assert (after[row, span] - before[row, span]).abs().max() > 1e-3  # the perturbation shows
    for subject in kept:
        _, other, _ = where[subject]
        torch.testing.assert_close(after[row, other], before[row, other], atol=1e-6, rtol=1e-6)
    # the control: one segment for the whole row lets the subjects see each other
    _, other, _ = where[kept[0]]
    assert (crossed.last_hidden_state[row, other] - before[row, other]).abs().max() > 1e-4


def test_packing_without_a_budget_never_widens_the_batch_and_honours_pad_to_multiple_of():
    features = make_features()
    packed = collate(features, pack=True)
    assert packed["input_ids"].shape[1] == max(LENGTHS)
    padded = collate(features, pack=True, pad_to_multiple_of=8)
    assert padded["input_ids"].shape[1] == 32
    assert (padded["attention_mask"] != 0).sum() == sum(LENGTHS)
    with pytest.raises(ValueError, match="pack_max_length"):
        collate(features, pack=True, max_length=0)


def test_pretrain_and_the_cli_take_pack_sequences(tmp_path, monkeypatch):
    from ehr_transformer import cli
    from ehr_transformer.training.arguments import PretrainingArguments

    assert hasattr(PretrainingArguments(), "pack_sequences")
    (tmp_path / "meds").mkdir()
    argv = ["--data_dir", str(tmp_path / "meds"), "--output_dir", str(tmp_path / "out")]
    _, _, default, _ = cli._parse_training("pretrain", argv)
    _, _, on, _ = cli._parse_training("pretrain", [*argv, "--pack_sequences"])
    _, _, off, _ = cli._parse_training("pretrain", [*argv, "--pack_sequences", "false"])
    assert on.pack_sequences is True and off.pack_sequences is False
    assert default.pack_sequences == PretrainingArguments().pack_sequences


def test_pretrain_hands_pack_sequences_to_its_collator(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from ehr_transformer.training import pretrain as pretrain_module
    from ehr_transformer.training.arguments import DataArguments, ModelArguments, PretrainingArguments

    class Built(Exception):
        pass

    def trainer(*args, data_collator, **kwargs):
        raise Built(data_collator)

    monkeypatch.setattr(pretrain_module, "fit_tokenizer", lambda data_args: make_tokenizer())
    monkeypatch.setattr(pretrain_module, "build_pretraining_dataset", lambda *args: make_features())
    monkeypatch.setattr(pretrain_module, "PretrainingTrainer", trainer)
    for pack in (True, False):
        with pytest.raises(Built) as built:
            pretrain_module.pretrain(
                DataArguments(data_dir=str(tmp_path)),
                ModelArguments(hidden_size=16, num_hidden_layers=1, intermediate_size=32),
                PretrainingArguments(pack_sequences=pack),
                TrainingArguments(str(tmp_path / "out"), report_to="none"),
            )
        collator = built.value.args[0]
        assert collator.pack_sequences is pack
        batch = collator(make_features())
        assert bool(batch["attention_mask"].amax() > 1) == pack
        assert (batch["input_ids"].shape[0] < len(LENGTHS)) == pack
