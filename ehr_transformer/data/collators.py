"""Batch collators: dynamic padding, and BERT-style masking for masked event modeling.

Both return a dict of tensors whose keys are the model's forward arguments:
    input_ids       (B, L) int64, PAD where padded
    attention_mask  (B, L) int64, 1 = real token
    values          (B, L) float32, NaN = no value (and padding)
    times           (B, L) float32, 0 at padding
    ages            (B, L) float32, 0 at padding
    labels          (B, L) int64 for masked event modeling (-100 = not a target);
                    (B,) float32 / int64 (or (B, T)) for classification.
Masked event modeling may add value_labels and time_labels (B, L) float32 (NaN = not a target) and the
unmasked teacher_input_ids / teacher_values / teacher_times / teacher_ages (B, L) for the feature objective.
Keys of the features other than these (subject_id, prediction_time, length, ...) are ignored.

Sequence packing (`DataCollatorForMaskedEventModeling(pack_sequences=True)`, see `pack_batch`): several subjects
share a row and `attention_mask` numbers them 1, 2, 3, ... (0 = padding), which the model reads as "attend within
the subject only"; every other (B, L) tensor is the unpacked one's, its events moved, never changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..tokenization_ehr import EHREventTokenizer

_SEQUENCE_KEYS = ("input_ids", "values", "times", "ages")
VALUE_MASK_STRATEGIES = ("random", "future")


def _pad_batch(
    features: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    if not features:
        raise ValueError("cannot collate an empty list of features")
    for i, feature in enumerate(features):
        missing = [key for key in _SEQUENCE_KEYS if key not in feature]
        if missing:
            raise ValueError(f"feature {i} lacks key(s) {missing}; expected {list(_SEQUENCE_KEYS)}")
        lengths = {key: len(feature[key]) for key in _SEQUENCE_KEYS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"feature {i} has sequences of different lengths {lengths}")
    longest = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        longest = int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    batch_size = len(features)
    input_ids = torch.full((batch_size, longest), pad_token_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)  # (B, L)
    values = torch.full((batch_size, longest), float("nan"), dtype=torch.float32)  # (B, L)
    times = torch.zeros((batch_size, longest), dtype=torch.float32)  # (B, L)
    ages = torch.zeros((batch_size, longest), dtype=torch.float32)  # (B, L)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        values[row, :n] = torch.as_tensor(_nan_for_none(feature["values"]), dtype=torch.float32)
        times[row, :n] = torch.as_tensor(feature["times"], dtype=torch.float32)
        ages[row, :n] = torch.as_tensor(feature["ages"], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "values": values,
        "times": times,
        "ages": ages,
    }


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit decreasing: the subjects (indices into `lengths`), longest first (ties in batch order), each
    into the first row that still has room for it within `max_length` events, else into a new row; each row lists
    its subjects in batch order. A subject longer than `max_length` gets a row of its own (never truncated), and an
    empty one (0 events) no place at all."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = int(lengths[i])
        if n == 0:
            continue
        for r, room in enumerate(used):
            if room + n <= max_length:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return [sorted(row) for row in rows]


def _packing_fill(key: str, x: torch.Tensor, pad_token_id: int) -> float | int:
    """The padding value of a (B, L) tensor of a masked-event batch, as `_pad_batch` and the masking leave it."""
    if key.endswith("input_ids"):
        return pad_token_id
    if key == "labels":
        return -100
    if x.is_floating_point():
        return 0.0 if key.endswith(("times", "ages")) else float("nan")
    return 0


def pack_batch(
    batch: dict[str, torch.Tensor],
    pad_token_id: int,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Packs a padded one-subject-per-row batch (`attention_mask` 1 on each row's leading real events) into rows of
    at most `max_length` events (default: the batch's longest subject, so that no row is wider than the unpacked
    batch) by `pack_rows`. `attention_mask` becomes the subjects' numbers within their row, 1, 2, 3, ... (0 =
    padding); every other (B, L) tensor (input_ids, values, times, ages, labels, value_labels, time_labels,
    teacher_*) has each subject's events copied, in order and unchanged, to its place, and its own padding value
    elsewhere. Returns the packed batch and `placement` `(B, 2)` int64: the row and first position of each subject
    of `batch` in the packed one (-1, -1 for a subject without events)."""
    mask = batch["attention_mask"]  # (B, L)
    batch_size, seq_len = mask.shape
    lengths = (mask != 0).sum(dim=1)  # (B,)
    lengths_host = lengths.tolist()
    if sum(lengths_host) == 0:  # nothing to pack
        return dict(batch), torch.full((batch_size, 2), -1, dtype=torch.long)
    if max_length is None:
        max_length = max(lengths_host)
    rows = pack_rows(lengths_host, max_length)
    place = [[-1, -1, 0] for _ in range(batch_size)]  # row, first position, number within the row
    width = 0
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            place[i] = [r, start, k + 1]
            start += lengths_host[i]
        width = max(width, start)
    place = torch.tensor(place, dtype=torch.long)  # (B, 3)
    placement, segment = place[:, :2], place[:, 2]  # (B, 2), (B,)
    if pad_to_multiple_of:
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    real = mask.reshape(-1) != 0  # (B * L,)
    source = real.nonzero(as_tuple=True)[0]  # (N,) events in the unpacked batch, subject by subject, in order
    subject = torch.div(source, seq_len, rounding_mode="floor")  # (N,)
    position = source - subject * seq_len  # (N,) position within the subject
    target = placement[subject, 0] * width + placement[subject, 1] + position  # (N,) in the packed batch
    packed = {}
    for key, x in batch.items():
        if not (isinstance(x, torch.Tensor) and x.shape[:2] == (batch_size, seq_len) and x.dim() == 2):
            raise ValueError(
                f"cannot pack {key!r}: expected a (B, L) tensor, got {getattr(x, 'shape', type(x))}"
            )
        if key == "attention_mask":
            events = segment[subject].to(x.dtype)  # (N,)
            fill = 0
        else:
            events = x.reshape(-1)[source]  # (N,)
            fill = _packing_fill(key, x, pad_token_id)
        out = torch.full((len(rows) * width,), fill, dtype=x.dtype).index_copy_(0, target, events)
        packed[key] = out.view(len(rows), width)
    return packed, placement


