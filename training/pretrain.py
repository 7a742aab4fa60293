"""Masked event pretraining on a MEDS dataset.

    python training/pretrain.py --data_dir MEDS_DIR --output_dir out/pretrained --num_train_epochs 10
    accelerate launch --config_file training/accelerate_ddp.yaml training/pretrain.py --data_dir ... --output_dir ...

Every `transformers.TrainingArguments` flag applies; model size flags: --hidden_size --num_hidden_layers
--num_attention_heads --intermediate_size --max_length --min_code_count --mlm_probability.
"""

from transformers import HfArgumentParser, TrainingArguments

from ehr_transformer.training import TRAINING_DEFAULTS, DataArguments, ModelArguments, pretrain

if __name__ == "__main__":
    parser = HfArgumentParser((DataArguments, ModelArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    data_args, model_args, training_args = parser.parse_args_into_dataclasses()
    pretrain(data_args, model_args, training_args)
