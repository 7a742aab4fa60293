"""Training and inference throughput of EHRTransformerForMaskedEventModeling against transformers' BertForMaskedLM.

    python -m benchmarks.throughput --output benchmarks/results/throughput.json [--repeats 5] [--threads 2]

Both models have the same hidden size, layers, heads, feed-forward width and vocabulary and see the same batches
(the same event ids, attention masks and masked positions; ours also gets values, times and ages), one training
step = forward + backward + AdamW step. The two are measured in one run, alternating, and each figure is the
median over `--repeats` rounds. Throughput counts real (non-padding) events per second.

Three length distributions:
- equal_lengths: every sample has 512 events;
- long_tailed: sample lengths of the real eICU demo stays (events per stay in the mortality24 and los cohorts of
  ../shared/data/yaib_demo, capped at 512); where that data is absent, a log-normal with the same median and
  99th percentile as measured on it (see LOGNORMAL_FALLBACK);
- many_short: batches of `--many_short_batch_size` (128) short timelines, log-normal lengths with median 30 and
  99th percentile 150 (MANY_SHORT), the case of the batched variable-length attention.
Batches are drawn at random (not grouped by length), padded to their longest sample, as a user's DataLoader would.
Packed (`<case>_packed` for each case of `--packed`, default long_tailed and many_short): the same batches with
their subjects packed first-fit into rows no wider than the batch's longest subject, as `--pack_sequences` packs
them (`ehr_transformer.data.collators.pack_batch`); ours on the packed batches against ours and BERT on the
unpacked ones, the three alternating (BERT has no per-subject attention, so it cannot take packed rows).
Each hidden size of `--hidden_size` (128 and 256) is measured in the same run; the first one's results are at the
top level of the JSON, the others under `hidden_<size>`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from benchmarks import common
from ehr_transformer import EHRTransformerConfig, EHRTransformerForMaskedEventModeling
from ehr_transformer.data.collators import pack_batch
from ehr_transformer.utils import write_json

MAX_LENGTH = 512
# Median and 99th percentile of events per stay in the eICU demo mortality24 + los cohorts, measured with
# `sample_lengths` on 2026-11-22; used only where ../shared/data is absent.
LOGNORMAL_FALLBACK = {"median": 203.0, "p99": 512.0}
# Many short timelines (e.g. one admission's first hours): the lengths of the many_short case.
MANY_SHORT = {"median": 30.0, "p99": 150.0}


def lognormal_lengths(median: float, p99: float, n: int, rng: np.random.Generator) -> np.ndarray:
    sigma = math.log(p99 / median) / 2.326
    return rng.lognormal(math.log(median), sigma, size=n).round().clip(8, MAX_LENGTH).astype(int)


def sample_lengths(data: Path | None, n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Event counts per stay of the eICU demo cohorts (non-null measurements + static events + [CLS]) in `data`;
    the log-normal fallback where `data` is None or holds neither cohort."""
    import polars as pl

    counts = []
    for task in ("mortality24", "los"):
        dyn = data / task / "eicu_demo" / "dyn.parquet" if data is not None else None
        if dyn is None or not dyn.exists():
            continue
        frame = pl.read_parquet(dyn)
        value_columns = [c for c in frame.columns if c not in ("stay_id", "time")]
        per_row = frame.select(
            pl.col("stay_id"), pl.sum_horizontal(pl.col(value_columns).is_not_null()).alias("n")
        )
        counts.append(per_row.group_by("stay_id").agg(pl.col("n").sum())["n"].to_numpy().astype(np.int64) + 6)
    if counts:
        pool = np.minimum(np.concatenate(counts), MAX_LENGTH)
        return rng.choice(pool, size=n), f"eICU demo stays from {data}"
    lengths = lognormal_lengths(LOGNORMAL_FALLBACK["median"], LOGNORMAL_FALLBACK["p99"], n, rng)
    return lengths, "log-normal fallback (data absent)"


def make_batches(lengths: np.ndarray, batch_size: int, vocab_size: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lengths) - batch_size + 1, batch_size):
        chunk = lengths[start : start + batch_size]
        seq_len = int(chunk.max())
        mask = (torch.arange(seq_len)[None, :] < torch.as_tensor(chunk)[:, None]).long()  # (B, L)
        input_ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=g) * mask
        input_ids[:, 0] = 3
        values = torch.randn(batch_size, seq_len, generator=g).masked_fill(
            torch.rand(batch_size, seq_len, generator=g) < 0.5, float("nan")
        )
        times = torch.cumsum(torch.rand(batch_size, seq_len, generator=g), dim=1)
        ages = torch.full((batch_size, seq_len), 65.0)
        selected = (torch.rand(batch_size, seq_len, generator=g) < 0.15) & mask.bool()
        selected[:, 1] = True
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
        batches.append(
            dict(
                input_ids=input_ids, attention_mask=mask, values=values, times=times, ages=ages, labels=labels
            )
        )
    return batches


