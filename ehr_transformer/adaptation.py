"""Adapt a fine-tuned checkpoint to a new population (another hospital, country, era) in up to three steps.

1. refit the tokenizer's value statistics (median and scale per code) on the target's unlabeled training-split
   events, keeping every vocabulary id, so that a "high" lactate means high *for the target's lab*;
2. continued (domain-adaptive) pretraining on the target's unlabeled training-split timelines, starting from the
   checkpoint's backbone, which then goes back under the classifier head;
3. post-hoc temperature scaling: one temperature `T` minimising the negative log-likelihood of the target's
   tuning-split labels given `logits / T`, stored as `config.temperature` (the model divides its binary logits
   by it in eval mode). It never changes the ranking of risks (AUROC); calibration (ECE, Brier) improves.

    >>> result = adapt_checkpoint("finetuned/", "target_meds/", "target_meds/labels/mortality.parquet", "adapted/")
    >>> print(format_adaptation(result))

The adapted folder (weights, config with the temperature, refitted tokenizer, model card) is written to a
temporary folder then renamed, so it appears whole or not at all.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit
from transformers import AutoModelForSequenceClassification, TrainingArguments

from .checkpoint_safety import check_checkpoint_folder
from .data.dataset import build_labeled_dataset, build_pretraining_dataset
from .data.labels import label_sources, read_labels, task_label_matrix
from .data.splits import iter_split_events, read_subject_splits, split_subjects
from .evaluation.metrics import auroc, brier_score, expected_calibration_error
from .inference import predict_logits
from .loading import load_pretrained
from .model_card import data_summary
from .tokenization_ehr import EHREventTokenizer
from .training.arguments import DataArguments, ModelArguments, PretrainingArguments
from .training.checkpoint import save_classifier_checkpoint
from .training.pretrain import pretrain
from .utils import write_json

logger = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)


# ----------------------------------------------------------------------------------------- temperature
def _binary_pairs(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """Flatten logits and 0/1 labels of the same shape ((N,), (N, 1) or (N, T)), dropping NaN labels."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1 and y.ndim == 1:
        z = z[:, 0]
    if z.shape != y.shape:
        raise ValueError(f"logits {z.shape} and labels {y.shape} must have the same shape")
    z, y = z.reshape(-1), y.reshape(-1)
    keep = ~np.isnan(y)
    z, y = z[keep], y[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("temperature scaling needs binary labels (0/1, True/False)")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z, y


def binary_nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of binary `labels` under `sigmoid(logits / temperature)` (NaN labels skipped)."""
    z, y = _binary_pairs(logits, labels)
    z = z / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z)) if z.size else float("nan")


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature `T` (within `bounds`) minimising the mean NLL of binary `labels` given `logits / T`.

    `logits` are the raw (temperature 1) logits, `(N,)`, `(N, 1)` or `(N, T)` with `labels` of the same shape
    (NaN = no label; several binary tasks share one temperature). One-dimensional bounded minimisation over
    `log T` (Brent's method): the NLL is smooth and, in `log T`, unimodal in practice.
    """
    z, y = _binary_pairs(logits, labels)
    if z.size == 0:
        raise ValueError("no labelled rows to fit a temperature on")
    if y.min() == y.max():
        raise ValueError(f"all {y.size} labels are {int(y[0])}: a temperature needs both outcomes")

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))

    result = minimize_scalar(
        nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded", options={"xatol": 1e-5}
    )
    temperature = float(np.exp(result.x))
    if not bounds[0] * 1.01 < temperature < bounds[1] / 1.01:
        logger.warning(
            "the fitted temperature %.3g sits at the bound %s: the logits barely rank this population's outcomes "
            "(a unit or population shift?); refit the value statistics or fine-tune on local labels",
            temperature,
            bounds,
        )
    return temperature


