"""What the benchmarks share: the metadata every result JSON records, the joining of partial outputs, the shared
real data, and the few-label truths (fine-tuned and frozen-probe AUROCs) that `selection` and
`synthetic_pretraining` measure.

Every model here is trained and scored by the package's own public functions (`pretrain`, `finetune`,
`fit_linear_probe`, `embed_sequences`, `predict_dataset`); this module only chooses their arguments.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Benchmarks never reach the network: set before transformers or huggingface_hub is first imported.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TASK = "in_hospital_mortality"  # the synthetic cohorts' label file the truths fine-tune on


# ------------------------------------------------------------------------------------------------- metadata
def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as `python -m benchmarks.<module> ...` from the repository root;
    `argv` defaults to the process's own arguments."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def machine(threads: int | None = None) -> str:
    """Architecture, CPU count, torch version and (when given) the torch threads a run used."""
    import torch

    described = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    return described + (f", {threads} thread(s)" if threads is not None else "")


def metadata(command: str, started: float, threads: int | None = None) -> dict:
    """The block every result JSON records: `command`, `date`, `wall_s` since `started` (`time.perf_counter()`)
    and `machine`."""
    return {
        "command": command,
        "date": dt.date.today().isoformat(),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(threads),
    }


def quiet(threads: int | None = None) -> None:
    """Sets torch's thread count (when given) and silences transformers' and datasets' progress bars and
    warnings, so that a run's log holds the benchmark's own lines."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------- partial runs
def read_parts(paths: Sequence[str | os.PathLike], varying: str) -> list[dict]:
    """The JSON outputs of one benchmark split over processes. Refuses parts whose `protocol` or `settings` differ
    other than in `varying` (the setting that splits the work), so that a merge never mixes two protocols."""
    parts = [json.loads(Path(p).read_text()) for p in paths]

    def comparable(part: dict) -> tuple:
        return part.get("protocol"), {k: v for k, v in part["settings"].items() if k != varying}

    if any(comparable(p) != comparable(parts[0]) for p in parts):
        raise SystemExit(f"--merge: the settings of {list(map(str, paths))} differ other than in --{varying}")
    return parts


def merged_metadata(parts: list[dict], command: str) -> dict:
    """The metadata of a merged output: `command` (the merge), `timings` summed over the parts, `wall_s` the
    longest part's (they ran in parallel), the latest `date`, the first part's `machine`, and each part's own
    command, timings, wall time, date and machine under `parts`."""
    timings: dict[str, float] = {}
    for part in parts:
        for key, seconds in part.get("timings", {}).items():
            timings[key] = round(timings.get(key, 0.0) + seconds, 1)
    own = ("timings", "wall_s", "date", "machine")
    return {
        "command": command,
        "timings": timings,
        "wall_s": max(p["wall_s"] for p in parts),
        "date": max(p["date"] for p in parts),
        "machine": parts[0]["machine"],
        "parts": [{"command": p.get("command"), **{k: p[k] for k in own if k in p}} for p in parts],
    }


# ------------------------------------------------------------------------------------------------ shared data
def shared_data(name: str) -> Path | None:
    """`../shared/data/<name>` beside the repository (real cohorts, never committed), or None with a message on
    stderr saying where it was looked for, so that a run without it says what it skipped."""
    path = SHARED_DATA / name
    if path.is_dir():
        return path
    print(f"{name}: not found at {path} (real data is never committed); skipped", file=sys.stderr)
    return None


def mean_sd(values: Sequence[float | None]) -> dict:
    """`{"mean", "sd", "n"}` of the finite `values` (None and NaN left out); sd (ddof=1) is None below two values
    and the mean None without any."""
    import numpy as np

    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return {
        "mean": float(arr.mean()) if arr.size else None,
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "n": int(arr.size),
    }


# ------------------------------------------------------------------------------------------ few-label truths
def training_args(
    output_dir: str | os.PathLike, epochs: float, seed: int, batch_size: int, learning_rate: float
):
    """The `transformers.TrainingArguments` of every benchmark pretraining and fine-tune: CPU, no checkpoints,
    evaluation or logging during training, weight decay 0.01 and 10 warm-up steps."""
    from transformers import TrainingArguments

    return TrainingArguments(
        str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.01,
        warmup_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
    )


