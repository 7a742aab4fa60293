"""Event tokenizer for MEDS data: codes to ids, value normalisation, time and age encoding.

`EHREventTokenizer` is a plain Python class (not a text tokenizer). It is fitted on the events of
the *training split only* — the caller passes only training events, the tokenizer cannot know
which split a frame comes from — and is saved next to the model (`event_tokenizer.json`) so that
one folder is a complete checkpoint.

Input events follow the shared MEDS frame contract: columns `subject_id` Int64, `time`
Datetime("us") (null = static event), `code` String, `numeric_value` Float32 (null = no value),
sorted by subject_id, then time with static events first. `text_value` is not used.

Encoding of one sample (a subject, optionally cut at a prediction time):

    input_ids = [CLS] + static events (at most `max_static_events`) + timed events
    values    = NaN for CLS, else clip((x - median) / scale, -10, 10); NaN where no value/no stats
    times     = hours since the first timed event of the encoded (truncated) sequence; 0 for CLS/static
    ages      = years (365.25 days) since MEDS_BIRTH; CLS and static events get the age at the
                first timed event of the sequence (or at the prediction time if there is none);
                0 everywhere when the birth time is unknown.

`MEDS_BIRTH` is not a token: it only gives ages. Truncation to `max_length` keeps CLS, the static
events, and the most recent timed events. Codes outside the vocabulary map to `[UNK]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .utils import atomic_path

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "event_tokenizer.json"
FORMAT_NAME = "ehr_event_tokenizer"
# Version 2: value statistics without per-code bin edges. Version 1 files (which also carry `bin_edges` and a
# `n_value_bins` setting, never read by the model) still load, those two fields dropped.
FORMAT_VERSION = 2
_LEGACY_VERSION = 1

PAD_TOKEN, UNK_TOKEN, MASK_TOKEN, CLS_TOKEN = "[PAD]", "[UNK]", "[MASK]", "[CLS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, MASK_TOKEN, CLS_TOKEN)
BIRTH_CODE = "MEDS_BIRTH"

VALUE_CLIP = 10.0
MAX_VOCAB_SIZE = 10_000_000
MAX_FILE_BYTES = 2 * 1024**3
_US_PER_HOUR = 3_600_000_000.0
_US_PER_YEAR = 365.25 * 24 * _US_PER_HOUR

_SETTINGS_TYPES: dict[str, type] = {
    "max_length": int,
    "min_code_count": int,
    "max_static_events": int,
    "reservoir_size": int,
    "seed": int,
}
_TOP_LEVEL_FIELDS = {"format", "version", "settings", "vocab", "value_statistics"}
_STAT_FIELDS = {"median", "scale", "count"}


def _as_frames(events: pl.DataFrame | pl.LazyFrame | Iterable[pl.DataFrame]) -> Iterable[pl.DataFrame]:
    """One frame, or an iterable of frames (or of `(path, frame)` pairs as from `iter_shards`)."""
    if isinstance(events, pl.LazyFrame):
        events = events.collect()
    if isinstance(events, pl.DataFrame):
        return [events]
    return (item[1] if isinstance(item, tuple) else item for item in events)


_COLUMN_DTYPES = {  # dtypes each column may have (those `meds.validate_events` produces, or castable without parsing)
    "subject_id": lambda d: d.is_integer() or d == pl.Null,
    "time": lambda d: isinstance(d, pl.Datetime) or d in (pl.Date, pl.Null),
    "prediction_time": lambda d: isinstance(d, pl.Datetime) or d == pl.Date,
    "code": lambda d: d in (pl.String, pl.Null),
    "numeric_value": lambda d: d.is_numeric() or d == pl.Null,
}


def _check_columns(frame: pl.DataFrame, needed: Iterable[str], what: str = "events") -> None:
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks column(s) {missing}; it has {frame.columns}")
    for name in needed:
        dtype = frame.schema[name]
        if name in _COLUMN_DTYPES and not _COLUMN_DTYPES[name](dtype):
            raise ValueError(
                f"{what} frame: column {name!r} has dtype {dtype}, not a MEDS dtype; validate the frame with "
                "ehr_transformer.data.meds.validate_events first"
            )


class _ValueReservoir:
    """Bounded uniform sample of numeric values per code, streamed over shards.

    Every value gets a seeded uniform random key; the sample of a code is the `size` values with the
    smallest keys seen so far (bottom-k sampling), which is a uniform sample without replacement of
    all the code's values, whatever the shard boundaries. Exact counts are kept beside it. Medians
    and IQRs are therefore exact for codes with at most `size` values and estimates otherwise.
    """

    def __init__(self, size: int, seed: int, codes: Iterable[str] | None = None) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.codes = None if codes is None else pl.Series("code", list(codes), dtype=pl.String)
        self.sample = pl.DataFrame(schema={"code": pl.String, "key": pl.Float64, "value": pl.Float64})
        self.counts = pl.DataFrame(schema={"code": pl.String, "count": pl.UInt32})

    def update(self, frame: pl.DataFrame) -> None:
        values = frame.select(pl.col("code"), pl.col("numeric_value").cast(pl.Float64).alias("value")).filter(
            pl.col("value").is_not_null() & pl.col("value").is_finite() & (pl.col("code") != BIRTH_CODE)
        )
        if self.codes is not None:
            values = values.filter(pl.col("code").is_in(self.codes.implode()))
        if values.height == 0:
            return
        values = values.with_columns(pl.Series("key", self.rng.random(values.height)))
        counts = values.group_by("code").agg(pl.len().cast(pl.UInt32).alias("count"))
        self.counts = pl.concat([self.counts, counts]).group_by("code").agg(pl.col("count").sum())
        self.sample = pl.concat([self.sample, values.select("code", "key", "value")]).filter(
            pl.col("key").rank("ordinal").over("code") <= self.size
        )

    def statistics(self) -> dict[str, dict[str, Any]]:
        aggs = [
            pl.col("value").median().alias("median"),
            pl.col("value").quantile(0.25, "linear").alias("q1"),
            pl.col("value").quantile(0.75, "linear").alias("q3"),
            pl.col("value").std().alias("std"),
        ]
        table = self.sample.group_by("code").agg(aggs).join(self.counts, on="code").sort("code")
        out: dict[str, dict[str, Any]] = {}
        for row in table.iter_rows(named=True):
            scale = (row["q3"] - row["q1"]) / 1.349
            if not (math.isfinite(scale) and scale > 0):
                scale = row["std"] if row["std"] is not None else float("nan")
            if not (math.isfinite(scale) and scale > 0):
                scale = 1.0
            out[row["code"]] = {
                "median": float(row["median"]),
                "scale": float(scale),
                "count": int(row["count"]),
            }
        return out


class EHREventTokenizer:
    """Maps MEDS events to model inputs (`input_ids`, `values`, `times`, `ages`).

    Build one with `EHREventTokenizer.fit(train_events)` or `EHREventTokenizer.from_pretrained(folder)`.
    `vocab` maps code -> id (the four special tokens first, then codes by decreasing number of
    subjects, ties broken by code name); `value_statistics` maps code -> {median, scale, count}.
    """

    def __init__(
        self,
        vocab: Mapping[str, int] | Iterable[str],
        value_statistics: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        max_length: int = 512,
        min_code_count: int = 5,
        max_static_events: int = 32,
        reservoir_size: int = 10_000,
        seed: int = 0,
    ) -> None:
        if not isinstance(vocab, Mapping):
            codes = list(vocab)
            if tuple(codes[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
                codes = list(SPECIAL_TOKENS) + [c for c in codes if c not in SPECIAL_TOKENS]
            vocab = {code: i for i, code in enumerate(codes)}
        _validate_vocab(vocab)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (CLS and one event), got {max_length}")
        if max_static_events < 0 or min_code_count < 1 or reservoir_size < 1:
            raise ValueError("max_static_events >= 0, min_code_count >= 1, reservoir_size >= 1")
        self.vocab: dict[str, int] = dict(vocab)
        self.ids_to_codes: list[str] = sorted(self.vocab, key=self.vocab.__getitem__)
        self.value_statistics: dict[str, dict[str, Any]] = {
            code: dict(_without_legacy_stats(stats)) for code, stats in (value_statistics or {}).items()
        }
        self.max_length = int(max_length)
        self.min_code_count = int(min_code_count)
        self.max_static_events = int(max_static_events)
        self.reservoir_size = int(reservoir_size)
        self.seed = int(seed)
        self._table: pl.DataFrame | None = None

    # ----------------------------------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def unk_token_id(self) -> int:
        return 1

    @property
    def mask_token_id(self) -> int:
        return 2

    @property
    def cls_token_id(self) -> int:
        return 3

    @property
    def all_special_ids(self) -> list[int]:
        return [0, 1, 2, 3]

    special_token_ids = all_special_ids

    @property
    def all_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def convert_codes_to_ids(self, codes: str | Iterable[str]) -> int | list[int]:
        if isinstance(codes, str):
            return self.vocab.get(codes, self.unk_token_id)
        return [self.vocab.get(code, self.unk_token_id) for code in codes]

    def convert_ids_to_codes(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.ids_to_codes[ids]
        return [self.ids_to_codes[int(i)] for i in ids]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, numeric_codes={len(self.value_statistics)}, "
            f"max_length={self.max_length}, min_code_count={self.min_code_count})"
        )

    # ----------------------------------------------------------------------------------------- fit
    @classmethod
    def fit(
        cls,
        events: pl.DataFrame | Iterable[pl.DataFrame],
        min_code_count: int = 5,
        max_length: int = 512,
        *,
        max_static_events: int = 32,
        reservoir_size: int = 10_000,
        seed: int = 0,
    ) -> EHREventTokenizer:
        """Fit the vocabulary and value statistics on TRAINING events only.

        `events` is a MEDS frame or an iterable of frames (shards, or `(path, frame)` pairs from
        `meds.iter_shards`); shards are read one at a time. A code enters the vocabulary when it is
        seen in at least `min_code_count` distinct subjects. Subjects are counted per shard and
        summed, which is exact when each subject lives in one shard (the MEDS convention).
        Value statistics come from a seeded bounded sample of `reservoir_size` values per code.
        """
        counts = pl.DataFrame(schema={"code": pl.String, "n_subjects": pl.UInt32, "n_events": pl.UInt32})
        reservoir = _ValueReservoir(reservoir_size, seed)
        for frame in _as_frames(events):
            _check_columns(frame, ("subject_id", "code", "numeric_value"))
            shard_counts = (
                frame.filter(pl.col("code") != BIRTH_CODE)
                .group_by("code")
                .agg(
                    pl.col("subject_id").n_unique().cast(pl.UInt32).alias("n_subjects"),
                    pl.len().cast(pl.UInt32).alias("n_events"),
                )
            )
            counts = pl.concat([counts, shard_counts]).group_by("code").agg(pl.all().sum())
            reservoir.update(frame)
        kept = counts.filter(
            (pl.col("n_subjects") >= min_code_count) & ~pl.col("code").is_in(list(SPECIAL_TOKENS))
        ).sort(["n_subjects", "code"], descending=[True, False])
        codes = kept["code"].to_list()
        stats = reservoir.statistics()
        kept_codes = set(codes)
        return cls(
            list(SPECIAL_TOKENS) + codes,
            {code: s for code, s in stats.items() if code in kept_codes},
            max_length=max_length,
            min_code_count=min_code_count,
            max_static_events=max_static_events,
            reservoir_size=reservoir_size,
            seed=seed,
        )

    def refit_value_statistics(self, events: pl.DataFrame | Iterable[pl.DataFrame]) -> EHREventTokenizer:
        """A copy with the same vocabulary ids and value statistics refitted on `events`.

        Used for distribution calibration on a new population's (unlabeled) data. Codes without any
        numeric value in `events` keep their previous statistics.
        """
        reservoir = _ValueReservoir(self.reservoir_size, self.seed, codes=self.vocab)
        for frame in _as_frames(events):
            _check_columns(frame, ("code", "numeric_value"))
            reservoir.update(frame)
        stats = {**self.value_statistics, **reservoir.statistics()}
        return type(self)(self.vocab, stats, **self._settings())

    # -------------------------------------------------------------------------------------- encode
    def _code_table(self) -> pl.DataFrame:
        if self._table is None:
            codes = list(self.vocab)
            stats = [self.value_statistics.get(code) for code in codes]
            self._table = pl.DataFrame(
                {
                    "code": codes,
                    "_id": [self.vocab[c] for c in codes],
                    "_median": [s["median"] if s else None for s in stats],
                    "_scale": [s["scale"] if s else None for s in stats],
                },
                schema={"code": pl.String, "_id": pl.Int32, "_median": pl.Float64, "_scale": pl.Float64},
            )
        return self._table

    def normalize_values(self, codes: Iterable[str], values: Iterable[float | None]) -> list[float]:
        """Normalised values for (code, raw value) pairs: NaN where no value or no statistics."""
        frame = pl.DataFrame(
            {"code": list(codes), "numeric_value": list(values)},
            schema={"code": pl.String, "numeric_value": pl.Float64},
        )
        return self._tokens(frame.lazy()).collect()["_value"].to_list()

    def _tokens(self, lazy: pl.LazyFrame) -> pl.LazyFrame:
        value = ((pl.col("numeric_value").cast(pl.Float64) - pl.col("_median")) / pl.col("_scale")).clip(
            -VALUE_CLIP, VALUE_CLIP
        )
        table = self._code_table().lazy()
        return lazy.join(table, on="code", how="left", maintain_order="left").with_columns(
            pl.col("_id").fill_null(self.unk_token_id),
            value.fill_nan(None).fill_null(float("nan")).cast(pl.Float32).alias("_value"),
        )

    def encode_events(self, events: pl.DataFrame, labels: pl.DataFrame | None = None) -> pl.DataFrame:
        """Encode a whole frame (e.g. a shard) at once, vectorised in polars.

        Without `labels`: one row per subject with at least one event besides MEDS_BIRTH.
        With `labels` (subject_id, prediction_time and any further columns, which are carried
        along): one row per label row whose subject has events, using only static events and
        events with `time <= prediction_time`; label rows whose sample would hold no event are
        left out (compare row counts to count them).
        Columns: subject_id, [prediction_time, label columns...], input_ids list[i32],
        values list[f32], times list[f32], ages list[f32], length u32. Rows are sorted by
        subject_id (then prediction_time).
        """
        _check_columns(events, ("subject_id", "time", "code", "numeric_value"))
        frame = events.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("time").cast(pl.Datetime("us")),
            pl.col("code").cast(pl.String),
            pl.col("numeric_value"),
        )
        if not _is_meds_sorted(frame):
            frame = frame.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
        lazy = frame.lazy().with_columns(pl.col("time").dt.epoch("us").alias("_us"))
        births = (
            lazy.filter(pl.col("code") == BIRTH_CODE)
            .group_by("subject_id")
            .agg(pl.col("_us").min().alias("_birth"))
        )
        tokens = self._tokens(lazy.filter(pl.col("code") != BIRTH_CODE))
        cap = min(self.max_static_events, self.max_length - 1)
        static = (
            tokens.filter(pl.col("_us").is_null())
            .group_by("subject_id")
            .agg(pl.col("_id").head(cap).alias("_s_ids"), pl.col("_value").head(cap).alias("_s_values"))
        )
        timed_events = tokens.filter(pl.col("_us").is_not_null())
        timed = timed_events.group_by("subject_id").agg(
            pl.col("_id").alias("_t_ids"), pl.col("_value").alias("_t_values"), pl.col("_us").alias("_t_us")
        )

        if labels is None:
            queries = (
                pl.concat([static.select("subject_id"), timed.select("subject_id")])
                .unique()
                .join(
                    timed.select("subject_id", pl.col("_t_us").list.len().alias("_end")),
                    on="subject_id",
                    how="left",
                )
                .with_columns(
                    pl.col("_end").fill_null(0).cast(pl.Int64), pl.lit(None, pl.Int64).alias("_p_us")
                )
            )
            keys = ["subject_id"]
        else:
            _check_columns(labels, ("subject_id", "prediction_time"), "labels")
            label_frame = labels.with_columns(
                pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
            ).sort(["subject_id", "prediction_time"], maintain_order=True)
            # 1-based position of each timed event within its subject (events are sorted by subject)
            row = pl.int_range(0, pl.len(), dtype=pl.Int64)
            subject_start = (
                pl.when(pl.col("subject_id") != pl.col("subject_id").shift(1))
                .then(row)
                .forward_fill()
                .fill_null(0)
            )
            positions = (
                timed_events.select("subject_id", "_us")
                .with_columns((row - subject_start + 1).alias("_end"))
                .collect()
            )
            with_ends = label_frame.with_columns(
                pl.col("prediction_time").dt.epoch("us").alias("_p_us")
            ).join_asof(
                positions,
                left_on="_p_us",
                right_on="_us",
                by="subject_id",
                strategy="backward",
                check_sortedness=False,
            )
            queries = (
                with_ends.lazy()
                .drop("_us")
                .with_columns(pl.col("_end").fill_null(0))
                .join(
                    pl.concat([static.select("subject_id"), timed.select("subject_id")]).unique(),
                    on="subject_id",
                    how="semi",
                )
            )
            keys = ["subject_id", "prediction_time"]

        empty_i = pl.lit([], dtype=pl.List(pl.Int32))
        empty_f = pl.lit([], dtype=pl.List(pl.Float32))
        empty_u = pl.lit([], dtype=pl.List(pl.Int64))
        joined = (
            queries.join(static, on="subject_id", how="left")
            .join(timed, on="subject_id", how="left")
            .join(births, on="subject_id", how="left")
            .with_columns(
                pl.col("_s_ids").fill_null(empty_i),
                pl.col("_s_values").fill_null(empty_f),
                pl.col("_t_ids").fill_null(empty_i),
                pl.col("_t_values").fill_null(empty_f),
                pl.col("_t_us").fill_null(empty_u),
            )
            .with_columns((self.max_length - 1 - pl.col("_s_ids").list.len().cast(pl.Int64)).alias("_budget"))
            .with_columns(
                (pl.col("_end") - pl.col("_budget")).clip(lower_bound=0).alias("_start"),
            )
            .with_columns((pl.col("_end") - pl.col("_start")).alias("_n"))
            .with_columns(
                pl.col("_t_ids").list.slice(pl.col("_start"), pl.col("_n")),
                pl.col("_t_values").list.slice(pl.col("_start"), pl.col("_n")),
                pl.col("_t_us").list.slice(pl.col("_start"), pl.col("_n")),
            )
            .with_columns(
                pl.coalesce(pl.col("_t_us").list.first(), pl.col("_p_us")).alias("_ref_us"),
                (pl.col("_s_ids").list.len() + 1).alias("_n_head"),
            )
            .filter((pl.col("_n_head") + pl.col("_n")) > 1)
        )
        head_zeros = pl.lit(0.0, pl.Float32).repeat_by(pl.col("_n_head"))
        head_age = (
            ((pl.col("_ref_us") - pl.col("_birth")).cast(pl.Float64) / _US_PER_YEAR)
            .fill_null(0.0)
            .cast(pl.Float32)
            .repeat_by(pl.col("_n_head"))
        )
        t_times = (
            (pl.col("_t_us") - pl.col("_t_us").list.first()).cast(pl.List(pl.Float64)) / _US_PER_HOUR
        ).cast(pl.List(pl.Float32))
        t_ages = (
            pl.when(pl.col("_birth").is_null())
            .then(pl.lit(0.0, pl.Float32).repeat_by(pl.col("_n")))
            .otherwise(
                ((pl.col("_t_us") - pl.col("_birth")).cast(pl.List(pl.Float64)) / _US_PER_YEAR).cast(
                    pl.List(pl.Float32)
                )
            )
        )
        extra = [c for c in (labels.columns if labels is not None else []) if c not in keys]
        out = joined.select(
            *keys,
            *extra,
            pl.concat_list(pl.lit(self.cls_token_id, pl.Int32), pl.col("_s_ids"), pl.col("_t_ids")).alias(
                "input_ids"
            ),
            pl.concat_list(pl.lit(float("nan"), pl.Float32), pl.col("_s_values"), pl.col("_t_values")).alias(
                "values"
            ),
            pl.concat_list(head_zeros, t_times).alias("times"),
            pl.concat_list(head_age, t_ages).alias("ages"),
            (pl.col("_n_head") + pl.col("_n")).cast(pl.UInt32).alias("length"),
        )
        return out.sort(keys, maintain_order=True).collect()

    def encode(self, subject_events: pl.DataFrame, prediction_time: Any = None) -> dict[str, list]:
        """Encode one subject's events (optionally cut at `prediction_time`) into a dict of lists.

        A subject with no event to encode gives just the CLS token.
        """
        n_subjects = subject_events["subject_id"].n_unique() if subject_events.height else 0
        if n_subjects > 1:
            raise ValueError(
                f"encode() takes one subject's events, got {n_subjects} subjects; use encode_events()"
            )
        subject_id = subject_events["subject_id"][0] if subject_events.height else 0
        labels = None
        if prediction_time is not None:
            labels = pl.DataFrame(
                {"subject_id": [subject_id], "prediction_time": [prediction_time]},
                schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
            )
        rows = self.encode_events(subject_events, labels=labels)
        if rows.height == 0:
            return {"input_ids": [self.cls_token_id], "values": [float("nan")], "times": [0.0], "ages": [0.0]}
        row = rows.row(0, named=True)
        return {key: row[key] for key in ("input_ids", "values", "times", "ages")}

    def __call__(
        self,
        events: Any,
        prediction_time: Any = None,
        return_tensors: str | None = "pt",
        pad_to_multiple_of: int | None = None,
    ):
        """Model inputs for one patient or a batch, as a `transformers` tokenizer gives them.

        `events` is one subject's MEDS event frame (polars or pandas, columns `subject_id` (optional for one
        subject), `time`, `code`, `numeric_value`) or a list of such frames, one per sample. `prediction_time`
        is None (every event), one time (a `datetime`, used for every sample) or a list of one time (or None) per
        frame: a sample holds only static events and events at or before its prediction time, exactly as
        `encode_events` builds the rows of a labelled dataset. Returns a `transformers.BatchEncoding` with
        `input_ids`, `attention_mask`, `values`, `times` and `ages`, padded by the classification collator
        (`DataCollatorForEventClassification`), shape `(B, L)` with `B = 1` for a single frame, so that
        `model(**tokenizer(events, prediction_time))` scores it directly. `return_tensors` is `"pt"` (default),
        `"np"` or None (nested Python lists, padded as the tensors are).
        """
        from transformers import BatchEncoding

        from .data.collators import DataCollatorForEventClassification

        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        frames = list(events) if isinstance(events, (list, tuple)) else [events]
        if not frames:
            raise ValueError("no event frame given: pass one subject's events or a list of frames")
        if isinstance(prediction_time, (list, tuple)):
            if len(prediction_time) != len(frames):
                raise ValueError(
                    f"{len(prediction_time)} prediction times for {len(frames)} event frames; give one per frame"
                )
            times = [_as_time(t) for t in prediction_time]
        else:
            times = [_as_time(prediction_time)] * len(frames)
        features = [
            self.encode(_one_subject_frame(frame, i), cut)
            for i, (frame, cut) in enumerate(zip(frames, times, strict=True))
        ]
        empty = [i for i, feature in enumerate(features) if len(feature["input_ids"]) == 1]
        if empty:  # the labelled datasets leave such rows out; here the caller asked for them, so say it
            logger.warning(
                "%d of %d samples (frame(s) %s) hold no event at or before their prediction time: only [CLS]",
                len(empty),
                len(features),
                empty[:10],
            )
        batch = DataCollatorForEventClassification(self, pad_to_multiple_of=pad_to_multiple_of)(features)
        if return_tensors is None:
            return BatchEncoding({key: value.tolist() for key, value in batch.items()})
        return BatchEncoding(dict(batch), tensor_type=return_tensors)

    # ------------------------------------------------------------------------------ save and load
    def _settings(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _SETTINGS_TYPES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "settings": self._settings(),
            "vocab": self.vocab,
            "value_statistics": self.value_statistics,
        }

    def content_hash(self) -> str:
        """SHA-256 of the canonical serialisation: equal tokenizers encode identically."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EHREventTokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `event_tokenizer.json` into `save_directory` (atomically). Returns the file path.

        Nothing that `transformers.AutoTokenizer` would pick up is written.
        """
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / TOKENIZER_FILE
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return target

    @classmethod
    def from_pretrained(cls, pretrained_path: str | os.PathLike) -> EHREventTokenizer:
        """Load from a folder holding `event_tokenizer.json` (or the file itself), validating it."""
        path = Path(pretrained_path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {pretrained_path}")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(
                f"{path}: {size} bytes is too large for an event tokenizer file (limit {MAX_FILE_BYTES})"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a valid JSON event tokenizer file ({error})") from error
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> EHREventTokenizer:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        unknown = set(data) - _TOP_LEVEL_FIELDS
        missing = _TOP_LEVEL_FIELDS - set(data)
        if unknown or missing:
            raise ValueError(
                f"{source}: unknown field(s) {sorted(unknown)}, missing field(s) {sorted(missing)}"
            )
        if data["format"] != FORMAT_NAME:
            raise ValueError(f"{source}: format is {data['format']!r}, expected {FORMAT_NAME!r}")
        if data["version"] not in (_LEGACY_VERSION, FORMAT_VERSION):
            raise ValueError(
                f"{source}: version {data['version']!r} not supported "
                f"(this code reads versions {_LEGACY_VERSION} and {FORMAT_VERSION})"
            )
        settings, stats = data["settings"], data["value_statistics"]
        if data["version"] == _LEGACY_VERSION and isinstance(settings, dict) and isinstance(stats, dict):
            settings = {name: value for name, value in settings.items() if name != "n_value_bins"}
            stats = {code: _without_legacy_stats(entry) for code, entry in stats.items()}
        if not isinstance(settings, dict) or set(settings) - set(_SETTINGS_TYPES):
            raise ValueError(
                f"{source}: settings must be an object with fields among {sorted(_SETTINGS_TYPES)}"
            )
        for name, value in settings.items():
            if not _is_int(value) or not 0 <= value <= MAX_VOCAB_SIZE:
                raise ValueError(
                    f"{source}: settings.{name} must be an integer in [0, {MAX_VOCAB_SIZE}], got {value!r}"
                )
        vocab = data["vocab"]
        if not isinstance(vocab, dict):
            raise ValueError(f"{source}: vocab must be an object code -> id, got {type(vocab).__name__}")
        if len(vocab) > MAX_VOCAB_SIZE:
            raise ValueError(
                f"{source}: vocab has {len(vocab)} entries, more than the limit {MAX_VOCAB_SIZE}"
            )
        try:
            _validate_vocab(vocab)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error
        if not isinstance(stats, dict):
            raise ValueError(f"{source}: value_statistics must be an object code -> statistics")
        for code, entry in stats.items():
            _validate_stats(code, entry, vocab, source)
        try:
            return cls(vocab, stats, **settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error


# --------------------------------------------------------------------------------------- helpers
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_vocab(vocab: Mapping[Any, Any]) -> None:
    for code, index in vocab.items():
        if not isinstance(code, str) or not _is_int(index):
            raise ValueError(f"vocab entries must be str -> int, got {code!r} -> {index!r}")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"vocab ids must be contiguous 0..{len(ids) - 1} without duplicates")
    for index, token in enumerate(SPECIAL_TOKENS):
        if vocab.get(token) != index:
            raise ValueError(f"special token {token} must have id {index}, got {vocab.get(token)!r}")


def _without_legacy_stats(entry: Any) -> Any:
    """A copy of one code's statistics without `bin_edges`, the per-code value quantiles that version 1 files
    carry and no model reads."""
    if not isinstance(entry, Mapping):
        return entry
    return {name: value for name, value in entry.items() if name != "bin_edges"}


def _validate_stats(code: Any, entry: Any, vocab: Mapping[str, int], source: str) -> None:
    where = f"{source}: value_statistics[{code!r}]"
    if code not in vocab:
        raise ValueError(f"{where}: code is not in the vocabulary")
    if not isinstance(entry, dict) or set(entry) != _STAT_FIELDS:
        raise ValueError(f"{where}: expected an object with fields {sorted(_STAT_FIELDS)}")
    if not _is_number(entry["median"]) or not _is_number(entry["scale"]) or entry["scale"] <= 0:
        raise ValueError(f"{where}: median must be a finite number and scale a finite positive number")
    if not _is_int(entry["count"]) or entry["count"] < 0:
        raise ValueError(f"{where}: count must be a non-negative integer")


def _as_time(value: Any) -> Any:
    """A prediction time as `encode` takes it: None, a datetime, or an ISO 8601 string parsed to one."""
    if isinstance(value, str):
        import datetime as dt

        return dt.datetime.fromisoformat(value)
    return value


def _one_subject_frame(frame: Any, index: int = 0) -> pl.DataFrame:
    """One subject's events as a polars frame (from polars or pandas); `subject_id` added (0) when absent."""
    if isinstance(frame, pl.LazyFrame):
        frame = frame.collect()
    if not isinstance(frame, pl.DataFrame):
        if type(frame).__module__.split(".")[0] != "pandas":
            raise TypeError(
                f"event frame {index}: expected a polars or pandas DataFrame of MEDS events, got {type(frame).__name__}"
            )
        frame = pl.from_pandas(frame)
    if "subject_id" not in frame.columns:
        frame = frame.with_columns(pl.lit(0, pl.Int64).alias("subject_id"))
    _check_columns(frame, ("subject_id", "time", "code", "numeric_value"), f"event frame {index}")
    n_subjects = frame["subject_id"].n_unique()
    if n_subjects > 1:
        raise ValueError(
            f"event frame {index} holds {n_subjects} subjects; pass one frame per subject "
            "(e.g. `[frame for _, frame in events.group_by('subject_id', maintain_order=True)]`)"
        )
    return frame


def _is_meds_sorted(frame: pl.DataFrame) -> bool:
    """True when sorted by subject_id, then time with nulls first (checked in one vectorised pass)."""
    if frame.height < 2:
        return True
    subject, time = pl.col("subject_id"), pl.col("time")
    prev_subject, prev_time = subject.shift(1), time.shift(1)
    bad = (subject < prev_subject) | (
        (subject == prev_subject)
        & ((time.is_null() & prev_time.is_not_null()) | (time < prev_time).fill_null(False))
    )
    return not frame.select(bad.fill_null(False).any()).item()


__all__ = ["EHREventTokenizer", "TOKENIZER_FILE", "SPECIAL_TOKENS", "BIRTH_CODE"]
