"""Training runs over the plain `transformers.Trainer`: arguments, the resumable trainer, pretraining objectives and
their balancing, pretraining, fine-tuning, the linear probe, and checkpoint saving."""
