"""Interoperability with the MEDS ecosystem's own tools, run for real (marker `interop`).

The walk of docs/meds-tools.md, end to end and small (300 subjects, a model 32 wide):

1. `build_sample_MEDS_dataset` (meds-testing-helpers) writes a MEDS dataset;
2. `aces-cli` (es-aces) extracts a binary task from a task config into a folder of label shards;
3. `ehr-transformer pretrain`, `finetune --labels <that folder>` and `predict`, which writes the MEDS prediction
   schema;
4. `meds-evaluation-cli` (meds-evaluation) scores the predictions, and its AUROC equals `evaluate_checkpoint`'s.

The tools need polars < 2 (es-aces) while the main environment has polars 2.x, so these tests run in a second
virtual environment: `pip install -e ".[interop,dev]"` and `pytest -m interop` (see .ci/run). Elsewhere they skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

_TOOLS = {
    "aces": "es-aces",
    "meds_evaluation": "meds-evaluation",
    "meds_testing_helpers": "meds-testing-helpers",
}
_MISSING = [dist for module, dist in _TOOLS.items() if importlib.util.find_spec(module) is None]
if _MISSING:
    pytest.skip(
        f"the MEDS tools are not installed ({', '.join(_MISSING)}): the interop tests run in their own "
        'environment, `pip install -e ".[interop,dev]"` then `pytest -m interop` (see .ci/run)',
        allow_module_level=True,
    )

import polars as pl  # noqa: E402

N_SUBJECTS = 300
TASK = "outcome"

# A binary task on the sample dataset's codes: at every `dynamic//0` event, will a `dynamic//1` follow within
# ten years? (The sample dataset's events lie years apart.)
TASK_CONFIG = """\
predicates:
  index_code:
    code: dynamic//0
  outcome_code:
    code: dynamic//1

trigger: index_code

windows:
  input:
    start: null
    end: trigger
    start_inclusive: True
    end_inclusive: True
    index_timestamp: end
  target:
    start: input.end
    end: start + 3650d
    start_inclusive: False
    end_inclusive: True
    label: outcome_code
"""

SMALL_MODEL = ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2"]
SMALL_MODEL += ["--intermediate_size", "64", "--max_length", "64"]
TRAINING = ["--learning_rate", "1e-3", "--per_device_train_batch_size", "16", "--use_cpu"]
TRAINING += ["--report_to", "none", "--seed", "0"]


def _tool(name: str) -> str:
    """A console script of this environment (next to its python), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"console script {name!r} not found next to {sys.executable} nor on PATH")
    return found


