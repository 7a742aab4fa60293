"""Untrusted checkpoints are refused before loading: pickle-only folders, absurd or unknown configs, malformed
safetensors headers, sharded indexes leaving the folder (the privacy of saved folders: tests/test_privacy.py)."""

import datetime as dt
import json
import os
import pickle
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import TrainingArguments

from ehr_transformer import EHREventTokenizer, EHRTransformerConfig, EHRTransformerForSequenceClassification
from ehr_transformer.checkpoint_safety import (
    UnsafeCheckpointError,
    check_checkpoint_folder,
    read_safetensors_header,
)
from ehr_transformer.inference import predict
from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
from ehr_transformer.training.finetune import finetune

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
SENTINEL = Path(os.environ.get("TMPDIR", "/tmp")) / "ehr_transformer_pickle_was_executed"


class _Payload:
    """Unpickling this object writes SENTINEL: proof that a pickle was executed."""

    def __reduce__(self):
        return (Path.write_text, (SENTINEL, "executed"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    events = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 2, 3],
            "time": [dt.datetime(2020, 1, 1, h) for h in range(5)],
            "code": ["A", "B", "A", "B", "A"],
            "numeric_value": [1.0, None, 2.0, None, 3.0],
        },
        schema_overrides={"numeric_value": pl.Float32},
    )
    tokenizer = EHREventTokenizer.fit(events, min_code_count=1, max_length=16)
    config = EHRTransformerConfig(
        vocab_size=tokenizer.vocab_size, num_labels=1, problem_type="multi_label_classification", **TINY
    )
    folder = tmp_path_factory.mktemp("checkpoint") / "model"
    EHRTransformerForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_saved_checkpoint_passes(checkpoint):
    checked = check_checkpoint_folder(checkpoint)
    assert [p.name for p in checked.weight_files] == ["model.safetensors"]
    assert checked.config["model_type"] == "ehr_transformer" and checked.n_parameters > 0
    assert "__metadata__" in read_safetensors_header(checkpoint / "model.safetensors")


def test_pickle_only_folder_is_refused_without_unpickling(checkpoint, tmp_path, synthetic_meds):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    SENTINEL.unlink(missing_ok=True)
    for name in ("pytorch_model.bin", "model.pt", "weights.pkl", "last.ckpt"):
        (folder / name).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(UnsafeCheckpointError, match=r"only weights are pickle files .*pytorch_model\.bin"):
        check_checkpoint_folder(folder)
    labels = synthetic_meds / "labels" / "in_hospital_mortality.parquet"
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        predict(folder, synthetic_meds, labels)
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        finetune(
            DataArguments(data_dir=str(synthetic_meds), labels=str(labels)),
            ModelArguments(model_name_or_path=str(folder)),
            FinetuningArguments(),
            TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=1),
        )
    assert not SENTINEL.exists(), "a pickle was executed"


def test_folder_without_weights_is_refused(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpointError, match="no model.safetensors"):
        check_checkpoint_folder(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 10**12}, "'vocab_size'.*sane range"),
        ({"hidden_size": 10**6}, "'hidden_size'.*sane range"),
        ({"num_hidden_layers": 100_000}, "'num_hidden_layers'.*sane range"),
        ({"vocab_size": 9_000_000, "hidden_size": 4096}, "parameters, more than the limit"),
        ({"hidden_size": "128"}, "'hidden_size' is '128' \\(str\\), expected int"),
        ({"hidden_size": 128.5}, "'hidden_size'.*expected int"),
        ({"sparse_prediction": "yes"}, "'sparse_prediction'.*expected bool"),
        ({"vocab_size": True}, "'vocab_size'.*expected int"),
        ({"hidden_dropout_prob": [0.1]}, "'hidden_dropout_prob'.*expected"),
        ({"quantization_config": {"load_in_4bit": True}}, "unknown field.*quantization_config"),
        ({"model_type": "bert"}, "'model_type' is 'bert'"),
        ({"pad_token_id": 10**9}, "'pad_token_id'.*(sane range|not an id)"),
        ({"id2label": {str(i): "x" for i in range(100_001)}}, "'id2label' has 100001 labels"),
    ],
)
def test_absurd_or_unknown_config_is_refused_before_allocation(checkpoint, tmp_path, changes, message):
    folder = copy_of(checkpoint, tmp_path)
    edit_config(folder, **changes)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(UnsafeCheckpointError, match=message):
        check_checkpoint_folder(folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - started < 5 and peak < 200 * 1024**2


@pytest.mark.parametrize(
    "text", ['{"model_type": "ehr_transformer", "hidden_size": NaN}', "not json", "[1, 2]", "\xff\xfe"]
)
def test_malformed_config_json_is_refused(checkpoint, tmp_path, text):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UnsafeCheckpointError, match="config.json"):
        check_checkpoint_folder(folder)


def test_huge_config_file_is_refused_unread(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    with open(folder / "config.json", "wb") as handle:
        handle.truncate(64 * 1024**2)  # sparse: 64 MiB of zeros that must never be read
    with pytest.raises(UnsafeCheckpointError, match="bytes, more than"):
        check_checkpoint_folder(folder)


def test_malformed_safetensors_header_is_refused(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9  # points far beyond the end of the file
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    with pytest.raises(UnsafeCheckpointError, match="data_offsets"):
        check_checkpoint_folder(folder)
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(UnsafeCheckpointError, match="header length"):
        check_checkpoint_folder(folder)


def test_sharded_index_may_not_leave_the_folder(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}})
    )
    with pytest.raises(UnsafeCheckpointError, match="inside the folder"):
        check_checkpoint_folder(folder)


def test_tokenizer_must_match_the_config(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    edit_config(folder, vocab_size=50)
    with pytest.raises(UnsafeCheckpointError, match="'vocab_size' is 50"):
        check_checkpoint_folder(folder)
    folder2 = copy_of(checkpoint, tmp_path / "b")
    data = json.loads((folder2 / "event_tokenizer.json").read_text())
    data["extra"] = 1
    (folder2 / "event_tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UnsafeCheckpointError, match="unknown field"):
        check_checkpoint_folder(folder2)


def test_prototypes_file_is_checked_and_not_taken_for_weights(checkpoint, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    folder = copy_of(checkpoint, tmp_path)
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    good = {"centroids": np.zeros((3, hidden), np.float32), "counts": np.full(3, 10, np.int64)}
    save_file(good, str(folder / "prototypes.safetensors"))
    assert [p.name for p in check_checkpoint_folder(folder).weight_files] == ["model.safetensors"]
    for bad in (
        {**good, "subject_vectors": np.zeros((1, hidden), np.float32)},  # anything but the two aggregates
        {
            "centroids": np.zeros((3, hidden + 1), np.float32),
            "counts": good["counts"],
        },  # not this model's width
    ):
        save_file(bad, str(folder / "prototypes.safetensors"))
        with pytest.raises(UnsafeCheckpointError, match="prototypes.safetensors"):
            check_checkpoint_folder(folder)


def test_trainer_checkpoint_state_pickles_are_tolerated(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    torch.save({"state": {}}, folder / "optimizer.pt")
    assert check_checkpoint_folder(folder).ignored_pickles == []
