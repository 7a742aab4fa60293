"""bf16 pretraining throughput and model FLOPs utilisation (MFU) on one CUDA GPU.

    python -m benchmarks.gpu --output benchmarks/results/gpu.json [--compile] [--attn sdpa|flash_attention_2]

A ~110M-parameter EHRTransformerForMaskedEventModeling (hidden 768, 12 layers, 12 heads, feed-forward 3072,
vocabulary 32,768), sequences of 512 events, bf16 autocast, AdamW (fused), masked-event + value objectives.
MFU = achieved model FLOPs / peak dense bf16 FLOPs of the GPU, with model FLOPs per step counted as
6 * (non-embedding parameters) * tokens + 12 * layers * hidden * seq_len * tokens (attention scores and
weighted values, forward and backward), the usual accounting of the PaLM appendix. Exits with a message where no
GPU is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks import common
from ehr_transformer import EHRTransformerConfig, EHRTransformerForMaskedEventModeling
from ehr_transformer.utils import write_json

# Dense bf16 peak (no sparsity), TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak_tflops with its dense bf16 peak")


def make_batch(batch_size: int, seq_len: int, vocab_size: int, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(4, vocab_size, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 3
    values = torch.randn(batch_size, seq_len, generator=g).masked_fill(
        torch.rand(batch_size, seq_len, generator=g) < 0.5, float("nan")
    )
    selected = torch.rand(batch_size, seq_len, generator=g) < 0.15
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    value_targets = (torch.rand(batch_size, seq_len, generator=g) < 0.3) & ~selected & ~torch.isnan(values)
    value_labels = torch.where(value_targets, values, torch.full_like(values, float("nan")))
    batch = dict(
        input_ids=input_ids,
        attention_mask=torch.ones(batch_size, seq_len, dtype=torch.long),
        values=values.masked_fill(value_targets, float("nan")),
        times=torch.cumsum(torch.rand(batch_size, seq_len, generator=g), dim=1),
        ages=torch.full((batch_size, seq_len), 65.0),
        labels=labels,
        value_labels=value_labels,
    )
    return {k: v.to(device) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu.json")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak_tflops", type=float, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            "python -m benchmarks.gpu needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False)."
        )
    command = common.command_line("gpu", argv)
    started = time.perf_counter()

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
    model = EHRTransformerForMaskedEventModeling._from_config(config, attn_implementation=args.attn).to(
        device
    )
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.model.embeddings.code_embeddings.weight.numel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if args.compile else model
    batch = make_batch(args.batch_size, args.seq_len, config.vocab_size, device)
    tokens = args.batch_size * args.seq_len

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    timings = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    seconds = statistics.median(timings)

    flops_per_step = (
        6 * (n_params - n_embedding) * tokens
        + 12 * config.num_hidden_layers * config.hidden_size * args.seq_len * tokens
    )
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    result = {
        "gpu": name,
        "parameters": n_params,
        "attn_implementation": args.attn,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "step_seconds_median": seconds,
        "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": flops_per_step / seconds / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": flops_per_step / seconds / 1e12 / peak,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "torch": torch.__version__,
        "meta": common.metadata(command, started),
    }
    print(json.dumps(result, indent=2))
    write_json(args.output, result)


if __name__ == "__main__":
    main()