def build_models(args, vocab_size: int, hidden_size: int):
    torch.manual_seed(0)
    ours = EHRTransformerForMaskedEventModeling._from_config(
        EHRTransformerConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=4 * hidden_size,
        ),
        attn_implementation="sdpa",
    )
    bert = BertForMaskedLM._from_config(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=MAX_LENGTH,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.0,
        ),
        attn_implementation="sdpa",
    )
    return {"ours": ours, "bert": bert}


def bert_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def train_events_per_second(model, batches, is_ours: bool) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    events = 0
    started = time.perf_counter()
    for batch in batches:
        loss = model(**(batch if is_ours else bert_inputs(batch))).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events += int((batch["attention_mask"] != 0).sum())  # a packed mask numbers its subjects 1, 2, ...
    return events / (time.perf_counter() - started)


@torch.no_grad()
def inference_patients_per_second(model, batches, is_ours: bool) -> float:
    model.eval()
    patients = 0
    started = time.perf_counter()
    for batch in batches:
        inputs = {k: v for k, v in (batch if is_ours else bert_inputs(batch)).items() if k != "labels"}
        model(**inputs)
        patients += batch["input_ids"].shape[0]
    return patients / (time.perf_counter() - started)


@torch.no_grad()
def single_patient_latency_ms(model, batch, is_ours: bool, n: int = 20) -> float:
    model.eval()
    length = int(batch["attention_mask"][0].sum())
    inputs = {
        k: v[:1, :length] for k, v in (batch if is_ours else bert_inputs(batch)).items() if k != "labels"
    }
    timings = []
    for _ in range(n):
        started = time.perf_counter()
        model(**inputs)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def compare(measure, models, batches, repeats: int) -> dict:
    """Alternate ours / BERT `repeats` times on the same batches; medians and their ratio."""
    measure(models["ours"], batches[:1], True)  # warm-up
    measure(models["bert"], batches[:1], False)
    rounds = {"ours": [], "bert": []}
    for _ in range(repeats):
        for name in ("ours", "bert"):
            rounds[name].append(measure(models[name], batches, name == "ours"))
    ours, bert = statistics.median(rounds["ours"]), statistics.median(rounds["bert"])
    return {"ours": ours, "bert": bert, "ratio": ours / bert, "rounds": rounds}


def pack(batches: list[dict]) -> list[dict]:
    """`batches` with the subjects of each packed into rows no wider than its longest subject (`pack_batch`, as
    `--pack_sequences`): the attention mask numbers the subjects of a row 1, 2, ..., so attention stays within each."""
    return [pack_batch(batch, pad_token_id=0)[0] for batch in batches]


def compare_packed(models, batches, packed, repeats: int) -> dict:
    """Ours on the packed batches, ours and BERT on the unpacked ones, alternating `repeats` times; medians."""
    runs = {
        "ours_packed": (models["ours"], packed, True),
        "ours": (models["ours"], batches, True),
        "bert": (models["bert"], batches, False),
    }
    for model, measured, is_ours in runs.values():  # warm-up
        train_events_per_second(model, measured[:1], is_ours)
    rounds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, measured, is_ours) in runs.items():
            rounds[name].append(train_events_per_second(model, measured, is_ours))
    return {**{name: statistics.median(r) for name, r in rounds.items()}, "rounds": rounds}


