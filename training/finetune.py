"""Fine-tune for a binary outcome from a pretrained checkpoint (or from scratch without --model_name_or_path).

    python training/finetune.py --data_dir MEDS_DIR --labels MEDS_DIR/labels/in_hospital_mortality.parquet \
        --model_name_or_path out/pretrained --output_dir out/finetuned --num_train_epochs 5 --eval_strategy epoch

--label_fraction 0.1 trains on a random 10% of the training labels (low-label experiments). --labels takes a file, a
folder of label shards (ACES output) or a glob. Several tasks (--task a=a.parquet b=labels/b/
[--task_types binary,regression]) fine-tune one head per task on one backbone.
--linear_probe fits a cross-validated logistic regression on the frozen backbone's pooled embeddings instead (the
few-label choice, one binary label file) and saves it as a checkpoint that `ehr-transformer predict` uses.
--linear_probe_init fits that probe first and then fine-tunes every weight from it (LP-FT; use a small
--learning_rate such as 1e-4).
"""

from transformers import HfArgumentParser, TrainingArguments

from ehr_transformer.training.arguments import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    command_defaults,
)
from ehr_transformer.training.finetune import finetune
from ehr_transformer.training.trainer import finish_distributed

if __name__ == "__main__":
    parser = HfArgumentParser((DataArguments, ModelArguments, FinetuningArguments, TrainingArguments))
    parser.set_defaults(**command_defaults("finetune"))
    data_args, model_args, finetuning_args, training_args = parser.parse_args_into_dataclasses()
    finetune(data_args, model_args, finetuning_args, training_args)  # --linear_probe: finetune_linear_probe
    finish_distributed()
