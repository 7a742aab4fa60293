"""Tokenized `datasets.Dataset`s from a MEDS folder, built shard by shard.

Both builders read one shard at a time (`meds.iter_shards`), encode it with
`EHREventTokenizer.encode_events` and append the encoded Arrow table to one cache file, which is
then memory-mapped as a `datasets.Dataset`. The cache folder is keyed by a fingerprint of the
tokenizer's content hash, the split, the shard files (path, size, mtime) and (for labels) the label
rows, so a different tokenizer or changed data never hits a stale cache.

Build statistics (subjects/labels seen, kept and dropped, with reasons) are logged, stored as JSON
in `dataset.info.description` and returned by `build_stats(dataset)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter

from ..tokenization_ehr import EHREventTokenizer
from .labels import (
    _read_label_source,
    _resolve_label_column,
    class_index,
    infer_task_type,
    join_task_labels,
    label_classes,
)
from .meds import _collect, _scan_shard, _shard_paths, iter_shards
from .splits import read_subject_splits

logger = logging.getLogger(__name__)

_CACHE_VERSION = "1"
_SEQUENCE_FIELDS = {
    "input_ids": pa.list_(pa.int32()),
    "values": pa.list_(pa.float32()),
    "times": pa.list_(pa.float32()),
    "ages": pa.list_(pa.float32()),
}


def _schema(labelled: bool, label_type: pa.DataType | None = None) -> pa.Schema:
    fields = [pa.field("subject_id", pa.int64())]
    if labelled:
        fields.append(pa.field("prediction_time", pa.timestamp("us")))
    fields += [pa.field(name, dtype) for name, dtype in _SEQUENCE_FIELDS.items()]
    if labelled:
        fields.append(pa.field("labels", label_type))
    fields.append(pa.field("length", pa.int32()))
    return pa.schema(fields)


def _to_arrow(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    return frame.select(schema.names).to_arrow().cast(schema)


def _default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "ehr_transformer"


def _file_signature(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _fingerprint(meds_dir: Path, parts: dict[str, Any]) -> str:
    shards = sorted(p for p in (meds_dir / "data").glob("**/*.parquet") if p.is_file())
    splits_file = meds_dir / "metadata" / "subject_splits.parquet"
    payload = {
        "cache_version": _CACHE_VERSION,
        "polars": pl.__version__,
        "shards": [_file_signature(p) for p in shards],
        "splits": _file_signature(splits_file) if splits_file.is_file() else None,
        **parts,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def build_stats(dataset: datasets.Dataset) -> dict[str, Any]:
    """The build statistics stored in `dataset.info.description` by the builders of this module."""
    try:
        stats = json.loads(dataset.info.description or "")
    except json.JSONDecodeError:
        return {}
    return stats.get("ehr_transformer_build_stats", {}) if isinstance(stats, dict) else {}


def _load_cached(folder: Path) -> datasets.Dataset | None:
    data, stats = folder / "data.arrow", folder / "stats.json"
    if not (data.is_file() and stats.is_file()):
        return None
    dataset = datasets.Dataset.from_file(str(data))
    dataset.info.description = stats.read_text(encoding="utf-8")
    return dataset


def _write_cached(folder: Path, schema: pa.Schema, tables, stats_fn) -> datasets.Dataset:
    """Write the tables yielded by `tables` into `folder/data.arrow` (atomically) and load it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writer = ArrowWriter(schema=schema, path=str(tmp / "data.arrow"))
        try:
            for table in tables:
                if table.num_rows:
                    writer.write_table(table)
            writer.finalize()
        finally:
            writer.close()
        (tmp / "stats.json").write_text(
            json.dumps({"ehr_transformer_build_stats": stats_fn()}), encoding="utf-8"
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dataset = _load_cached(folder)
    assert dataset is not None
    return dataset


class NoUsableRowsError(ValueError):
    """No label row is left to train, evaluate or predict on; the message names the label source and the counts."""


def _all_subjects(meds_dir: Path) -> pl.Series:
    """Every subject with an event in the data (the `subject_id` column of each shard, one shard at a time)."""
    ids = [_collect(_scan_shard(p).select("subject_id").unique(), str(p)) for p in _shard_paths(meds_dir)]
    return pl.concat(ids)["subject_id"].drop_nulls().unique().sort()


def _split_subjects(meds_dir: Path, split: str | None) -> tuple[pl.Series, pl.DataFrame]:
    """The subjects of `split` and the split table. `split` None or "" means every subject with events; then
    `metadata/subject_splits.parquet` is not needed."""
    if not meds_dir.is_dir():
        raise FileNotFoundError(f"{meds_dir}: no such folder (expected a MEDS dataset: data/, metadata/)")
    if not split:
        subjects = _all_subjects(meds_dir)
        return subjects, pl.DataFrame(
            {"subject_id": subjects, "split": pl.Series([""] * subjects.len(), dtype=pl.String)}
        )
    splits_file = meds_dir / "metadata" / "subject_splits.parquet"
    if not splits_file.is_file():
        raise FileNotFoundError(
            f"{splits_file}: not found, so split {split!r} cannot be selected; pass --split '' (split=None) to use "
            "every subject of the data"
        )
    splits = read_subject_splits(meds_dir)
    known = sorted(splits["split"].unique().to_list())
    subjects = splits.filter(pl.col("split") == split)["subject_id"]
    if subjects.len() == 0:
        raise ValueError(f"{meds_dir}: no subject in split {split!r} (splits present: {known})")
    return subjects, splits


class _ShardGuard:
    """Raises when a subject appears in two shards (each subject must live in one shard)."""

    def __init__(self) -> None:
        self.seen = pl.Series("subject_id", [], dtype=pl.Int64)

    def check(self, path: Path, subject_ids: pl.Series) -> None:
        ids = subject_ids.unique()
        repeated = ids.filter(ids.is_in(self.seen.implode()))
        if repeated.len():
            raise ValueError(
                f"{path}: subject_id {repeated[0]} also appears in an earlier shard; a subject's events must "
                "lie in one shard (MEDS convention) for shard-by-shard encoding"
            )
        self.seen = pl.concat([self.seen, ids])


def build_pretraining_dataset(
    meds_dir: str | os.PathLike,
    tokenizer: EHREventTokenizer,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """One row per subject of `split` with at least one event (MEDS_BIRTH aside).

    Columns: subject_id int64, input_ids list<int32>, values/times/ages list<float32>, length int32.
    Built shard by shard into a cached Arrow file under `cache_dir` (default: the `datasets` cache
    folder / "ehr_transformer"). Subjects of the split without events are counted and logged.
    """
    meds_dir = Path(meds_dir)
    subjects, _ = _split_subjects(meds_dir, split)
    schema = _schema(labelled=False)
    key = _fingerprint(
        meds_dir, {"kind": "pretraining", "split": split, "tokenizer": tokenizer.content_hash()}
    )
    folder = Path(cache_dir or _default_cache_dir()) / f"pretraining-{split or 'all'}-{key}"
    cached = _load_cached(folder)
    if cached is not None:
        logger.info("loaded cached pretraining dataset from %s", folder)
        return cached

    counts = {"n_samples": 0}

    def tables():
        guard = _ShardGuard()
        member = subjects.implode()
        for path, shard in iter_shards(meds_dir, subjects):
            shard = shard.filter(pl.col("subject_id").is_in(member))
            if shard.height == 0:
                continue
            guard.check(path, shard["subject_id"])
            encoded = tokenizer.encode_events(shard)
            counts["n_samples"] += encoded.height
            yield _to_arrow(encoded, schema)

    def stats():
        result = {
            "kind": "pretraining",
            "split": split,
            "n_subjects_in_split": subjects.len(),
            "n_samples": counts["n_samples"],
            "n_dropped_no_events": subjects.len() - counts["n_samples"],
        }
        if result["n_dropped_no_events"]:
            logger.warning(
                "split %r: %d of %d subjects have no event to encode and were left out",
                split,
                result["n_dropped_no_events"],
                subjects.len(),
            )
        return result

    return _write_cached(folder, schema, tables(), stats)


def build_labeled_dataset(
    meds_dir: str | os.PathLike,
    labels: pl.DataFrame | str | os.PathLike | Mapping[str, pl.DataFrame | str | os.PathLike],
    tokenizer: EHREventTokenizer,
    split: str | None = "train",
    label_column: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_unlabeled: bool = False,
    source_name: str | None = None,
    task_type: str | None = None,
    classes: list[str] | None = None,
) -> datasets.Dataset:
    """One row per label row of a subject in `split`, built only from events at or before its
    prediction_time (static events included) — never anything later.

    `labels` is a label frame or a path to a MEDS label parquet. The label column (boolean_value,
    integer_value, float_value or categorical_value) is auto-detected unless given and stored as `labels`: float32
    for binary and regression tasks (BCE/MSE), the int64 class index for multi-class tasks (cross entropy), with
    the task type from the column (`infer_task_type`, `task_type` overrides) and the class order `classes`
    (default: the sorted values of the labels, `label_classes`).
    Multitask: `labels` maps task names to label frames/paths (see `join_task_labels`); there is one row per
    (subject_id, prediction_time) of any task and `labels` is a list<float32> of one value per task, in the
    mapping's order, NaN where a task has no label (`build_stats(...)["tasks"]` names them).
    Columns: subject_id, prediction_time, input_ids, values, times, ages, labels, length.
    Dropped label rows are counted by reason (`n_dropped_missing_label`, `n_dropped_subject_not_in_data`,
    `n_dropped_no_events_before_prediction_time`), logged as warnings, and available via
    `build_stats(dataset)`. Label rows of subjects in other splits (`n_labels_other_split`) or without
    a split (`n_labels_subject_without_split`) are filtered out, not dropped. `split` None or "" uses every subject
    with events (no `subject_splits.parquet` needed). Prediction times before the subject's `MEDS_BIRTH` or before
    their first timed event are counted (`n_prediction_time_before_birth`, `n_prediction_time_before_first_event`)
    and logged. `labels` may be a file, a folder of label shards or a glob (`read_labels`).

    `allow_unlabeled=True` (prediction): rows without a label value are kept, `labels` is float32 with NaN where a
    row has no label (integer labels included). When no row is left, raises `NoUsableRowsError` naming the source
    (`source_name`, e.g. the file a label frame was read from) and the counts.
    """
    meds_dir = Path(meds_dir)
    split = split or None
    tasks = task_types = None
    if isinstance(labels, Mapping):  # multitask: one float per task, NaN where missing
        labels, tasks, task_types = join_task_labels(labels)
        source, column = ",".join(tasks), "multitask:" + ",".join(tasks)
        label_expr = pl.concat_list([pl.col(t).cast(pl.Float32).fill_null(float("nan")) for t in tasks])
        label_type, label_dtype = pa.list_(pa.float32()), pl.List(pl.Float32)
    else:
        labels, source = _read_label_source(
            labels, source_name or "<labels>", require_value=not allow_unlabeled
        )
        column = _resolve_label_column(labels, label_column, allow_none=allow_unlabeled)
        if allow_unlabeled:
            if column is None:
                label_expr = pl.lit(None, dtype=pl.Float32)
            elif classes is not None:
                label_expr = class_index(column, classes).cast(pl.Float32)
            else:
                label_expr = pl.col(column).cast(pl.Float32)
            label_expr = label_expr.fill_null(float("nan"))
            label_type, label_dtype = pa.float32(), pl.Float32
        elif infer_task_type(labels, column, task_type, source) == "multiclass":
            classes = classes if classes is not None else label_classes(labels, column)
            label_expr, label_type, label_dtype = class_index(column, classes), pa.int64(), pl.Int64
        else:
            label_expr, label_type, label_dtype = pl.col(column), pa.float32(), pl.Float32
    subjects, splits = _split_subjects(meds_dir, split)

    schema = _schema(labelled=True, label_type=label_type)
    with_split = labels.select("subject_id", "prediction_time", label_expr.alias("labels")).join(
        splits, on="subject_id", how="left", maintain_order="left"
    )
    if split is None:
        # every subject: a label row of a subject without events is "not in data", not "no split"
        with_split = with_split.with_columns(pl.col("split").fill_null(""))
    in_split = with_split.filter(pl.col("split") == (split or "")).drop("split")
    valid = in_split.filter(pl.col("labels").is_not_null()).with_columns(pl.col("labels").cast(label_dtype))
    stats: dict[str, Any] = {
        "kind": "labeled",
        "split": split,
        "label_source": source,
        "label_column": column,
        "n_labels_total": labels.height,
        "n_labels_other_split": 0
        if split is None
        else with_split.filter(pl.col("split").is_not_null() & (pl.col("split") != split)).height,
        "n_labels_subject_without_split": with_split.filter(pl.col("split").is_null()).height,
        "n_labels_in_split": in_split.height,
        "n_dropped_missing_label": in_split.height - valid.height,
    }
    if tasks is not None:
        stats.update(tasks=tasks, task_types=task_types)
    label_hash = int(valid.hash_rows(seed=0).sum()) if valid.height else 0
    key = _fingerprint(
        meds_dir,
        {
            "kind": "labeled",
            "split": split,
            "tokenizer": tokenizer.content_hash(),
            "column": column,
            "label_type": str(label_type),
            "classes": classes,
            "allow_unlabeled": allow_unlabeled,
            "labels": [label_hash, valid.height],
        },
    )
    folder = Path(cache_dir or _default_cache_dir()) / f"labeled-{split or 'all'}-{key}"
    cached = _load_cached(folder)
    if cached is not None:
        logger.info("loaded cached labeled dataset from %s", folder)
        # The cache is keyed by the usable rows only: the counts of this label source's other rows (other splits,
        # no split, no value) are this call's, the build counts (not in data, no event in time) the cache's.
        merged = {**build_stats(cached), **stats}
        merged["n_dropped"] = sum(
            merged.get(name, 0)
            for name in (
                "n_dropped_missing_label",
                "n_dropped_subject_not_in_data",
                "n_dropped_no_events_before_prediction_time",
            )
        )
        cached.info.description = json.dumps({"ehr_transformer_build_stats": merged})
        _warn_drops(merged)  # the drop warnings, also when the rows come from the cache
        _refuse_empty(cached, merged)
        return cached

    counts = {
        "n_labels_with_data": 0,
        "n_samples": 0,
        "n_prediction_time_before_birth": 0,
        "n_prediction_time_before_first_event": 0,
    }

    def tables():
        guard = _ShardGuard()
        label_subjects = valid["subject_id"].unique().implode()
        for path, shard in iter_shards(meds_dir, valid["subject_id"].unique()):
            shard = shard.filter(pl.col("subject_id").is_in(label_subjects))
            if shard.height == 0:
                continue
            guard.check(path, shard["subject_id"])
            shard_labels = valid.filter(pl.col("subject_id").is_in(shard["subject_id"].unique().implode()))
            _count_early_prediction_times(shard, shard_labels, counts)
            encoded = tokenizer.encode_events(shard, labels=shard_labels)
            counts["n_labels_with_data"] += shard_labels.height
            counts["n_samples"] += encoded.height
            yield _to_arrow(encoded, schema)

    def final_stats():
        stats.update(
            n_samples=counts["n_samples"],
            n_dropped_subject_not_in_data=valid.height - counts["n_labels_with_data"],
            n_dropped_no_events_before_prediction_time=counts["n_labels_with_data"] - counts["n_samples"],
            n_prediction_time_before_birth=counts["n_prediction_time_before_birth"],
            n_prediction_time_before_first_event=counts["n_prediction_time_before_first_event"],
        )
        stats["n_dropped"] = (
            stats["n_dropped_missing_label"]
            + stats["n_dropped_subject_not_in_data"]
            + stats["n_dropped_no_events_before_prediction_time"]
        )
        _warn_drops(stats)
        return stats

    dataset = _write_cached(folder, schema, tables(), final_stats)
    _refuse_empty(dataset, build_stats(dataset))
    return dataset


def _count_early_prediction_times(shard: pl.DataFrame, labels: pl.DataFrame, counts: dict[str, int]) -> None:
    """Add to `counts` the label rows whose prediction_time is before the subject's MEDS_BIRTH, or before their
    first timed event other than MEDS_BIRTH (no history to predict from; often an error in the label definition,
    e.g. a time-zone or unit shift)."""
    if labels.height == 0:
        return
    per_subject = shard.group_by("subject_id").agg(
        pl.col("time").filter(pl.col("code") == "MEDS_BIRTH").min().alias("_birth"),
        pl.col("time").filter(pl.col("code") != "MEDS_BIRTH").min().alias("_first"),
    )
    joined = labels.select("subject_id", "prediction_time").join(per_subject, on="subject_id", how="inner")
    counts["n_prediction_time_before_birth"] += joined.filter(
        pl.col("prediction_time") < pl.col("_birth")
    ).height
    counts["n_prediction_time_before_first_event"] += joined.filter(
        pl.col("prediction_time") < pl.col("_first")
    ).height


def _refuse_empty(dataset: datasets.Dataset, stats: dict[str, Any]) -> None:
    """Stop with one sentence naming the label source and the counts when no usable row is left."""
    if len(dataset):
        return
    split = stats.get("split")
    where = f"split {split!r}" if split else "the data"
    raise NoUsableRowsError(
        f"{stats.get('label_source')}: no usable label row is left in {where}: {stats.get('n_labels_total', 0)} rows "
        f"read, {stats.get('n_labels_other_split', 0) + stats.get('n_labels_subject_without_split', 0)} not in "
        f"{where}, {stats.get('n_dropped_missing_label', 0)} without a label value, "
        f"{stats.get('n_dropped_subject_not_in_data', 0)} of subjects not in the data, "
        f"{stats.get('n_dropped_no_events_before_prediction_time', 0)} with no event at or before prediction_time"
    )


def _warn_drops(stats: dict[str, Any]) -> None:
    reasons = {
        "n_dropped_missing_label": "have no label value",
        "n_dropped_subject_not_in_data": "belong to a subject without events in the data",
        "n_dropped_no_events_before_prediction_time": "have no event at or before their prediction_time",
    }
    for name, why in reasons.items():
        if stats.get(name):
            logger.warning(
                "split %r: dropped %d of %d label rows that %s",
                stats.get("split"),
                stats[name],
                stats.get("n_labels_in_split"),
                why,
            )
    if stats.get("n_labels_subject_without_split"):
        logger.warning(
            "%d label rows belong to subjects absent from subject_splits and were ignored",
            stats["n_labels_subject_without_split"],
        )
    early = {
        "n_prediction_time_before_birth": "before the subject's MEDS_BIRTH",
        "n_prediction_time_before_first_event": "before the subject's first timed event",
    }
    for name, why in early.items():
        if stats.get(name):
            logger.warning(
                "split %r: %d of %d label rows have a prediction_time %s (check the label times: a time-zone or "
                "unit shift?)",
                stats.get("split"),
                stats[name],
                stats.get("n_labels_in_split"),
                why,
            )


def subsample_labels(dataset: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
    """The label rows of a seeded random `fraction` of the dataset's subjects (at least one subject), all their
    prediction times kept: the few-label setting of `finetune` (a label share means fewer labelled patients)."""
    if fraction >= 1.0:
        return dataset
    subject_ids = np.asarray(dataset["subject_id"])
    return dataset.select(np.flatnonzero(np.isin(subject_ids, draw_subjects(subject_ids, fraction, seed))))


def draw_subjects(subject_ids, fraction: float, seed: int) -> np.ndarray:
    """The labelled subjects of a label share: a seeded choice of `fraction` (at least one) of the distinct
    `subject_ids`, as `finetune --label_fraction` draws them."""
    subjects = np.unique(np.asarray(subject_ids))
    n = max(1, round(subjects.size * fraction))
    return np.random.default_rng(seed).choice(subjects, n, replace=False)


def label_row_budget(subject_ids, k: int) -> int:
    """How many label rows an epoch trains on with `k` labels per subject: every row of a subject with at most `k`,
    `k` of each longer one's (`k` 0: every row). Bounds the cost of per-hour labels, dozens of near-identical
    rows per stay."""
    ids = np.asarray(subject_ids)
    if not k:
        return int(ids.size)
    return int(np.minimum(np.unique(ids, return_counts=True)[1], k).sum())


def sample_label_rows(dataset: datasets.Dataset, k: int, seed: int) -> datasets.Dataset:
    """`label_row_budget(k)` label rows drawn uniformly at random among all rows (seeded), in the dataset's order;
    `k` 0 keeps all. Uniform over rows, not over subjects: a long stay keeps its share of the rows, so the targets
    keep the distribution that evaluation scores (remaining length of stay drawn k per stay would be shorter on
    average than over all hours)."""
    n = label_row_budget(dataset["subject_id"], k)
    if n >= len(dataset):
        return dataset
    return dataset.select(np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False)))


def ensemble_parts(dataset: datasets.Dataset, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`k` (fit rows, stopping rows) index pairs of a cross-fitted ensemble: the subjects are dealt into `k` seeded
    parts (stratified by whether a subject has a positive label, for a binary task with at least `k` subjects of
    each kind), and pair j fits on every part but j and stops early on part j. All prediction times of a subject
    fall in one part."""
    from sklearn.model_selection import KFold, StratifiedKFold

    subject_ids = np.asarray(dataset["subject_id"])
    subjects, row_subject = np.unique(subject_ids, return_inverse=True)
    if subjects.size < 2 * k:
        raise ValueError(f"an ensemble of {k} needs at least {2 * k} training subjects, got {subjects.size}")
    y = np.asarray(dataset["labels"], dtype=np.float64)
    positive = np.zeros(subjects.size, dtype=bool)
    if y.ndim == 1 and np.isin(y[~np.isnan(y)], (0.0, 1.0)).all():
        np.logical_or.at(positive, row_subject, y == 1.0)
    if k <= positive.sum() <= subjects.size - k:
        folds = StratifiedKFold(k, shuffle=True, random_state=seed).split(subjects, positive)
    else:
        folds = KFold(k, shuffle=True, random_state=seed).split(subjects)
    return [
        (np.flatnonzero(np.isin(row_subject, fit)), np.flatnonzero(np.isin(row_subject, stop)))
        for fit, stop in folds
    ]


__all__ = [
    "NoUsableRowsError",
    "ensemble_parts",
    "build_pretraining_dataset",
    "build_labeled_dataset",
    "build_stats",
    "draw_subjects",
    "subsample_labels",
    "label_row_budget",
    "sample_label_rows",
]