def _run(step: str, command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        pytest.fail(
            f"step {step!r} failed (exit {result.returncode}): {' '.join(command)}\n"
            f"--- stdout (end) ---\n{result.stdout[-3000:]}\n--- stderr (end) ---\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module")
def meds_dir(work) -> Path:
    """A MEDS dataset written by meds-testing-helpers (random codes, values and times; 60/20/20 split)."""
    out = work / "meds"
    _run(
        "meds-testing-helpers: build_sample_MEDS_dataset",
        [
            _tool("build_sample_MEDS_dataset"),
            f"output_dir={out}",
            f"N_subjects={N_SUBJECTS}",
            "seed=1",
            "dataset_spec.train_frac=0.6",
            "dataset_spec.tuning_frac=0.2",
            "dataset_spec.held_out_frac=0.2",
        ],
        cwd=work,
    )
    return out


@pytest.fixture(scope="module")
def label_dir(work, meds_dir) -> Path:
    """ACES labels of the task, one label shard per data shard: `labels/outcome/<shard>.parquet`."""
    config = work / "tasks" / f"{TASK}.yaml"
    config.parent.mkdir()
    config.write_text(TASK_CONFIG)
    shards = _run("es-aces: expand_shards", [_tool("expand_shards"), str(meds_dir / "data")], cwd=work)
    _run(
        "es-aces: aces-cli",
        [
            _tool("aces-cli"),
            "--multirun",
            "data=sharded",
            "data.standard=meds",
            f"data.root={meds_dir / 'data'}",
            f"data.shard={shards.stdout.strip()}",
            f"cohort_dir={config.parent}",
            f"cohort_name={TASK}",
            f"output_filepath={work / 'labels' / TASK}" + "${data._prefix}.parquet",
        ],
        cwd=work,
    )
    return work / "labels" / TASK


@pytest.fixture(scope="module")
def finetuned(work, meds_dir, label_dir) -> Path:
    """pretrain, then finetune on the folder of ACES label shards, both through the command line."""
    cache = work / "cache"
    common = ["--data_dir", str(meds_dir), "--cache_dir", str(cache), *TRAINING]
    _run(
        "ehr-transformer pretrain",
        [_tool("ehr-transformer"), "pretrain", *common, *SMALL_MODEL, "--num_train_epochs", "2"]
        + ["--output_dir", str(work / "pretrained")],
        cwd=work,
    )
    _run(
        "ehr-transformer finetune --labels <folder of ACES shards>",
        [_tool("ehr-transformer"), "finetune", *common, "--labels", str(label_dir)]
        + ["--model_name_or_path", str(work / "pretrained"), "--num_train_epochs", "3"]
        + ["--output_dir", str(work / "finetuned")],
        cwd=work,
    )
    return work / "finetuned"


@pytest.fixture(scope="module")
def predictions(work, meds_dir, label_dir, finetuned) -> Path:
    out = work / "predictions" / "held_out.parquet"
    out.parent.mkdir()
    _run(
        "ehr-transformer predict --labels <folder of ACES shards>",
        [_tool("ehr-transformer"), "predict", "--checkpoint", str(finetuned), "--data_dir", str(meds_dir)]
        + ["--labels", str(label_dir), "--split", "held_out", "--output_file", str(out)],
        cwd=work,
    )
    return out


def _held_out_labels(meds_dir: Path, label_dir: Path) -> pl.DataFrame:
    splits = pl.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    held_out = splits.filter(pl.col("split") == "held_out")["subject_id"]
    labels = pl.read_parquet(sorted(label_dir.glob("**/*.parquet")))
    return labels.filter(pl.col("subject_id").is_in(held_out.implode()))


def test_meds_testing_helpers_dataset_reads(meds_dir):
    """Our reader validates every shard the MEDS tool wrote, and the splits cover every subject."""
    from ehr_transformer.data.meds import read_events

    events = read_events(meds_dir)
    assert events["subject_id"].n_unique() == N_SUBJECTS
    assert {"subject_id", "time", "code", "numeric_value"} <= set(events.columns)
    splits = pl.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    assert set(splits["split"]) == {"train", "tuning", "held_out"} and splits.height == N_SUBJECTS


def test_aces_label_shards_validate(meds_dir, label_dir):
    """Each ACES shard is a valid MEDS label file for us (ACES adds null integer/float/categorical columns)."""
    from ehr_transformer.data.labels import read_labels

    shards = sorted(label_dir.glob("**/*.parquet"))
    assert len(shards) == len(list((meds_dir / "data").glob("**/*.parquet"))) >= 2
    labels = pl.concat([read_labels(shard) for shard in shards])
    assert labels["boolean_value"].null_count() == 0
    held_out = _held_out_labels(meds_dir, label_dir)
    assert held_out["boolean_value"].sum() > 0 and (~held_out["boolean_value"]).sum() > 0  # an AUROC exists


def test_predictions_follow_the_meds_prediction_schema(meds_dir, label_dir, predictions):
    """`predict` writes what meds-evaluation validates: one row per held-out ACES label row, no row lost."""
    from meds_evaluation.schema import PredictionSchema

    frame = pl.read_parquet(predictions)
    expected = ["subject_id", "prediction_time", "boolean_value"]
    expected += ["predicted_boolean_value", "predicted_boolean_probability"]
    assert set(expected) <= set(frame.columns), frame.columns
    PredictionSchema.align(frame.to_arrow())  # raises on a schema meds-evaluation refuses
    probability = frame["predicted_boolean_probability"]
    assert probability.null_count() == 0 and probability.min() >= 0 and probability.max() <= 1
    labels = _held_out_labels(meds_dir, label_dir).select("subject_id", "prediction_time", "boolean_value")
    key = ["subject_id", "prediction_time"]
    assert frame.select(*key, "boolean_value").sort(key).equals(labels.sort(key))


def test_meds_evaluation_auroc_equals_evaluate_checkpoint(work, meds_dir, label_dir, finetuned, predictions):
    """meds-evaluation's AUROC of the `predict` file equals the package's own held-out AUROC, to 1e-6."""
    from ehr_transformer.evaluation.report import evaluate_checkpoint

    out = work / "meds_evaluation" / "results.json"
    _run(
        "meds-evaluation-cli",
        [_tool("meds-evaluation-cli"), f"predictions_path={predictions}", f"output_file={out}"],
        cwd=work,
    )
    theirs = json.loads(out.read_text())["samples_equally_weighted"]["roc_auc_score"]
    report = evaluate_checkpoint(
        finetuned, meds_dir, label_dir, split="held_out", n_bootstrap=20, baseline=None
    )
    ours = report["model"]["auroc"]["estimate"]
    assert report["n"] == pl.read_parquet(predictions).height
    assert theirs == pytest.approx(ours, abs=1e-6)
