"""The pretraining objectives' coordination: loss balancing strategies and the EMA teacher of the "feature" objective.

`EHRTransformerForMaskedEventModeling` computes one loss per objective of `config.pretraining_objectives` ("code",
"value", "time", "feature") and their static-weighted sum. `PretrainingTrainer` turns them into gradients by a
named strategy of `LOSS_BALANCING_STRATEGIES`:

- `static`: the fixed weights of the config (`objective_weights`);
- `uncertainty`: Kendall, Gal & Cipolla (2018): minimise sum_k exp(-s_k) L_k + s_k over learned log-variances
  s_k; the weight exp(-s_k) settles at 1 / L_k, so a noisier objective weighs less;
- `gradnorm`: Chen et al. (2018): learned weights w_k (renormalised to sum to K) trained so that the norm of
  each weighted objective's gradient on the last shared layer (the backbone's last block) tracks the mean norm
  times (relative inverse training rate)^alpha: an objective that trains slower gets a larger weight;
- `pcgrad`: Yu et al. (2020): each objective's gradient (of w_k L_k, static weights) loses its component along
  any other objective's gradient it conflicts with (negative dot product), in a random order, before they are
  summed.

Under multi-process data parallelism the per-objective gradients that are computed by hand (pcgrad: all
parameters; gradnorm: the last shared layer) and the balancing parameters' gradients are averaged over processes.

The "feature" objective's teacher is a copy of the backbone updated after every optimizer step as
teacher <- decay * teacher + (1 - decay) * student by `EMATeacherCallback`. It is attached to the model outside
its module tree, so it is neither trained nor part of the model's `state_dict` or saved folder; Trainer
checkpoints carry it as `ema_teacher.safetensors` so that a resumed run continues with the same teacher.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from ..utils import atomic_path

logger = logging.getLogger(__name__)

TEACHER_FILE = "ema_teacher.safetensors"


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


__all__ = [
    "LOSS_BALANCING_STRATEGIES",
    "LossBalancer",
    "UncertaintyWeighting",
    "GradNorm",
    "PCGrad",
    "EMATeacherCallback",
    "objective_gradients",
    "project_conflicting",
]
