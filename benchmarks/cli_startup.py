"""How long `ehr-transformer --help` and `ehr-transformer COMMAND --help` take, each in a fresh process.

    python -m benchmarks.cli_startup [--repeats 3]

Each figure is the median wall time, in seconds, of `python -m ehr_transformer.cli [COMMAND] --help` (the
interpreter's start included), and says whether the help loaded torch or transformers (it should not: the goal
is well under a second for every command). `--version` is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    None,
    "quickstart",
    "synthetic",
    "convert-wide",
    "convert-long",
    "pretrain",
    "finetune",
    "evaluate",
    "predict",
    "adapt",
    "select",
    "--version",
]

PROBE = (
    "import sys\n"
    "import ehr_transformer.cli\n"
    "try:\n"
    "    ehr_transformer.cli.main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stderr.write(' '.join(sorted({'torch', 'transformers'} & set(sys.modules))) or '-')\n"
)


def time_help(command: str | None, repeats: int) -> tuple[float, str]:
    """Median seconds of one `--help` (or `--version`) in a fresh interpreter, and the heavy modules it loaded."""
    argv = ["--help"] if command is None else [command] if command.startswith("--") else [command, "--help"]
    seconds, loaded = [], "-"
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True
        )
        seconds.append(time.perf_counter() - started)
        loaded = result.stderr.strip().splitlines()[-1]
    return statistics.median(seconds), loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'command':<28} {'seconds':>8}  torch/transformers loaded")
    started = time.perf_counter()
    for _ in range(args.repeats):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    print(f"{'(python -c pass)':<28} {(time.perf_counter() - started) / args.repeats:8.2f}")
    for command in COMMANDS:
        seconds, loaded = time_help(command, args.repeats)
        shown = "--help" if command is None else command if command.startswith("--") else f"{command} --help"
        print(f"{shown:<28} {seconds:8.2f}  {loaded}")


if __name__ == "__main__":
    main()
