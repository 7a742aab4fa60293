"""Pretraining on a MEDS dataset: masked events and the further objectives, balanced by a named strategy.

    python training/pretrain.py --data_dir MEDS_DIR --output_dir out/pretrained --num_train_epochs 10 \
        [--objectives code,value,time,feature] [--loss_balancing static|uncertainty|gradnorm|pcgrad]
    accelerate launch --config_file training/accelerate_ddp.yaml training/pretrain.py --data_dir ... --output_dir ...
    python training/pretrain.py --data_dir NEW_HOSPITAL --model_name_or_path out/pretrained ...  # continued

Every `transformers.TrainingArguments` flag applies. Data: --max_length --min_code_count --train_split
--eval_split --cache_dir. Model size: --hidden_size --num_hidden_layers --num_attention_heads --intermediate_size.
Objectives (PretrainingArguments): --objectives --objective_weights "code=1,value=0.5" --mlm_probability
--value_mask_probability --value_mask_strategy random|future --time_mask_probability --ema_decay
--feature_target_layers --loss_balancing --balancing_learning_rate.
"""

from transformers import HfArgumentParser, TrainingArguments

from ehr_transformer.training.arguments import (
    DataArguments,
    ModelArguments,
    PretrainingArguments,
    command_defaults,
)
from ehr_transformer.training.pretrain import pretrain
from ehr_transformer.training.trainer import finish_distributed

if __name__ == "__main__":
    parser = HfArgumentParser((DataArguments, ModelArguments, PretrainingArguments, TrainingArguments))
    parser.set_defaults(**command_defaults("pretrain"))
    data_args, model_args, pretraining_args, training_args = parser.parse_args_into_dataclasses()
    pretrain(data_args, model_args, pretraining_args, training_args)
    finish_distributed()
