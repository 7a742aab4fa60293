"""Crash-safe training: a real `ehr-transformer pretrain` subprocess SIGKILLed at a random step after its first
checkpoint and resumed with --resume_from_checkpoint ends with the same weights, bit for bit, as an uninterrupted
run (CPU, seed 0, --full_determinism). `python -m benchmarks.faults` repeats this at many kill points."""

import random

from benchmarks import faults


def test_killed_and_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path):
    from ehr_transformer.data.synthetic import write_synthetic_meds

    meds = write_synthetic_meds(tmp_path / "meds", n_subjects=120, seed=0)
    cache = tmp_path / "cache"
    # 84 training subjects, batches of 8: 11 steps an epoch, so 14 steps cross an epoch boundary
    reference = faults.run_uninterrupted(meds, tmp_path / "reference", cache, max_steps=14)
    run = faults.run_killed_and_resumed(meds, tmp_path / "killed", cache, random.Random(3), max_steps=14)
    assert run["killed"], "the run finished before it could be killed"
    comparison = faults.compare_weights(reference, run["model"])
    assert comparison["identical"], comparison


def test_complete_checkpoints_ignores_half_written_ones(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
        if step != 15:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert [p.name for p in faults.complete_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10"]
