"""Write MEDS folders shard by shard and atomically: a reader never sees a half-written dataset."""

from __future__ import annotations

import datetime as _dt
import json
import math
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl

from .labels import validate_labels
from .meds import (
    ETL_NAME,
    ETL_VERSION,
    MEDS_VERSION,
    SPLITS,
    MEDSValidationError,
    validate_codes,
    validate_events,
    validate_subject_splits,
)


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    """Write one parquet file (a single function so tests can make it fail)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)


def _check_task_name(task: str) -> None:
    if not task or "/" in task or "\\" in task or task.startswith("."):
        raise ValueError(f"invalid label task name {task!r}: it becomes labels/<task>.parquet")


class MEDSWriter:
    """Write a MEDS folder shard by shard, atomically.

    Everything goes into ``<output_dir>.tmp-<random>``; :meth:`commit` writes the metadata and renames
    the folder into place (replacing an existing ``output_dir`` only when ``overwrite=True``, and only
    after the new folder is complete). Leaving the ``with`` block without :meth:`commit` (or with an
    exception) removes the temporary folder and leaves ``output_dir`` untouched.

        with MEDSWriter("out/meds") as writer:
            writer.write_shard(events_chunk, split="train")
            writer.write_labels("mortality", labels)
            writer.commit(splits)
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        overwrite: bool = False,
        dataset_name: str = "ehr_transformer_dataset",
        dataset_version: str = "0.1.0",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.dataset_name = dataset_name
        self.dataset_version = dataset_version
        if self.output_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.output_dir} already exists; pass overwrite=True to replace it")
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.output_dir.with_name(f"{self.output_dir.name}.tmp-{secrets.token_hex(4)}")
        self.tmp_dir.mkdir()
        self._shard_counts: dict[str, int] = {}
        self._subject_split: list[pl.DataFrame] = []
        self._codes: set[str] = set()
        self._labels: set[str] = set()
        self._done = False

    def __enter__(self) -> MEDSWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()
            if exc_type is None:
                raise RuntimeError(
                    f"MEDSWriter for {self.output_dir} closed without commit(); nothing written"
                )

    def abort(self) -> None:
        """Remove the temporary folder; ``output_dir`` is left as it was."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True

    def write_shard(self, events: pl.DataFrame, split: str, *, validated: bool = False) -> Path | None:
        """Validate ``events`` and write them as the next shard ``data/<split>/<k>.parquet``.

        Every subject must be complete in this shard (a subject never spans shards). Empty frames write
        nothing. ``validated=True`` skips validation for frames that come out of :func:`validate_events`.
        """
        if not split or "/" in split or "\\" in split or split in (".", ".."):
            raise ValueError(
                f"split {split!r} cannot name a folder data/<split>/ (MEDS allows any other name)"
            )
        if not validated:
            events = validate_events(events, source=f"<events for {split} shard>")
        if events.height == 0:
            return None
        k = self._shard_counts.get(split, 0)
        path = self.tmp_dir / "data" / split / f"{k}.parquet"
        _write_parquet(events, path)
        self._shard_counts[split] = k + 1
        self._subject_split.append(
            events.select(
                pl.col("subject_id").unique(), pl.lit(split).alias("split"), pl.lit(str(path)).alias("shard")
            )
        )
        self._codes.update(events["code"].unique().to_list())
        return path

    def write_labels(self, task: str, labels: pl.DataFrame) -> Path:
        """Validate and write ``labels/<task>.parquet``."""
        _check_task_name(task)
        labels = validate_labels(labels, source=f"<labels {task!r}>")
        path = self.tmp_dir / "labels" / f"{task}.parquet"
        _write_parquet(labels, path)
        self._labels.add(task)
        return path

    def commit(self, splits: pl.DataFrame, codes: pl.DataFrame | None = None) -> Path:
        """Check shard subjects against ``splits``, write the metadata and move the folder into place."""
        if self._done:
            raise RuntimeError("MEDSWriter already committed or aborted")
        try:
            splits = validate_subject_splits(splits, source="<splits>")
            written = (
                pl.concat(self._subject_split)
                if self._subject_split
                else pl.DataFrame(schema={"subject_id": pl.Int64, "split": pl.String, "shard": pl.String})
            )
            spread = written.filter(pl.col("subject_id").is_duplicated())
            if spread.height:
                raise MEDSValidationError(
                    f"{self.output_dir}: column 'subject_id': subject_id {spread['subject_id'][0]} spans "
                    "several shards; a subject's events must be written in one shard"
                )
            check = written.join(splits, on="subject_id", how="left", suffix="_listed")
            missing = check.filter(pl.col("split_listed").is_null())
            if missing.height:
                raise MEDSValidationError(
                    f"{self.output_dir}: column 'split': subject_id {missing['subject_id'][0]} has events but "
                    f"is not in subject_splits ({missing.height} such subject(s))"
                )
            wrong = check.filter(pl.col("split_listed") != pl.col("split"))
            if wrong.height:
                row = wrong.row(0, named=True)
                raise MEDSValidationError(
                    f"{self.output_dir}: column 'split': subject_id {row['subject_id']} is in split "
                    f"{row['split_listed']!r} but its events were written to a {row['split']!r} shard"
                )
            if codes is None:
                codes = pl.DataFrame({"code": sorted(self._codes)}, schema={"code": pl.String})
            codes = validate_codes(codes, source="<codes>")
            extra = sorted(self._codes - set(codes["code"].to_list()))
            if extra:  # every code in the data gets a metadata row
                codes = validate_codes(
                    pl.concat([codes, pl.DataFrame({"code": extra})], how="diagonal_relaxed")
                )
            meta = self.tmp_dir / "metadata"
            _write_parquet(codes, meta / "codes.parquet")
            _write_parquet(splits, meta / "subject_splits.parquet")
            dataset = {
                "dataset_name": self.dataset_name,
                "dataset_version": self.dataset_version,
                "etl_name": ETL_NAME,
                "etl_version": ETL_VERSION,
                "meds_version": MEDS_VERSION,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            }
            (meta / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
            (self.tmp_dir / "data").mkdir(exist_ok=True)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.output_dir

    def _move_into_place(self) -> None:
        target = self.output_dir
        if not target.exists():
            self.tmp_dir.rename(target)
            return
        if not self.overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        old = target.with_name(f"{target.name}.old-{secrets.token_hex(4)}")
        target.rename(old)
        try:
            self.tmp_dir.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)


def write_meds(
    output_dir: str | Path,
    events: pl.DataFrame,
    splits: pl.DataFrame,
    labels: Mapping[str, pl.DataFrame] | None = None,
    codes: pl.DataFrame | None = None,
    n_shards: int = 1,
    dataset_name: str = "ehr_transformer_dataset",
    dataset_version: str = "0.1.0",
    overwrite: bool = False,
) -> Path:
    """Write ``events`` (+ splits, labels, codes) as a MEDS folder, atomically; return ``output_dir``.

    Events are validated first. Shards are split by subject (a subject never spans shards): each split
    gets ``min(n_shards, n_subjects_in_split)`` files ``data/<split>/<k>.parquet`` with contiguous
    ranges of subject ids. Every subject with events must be listed in ``splits``; subjects listed
    without events are allowed. ``codes`` defaults to the distinct codes (null description, no parents).
    If ``output_dir`` exists, raise :class:`FileExistsError` unless ``overwrite=True``; the old folder
    is replaced only once the new one is complete, and a failure leaves no partial folder behind.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    events = validate_events(events, source="<events>")
    splits = validate_subject_splits(splits, source="<splits>")
    labels = {task: validate_labels(df, source=f"<labels {task!r}>") for task, df in (labels or {}).items()}
    for task in labels:
        _check_task_name(task)
    events = events.join(splits, on="subject_id", how="left", maintain_order="left")
    missing = events.filter(pl.col("split").is_null())
    if missing.height:
        raise MEDSValidationError(
            f"<events>: column 'subject_id': subject_id {missing['subject_id'][0]} has events but is not in "
            f"subject_splits ({missing['subject_id'].n_unique()} such subject(s))"
        )
    with MEDSWriter(
        output_dir, overwrite=overwrite, dataset_name=dataset_name, dataset_version=dataset_version
    ) as w:
        present = set(splits["split"].to_list())
        for split in [*(s for s in SPLITS if s in present), *sorted(present - set(SPLITS))]:
            part = events.filter(pl.col("split") == split).drop("split")
            if part.height == 0:
                continue
            ids = part["subject_id"].unique(maintain_order=True).to_numpy()
            k = min(n_shards, len(ids))
            bounds = [ids[b[0]] for b in np.array_split(np.arange(len(ids)), k)]
            shard_index = np.searchsorted(np.asarray(bounds), part["subject_id"].to_numpy(), side="right") - 1
            part = part.with_columns(pl.Series("_shard", shard_index))
            for i in range(k):
                w.write_shard(part.filter(pl.col("_shard") == i).drop("_shard"), split, validated=True)
        for task, df in labels.items():
            w.write_labels(task, df)
        return w.commit(splits, codes)


def shard_count_for(n_subjects: int, subjects_per_shard: int = 10_000) -> int:
    """A reasonable number of shards for ``n_subjects`` (about ``subjects_per_shard`` per shard)."""
    return max(1, math.ceil(n_subjects / subjects_per_shard))


__all__ = ["MEDSWriter", "write_meds", "shard_count_for"]
