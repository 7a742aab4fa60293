"""Population prototypes written with a pretrained checkpoint, so that a selector can judge how well the checkpoint
fits a user's data without its training data.

What a pretrained folder carries for selection (written by `write_population_summary` right after pretraining,
from the training split only):

- `prototypes.safetensors`: k-means centroids of the backbone's pooled embeddings of the training subjects, with
  the number of subjects behind each (`centroids` (K, H) float32, `counts` (K,) int64) and, in the header's
  metadata, the pooling used and the *reference distance*: the mean distance of subjects of the tuning split
  (not used to fit the centroids) to their nearest centroid. No individual's vector is stored: a cluster with fewer
  than `max(min_code_count, MIN_PROTOTYPE_MEMBERS)` members is dissolved and its members are merged into the
  nearest remaining cluster (repeatedly), so every centroid is a mean over at least that many subjects, the same
  privacy threshold the vocabulary uses for codes.
- `code_frequencies.json`: for every code of the vocabulary (codes below `min_code_count` subjects are not in
  it), the number of training subjects with that code; a count below `min_code_count` is never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..checkpoint_safety import CODE_FREQUENCIES_FILE, PROTOTYPES_FILE, read_safetensors_header
from ..data.splits import iter_split_events
from ..inference import embed_sequences
from ..utils import atomic_path, write_json

logger = logging.getLogger(__name__)

PROTOTYPES_FORMAT = "ehr_prototypes"


CODE_FREQUENCIES_FORMAT = "ehr_code_frequencies"


FORMAT_VERSION = 1


MIN_PROTOTYPE_MEMBERS = 10  # a centroid is the mean of at least this many subjects (and of min_code_count)


MAX_PROTOTYPES = 16


MAX_EMBEDDED_SUBJECTS = 5000  # subjects embedded at save time to fit the prototypes (a seeded sample)


BIRTH_CODE = "MEDS_BIRTH"


# ------------------------------------------------------------------------------------------------ prototypes
def fit_prototypes(
    embeddings: np.ndarray, min_members: int, max_prototypes: int = MAX_PROTOTYPES, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """k-means centroids `(K, H)` of `embeddings` `(N, H)` and their member counts `(K,)`, every count at least
    `min_members`: a smaller cluster is dissolved and its members join the nearest remaining centroid (then all
    centroids are recomputed as member means), until none is below the minimum. Raises a ValueError when there
    are fewer than `min_members` embeddings in all (then no centroid could be shared)."""
    from sklearn.cluster import KMeans

    embeddings = np.asarray(embeddings, dtype=np.float64)
    n = len(embeddings)
    if n < min_members:
        raise ValueError(
            f"{n} embedded subjects, fewer than the {min_members} a prototype must summarise; no prototype is stored"
        )
    k = max(1, min(max_prototypes, n // (2 * min_members)))
    kmeans = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
    centroids, assignment = kmeans.cluster_centers_, kmeans.labels_
    while True:
        counts = np.bincount(assignment, minlength=len(centroids))
        keep = counts > 0
        centroids, counts = centroids[keep], counts[keep]
        assignment = _nearest(embeddings, centroids)[0]
        counts = np.bincount(assignment, minlength=len(centroids))
        smallest = int(np.argmin(counts))
        if counts[smallest] >= min_members or len(centroids) == 1:
            break
        centroids = np.delete(
            centroids, smallest, axis=0
        )  # dissolve: members go to the nearest other centroid
        assignment = _nearest(embeddings, centroids)[0]
        centroids = np.stack([embeddings[assignment == j].mean(axis=0) for j in range(len(centroids))])
    counts = np.bincount(assignment, minlength=len(centroids))
    centroids = np.stack([embeddings[assignment == j].mean(axis=0) for j in range(len(centroids))])
    assert counts.min() >= min_members, "a prototype would summarise fewer subjects than allowed"
    return centroids.astype(np.float32), counts.astype(np.int64)


def _nearest(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and Euclidean distance to the nearest centroid, per embedding."""
    d2 = (
        (embeddings**2).sum(axis=1, keepdims=True)
        - 2.0 * embeddings @ centroids.T
        + (centroids**2).sum(axis=1)[None, :]
    )  # (N, K)
    index = d2.argmin(axis=1)
    return index, np.sqrt(np.maximum(d2[np.arange(len(embeddings)), index], 0.0))


