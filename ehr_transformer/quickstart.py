"""`ehr-transformer quickstart`: the whole BERT workflow on the embedded synthetic cohort, on a laptop CPU.

1. write a synthetic MEDS cohort (subject-level train / tuning / held_out splits);
2. pretrain a small EHR transformer with masked event modeling on the training subjects' timelines;
3. fine-tune it for in-hospital mortality (prediction 24 h after admission) from the pretrained folder;
4. evaluate on held-out subjects (AUROC/AUPRC with bootstrap 95% intervals) beside a logistic regression on code
   counts fitted on the same training labels;
5. reload the saved folder with `AutoModelForSequenceClassification.from_pretrained` and score patients.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import polars as pl
from transformers import AutoModelForSequenceClassification, TrainingArguments, set_seed

from .data.dataset import build_labeled_dataset
from .data.synthetic import write_synthetic_meds
from .evaluation.report import evaluate_checkpoint, format_report
from .inference import predict_dataset
from .tokenization_ehr import EHREventTokenizer
from .training.arguments import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    PretrainingArguments,
    recipe_training_arguments,
)
from .training.finetune import finetune
from .training.pretrain import pretrain

TASK = "in_hospital_mortality"


def _step(message: str, started: float) -> None:
    print(f"\n[{time.perf_counter() - started:6.0f}s] {message}", flush=True)


def quickstart_training_arguments(output_dir: Path, seed: int, stage: str, **overrides) -> TrainingArguments:
    """The package's recipe for `stage` (`recipe_training_arguments`, the defaults of `ehr-transformer pretrain` /
    `finetune`), seeded, on the CPU, logged every 20 steps."""
    return recipe_training_arguments(
        output_dir,
        stage,
        **{
            "logging_steps": 20,
            "seed": seed,
            "data_seed": seed,
            "dataloader_num_workers": 0,
            "use_cpu": True,
            **overrides,
        },
    )


def run_quickstart(
    output_dir: str | Path = "quickstart_output", n_subjects: int = 3000, seed: int = 0
) -> dict:
    """Run the five steps above into `output_dir` and return the held-out report."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    set_seed(seed)

    _step(f"1/5 writing a synthetic MEDS cohort of {n_subjects} subjects", started)
    data_dir = output_dir / "meds"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    write_synthetic_meds(data_dir, n_subjects=n_subjects, seed=seed)
    labels = data_dir / "labels" / f"{TASK}.parquet"

    _step("2/5 pretraining with masked event modeling on the training subjects' timelines", started)
    pretrain(
        DataArguments(data_dir=str(data_dir), max_length=256, min_code_count=5),
        ModelArguments(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
        PretrainingArguments(),
        quickstart_training_arguments(output_dir / "pretrained", seed, "pretrain", eval_strategy="epoch"),
    )

    _step(f"3/5 fine-tuning for {TASK} from {output_dir / 'pretrained'}", started)
    finetune(
        DataArguments(data_dir=str(data_dir), labels=str(labels)),
        ModelArguments(model_name_or_path=str(output_dir / "pretrained")),
        FinetuningArguments(),
        quickstart_training_arguments(output_dir / "finetuned", seed, "finetune"),
    )

    _step("4/5 evaluating on held-out subjects beside a logistic regression on code counts", started)
    report = evaluate_checkpoint(
        output_dir / "finetuned",
        data_dir,
        labels,
        split="held_out",
        output_dir=output_dir / "evaluation",
        baseline="logistic",
        update_card=True,
    )
    print(format_report(report))
    print(f"ROC and calibration plots: {output_dir / 'evaluation'}")

    _step("5/5 reloading the checkpoint with AutoModelForSequenceClassification.from_pretrained", started)
    model = AutoModelForSequenceClassification.from_pretrained(output_dir / "finetuned", use_safetensors=True)
    tokenizer = EHREventTokenizer.from_pretrained(output_dir / "finetuned")
    sample = build_labeled_dataset(data_dir, labels, tokenizer, split="held_out").select(range(5))
    risks = predict_dataset(model, sample, tokenizer)
    print(
        pl.DataFrame(
            {
                "subject_id": sample["subject_id"],
                "prediction_time": sample["prediction_time"],
                "risk": risks.round(3),
                "died": pl.Series(sample["labels"]).cast(pl.Boolean),
            }
        )
    )
    print(f"\nDone in {time.perf_counter() - started:.0f}s. Checkpoint: {output_dir / 'finetuned'}")
    return report


__all__ = ["run_quickstart", "quickstart_training_arguments"]
