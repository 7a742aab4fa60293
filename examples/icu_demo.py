"""Real ICU data: the eICU demo mortality24 cohort (YAIB layout) converted to MEDS, a transformer fine-tuned from
scratch, evaluated on held-out stays beside gradient boosting on per-variable aggregates.

    python examples/icu_demo.py --yaib ../shared/data/yaib_demo --output_dir icu_demo_output

The data are the MIMIC-III / eICU demo cohorts processed by YAIB (PhysioNet, ODbL v1.0); they are not shipped.
"""

import argparse
from pathlib import Path

from transformers import TrainingArguments

from ehr_transformer.data.wide import convert_wide
from ehr_transformer.evaluation.report import evaluate_checkpoint, format_report
from ehr_transformer.training.arguments import DataArguments, FinetuningArguments, ModelArguments
from ehr_transformer.training.finetune import finetune

parser = argparse.ArgumentParser()
parser.add_argument("--yaib", default="../shared/data/yaib_demo")
parser.add_argument("--output_dir", default="icu_demo_output")
args = parser.parse_args()
cohort = Path(args.yaib) / "mortality24" / "eicu_demo"
if not cohort.is_dir():
    raise SystemExit(
        f"{cohort} not found: pass --yaib with the folder holding mortality24/eicu_demo/dyn.parquet"
    )
out = Path(args.output_dir)

summary = convert_wide(
    cohort / "dyn.parquet",
    cohort / "sta.parquet",
    cohort / "outc.parquet",
    out / "meds",
    task="mortality24",
    overwrite=True,
)
print(summary)
labels = out / "meds" / "labels" / "mortality24.parquet"
finetune(
    DataArguments(data_dir=str(out / "meds"), labels=str(labels), max_length=512, min_code_count=5),
    ModelArguments(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    FinetuningArguments(),
    TrainingArguments(
        str(out / "finetuned"),
        num_train_epochs=8,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=0,
    ),
)
report = evaluate_checkpoint(
    out / "finetuned", out / "meds", labels, split="held_out", output_dir=out / "evaluation"
)
print(format_report(report))