@dataclass
class Prototypes:
    """Centroids `(K, H)`, member counts `(K,)` and the reference distance of a checkpoint's population."""

    centroids: np.ndarray
    counts: np.ndarray
    reference_distance: float
    pooling: str
    min_members: int
    reference_split: str

    def compare(self, embeddings: np.ndarray) -> tuple[float, float]:
        """(distance ratio, occupancy overlap) of `embeddings` `(N, H)` against these prototypes: the mean
        distance to the nearest centroid over the reference distance, and the Bhattacharyya coefficient of the
        clusters' shares of the embeddings and of the pretraining subjects."""
        index, distance = _nearest(
            np.asarray(embeddings, dtype=np.float64), self.centroids.astype(np.float64)
        )
        shares = np.bincount(index, minlength=len(self.counts)) / len(index)  # (K,)
        reference = self.counts / self.counts.sum()  # (K,)
        return float(distance.mean() / self.reference_distance), float(np.sqrt(shares * reference).sum())

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        metadata = {
            "format": PROTOTYPES_FORMAT,
            "version": str(FORMAT_VERSION),
            "pooling": self.pooling,
            "reference_distance": repr(float(self.reference_distance)),
            "reference_split": self.reference_split,
            "min_members": str(self.min_members),
        }
        tensors = {"centroids": self.centroids.astype(np.float32), "counts": self.counts.astype(np.int64)}
        target = Path(folder) / PROTOTYPES_FILE
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Prototypes | None:
        """The prototypes of a checkpoint folder, None where it has none; a malformed file raises a ValueError
        naming the file and the field."""
        from safetensors import safe_open

        path = Path(folder) / PROTOTYPES_FILE
        if not path.is_file():
            return None

        read_safetensors_header(path)  # sizes and offsets checked before anything is read
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != PROTOTYPES_FORMAT or metadata.get("version") != str(FORMAT_VERSION):
                raise ValueError(
                    f"{path}: metadata 'format'/'version' are not {PROTOTYPES_FORMAT!r} version 1"
                )
            if set(handle.keys()) != {"centroids", "counts"}:
                raise ValueError(
                    f"{path}: expected tensors 'centroids' and 'counts', found {sorted(handle.keys())}"
                )
            centroids, counts = handle.get_tensor("centroids"), handle.get_tensor("counts")
        try:
            reference = float(metadata["reference_distance"])
            min_members = int(metadata["min_members"])
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"{path}: metadata 'reference_distance'/'min_members' missing or invalid"
            ) from error
        if centroids.ndim != 2 or counts.shape != (len(centroids),) or not len(centroids):
            raise ValueError(
                f"{path}: 'centroids' {centroids.shape} and 'counts' {counts.shape} do not match"
            )
        if not math.isfinite(reference) or reference <= 0 or not np.isfinite(centroids).all():
            raise ValueError(f"{path}: field 'reference_distance' or 'centroids' is not finite and positive")
        return cls(
            centroids,
            counts,
            reference,
            metadata.get("pooling", "mean"),
            min_members,
            metadata.get("reference_split", ""),
        )


def count_code_subjects(
    events: Iterable[pl.DataFrame], codes: Iterable[str], years: list[int] | None = None
) -> dict[str, int]:
    """Number of distinct subjects per code, for `codes` only, over frames of events (each subject in one
    frame, as in MEDS shards). With a list `years`, the first and last calendar year of the timed events (other
    than MEDS_BIRTH) are put in it."""
    wanted = pl.Series("code", sorted(set(codes)), dtype=pl.String)
    totals: dict[str, int] = {}
    for frame in events:
        if years is not None:
            timed = frame.filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH_CODE))[
                "time"
            ].dt.year()
            if timed.len():
                found = [*years, int(timed.min()), int(timed.max())]
                years[:] = [min(found), max(found)]
        counts = (
            frame.filter(pl.col("code").is_in(wanted.implode()))
            .group_by("code")
            .agg(pl.col("subject_id").n_unique().alias("n"))
        )
        for code, n in counts.iter_rows():
            totals[code] = totals.get(code, 0) + int(n)
    return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))