def _nan_for_none(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return values
    return [float("nan") if v is None else v for v in values]


@dataclass
class DataCollatorForMaskedEventModeling:
    """Pads a batch and masks events for masked event modeling (BERT recipe).

    Each real, non-special token is selected with probability `mlm_probability`; at least one token
    is selected in every sample that has a maskable token (so no batch is all -100). A selected
    token becomes `[MASK]` with probability `mask_replace_prob`, a random non-special token with
    probability `random_replace_prob`, and stays unchanged otherwise; the value of a replaced token is
    hidden (NaN). `labels` hold the original id at selected positions and -100 elsewhere.

    Value reconstruction (MAE-style, its own ratio): of the events that carry a value and were not selected
    for code masking, each has its value hidden with probability `value_mask_probability` while its code stays
    visible; `value_labels` (B, L) hold the hidden (normalised) values there and NaN elsewhere, so the model
    learns what a lactate of 4 means rather than only which codes co-occur. 0 disables it.
    `value_mask_strategy="future"` hides the values of a sample's latest valued events instead: a share drawn
    uniformly from [0, 2 * value_mask_probability] (so `value_mask_probability` on average) sets a cut time, and
    every valued event at or after it has its value hidden, so the objective becomes forecasting the last hours'
    measurements (codes and times stay visible) from the history before them, as CLMBR / MOTOR predict the future.

    Time reconstruction (its own ratio): each real, non-special event after the first position has its time and age
    hidden (NaN, which the model embeds as "unknown") with probability `time_mask_probability`, independently of
    the other masks; `time_labels` (B, L) hold log1p of the hours since the previous position's original time
    there and NaN elsewhere. (The age is hidden too because age differences give the time away.) 0 disables it.

    `return_teacher_inputs=True` adds the unmasked sequence as `teacher_input_ids`, `teacher_values`,
    `teacher_times`, `teacher_ages`, which the EMA teacher of the "feature" objective sees.

    Sequence packing (`pack_sequences=True`): the batch is masked as above, one subject per row, then packed by
    `pack_batch` into rows of at most `pack_max_length` events (default: the batch's longest subject), first-fit
    decreasing, `attention_mask` numbering the subjects of a row 1, 2, 3, ... so that attention stays within each
    subject. Masking before packing keeps every per-subject quantity per subject (the at-least-one-masked-event
    rule, the cut time of the "future" strategy, the first event without a previous time gap), and the packed
    batch holds exactly the unpacked batch's events, masks and targets: the losses, means over the batch's
    targets, are the same to floating-point tolerance. Times and ages are per event (hours since the subject's own
    first event, the subject's age: see the tokenizer), and the model has no position ids. Pooled outputs would mix
    a row's subjects: packing is for masked event pretraining only. A subject longer than `pack_max_length` gets a
    row of its own; none is truncated.

    Randomness comes from `generator` if given, else torch's global RNG (so `transformers.set_seed` fixes it).
    """

    tokenizer: EHREventTokenizer
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    value_mask_probability: float = 0.0
    value_mask_strategy: str = "random"
    pad_to_multiple_of: int | None = None
    generator: torch.Generator | None = None
    time_mask_probability: float = 0.0
    return_teacher_inputs: bool = False
    pack_sequences: bool = False
    pack_max_length: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if not 0.0 <= self.value_mask_probability <= 1.0:
            raise ValueError(f"value_mask_probability must be in [0, 1], got {self.value_mask_probability}")
        if self.value_mask_strategy not in VALUE_MASK_STRATEGIES:
            raise ValueError(
                f"value_mask_strategy must be one of {VALUE_MASK_STRATEGIES}, got {self.value_mask_strategy!r}"
            )
        if not 0.0 <= self.time_mask_probability <= 1.0:
            raise ValueError(f"time_mask_probability must be in [0, 1], got {self.time_mask_probability}")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0:
            raise ValueError("mask_replace_prob and random_replace_prob must be non-negative")
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must be <= 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}"
            )
        n_special = len(self.tokenizer.all_special_ids)
        if self.random_replace_prob > 0 and self.tokenizer.vocab_size <= n_special:
            raise ValueError("random replacement needs at least one non-special token in the vocabulary")
        if self.pack_max_length is not None and self.pack_max_length < 1:
            raise ValueError(f"pack_max_length must be positive (or None), got {self.pack_max_length}")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _pad_batch(features, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        original = dict(batch)  # the unmasked tensors (masking below makes new ones)
        input_ids = batch["input_ids"]  # (B, L)
        special = torch.tensor(self.tokenizer.all_special_ids, dtype=torch.long)
        maskable = ~torch.isin(input_ids, special) & batch["attention_mask"].bool()  # (B, L)

        draws = torch.rand(input_ids.shape, generator=self.generator)  # (B, L)
        selected = (draws < self.mlm_probability) & maskable  # (B, L)
        # Samples with maskable tokens but no selection: select the maskable token with the lowest draw.
        needs_one = maskable.any(dim=1) & ~selected.any(dim=1)  # (B,)
        if needs_one.any():
            fallback = draws.masked_fill(~maskable, 2.0).argmin(dim=1)  # (B,)
            rows = needs_one.nonzero(as_tuple=True)[0]
            selected[rows, fallback[rows]] = True

        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))  # (B, L)
        action = torch.rand(input_ids.shape, generator=self.generator)  # (B, L)
        to_mask = selected & (action < self.mask_replace_prob)
        to_random = selected & ~to_mask & (action < self.mask_replace_prob + self.random_replace_prob)
        n_special = len(self.tokenizer.all_special_ids)
        random_ids = torch.randint(
            n_special,
            max(self.tokenizer.vocab_size, n_special + 1),
            input_ids.shape,
            generator=self.generator,
        )  # (B, L)
        input_ids = torch.where(to_mask, torch.full_like(input_ids, self.tokenizer.mask_token_id), input_ids)
        input_ids = torch.where(to_random, random_ids, input_ids)
        values = batch["values"].masked_fill(to_mask | to_random, float("nan"))  # (B, L)
        batch.update(input_ids=input_ids, values=values, labels=labels)
        if self.value_mask_probability > 0:
            if (
                self.value_mask_strategy == "future"
            ):  # every value from the cut on, so none of the future shows
                has_value = maskable & ~torch.isnan(values)  # (B, L)
                hide_value = has_value & (original["times"] >= self._cut_times(original["times"], has_value))
            else:
                has_value = maskable & ~selected & ~torch.isnan(values)  # (B, L)
                value_draws = torch.rand(input_ids.shape, generator=self.generator)  # (B, L)
                hide_value = has_value & (value_draws < self.value_mask_probability)  # (B, L)
            batch["value_labels"] = torch.where(hide_value, values, torch.full_like(values, float("nan")))
            batch["values"] = values.masked_fill(hide_value, float("nan"))
        if self.time_mask_probability > 0:
            times = original["times"]  # (B, L)
            gaps = torch.log1p((times[:, 1:] - times[:, :-1]).clamp(min=0.0))  # (B, L - 1), to position - 1
            time_draws = torch.rand(input_ids.shape, generator=self.generator)  # (B, L)
            hide_time = maskable & (time_draws < self.time_mask_probability)  # (B, L)
            hide_time[:, 0] = False  # no previous position
            batch["time_labels"] = torch.full_like(times, float("nan"))
            batch["time_labels"][:, 1:] = torch.where(hide_time[:, 1:], gaps, float("nan"))
            batch["times"] = times.masked_fill(hide_time, float("nan"))
            batch["ages"] = original["ages"].masked_fill(hide_time, float("nan"))
        if self.return_teacher_inputs:
            batch.update({f"teacher_{key}": original[key] for key in _SEQUENCE_KEYS})
        if self.pack_sequences:
            batch, _ = pack_batch(
                batch, self.tokenizer.pad_token_id, self.pack_max_length, self.pad_to_multiple_of
            )
        return batch

    def _cut_times(self, times: torch.Tensor, has_value: torch.Tensor) -> torch.Tensor:
        """(B, 1) per-sample cut time of the "future" strategy: the time of the valued event that leaves a drawn
        share of the sample's valued events at or after it (+inf where a sample has no valued event)."""
        share = torch.rand(times.shape[0], generator=self.generator) * 2 * self.value_mask_probability  # (B,)
        n_valued = has_value.sum(dim=1)  # (B,)
        first_hidden = (
            ((1.0 - share.clamp(max=1.0)) * n_valued).floor().long().clamp(max=n_valued - 1)
        )  # (B,)
        valued_times = times.masked_fill(~has_value, float("inf")).sort(dim=1).values  # (B, L)
        cut = valued_times.gather(1, first_hidden.clamp(min=0).unsqueeze(1))  # (B, 1)
        return cut.masked_fill((n_valued == 0).unsqueeze(1), float("inf"))


