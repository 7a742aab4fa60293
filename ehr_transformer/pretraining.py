"""Multitask pretraining: balancing the objectives of `EHRTransformerForMaskedEventModeling`, and the EMA teacher
of its "feature" objective, over the `transformers.Trainer`.

The model computes one loss per objective of `config.pretraining_objectives` ("code", "value", "time",
"feature") and their static-weighted sum. `PretrainingTrainer` (a :class:`~ehr_transformer.safety.ResumableTrainer`,
so killed runs still resume bit-identically) turns them into gradients by a named strategy:

- ``static``: the fixed weights of the config (`objective_weights`, `value_loss_weight`);
- ``uncertainty``: Kendall, Gal & Cipolla (2018): minimise sum_k exp(-s_k) L_k + s_k over learned log-variances
  s_k; the weight exp(-s_k) settles at 1 / L_k, so a noisier objective weighs less;
- ``gradnorm``: Chen et al. (2018): learned weights w_k (renormalised to sum to K) trained so that the norm of
  each weighted objective's gradient on the last shared layer (the backbone's last block) tracks the mean norm
  times (relative inverse training rate)^alpha: an objective that trains slower gets a larger weight;
- ``pcgrad``: Yu et al. (2020): each objective's gradient (of w_k L_k, static weights) loses its component along
  any other objective's gradient it conflicts with (negative dot product), in a random order, before they are
  summed.

Learned weights (uncertainty, gradnorm) are parameters of the trainer's `loss_balancer`, optimised by the
Trainer's optimizer in a parameter group of their own (`balancing_learning_rate`, no weight decay) and saved in
Trainer checkpoints as `loss_balancing.json`, never in the model. Gradients accumulate over gradient
accumulation steps. Under multi-process data parallelism the per-objective gradients that are computed by hand
(pcgrad: all parameters; gradnorm: the last shared layer) and the balancing parameters' gradients are averaged
over processes. Each logging step adds `<objective>_loss` (mean over the micro-batches since the last log) and
`<objective>_weight` (the current weight) to `trainer.state.log_history`; `loss` stays the static-weighted sum,
comparable between strategies.

The "feature" objective's teacher is a copy of the backbone updated after every optimizer step as
teacher <- decay * teacher + (1 - decay) * student by :class:`EMATeacherCallback` (`PretrainingTrainer` adds it
when the objective is on; with a plain `Trainer`, add it yourself). It is attached to the model outside its module
tree, so it is neither trained nor part of the model's `state_dict` or saved folder; Trainer checkpoints carry it
as `ema_teacher.safetensors` so that a resumed run continues with the same teacher.

Example (the collator must produce the targets of the configured objectives):

    >>> from datasets import Dataset
    >>> from transformers import TrainingArguments
    >>> from ehr_transformer import EHRTransformerConfig, EHRTransformerForMaskedEventModeling
    >>> from ehr_transformer.data.collators import DataCollatorForMaskedEventModeling
    >>> from ehr_transformer.pretraining import PretrainingTrainer
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
import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from .safety import ResumableTrainer
from .utils import atomic_path, write_json

logger = logging.getLogger(__name__)

TEACHER_FILE = "ema_teacher.safetensors"
BALANCER_FILE = "loss_balancing.json"


def all_reduce(tensor: torch.Tensor, mean: bool = True) -> torch.Tensor:
    """Sum (or average) `tensor` in place over the processes of a distributed run; a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        if mean:
            tensor /= dist.get_world_size()
    return tensor


def objective_gradients(
    losses: dict[str, torch.Tensor],
    objectives: Sequence[str],
    parameters: Sequence[nn.Parameter],
    retain_graph: bool = False,
) -> torch.Tensor:
    """(K, P) float32: row k is d losses[objectives[k]] / d parameters, flattened; a zero row for an objective
    absent from `losses`, zeros for parameters a loss does not reach. Averaged over the processes of a
    distributed run (every process calls it with all K rows, whichever objectives its batch had). The graph is
    freed after the last loss unless `retain_graph`."""
    numel = sum(p.numel() for p in parameters)
    rows = torch.zeros(len(objectives), numel, device=parameters[0].device)
    present = [k for k, name in enumerate(objectives) if name in losses]
    for k in present:
        grads = torch.autograd.grad(
            losses[objectives[k]],
            parameters,
            retain_graph=retain_graph or k != present[-1],
            allow_unused=True,
        )
        rows[k] = torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).flatten().float()
                for g, p in zip(grads, parameters, strict=True)
            ]
        )
    return all_reduce(rows)


