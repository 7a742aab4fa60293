"""The subject splits of a MEDS folder: reading them, the subjects and events of one split, coverage and counts, and
cross-validation folds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .meds import _collect, _scan_shard, _shard_paths, iter_shards, validate_subject_splits


def read_subject_splits(meds_dir: str | Path) -> pl.DataFrame:
    """``metadata/subject_splits.parquet`` of ``meds_dir`` as ``(subject_id, split)``, validated."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    if not Path(meds_dir).is_dir():
        raise FileNotFoundError(f"{meds_dir}: no such folder (expected a MEDS dataset: data/, metadata/)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: subject splits not found (MEDS metadata/subject_splits.parquet)")
    return validate_subject_splits(pl.read_parquet(path), source=str(path))


def split_subjects(data_dir: str | os.PathLike, split: str) -> set[int]:
    splits = read_subject_splits(data_dir)
    return set(splits.filter(pl.col("split") == split)["subject_id"].to_list())


def iter_split_events(data_dir: str | os.PathLike, split: str) -> Iterator[pl.DataFrame]:
    """The events of one split, one validated shard at a time (never the whole dataset in memory)."""
    for _, frame in iter_shards(data_dir, subject_ids=sorted(split_subjects(data_dir, split))):
        yield frame


@dataclass
class SplitCoverage:
    """Subjects of ``subject_splits`` without events, and subjects with events but no split."""

    n_split_subjects: int
    n_event_subjects: int
    without_events: list[int] = field(default_factory=list)
    without_split: list[int] = field(default_factory=list)

    @property
    def n_without_events(self) -> int:
        return len(self.without_events)

    @property
    def n_without_split(self) -> int:
        return len(self.without_split)


def check_split_coverage(meds_dir: str | Path) -> SplitCoverage:
    """Count subjects listed in ``subject_splits`` that have no event (not an error in MEDS) and subjects
    with events missing from ``subject_splits``. Reads only the ``subject_id`` column, shard by shard."""
    splits = read_subject_splits(meds_dir)
    ids = [
        _collect(_scan_shard(p).select("subject_id").unique(), str(p)) for p in _shard_paths(Path(meds_dir))
    ]
    event_ids = pl.concat(ids)["subject_id"].drop_nulls().unique()
    split_ids = splits["subject_id"]
    return SplitCoverage(
        n_split_subjects=split_ids.len(),
        n_event_subjects=event_ids.len(),
        without_events=sorted(split_ids.filter(~split_ids.is_in(event_ids.implode())).to_list()),
        without_split=sorted(event_ids.filter(~event_ids.is_in(split_ids.implode())).to_list()),
    )


def summarize(meds_dir: str | Path) -> dict:
    """Counts of subjects, events and distinct codes, overall and per split, computed shard by shard."""
    splits = read_subject_splits(meds_dir)
    per_subject = []
    codes_by_split: dict[str, set[str]] = {}
    for _path, df in iter_shards(meds_dir):
        counts = df.group_by("subject_id").len("n_events").join(splits, on="subject_id", how="left")
        counts = counts.with_columns(pl.col("split").fill_null("<no split>"))
        per_subject.append(counts)
        codes = df.select("subject_id", "code").join(splits, on="subject_id", how="left")
        codes = codes.with_columns(pl.col("split").fill_null("<no split>"))
        for (split,), group in codes.group_by("split"):
            codes_by_split.setdefault(split, set()).update(group["code"].unique().to_list())
    counts = pl.concat(per_subject).group_by("subject_id", "split").agg(pl.col("n_events").sum())
    out: dict = {
        "n_subjects": counts["subject_id"].n_unique(),
        "n_events": int(counts["n_events"].sum()),
        "n_codes": len(set().union(*codes_by_split.values())) if codes_by_split else 0,
        "n_subjects_without_events": int((~splits["subject_id"].is_in(counts["subject_id"].implode())).sum()),
        "splits": {},
    }
    for split in sorted(codes_by_split):
        sub = counts.filter(pl.col("split") == split)
        out["splits"][split] = {
            "n_subjects": sub.height,
            "n_events": int(sub["n_events"].sum()),
            "n_codes": len(codes_by_split[split]),
        }
    return out


