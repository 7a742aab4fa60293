"""Multi-process pretraining: `accelerate launch --config_file training/accelerate_cpu.yaml training/pretrain.py
--use_cpu ...` starts two CPU processes that train data-parallel over gloo.

Two processes with 4 subjects each see the same global batches of 8 as one process with batch size 8, and the
data-parallel gradient is the mean of the two halves' gradients. The losses still differ a little: each process
draws its own masked positions, and each half's loss is a mean over its own masked events. Tolerance: the logged
training losses of the two runs agree within 0.25 nats at every step and within 0.1 on average.
"""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

STEPS = 6


def pretrain_command(launcher: list[str], data, output, batch_size: int, cache) -> list[str]:
    return [
        *launcher,
        str(REPO_ROOT / "training" / "pretrain.py"),
        "--data_dir",
        str(data),
        "--output_dir",
        str(output),
        "--cache_dir",
        str(cache),
        "--hidden_size",
        "32",
        "--num_hidden_layers",
        "2",
        "--num_attention_heads",
        "2",
        "--intermediate_size",
        "64",
        "--max_length",
        "64",
        "--min_code_count",
        "3",
        "--value_mask_probability",
        "0",
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        str(batch_size),
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        str(STEPS),
        "--seed",
        "0",
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
    ]


def trainer_state(output) -> dict:
    # a finished run keeps its log history in trainer_state.json; its Trainer checkpoint-N/ folders are removed
    return json.loads((output / "trainer_state.json").read_text())


def logged_losses(output) -> list[float]:
    state = trainer_state(output)
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_process_pretraining_matches_one_process(synthetic_meds, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        pretrain_command([sys.executable], synthetic_meds, tmp_path / "single", 8, tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "training" / "accelerate_cpu.yaml"),
        "--main_process_port",
        "29517",
    ]
    double = subprocess.run(
        pretrain_command(launcher, synthetic_meds, tmp_path / "double", 4, tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert not list((tmp_path / "double").glob("checkpoint-*"))  # resume folders go once the run has finished
    # two ranks: 2 x 4 subjects a step, so after STEPS steps the run is as far into its epoch as one process with 8
    # (one process with 4 would be half as far)
    epochs = [trainer_state(tmp_path / d)["epoch"] for d in ("single", "double")]
    assert abs(epochs[0] - epochs[1]) < 1e-6, epochs
    one, two = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "double")
    assert len(one) == len(two) == STEPS
    differences = [abs(a - b) for a, b in zip(one, two, strict=True)]
    assert max(differences) < 0.25, (one, two)
    assert sum(differences) / STEPS < 0.1, (one, two)
    assert (tmp_path / "double" / "model.safetensors").exists()
