"""Rank candidate checkpoints for a user's MEDS dataset: code coverage, fit to the population prototypes, LogME.


The selector (:func:`select_checkpoints`, command `ehr-transformer select`) never needs a candidate's training
data. For each candidate it computes, on the user's data (a seeded sample of the chosen split, `train` by
default, so held-out subjects stay untouched):

(a) `coverage`: the share of the user's events (`MEDS_BIRTH` aside, which is never a token) whose code is in
    the candidate's vocabulary. Events with unknown codes reach the model as `[UNK]` without their value.
    `code_coverage`: the same over distinct (subject, code) pairs, so a code counts once per subject however
    often it repeats. Hourly vitals and labs make most events; a missing diagnosis or medication system barely
    moves event coverage although it removes a whole kind of information, which code coverage shows. The
    combined score uses `code_coverage` (chosen on the development zoo of `benchmarks/selection.py --zoo dev`,
    where event coverage ranked a checkpoint without the medication codes above one with them).
(b) `fit`: the user's subjects are embedded by the candidate's backbone as its prototypes were, and each is
    assigned to its nearest prototype. Two things are compared with the pretraining population: how far the
    subjects lie from the prototypes (`distance_ratio`: their mean distance to the nearest prototype over the
    candidate's reference distance; about 1 for data like the pretraining population, larger the further away),
    and whether they fall into the clusters in the same proportions (`occupancy_overlap`: the Bhattacharyya
    coefficient sum_k sqrt(p_k q_k) of the prototypes' shares p_k of the pretraining subjects and the user's
    shares q_k; 1 for the same mix, 0 for disjoint clusters). A population that is near the prototypes but piles
    into a few of them, or spreads evenly but far away, fits less. `fit = occupancy_overlap * min(1, 1 /
    distance_ratio)`.
(c) `transferability` (only with `labels`): LogME (You et al., ICML 2021), the per-sample log marginal
    likelihood (evidence) of the labels under a Bayesian linear model on the frozen pooled features, evidence
    maximised over the prior and noise precisions by the paper's fixed-point updates (`ehr_transformer.selection.logme`).

`combined = code_coverage * fit * exp(transferability - best transferability among the candidates)`: the share
of the data the model can read, times how typical the data look to it, times the geometric-mean per-sample ratio of
label evidence against the best candidate's; each factor is in (0, 1]. A component missing for any candidate (no
prototypes, no labels) is left out of the product for all candidates, so the scores stay comparable. The formula
was fixed before the benchmark (`benchmarks/selection.py`) was run; nothing was tuned on its cases.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..checkpoint_safety import PROTOTYPES_FILE, check_checkpoint_folder
from ..data.labels import _resolve_label_column, read_labels, validate_labels
from ..data.meds import read_events
from ..data.splits import read_subject_splits
from ..hub import resolve_candidate
from ..inference import embed_sequences
from ..loading import ANY_HEAD, load_pretrained
from ..tokenization_ehr import EHREventTokenizer
from ..utils import write_json
from .logme import logme
from .prototypes import BIRTH_CODE, Prototypes

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ selection
@dataclass
class CandidateScore:
    """One candidate's components and combined score (see the module docstring)."""

    candidate: str
    coverage: float
    code_coverage: float
    fit: float | None = None
    distance_ratio: float | None = None
    occupancy_overlap: float | None = None
    transferability: float | None = None
    combined: float = 0.0
    rank: int = 0
    vocabulary_size: int = 0
    hidden_size: int = 0
    notes: list[str] = field(default_factory=list)


def _sample_subjects(
    data_dir: str | os.PathLike, split: str | None, max_subjects: int, seed: int
) -> list[int]:

    splits = read_subject_splits(data_dir)
    if split:
        chosen = splits.filter(pl.col("split") == split)["subject_id"]
        if chosen.len() == 0:
            raise ValueError(
                f"{data_dir}: no subject in split {split!r} (splits present: {sorted(splits['split'].unique())})"
            )
    else:
        chosen = splits["subject_id"]
    ids = np.sort(chosen.unique().to_numpy())
    if len(ids) > max_subjects:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_subjects, replace=False))
    return [int(i) for i in ids]