def calibration_metrics(labels, probabilities) -> dict[str, float]:
    """n, prevalence, AUROC, Brier score and expected calibration error (10 equal-width bins) of binary risks."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(y)
    y, p = y[keep].astype(int), p[keep]
    return {
        "n": int(y.size),
        "prevalence": float(y.mean()) if y.size else float("nan"),
        "auroc": float(auroc(y, p)),
        "brier": float(brier_score(y, p)),
        "ece": float(expected_calibration_error(y, p)),
    }


# ------------------------------------------------------------------------------------ continued pretraining
def continue_pretraining(
    model,
    tokenizer: EHREventTokenizer,
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    objectives: str = "code,value",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cpu: bool | None = None,
) -> dict[str, Any]:
    """Domain-adaptive pretraining of a classifier's backbone, in place: `ehr_transformer.training.pretrain`
    continued from the classifier (its backbone; pretraining heads start fresh) on the unlabeled timelines of
    `split` of the MEDS folder `data_dir`, encoded with `tokenizer` (e.g. refitted on the target), with
    `objectives` ("code,value": masked codes and values). The pretrained backbone's weights are then copied back
    into `model.model`; the classification head is untouched. Returns {"subject_count", "steps", "objectives"}
    (counts only: keys never look like identifiers, see `safety.scan_folder_for_leaks`)."""
    n_subjects = len(
        build_pretraining_dataset(data_dir, tokenizer, split, cache_dir)
    )  # cached for pretrain()
    if n_subjects == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no subject with events to pretrain on")
    with tempfile.TemporaryDirectory(prefix="ehr-continued-pretraining-") as scratch:
        source = Path(scratch) / "source"
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        args = TrainingArguments(
            output_dir=str(Path(scratch) / "pretrained"),
            num_train_epochs=num_train_epochs,
            max_steps=max_steps,
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            logging_steps=50,
            seed=seed,
            use_cpu=model.device.type == "cpu" if use_cpu is None else use_cpu,
            disable_tqdm=True,
            train_sampling_strategy="group_by_length",
        )
        # The classifier just saved loads as a pretraining model: its head is unexpected and the pretraining heads
        # are missing, by design. transformers' table of those keys would only alarm the user of `adapt`.
        loading_logger = logging.getLogger("transformers.modeling_utils")
        level = loading_logger.level
        loading_logger.setLevel(logging.ERROR)
        try:
            pretrained = pretrain(
                DataArguments(
                    data_dir=str(data_dir), train_split=split, eval_split=split, cache_dir=cache_dir
                ),
                ModelArguments(
                    model_name_or_path=str(source), attn_implementation=model.config._attn_implementation
                ),
                PretrainingArguments(
                    objectives=objectives, feature_target_layers=min(2, model.config.num_hidden_layers)
                ),
                args,
                tokenizer=tokenizer,
            )
        finally:
            loading_logger.setLevel(level)
    with torch.no_grad():
        model.model.load_state_dict(pretrained.model.state_dict())
    # optimizer steps as the Trainer counts them on one device: ceil(epochs * batches per epoch), or max_steps
    steps = max_steps if max_steps > 0 else math.ceil(num_train_epochs * math.ceil(n_subjects / batch_size))
    return {"subject_count": n_subjects, "steps": steps, "objectives": objectives}


# ------------------------------------------------------------------------------------------- adaptation
@dataclass
class AdaptationResult:
    """What `adapt_checkpoint` did and measured. `before`/`after` map a split name to `calibration_metrics` (per
    task `{task: metrics}` for multitask checkpoints). The temperature is fitted on `tuning_split`, so its `after`
    figures are in-sample for the temperature; `eval_split` (held_out, when labelled) is not used for fitting."""

    output_dir: str
    temperature: float
    tuning_split: str
    eval_split: str | None
    refit_values: bool
    counts: dict[str, int]
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    continued_pretraining: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _SubjectCounter:
    """Passes frames through while counting distinct subjects (for the card: counts only, never ids)."""

    def __init__(self, frames: Iterator[pl.DataFrame]):
        self.frames, self.subjects, self.events = frames, 0, 0

    def __iter__(self) -> Iterator[pl.DataFrame]:
        for frame in self.frames:
            self.subjects += frame["subject_id"].n_unique()
            self.events += frame.height
            yield frame


def _binary_columns(config) -> tuple[list[str], np.ndarray]:
    """Task names and a mask of the outputs temperature scaling applies to; refuses non-binary heads."""
    if config.task_types is not None:
        binary = np.array([t == "binary" for t in config.task_types])
        if not binary.any():
            raise ValueError(
                f"checkpoint has no binary task ({config.task_types}); nothing to temperature-scale"
            )
        return list(config.task_names), binary
    if config.problem_type != "multi_label_classification" or config.num_labels != 1:
        raise ValueError(
            f"adapt expects a binary classifier (num_labels=1, problem_type='multi_label_classification') or a "
            f"multitask one; this checkpoint has num_labels={config.num_labels}, problem_type={config.problem_type!r}"
        )
    return ["label"], np.array([True])


def _labelled_dataset(data_dir, labels, tokenizer, split, config, cache_dir):
    """Dataset of `split` and its labels as `(N, T)` float array aligned with the model's outputs."""
    if config.task_names is None:
        dataset = build_labeled_dataset(data_dir, labels, tokenizer, split, cache_dir=cache_dir)
        return dataset, np.asarray(dataset["labels"], dtype=np.float64).reshape(-1, 1)
    sources = label_sources(labels)
    unknown = [name for name in sources if name not in config.task_names]
    if unknown:
        raise ValueError(
            f"label files {unknown} name no task of this checkpoint ({config.task_names}); name each file after "
            "its task"
        )
    dataset = build_labeled_dataset(data_dir, sources, tokenizer, split, cache_dir=cache_dir)
    return dataset, task_label_matrix(dataset, sources, config.task_names)


