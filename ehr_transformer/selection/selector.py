"""Rank candidate checkpoints for a user's MEDS dataset: code coverage, outcome code coverage, fit to the
population prototypes, LogME; each with its reasons in words and its noise.


The selector (:func:`select_checkpoints`, command `ehr-transformer select`) never needs a candidate's training
data. For each candidate it computes, on the user's data (a seeded sample of the chosen split, `train` by
default, so held-out subjects stay untouched):

(a) `coverage`: the share of the user's events (`MEDS_BIRTH` aside, which is never a token) whose code is in
    the candidate's vocabulary. Events with unknown codes reach the model as `[UNK]` without their value.
    `code_coverage`: the same over distinct (subject, code) pairs, so a code counts once per subject however
    often it repeats. Hourly vitals and labs make most events; a missing diagnosis or medication system barely
    moves event coverage although it removes a whole kind of information, which code coverage shows. The
    combined score uses `code_coverage` (chosen on the development hospitals of the earlier selection benchmark,
    `git show 61e0668:benchmarks/selection.py`, where event coverage ranked a checkpoint without the medication
    codes above one with them).
(b) `outcome_code_coverage` (only with `labels`): which codes does the user's outcome depend on, and does the
    candidate know them? On the labelled rows of the label sample (the chosen split only), each code gives one
    feature per row from the events the model would see for that row (static events and events at or before
    its `prediction_time`, as `EHREventTokenizer.encode_events` cuts them; nothing later): its presence and, for
    a code with numeric values, its last value before the prediction time. A feature's association with the
    label is |AUROC - 0.5| for a boolean label (presence: |p1 - p0| / 2; last value: the rank-sum AUROC among the
    rows with a value) and the absolute rank correlation for a numeric label (presence: the point-biserial
    correlation with the label's ranks; last value: the correlation of the value's ranks with the label's ranks
    among the rows with a value). A code's association is the larger of its features'; only codes seen (with a
    value, for the value feature) in at least `OUTCOME_MIN_SUBJECTS` subjects are tested. The threshold is a
    label-permutation test of the maximum (Westfall-Young): the labels are permuted `OUTCOME_PERMUTATIONS` times
    (seeded), the largest association over all tested codes is taken on each permutation, and a code is an
    *outcome code* when its association is above the 95th percentile of these maxima. The chance that any code
    unrelated to the label passes is then at most 5 % (rows are permuted as exchangeable; several label rows of
    one subject make the test somewhat lenient). `outcome_code_coverage` is the association-weighted share of
    the outcome codes in the candidate's vocabulary. If no code passes, the component is left out for all
    candidates (a note in the settings says so). `MEDS_BIRTH` (age) is never a token and is not tested.
(c) `fit`: the user's subjects are embedded by the candidate's backbone as its prototypes were, and each is
    assigned to its nearest prototype. Two things are compared with the pretraining population: how far the
    subjects lie from the prototypes (`distance_ratio`: their mean distance to the nearest prototype over the
    candidate's reference distance; about 1 for data like the pretraining population, larger the further away),
    and whether they fall into the clusters in the same proportions (`occupancy_overlap`: the Bhattacharyya
    coefficient sum_k sqrt(p_k q_k) of the prototypes' shares p_k of the pretraining subjects and the user's
    shares q_k; 1 for the same mix, 0 for disjoint clusters). A population that is near the prototypes but piles
    into a few of them, or spreads evenly but far away, fits less. `fit = occupancy_overlap * min(1, 1 /
    distance_ratio)`.
(d) `transferability` (only with `labels`): LogME (You et al., ICML 2021), the per-sample log marginal
    likelihood (evidence) of the labels under a Bayesian linear model on the frozen pooled features, evidence
    maximised over the prior and noise precisions by the paper's fixed-point updates (`ehr_transformer.selection.logme`).

`combined = code_coverage * outcome_code_coverage * fit * exp(transferability - best transferability among the
candidates)`: the share of the data the model can read, times the (association-weighted) share of what predicts
the outcome that it can read, times how typical the data look to it, times the geometric-mean per-sample ratio
of label evidence against the best candidate's; each factor is in (0, 1]. Outcome code coverage is one more
factor, as code coverage is: the simplest rule, and a candidate that lacks outcome codes carrying a share w of
the association loses the factor (1 - w), so it cannot rank above a candidate that knows them unless it is
1 / (1 - w) times better on everything else. A component missing for any candidate (no prototypes, no labels,
no outcome code) is left out of the product for all candidates, so the scores stay comparable. The first formula
(without outcome code coverage) was fixed before the earlier benchmark was run; outcome code coverage and the
noise rule were added before the present one (`benchmarks/selection.py`) scored any user. Nothing was tuned on
either benchmark's users.

Noise: a seeded bootstrap (`n_bootstrap` resamples, 200 by default) draws the sampled subjects, and
independently the labelled subjects (with all their label rows), with replacement; the embeddings are computed
once, and code coverage, fit and LogME are recomputed on each resample, the same resample for every candidate
(the LogME reference is the resampled LogME of the candidate best on the whole sample, not the resample's
maximum, which noise would bias upwards; the comparison between candidates does not depend on it). The outcome codes are held fixed. Each candidate gets `combined_interval`
(the 2.5 and 97.5 percentiles of its combined score); a candidate is *within noise* of the first choice when it
scores at least as high as the first choice in at least `NOISE_SHARE` (10 %) of the resamples (ties count half,
so two copies of one checkpoint are within noise), i.e. the first choice is not ahead with 90 % bootstrap
confidence. `within_noise` lists the first choice and every such candidate; `top_within_noise` says whether the
runner-up is one. `format_ranking` then warns that any of them will do.

Reasons: each candidate gets one or two plain sentences (`reasons`) saying what it reads of the user's data,
which of the codes most tied to the outcome it knows or lacks, how the user's patients compare with its
pretraining population and how its features separate the labels against the best candidate's.
"""

