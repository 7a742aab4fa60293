import datetime as dt
import json
import math

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehr_transformer.tokenization_ehr import TOKENIZER_FILE, EHREventTokenizer

SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
T0 = dt.datetime(2020, 1, 1)


def hours(h: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=h)


def make_events(rows) -> pl.DataFrame:
    """(subject_id, time or None, code, value or None) rows -> a MEDS frame sorted as in the contract."""
    frame = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    return frame.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)


def cohort(n_subjects: int = 10) -> pl.DataFrame:
    rows = []
    for s in range(n_subjects):
        rows += [
            (s, None, "SEX//F" if s % 2 else "SEX//M", None),
            (s, dt.datetime(1960 + s, 1, 1), "MEDS_BIRTH", None),
            (s, hours(s), "ADMISSION", None),
            (s, hours(s + 1), "LAB//GLUCOSE", 100.0 + 10 * s),
            (s, hours(s + 2), "LAB//GLUCOSE", 110.0 + 10 * s),
        ]
    return make_events(rows)


@pytest.fixture(scope="module")
def tokenizer() -> EHREventTokenizer:
    return EHREventTokenizer.fit(cohort(), min_code_count=2, max_length=16)


def test_special_tokens_and_vocab_order(tokenizer):
    assert tokenizer.convert_ids_to_codes([0, 1, 2, 3]) == ["[PAD]", "[UNK]", "[MASK]", "[CLS]"]
    assert (
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.mask_token_id,
        tokenizer.cls_token_id,
    ) == (0, 1, 2, 3)
    assert tokenizer.all_special_ids == [0, 1, 2, 3]
    # most subjects first, ties by name; MEDS_BIRTH is no token
    assert tokenizer.ids_to_codes[4:] == ["ADMISSION", "LAB//GLUCOSE", "SEX//F", "SEX//M"]
    assert "MEDS_BIRTH" not in tokenizer.vocab
    assert len(tokenizer) == tokenizer.vocab_size == 8
    assert "vocab_size=8" in repr(tokenizer)


def test_min_code_count_counts_subjects_not_events():
    rows = [(0, hours(i), "FREQUENT_IN_ONE", None) for i in range(50)]
    rows += [(s, hours(1), "IN_THREE", None) for s in range(3)]
    tok = EHREventTokenizer.fit(make_events(rows), min_code_count=3)
    assert "IN_THREE" in tok.vocab
    assert "FREQUENT_IN_ONE" not in tok.vocab


def test_fitted_only_on_given_events_and_streams_shards():
    events = cohort(10)
    train = events.filter(pl.col("subject_id") < 6)
    extra = make_events([(s, hours(1), "ONLY_IN_TEST", 1.0) for s in range(6, 10)])
    tok = EHREventTokenizer.fit(train, min_code_count=2)
    assert "ONLY_IN_TEST" not in tok.vocab
    # shards given one by one give the same tokenizer as the whole frame
    shards = [train.filter(pl.col("subject_id") < 3), train.filter(pl.col("subject_id") >= 3)]
    assert EHREventTokenizer.fit(iter(shards), min_code_count=2) == tok
    assert EHREventTokenizer.fit([(None, s) for s in shards], min_code_count=2) == tok
    assert tok.encode(extra.filter(pl.col("subject_id") == 6))["input_ids"] == [
        tok.cls_token_id,
        tok.unk_token_id,
    ]


def test_value_statistics_and_normalisation(tokenizer):
    stats = tokenizer.value_statistics["LAB//GLUCOSE"]
    values = sorted([100.0 + 10 * s for s in range(10)] + [110.0 + 10 * s for s in range(10)])
    assert stats["count"] == 20
    assert stats["median"] == pytest.approx(150.0)
    q1, q3 = np.quantile(values, [0.25, 0.75])  # exact: 20 values fit in the reservoir
    assert stats["scale"] == pytest.approx((q3 - q1) / 1.349)
    assert set(stats) == {"median", "scale", "count"}
    out = tokenizer.normalize_values(
        ["LAB//GLUCOSE", "LAB//GLUCOSE", "ADMISSION", "UNSEEN"], [150.0, 1e9, None, 3.0]
    )
    assert out[0] == pytest.approx(0.0) and out[1] == pytest.approx(10.0)
    assert math.isnan(out[2]) and math.isnan(out[3])