def _split_exists(data_dir, split: str | None) -> bool:
    return bool(split) and bool(split_subjects(data_dir, split))


def _has_labels(data_dir, labels, split: str, config) -> bool:
    """Whether any label row of `labels` belongs to a subject of `split` (without tokenizing anything)."""
    sources = label_sources(labels) if config.task_names is not None else {"label": labels}
    subjects = pl.Series(sorted(split_subjects(data_dir, split)), dtype=pl.Int64).implode()
    for source in sources.values():
        frame = source if isinstance(source, pl.DataFrame) else read_labels(source)
        if frame.filter(pl.col("subject_id").is_in(subjects)).height:
            return True
    return False


def _measure(
    model, tokenizer, data_dir, labels, split, names, binary, batch_size, cache_dir
) -> tuple[dict, Any]:
    """Metrics per binary task on `split`, and the raw (temperature 1) logits with their labels."""
    dataset, y = _labelled_dataset(data_dir, labels, tokenizer, split, model.config, cache_dir)
    if not (~np.isnan(y[:, binary])).any():
        raise ValueError(f"{data_dir}: no labelled row of a binary task in split {split!r} ({labels})")
    logits = predict_logits(model, dataset, tokenizer, batch_size).astype(np.float64)  # (N, C)
    temperature = float(model.config.temperature)
    if temperature != 1.0:  # back to raw logits (eval mode divided the binary ones)
        logits[:, binary] = logits[:, binary] * temperature
    metrics = {
        name: calibration_metrics(y[:, i], expit(logits[:, i] / temperature))
        for i, name in enumerate(names)
        if binary[i] and (~np.isnan(y[:, i])).any()
    }
    return (metrics["label"] if names == ["label"] else metrics), (logits[:, binary], y[:, binary])


