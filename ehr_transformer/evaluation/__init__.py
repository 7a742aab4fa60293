"""Evaluation people can trust: one metric implementation, reports with bootstrap intervals and subgroups, plots,
tabular baselines, and explanations of single predictions."""