from __future__ import annotations

import logging
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
from .outcome_codes import find_outcome_codes, outcome_codes, outcome_coverage
from .prototypes import BIRTH_CODE, Prototypes, _nearest

logger = logging.getLogger(__name__)

OUTCOME_TOP = 10  # "the codes most tied to the outcome" in the reasons
OUTCOME_LISTED = 50  # outcome codes kept in the settings
NOISE_SHARE = 0.10  # a candidate scoring >= the first choice in this share of resamples is within noise


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
    outcome_code_coverage: float | None = None
    outcome_codes_missing: list[str] = field(default_factory=list)  # outcome codes not in its vocabulary
    combined_interval: list[float] | None = None  # bootstrap 2.5 and 97.5 percentiles of `combined`
    share_at_least_first: float | None = None  # bootstrap share of resamples where it scores >= the first
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Parts:
    """Per-subject pieces of one candidate's score, for the bootstrap (aligned with the selector's subject order
    and label subject order)."""

    known_pairs: np.ndarray  # (S,) distinct codes of each subject that the vocabulary knows
    nearest: np.ndarray | None = None  # (S,) nearest prototype, -1 for a subject without embedding
    distance: np.ndarray | None = None  # (S,)
    prototypes: Prototypes | None = None
    features: np.ndarray | None = None  # (R, H) pooled features of the label rows
    targets: np.ndarray | None = None  # (R,)
    row_subjects: np.ndarray | None = (
        None  # (R,) index of each label row's subject in the label subject order
    )


@dataclass
class _UserSample:
    """What every candidate is scored on: the user's events, optionally labelled rows with their events and the
    outcome codes, and the subject orders that align each candidate's per-subject parts for the bootstrap."""

    events: pl.DataFrame
    label_rows: pl.DataFrame | None = None
    label_events: pl.DataFrame | None = None
    label_column: str = "boolean_value"
    outcome: list[dict[str, Any]] | None = None
    tokens: pl.DataFrame = field(init=False)  # the events a candidate reads: all but MEDS_BIRTH
    pairs: pl.DataFrame = field(init=False)  # distinct (subject_id, code) of the tokens
    subject_order: np.ndarray = field(init=False)  # (S,) subjects with an event besides MEDS_BIRTH, sorted
    label_order: np.ndarray | None = field(init=False)  # (R_s,) subjects of the label rows, sorted

    def __post_init__(self) -> None:
        self.tokens = self.events.filter(pl.col("code") != BIRTH_CODE)
        self.pairs = self.tokens.select("subject_id", "code").unique()
        self.subject_order = np.sort(self.tokens["subject_id"].unique().to_numpy())
        rows = self.label_rows
        self.label_order = None if rows is None else np.sort(rows["subject_id"].unique().to_numpy())


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


