"""Choosing a pretrained checkpoint for a dataset: population prototypes saved with a checkpoint, LogME, and the
selector that ranks candidates."""