def test_unknown_code_maps_to_unk(tokenizer):
    subject = make_events([(1, hours(0), "NEVER_SEEN", 2.0), (1, hours(1), "ADMISSION", None)])
    encoded = tokenizer.encode(subject)
    assert encoded["input_ids"] == [3, tokenizer.unk_token_id, tokenizer.vocab["ADMISSION"]]
    assert math.isnan(encoded["values"][1])


def test_times_and_ages_on_hand_made_subject(tokenizer):
    birth = dt.datetime(1990, 1, 1)
    subject = make_events(
        [
            (7, None, "SEX//F", None),
            (7, birth, "MEDS_BIRTH", None),
            (7, hours(10), "ADMISSION", None),
            (7, hours(10), "LAB//GLUCOSE", 150.0),
            (7, hours(13.5), "LAB//GLUCOSE", 150.0),
        ]
    )
    encoded = tokenizer.encode(subject)
    v = tokenizer.vocab
    assert encoded["input_ids"] == [3, v["SEX//F"], v["ADMISSION"], v["LAB//GLUCOSE"], v["LAB//GLUCOSE"]]
    assert encoded["times"] == pytest.approx([0.0, 0.0, 0.0, 0.0, 3.5])
    age0 = (hours(10) - birth).total_seconds() / (365.25 * 86400)
    age1 = (hours(13.5) - birth).total_seconds() / (365.25 * 86400)
    assert encoded["ages"] == pytest.approx([age0, age0, age0, age0, age1], rel=1e-6)
    assert math.isnan(encoded["values"][0]) and math.isnan(encoded["values"][1])
    # birth unknown -> ages are 0
    no_birth = tokenizer.encode(subject.filter(pl.col("code") != "MEDS_BIRTH"))
    assert no_birth["ages"] == [0.0] * 5
    # cut at a prediction time: later events are gone
    cut = tokenizer.encode(subject, prediction_time=hours(12))
    assert cut["input_ids"] == [3, v["SEX//F"], v["ADMISSION"], v["LAB//GLUCOSE"]]


def test_truncation_keeps_static_and_latest_events():
    rows = [(1, None, f"STATIC_{i}", None) for i in range(3)]
    rows += [(1, hours(i), f"EVENT_{i:02d}", None) for i in range(20)]
    events = make_events(rows)
    tok = EHREventTokenizer.fit(events, min_code_count=1, max_length=8)
    encoded = tok.encode(events)
    codes = tok.convert_ids_to_codes(encoded["input_ids"])
    assert codes == [
        "[CLS]",
        "STATIC_0",
        "STATIC_1",
        "STATIC_2",
        "EVENT_16",
        "EVENT_17",
        "EVENT_18",
        "EVENT_19",
    ]
    assert encoded["times"] == pytest.approx([0, 0, 0, 0, 0, 1, 2, 3])
    # static events are capped, leaving room for timed events
    capped = EHREventTokenizer(tok.vocab, max_length=8, max_static_events=1, min_code_count=1)
    codes = capped.convert_ids_to_codes(capped.encode(events)["input_ids"])
    assert codes[:2] == ["[CLS]", "STATIC_0"] and codes[-1] == "EVENT_19" and len(codes) == 8


def test_encode_events_with_labels_filters_future(tokenizer):
    events = cohort(3)
    labels = pl.DataFrame(
        {
            "subject_id": [0, 0, 2, 99],
            "prediction_time": [hours(1), hours(100), hours(2.5), hours(1)],
            "boolean_value": [True, False, True, False],
        },
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean},
    )
    out = tokenizer.encode_events(events, labels)
    assert out["subject_id"].to_list() == [0, 0, 2]  # subject 99 has no events
    assert out["length"].to_list() == [4, 5, 3]  # CLS, sex, admission(, glucose(, glucose))
    assert out["boolean_value"].to_list() == [True, False, True]
    whole = tokenizer.encode_events(events)
    assert whole.height == 3 and whole["length"].to_list() == [5, 5, 5]


