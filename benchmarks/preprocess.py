"""Cost of the data path: MEDS shards -> validated -> tokenizer fitted -> tokenized `datasets.Dataset`s.

    python -m benchmarks.preprocess --subjects 1000 10000 100000 --output benchmarks/results/preprocess.json

For each N a synthetic MEDS cohort of N subjects is written first (not timed), then a fresh process times reading
and validating every shard, fitting the tokenizer on the training split and building the tokenized dataset of
every split (train, tuning, held_out: every event is read, validated and encoded). Peak resident memory is that
process's maximum RSS. Shards hold 10,000 subjects and are processed one at a time, so memory should stay flat
while time grows linearly with events.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def measure(meds_dir: str, cache_dir: str) -> dict:
    """Runs in a fresh process: time validated reading + tokenizer fit + tokenized datasets of all splits."""
    from ehr_transformer.data.dataset import build_pretraining_dataset
    from ehr_transformer.data.splits import summarize
    from ehr_transformer.training.arguments import DataArguments
    from ehr_transformer.training.checkpoint import fit_tokenizer

    events = summarize(meds_dir)["n_events"]
    started = time.perf_counter()
    tokenizer = fit_tokenizer(DataArguments(data_dir=meds_dir, max_length=512, min_code_count=10))
    rows = sum(
        len(build_pretraining_dataset(meds_dir, tokenizer, split, cache_dir=cache_dir))
        for split in ("train", "tuning", "held_out")
    )
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"events": events, "samples": rows, "seconds": seconds, "peak_rss_mib": peak_kib / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--output", default="preprocess.json")
    parser.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(*args._measure)))
        return

    from ehr_transformer.data.synthetic import write_synthetic_meds
    from ehr_transformer.utils import write_json

    results = []
    for n in args.subjects:
        with tempfile.TemporaryDirectory() as tmp:
            write_synthetic_meds(Path(tmp) / "meds", n_subjects=n, seed=0)
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.preprocess", "--_measure", f"{tmp}/meds", f"{tmp}/cache"],
                cwd=common.REPO_ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
        row = {"subjects": n, **row, "events_per_s": row["events"] / row["seconds"]}
        results.append(row)
        print(
            f"{n:>7} subjects  {row['events']:>11,} events  {row['seconds']:7.1f} s  "
            f"{row['events_per_s']:>10,.0f} events/s  peak RSS {row['peak_rss_mib']:6.0f} MiB",
            flush=True,
        )
    write_json(args.output, results)
    print(f"written to {args.output} ({common.machine()})")


if __name__ == "__main__":
    main()
