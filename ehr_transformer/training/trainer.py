"""The Trainer of every training run: resumable bit-identically after a kill, seeded before the model is built.

`ResumableTrainer` (a `transformers.Trainer`) and `ReproducibleMasking` (a collator wrapper) make a run killed at
any step and resumed with `--resume_from_checkpoint` end with bit-identical weights on CPU. The plain Trainer
cannot: (1) accelerate's data loader collates one batch ahead, so a collator that masks with the global RNG draws
at different moments in a resumed run (its RNG state is restored only after the first batches are collated);
(2) the length-grouped sampler draws each epoch's order from the global RNG when the epoch's iterator is created,
before the resumed run restores that RNG. Here the masking randomness of a batch is a function of (seed, epoch,
the batch's content) and each epoch's order a function of (seed, epoch); the global RNG, saved in and restored
from every checkpoint by the Trainer, is left to dropout alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import enable_full_determinism, set_seed

from ..data.dataset import label_row_budget


# ----------------------------------------------------------------------------------------- crash-safe training
@dataclass
class ReproducibleMasking:
    """Wraps a collator that draws from its `generator` (e.g. `DataCollatorForMaskedEventModeling`): before each
    batch the generator is seeded from (seed, epoch, the batch's input_ids), so a batch gets the same masks
    whenever and in whatever process it is collated. Batches of one epoch differ in content, so their masks are
    independent draws; `epoch` (set by :class:`ResumableTrainer`) makes them differ between epochs."""

    collator: Any
    seed: int = 0
    epoch: int = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}".encode(), digest_size=8)
        for feature in features:
            digest.update(np.asarray(feature["input_ids"], dtype=np.int64).tobytes() + b"|")
        self.collator.generator = torch.Generator().manual_seed(
            int.from_bytes(digest.digest(), "little") >> 1
        )
        return self.collator(features)

    def __getattr__(self, name: str) -> Any:  # tokenizer, mlm_probability, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


class _EpochCallback(TrainerCallback):
    def __init__(self, trainer: ResumableTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = math.floor((state.epoch or 0.0) + 1e-9)  # state.epoch is k.0 exactly at the start of epoch k
        self.trainer.set_epoch(epoch)


class LabelRowSampler(torch.utils.data.Sampler):
    """Each epoch, `n` of the rows drawn afresh uniformly at random, in length-grouped batches; seeded by (seed,
    epoch). With per-hour labels, `n = label_row_budget(k)` bounds an epoch's cost while every row keeps the same
    weight (as in evaluation) and every row is seen over the epochs."""

    def __init__(self, lengths, n: int, batch_size: int, seed: int) -> None:
        self.lengths = np.asarray(lengths)
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        chosen = rng.choice(self.lengths.size, self.n, replace=False)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        grouped = get_length_grouped_indices(
            self.lengths[chosen].tolist(), self.batch_size, generator=generator
        )
        return iter(chosen[grouped].tolist())


class ResumableTrainer(Trainer):
    """`transformers.Trainer` whose runs resume bit-identically after a kill: the length-grouped training order is
    seeded by (seed, epoch) rather than drawn from the global RNG, and a :class:`ReproducibleMasking` collator is
    told the epoch. Everything else (checkpoints, RNG state, optimizer and scheduler) is the Trainer's own.

    `labels_per_subject` k > 0: each epoch trains on `label_row_budget(k)` rows drawn uniformly
    (`LabelRowSampler`; the training dataset needs `subject_id` and `length` columns)."""

    def __init__(self, *args, labels_per_subject: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not torch.accelerator.is_available():
            # pinned memory only speeds copies to an accelerator; without one torch warns at every data loader
            self.args.dataloader_pin_memory = False
        self._samplers: list = []
        self.add_callback(_EpochCallback(self))
        self._row_budget = None
        if labels_per_subject and self.train_dataset is not None:
            n = label_row_budget(self.train_dataset["subject_id"], labels_per_subject)
            if n < len(self.train_dataset):  # some subject has more rows than k
                self._row_budget = n

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.data_collator, ReproducibleMasking):
            self.data_collator.epoch = epoch
        for sampler in self._samplers:
            if isinstance(sampler, LabelRowSampler):
                sampler.epoch = epoch
            else:
                sampler.generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)

    def _get_train_sampler(self, train_dataset=None):
        if self._row_budget is not None:
            lengths = self.train_dataset["length"]
            sampler = LabelRowSampler(lengths, self._row_budget, self.args.train_batch_size, self.args.seed)
            self._samplers.append(sampler)
            return sampler
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and sampler.generator is None:
            sampler.generator = torch.Generator().manual_seed(self.args.seed * 1_000_003)
            self._samplers.append(sampler)
        return sampler


def seed_before_model_init(training_args: TrainingArguments) -> None:
    """Seed (or make fully deterministic) before the model is built: the Trainer seeds only inside its own
    `__init__`, after our model's random initialisation, so two runs with one seed would otherwise differ."""
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)


def finish_distributed() -> None:
    """End a multi-process run cleanly: wait for every process, then destroy the process group. A process that
    exits with its gloo/NCCL group still alive can abort at interpreter shutdown ("terminate called without an
    active exception") after its work is done. Call it at the end of a script run under `accelerate launch`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def early_stopping(training_args, patience: int) -> list:
    """`[EarlyStoppingCallback(patience)]` when the run evaluates and restores its best checkpoint (as the
    fine-tuning recipe does), else `[]` (early stopping without restoring the best epoch keeps a worse model)."""
    if patience <= 0 or training_args.eval_strategy == "no" or not training_args.load_best_model_at_end:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=patience)]


__all__ = [
    "ReproducibleMasking",
    "ResumableTrainer",
    "early_stopping",
    "seed_before_model_init",
    "finish_distributed",
]
