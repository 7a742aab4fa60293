"""Loading the package's own checkpoint folders without `transformers`' noise, keeping the warnings that matter.

`transformers` draws a "Loading weights" (and, when saving, "Writing model shards") progress bar for every folder
and logs a LOAD REPORT table whenever the folder's weights and the model's differ. Where the package loads its own
folders the differences are expected (a pretrained folder's masked-event heads are not part of a classifier, whose
classification layer starts fresh), so the table only buries what the user asked for. `load_pretrained` loads
quietly and logs one short warning, through this package's logger, for a difference it was not told to expect:
that one is real (a folder missing backbone weights, a shape that does not fit).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_REPORT_LOGGER = "transformers.modeling_utils"  # the logger `from_pretrained` writes its LOAD REPORT to


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside: no `transformers` progress bars (loading or writing weights) and no LOAD REPORT table. Other
    `transformers` warnings still show."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    report_logger, report_filter = logging.getLogger(_REPORT_LOGGER), _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(
    model_class,
    folder: str | os.PathLike,
    *,
    expected_missing: tuple[str, ...] = (),
    expected_unexpected: tuple[str, ...] = (),
    **kwargs,
):
    """`model_class.from_pretrained(folder, **kwargs)` without the progress bar and LOAD REPORT. Weights missing
    from the folder whose names start with one of `expected_missing` (e.g. `"classifier."` for a classifier built on
    a pretrained backbone), weights of the folder the model does not use that start with one of
    `expected_unexpected`, and, with `ignore_mismatched_sizes=True`, mismatched shapes of expected-missing weights
    pass in silence; any other difference is logged as one warning naming the weights."""
    with quiet_transformers():
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(expected_missing))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(expected_unexpected))
    mismatched = sorted(
        str(entry[0])
        for entry in info.get("mismatched_keys", ())
        if not str(entry[0]).startswith(expected_missing)
    )
    problems = [
        f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for what, keys in (
            ("missing from the folder (newly initialised)", missing),
            ("in the folder but unused", unexpected),
            ("of another shape in the folder (newly initialised)", mismatched),
        )
        if keys
    ]
    if problems:
        logger.warning(
            "%s from %s: weights that do not fit the model; %s",
            type(model).__name__,
            folder,
            "; ".join(problems),
        )
    return model


# Loading a pretrained folder into a classifier or a bare backbone: the folder's pretraining heads (masked codes,
# values, times, features) are unused by design, and the classification layer (with, from a backbone-only folder,
# the dense head before it) starts fresh. Only the backbone must load completely.
ANY_HEAD = ("",)
CLASSIFIER_LAYERS = ("classifier.", "head.")
# The heads of the value, time and feature objectives: continued pretraining with other objectives adds or drops them.
OBJECTIVE_HEADS = ("value_head.", "value_decoder.", "time_head.", "time_decoder.", "feature_head.")

__all__ = ["quiet_transformers", "load_pretrained", "ANY_HEAD", "CLASSIFIER_LAYERS", "OBJECTIVE_HEADS"]