def test_save_load_round_trip(tmp_path, tokenizer):
    path = tokenizer.save_pretrained(tmp_path / "ckpt")
    assert path.name == TOKENIZER_FILE
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [TOKENIZER_FILE]
    loaded = EHREventTokenizer.from_pretrained(tmp_path / "ckpt")
    assert loaded == tokenizer and loaded.content_hash() == tokenizer.content_hash()
    events = cohort(4)
    assert loaded.encode_events(events).equals(tokenizer.encode_events(events))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.update(extra_field=1), "unknown field"),
        (lambda d: d["vocab"].update({"GAP": 999}), "contiguous"),
        (lambda d: d["vocab"].update({"[PAD]": 4, "ADMISSION": 0}), "special token"),
        (lambda d: d["settings"].update(max_length="512"), "max_length"),
        (lambda d: d["settings"].update(max_length=10**12), "max_length"),
        (lambda d: d.update(vocab=[1, 2]), "vocab must be"),
        (lambda d: d["value_statistics"]["LAB//GLUCOSE"].update(scale=-1.0), "scale"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["value_statistics"]["LAB//GLUCOSE"].update(bin_edges=[100.0]), "fields"),
        (lambda d: d["settings"].update(n_value_bins=10), "settings"),
    ],
)
def test_from_pretrained_refuses_corrupted_files(tmp_path, tokenizer, corrupt, message):
    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    corrupt(data)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        EHREventTokenizer.from_pretrained(tmp_path)


def test_version_1_file_with_value_bin_fields_loads(tmp_path, tokenizer):
    """A file written by an earlier version (version 1) carries per-code `bin_edges` and a `n_value_bins` setting
    that no model reads: it loads, dropping both, and encodes as the tokenizer that wrote it did."""
    tokenizer.save_pretrained(tmp_path)
    data = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    data["version"] = 1
    data["settings"]["n_value_bins"] = 10
    for stats in data["value_statistics"].values():
        stats["bin_edges"] = [stats["median"] - 1.0, stats["median"], stats["median"] + 1.0]
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(data))
    loaded = EHREventTokenizer.from_pretrained(tmp_path)
    assert loaded == tokenizer and loaded.content_hash() == tokenizer.content_hash()
    events = cohort(4)
    assert loaded.encode_events(events).equals(tokenizer.encode_events(events))
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / TOKENIZER_FILE).read_text())
    assert resaved["version"] == 2 and "n_value_bins" not in resaved["settings"]
    assert all(set(stats) == {"median", "scale", "count"} for stats in resaved["value_statistics"].values())


