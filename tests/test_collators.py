import itertools
import math

import pytest
import torch
from transformers import set_seed

from ehr_transformer.data.collators import (
    DataCollatorForEventClassification,
    DataCollatorForMaskedEventModeling,
)
from ehr_transformer.tokenization_ehr import EHREventTokenizer

NAN = float("nan")


def make_tokenizer(n_codes: int = 50) -> EHREventTokenizer:
    return EHREventTokenizer([f"C{i}" for i in range(n_codes)], max_length=64)


def make_feature(length: int, offset: int = 0, label=None) -> dict:
    """CLS + `length - 1` events with ids from 4 on; every other event has a value."""
    ids = [3] + [4 + (offset + i) % 40 for i in range(length - 1)]
    feature = {
        "subject_id": offset,
        "length": length,
        "input_ids": ids,
        "values": [NAN] + [float(i) if i % 2 else NAN for i in range(length - 1)],
        "times": [0.0] + [float(i) for i in range(length - 1)],
        "ages": [40.0] * length,
    }
    if label is not None:
        feature["labels"] = label
    return feature


def test_padding_shapes_and_values():
    tok = make_tokenizer()
    batch = DataCollatorForEventClassification(tok)([make_feature(5, label=1.0), make_feature(3, label=0.0)])
    assert set(batch) == {"input_ids", "attention_mask", "values", "times", "ages", "labels"}
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["values"].dtype == batch["times"].dtype == batch["ages"].dtype == torch.float32
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 2
    assert torch.isnan(batch["values"][1, 3:]).all()
    assert batch["times"][1, 3:].tolist() == [0.0, 0.0] and batch["ages"][1, 3:].tolist() == [0.0, 0.0]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 0.0]
    padded = DataCollatorForEventClassification(tok, pad_to_multiple_of=8)([make_feature(5), make_feature(3)])
    assert padded["input_ids"].shape == (2, 8) and "labels" not in padded


def test_classification_label_types():
    tok = make_tokenizer()
    collate = DataCollatorForEventClassification(tok)
    assert collate([make_feature(3, label=2), make_feature(4, label=0)])["labels"].dtype == torch.long
    assert (
        collate([make_feature(3, label=True), make_feature(4, label=False)])["labels"].dtype == torch.float32
    )
    multi = collate([make_feature(3, label=[1.0, 0.0]), make_feature(4, label=[0.0, 1.0])])["labels"]
    assert multi.shape == (2, 2)


def test_masking_never_touches_pad_or_cls_and_labels_outside_are_ignored():
    tok = make_tokenizer()
    collate = DataCollatorForMaskedEventModeling(
        tok, mlm_probability=0.5, generator=torch.Generator().manual_seed(0)
    )
    features = [make_feature(n, offset=n) for n in (2, 7, 20, 33)]
    originals = DataCollatorForEventClassification(tok)(features)
    for _ in range(20):
        batch = collate(features)
        labels = batch["labels"]
        assert labels.dtype == torch.long and labels.shape == batch["input_ids"].shape
        special = torch.isin(originals["input_ids"], torch.tensor(tok.all_special_ids))
        assert (labels[special] == -100).all()  # CLS and PAD never targets
        assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
        assert (batch["input_ids"][originals["attention_mask"] == 0] == tok.pad_token_id).all()
        targets = labels != -100
        assert (labels[targets] == originals["input_ids"][targets]).all()
        unchanged = ~targets
        assert (batch["input_ids"][unchanged] == originals["input_ids"][unchanged]).all()
        assert (targets.sum(dim=1) >= 1).all()  # every sample has a target
        # a [MASK] or randomly replaced token has its value hidden
        replaced = targets & (batch["input_ids"] != originals["input_ids"])
        assert torch.isnan(batch["values"][replaced]).all()


def test_rate_and_80_10_10_proportions():
    tok = make_tokenizer(500)
    set_seed(0)
    features = [make_feature(60, offset=i) for i in range(8)]
    originals = DataCollatorForEventClassification(tok)(features)["input_ids"]
    n_maskable = n_selected = n_mask = n_random = n_same = 0
    collate = DataCollatorForMaskedEventModeling(tok)
    for _ in range(100):
        batch = collate(features)
        targets = batch["labels"] != -100
        n_maskable += 8 * 59
        n_selected += int(targets.sum())
        ids = batch["input_ids"][targets]
        n_mask += int((ids == tok.mask_token_id).sum())
        same = ids == originals[targets]
        n_same += int(same.sum())
        n_random += int(((ids != tok.mask_token_id) & ~same).sum())
        assert (ids[ids != tok.mask_token_id] >= len(tok.all_special_ids)).all()
    assert n_selected / n_maskable == pytest.approx(0.15, abs=0.01)
    assert n_mask / n_selected == pytest.approx(0.8, abs=0.03)
    # a random replacement can draw the original id (1 in 496): counted as unchanged
    assert n_random / n_selected == pytest.approx(0.1, abs=0.02)
    assert n_same / n_selected == pytest.approx(0.1, abs=0.02)


