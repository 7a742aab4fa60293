"""bf16 pretraining throughput and model FLOPs utilisation (MFU) on one CUDA GPU: padded or packed batches,
sdpa / flash / flex attention, with or without `torch.compile`.

    python -m benchmarks.gpu --output benchmarks/results/gpu.json [--layout packed|padded|equal]
        [--attn sdpa flex_attention flash_attention_2] [--compile both] [--peak_tflops T]
    python -m benchmarks.gpu --cpu_smoke    # every path on a tiny model on CPU, a few steps: no timing, no MFU

A ~110M-parameter EHRTransformerForMaskedEventModeling (hidden 768, 12 layers, 12 heads, feed-forward 3072,
vocabulary 32,768), rows of 512 events, bf16 autocast, AdamW (fused), masked-event + value objectives. Layouts:
- `equal`: every row is one subject of 512 events (no padding);
- `packed`: subjects with log-normal lengths (median 30, 99th percentile 150, as the many_short case of
  `benchmarks.throughput`) packed first-fit into rows of 512; the attention mask numbers the subjects of a row
  1, 2, 3, ... so that attention never crosses subjects (the padding-free path runs them as variable-length);
- `padded`: the same subjects, one per row, padded to the longest of the batch.
Every attention implementation of `--attn` and compile setting of `--compile` is measured in one run.

MFU = achieved model FLOPs / peak dense bf16 FLOPs of the GPU. Model FLOPs per step count real events only:
6 * (non-embedding parameters) * events + 12 * layers * hidden * sum over subjects of length^2 (attention
scores and weighted values within each subject, forward and backward), the accounting of the PaLM appendix.
Without a GPU it exits with a message (or runs `--cpu_smoke`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks import common
from ehr_transformer import EHRTransformerConfig, EHRTransformerForMaskedEventModeling
from ehr_transformer.utils import write_json

# Dense bf16 peak (no sparsity), TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
SHORT = {"median": 30.0, "p99": 150.0}


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak_tflops with its dense bf16 peak")


def subject_lengths(n_events: int, seq_len: int, rng: np.random.Generator) -> list[int]:
    """Log-normal subject lengths (capped at `seq_len`) adding up to about `n_events`."""
    sigma = math.log(SHORT["p99"] / SHORT["median"]) / 2.326
    lengths, total = [], 0
    while total < n_events:
        length = int(np.clip(round(rng.lognormal(math.log(SHORT["median"]), sigma)), 8, seq_len))
        lengths.append(length)
        total += length
    return lengths


def layout_rows(layout: str, batch_size: int, seq_len: int, rng) -> tuple[list[list[int]], int]:
    """The subjects' lengths of each row, and the row length."""
    if layout == "equal":
        return [[seq_len] for _ in range(batch_size)], seq_len
    lengths = subject_lengths(batch_size * seq_len, seq_len, rng)
    if layout == "padded":
        rows = [[n] for n in lengths[:batch_size]]
        return rows, max(n for [n] in rows)
    rows, room = [], []
    for n in sorted(lengths, reverse=True):  # first-fit decreasing
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(n)
                room[i] -= n
                break
        else:
            if len(rows) == batch_size:
                continue
            rows.append([n])
            room.append(seq_len - n)
    return rows, seq_len


def make_batch(rows: list[list[int]], seq_len: int, vocab_size: int, device) -> dict:
    """A pretraining batch whose row r holds subjects of lengths rows[r], numbered 1, 2, ... in attention_mask."""
    g = torch.Generator(device="cpu").manual_seed(0)
    batch_size = len(rows)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    times = torch.zeros(batch_size, seq_len)
    input_ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=g)
    for r, row in enumerate(rows):
        start = 0
        for k, n in enumerate(row):
            mask[r, start : start + n] = k + 1
            input_ids[r, start] = 3  # [CLS] first
            times[r, start : start + n] = torch.rand(n, generator=g).cumsum(0)
            start += n
    real = mask > 0
    input_ids = input_ids * real
    values = torch.randn(batch_size, seq_len, generator=g).masked_fill(
        (torch.rand(batch_size, seq_len, generator=g) < 0.5) | ~real, float("nan")
    )
    selected = (torch.rand(batch_size, seq_len, generator=g) < 0.15) & real
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    value_targets = (torch.rand(batch_size, seq_len, generator=g) < 0.3) & ~selected & ~torch.isnan(values)
    value_labels = torch.where(value_targets, values, torch.full_like(values, float("nan")))
    batch = dict(
        input_ids=input_ids,
        attention_mask=mask,
        values=values.masked_fill(value_targets, float("nan")),
        times=times,
        ages=torch.full((batch_size, seq_len), 65.0),
        labels=labels,
        value_labels=value_labels,
    )
    return {k: v.to(device) for k, v in batch.items()}


