"""Shared test settings: offline, seeded, and a synthetic MEDS cohort built once per session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_meds(tmp_path_factory) -> Path:
    """A small synthetic MEDS cohort (400 subjects) written once for the whole test session."""
    from ehr_transformer.data.synthetic import write_synthetic_meds

    return write_synthetic_meds(tmp_path_factory.mktemp("synthetic") / "meds", n_subjects=400, seed=0)
