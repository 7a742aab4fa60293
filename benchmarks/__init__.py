"""Benchmarks of the ehr_transformer package: scripts run as `python -m benchmarks.NAME` that write JSON."""