def test_at_least_one_target_even_at_low_probability():
    tok = make_tokenizer()
    collate = DataCollatorForMaskedEventModeling(tok, mlm_probability=1e-6)
    batch = collate([make_feature(2), make_feature(10, offset=3), {**make_feature(1)}])
    per_sample = (batch["labels"] != -100).sum(dim=1).tolist()
    assert per_sample == [1, 1, 0]  # the CLS-only sample has nothing to mask


def test_deterministic_under_seed():
    tok = make_tokenizer()
    features = [make_feature(n, offset=n) for n in (5, 17, 30)]
    collate = DataCollatorForMaskedEventModeling(tok)
    set_seed(123)
    first = collate(features)
    set_seed(123)
    second = collate(features)
    for key in first:
        assert torch.equal(first[key].nan_to_num(-1.0), second[key].nan_to_num(-1.0)), key
    a = DataCollatorForMaskedEventModeling(tok, generator=torch.Generator().manual_seed(7))(features)
    b = DataCollatorForMaskedEventModeling(tok, generator=torch.Generator().manual_seed(7))(features)
    assert torch.equal(a["labels"], b["labels"])


def test_invalid_arguments_and_features():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="mask_replace_prob"):
        DataCollatorForMaskedEventModeling(tok, mask_replace_prob=0.9, random_replace_prob=0.2)
    with pytest.raises(ValueError, match="lacks key"):
        DataCollatorForEventClassification(tok)([{"input_ids": [3, 4]}])
    with pytest.raises(ValueError, match="different lengths"):
        DataCollatorForEventClassification(tok)([{**make_feature(3), "times": [0.0]}])
    values = DataCollatorForEventClassification(tok)([{**make_feature(3), "values": [None, 1.0, None]}])[
        "values"
    ]
    assert math.isnan(values[0, 0]) and values[0, 1] == 1.0


