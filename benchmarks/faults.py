"""Faults, bad input and privacy, counted: kill/resume of real training runs, generated bad inputs, leak scans.

    python -m benchmarks.faults --output benchmarks/results/faults.json [--kill_points 10] [--bad_inputs 10000]

Three parts, each also run (smaller) by the tests:

- kill_resume: `ehr-transformer pretrain` (the package's command; tiny model, 30 steps, a checkpoint every 5
  steps, seed 0, CPU, `--full_determinism`) runs uninterrupted once; then, for each kill point, a second run is
  SIGKILLed at a random moment after its first checkpoint exists, restarted with `--resume_from_checkpoint <last
  complete checkpoint>`, and its final `model.safetensors` is compared tensor by tensor, bit for bit, with the
  uninterrupted run's.
- bad_inputs: the hypothesis generators shared with `tests/test_bad_inputs.py` (random schemas, missing/extra
  columns, wrong dtypes, nulls, NaN/inf, duplicates, unsorted times, empty shards, subjects without events, enormous
  timelines, non-UTF-8 and very long codes, orphan labels, prediction times before the first event) over
  `validate_events`, `iter_shards`/`read_events` on written parquet files, `write_meds`, `wide_to_meds` and the
  tokenizer. Every case must end in a correct result or an error of the package's own types; anything else is a
  crash, and an output folder left behind by a failed write is a partial output.
- privacy: pretrain + fine-tune a tiny model on a synthetic cohort whose subject ids are 10-digit numbers, then
  scan every file of both saved folders (checkpoints included) with
  `ehr_transformer.privacy.scan_folder_for_leaks`.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

TINY_PRETRAIN_FLAGS = (
    "--hidden_size 16 --num_hidden_layers 1 --num_attention_heads 2 --intermediate_size 32 --max_length 32 "
    "--per_device_train_batch_size 8 --report_to none --use_cpu --save_strategy steps --save_steps 5 --seed 0 "
    "--min_code_count 3 --disable_tqdm true --eval_strategy no --logging_steps 1 --full_determinism "
    "--dataloader_num_workers 0"
).split()


# ---------------------------------------------------------------------------------------------- kill / resume
def pretrain_command(
    meds_dir: Path, output_dir: Path, cache_dir: Path, max_steps: int, *extra: str
) -> list[str]:
    """`ehr-transformer pretrain` of the tiny model for `max_steps` steps, run by this interpreter."""
    folders = {"--data_dir": meds_dir, "--output_dir": output_dir, "--cache_dir": cache_dir}
    return [
        sys.executable,
        "-m",
        "ehr_transformer.cli",
        "pretrain",
        *(arg for flag, path in folders.items() for arg in (flag, str(Path(path).resolve()))),
        "--max_steps",
        str(max_steps),
        *TINY_PRETRAIN_FLAGS,
        *extra,
    ]


def _env() -> dict[str, str]:
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**os.environ, **threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders that finished writing (trainer_state.json is written last), by step."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        step = path.name.split("-")[-1]
        if (
            step.isdigit()
            and (path / "trainer_state.json").is_file()
            and (path / "model.safetensors").is_file()
        ):
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def run_uninterrupted(meds_dir: Path, output_dir: Path, cache_dir: Path, max_steps: int = 30) -> Path:
    result = subprocess.run(
        pretrain_command(meds_dir, output_dir, cache_dir, max_steps),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=common.REPO_ROOT,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"uninterrupted run failed:\n{result.stderr[-3000:]}")
    return output_dir / "model.safetensors"


def run_killed_and_resumed(
    meds_dir: Path,
    output_dir: Path,
    cache_dir: Path,
    rng: random.Random,
    max_steps: int = 20,
    save_steps: int = 5,
) -> dict:
    """Start a run, SIGKILL it at a random step after its first checkpoint (and a random moment within that step),
    then resume from the last complete checkpoint. Steps are followed through the per-step log lines."""
    kill_step = rng.randint(save_steps + 1, max_steps - 1)
    process = subprocess.Popen(
        pretrain_command(meds_dir, output_dir, cache_dir, max_steps),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**_env(), "PYTHONUNBUFFERED": "1"},
        cwd=common.REPO_ROOT,
        start_new_session=True,
    )
    steps, tail = 0, []
    for line in process.stdout:
        tail = (tail + [line])[-50:]
        if "'loss'" in line and "train_runtime" not in line:
            steps += 1
            if steps >= kill_step:
                time.sleep(rng.uniform(0.0, 0.05))  # mid-step, or mid-way through writing a checkpoint
                break
    killed = process.poll() is None
    if killed:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        raise RuntimeError(f"no complete checkpoint after {steps} steps:\n{''.join(tail)[-3000:]}")
    last = checkpoints[-1]
    result = subprocess.run(
        pretrain_command(
            meds_dir, output_dir, cache_dir, max_steps, "--resume_from_checkpoint", str(last.resolve())
        ),
        capture_output=True,
        text=True,
        env=_env(),
        cwd=common.REPO_ROOT,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"resumed run failed:\n{result.stderr[-3000:]}")
    return {
        "kill_step": kill_step,
        "killed": killed,
        "resumed_from": last.name,
        "model": output_dir / "model.safetensors",
    }


def compare_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    if left.keys() != right.keys():
        return {"identical": False, "max_abs_diff": float("inf")}
    identical = all(torch_equal(left[k], right[k]) for k in left)
    diff = max(float((left[k].double() - right[k].double()).abs().max()) for k in left) if left else 0.0
    return {"identical": identical, "max_abs_diff": diff}


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def kill_resume(
    workdir: Path, n_points: int, seed: int = 0, n_subjects: int = 200, max_steps: int = 30
) -> dict:
    from ehr_transformer.data.synthetic import write_synthetic_meds

    workdir.mkdir(parents=True, exist_ok=True)
    meds_dir = workdir / "meds"
    if not meds_dir.exists():
        write_synthetic_meds(meds_dir, n_subjects=n_subjects, seed=0)
    cache_dir = workdir / "cache"
    reference = run_uninterrupted(meds_dir, workdir / "uninterrupted", cache_dir, max_steps)
    rng = random.Random(seed)
    points = []
    for i in range(n_points):
        started = time.perf_counter()
        run = run_killed_and_resumed(meds_dir, workdir / f"killed_{i}", cache_dir, rng, max_steps)
        comparison = compare_weights(reference, run["model"])
        points.append(
            {
                "kill_step": run["kill_step"],
                "killed": run["killed"],
                "resumed_from": run["resumed_from"],
                **comparison,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(f"kill point {i}: {points[-1]}", flush=True)
    return {
        "tried": len(points),
        "identical": sum(p["identical"] for p in points),
        "killed_before_end": sum(p["killed"] for p in points),
        "max_steps": max_steps,
        "points": points,
    }


# ------------------------------------------------------------------------------------------------- bad inputs
# Each generated case is (target, payload); `run_case` runs it and returns "correct" or "clear_error", or raises
# `Crash` (an exception outside the package's own types, an error that does not name its column, a result that
# breaks the MEDS contract, or an output folder left behind by a failed write).
TARGETS = ("validate_events", "shards", "write_meds", "wide_to_meds", "tokenizer")
MEDS_COLUMNS = ("subject_id", "time", "code", "numeric_value", "text_value")


class Crash(AssertionError):
    """A bad input that did not end in a correct result or a clear error of the package's own types."""


