"""The subject splits of a MEDS folder: reading them, the subjects and events of one split, coverage and counts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from .meds import _collect, _scan_shard, _shard_paths, iter_shards, validate_subject_splits


def read_subject_splits(meds_dir: str | Path) -> pl.DataFrame:
    """``metadata/subject_splits.parquet`` of ``meds_dir`` as ``(subject_id, split)``, validated."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
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


__all__ = [
    "read_subject_splits",
    "split_subjects",
    "iter_split_events",
    "SplitCoverage",
    "check_split_coverage",
    "summarize",
]