def evaluation_rows(evaluation: list[tuple[Path, str]], tokenizer, task: str = TASK):
    """The evaluation rows of `evaluation` ((MEDS folder, split) pairs) of label file `labels/<task>.parquet`,
    tokenized by `tokenizer`: the datasets in order, their `(N,)` labels and `(N,)` subject index (one per subject
    and cohort, for the bootstrap)."""
    import numpy as np

    from ehr_transformer.data.dataset import build_labeled_dataset

    datasets_ = [
        build_labeled_dataset(d, d / "labels" / f"{task}.parquet", tokenizer, split=s) for d, s in evaluation
    ]
    labels = np.concatenate([np.asarray(d["labels"], dtype=np.float64).reshape(len(d)) for d in datasets_])
    keys = np.concatenate(
        [np.asarray(d["subject_id"], dtype=np.int64) + i * 10**9 for i, d in enumerate(datasets_)]
    )
    return datasets_, labels, np.unique(keys, return_inverse=True)[1]


def finetuned_predictions(
    checkpoint: Path,
    user: Path,
    evaluation: list[tuple[Path, str]],
    work: Path,
    *,
    fraction: float,
    seeds: int,
    epochs: float,
    learning_rate: float,
    from_probe: bool = False,
):
    """`finetune` of `checkpoint` once per seed on `fraction` of the user's training labels (the package draws the
    rows from the seed, so they are the same for every checkpoint), for `epochs / fraction` epochs (as many steps
    as `epochs` on all labels) at `learning_rate`, batches of 32; every weight trained from the linear probe with
    `from_probe` (LP-FT, `FinetuningArguments.linear_probe_init`). Returns the `(seeds, N)` `predict_dataset`
    probabilities on the evaluation rows (in `evaluation`'s order), their `(N,)` labels and `(N,)` subject index."""
    import shutil

    import numpy as np

    from ehr_transformer.inference import predict_dataset
    from ehr_transformer.tokenization_ehr import EHREventTokenizer
    from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
    from ehr_transformer.training.finetune import finetune

    out = work / "finetuned"
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    datasets_, labels, clusters = evaluation_rows(evaluation, tokenizer)
    data_args = DataArguments(
        data_dir=str(user),
        labels=str(user / "labels" / f"{TASK}.parquet"),
        cache_dir=str(work / "cache"),
    )
    # one mean-pooled network per seed, as these benchmarks' committed results were measured (not the package's
    # ensemble recipe: they compare backbones under one fixed training, seeds averaged here)
    finetuning_args = FinetuningArguments(
        label_fraction=fraction, linear_probe_init=from_probe, ensemble=1, classifier_pooling="mean"
    )
    probabilities = []
    for seed in range(seeds):
        model = finetune(
            data_args,
            ModelArguments(model_name_or_path=str(checkpoint)),
            finetuning_args,
            training_args(out, epochs / fraction, seed, 32, learning_rate),
        )
        probabilities.append(np.concatenate([predict_dataset(model, d, tokenizer) for d in datasets_]))
        shutil.rmtree(out, ignore_errors=True)
    return np.stack(probabilities), labels, clusters


def probe_predictions(
    checkpoint: Path, user: Path, evaluation: list[tuple[Path, str]], fraction: float, seeds: int
):
    """Head-only fine-tuning: `fit_linear_probe` on `checkpoint`'s frozen mean-pooled `embed_sequences` (the
    pooling `finetuned_predictions` trains with) of `fraction` of the user's training rows, once per seed, on the rows a fine-tune
    with that seed gets (`subsample_labels`). The training split is embedded once and shared by every seed.
    Returns what `finetuned_predictions` does."""
    import numpy as np
    from transformers import AutoModel

    from ehr_transformer.data.dataset import build_labeled_dataset, subsample_labels
    from ehr_transformer.inference import embed_sequences
    from ehr_transformer.tokenization_ehr import EHREventTokenizer
    from ehr_transformer.training.linear_probe import fit_linear_probe

    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint, use_safetensors=True).eval()
    model.config.classifier_pooling = "mean"
    train = build_labeled_dataset(user, user / "labels" / f"{TASK}.parquet", tokenizer, split="train")
    train = train.add_column("row", list(range(len(train))))
    train_features = embed_sequences(model, tokenizer, train)  # (N_train, H)
    train_labels = np.asarray(train["labels"], dtype=np.float64).reshape(len(train))
    datasets_, labels, clusters = evaluation_rows(evaluation, tokenizer)
    features = np.concatenate([embed_sequences(model, tokenizer, d) for d in datasets_])  # (N, H)
    probabilities = []
    for seed in range(seeds):
        rows = np.asarray(subsample_labels(train, fraction, seed)["row"])
        probe = fit_linear_probe(train_features[rows], train_labels[rows], seed=seed)
        probabilities.append(probe.predict_proba(features)[:, 1])
    return np.stack(probabilities), labels, clusters