def available(attn: str) -> bool:
    if attn.startswith("flash_attention_"):
        package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(attn)
        return package is not None and importlib.util.find_spec(package) is not None
    if attn == "flex_attention":
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return True


def measure(args, config, rows, seq_len, attn: str, compile_model: bool, device) -> dict:
    torch.manual_seed(0)
    model = EHRTransformerForMaskedEventModeling._from_config(config, attn_implementation=attn).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.model.embeddings.code_embeddings.weight.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    batch = make_batch(rows, seq_len, config.vocab_size, device)
    events = sum(sum(row) for row in rows)
    squares = sum(n * n for row in rows for n in row)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    timings = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step()
        sync()
        timings.append(time.perf_counter() - started)
    seconds = statistics.median(timings)
    flops = (
        6 * (n_params - n_embedding) * events + 12 * config.num_hidden_layers * config.hidden_size * squares
    )
    result = {
        "attn_implementation": attn,
        "compile": compile_model,
        "rows": len(rows),
        "seq_len": seq_len,
        "subjects": sum(len(row) for row in rows),
        "real_event_share": events / (len(rows) * seq_len),
        "parameters": n_params,
        "loss": float(loss.detach()),
        "step_seconds_median": seconds,
        "events_per_s": events / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu.json")
    parser.add_argument(
        "--layout", nargs="+", default=["packed", "equal"], choices=["packed", "padded", "equal"]
    )
    parser.add_argument("--batch_size", type=int, default=32, help="rows per batch")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--attn",
        nargs="+",
        default=["sdpa", "flex_attention", "flash_attention_2"],
        help="attention implementations (those not installed are left out and said so)",
    )
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument(
        "--cpu_smoke",
        action="store_true",
        help="tiny model, CPU, 2 steps: checks the paths run, measures nothing",
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        config = EHRTransformerConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        )
        args.seq_len, args.batch_size, args.steps, args.warmup = 64, 4, 2, 0
        # FlexAttention has no backward on CPU and torch.compile would build C++; flash needs CUDA
        args.attn, compiles = ["sdpa", "eager"], [False]
    elif not torch.cuda.is_available():
        sys.exit(
            "python -m benchmarks.gpu needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False). "
            "`--cpu_smoke` runs its paths on a tiny model on CPU."
        )
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        config = EHRTransformerConfig(
            vocab_size=32768,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_dropout_prob=0.1,
            embedding_dropout=0.1,
        )
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    command = common.command_line("gpu", argv)
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke test)"
    peak = None if args.cpu_smoke else peak_tflops(name, args.peak_tflops)
    missing = [attn for attn in args.attn if not available(attn)]
    runs = []
    for layout in args.layout:
        rows, seq_len = layout_rows(layout, args.batch_size, args.seq_len, np.random.default_rng(0))
        for attn in (a for a in args.attn if a not in missing):
            for compile_model in compiles:
                try:
                    run = {
                        "layout": layout,
                        **measure(args, config, rows, seq_len, attn, compile_model, device),
                    }
                except Exception as error:  # one failing path must not hide the others' figures
                    run = {"layout": layout, "attn_implementation": attn, "compile": compile_model}
                    run["error"] = f"{type(error).__name__}: {error}"[:500]
                if peak and "model_tflops_per_s" in run:
                    run["mfu"] = run["model_tflops_per_s"] / peak
                runs.append(run)
                print(
                    f"{layout:>7} {attn:>18} compile={compile_model!s:5} "
                    + (
                        run["error"][:120]
                        if "error" in run
                        else f"{run['events_per_s']:10.0f} events/s  {run['model_tflops_per_s']:7.1f} TFLOP/s"
                        + (f"  MFU {run['mfu']:.1%}" if "mfu" in run else "")
                    ),
                    flush=True,
                )
    result = {
        "gpu": name,
        "peak_bf16_tflops": peak,
        "not_installed": missing,
        "runs": runs,
        "torch": torch.__version__,
        "meta": common.metadata(command, started),
    }
    if args.cpu_smoke:
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
        errors = [run for run in runs if "error" in run]
        if errors:
            sys.exit(f"{len(errors)} path(s) failed: {errors}")
        return
    write_json(args.output, result)


if __name__ == "__main__":
    main()
