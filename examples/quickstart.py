"""The quickstart from Python: synthetic MEDS cohort -> pretrain -> fine-tune -> evaluate -> reload.

    python examples/quickstart.py [--output_dir quickstart_output] [--num_subjects 3000]

The same steps as `ehr-transformer quickstart`, written out with the package's functions so that each one can be
changed: swap `write_synthetic_meds` for your own MEDS folder, the sequence length in `DataArguments`, the model
size in `ModelArguments`, the objectives in `PretrainingArguments`, the classifier in `FinetuningArguments`, the
schedule in `TrainingArguments`.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from ehr_transformer import EHREventTokenizer
from ehr_transformer.data.dataset import build_labeled_dataset
from ehr_transformer.data.synthetic import write_synthetic_meds
from ehr_transformer.evaluation.report import evaluate_checkpoint, format_report
from ehr_transformer.inference import predict_dataset
from ehr_transformer.training.arguments import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    PretrainingArguments,
    recipe_training_arguments,
)
from ehr_transformer.training.finetune import finetune
from ehr_transformer.training.pretrain import pretrain

parser = argparse.ArgumentParser()
parser.add_argument("--output_dir", default="quickstart_output")
parser.add_argument("--num_subjects", type=int, default=3000)
args = parser.parse_args()
out = Path(args.output_dir)

data = write_synthetic_meds(out / "meds", n_subjects=args.num_subjects, seed=0, overwrite=True)
labels = data / "labels" / "in_hospital_mortality.parquet"

pretrain(
    DataArguments(data_dir=str(data), max_length=256),
    ModelArguments(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    PretrainingArguments(),
    recipe_training_arguments(out / "pretrained", "pretrain", seed=0),
)
finetune(
    DataArguments(data_dir=str(data), labels=str(labels)),
    ModelArguments(model_name_or_path=str(out / "pretrained")),
    FinetuningArguments(),
    recipe_training_arguments(out / "finetuned", "finetune", seed=0),
)
print(
    format_report(evaluate_checkpoint(out / "finetuned", data, labels, split="held_out", baseline="logistic"))
)

model = AutoModelForSequenceClassification.from_pretrained(out / "finetuned")
tokenizer = EHREventTokenizer.from_pretrained(out / "finetuned")
held_out = build_labeled_dataset(data, labels, tokenizer, split="held_out")
print(
    "risk of the first 5 held-out admissions:", predict_dataset(model, held_out.select(range(5)), tokenizer)
)