def test_from_pretrained_refuses_absurd_vocab_and_garbage(tmp_path, monkeypatch):
    import ehr_transformer.tokenization_ehr as module

    monkeypatch.setattr(module, "MAX_VOCAB_SIZE", 10)
    vocab = {f"C{i}": i for i in range(20)}
    payload = {
        "format": "ehr_event_tokenizer",
        "version": 2,
        "settings": {},
        "vocab": vocab,
        "value_statistics": {},
    }
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="more than the limit"):
        EHREventTokenizer.from_pretrained(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON"):
        EHREventTokenizer.from_pretrained(tmp_path)


def test_refit_value_statistics_keeps_ids(tokenizer):
    target = cohort(10).with_columns(pl.col("numeric_value") * 2)
    refit = tokenizer.refit_value_statistics(target)
    assert refit.vocab == tokenizer.vocab
    assert refit.value_statistics["LAB//GLUCOSE"]["median"] == pytest.approx(300.0)
    assert tokenizer.value_statistics["LAB//GLUCOSE"]["median"] == pytest.approx(150.0)
    a, b = (
        tokenizer.encode(target.filter(pl.col("subject_id") == 3)),
        refit.encode(target.filter(pl.col("subject_id") == 3)),
    )
    assert a["input_ids"] == b["input_ids"] and a["values"] != b["values"]


def test_reservoir_bounds_sample_and_is_seeded():
    rows = [(s, hours(i), "LAB", float(i)) for s in range(5) for i in range(400)]
    events = make_events(rows)
    a = EHREventTokenizer.fit(events, min_code_count=1, reservoir_size=100, seed=1)
    b = EHREventTokenizer.fit(events, min_code_count=1, reservoir_size=100, seed=1)
    assert a == b
    assert a.value_statistics["LAB"]["count"] == 2000
    assert 100 < a.value_statistics["LAB"]["median"] < 300


codes_strategy = st.sampled_from(["A", "B", "C", "LAB", "MEDS_BIRTH", "NEW"])
event_strategy = st.tuples(
    st.integers(0, 3),
    st.one_of(st.none(), st.integers(0, 10_000)),
    codes_strategy,
    st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, width=32)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_strategy, min_size=1, max_size=60), st.integers(2, 12))
def test_property_encode_is_bounded_and_finite(rows, max_length):
    events = make_events([(s, None if t is None else hours(t), c, v) for s, t, c, v in rows])
    tok = EHREventTokenizer.fit(events, min_code_count=1, max_length=max_length)
    out = tok.encode_events(events)
    expected_subjects = events.filter(pl.col("code") != "MEDS_BIRTH")["subject_id"].n_unique()
    assert out.height == expected_subjects
    for row in out.iter_rows(named=True):
        assert 2 <= row["length"] <= max_length
        assert row["input_ids"][0] == tok.cls_token_id
        assert (
            len(row["input_ids"])
            == len(row["values"])
            == len(row["times"])
            == len(row["ages"])
            == row["length"]
        )
        assert all(math.isfinite(x) for x in row["times"] + row["ages"])
        assert all(x >= 0 for x in row["times"])
        assert all(math.isnan(v) or -10 <= v <= 10 for v in row["values"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_strategy, min_size=1, max_size=60), st.integers(2, 12), st.integers(-10, 10_010))
def test_property_labels_equal_encoding_of_the_past(rows, max_length, cut_hours):
    events = make_events([(s, None if t is None else hours(t), c, v) for s, t, c, v in rows])
    tok = EHREventTokenizer.fit(events, min_code_count=1, max_length=max_length)
    cut = hours(cut_hours)
    subjects = events["subject_id"].unique().sort()
    labels = pl.DataFrame(
        {"subject_id": subjects, "prediction_time": [cut] * len(subjects)},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )
    labelled = tok.encode_events(events, labels)
    past = tok.encode_events(events.filter(pl.col("time").is_null() | (pl.col("time") <= cut)))
    assert labelled["subject_id"].to_list() == past["subject_id"].to_list()
    for a, b in zip(labelled.iter_rows(named=True), past.iter_rows(named=True), strict=True):
        assert a["input_ids"] == b["input_ids"] and a["times"] == b["times"]
        assert np.array_equal(np.array(a["values"]), np.array(b["values"]), equal_nan=True)