def adapt_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels,
    output_dir: str | os.PathLike,
    *,
    refit_values: bool = True,
    continued_pretraining_epochs: float = 0.0,
    continued_pretraining_max_steps: int = -1,
    continued_pretraining_learning_rate: float = 1e-4,
    unlabeled_split: str = "train",
    tuning_split: str = "tuning",
    eval_split: str | None = "held_out",
    batch_size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> AdaptationResult:
    """Adapt a fine-tuned checkpoint to the population of the MEDS folder `data_dir` and write the result.

    - `refit_values`: refit the tokenizer's value statistics on the events of `unlabeled_split` (labels unused),
      keeping every vocabulary id (`EHREventTokenizer.refit_value_statistics`);
    - `continued_pretraining_epochs > 0` (or `continued_pretraining_max_steps > 0`): domain-adaptive masked
      event pretraining of the backbone on `unlabeled_split` (`continue_pretraining`);
    - always: temperature scaling on the labelled rows of `tuning_split` (`fit_temperature`).

    `labels` is the target's label file (several, comma-separated or a list, for a multitask checkpoint: files
    named after its tasks; one temperature for all binary tasks). Metrics (AUROC, Brier, ECE) before (the
    checkpoint as given) and after are measured on `tuning_split` and, when it exists and has labels, on
    `eval_split`, which no step fits on. The folder `output_dir` (weights, config with the temperature, tokenizer,
    model card, `adaptation.json`) is written to a temporary folder beside it and renamed into place; an existing
    `output_dir` is replaced only with `overwrite=True`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    if Path(checkpoint).resolve() == output_dir.resolve():
        raise ValueError(f"output_dir {output_dir} must differ from the checkpoint folder")
    if not _split_exists(data_dir, tuning_split):
        raise ValueError(f"{data_dir}: no subject in split {tuning_split!r}, needed to fit the temperature")
    check_checkpoint_folder(checkpoint)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    model = load_pretrained(AutoModelForSequenceClassification, checkpoint, use_safetensors=True)
    continuing = continued_pretraining_epochs > 0 or continued_pretraining_max_steps > 0
    if continuing and model.config.ensemble_size > 1:
        raise ValueError(
            f"{checkpoint} is an ensemble of {model.config.ensemble_size} networks and continued pretraining adapts "
            "one network's backbone: fine-tune with --ensemble 1 to adapt that way, or adapt this one by value "
            "refit and temperature alone"
        )
    names, binary = _binary_columns(model.config)
    splits = [tuning_split] + ([eval_split] if eval_split and _split_exists(data_dir, eval_split) else [])
    if len(splits) > 1 and not _has_labels(data_dir, labels, eval_split, model.config):
        splits = splits[:1]

    def measure_all() -> dict[str, Any]:
        return {
            s: _measure(model, tokenizer, data_dir, labels, s, names, binary, batch_size, cache_dir)[0]
            for s in splits
        }

    before = measure_all()
    counts: dict[str, int] = {}
    if refit_values:
        events = _SubjectCounter(iter_split_events(data_dir, unlabeled_split))
        tokenizer = tokenizer.refit_value_statistics(events)
        counts.update(value_refit_subject_count=events.subjects, value_refit_event_count=events.events)
        logger.info(
            "value statistics refitted on %d target subjects (%s split)", events.subjects, unlabeled_split
        )
    continued = None
    if continuing:
        continued = continue_pretraining(
            model,
            tokenizer,
            data_dir,
            unlabeled_split,
            num_train_epochs=continued_pretraining_epochs or 1.0,
            max_steps=continued_pretraining_max_steps,
            learning_rate=continued_pretraining_learning_rate,
            seed=seed,
            cache_dir=cache_dir,
        )
        counts["continued_pretraining_subject_count"] = continued["subject_count"]
        continued = {
            "epochs": continued_pretraining_epochs if continued_pretraining_max_steps <= 0 else None,
            "learning_rate": continued_pretraining_learning_rate,
            **continued,
        }

    _, (raw_logits, y) = _measure(
        model, tokenizer, data_dir, labels, tuning_split, names, binary, batch_size, cache_dir
    )
    temperature = fit_temperature(raw_logits, y)
    model.config.temperature = temperature
    counts["temperature_rows"] = int((~np.isnan(y)).sum())
    after = measure_all()

    splits_frame = read_subject_splits(data_dir).group_by("split").len()
    subjects = dict(zip(splits_frame["split"].to_list(), splits_frame["len"].to_list(), strict=True))
    result = AdaptationResult(
        output_dir=str(output_dir),
        temperature=temperature,
        tuning_split=tuning_split,
        eval_split=splits[1] if len(splits) > 1 else None,
        refit_values=refit_values,
        counts=counts,
        before=before,
        after=after,
        continued_pretraining=continued,
    )
    if model.config.task_names:
        task = "+".join(model.config.task_names)
    else:
        task = Path(labels).name.split(".")[0] if isinstance(labels, (str, os.PathLike)) else "binary outcome"
    data = data_summary(subjects, counts.get("value_refit_event_count"), tokenizer)
    card = _adaptation_card(checkpoint, result, data, task)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the shared folder private
    try:
        save_classifier_checkpoint(model, tokenizer, staging, card)
        write_json(staging / "adaptation.json", result.to_dict())
        if output_dir.exists():  # overwrite: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _adaptation_card(checkpoint, result: AdaptationResult, data: dict[str, Any], task: str) -> dict[str, Any]:
    """Model-card fields of an adapted checkpoint: what was adapted, on how many target subjects (counts only)."""
    counts, continued = result.counts, result.continued_pretraining
    refit = (
        f"refitted on {counts['value_refit_subject_count']:,} target subjects (unlabeled events)"
        if result.refit_values
        else None
    )
    steps = {
        "adapted from": Path(checkpoint).name,
        "value statistics": f"{refit}, vocabulary ids kept" if refit else "kept from the source checkpoint",
        "continued pretraining": (
            f"{continued['steps']} steps of pretraining ({continued['objectives']}) on "
            f"{continued['subject_count']:,} target subjects"
            if continued
            else "none"
        ),
        "temperature": f"{result.temperature:.4f}, fitted on {counts['temperature_rows']:,} labelled target rows "
        f"({result.tuning_split} split)",
    }
    for when, metrics in (("before", result.before), ("after", result.after)):
        for split, values in metrics.items():
            for name, m in values.items() if "auroc" not in values else [(None, values)]:
                key = f"target {split}{f' {name}' if name else ''} {when}"
                steps[key] = (
                    f"AUROC {m['auroc']:.3f}, Brier {m['brier']:.4f}, ECE {m['ece']:.4f} (n={m['n']:,})"
                )
    return {"kind": "adapted", "task": task, "data": data, "training": steps}


def format_adaptation(result: AdaptationResult) -> str:
    """Readable before/after lines of `adapt_checkpoint`'s result."""
    lines = [f"temperature {result.temperature:.4f} (fitted on the {result.tuning_split} split)"]
    for split in result.before:
        per_task = result.before[split] if "auroc" not in result.before[split] else {"": result.before[split]}
        after = result.after[split] if "auroc" not in result.after[split] else {"": result.after[split]}
        note = (
            " (temperature fitted here: in-sample)"
            if split == result.tuning_split
            else " (not used for fitting)"
        )
        lines.append(f"{split} split{note}")
        for task, b in per_task.items():
            a = after[task]
            label = f"  {task}: " if task else "  "
            lines.append(
                f"{label}before  AUROC {b['auroc']:.3f}  Brier {b['brier']:.4f}  ECE {b['ece']:.4f}  (n={b['n']})"
            )
            lines.append(
                f"{' ' * len(label)}after   AUROC {a['auroc']:.3f}  Brier {a['brier']:.4f}  ECE {a['ece']:.4f}"
            )
    lines.append(f"adapted checkpoint written to {result.output_dir}")
    return "\n".join(lines)


__all__ = [
    "AdaptationResult",
    "adapt_checkpoint",
    "binary_nll",
    "calibration_metrics",
    "continue_pretraining",
    "fit_temperature",
    "format_adaptation",
]