def project_conflicting(gradients: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad's projection. `gradients` (K, P): one flattened gradient per objective. Each row, in turn against the
    other rows taken in a random order, loses its component along a row it conflicts with (negative dot product).
    Returns the projected (K, P) rows; their sum is the update."""
    projected = gradients.clone()
    for i in range(len(gradients)):
        others = [j for j in torch.randperm(len(gradients), generator=generator).tolist() if j != i]
        for j in others:
            dot = projected[i] @ gradients[j]
            if dot < 0:
                projected[i] -= dot / gradients[j].pow(2).sum().clamp(min=1e-20) * gradients[j]
    return projected


class LossBalancer(nn.Module):
    """Turns the objectives' losses of one micro-batch into parameter gradients (`backward`) and says what each
    objective weighs (`weights`). This base class is the ``static`` strategy: the weighted sum, one backward pass.

    Args:
        objectives: the objective names, in `config.pretraining_objectives` order.
        static_weights: the config's weight of each objective (`model.loss_weights()`).
        parameters: every trained parameter of the model (pcgrad computes each objective's gradient on them).
        shared_parameters: the last layer shared by all objectives (gradnorm's norms are taken there).
    """

    manual_gradients = False  # True: writes `.grad` itself, so the caller must skip DDP's gradient hooks

    def __init__(
        self,
        objectives: Sequence[str],
        static_weights: dict[str, float],
        parameters: Sequence[nn.Parameter] = (),
        shared_parameters: Sequence[nn.Parameter] = (),
    ):
        super().__init__()
        self.objectives = list(objectives)
        self.register_buffer(
            "static_weights", torch.tensor([float(static_weights[n]) for n in self.objectives])
        )
        self.parameters_, self.shared_parameters_ = list(parameters), list(shared_parameters)

    def weights(self) -> torch.Tensor:
        """(K,) the current weight of each objective."""
        return self.static_weights

    def stack(self, losses: dict[str, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """Indices of the objectives present in `losses` and their losses stacked, (K',)."""
        present = [i for i, name in enumerate(self.objectives) if name in losses]
        return present, torch.stack([losses[self.objectives[i]].float() for i in present])

    def backward(
        self, losses: dict[str, torch.Tensor], scale: float = 1.0, backward_fn: Callable | None = None
    ) -> None:
        """Accumulate the gradients of one micro-batch. `losses`: name -> scalar loss, for the objectives that had
        targets in it. `scale`: 1 / gradient accumulation steps. `backward_fn`: `accelerator.backward` (mixed
        precision scaling), else `Tensor.backward`."""
        present, stacked = self.stack(losses)
        combined = (self.weights()[present].to(stacked) * stacked).sum()
        (backward_fn or torch.Tensor.backward)(combined * scale)


class UncertaintyWeighting(LossBalancer):
    """Kendall, Gal & Cipolla (2018): minimise sum_k exp(-s_k) L_k + s_k; s_k = log sigma_k^2 is learned."""

    def __init__(self, objectives, static_weights, parameters=(), shared_parameters=()):
        super().__init__(objectives, static_weights, parameters, shared_parameters)
        self.log_variances = nn.Parameter(torch.zeros(len(self.objectives)))

    def weights(self) -> torch.Tensor:
        return torch.exp(-self.log_variances.detach())

    def backward(self, losses, scale=1.0, backward_fn=None) -> None:
        present, stacked = self.stack(losses)
        s = self.log_variances[present]  # (K',)
        combined = (torch.exp(-s) * stacked + s).sum()
        (backward_fn or torch.Tensor.backward)(combined * scale)


class GradNorm(LossBalancer):
    """Chen et al. (2018). Weights w_k (sum K) are learned with the loss sum_k |G_k - mean(G) * r_k^alpha|, where
    G_k = w_k * ||d L_k / d W|| on the last shared layer W and r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)) is
    objective k's relative inverse training rate (the target is a constant); the model gets sum_k w_k L_k."""

    def __init__(self, objectives, static_weights, parameters=(), shared_parameters=(), alpha: float = 1.5):
        super().__init__(objectives, static_weights, parameters, shared_parameters)
        if not self.shared_parameters_:
            raise ValueError(
                "gradnorm needs the shared_parameters (the last shared layer) to take gradient norms on"
            )
        self.alpha = alpha
        self.loss_weights = nn.Parameter(torch.ones(len(self.objectives)))
        self.register_buffer("initial_losses", torch.full((len(self.objectives),), float("nan")))

    def weights(self) -> torch.Tensor:
        return self.loss_weights.detach()

    def backward(self, losses, scale=1.0, backward_fn=None) -> None:
        with torch.no_grad():  # the paper's renormalisation, after every update of the weights
            self.loss_weights.clamp_(min=1e-3).mul_(len(self.objectives) / self.loss_weights.sum())
        present, stacked = self.stack(losses)
        index = torch.tensor(present, device=self.initial_losses.device)
        unset = torch.isnan(self.initial_losses[index])
        self.initial_losses[index[unset]] = stacked.detach()[unset].to(self.initial_losses)
        # ||d L_k / d W|| on the whole (global) batch; the graph is kept for the model's backward below
        shared_grads = objective_gradients(
            losses, self.objectives, self.shared_parameters_, retain_graph=True
        )
        norms = shared_grads[present].norm(dim=1)  # (K',)
        w = self.loss_weights[present]  # (K',)
        weighted_norms = w * norms  # (K',) G_k
        ratios = stacked.detach() / self.initial_losses[present].to(stacked).clamp(min=1e-12)  # (K',)
        target = weighted_norms.mean().detach() * (ratios / ratios.mean()) ** self.alpha  # (K',)
        (grad,) = torch.autograd.grad((weighted_norms - target).abs().sum(), self.loss_weights)
        previous = 0.0 if self.loss_weights.grad is None else self.loss_weights.grad
        self.loss_weights.grad = previous + grad * scale
        (backward_fn or torch.Tensor.backward)((w.detach() * stacked).sum() * scale)


class PCGrad(LossBalancer):
    """Yu et al. (2020), "Gradient surgery": see :func:`project_conflicting`; weights are the static ones."""

    manual_gradients = True

    def __init__(self, objectives, static_weights, parameters=(), shared_parameters=()):
        super().__init__(objectives, static_weights, parameters, shared_parameters)
        if not self.parameters_:
            raise ValueError("pcgrad needs the model's trained parameters")
        self.generator: torch.Generator | None = None  # the projection order; seeded by the trainer
        self.conflicts = 0.0  # pairs of objectives whose gradients conflicted, summed over calls
        self.pairs = 0.0

    def backward(self, losses, scale=1.0, backward_fn=None) -> None:
        weights = dict(zip(self.objectives, self.weights().tolist(), strict=True))
        weighted = {name: weights[name] * loss * scale for name, loss in losses.items()}
        gradients = objective_gradients(weighted, self.objectives, self.parameters_)  # (K, P)
        dots = gradients @ gradients.T  # (K, K)
        nonzero = dots.diagonal() > 0  # (K,) objectives with a gradient in some process
        pairs = (
            nonzero[:, None] & nonzero[None, :] & ~torch.eye(len(dots), dtype=torch.bool, device=dots.device)
        )
        self.conflicts += float((dots[pairs] < 0).sum()) / 2
        self.pairs += float(pairs.sum()) / 2
        update = project_conflicting(gradients, self.generator).sum(dim=0)  # (P,)
        offset = 0
        for p in self.parameters_:
            g = update[offset : offset + p.numel()].view_as(p).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
            offset += p.numel()


LOSS_BALANCING_STRATEGIES: dict[str, type[LossBalancer]] = {
    "static": LossBalancer,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
}


class EMATeacherCallback(TrainerCallback):
    """Keeps the "feature" objective's teacher: at the start of training a frozen copy of the model's backbone
    (eval mode, no gradient), attached with `model.set_feature_teacher`; after every optimizer step
    teacher <- decay * teacher + (1 - decay) * student. On save it writes the teacher to the Trainer checkpoint
    (`ema_teacher.safetensors`, beside but not inside `model.safetensors`), from which a resumed run reloads it."""

    def __init__(self, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        self.decay = decay

    @staticmethod
    def make_teacher(model) -> nn.Module:
        teacher = copy.deepcopy(model.model).eval()
        teacher.requires_grad_(False)
        model.set_feature_teacher(teacher)
        return teacher

    def load(self, model, checkpoint: str | os.PathLike) -> bool:
        """Attach the teacher saved in a Trainer checkpoint folder; False where it has none."""
        path = Path(checkpoint) / TEACHER_FILE
        if not path.is_file():
            return False
        self.make_teacher(model).load_state_dict(load_file(path, device=str(model.device)))
        return True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if (
            model.feature_teacher is not None
        ):  # reloaded by PretrainingTrainer, or kept from an earlier train()
            return
        if state.global_step > 0 and self.load(
            model, Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ):
            return
        if state.global_step > 0:
            logger.warning(
                "resuming without %s: the EMA teacher restarts as a copy of the student", TEACHER_FILE
            )
        self.make_teacher(model)

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        for teacher, student in zip(
            model.feature_teacher.parameters(), model.model.parameters(), strict=True
        ):
            teacher.lerp_(student.detach(), 1.0 - self.decay)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model.feature_teacher is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                weights = {k: v.contiguous() for k, v in model.feature_teacher.state_dict().items()}
                with atomic_path(folder / TEACHER_FILE) as tmp:
                    save_file(weights, tmp)


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
                        name, setting, getattr(self.data_collator, setting),
                    )  # fmt: skip
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


__all__ = [
    "LOSS_BALANCING_STRATEGIES",
    "LossBalancer",
    "UncertaintyWeighting",
    "GradNorm",
    "PCGrad",
    "project_conflicting",
    "objective_gradients",
    "EMATeacherCallback",
    "PretrainingTrainer",
    "all_reduce",
]