# ------------------------------------------------------------------------ calling the tokenizer (transformers style)
def test_call_gives_padded_tensors_that_the_model_takes(tokenizer):
    import torch
    from transformers import BatchEncoding

    from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification

    events = cohort()
    one = events.filter(pl.col("subject_id") == 3)
    encoding = tokenizer(one, prediction_time=hours(4.5), return_tensors="pt")
    assert isinstance(encoding, BatchEncoding)
    assert set(encoding) == {"input_ids", "attention_mask", "values", "times", "ages"}
    assert encoding["input_ids"].shape == (1, 4) and encoding["input_ids"].dtype == torch.long
    # events after the prediction time (the glucose at 5 h) are left out, as in encode()
    assert encoding["input_ids"][0].tolist() == tokenizer.encode(one, hours(4.5))["input_ids"]
    batch = tokenizer(
        [one, events.filter(pl.col("subject_id") == 4)],
        prediction_time=[hours(3.5), None],
        return_tensors="pt",
    )
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].sum(1).tolist() == [3, 5]
    assert torch.isnan(batch["values"][0, 3:]).all()  # padding carries no value, as the collator pads
    config = EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
        problem_type="multi_label_classification",
    )
    logits = EHRTransformerForSequenceClassification(config).eval()(**batch).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    # pandas in, no subject_id column, an ISO string for the time, lists out
    as_lists = tokenizer(one.drop("subject_id").to_pandas(), "2020-01-01T04:30", return_tensors=None)
    assert as_lists["input_ids"] == encoding["input_ids"].tolist()
    assert tokenizer(one, return_tensors="np")["values"].dtype == np.float32


def test_call_refuses_several_subjects_in_one_frame_and_mismatched_times(tokenizer, caplog):
    timed_only = cohort().filter((pl.col("subject_id") == 1) & pl.col("time").is_not_null())
    with caplog.at_level("WARNING", logger="ehr_transformer.tokenization_ehr"):
        assert tokenizer(timed_only, prediction_time=hours(-1))["input_ids"].tolist() == [
            [tokenizer.cls_token_id]
        ]
    assert "hold no event at or before their prediction time" in caplog.text
    with pytest.raises(ValueError, match="holds 10 subjects; pass one frame per subject"):
        tokenizer(cohort())
    with pytest.raises(ValueError, match="2 prediction times for 1 event frames"):
        tokenizer([cohort().filter(pl.col("subject_id") == 1)], prediction_time=[None, None])
    with pytest.raises(TypeError, match="polars or pandas DataFrame"):
        tokenizer({"code": ["A"]})


def test_call_gives_the_logits_of_the_dataset_and_collator_path(synthetic_meds):
    """`model(**tokenizer(events, prediction_time))` equals what `build_labeled_dataset` -> the classification
    collator -> the model gives for the same label rows (the path of `finetune` and `predict`)."""
    import torch

    from ehr_transformer import EHRTransformerConfig, EHRTransformerForSequenceClassification
    from ehr_transformer.data.collators import DataCollatorForEventClassification
    from ehr_transformer.data.dataset import build_labeled_dataset
    from ehr_transformer.data.meds import read_events
    from ehr_transformer.data.splits import iter_split_events

    tok = EHREventTokenizer.fit(iter_split_events(synthetic_meds, "train"), min_code_count=3, max_length=48)
    labels = pl.read_parquet(synthetic_meds / "labels" / "in_hospital_mortality.parquet")
    dataset = build_labeled_dataset(synthetic_meds, labels, tok, split="held_out").select(range(6))
    columns = ["input_ids", "values", "times", "ages"]
    features = [{name: dataset[i][name] for name in columns} for i in range(len(dataset))]
    torch.manual_seed(0)
    config = EHRTransformerConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
        problem_type="multi_label_classification",
    )
    model = EHRTransformerForSequenceClassification(config).eval()
    with torch.no_grad():
        expected = model(**DataCollatorForEventClassification(tok)(features)).logits
        events = read_events(synthetic_meds, subject_ids=sorted(set(dataset["subject_id"])))
        frames = [events.filter(pl.col("subject_id") == s) for s in dataset["subject_id"]]
        encoding = tok(frames, prediction_time=list(dataset["prediction_time"]), return_tensors="pt")
        got = model(**encoding).logits
        one_by_one = torch.cat(
            [
                model(**tok(f, prediction_time=t)).logits
                for f, t in zip(frames, dataset["prediction_time"], strict=True)
            ]
        )
    assert torch.equal(got, expected)
    torch.testing.assert_close(
        one_by_one, expected, rtol=1e-5, atol=1e-6
    )  # unpadded: other kernels' rounding
