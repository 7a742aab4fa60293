"""Refuse untrusted checkpoint folders before anything in them is loaded.

Checkpoints travel between institutions that must not trust each other's files. `check_checkpoint_folder` is
called before every `from_pretrained` of this package (`predict`, `finetune` from a pretrained folder, `adapt`,
`select`). It refuses, with an `UnsafeCheckpointError` (a `ValueError`): a folder whose only weights are pickle
files (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`: unpickling runs arbitrary code), a `config.json`
that is not an `ehr_transformer` config, has fields this version does not know, values of the wrong JSON type,
non-finite numbers or absurd sizes (vocabulary above 10 million, hidden size above 65,536, more than 256 layers,
more than 2 billion parameters in all), and a safetensors file whose header is malformed or points outside the
file. All of it reads only the small JSON files and the safetensors header, so nothing large is allocated for a
hostile folder. Models are then loaded with `use_safetensors=True` and never with `trust_remote_code`. The
tokenizer file is validated by `EHREventTokenizer.from_pretrained` (size limit, unknown fields, vocabulary limit)
and its vocabulary size must equal the config's. A `prototypes.safetensors` (population prototypes,
`ehr_transformer.selection.prototypes`) is not counted as weights; its header must hold only `centroids`
(K, hidden_size) F32 and `counts` (K,) I64.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .configuration_ehr import EHRTransformerConfig
from .tokenization_ehr import TOKENIZER_FILE, EHREventTokenizer

CONFIG_FILE = "config.json"


SAFE_WEIGHT_SUFFIX = ".safetensors"


SAFETENSORS_INDEX = "model.safetensors.index.json"


# Population prototypes of a pretrained folder (ehr_transformer.selection): a safetensors file that is not weights.
PROTOTYPES_FILE = "prototypes.safetensors"
# Code frequencies of a pretrained folder, written beside the prototypes.
CODE_FREQUENCIES_FILE = "code_frequencies.json"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# Trainer checkpoints hold pickles of optimizer/scheduler/RNG state beside the safetensors weights: those are
# never read by from_pretrained, only by a resume of one's own run.
TRAINER_STATE_PICKLES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt"}


MAX_CONFIG_BYTES = 16 * 1024**2


MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024**2


MAX_PARAMETERS = 2_000_000_000


MAX_INT = 2**31 - 1


SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (5, 10_000_000),  # 4 special tokens and at least one code
    "hidden_size": (1, 65_536),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 1_024),
    "intermediate_size": (1, 262_144),
    "num_time_frequencies": (1, 4_096),
}


MAX_LABELS = 100_000


# Fields a saved config may hold besides the config dataclass's own fields.
# Fields a saved config may hold besides the config dataclass's own fields (transformers or the Trainer set
# some of them, e.g. `use_cache`), with the JSON kinds they may take.
EXTRA_CONFIG_FIELDS: dict[str, str] = {
    "model_type": "str",
    "auto_map": "dict",
    "transformers_version": "str null",
    "_name_or_path": "str",
    "torch_dtype": "str null",
    "num_labels": "int",
    "use_cache": "bool",
    "output_attentions": "bool",
    "bos_token_id": "int null",
    "eos_token_id": "int null list",
    "sep_token_id": "int null",
    # Written by versions before 0.2.0; the config drops them on load (or refuses value bins in use).
    "num_value_bins": "int",
    "value_loss_weight": "int float",
}


SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint folder is refused before loading: pickle-only weights, an unexpected or absurd config, a
    malformed safetensors header. The message names the file and the field."""