def _sample_labels(
    labels: str | os.PathLike | pl.DataFrame, subjects: Sequence[int], max_labels: int, seed: int
) -> tuple[pl.DataFrame, str]:
    """Label rows of `subjects` (at most `max_labels`, a seeded sample), with the label column as `labels`."""
    frame = read_labels(labels) if not isinstance(labels, pl.DataFrame) else validate_labels(labels)
    column = _resolve_label_column(frame, None)
    frame = frame.filter(
        pl.col("subject_id").is_in(pl.Series(subjects, dtype=pl.Int64).implode())
        & pl.col(column).is_not_null()
    ).select("subject_id", "prediction_time", pl.col(column).alias("labels"))
    if frame.height > max_labels:
        frame = frame.sample(n=max_labels, seed=seed).sort("subject_id", "prediction_time")
    return frame, column


def score_candidate(
    path: Path,
    events: pl.DataFrame,
    label_rows: pl.DataFrame | None = None,
    label_events: pl.DataFrame | None = None,
    label_column: str = "boolean_value",
    batch_size: int = 64,
    name: str | None = None,
) -> CandidateScore:
    """Coverage, fit and (with labels) LogME of one checkpoint folder on the user's events."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    check_checkpoint_folder(path)  # refuse pickle-only or absurd folders before loading anything
    tokenizer = EHREventTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a pretrained folder's heads are not needed: no "unexpected keys" report
    try:
        model = load_pretrained(AutoModel, path, expected_unexpected=ANY_HEAD, use_safetensors=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    tokens = events.filter(pl.col("code") != BIRTH_CODE)
    if tokens.height == 0:
        raise ValueError("the user's sample holds no event besides MEDS_BIRTH; nothing to score")
    vocabulary = pl.Series(list(tokenizer.vocab), dtype=pl.String).implode()
    pairs = tokens.select("subject_id", "code").unique()
    score = CandidateScore(
        candidate=name or str(path),
        coverage=float(tokens["code"].is_in(vocabulary).mean()),
        code_coverage=float(pairs["code"].is_in(vocabulary).mean()),
        vocabulary_size=tokenizer.vocab_size,
        hidden_size=model.config.hidden_size,
    )
    prototypes = Prototypes.load(path)
    if prototypes is None:
        score.notes.append(f"no {PROTOTYPES_FILE}: fit not computed")
    else:
        if prototypes.centroids.shape[1] != model.config.hidden_size:
            raise ValueError(
                f"{path / PROTOTYPES_FILE}: centroids have width {prototypes.centroids.shape[1]}, the model "
                f"{model.config.hidden_size}"
            )
        model.config.classifier_pooling = prototypes.pooling  # embed exactly as the prototypes were
        embeddings = embed_sequences(model, tokenizer, tokenizer.encode_events(events), batch_size)
        score.distance_ratio, score.occupancy_overlap = prototypes.compare(embeddings)
        score.fit = score.occupancy_overlap * min(1.0, 1.0 / score.distance_ratio)
    if label_rows is not None and label_events is not None:
        encoded = tokenizer.encode_events(label_events, labels=label_rows)
        if encoded.height < 2:
            score.notes.append("fewer than 2 labelled samples with events: transferability not computed")
        else:
            features = embed_sequences(model, tokenizer, encoded, batch_size)
            y = encoded["labels"].to_numpy()
            score.transferability = logme(features, y, regression=label_column == "float_value")
    return score


def combine_scores(scores: list[CandidateScore]) -> tuple[list[CandidateScore], list[str]]:
    """Fill `combined` and `rank` (1 = best); returns the scores best first and the components used."""
    used = ["code_coverage"]
    if scores and all(s.fit is not None for s in scores):
        used.append("fit")
    if scores and all(s.transferability is not None for s in scores):
        used.append("transferability")
    best_transfer = max((s.transferability for s in scores if s.transferability is not None), default=0.0)
    for s in scores:
        combined = s.code_coverage
        if "fit" in used:
            combined *= s.fit
        if "transferability" in used:
            combined *= math.exp(s.transferability - best_transfer)
        s.combined = float(combined)
    ranked = sorted(scores, key=lambda s: (-s.combined, -s.code_coverage, s.candidate))
    for rank, s in enumerate(ranked, 1):
        s.rank = rank
    return ranked, used


def select_checkpoints(
    data_dir: str | os.PathLike,
    candidates: Sequence[str | os.PathLike],
    labels: str | os.PathLike | pl.DataFrame | None = None,
    split: str | None = "train",
    max_subjects: int = 1000,
    max_labels: int = 2000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Rank `candidates` (checkpoint folders or hub ids) for the MEDS dataset `data_dir`: coverage, fit and, with
    `labels`, LogME transferability on a seeded sample of `split` (`None`/"" = all subjects). Returns
    {"ranking": [CandidateScore as dict, best first], "components": [...], "settings": {...}}."""

    if not candidates:
        raise ValueError("no candidate checkpoint given")
    subjects = _sample_subjects(data_dir, split, max_subjects, seed)
    events = read_events(data_dir, subject_ids=subjects)
    label_rows = label_events = None
    label_column = "boolean_value"
    if labels is not None:
        all_subjects = _sample_subjects(data_dir, split, 10**12, seed)
        label_rows, label_column = _sample_labels(labels, all_subjects, max_labels, seed)
        if label_rows.height == 0:
            raise ValueError(f"{labels}: no label row belongs to a subject of split {split!r}")
        label_events = read_events(data_dir, subject_ids=label_rows["subject_id"].unique().to_list())
    scores = []
    for candidate in candidates:
        path = resolve_candidate(candidate)
        logger.info("scoring candidate %s", candidate)
        scores.append(
            score_candidate(
                path, events, label_rows, label_events, label_column, batch_size, name=str(candidate)
            )
        )
    ranked, used = combine_scores(scores)
    return {
        "ranking": [asdict(s) for s in ranked],
        "components": used,
        "settings": {
            "data": str(data_dir),
            "split": split or "all",
            "subjects_sampled": len(subjects),
            "events_scored": int(events.filter(pl.col("code") != BIRTH_CODE).height),
            "label_rows": 0 if label_rows is None else label_rows.height,
            "label_column": label_column if labels is not None else None,
            "seed": seed,
            "formula": "code_coverage * fit * exp(transferability - max transferability), over the components "
            "every candidate has",
        },
    }


def format_ranking(result: dict[str, Any]) -> str:
    """The ranking as a fixed-width table."""

    def cell(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    rows = [("rank", "candidate", "coverage", "codes", "fit", "dist.ratio", "overlap", "LogME", "combined")]
    for s in result["ranking"]:
        rows.append(
            (
                str(s["rank"]),
                s["candidate"],
                cell(s["coverage"]),
                cell(s["code_coverage"]),
                cell(s["fit"]),
                cell(s["distance_ratio"], 2),
                cell(s["occupancy_overlap"]),
                cell(s["transferability"]),
                cell(s["combined"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"combined = product of {', '.join(result['components'])} (see ehr_transformer.selection)")
    return "\n".join(lines)


def write_ranking(result: dict[str, Any], output: str | os.PathLike) -> Path:
    """The ranking as JSON, written atomically."""
    return write_json(output, result)


__all__ = [
    "CandidateScore",
    "score_candidate",
    "combine_scores",
    "select_checkpoints",
    "format_ranking",
    "write_ranking",
]