def training_cases(args, models, data, rng) -> dict:
    """Training throughput of ours and BERT on the three length distributions."""
    n = args.batch_size * args.batches
    long_lengths, source = sample_lengths(data, n, rng)
    short_lengths = lognormal_lengths(
        MANY_SHORT["median"], MANY_SHORT["p99"], args.many_short_batch_size * args.many_short_batches, rng
    )
    cases = (
        ("equal_lengths", np.full(n, MAX_LENGTH), args.batch_size),
        ("long_tailed", long_lengths, args.batch_size),
        ("many_short", short_lengths, args.many_short_batch_size),
    )
    results: dict = {}
    for name, lengths, batch_size in cases:
        batches = make_batches(lengths, batch_size, args.vocab_size, seed=1)
        train = compare(train_events_per_second, models, batches, args.repeats)
        padded = sum(b["attention_mask"].numel() for b in batches)
        results[name] = {
            "ours_events_per_s": train["ours"],
            "bert_events_per_s": train["bert"],
            "ratio": train["ratio"],
            "batch_size": batch_size,
            "real_event_share_of_padded_batches": sum(int(b["attention_mask"].sum()) for b in batches)
            / padded,
            "length_median": float(np.median(lengths)),
            "length_p99": float(np.percentile(lengths, 99)),
            "rounds": train["rounds"],
        }
        print(
            f"{name:>14}: ours {train['ours']:9.0f} events/s  BERT {train['bert']:9.0f} events/s  "
            f"ratio {train['ratio']:.2f}"
        )
        if name not in args.packed:
            continue
        packed = pack(batches)
        train = compare_packed(models, batches, packed, args.repeats)
        results[f"{name}_packed"] = {
            "ours_events_per_s": train["ours_packed"],
            "ours_unpacked_events_per_s": train["ours"],
            "bert_events_per_s": train["bert"],
            "ratio": train["ours_packed"] / train["bert"],
            "packed_over_unpacked": train["ours_packed"] / train["ours"],
            "batch_size": batch_size,
            "rows_per_packed_batch": statistics.mean(b["input_ids"].shape[0] for b in packed),
            "real_event_share_of_packed_batches": sum(int((b["attention_mask"] != 0).sum()) for b in packed)
            / sum(b["attention_mask"].numel() for b in packed),
            "rounds": train["rounds"],
        }
        print(
            f"{name + '_packed':>14}: ours {train['ours_packed']:9.0f} events/s  (unpacked {train['ours']:9.0f})  "
            f"BERT {train['bert']:9.0f} events/s  packed / unpacked {train['ours_packed'] / train['ours']:.2f}"
        )
    results["long_tailed"]["length_source"] = source
    results["many_short"]["length_source"] = (
        f"log-normal, median {MANY_SHORT['median']}, p99 {MANY_SHORT['p99']}"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="throughput.json")
    parser.add_argument(
        "--data", default=None, help="YAIB demo cohorts (default: ../shared/data/yaib_demo where present)"
    )
    parser.add_argument("--hidden_size", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6, help="batches per measurement round")
    parser.add_argument("--many_short_batch_size", type=int, default=128)
    parser.add_argument("--many_short_batches", type=int, default=2, help="many_short batches per round")
    parser.add_argument(
        "--packed",
        nargs="*",
        default=["long_tailed", "many_short"],
        choices=["equal_lengths", "long_tailed", "many_short"],
        help="cases also measured with packed rows (none: --packed with no name)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = common.command_line("throughput", argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else common.shared_data("yaib_demo")

    results: dict = {}
    parameters = {}
    for i, hidden_size in enumerate(args.hidden_size):
        print(f"hidden size {hidden_size}")
        rng = np.random.default_rng(0)
        models = build_models(args, args.vocab_size, hidden_size)
        parameters[str(hidden_size)] = {
            name: sum(p.numel() for p in m.parameters()) for name, m in models.items()
        }
        cases = training_cases(args, models, data, rng)
        if i > 0:
            results[f"hidden_{hidden_size}"] = cases
            continue
        results.update(cases)
        inference_lengths, _ = sample_lengths(data, 128, rng)
        batches = make_batches(inference_lengths, 64, args.vocab_size, seed=2)  # 2 batches of 64 patients
        inference = compare(inference_patients_per_second, models, batches, args.repeats)
        latency = {
            name: single_patient_latency_ms(models[name], batches[0], name == "ours")
            for name in ("ours", "bert")
        }
        results["inference"] = {
            "ours_patients_per_s": inference["ours"],
            "bert_patients_per_s": inference["bert"],
            "ratio": inference["ratio"],
            "ours_single_patient_latency_ms": latency["ours"],
            "bert_single_patient_latency_ms": latency["bert"],
            "lengths": "long_tailed",
            "hidden_size": hidden_size,
        }
        print(
            f"     inference: ours {inference['ours']:.0f} patients/s  BERT {inference['bert']:.0f} patients/s  "
            f"latency ours {latency['ours']:.1f} ms  BERT {latency['bert']:.1f} ms"
        )
    results["meta"] = {
        **common.metadata(command, started, args.threads),
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "output"},
            "data": str(data) if data else None,
        },
        "model": {
            k: getattr(args, k) for k in ("hidden_size", "layers", "heads", "vocab_size", "batch_size")
        },
        "parameters": parameters,
    }
    write_json(args.output, results)


if __name__ == "__main__":
    main()