def write_population_summary(
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    train_split: str = "train",
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Write `prototypes.safetensors` and `code_frequencies.json` into a pretrained checkpoint folder (see the
    module docstring) and return the model-card fields that describe them."""

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_codes = [code for code in tokenizer.vocab if not code.startswith("[")]
    years: list[int] = []
    frequencies = count_code_subjects(iter_split_events(data_dir, train_split), vocab_codes, years)
    # Counts below the subject threshold are never published: with a vocabulary fitted on this split none is, but
    # a vocabulary fitted elsewhere (continued pretraining on new data) may hold codes that are rare here.
    frequencies = {code: n for code, n in frequencies.items() if n >= tokenizer.min_code_count}
    write_json(
        output_dir / CODE_FREQUENCIES_FILE,
        {
            "format": CODE_FREQUENCIES_FORMAT,
            "version": FORMAT_VERSION,
            "min_code_count": tokenizer.min_code_count,
            "training_subject_total": len(train_dataset),
            "subject_count_by_code": frequencies,
        },
    )
    summary: dict[str, Any] = {
        "code_frequencies": CODE_FREQUENCIES_FILE,
        "codes_counted": len(frequencies),
        "time_span": (
            f"calendar year {years[0]}" if years[0] == years[1] else f"calendar years {years[0]}-{years[1]}"
        )
        if years
        else "no timed events",
    }
    dataset_file = Path(data_dir) / "metadata" / "dataset.json"
    if dataset_file.is_file():
        name = json.loads(dataset_file.read_text(encoding="utf-8")).get("dataset_name")
        if isinstance(name, str) and name:
            summary["dataset_name"] = name
    min_members = max(tokenizer.min_code_count, MIN_PROTOTYPE_MEMBERS)
    rng = np.random.default_rng(seed)
    n_train = len(train_dataset)
    index = np.sort(rng.choice(n_train, size=min(n_train, MAX_EMBEDDED_SUBJECTS), replace=False))
    embeddings = embed_sequences(model, tokenizer, train_dataset.select(index), batch_size)
    try:
        centroids, counts = fit_prototypes(embeddings, min_members, seed=seed)
    except ValueError as error:
        logger.warning("no prototypes written to %s: %s", output_dir, error)
        (output_dir / PROTOTYPES_FILE).unlink(missing_ok=True)
        return {**summary, "prototypes": None, "prototypes_missing_because": str(error)}
    reference_split, reference = "train (in-sample: no tuning subjects)", embeddings
    if eval_dataset is not None and len(eval_dataset) >= min_members:
        n_eval = len(eval_dataset)
        eval_index = np.sort(rng.choice(n_eval, size=min(n_eval, MAX_EMBEDDED_SUBJECTS), replace=False))
        reference = embed_sequences(model, tokenizer, eval_dataset.select(eval_index), batch_size)
        reference_split = "tuning"
    _, distance = _nearest(reference.astype(np.float64), centroids.astype(np.float64))
    prototypes = Prototypes(
        centroids,
        counts,
        float(distance.mean()),
        model.config.classifier_pooling,
        min_members,
        reference_split,
    )
    prototypes.save(output_dir)
    return {
        **summary,
        "prototypes": f"{len(counts)} k-means centroids of {int(counts.sum()):,} training subjects' pooled "
        f"embeddings (each the mean of >= {min_members} subjects); reference distance from the "
        f"{reference_split} split",
    }


__all__ = ["Prototypes", "fit_prototypes", "count_code_subjects", "write_population_summary"]