@dataclass
class DataCollatorForEventClassification:
    """Pads a batch and stacks its labels: float32 for float/bool labels, int64 for integer labels.

    A feature's `labels` may be a scalar or a list (multi-label / multitask gives (B, T)). In a list, a missing
    label (None or NaN: a task without a label at that prediction time) becomes NaN, which the multitask loss
    ignores; float32 then.
    """

    tokenizer: EHREventTokenizer
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _pad_batch(features, self.tokenizer.pad_token_id, self.pad_to_multiple_of)
        if "labels" in features[0]:
            raw = [feature["labels"] for feature in features]
            if any(label is None for label in raw):
                raise ValueError("a feature has labels=None; drop unlabeled samples before collating")
            if any(isinstance(label, (list, tuple)) and None in label for label in raw):
                raw = [[float("nan") if v is None else float(v) for v in label] for label in raw]
            lengths = {len(label) for label in raw if isinstance(label, (list, tuple))}
            if len(lengths) > 1:
                raise ValueError(
                    f"features have labels of different lengths {sorted(lengths)}; expected one per task"
                )
            tensor = torch.as_tensor(raw)
            if tensor.dtype == torch.bool or tensor.is_floating_point():
                tensor = tensor.to(torch.float32)
            else:
                tensor = tensor.to(torch.long)
            batch["labels"] = tensor
        return batch


__all__ = [
    "DataCollatorForMaskedEventModeling",
    "DataCollatorForEventClassification",
    "pack_batch",
    "pack_rows",
]