def _strategies():
    import datetime as dt

    import polars as pl
    from hypothesis import strategies as st

    n_rows = st.integers(0, 12)

    def column(name, kind, n, data):
        """A column of `n` values of a random dtype: mostly the right one, sometimes wrong."""
        nullable = data.draw(st.booleans())
        if kind == "int":
            values = data.draw(
                st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(1, 5), min_size=n, max_size=n)
            )
            dtype = data.draw(
                st.sampled_from([pl.Int64, pl.Int32, pl.UInt64, pl.String, pl.Float64, pl.Boolean])
            )
        elif kind == "time":
            values = data.draw(
                st.lists(
                    st.datetimes(dt.datetime(1800, 1, 1), dt.datetime(2200, 1, 1)), min_size=n, max_size=n
                )
            )
            dtype = data.draw(
                st.sampled_from(
                    [
                        pl.Datetime("us"),
                        pl.Datetime("ns"),
                        pl.Datetime("ms", "Europe/Paris"),
                        pl.Date,
                        pl.String,
                        pl.Int64,
                    ]
                )
            )
        elif kind == "code":
            values = data.draw(
                st.lists(
                    st.sampled_from(["A", "B", "LAB//X", " ", "", "MEDS_BIRTH", "x" * 5000, "é//€", "[PAD]"])
                    | st.text(max_size=20),
                    min_size=n,
                    max_size=n,
                )
            )
            dtype = data.draw(st.sampled_from([pl.String, pl.String, pl.Categorical, pl.Binary, pl.Int64]))
        elif kind == "float":
            values = data.draw(
                st.lists(
                    st.floats(allow_nan=True, allow_infinity=True) | st.floats(-1e3, 1e3),
                    min_size=n,
                    max_size=n,
                )
            )
            dtype = data.draw(
                st.sampled_from([pl.Float32, pl.Float64, pl.Float64, pl.Int64, pl.String, pl.Boolean])
            )
        else:  # text
            values = data.draw(st.lists(st.text(max_size=5), min_size=n, max_size=n))
            dtype = data.draw(st.sampled_from([pl.String, pl.Int64, pl.Null]))
        if nullable and n:
            mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
            values = [None if m else v for v, m in zip(values, mask, strict=True)]
        return _series(name, values, dtype)

    @st.composite
    def event_frame(draw, allow_wrong=True):
        data = draw(st.data())
        n = draw(n_rows)
        kinds = {
            "subject_id": "int",
            "time": "time",
            "code": "code",
            "numeric_value": "float",
            "text_value": "text",
        }
        present = [c for c in MEDS_COLUMNS if not allow_wrong or draw(st.integers(0, 9)) > 0]
        columns = [column(c, kinds[c], n, data) for c in present]
        if allow_wrong and draw(st.integers(0, 9)) == 0:
            columns.append(column("patient_id", "int", n, data))
        if allow_wrong and draw(st.booleans()):
            columns.append(
                column(draw(st.sampled_from(["extra", "subject", "Code", "time2"])), "text", n, data)
            )
        if draw(st.integers(0, 49)) == 0:
            return _enormous_timeline()
        frame = pl.DataFrame(columns) if columns else pl.DataFrame()
        if frame.height and draw(st.booleans()):  # duplicates and unsorted rows
            frame = pl.concat([frame, frame.sample(fraction=1.0, shuffle=True, seed=draw(st.integers(0, 9)))])
        return frame

    @st.composite
    def good_ish_events(draw):
        """Frames in the MEDS dtypes (so the tokenizer and writers get far) with hostile values."""
        n = draw(st.integers(0, 15))
        subjects = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
        times = draw(
            st.lists(
                st.none() | st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2100, 1, 1)),
                min_size=n,
                max_size=n,
            )
        )
        codes = draw(
            st.lists(
                st.sampled_from(["A", "B", "C", "MEDS_BIRTH", "MEDS_DEATH", "Z" * 3000, "é"]),
                min_size=n,
                max_size=n,
            )
        )
        values = draw(
            st.lists(
                st.none() | st.floats(width=32, allow_nan=True, allow_infinity=False), min_size=n, max_size=n
            )
        )
        return pl.DataFrame(
            {
                "subject_id": subjects,
                "time": times,
                "code": codes,
                "numeric_value": values,
                "text_value": [None] * n,
            },
            schema={
                "subject_id": pl.Int64,
                "time": pl.Datetime("us"),
                "code": pl.String,
                "numeric_value": pl.Float32,
                "text_value": pl.String,
            },
        )

    @st.composite
    def labels_frame(draw):
        n = draw(st.integers(0, 6))
        return pl.DataFrame(
            {
                # subjects 5 and 6 have no events
                "subject_id": draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)),
                "prediction_time": draw(
                    st.lists(
                        st.datetimes(dt.datetime(1850, 1, 1), dt.datetime(2150, 1, 1)), min_size=n, max_size=n
                    )
                ),
                "boolean_value": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
            },
            schema={
                "subject_id": pl.Int64,
                "prediction_time": pl.Datetime("us"),
                "boolean_value": pl.Boolean,
            },
        )

    @st.composite
    def shards(draw):
        frames = draw(st.lists(event_frame() | good_ish_events(), min_size=0, max_size=3))
        corrupt = draw(st.sampled_from([None, None, None, "garbage", "truncated", "empty_file"]))
        wanted = draw(st.none() | st.lists(st.integers(1, 6), max_size=3))
        return {"frames": frames, "corrupt": corrupt, "subject_ids": wanted}

    @st.composite
    def write_case(draw):
        events = draw(good_ish_events() | event_frame())
        raw = events["subject_id"].to_list() if "subject_id" in events.columns else []
        ids = sorted({i for i in raw if isinstance(i, int) and not isinstance(i, bool) and abs(i) < 2**62})
        listed = draw(st.lists(st.sampled_from(ids), unique=True)) if ids and draw(st.booleans()) else ids
        names = ["train", "tuning", "held_out", "test"]
        splits = pl.DataFrame(
            {
                "subject_id": listed + [99],
                "split": [draw(st.sampled_from(names)) for _ in listed] + ["train"],
            },
            schema={"subject_id": pl.Int64, "split": pl.String},
        )
        return {
            "events": events,
            "splits": splits,
            "labels": draw(labels_frame()),
            "n_shards": draw(st.integers(0, 3)),
        }

    @st.composite
    def wide_case(draw):
        data = draw(st.data())
        pairs = draw(
            st.lists(
                st.tuples(st.integers(1, 4), st.integers(-2, 30)), max_size=8, unique=draw(st.booleans())
            )
        )
        n = len(pairs)
        stays, hours = [p[0] for p in pairs], [p[1] for p in pairs]
        dyn = {"stay_id": stays, "time": [dt.timedelta(hours=h) for h in hours]}
        for var in draw(st.lists(st.sampled_from(["hr", "map", "crea", "bad"]), unique=True, max_size=3)):
            dyn[var] = data.draw(
                st.lists(st.none() | st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n)
            )
        dyn = pl.DataFrame(dyn, strict=False)
        if draw(st.integers(0, 5)) == 0:
            name = draw(st.sampled_from(dyn.columns))
            dyn = dyn.with_columns(pl.col(name).cast(pl.Int64, strict=False).cast(pl.String))
        if draw(st.integers(0, 15)) == 0:
            dyn = dyn.drop(draw(st.sampled_from(dyn.columns)))
        m = draw(st.integers(0, 5))
        sta = pl.DataFrame(
            {
                "stay_id": draw(
                    st.lists(st.integers(1, 6), min_size=m, max_size=m, unique=draw(st.integers(0, 4)) > 0)
                ),
                "age": draw(
                    st.lists(
                        st.none() | st.floats(0, 100) | st.sampled_from([-5.0, 200.0, float("nan")]),
                        min_size=m,
                        max_size=m,
                    )
                ),
                "sex": draw(
                    st.lists(
                        st.none() | st.sampled_from(["Male", "Female", "", "x" * 300]), min_size=m, max_size=m
                    )
                ),
            },
            schema={"stay_id": pl.Int64, "age": pl.Float64, "sex": pl.String},
        )
        k = draw(st.integers(0, 5))
        task = draw(st.sampled_from(["mortality24", "mortality24", "los", "los", "los", "other"]))
        outc_stays = (
            st.sampled_from(sorted(set(stays))) if stays and draw(st.integers(0, 3)) else st.integers(1, 8)
        )
        if task == "mortality24" and stays and draw(st.booleans()):
            k = len(set(stays))
            outc_ids = sorted(set(stays))
        else:
            outc_ids = draw(st.lists(outc_stays, min_size=k, max_size=k))
        outc = {
            "stay_id": outc_ids,
            "label": draw(
                st.lists(
                    st.sampled_from([0.0, 1.0]) | st.sampled_from([None, 2.0, float("nan")]),
                    min_size=k,
                    max_size=k,
                )
            ),
        }
        if task == "los" or draw(st.integers(0, 9)) == 0:
            outc["time"] = [
                dt.timedelta(hours=h) for h in draw(st.lists(st.integers(0, 30), min_size=k, max_size=k))
            ]
        # mortality24: one label per stay at 24 h; los: per time; other: per stay without a prediction time
        hours = 24 if task == "mortality24" else None
        label_type = draw(st.sampled_from(["auto", "auto", "boolean", "float"]))
        outc_frame = pl.DataFrame(outc, strict=False)
        return {"dyn": dyn, "sta": sta, "outc": outc_frame, "hours": hours, "label_type": label_type}

    @st.composite
    def tokenizer_case(draw):
        train = draw(good_ish_events() | event_frame())
        encode = draw(good_ish_events() | event_frame())
        labels = draw(st.none() | labels_frame())
        return {
            "train": train,
            "encode": encode,
            "labels": labels,
            "min_code_count": draw(st.integers(1, 3)),
            "max_length": draw(st.integers(2, 8)),
        }

    return st.one_of(
        st.tuples(st.just("validate_events"), event_frame()),
        st.tuples(st.just("shards"), shards()),
        st.tuples(st.just("write_meds"), write_case()),
        st.tuples(st.just("wide_to_meds"), wide_case()),
        st.tuples(st.just("tokenizer"), tokenizer_case()),
    )