@dataclass
class CheckedCheckpoint:
    """What :func:`check_checkpoint_folder` found: the parsed config and the safetensors weight files."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    n_parameters: int
    ignored_pickles: list[Path] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------- checkpoints
def check_checkpoint_folder(
    path: str | os.PathLike, max_parameters: int = MAX_PARAMETERS
) -> CheckedCheckpoint:
    """Check a checkpoint folder before anything is loaded from it; raise :class:`UnsafeCheckpointError`."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder (a local folder is expected)")
    config = _check_config(folder / CONFIG_FILE, max_parameters)
    weights, pickles = _weight_files(folder)
    for weight in weights:
        read_safetensors_header(weight)
    _check_tokenizer(folder, config)
    _check_prototypes(folder, config)
    return CheckedCheckpoint(folder, config, weights, estimate_parameters(config), pickles)


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in folder.iterdir() if p.is_file()]
    pickles = sorted(
        p for p in files if p.suffix.lower() in PICKLE_SUFFIXES and p.name not in TRAINER_STATE_PICKLES
    )
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        data = _read_json(index, MAX_CONFIG_BYTES)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UnsafeCheckpointError(f"{index}: field 'weight_map' must map tensor names to file names")
        weights = []
        for name in sorted(set(weight_map.values())):
            if Path(name).name != name or not name.endswith(SAFE_WEIGHT_SUFFIX):
                raise UnsafeCheckpointError(
                    f"{index}: field 'weight_map' names {name!r}; only .safetensors files inside the folder are allowed"
                )
            if not (folder / name).is_file():
                raise UnsafeCheckpointError(f"{index}: field 'weight_map' names {name!r}, which is missing")
            weights.append(folder / name)
        return weights, pickles
    weights = sorted(p for p in files if p.name.endswith(SAFE_WEIGHT_SUFFIX) and p.name != PROTOTYPES_FILE)
    if not weights:
        if pickles:
            names = ", ".join(p.name for p in pickles)
            raise UnsafeCheckpointError(
                f"{folder}: the only weights are pickle files ({names}). Loading a pickle can run arbitrary code, "
                "so this package loads safetensors weights only (use_safetensors=True). Convert the checkpoint "
                "where its origin is trusted (load it, then model.save_pretrained(folder) writes model.safetensors)."
            )
        raise UnsafeCheckpointError(f"{folder}: no model.safetensors weights found")
    return weights, pickles