# ------------------------------------------------------------------------------------------ cross-validation
def _label_strata(ids: np.ndarray, labels: pl.DataFrame | None) -> np.ndarray:
    """One stratum per subject: its binary label (the max of its rows) where `labels` holds a complete 0/1
    ``boolean_value`` or ``integer_value``; -1 for subjects without a label; all 0 otherwise."""
    strata = np.zeros(ids.size, dtype=np.int64)
    if labels is None or labels.height == 0:
        return strata
    value = next(
        (
            c
            for c in ("boolean_value", "integer_value")
            if c in labels.columns and labels[c].null_count() == 0
        ),
        None,
    )
    if value is None or not labels[value].cast(pl.Int64).is_in([0, 1]).all():
        return strata
    per_subject = labels.group_by("subject_id").agg(pl.col(value).cast(pl.Int64).max().alias("y"))
    lookup = dict(zip(per_subject["subject_id"].to_list(), per_subject["y"].to_list(), strict=True))
    return np.array([lookup.get(int(i), -1) for i in ids], dtype=np.int64)


def assign_folds(
    subject_ids, labels: pl.DataFrame | None = None, n_folds: int = 5, seed: int = 0
) -> pl.DataFrame:
    """Each subject's cross-validation fold (0 .. n_folds - 1), seeded and stratified by a binary label as
    `cross_validation_splits` describes; fold sizes differ by at most one per stratum. Returns (subject_id Int64,
    fold Int64) sorted by subject_id."""
    if n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {n_folds}")
    ids = np.unique(np.asarray(subject_ids, dtype=np.int64))
    if ids.size < n_folds:
        raise ValueError(f"{ids.size} subjects cannot fill {n_folds} folds")
    strata = _label_strata(ids, labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(ids.size, dtype=np.int64)
    offset = 0
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        fold[members] = (np.arange(members.size) + offset) % n_folds  # continue the round: sizes stay even
        offset += members.size
    return pl.DataFrame({"subject_id": ids, "fold": fold}, schema={"subject_id": pl.Int64, "fold": pl.Int64})


def cross_validation_splits(
    subject_ids,
    labels: pl.DataFrame | None = None,
    n_folds: int = 5,
    fold: int = 0,
    seed: int = 0,
    tuning_fraction: float = 0.2,
) -> pl.DataFrame:
    """The subject splits of fold `fold` of a `n_folds`-fold cross-validation: ``held_out`` = the subjects of
    that fold; ``tuning`` = `tuning_fraction` of the other folds' subjects (for early stopping, choosing and
    calibrating); ``train`` = the rest.

    Folds come from `assign_folds` (the same for every `fold` at one `seed`, so the held-out folds partition the
    subjects). With a binary label frame (``boolean_value``, or ``integer_value`` in {0, 1}; a subject's label is
    the max of its rows) folds and the tuning part are stratified by label; subjects without a label form their
    own stratum. Returns (subject_id Int64, split String) sorted by subject_id, ready for
    ``metadata/subject_splits.parquet``.
    """
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0 .. {n_folds - 1}, got {fold}")
    if not 0.0 <= tuning_fraction < 1.0:
        raise ValueError(f"tuning_fraction must be in [0, 1), got {tuning_fraction}")
    folds = assign_folds(subject_ids, labels, n_folds, seed)
    ids, assigned = folds["subject_id"].to_numpy(), folds["fold"].to_numpy()
    split = np.where(assigned == fold, "held_out", "train").astype(object)
    strata = _label_strata(ids, labels)
    rng = np.random.default_rng([seed, fold])
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero((strata == stratum) & (assigned != fold)))
        split[members[: int(round(tuning_fraction * members.size))]] = "tuning"
    return pl.DataFrame(
        {"subject_id": ids, "split": split.astype(str)}, schema={"subject_id": pl.Int64, "split": pl.String}
    )


__all__ = [
    "assign_folds",
    "cross_validation_splits",
    "read_subject_splits",
    "split_subjects",
    "iter_split_events",
    "SplitCoverage",
    "check_split_coverage",
    "summarize",
]