def bad_input_cases():
    """The hypothesis strategy of (target, payload) cases shared by tests/test_bad_inputs.py and this benchmark."""
    return _strategies()


def _series(name, values, dtype):
    import polars as pl

    try:
        return pl.Series(name, values, dtype=dtype, strict=False)
    except Exception:  # values that cannot be expressed in the dtype at all: keep them in their natural dtype
        return pl.Series(name, values, strict=False)


def _enormous_timeline(n: int = 200_000):
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "subject_id": np.ones(n, dtype=np.int64),
            "time": (np.sort(rng.integers(0, 10**15, n))).astype("datetime64[us]"),
            "code": rng.choice(["A", "B", "LAB//X"], n),
            "numeric_value": rng.normal(size=n).astype(np.float32),
        }
    )


def _check_error(error: BaseException, sources: list[str]) -> str:
    from ehr_transformer.data.meds import MEDSValidationError

    message = str(error)
    if isinstance(error, MEDSValidationError):
        if not any(source in message for source in sources):
            raise Crash(
                f"{type(error).__name__} does not name its file/frame {sources}: {message}"
            ) from error
        if not re.search(r"column|columns|field|not a readable parquet file", message):
            raise Crash(f"{type(error).__name__} does not name a column: {message}") from error
        if re.search(r"null or empty|infinite|stay_id \d|null label", message) and not re.search(
            r"subject_id -?\d|stay_id -?\d|row \d", message
        ):
            raise Crash(f"value error without the subject: {message}") from error
        return "clear_error"
    if isinstance(error, ValueError | FileNotFoundError | FileExistsError):
        return "clear_error"
    raise Crash(f"{type(error).__name__} outside the package's error types: {message}") from error