# ------------------------------------------------------------------------------------------------ scoring
def _score_candidate(
    path: Path, sample: _UserSample, batch_size: int, name: str | None
) -> tuple[CandidateScore, _Parts]:
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
    events, tokens, pairs, subject_order = sample.events, sample.tokens, sample.pairs, sample.subject_order
    if tokens.height == 0:
        raise ValueError("the user's sample holds no event besides MEDS_BIRTH; nothing to score")
    vocabulary = pl.Series(list(tokenizer.vocab), dtype=pl.String).implode()
    score = CandidateScore(
        candidate=name or str(path),
        coverage=float(tokens["code"].is_in(vocabulary).mean()),
        code_coverage=float(pairs["code"].is_in(vocabulary).mean()),
        vocabulary_size=tokenizer.vocab_size,
        hidden_size=model.config.hidden_size,
    )
    known = (
        pairs.group_by("subject_id")
        .agg(pl.col("code").is_in(vocabulary).sum().alias("known"))
        .sort("subject_id")
    )
    parts = _Parts(known_pairs=np.zeros(len(subject_order)))
    parts.known_pairs[np.searchsorted(subject_order, known["subject_id"].to_numpy())] = known[
        "known"
    ].to_numpy()
    if sample.outcome:
        score.outcome_code_coverage, score.outcome_codes_missing = outcome_coverage(
            sample.outcome, set(tokenizer.vocab)
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
        encoded = tokenizer.encode_events(events)
        embeddings = embed_sequences(model, tokenizer, encoded, batch_size)
        score.distance_ratio, score.occupancy_overlap = prototypes.compare(embeddings)
        score.fit = score.occupancy_overlap * min(1.0, 1.0 / score.distance_ratio)
        nearest, distance = _nearest(embeddings.astype(np.float64), prototypes.centroids.astype(np.float64))
        position = np.searchsorted(subject_order, encoded["subject_id"].to_numpy())
        parts.nearest = np.full(len(subject_order), -1, dtype=np.int64)
        parts.distance = np.zeros(len(subject_order))
        parts.nearest[position], parts.distance[position] = nearest, distance
        parts.prototypes = prototypes
    if sample.label_rows is not None and sample.label_events is not None:
        encoded = tokenizer.encode_events(sample.label_events, labels=sample.label_rows)
        if encoded.height < 2:
            score.notes.append("fewer than 2 labelled samples with events: transferability not computed")
        else:
            features = embed_sequences(model, tokenizer, encoded, batch_size)
            y = encoded["labels"].to_numpy()
            score.transferability = logme(features, y, regression=sample.label_column == "float_value")
            parts.features, parts.targets = features, y
            parts.row_subjects = np.searchsorted(sample.label_order, encoded["subject_id"].to_numpy())
    return score, parts


def score_candidate(
    path: Path,
    events: pl.DataFrame,
    label_rows: pl.DataFrame | None = None,
    label_events: pl.DataFrame | None = None,
    label_column: str = "boolean_value",
    batch_size: int = 64,
    name: str | None = None,
    outcome: list[dict[str, Any]] | None = None,
) -> CandidateScore:
    """Coverage, fit and (with labels) LogME of one checkpoint folder on the user's events; with `outcome` (from
    :func:`find_outcome_codes`) also its outcome code coverage."""
    sample = _UserSample(events, label_rows, label_events, label_column, outcome)
    return _score_candidate(path, sample, batch_size, name)[0]


def _components(scores: list[CandidateScore]) -> list[str]:
    used = ["code_coverage"]
    for component in ("outcome_code_coverage", "fit", "transferability"):
        if scores and all(getattr(s, component) is not None for s in scores):
            used.append(component)
    return used


def _combine(used, code_coverage, outcome_code_coverage, fit, transferability, best_transfer):
    combined = code_coverage
    if "outcome_code_coverage" in used:
        combined = combined * outcome_code_coverage
    if "fit" in used:
        combined = combined * fit
    if "transferability" in used:
        # <= 0 on the full sample (best_transfer is its maximum); a bootstrap resample may exceed it, and a
        # degenerate one by far: capped so that exp cannot overflow into inf * 0 = nan
        combined = combined * np.exp(np.minimum(transferability - best_transfer, 50.0))
    return combined


def combine_scores(scores: list[CandidateScore]) -> tuple[list[CandidateScore], list[str]]:
    """Fill `combined` and `rank` (1 = best); returns the scores best first and the components used."""
    used = _components(scores)
    best_transfer = max((s.transferability for s in scores if s.transferability is not None), default=0.0)
    for s in scores:
        s.combined = float(
            _combine(used, s.code_coverage, s.outcome_code_coverage, s.fit, s.transferability, best_transfer)
        )
    ranked = sorted(scores, key=lambda s: (-s.combined, -s.code_coverage, s.candidate))
    for rank, s in enumerate(ranked, 1):
        s.rank = rank
    return ranked, used


# ------------------------------------------------------------------------------------------------ noise
def _bootstrap(
    scores: list[CandidateScore],
    parts: list[_Parts],
    used: list[str],
    pair_totals: np.ndarray,
    label_subjects: int,
    regression: bool,
    n_bootstrap: int,
    seed: int,
) -> np.ndarray:
    """Combined scores `(n_bootstrap, candidates)` on resamples of the subjects (NaN rows: a resample where
    LogME could not be computed, e.g. one class only); see the module docstring."""
    rng = np.random.default_rng([seed, 1])
    n_subjects = len(pair_totals)
    spans = []
    for p in parts:
        if p.row_subjects is None:
            spans.append(None)
        else:
            everyone = np.arange(label_subjects)
            spans.append(
                (
                    np.searchsorted(p.row_subjects, everyone),
                    np.searchsorted(p.row_subjects, everyone, "right"),
                )
            )
    out = np.full((n_bootstrap, len(scores)), np.nan)
    best_index = int(
        np.argmax([s.transferability if s.transferability is not None else -np.inf for s in scores])
    )
    for b in range(n_bootstrap):
        idx = rng.integers(0, n_subjects, n_subjects)
        label_idx = rng.integers(0, label_subjects, label_subjects) if "transferability" in used else None
        components = np.zeros((4, len(scores)))
        for c, p in enumerate(parts):
            components[0, c] = p.known_pairs[idx].sum() / pair_totals[idx].sum()
            components[1, c] = scores[c].outcome_code_coverage or 0.0
            if "fit" in used:
                nearest = p.nearest[idx]
                valid = nearest >= 0
                shares = np.bincount(nearest[valid], minlength=len(p.prototypes.counts)) / max(valid.sum(), 1)
                reference = p.prototypes.counts / p.prototypes.counts.sum()
                ratio = p.distance[idx][valid].mean() / p.prototypes.reference_distance
                components[2, c] = float(np.sqrt(shares * reference).sum()) * min(1.0, 1.0 / ratio)
            if label_idx is not None:
                start, end = spans[c]
                counts = end[label_idx] - start[label_idx]
                rows = np.repeat(start[label_idx] - np.cumsum(counts) + counts, counts) + np.arange(
                    counts.sum()
                )
                try:
                    components[3, c] = logme(p.features[rows], p.targets[rows], regression=regression)
                except ValueError:
                    components[3, c] = np.nan
        if np.isnan(components).any():
            continue
        best = components[3, best_index]  # not the resample's maximum, which noise biases upwards
        out[b] = _combine(used, components[0], components[1], components[2], components[3], best)
    return out


def _noise(ranked: list[CandidateScore], boot: np.ndarray, order: list[str]) -> dict[str, Any]:
    """Intervals, each candidate's share of resamples scoring at least the first choice (ties half), and the
    within-noise list."""
    valid = boot[~np.isnan(boot).any(axis=1)]
    column = {name: i for i, name in enumerate(order)}
    noise: dict[str, Any] = {"valid_resamples": len(valid)}
    if not len(valid):
        return {**noise, "within_noise": [], "top_within_noise": False}
    first = valid[:, column[ranked[0].candidate]]
    for s in ranked:
        mine = valid[:, column[s.candidate]]
        s.combined_interval = [float(np.percentile(mine, 2.5)), float(np.percentile(mine, 97.5))]
        if s.rank > 1:
            s.share_at_least_first = float(np.mean(mine > first) + 0.5 * np.mean(mine == first))
    within = [s.candidate for s in ranked[1:] if s.share_at_least_first >= NOISE_SHARE]
    return {
        **noise,
        "within_noise": [ranked[0].candidate, *within] if within else [],
        "top_within_noise": len(ranked) > 1 and ranked[1].share_at_least_first >= NOISE_SHARE,
    }


# ------------------------------------------------------------------------------------------------ reasons
def _codes_list(codes: list[str], limit: int = 3) -> str:
    return ", ".join(codes[:limit]) + (", ..." if len(codes) > limit else "")


def explain_candidate(
    score: CandidateScore,
    outcome: list[dict[str, Any]],
    best_transfer: float | None,
    regression: bool = False,
    compared: bool = True,
) -> list[str]:
    """One or two plain sentences on why `score` ranks where it does: what it reads of the user's data, how the
    user's patients compare with its pretraining population, how its features separate the labels; then which
    of the codes most tied to the outcome it knows or lacks."""
    clauses = []
    if score.code_coverage < 0.5:
        clauses.append(
            f"cannot read most of your data: it knows only {score.code_coverage:.0%} of your distinct codes "
            f"({score.coverage:.0%} of your events)"
        )
    else:
        clauses.append(
            f"reads {score.coverage:.0%} of your events and {score.code_coverage:.0%} of your distinct codes"
        )
    if score.fit is None:
        clauses.append(
            "its folder has no prototypes, so how typical your patients look to it is not measured"
        )
    else:
        details = []
        if score.distance_ratio is not None and score.distance_ratio > 1.1:
            details.append(
                f"lie {score.distance_ratio:.1f} times as far from its prototypes as its own patients"
            )
        if score.occupancy_overlap is not None and score.occupancy_overlap < 0.9:
            details.append("fall into its patient groups in other proportions")
        measures = f"fit {score.fit:.2f}" + (
            f", overlap {score.occupancy_overlap:.2f}" if score.occupancy_overlap < 0.9 else ""
        )
        detail = (": they " + " and ".join(details)) if details else ""
        if score.fit >= 0.8:
            clauses.append(f"your patients look like its pretraining population{detail} ({measures})")
        elif score.fit >= 0.5:
            clauses.append(
                f"your patients resemble its pretraining population only in part{detail} ({measures})"
            )
        else:
            clauses.append(f"your patients look unlike its pretraining population{detail} ({measures})")
    if score.transferability is not None and best_transfer is not None:
        verb = "explain your labels" if regression else "separate your labels"
        gap = best_transfer - score.transferability
        if not compared:  # the only candidate: nothing to compare its LogME with
            clauses.append(f"its LogME on your labels is {score.transferability:.3f}")
        elif gap <= 0.0005:
            best = "best of the candidates" if gap <= 0 else "as well as the best candidate's"
            clauses.append(f"its features {verb} {best} (LogME {score.transferability:.3f})")
        elif gap < 0.01:
            clauses.append(
                f"its features {verb} nearly as well as the best candidate's (LogME {gap:.3f} below)"
            )
        elif gap < 0.05:
            clauses.append(
                f"its features {verb} somewhat less well than the best candidate's (LogME {gap:.3f} below)"
            )
        else:
            clauses.append(
                f"its features {verb} clearly less well than the best candidate's (LogME {gap:.3f} below)"
            )
    sentences = [f"{score.candidate} " + "; ".join(clauses) + "."]
    if outcome and score.outcome_code_coverage is not None:
        top = [item["code"] for item in outcome[:OUTCOME_TOP]]
        missing = [code for code in top if code in set(score.outcome_codes_missing)]
        n = len(top)
        what = "the code most tied to the outcome" if n == 1 else f"the {n} codes most tied to the outcome"
        if not missing:
            sentences.append(
                "It knows the code most tied to the outcome."
                if n == 1
                else f"It knows all {n} codes most tied to the outcome."
            )
        elif 2 * len(missing) > n or score.outcome_code_coverage < 0.5:
            lacks = f"all {what[4:]}" if len(missing) == n and n > 1 else f"{len(missing)} of {what}"
            sentences.append(
                f"It lacks {lacks} (e.g. {_codes_list(missing)}): it cannot see what predicts the outcome."
            )
        else:
            sentences.append(
                f"It knows {n - len(missing)} of {what}; it lacks {_codes_list(missing)} "
                f"({1 - score.outcome_code_coverage:.0%} of the outcome codes' association weight)."
            )
    return sentences


# ------------------------------------------------------------------------------------------------ the command
def select_checkpoints(
    data_dir: str | os.PathLike,
    candidates: Sequence[str | os.PathLike],
    labels: str | os.PathLike | pl.DataFrame | None = None,
    split: str | None = "train",
    max_subjects: int = 1000,
    max_labels: int = 2000,
    seed: int = 0,
    batch_size: int = 64,
    n_bootstrap: int = 200,
) -> dict[str, Any]:
    """Rank `candidates` (checkpoint folders or hub ids) for the MEDS dataset `data_dir`: coverage, fit and, with
    `labels`, outcome code coverage and LogME transferability on a seeded sample of `split` (`None`/"" = all
    subjects); `n_bootstrap` resamples (0: none) give each candidate an interval and say which candidates are
    within noise of the first choice. Returns {"ranking": [CandidateScore as dict, best first], "components":
    [...], "within_noise": [...], "top_within_noise": bool, "warning": the within-noise warning or None,
    "settings": {...}}."""

    if not candidates:
        raise ValueError("no candidate checkpoint given")
    subjects = _sample_subjects(data_dir, split, max_subjects, seed)
    events = read_events(data_dir, subject_ids=subjects)
    label_rows = label_events = None
    label_column = "boolean_value"
    outcome: list[dict[str, Any]] = []
    outcome_info: dict[str, Any] = {}
    if labels is not None:
        all_subjects = _sample_subjects(data_dir, split, 10**12, seed)
        label_rows, label_column = _sample_labels(labels, all_subjects, max_labels, seed)
        if label_rows.height == 0:
            raise ValueError(f"{labels}: no label row belongs to a subject of split {split!r}")
        label_events = read_events(data_dir, subject_ids=label_rows["subject_id"].unique().sort().to_list())
        outcome, outcome_info = find_outcome_codes(
            label_rows, label_events, regression=label_column == "float_value", seed=seed
        )
    regression = label_column == "float_value"
    sample = _UserSample(events, label_rows, label_events, label_column, outcome)
    pair_counts = sample.pairs.group_by("subject_id").len().sort("subject_id")
    pair_totals = np.zeros(len(sample.subject_order))
    pair_totals[np.searchsorted(sample.subject_order, pair_counts["subject_id"].to_numpy())] = pair_counts[
        "len"
    ].to_numpy()
    scores, parts = [], []
    for candidate in candidates:
        path = resolve_candidate(candidate)
        logger.info("scoring candidate %s", candidate)
        score, part = _score_candidate(path, sample, batch_size, str(candidate))
        scores.append(score)
        parts.append(part)
    order = [s.candidate for s in scores]
    ranked, used = combine_scores(scores)
    noise: dict[str, Any] = {"valid_resamples": 0, "within_noise": [], "top_within_noise": False}
    if n_bootstrap > 0 and len(set(order)) == len(order):
        from threadpoolctl import threadpool_limits

        # after torch has run, multi-threaded BLAS contends with its thread pool: small LogME fits slow down
        # tenfold; one BLAS thread is faster for the bootstrap's many small eigendecompositions
        with threadpool_limits(limits=1, user_api="blas"):
            boot = _bootstrap(
                scores,
                parts,
                used,
                pair_totals,
                0 if sample.label_order is None else len(sample.label_order),
                regression,
                n_bootstrap,
                seed,
            )
        noise = _noise(ranked, boot, order)
    best_transfer = max((s.transferability for s in scores if s.transferability is not None), default=None)
    for s in ranked:
        s.reasons = explain_candidate(s, outcome, best_transfer, regression, compared=len(scores) > 1)
    settings: dict[str, Any] = {
        "data": str(data_dir),
        "split": split or "all",
        "subjects_sampled": len(subjects),
        "events_scored": int(sample.tokens.height),
        "label_rows": 0 if label_rows is None else label_rows.height,
        "label_column": label_column if labels is not None else None,
        "seed": seed,
        "formula": "code_coverage * outcome_code_coverage * fit * exp(transferability - max transferability), "
        "over the components every candidate has",
        "bootstrap": {
            "resamples": n_bootstrap,
            "valid_resamples": noise["valid_resamples"],
            "rule": f"within noise: scores at least as high as the first choice in >= {NOISE_SHARE:.0%} of the "
            "resamples of the subjects (ties count half)",
        },
    }
    if labels is not None:
        settings["outcome_codes"] = outcome[:OUTCOME_LISTED]
        settings["outcome_codes_found"] = len(outcome)
        settings["outcome_code_rule"] = outcome_info.get("rule")
        settings["outcome_code_threshold"] = outcome_info.get("threshold")
        settings["outcome_codes_tested"] = outcome_info.get("codes_tested", 0)
        if "note" in outcome_info:
            settings["outcome_code_note"] = outcome_info["note"]
    result = {
        "ranking": [asdict(s) for s in ranked],
        "components": used,
        "within_noise": noise["within_noise"],
        "top_within_noise": bool(noise["top_within_noise"]),
        "settings": settings,
    }
    result["warning"] = noise_message(result) if result["top_within_noise"] else None
    return result


def noise_message(result: dict[str, Any]) -> str | None:
    """The sentence on noise under the table: a warning when the runner-up is within noise of the first choice
    (see the module docstring), else how clearly the first choice leads; None without a bootstrap."""
    ranking = result["ranking"]
    if len(ranking) < 2 or ranking[1].get("share_at_least_first") is None:
        return None
    share = ranking[1]["share_at_least_first"]
    if not result.get("top_within_noise"):
        return (
            f"The first choice leads: the runner-up scores at least as high in only {share:.0%} of bootstrap "
            f"resamples of your subjects (within noise: {NOISE_SHARE:.0%} or more)."
        )
    within = set(result.get("within_noise") or [])
    group = [s for s in ranking if s["candidate"] in within]
    smallest = min(group, key=lambda s: (s["hidden_size"], s["rank"]))
    prefer = (
        f"prefer the smallest ({smallest['candidate']}, hidden size {smallest['hidden_size']}), or "
        if len({s["hidden_size"] for s in group}) > 1
        else ""
    )
    return (
        f"Warning: the top {len(group)} candidates are within noise of each other (the runner-up scores at least "
        f"as high as the first choice in {share:.0%} of bootstrap resamples of your subjects): "
        f"{'either' if len(group) == 2 else 'any of them'} will do; {prefer}fine-tune "
        f"{'both' if len(group) == 2 else 'them'} and compare them on your tuning split."
    )


def format_ranking(result: dict[str, Any]) -> str:
    """The ranking as a fixed-width table, then what the outcome depends on, whether the top candidates are
    within noise of each other, and each candidate's reasons in words."""

    def cell(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def interval(value: list[float] | None) -> str:
        return "n/a" if not value else f"{value[0]:.3f}-{value[1]:.3f}"

    rows = [
        (
            "rank",
            "candidate",
            "coverage",
            "codes",
            "outcome",
            "fit",
            "dist.ratio",
            "overlap",
            "LogME",
            "combined",
            "95% interval",
        )
    ]
    for s in result["ranking"]:
        rows.append(
            (
                str(s["rank"]),
                s["candidate"],
                cell(s["coverage"]),
                cell(s["code_coverage"]),
                cell(s.get("outcome_code_coverage")),
                cell(s["fit"]),
                cell(s["distance_ratio"], 2),
                cell(s["occupancy_overlap"]),
                cell(s["transferability"]),
                cell(s["combined"]),
                interval(s.get("combined_interval")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"combined = product of {', '.join(result['components'])} (see ehr_transformer.selection)")
    settings = result.get("settings", {})
    if settings.get("label_column") is not None:
        outcome = settings.get("outcome_codes") or []
        target = "a higher label" if settings["label_column"] == "float_value" else "the outcome"

        def describe(item: dict[str, Any]) -> str:
            if item["feature"] == "last value":
                how = f"{item['direction']} last values with {target}"
            else:
                how = f"present {'more' if item['direction'] == 'higher' else 'less'} often with {target}"
            return f"{item['code']} ({how}; association {item['association']:.2f})"

        if outcome:
            lines.append(
                f"Your outcome depends most on (of {settings.get('outcome_codes_found', len(outcome))} codes tied "
                f"to it beyond chance before the prediction time): {', '.join(describe(i) for i in outcome[:5])}."
            )
        else:
            lines.append(f"Outcome codes: {settings.get('outcome_code_note', 'none found')}.")
    ranking = result["ranking"]
    noise = noise_message(result)
    if noise:
        lines.append(noise)
    if any(s.get("reasons") for s in ranking):
        lines.append("")
        lines.append("Why each candidate ranks where it does:")
        for s in ranking:
            lines.append(f"{s['rank']}. " + " ".join(s.get("reasons") or [s["candidate"]]))
    return "\n".join(lines)


def write_ranking(result: dict[str, Any], output: str | os.PathLike) -> Path:
    """The ranking as JSON, written atomically."""
    return write_json(output, result)


__all__ = [
    "CandidateScore",
    "score_candidate",
    "combine_scores",
    "find_outcome_codes",
    "outcome_codes",
    "explain_candidate",
    "select_checkpoints",
    "format_ranking",
    "noise_message",
    "write_ranking",
]
