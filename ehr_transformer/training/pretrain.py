"""Pretraining on unlabeled timelines: `PretrainingTrainer` (objectives balanced, EMA teacher kept) and `pretrain`.

Learned objective weights (uncertainty, gradnorm) are parameters of the trainer's `loss_balancer`, optimised by the
Trainer's optimizer in a parameter group of their own (`balancing_learning_rate`, no weight decay) and saved in
Trainer checkpoints as `loss_balancing.json`, never in the model. Gradients accumulate over gradient accumulation
steps. Each logging step adds `<objective>_loss` (mean over the micro-batches since the last log) and
`<objective>_weight` (the current weight) to `trainer.state.log_history`; `loss` stays the static-weighted sum,
comparable between strategies.

Example (the collator must produce the targets of the configured objectives):

    >>> from datasets import Dataset
    >>> from transformers import TrainingArguments
    >>> from ehr_transformer import EHRTransformerConfig, EHRTransformerForMaskedEventModeling
    >>> from ehr_transformer.data.collators import DataCollatorForMaskedEventModeling
    >>> from ehr_transformer.training.pretrain import PretrainingTrainer
    >>> config = EHRTransformerConfig(vocab_size=tokenizer.vocab_size,
    ...                               pretraining_objectives=["code", "value", "time", "feature"])
    >>> collator = DataCollatorForMaskedEventModeling(tokenizer, value_mask_probability=0.3,
    ...                                               time_mask_probability=0.15, return_teacher_inputs=True)
    >>> trainer = PretrainingTrainer(
    ...     model=EHRTransformerForMaskedEventModeling(config),
    ...     args=TrainingArguments("out", max_steps=200, logging_steps=10, report_to="none"),
    ...     train_dataset=Dataset.from_list(features),  # input_ids, values, times, ages per sequence
    ...     data_collator=collator,
    ...     loss_balancing="pcgrad",
    ... )
    >>> trainer.train()  # trainer.state.log_history: code_loss, ..., code_weight, ...
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from transformers import TrainingArguments

from ..checkpoint_safety import check_checkpoint_folder
from ..data.collators import DataCollatorForMaskedEventModeling
from ..data.dataset import build_pretraining_dataset
from ..loading import OBJECTIVE_HEADS, load_pretrained
from ..modeling_ehr import EHRTransformerForMaskedEventModeling
from ..selection.prototypes import write_population_summary
from ..tokenization_ehr import EHREventTokenizer
from ..utils import write_json
from .arguments import DataArguments, ModelArguments, PretrainingArguments
from .checkpoint import (
    card_for_training,
    config_for,
    fit_tokenizer,
    remove_trainer_checkpoints,
    save_checkpoint,
)
from .objectives import LOSS_BALANCING_STRATEGIES, TEACHER_FILE, EMATeacherCallback, PCGrad, all_reduce
from .trainer import ReproducibleMasking, ResumableTrainer, seed_before_model_init

logger = logging.getLogger(__name__)

BALANCER_FILE = "loss_balancing.json"


# Collator settings without which an objective gets no targets.
_TARGET_SETTINGS = {
    "value": "value_mask_probability",
    "time": "time_mask_probability",
    "feature": "return_teacher_inputs",
}


class PretrainingTrainer(ResumableTrainer):
    """A `transformers.Trainer` (with :class:`ResumableTrainer`'s exact resume) for
    `EHRTransformerForMaskedEventModeling` that balances the pretraining objectives by `loss_balancing` (one of
    `LOSS_BALANCING_STRATEGIES`) and, when "feature" is an objective, keeps its EMA teacher
    (:class:`EMATeacherCallback` with `ema_decay`). Every other argument is the Trainer's.

    Args:
        loss_balancing: "static", "uncertainty", "gradnorm" or "pcgrad".
        balancing_learning_rate: learning rate of the learned weights (uncertainty, gradnorm).
        gradnorm_alpha: GradNorm's asymmetry alpha (higher pulls the training rates together harder).
        ema_decay: the teacher's decay per optimizer step.
    """

    def __init__(
        self,
        *args,
        loss_balancing: str = "static",
        balancing_learning_rate: float = 0.025,
        gradnorm_alpha: float = 1.5,
        ema_decay: float = 0.999,
        **kwargs,
    ) -> None:
        if loss_balancing not in LOSS_BALANCING_STRATEGIES:
            raise ValueError(
                f"loss_balancing must be one of {list(LOSS_BALANCING_STRATEGIES)}, got {loss_balancing!r}"
            )
        super().__init__(*args, **kwargs)
        model = self.model
        if not hasattr(model, "loss_weights") or not hasattr(model.config, "pretraining_objectives"):
            raise TypeError(
                f"PretrainingTrainer trains EHRTransformerForMaskedEventModeling, got {type(model).__name__}"
            )
        self.objectives = list(model.config.pretraining_objectives)
        options = {"alpha": gradnorm_alpha} if loss_balancing == "gradnorm" else {}
        self.loss_balancing = loss_balancing
        self.loss_balancer = LOSS_BALANCING_STRATEGIES[loss_balancing](
            self.objectives,
            model.loss_weights(),
            parameters=[p for p in model.parameters() if p.requires_grad],
            shared_parameters=list(model.model.layers[-1].parameters()),
            **options,
        ).to(self.args.device)
        if self.loss_balancer.manual_gradients and self.args.fp16:
            raise ValueError(
                f"{loss_balancing} computes gradients itself and does not support fp16; use bf16 or fp32"
            )
        self.balancing_learning_rate = balancing_learning_rate
        self.teacher_callback = None
        if "feature" in self.objectives:
            found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, EMATeacherCallback)]
            self.teacher_callback = found[0] if found else EMATeacherCallback(ema_decay)
            if not found:
                self.add_callback(self.teacher_callback)
        if (
            self.args.label_names is None
        ):  # the other targets are optional: evaluate whenever `labels` is there
            self.label_names = ["labels"]
        for name, setting in _TARGET_SETTINGS.items():
            if name in self.objectives and hasattr(self.data_collator, setting):
                if not getattr(self.data_collator, setting):
                    logger.warning(
                        "objective %r is configured but the collator has %s=%r: it gets no targets and is not trained",
                        name,
                        setting,
                        getattr(self.data_collator, setting),
                    )
        self._loss_sums = torch.zeros(len(self.objectives), device=self.args.device)
        self._loss_counts = torch.zeros(len(self.objectives), device=self.args.device)
        self._step_of_last_micro_batch, self._micro_batch = -1, 0

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = list(self.loss_balancer.parameters())
        if params and not any(p is params[0] for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group(
                {"params": params, "lr": self.balancing_learning_rate, "weight_decay": 0.0}
            )
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        if self.state.global_step != self._step_of_last_micro_batch:  # a new optimizer step begins
            self.loss_balancer.zero_grad(set_to_none=True)
            self._step_of_last_micro_batch, self._micro_batch = self.state.global_step, 0
        if isinstance(self.loss_balancer, PCGrad):  # the same projection order in every process and on resume
            seed = (self.args.seed * 1_000_003 + self.state.global_step) * 1_009 + self._micro_batch
            self.loss_balancer.generator = torch.Generator().manual_seed(seed)
        self._micro_batch += 1
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        # PCGrad writes `.grad` itself (and averages over processes): DDP must not expect a backward pass.
        sync = (
            self.accelerator.no_sync(model)
            if self.loss_balancer.manual_gradients
            else contextlib.nullcontext()
        )
        with sync:
            with self.compute_loss_context_manager():
                outputs = model(**inputs)
            losses = {n: getattr(outputs, f"{n}_loss") for n in self.objectives}
            losses = {n: loss for n, loss in losses.items() if loss is not None}
            if losses:
                self.loss_balancer.backward(losses, scale, self.accelerator.backward)
        for param in self.loss_balancer.parameters():  # not in the DDP model: average by hand
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            all_reduce(param.grad)
        with torch.no_grad():
            for i, name in enumerate(self.objectives):
                if name in losses:
                    self._loss_sums[i] += losses[name].detach().float()
                    self._loss_counts[i] += 1
        if outputs.loss is None:
            return torch.zeros((), device=self.args.device)
        return outputs.loss.detach() * scale

    def _track_num_input_tokens(self, inputs):
        # a packed batch numbers the subjects of a row 1, 2, 3, ... in `attention_mask`: count its events, not the
        # numbers (`--include_num_input_tokens_seen non_padding` sums the mask)
        if isinstance(inputs, dict) and "attention_mask" in inputs:
            inputs = {**inputs, "attention_mask": inputs["attention_mask"] != 0}
        return super()._track_num_input_tokens(inputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (called in every process): add each objective's loss and weight
            sums, counts = (
                all_reduce(self._loss_sums.clone(), mean=False),
                all_reduce(self._loss_counts.clone(), mean=False),
            )
            for i, name in enumerate(self.objectives):
                if counts[i] > 0:
                    logs[f"{name}_loss"] = round(float(sums[i] / counts[i]), 6)
            for name, weight in zip(self.objectives, self.loss_balancer.weights().tolist(), strict=True):
                logs[f"{name}_weight"] = round(weight, 6)
            if isinstance(self.loss_balancer, PCGrad) and self.loss_balancer.pairs:
                logs["pcgrad_conflict_rate"] = round(
                    self.loss_balancer.conflicts / self.loss_balancer.pairs, 4
                )
                self.loss_balancer.conflicts = self.loss_balancer.pairs = 0.0
            self._loss_sums.zero_()
            self._loss_counts.zero_()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        state = self.loss_balancer.state_dict()
        if self.args.should_save and any(k != "static_weights" for k in state):
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            write_json(
                folder / BALANCER_FILE,
                {"loss_balancing": self.loss_balancing, **{k: v.tolist() for k, v in state.items()}},
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / BALANCER_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.pop("loss_balancing") != self.loss_balancing:
                raise ValueError(
                    f"{path} was written by another loss balancing strategy than {self.loss_balancing!r}"
                )
            current = self.loss_balancer.state_dict()
            self.loss_balancer.load_state_dict(
                {k: torch.tensor(v, dtype=current[k].dtype) for k, v in saved.items()}
            )
        if self.teacher_callback is not None:
            if not self.teacher_callback.load(self.model if model is None else model, resume_from_checkpoint):
                logger.warning(
                    "%s has no %s: the EMA teacher restarts as a copy of the student",
                    resume_from_checkpoint,
                    TEACHER_FILE,
                )


def parse_objectives(pretraining_args: PretrainingArguments) -> dict:
    """The config fields of `--objectives`, `--objective_weights` and `--feature_target_layers`."""
    objectives = [name.strip() for name in pretraining_args.objectives.split(",") if name.strip()]
    weights = None
    if pretraining_args.objective_weights:
        try:
            pairs = [
                item.split("=") for item in pretraining_args.objective_weights.split(",") if item.strip()
            ]
            weights = {name.strip(): float(value) for name, value in pairs}
        except ValueError as error:
            raise ValueError(
                f"--objective_weights {pretraining_args.objective_weights!r}: expected name=weight pairs separated by "
                "commas, e.g. 'code=1,value=0.5'"
            ) from error
    return {
        "pretraining_objectives": objectives,
        "objective_weights": weights,
        "feature_target_layers": pretraining_args.feature_target_layers,
    }


def describe_objectives(
    model: EHRTransformerForMaskedEventModeling, pretraining_args: PretrainingArguments
) -> str:
    """The model card's `objectives` line: each objective with its masking ratio, and the loss balancing."""
    config = model.config
    parts = {
        "code": f"masked code prediction ({pretraining_args.mlm_probability:.0%} of events, 80/10/10)",
        "value": f"value reconstruction ({pretraining_args.value_mask_probability:.0%} of valued events, "
        f"{'the latest' if pretraining_args.value_mask_strategy == 'future' else 'at random'}, MSE)",
        "time": f"time-gap reconstruction ({pretraining_args.time_mask_probability:.0%} of events, MSE of log1p hours)",
        "feature": f"feature reconstruction (EMA teacher, decay {pretraining_args.ema_decay}, mean of its top "
        f"{config.feature_target_layers} layers, MSE at masked events)",
    }
    weights = ", ".join(f"{name} {weight:g}" for name, weight in model.loss_weights().items())
    if pretraining_args.loss_balancing in ("uncertainty", "gradnorm"):
        weights = "learned"
    described = " + ".join(parts[name] for name in config.pretraining_objectives)
    return f"{described}; loss balancing: {pretraining_args.loss_balancing} (weights: {weights})"


def pretrain(
    data_args: DataArguments,
    model_args: ModelArguments,
    pretraining_args: PretrainingArguments,
    training_args: TrainingArguments,
    tokenizer: EHREventTokenizer | None = None,
) -> EHRTransformerForMaskedEventModeling:
    """Pretraining on the unlabeled timelines of the training split (`pretraining_args.objectives`, balanced
    by `pretraining_args.loss_balancing`); saves to `output_dir`.

    From scratch, the tokenizer is fitted on the training split. With `model_args.model_name_or_path`, pretraining
    continues from that checkpoint (domain-adaptive pretraining on a new population): its weights, its architecture
    and its tokenizer, or `tokenizer` when given (e.g. the checkpoint's vocabulary with value statistics refitted
    on the new data; its vocabulary size must equal the checkpoint's). Heads of objectives the checkpoint lacks
    start fresh."""
    objective_fields = parse_objectives(pretraining_args)
    if model_args.model_name_or_path:
        check_checkpoint_folder(model_args.model_name_or_path)  # refuse pickle-only/absurd folders
        tokenizer = tokenizer or EHREventTokenizer.from_pretrained(model_args.model_name_or_path)
    else:
        tokenizer = tokenizer or fit_tokenizer(data_args)
    seed_before_model_init(training_args)
    if model_args.model_name_or_path:
        model = (
            load_pretrained(  # heads of objectives the checkpoint lacks start fresh: no LOAD REPORT for them
                EHRTransformerForMaskedEventModeling,
                model_args.model_name_or_path,
                expected_missing=OBJECTIVE_HEADS,
                expected_unexpected=OBJECTIVE_HEADS,
                **objective_fields,
                attn_implementation=model_args.attn_implementation,
                use_safetensors=True,
            )
        )
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} codes but {model_args.model_name_or_path} has vocab_size "
                f"{model.config.vocab_size}: continued pretraining keeps the checkpoint's vocabulary"
            )
    else:
        config = config_for(tokenizer, model_args, **objective_fields)
        model = EHRTransformerForMaskedEventModeling._from_config(
            config, attn_implementation=model_args.attn_implementation
        )
    objectives = model.config.pretraining_objectives
    implementation = model.config._attn_implementation or "eager"
    if pretraining_args.pack_sequences and "flash" in implementation and not model.config.unpad_inputs:
        raise ValueError(
            f"--pack_sequences with {implementation} needs the padding-free path (config.unpad_inputs): flash "
            "kernels take no per-subject mask on the padded path, so packed subjects would see each other"
        )
    # The collator checks its settings: built before the datasets, a bad one is refused in seconds.
    collator = DataCollatorForMaskedEventModeling(
        tokenizer,
        mlm_probability=pretraining_args.mlm_probability,
        value_mask_probability=pretraining_args.value_mask_probability if "value" in objectives else 0.0,
        value_mask_strategy=pretraining_args.value_mask_strategy,
        time_mask_probability=pretraining_args.time_mask_probability if "time" in objectives else 0.0,
        return_teacher_inputs="feature" in objectives,
        pack_sequences=pretraining_args.pack_sequences,
    )
    train_dataset = build_pretraining_dataset(
        data_args.data_dir, tokenizer, data_args.train_split, data_args.cache_dir
    )
    eval_dataset = build_pretraining_dataset(
        data_args.data_dir, tokenizer, data_args.eval_split, data_args.cache_dir
    )
    logger.info("pretraining on %d subjects, evaluating on %d", len(train_dataset), len(eval_dataset))
    trainer = PretrainingTrainer(  # a ResumableTrainer: killed runs resume bit-identically (see trainer.py)
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if len(eval_dataset) else None,
        data_collator=ReproducibleMasking(collator, seed=training_args.seed),
        loss_balancing=pretraining_args.loss_balancing,
        balancing_learning_rate=pretraining_args.balancing_learning_rate,
        ema_decay=pretraining_args.ema_decay,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if trainer.is_world_process_zero():
        started_from = Path(model_args.model_name_or_path or "random init").name
        card = card_for_training(
            data_args,
            tokenizer,
            train_dataset,
            training_args,
            objectives=describe_objectives(trainer.model, pretraining_args),
            started_from=started_from,
        )
        # prototypes + code frequencies for model selection
        card["population"] = write_population_summary(
            trainer.model,
            tokenizer,
            train_dataset,
            eval_dataset,
            data_args.data_dir,
            training_args.output_dir,
            data_args.train_split,
            training_args.seed,
        )
        save_checkpoint(trainer.model, tokenizer, training_args.output_dir, {"kind": "pretrained", **card})
        trainer.save_state()  # trainer_state.json: the run's log history, kept once its checkpoints go
        remove_trainer_checkpoints(training_args.output_dir)  # a finished run needs no resume folders
    return trainer.model


__all__ = ["PretrainingTrainer", "pretrain", "parse_objectives", "describe_objectives", "BALANCER_FILE"]
