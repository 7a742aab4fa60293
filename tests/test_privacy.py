"""Saved folders hold no subject id, real timestamp or rare code (the leak scanner finds them where they are);
held-out subjects do not influence the tokenizer."""

import datetime as dt
import json
from pathlib import Path

import polars as pl
from transformers import TrainingArguments

from ehr_transformer.privacy import scan_folder_for_leaks
from ehr_transformer.training.arguments import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    PretrainingArguments,
)
from ehr_transformer.training.checkpoint import fit_tokenizer
from ehr_transformer.training.finetune import finetune
from ehr_transformer.training.pretrain import pretrain

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def test_scanner_finds_what_it_is_meant_to_find(tmp_path):
    (tmp_path / "card.md").write_text(
        "Trained on subject_id 17 and patients [4, 5]; first event 2012-03-04T05:06:07.\n"
    )
    (tmp_path / "log.json").write_text(json.dumps({"step": 17, "subject_ids": [4, 99], "note": "RARE//X"}))
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01RARE//X\x00 1234567890 \x02")
    (tmp_path / "clean.json").write_text(
        json.dumps({"step": 17, "vocab": {"RARE//XY": 5, "A": 4}, "pad_token_id": 4})
    )
    findings = scan_folder_for_leaks(
        tmp_path,
        subject_ids=[4, 17, 1234567890],
        rare_codes=["RARE//X"],
        timestamps=[dt.datetime(2012, 3, 4, 5, 6)],
    )
    found = {(Path(f.file).name, f.kind, f.value) for f in findings}
    assert ("card.md", "subject_id", "17") in found and ("card.md", "subject_id", "4") in found
    assert ("card.md", "timestamp", "2012-03-04 05:06") in found
    assert ("log.json", "subject_id", "4") in found and ("log.json", "rare_code", "RARE//X") in found
    assert ("blob.bin", "rare_code", "RARE//X") in found and ("blob.bin", "subject_id", "1234567890") in found
    assert not any(name == "clean.json" for name, _, _ in found)  # step 17, token id 4, longer code RARE//XY


def large_id_cohort(tmp_path: Path, n_subjects: int = 120) -> tuple[Path, pl.DataFrame]:
    """The synthetic cohort with 10-digit subject ids (so any occurrence is a leak) and one rare code per
    training subject (seen in one subject only, below min_code_count)."""
    from ehr_transformer.data.synthetic import generate_synthetic_cohort
    from ehr_transformer.data.writer import write_meds

    cohort = generate_synthetic_cohort(n_subjects=n_subjects, seed=1)
    offset = 7_300_000_000
    shift = pl.col("subject_id") + offset
    events = cohort.events.with_columns(shift)
    rare = (
        events.group_by("subject_id")
        .agg(pl.col("time").max())
        .with_columns(
            ("RARE//SUBJECT_" + pl.col("subject_id").cast(pl.String)).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"),
            pl.lit(None, pl.String).alias("text_value"),
        )
    )
    events = pl.concat([events, rare.select(events.columns)])
    labels = {task: df.with_columns(shift) for task, df in cohort.labels.items()}
    meds = write_meds(tmp_path / "meds", events, cohort.splits.with_columns(shift), labels=labels)
    return meds, events


def test_saved_folders_hold_no_identifier_timestamp_or_rare_code(tmp_path):
    meds, events = large_id_cohort(tmp_path)
    min_code_count = 3
    splits = pl.read_parquet(meds / "metadata" / "subject_splits.parquet")
    train_ids = splits.filter(pl.col("split") == "train")["subject_id"]
    train = events.filter(pl.col("subject_id").is_in(train_ids.implode()))
    counts = train.group_by("code").agg(pl.col("subject_id").n_unique().alias("n"))
    rare_codes = counts.filter(pl.col("n") < min_code_count)["code"].to_list()
    assert len(rare_codes) >= len(train_ids)
    args = dict(
        use_cpu=True,
        report_to=[],
        seed=0,
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        eval_strategy="no",
    )
    data = DataArguments(
        data_dir=str(meds), cache_dir=str(tmp_path / "cache"), max_length=32, min_code_count=min_code_count
    )
    pretrain(
        data,
        ModelArguments(**TINY),
        PretrainingArguments(),
        TrainingArguments(str(tmp_path / "out" / "pretrained"), **args),
    )
    labels = meds / "labels" / "in_hospital_mortality.parquet"
    finetune(
        DataArguments(
            data_dir=str(meds), labels=str(labels), cache_dir=str(tmp_path / "cache"), max_length=32
        ),
        ModelArguments(model_name_or_path=str(tmp_path / "out" / "pretrained")),
        FinetuningArguments(),
        TrainingArguments(str(tmp_path / "out" / "finetuned"), **args),
    )
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "event_tokenizer.json", "model.safetensors", "trainer_state.json"} <= names
    assert {
        "prototypes.safetensors",
        "code_frequencies.json",
    } <= names  # the population summary is scanned too
    findings = scan_folder_for_leaks(
        tmp_path / "out",
        subject_ids=train_ids.to_list(),
        rare_codes=rare_codes,
        timestamps=train["time"].drop_nulls(),
    )
    assert findings == []
    # the scan is not blind: a CSV dump of a few training events dropped into the folder is found
    dump = pl.concat([train.head(10), train.filter(pl.col("code").is_in(rare_codes)).head(3)])
    dump.write_csv(tmp_path / "out" / "finetuned" / "debug_events.csv")
    found = scan_folder_for_leaks(
        tmp_path / "out", train_ids.to_list(), rare_codes, train["time"].drop_nulls()
    )
    assert {f.kind for f in found} == {"subject_id", "timestamp", "rare_code"}
    assert {Path(f.file).name for f in found} == {"debug_events.csv"}


def test_held_out_subjects_do_not_influence_the_tokenizer(synthetic_meds, tmp_path):
    from ehr_transformer.data.meds import read_events
    from ehr_transformer.data.splits import read_subject_splits
    from ehr_transformer.data.writer import write_meds

    splits = read_subject_splits(synthetic_meds)
    events = read_events(synthetic_meds)
    held_out = splits.filter(pl.col("split") == "held_out")["subject_id"].implode()
    is_held_out = pl.col("subject_id").is_in(held_out)
    changed = events.with_columns(
        pl.when(is_held_out).then(pl.col("numeric_value") * 100 + 7).otherwise(pl.col("numeric_value")),
        pl.when(is_held_out).then(pl.lit("HELD_OUT_ONLY//CODE")).otherwise(pl.col("code")).alias("code"),
    )
    labels = {
        "in_hospital_mortality": pl.read_parquet(synthetic_meds / "labels" / "in_hospital_mortality.parquet")
    }
    other = write_meds(tmp_path / "changed", changed, splits, labels=labels)
    settings = dict(max_length=64, min_code_count=3)
    original = fit_tokenizer(DataArguments(data_dir=str(synthetic_meds), **settings))
    refit = fit_tokenizer(DataArguments(data_dir=str(other), **settings))
    assert original == refit and original.content_hash() == refit.content_hash()
    # and the test is not vacuous: changing training subjects' events does change it
    train = pl.col("subject_id").is_in(splits.filter(pl.col("split") == "train")["subject_id"].implode())
    changed_train = events.with_columns(
        pl.when(train).then(pl.col("numeric_value") * 2).otherwise(pl.col("numeric_value"))
    )
    changed_meds = write_meds(tmp_path / "t", changed_train, splits)
    assert fit_tokenizer(DataArguments(data_dir=str(changed_meds), **settings)) != original
