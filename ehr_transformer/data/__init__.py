"""From MEDS files to model inputs: reading and validating, writing, splits, labels, tokenized datasets, collators,
adapters for other shapes, and a synthetic cohort."""