def test_value_reconstruction_targets_are_hidden_from_the_input():
    set_seed(0)
    tokenizer = make_tokenizer()
    features = [make_feature(60, offset=i) for i in range(40)]
    collator = DataCollatorForMaskedEventModeling(tokenizer, value_mask_probability=0.5)
    batch = collator(features)
    targets = ~torch.isnan(batch["value_labels"])  # (B, L)
    assert targets.any()
    # a target's value never reaches the model at its own position, and its code stays visible
    assert torch.isnan(batch["values"][targets]).all()
    assert (batch["labels"][targets] == -100).all()
    assert not torch.isin(batch["input_ids"][targets], torch.tensor(tokenizer.all_special_ids)).any()
    # targets are the original values: compare with an unmasked padding of the same features
    plain = DataCollatorForEventClassification(tokenizer)(
        [{k: v for k, v in f.items() if k != "labels"} for f in features]
    )
    torch.testing.assert_close(batch["value_labels"][targets], plain["values"][targets])
    # about half of the valued, not code-masked events are targets
    had_value = ~torch.isnan(plain["values"]) & (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    had_value &= ~torch.isin(plain["input_ids"], torch.tensor(tokenizer.all_special_ids))
    share = targets.sum().item() / had_value.sum().item()
    assert 0.4 < share < 0.6
    assert "value_labels" not in DataCollatorForMaskedEventModeling(tokenizer)(features)


def test_future_value_masking_hides_the_latest_hours_and_nothing_before_them():
    set_seed(0)
    tokenizer = make_tokenizer()
    features = []
    for i in range(40):  # four measurements an hour, as in hourly ICU tables
        feature = make_feature(61, offset=i)
        feature["values"] = [NAN] + [float(k % 7) for k in range(60)]
        feature["times"] = [0.0] + [float(k // 4) for k in range(60)]
        features.append(feature)
    collator = DataCollatorForMaskedEventModeling(
        tokenizer, value_mask_probability=0.3, value_mask_strategy="future"
    )
    batch = collator(features)
    plain = DataCollatorForEventClassification(tokenizer)(features)
    targets = ~torch.isnan(batch["value_labels"])  # (B, L)
    torch.testing.assert_close(batch["value_labels"][targets], plain["values"][targets])
    shares = []
    for row in range(len(features)):
        target_times = plain["times"][row][targets[row]]
        assert target_times.numel() > 0
        cut = target_times.min()
        # nothing from the cut hour on reaches the model; everything before it that had a value still does
        assert torch.isnan(batch["values"][row][plain["times"][row] >= cut]).all()
        before = (
            (plain["times"][row] < cut) & ~torch.isnan(plain["values"][row]) & (batch["labels"][row] == -100)
        )
        torch.testing.assert_close(batch["values"][row][before], plain["values"][row][before])
        shares.append(targets[row].sum().item() / 60)
    assert 0.2 < sum(shares) / len(shares) < 0.45  # 30% on average, rounded up to whole hours
    assert max(shares) > 0.45 and min(shares) < 0.15  # the share varies between samples
    with pytest.raises(ValueError, match="value_mask_strategy"):
        DataCollatorForMaskedEventModeling(tokenizer, value_mask_probability=0.3, value_mask_strategy="past")


def test_multitask_labels_keep_missing_as_nan():
    collate = DataCollatorForEventClassification(make_tokenizer())
    labels = collate([make_feature(3, label=[1.0, None]), make_feature(4, label=[NAN, 2.5])])["labels"]
    assert labels.shape == (2, 2) and labels.dtype == torch.float32
    assert labels[0, 0] == 1.0 and labels[1, 1] == 2.5
    assert torch.isnan(labels[0, 1]) and torch.isnan(labels[1, 0])
    with pytest.raises(ValueError, match="different lengths"):
        collate([make_feature(3, label=[1.0, 0.0]), make_feature(4, label=[1.0])])


def test_time_reconstruction_targets_are_hidden_and_are_log_gaps():
    tokenizer = make_tokenizer()
    features = [make_feature(n, offset=n) for n in (2, 9, 30, 60)] * 5
    for feature in features:  # irregular times: gaps of 0 to 7.5 hours
        gaps = [(k * 7) % 16 / 2 for k in range(len(feature["times"]) - 1)]
        feature["times"] = [0.0, *itertools.accumulate(gaps)]
    plain = DataCollatorForEventClassification(tokenizer)(features)
    masked = DataCollatorForMaskedEventModeling(
        tokenizer, time_mask_probability=0.3, generator=torch.Generator().manual_seed(0)
    )(features)
    targets = ~torch.isnan(masked["time_labels"])  # (B, L)
    special = torch.isin(plain["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert targets.any() and not (targets & special).any()  # never CLS
    assert not (targets & (plain["attention_mask"] == 0)).any()  # never padding
    # the time and the age of a target never reach the model; everything else is the original
    assert torch.isnan(masked["times"][targets]).all() and torch.isnan(masked["ages"][targets]).all()
    assert torch.equal(masked["times"][~targets], plain["times"][~targets])
    assert torch.equal(masked["ages"][~targets], plain["ages"][~targets])
    # the target is log1p of the hours since the previous position's original time
    gaps = torch.log1p(plain["times"][:, 1:] - plain["times"][:, :-1])
    torch.testing.assert_close(masked["time_labels"][:, 1:][targets[:, 1:]], gaps[targets[:, 1:]])
    eligible = (plain["attention_mask"] == 1) & ~special
    assert 0.2 < targets.sum().item() / eligible.sum().item() < 0.4
    # time masking draws after the code masking: the code masks are those of a collator without it
    codes_only = DataCollatorForMaskedEventModeling(tokenizer, generator=torch.Generator().manual_seed(0))(
        features
    )
    assert torch.equal(codes_only["labels"], masked["labels"]) and "time_labels" not in codes_only


def test_teacher_inputs_are_the_unmasked_batch():
    tokenizer = make_tokenizer()
    features = [make_feature(n, offset=n) for n in (3, 12, 25)]
    plain = DataCollatorForEventClassification(tokenizer)(features)
    batch = DataCollatorForMaskedEventModeling(
        tokenizer,
        mlm_probability=0.5,
        value_mask_probability=0.5,
        time_mask_probability=0.5,
        return_teacher_inputs=True,
    )(features)
    for key in ("input_ids", "values", "times", "ages"):
        assert torch.equal(batch[f"teacher_{key}"].nan_to_num(-7.0), plain[key].nan_to_num(-7.0)), key
    assert not torch.equal(batch["input_ids"], plain["input_ids"])  # the student's view is masked
    with pytest.raises(ValueError, match="time_mask_probability"):
        DataCollatorForMaskedEventModeling(tokenizer, time_mask_probability=1.5)