def _read_json(path: Path, limit: int) -> Any:
    if not path.is_file():
        raise UnsafeCheckpointError(f"{path}: missing")
    size = path.stat().st_size
    if size > limit:
        raise UnsafeCheckpointError(f"{path}: {size} bytes, more than the {limit} allowed for this file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as error:
        raise UnsafeCheckpointError(f"{path}: not valid JSON ({error})") from error


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _config_fields() -> dict[str, Any]:
    return {f.name: f.type for f in dataclasses.fields(EHRTransformerConfig)}


def _allowed_kinds(annotation: Any) -> set[str]:
    """JSON kinds a dataclass field annotation admits (int, float, bool, str, list, dict, null)."""
    text = annotation if isinstance(annotation, str) else str(annotation)
    kinds = set()
    outer = re.sub(r"\[.*\]", "", text)  # the kinds inside list[...] / dict[...] are the elements'
    for kind in ("int", "float", "bool", "str", "list", "dict"):
        if re.search(rf"\b{kind}\b", outer):
            kinds.add(kind)
    if "Literal" in text:
        kinds.add("str")
    if "None" in text:
        kinds.add("null")
    if "dtype" in text:
        kinds.add("str")
    if "float" in kinds:
        kinds.add("int")
    return kinds


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "dict"


def _check_config(path: Path, max_parameters: int) -> dict[str, Any]:
    config = _read_json(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise UnsafeCheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") != "ehr_transformer":
        raise UnsafeCheckpointError(
            f"{path}: field 'model_type' is {config.get('model_type')!r}, expected 'ehr_transformer'"
        )
    fields = _config_fields()
    unknown = sorted(set(config) - set(fields) - set(EXTRA_CONFIG_FIELDS))
    if unknown:
        raise UnsafeCheckpointError(
            f"{path}: unknown field(s) {unknown}; this version of ehr_transformer reads {sorted(fields)}"
        )
    for name, value in config.items():
        allowed = _allowed_kinds(fields[name]) if name in fields else set(EXTRA_CONFIG_FIELDS[name].split())
        if _kind(value) not in allowed:
            shown = repr(value) if len(repr(value)) < 80 else repr(value)[:80] + "..."
            raise UnsafeCheckpointError(
                f"{path}: field {name!r} is {shown} ({_kind(value)}), expected {' or '.join(sorted(allowed))}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise UnsafeCheckpointError(f"{path}: field {name!r} is not a finite number ({value!r})")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise UnsafeCheckpointError(
                f"{path}: field {name!r} = {value} is outside the sane range [-{MAX_INT}, {MAX_INT}]"
            )
    for name, (low, high) in SIZE_LIMITS.items():
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise UnsafeCheckpointError(
                f"{path}: field {name!r} = {value!r} is outside the sane range [{low}, {high}]"
            )
    for name in ("id2label", "label2id"):
        value = config.get(name)
        if isinstance(value, dict) and len(value) > MAX_LABELS:
            raise UnsafeCheckpointError(
                f"{path}: field {name!r} has {len(value)} labels (limit {MAX_LABELS})"
            )
    vocab_size = config.get("vocab_size", 1024)
    for name in ("pad_token_id", "unk_token_id", "mask_token_id", "cls_token_id"):
        value = config.get(name)
        if isinstance(value, int) and not 0 <= value < vocab_size:
            raise UnsafeCheckpointError(
                f"{path}: field {name!r} = {value} is not an id below vocab_size {vocab_size}"
            )
    n_parameters = estimate_parameters(config)
    if n_parameters > max_parameters:
        raise UnsafeCheckpointError(
            f"{path}: fields vocab_size/hidden_size/num_hidden_layers/intermediate_size describe a model of about "
            f"{n_parameters:,} parameters, more than the limit {max_parameters:,}"
        )
    return config


def estimate_parameters(config: dict[str, Any]) -> int:
    """Rough parameter count of the model a config describes (embeddings + blocks), without building it."""
    vocab = int(config.get("vocab_size", 1024))
    hidden = int(config.get("hidden_size", 128))
    layers = int(config.get("num_hidden_layers", 4))
    inter = int(config.get("intermediate_size", 512))
    return vocab * hidden + layers * (4 * hidden * hidden + 2 * hidden * inter + 9 * hidden)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked: size, dtypes, shapes and offsets inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UnsafeCheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > size:
            raise UnsafeCheckpointError(
                f"{path}: safetensors header length {length} is invalid for a {size}-byte file"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UnsafeCheckpointError(f"{path}: safetensors header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise UnsafeCheckpointError(f"{path}: safetensors header must be a JSON object")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise UnsafeCheckpointError(f"{path}: field '__metadata__' must map strings to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise UnsafeCheckpointError(
                f"{path}: tensor {name!r}: expected fields dtype, shape, data_offsets"
            )
        itemsize = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if itemsize is None:
            raise UnsafeCheckpointError(f"{path}: tensor {name!r}: unknown dtype {entry['dtype']!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise UnsafeCheckpointError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
            or offsets[1] - offsets[0] != math.prod(shape) * itemsize
        ):
            raise UnsafeCheckpointError(
                f"{path}: tensor {name!r}: data_offsets {offsets!r} do not match shape {shape} in a "
                f"{data_size}-byte data section"
            )
    return header


def _check_tokenizer(folder: Path, config: dict[str, Any]) -> None:
    if not (folder / TOKENIZER_FILE).is_file():
        return
    try:
        tokenizer = EHREventTokenizer.from_pretrained(folder)
    except ValueError as error:
        raise UnsafeCheckpointError(str(error)) from error
    if "vocab_size" in config and tokenizer.vocab_size != config["vocab_size"]:
        raise UnsafeCheckpointError(
            f"{folder / TOKENIZER_FILE}: {tokenizer.vocab_size} codes, but {folder / CONFIG_FILE} field "
            f"'vocab_size' is {config['vocab_size']}"
        )


def _check_prototypes(folder: Path, config: dict[str, Any]) -> None:
    """`prototypes.safetensors`, where present: a valid header holding only `centroids` (K, hidden_size) float32
    and `counts` (K,) int64, K at most 4,096."""
    path = folder / PROTOTYPES_FILE
    if not path.is_file():
        return
    header = read_safetensors_header(path)
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if set(tensors) != {"centroids", "counts"}:
        raise UnsafeCheckpointError(
            f"{path}: expected tensors 'centroids' and 'counts', found {sorted(tensors)}"
        )
    centroids, counts = tensors["centroids"], tensors["counts"]
    k = centroids["shape"][0] if len(centroids["shape"]) == 2 else -1
    if (
        centroids["dtype"] != "F32"
        or counts["dtype"] != "I64"
        or not 1 <= k <= 4096
        or centroids["shape"][1] != config.get("hidden_size", centroids["shape"][1])
        or counts["shape"] != [k]
    ):
        raise UnsafeCheckpointError(
            f"{path}: 'centroids' {centroids['dtype']} {centroids['shape']} and 'counts' {counts['dtype']} "
            f"{counts['shape']} are not (K <= 4096, hidden_size) F32 and (K,) I64"
        )


__all__ = [
    "UnsafeCheckpointError",
    "CheckedCheckpoint",
    "check_checkpoint_folder",
    "estimate_parameters",
    "read_safetensors_header",
]
