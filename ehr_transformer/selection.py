"""Share and choose checkpoints: population prototypes saved with a pretrained checkpoint, a selector that ranks
candidate checkpoints for a user's MEDS dataset, LogME, and pushing a complete checkpoint folder to the hub.

What a pretrained folder carries for selection (written by :func:`write_population_summary` right after
pretraining, from the training split only):

- ``prototypes.safetensors``: k-means centroids of the backbone's pooled embeddings of the training subjects, with
  the number of subjects behind each (``centroids`` (K, H) float32, ``counts`` (K,) int64) and, in the header's
  metadata, the pooling used and the *reference distance*: the mean distance of subjects of the tuning split
  (not used to fit the centroids) to their nearest centroid. No individual's vector is stored: a cluster with fewer
  than ``max(min_code_count, MIN_PROTOTYPE_MEMBERS)`` members is dissolved and its members are merged into the
  nearest remaining cluster (repeatedly), so every centroid is a mean over at least that many subjects, the same
  privacy threshold the vocabulary uses for codes.
- ``code_frequencies.json``: for every code of the vocabulary (codes below ``min_code_count`` subjects are not in
  it), the number of training subjects with that code; a count below ``min_code_count`` is never written.

The selector (:func:`select_checkpoints`, command ``ehr-transformer select``) never needs a candidate's training
data. For each candidate it computes, on the user's data (a seeded sample of the chosen split, ``train`` by
default, so held-out subjects stay untouched):

(a) ``coverage``: the share of the user's events (``MEDS_BIRTH`` aside, which is never a token) whose code is in
    the candidate's vocabulary. Events with unknown codes reach the model as ``[UNK]`` without their value.
    ``code_coverage``: the same over distinct (subject, code) pairs, so a code counts once per subject however
    often it repeats. Hourly vitals and labs make most events; a missing diagnosis or medication system barely
    moves event coverage although it removes a whole kind of information, which code coverage shows. The
    combined score uses ``code_coverage`` (chosen on the development zoo of ``benchmarks/selection.py --zoo dev``,
    where event coverage ranked a checkpoint without the medication codes above one with them).
(b) ``fit``: the user's subjects are embedded by the candidate's backbone as its prototypes were, and each is
    assigned to its nearest prototype. Two things are compared with the pretraining population: how far the
    subjects lie from the prototypes (``distance_ratio``: their mean distance to the nearest prototype over the
    candidate's reference distance; about 1 for data like the pretraining population, larger the further away),
    and whether they fall into the clusters in the same proportions (``occupancy_overlap``: the Bhattacharyya
    coefficient sum_k sqrt(p_k q_k) of the prototypes' shares p_k of the pretraining subjects and the user's
    shares q_k; 1 for the same mix, 0 for disjoint clusters). A population that is near the prototypes but piles
    into a few of them, or spreads evenly but far away, fits less. ``fit = occupancy_overlap * min(1, 1 /
    distance_ratio)``.
(c) ``transferability`` (only with ``labels``): LogME (You et al., ICML 2021), the per-sample log marginal
    likelihood (evidence) of the labels under a Bayesian linear model on the frozen pooled features, evidence
    maximised over the prior and noise precisions by the paper's fixed-point updates (:func:`logme`).

``combined = code_coverage * fit * exp(transferability - best transferability among the candidates)``: the share
of the data the model can read, times how typical the data look to it, times the geometric-mean per-sample ratio of
label evidence against the best candidate's; each factor is in (0, 1]. A component missing for any candidate (no
prototypes, no labels) is left out of the product for all candidates, so the scores stay comparable. The formula
was fixed before the benchmark (``benchmarks/selection.py``) was run; nothing was tuned on its cases.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from transformers.utils.hub import PushToHubMixin, hf_api

from .utils import atomic_path, write_json

logger = logging.getLogger(__name__)

PROTOTYPES_FILE = "prototypes.safetensors"
CODE_FREQUENCIES_FILE = "code_frequencies.json"
PROTOTYPES_FORMAT = "ehr_prototypes"
CODE_FREQUENCIES_FORMAT = "ehr_code_frequencies"
FORMAT_VERSION = 1
MIN_PROTOTYPE_MEMBERS = 10  # a centroid is the mean of at least this many subjects (and of min_code_count)
MAX_PROTOTYPES = 16
MAX_EMBEDDED_SUBJECTS = 5000  # subjects embedded at save time to fit the prototypes (a seeded sample)
BIRTH_CODE = "MEDS_BIRTH"
# The files that make a checkpoint folder complete and shareable; nothing else of an output folder is uploaded
# (Trainer checkpoints, optimizer pickles, logs, `training_args.bin` stay local).
SHAREABLE_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "event_tokenizer.json",
    "README.md",
    "configuration_ehr.py",
    "modeling_ehr.py",
    PROTOTYPES_FILE,
    CODE_FREQUENCIES_FILE,
)


# ------------------------------------------------------------------------------------------------ embeddings
@torch.no_grad()
def embed_sequences(model, tokenizer, rows: Any, batch_size: int = 64) -> np.ndarray:
    """Pooled backbone embeddings `(N, H)` float32 of encoded rows (a `datasets.Dataset` or a polars frame from
    `EHREventTokenizer.encode_events`, with input_ids/values/times/ages), in row order. `model` is any
    `EHRTransformer*` model (its backbone is used, with `config.classifier_pooling`)."""
    from .data.collators import DataCollatorForEventClassification

    backbone = model.base_model
    was_training = backbone.training
    backbone.eval()
    collator = DataCollatorForEventClassification(tokenizer)
    columns = ["input_ids", "values", "times", "ages"]
    if isinstance(rows, pl.DataFrame):
        data = {name: rows[name].to_list() for name in columns}
    else:
        data = {name: rows[name] for name in columns}
    n = len(data["input_ids"])
    hidden = backbone.config.hidden_size
    if n == 0:
        return np.zeros((0, hidden), dtype=np.float32)
    order = np.argsort(
        [len(ids) for ids in data["input_ids"]], kind="stable"
    )  # similar lengths: little padding
    out = np.zeros((n, hidden), dtype=np.float32)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        features = [{name: data[name][i] for name in columns} for i in index]
        batch = {k: v.to(backbone.device) for k, v in collator(features).items()}
        pooled = backbone(**batch).pooler_output.float()  # (B, H)
        out[index] = pooled.cpu().numpy()
    backbone.train(was_training)
    return out


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
        from .safety import read_safetensors_header

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
            centroids, counts, reference, metadata.get("pooling", "mean"), min_members,
            metadata.get("reference_split", ""),
        )  # fmt: skip


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
    from .training import iter_split_events

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


# ------------------------------------------------------------------------------------------------ LogME
def logme(features: np.ndarray, targets: np.ndarray, regression: bool = False, max_iter: int = 100) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021):
    the maximised log evidence per sample of `targets` under y = F w + noise, w ~ N(0, 1/alpha), noise ~
    N(0, 1/beta), on `features` F `(N, D)`. Classification: the mean over the one-hot columns of the class ids
    in `targets` `(N,)`; regression: the mean over the columns of `targets` `(N,)` or `(N, T)`.

    For one column y, with F^T F = V diag(s) V^T and z = V^T F^T y, repeat until alpha and beta settle:
        gamma = sum_i beta s_i / (alpha + beta s_i);   m = V (beta z / (alpha + beta s))
        alpha = gamma / |m|^2;   beta = (N - gamma) / |F m - y|^2
    then  L = N/2 log beta + D/2 log alpha - N/2 log 2 pi - beta/2 |F m - y|^2 - alpha/2 |m|^2
              - 1/2 sum_i log(alpha + beta s_i),  returned as L / N.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    y = np.asarray(targets)
    if regression:
        columns = y.reshape(len(y), -1).astype(np.float64)
    else:
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"LogME needs at least two classes in the labels, got {classes.tolist()}")
        columns = (y.reshape(-1, 1) == classes.reshape(1, -1)).astype(np.float64)
    if len(columns) != len(f):
        raise ValueError(f"{len(f)} feature rows but {len(columns)} labels")
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)  # (D,), (D, D)
    s = np.clip(s, 0.0, None)
    evidences = []
    for y_col in columns.T:
        z = v.T @ (f.T @ y_col)  # (D,)
        yy = float(y_col @ y_col)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            denominator = alpha + beta * s
            gamma = float((beta * s / denominator).sum())
            m = beta * z / denominator  # (D,) in the eigenbasis
            mm = float(m @ m)
            residual = max(yy - 2.0 * float(m @ z) + float((s * m * m).sum()), 1e-12)  # |F m - y|^2
            new_alpha, new_beta = gamma / max(mm, 1e-12), (n - gamma) / residual
            settled = abs(new_alpha - alpha) / alpha < 1e-5 and abs(new_beta - beta) / beta < 1e-5
            alpha, beta = new_alpha, new_beta
            if settled:
                break
        denominator = alpha + beta * s
        m = beta * z / denominator
        mm = float(m @ m)
        residual = max(yy - 2.0 * float(m @ z) + float((s * m * m).sum()), 1e-12)
        evidence = (
            n / 2 * math.log(beta)
            + d / 2 * math.log(alpha)
            - n / 2 * math.log(2 * math.pi)
            - beta / 2 * residual
            - alpha / 2 * mm
            - 0.5 * float(np.log(denominator).sum())
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


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


def resolve_candidate(candidate: str | os.PathLike) -> Path:
    """A local checkpoint folder as is; otherwise a hub id, fetched with `huggingface_hub.snapshot_download`
    (only the files of a shareable checkpoint; offline, only from the local cache)."""
    path = Path(candidate)
    if path.is_dir():
        return path
    text = str(candidate)
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{candidate}: no such checkpoint folder (and not a hub id of the form owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(SHAREABLE_FILES)))
    except Exception as error:  # offline, unknown repo, no access: say which candidate and why
        raise FileNotFoundError(
            f"{candidate}: not a local folder, and the hub id could not be fetched ({error})"
        ) from error


def _sample_subjects(
    data_dir: str | os.PathLike, split: str | None, max_subjects: int, seed: int
) -> list[int]:
    from .data.meds import read_subject_splits

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
    from .data.dataset import _resolve_label_column
    from .data.meds import read_labels, validate_labels

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

    from .safety import check_checkpoint_folder
    from .tokenization_ehr import EHREventTokenizer

    check_checkpoint_folder(path)  # refuse pickle-only or absurd folders before loading anything
    tokenizer = EHREventTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a pretrained folder's heads are not needed: no "unexpected keys" report
    try:
        model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
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
    from .data.meds import read_events

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
                str(s["rank"]), s["candidate"], cell(s["coverage"]),
                cell(s["code_coverage"]), cell(s["fit"]), cell(s["distance_ratio"], 2),
                cell(s["occupancy_overlap"]),
                cell(s["transferability"]), cell(s["combined"]),
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append(f"combined = product of {', '.join(result['components'])} (see ehr_transformer.selection)")
    return "\n".join(lines)


def write_ranking(result: dict[str, Any], output: str | os.PathLike) -> Path:
    """The ranking as JSON, written atomically."""
    return write_json(output, result)


# ------------------------------------------------------------------------------------------------ sharing
def shareable_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint folder that make it complete: weights, config, tokenizer, card, modeling code,
    prototypes and code frequencies (those present). Refuses a folder that `check_checkpoint_folder` refuses."""
    from .safety import check_checkpoint_folder

    folder = Path(folder)
    checked = check_checkpoint_folder(folder)
    names = set(SHAREABLE_FILES) | {p.name for p in checked.weight_files}
    files = sorted(folder / name for name in names if (folder / name).is_file())
    missing = [name for name in ("config.json", "event_tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: {', '.join(missing)} missing; a shared checkpoint must be complete")
    return files


class CheckpointFolder(PushToHubMixin):
    """A saved checkpoint folder as a `transformers` `PushToHubMixin`: `save_pretrained` copies its shareable
    files (:func:`shareable_files`), and `push_to_hub` creates the repository (`create_repo(exist_ok=True)`) and
    commits them with the mixin's `_upload_modified_files`, as `model.push_to_hub` does. Unlike
    `model.push_to_hub`, the tokenizer, model card, prototypes and code frequencies go along, and the card stays
    ours rather than a generated one; Trainer state, logs and pickles never leave the machine."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files = shareable_files(self.folder)
        if (self.folder / "README.md").is_file():
            from .model_card import read_card_metadata

            read_card_metadata(self.folder)  # the card's YAML must parse before it is published

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[Path]:
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(path, target / path.name)) for path in self.files]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = "Upload ehr-transformer checkpoint",
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs,
    ) -> Any:
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return self._upload_modified_files(
                tmp, repo_id, files_timestamps={}, commit_message=commit_message, token=token,
                create_pr=create_pr, revision=revision, commit_description=commit_description,
            )  # fmt: skip


def push_checkpoint_to_hub(folder: str | os.PathLike, repo_id: str, **kwargs) -> Any:
    """Upload a complete checkpoint folder to the hub (see :class:`CheckpointFolder`); returns the commit info."""
    return CheckpointFolder(folder).push_to_hub(repo_id, **kwargs)


__all__ = [
    "CODE_FREQUENCIES_FILE",
    "PROTOTYPES_FILE",
    "CandidateScore",
    "CheckpointFolder",
    "Prototypes",
    "combine_scores",
    "count_code_subjects",
    "embed_sequences",
    "fit_prototypes",
    "format_ranking",
    "logme",
    "push_checkpoint_to_hub",
    "resolve_candidate",
    "score_candidate",
    "select_checkpoints",
    "shareable_files",
    "write_population_summary",
    "write_ranking",
]