def _check_events_result(frame, n_rows: int | None = None) -> None:
    import polars as pl

    from ehr_transformer.data.meds import DATA_SCHEMA

    if dict(frame.schema) != DATA_SCHEMA:
        raise Crash(f"result schema {frame.schema} is not the MEDS schema")
    if frame["subject_id"].null_count() or frame["code"].null_count():
        raise Crash("result has null subject_id or code")
    if frame["numeric_value"].is_nan().any() or frame["numeric_value"].is_infinite().any():
        raise Crash("result has NaN/inf numeric_value")
    resorted = frame.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
    if not resorted.equals(frame):
        raise Crash("result is not sorted by subject_id, time (static first)")
    if n_rows is not None and frame.height != n_rows:
        raise Crash(f"result has {frame.height} rows, input had {n_rows}: rows were dropped")
    del pl


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def run_case(case, workdir: Path) -> str:
    """Run one generated case; return "correct" or "clear_error", raise Crash otherwise."""
    import shutil
    import tempfile

    target, payload = case
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=workdir))
    try:
        return _run(target, payload, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(target: str, payload, tmp: Path) -> str:
    import polars as pl

    from ehr_transformer.data.meds import iter_shards, read_events, validate_events
    from ehr_transformer.data.wide import wide_to_meds
    from ehr_transformer.data.writer import write_meds
    from ehr_transformer.tokenization_ehr import EHREventTokenizer

    if target == "validate_events":
        try:
            result = validate_events(payload, source="<case>")
        except Exception as error:  # noqa: BLE001 - classifying every outcome is the point
            return _check_error(error, ["<case>"])
        _check_events_result(result, payload.height)
        return "correct"
    if target == "shards":
        data = tmp / "meds" / "data"
        data.mkdir(parents=True)
        paths = []
        for i, frame in enumerate(payload["frames"]):
            path = data / f"{i}.parquet"
            frame.write_parquet(path)
            paths.append(path)
        if payload["corrupt"]:
            bad = data / "zz_corrupt.parquet"
            if payload["corrupt"] == "garbage":
                bad.write_bytes(b"\xff\xfenot a parquet file" * 10)
            elif payload["corrupt"] == "truncated" and paths:
                bad.write_bytes(paths[0].read_bytes()[: max(1, paths[0].stat().st_size // 2)])
            else:
                bad.write_bytes(b"")
            paths.append(bad)
        sources = [str(p) for p in paths] + [str(data)]
        outcome = []
        for call in (
            lambda: [f for _, f in iter_shards(tmp / "meds", payload["subject_ids"])],
            lambda: [read_events(tmp / "meds", payload["subject_ids"])],
        ):
            try:
                frames = call()
            except Exception as error:  # noqa: BLE001
                outcome.append(_check_error(error, sources))
                continue
            for frame in frames:
                _check_events_result(frame)
                if payload["subject_ids"] is not None and not set(frame["subject_id"].to_list()) <= set(
                    payload["subject_ids"]
                ):
                    raise Crash("read_events/iter_shards returned subjects that were not asked for")
            outcome.append("correct")
        # iter_shards(subject_ids=...) skips shards without those subjects unread, read_events validates every
        # shard: one may succeed where the other reports a bad shard
        return "clear_error" if "clear_error" in outcome else "correct"
    if target == "write_meds":
        out = tmp / "out" / "meds"
        try:
            write_meds(
                out,
                payload["events"],
                payload["splits"],
                labels={"task": payload["labels"]},
                n_shards=payload["n_shards"],
            )
        except Exception as error:  # noqa: BLE001
            left = _leftovers(out.parent, "meds") if out.parent.exists() else []
            if left:
                raise Crash(f"failed write left a partial output: {left}") from error
            return _check_error(error, ["<events>", "<splits>", "<labels", str(out), "<events for"])
        expected = validate_events(payload["events"]).height
        if expected == 0:  # an empty dataset: metadata and an empty data/ folder
            if (
                list((out / "data").glob("**/*.parquet"))
                or not (out / "metadata" / "subject_splits.parquet").is_file()
            ):
                raise Crash("an empty dataset was not written as metadata + empty data/")
        else:
            _check_events_result(read_events(out), expected)
        if _leftovers(out.parent, "meds") != ["meds"]:
            raise Crash(f"temporary folders left beside the output: {_leftovers(out.parent, 'meds')}")
        return "correct"
    if target == "wide_to_meds":
        try:
            events, labels = wide_to_meds(
                payload["dyn"],
                payload["sta"],
                payload["outc"],
                prediction_hours=payload["hours"],
                label_type=payload["label_type"],
            )
        except Exception as error:  # noqa: BLE001
            return _check_error(error, ["dyn", "sta", "outc"])
        _check_events_result(events)
        known = set(payload["dyn"]["stay_id"].to_list()) | set(payload["sta"]["stay_id"].to_list())
        if not set(labels["subject_id"].to_list()) <= known:
            raise Crash("labels for stays without data")
        return "correct"
    if target == "tokenizer":
        try:
            tokenizer = EHREventTokenizer.fit(
                payload["train"], min_code_count=payload["min_code_count"], max_length=payload["max_length"]
            )
            rows = tokenizer.encode_events(payload["encode"], labels=payload["labels"])
        except Exception as error:  # noqa: BLE001
            return _check_error(error, ["<frame>"])
        for row in rows.iter_rows(named=True):
            n = len(row["input_ids"])
            if not (1 <= n <= tokenizer.max_length) or {len(row[k]) for k in ("values", "times", "ages")} != {
                n
            }:
                raise Crash(f"encoded row of inconsistent length: {row}")
            if not all(0 <= i < tokenizer.vocab_size for i in row["input_ids"]):
                raise Crash("input id outside the vocabulary")
            if any(t != t or t < 0 for t in row["times"]):
                raise Crash(f"negative or NaN time in {row['times']}")
        if payload["labels"] is not None and rows.height:
            encoded = set(pl.Series(rows["subject_id"]).to_list())
            frame = payload["encode"]
            present = set(frame["subject_id"].to_list()) if "subject_id" in frame.columns else set()
            if not encoded <= present:
                raise Crash("encoded a sample for a subject without events")
        return "correct"
    raise ValueError(target)


def bad_inputs(n_cases: int, workdir: Path, seed: int = 0) -> dict:
    """Run `n_cases` generated cases through hypothesis (no shrinking, every outcome counted)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    counts = {"tried": 0, "clear_errors": 0, "correct_results": 0, "crashes": 0, "partial_outputs": 0}
    by_target: dict[str, dict[str, int]] = {t: {"clear_error": 0, "correct": 0, "crash": 0} for t in TARGETS}
    crashes: list[str] = []

    @hseed(seed)
    @settings(
        max_examples=n_cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=bad_input_cases())
    def run(case):
        counts["tried"] += 1
        try:
            try:
                outcome = run_case(case, workdir)
            except Crash:
                raise
            except Exception as error:  # noqa: BLE001 - an exception escaping the checks is a crash too
                raise Crash(f"{type(error).__name__} while checking the result: {error}") from error
        except Crash as crash:
            counts["crashes"] += 1
            counts["partial_outputs"] += "partial output" in str(crash) or "left beside" in str(crash)
            by_target[case[0]]["crash"] += 1
            if len(crashes) < 20:
                crashes.append(f"{case[0]}: {crash}"[:600])
            return
        counts["correct_results" if outcome == "correct" else "clear_errors"] += 1
        by_target[case[0]][outcome] += 1

    run()
    return {**counts, "by_target": by_target, "first_crashes": crashes}


# ---------------------------------------------------------------------------------------------------- privacy
def privacy(workdir: Path, n_subjects: int = 120, min_code_count: int = 3) -> dict:
    """Pretrain + fine-tune (4 steps each, checkpoints every 2) on a cohort with 10-digit subject ids and one rare
    code per subject, then scan every file of both output folders."""
    import datetime as dt

    import polars as pl
    from transformers import TrainingArguments

    from ehr_transformer.data.synthetic import generate_synthetic_cohort
    from ehr_transformer.data.writer import write_meds
    from ehr_transformer.privacy import scan_folder_for_leaks
    from ehr_transformer.training.arguments import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        PretrainingArguments,
    )
    from ehr_transformer.training.finetune import finetune
    from ehr_transformer.training.pretrain import pretrain

    cohort = generate_synthetic_cohort(n_subjects=n_subjects, seed=1)
    shift = pl.col("subject_id") + 7_300_000_000
    events = cohort.events.with_columns(shift)
    rare = (
        events.group_by("subject_id")
        .agg(pl.col("time").max())
        .with_columns(
            ("RARE//SUBJECT_" + pl.col("subject_id").cast(pl.String)).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"),
            pl.lit(None, pl.String).alias("text_value"),
        )
    )
    events = pl.concat([events, rare.select(events.columns)])
    labels = {task: df.with_columns(shift) for task, df in cohort.labels.items()}
    meds = write_meds(
        workdir / "meds", events, cohort.splits.with_columns(shift), labels=labels, overwrite=True
    )
    train_ids = cohort.splits.with_columns(shift).filter(pl.col("split") == "train")["subject_id"]
    train = events.filter(pl.col("subject_id").is_in(train_ids.implode()))
    counts = train.group_by("code").agg(pl.col("subject_id").n_unique().alias("n"))
    rare_codes = counts.filter(pl.col("n") < min_code_count)["code"].to_list()
    args = dict(
        use_cpu=True,
        report_to=[],
        seed=0,
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        eval_strategy="steps",
        eval_steps=2,
    )
    out, cache = workdir / "out", str(workdir / "cache")
    pretrain(
        DataArguments(data_dir=str(meds), cache_dir=cache, max_length=32, min_code_count=min_code_count),
        ModelArguments(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        PretrainingArguments(),
        TrainingArguments(str(out / "pretrained"), **args),
    )
    finetune(
        DataArguments(
            data_dir=str(meds), labels=str(meds / "labels" / "in_hospital_mortality.parquet"), cache_dir=cache
        ),
        ModelArguments(model_name_or_path=str(out / "pretrained")),
        FinetuningArguments(),
        TrainingArguments(str(out / "finetuned"), **args),
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    findings = scan_folder_for_leaks(out, train_ids.to_list(), rare_codes, train["time"].drop_nulls())
    return {
        "files_scanned": len(files),
        "bytes_scanned": sum(p.stat().st_size for p in files),
        "leaks": len(findings),
        "training_subjects": len(train_ids),
        "rare_codes": len(rare_codes),
        "timestamps": int(train["time"].drop_nulls().n_unique()),
        "findings": [f"{f.file}: {f.kind} {f.value} at {f.where}" for f in findings[:20]],
        "date": dt.date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> dict:
    import shutil
    import tempfile

    from ehr_transformer.utils import write_json

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default=str(common.REPO_ROOT / "benchmarks" / "results" / "faults.json"))
    parser.add_argument("--kill_points", type=int, default=10)
    parser.add_argument("--bad_inputs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", default=None, help="scratch folder (default: a temporary one, removed after)"
    )
    args = parser.parse_args(argv)
    command = common.command_line("faults", argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ehr_faults_"))
    started = time.perf_counter()
    try:
        result = {
            "kill_resume": kill_resume(workdir / "kill", args.kill_points, seed=args.seed),
            "bad_inputs": bad_inputs(args.bad_inputs, workdir / "bad", seed=args.seed),
            "privacy": privacy(workdir / "privacy"),
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["settings"] = {
        "seed": args.seed,
        "kill_points": args.kill_points,
        "bad_inputs": args.bad_inputs,
        "kill_resume": "tiny pretraining, 30 steps, checkpoint every 5, --full_determinism, CPU, killed with SIGKILL "
        "at a random step after the first checkpoint; identical = every tensor of model.safetensors bit-equal to "
        "the uninterrupted run's",
    }
    result["meta"] = common.metadata(command, started)
    write_json(args.output, result)
    parts = ("kill_resume", "bad_inputs", "privacy")
    print({k: {m: v for m, v in result[k].items() if not isinstance(v, list | dict)} for k in parts})
    return result


if __name__ == "__main__":
    main()
