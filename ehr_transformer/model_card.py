"""Model cards: a `README.md` in every saved checkpoint folder, in the hub's format (YAML metadata + Markdown).

The card says what the checkpoint is, what it was trained on (counts only: never a subject identifier, a real
event's timestamp, or a code outside the vocabulary, which already excludes codes seen in fewer than
`min_code_count` training subjects; the time span is given in calendar years), how it was trained and, once
evaluated, how well it did with intervals, by subgroup, and how well calibrated.

The YAML block holds the hub's model-card fields (`huggingface_hub.ModelCardData`): `library_name: transformers`,
`license`, `tags`, `datasets` (the MEDS folder's `dataset_name` from `metadata/dataset.json`), `metrics` and, once
evaluated on held-out data, a `model-index` whose results `huggingface_hub.repocard_data.model_index_to_eval_results`
parses. There is no `pipeline_tag`: no task that `transformers.pipeline` knows fits a folder whose inputs are MEDS
events. A classifier's card carries the tag `ehr-risk` instead, the task of the package's own pipeline
(`ehr_transformer.pipeline_ehr`: `pipeline("ehr-risk", model=folder)`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .utils import atomic_path

TEMPLATE = Path(__file__).with_name("model_card_template.md")
# The tag of a classifier's card: the task of the package's pipeline (`pipeline("ehr-risk", model=folder)`).
PIPELINE_TAG = "ehr-risk"


def read_dataset_name(data_dir: str | os.PathLike | None) -> str | None:
    """`dataset_name` of a MEDS folder's `metadata/dataset.json`, or None where the file or the field is absent."""
    if data_dir is None:
        return None
    path = Path(data_dir) / "metadata" / "dataset.json"
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("dataset_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name.strip() else None


def data_summary(
    n_subjects: dict[str, int], n_events: int | None, tokenizer, dataset_name: str | None = None
) -> dict[str, Any]:
    """Counts that describe the training data without identifying anyone: subjects per split, events, and the
    code systems (prefix before `//`) of the vocabulary with how many codes each contributes; and the dataset's
    name (`read_dataset_name`), which the card's `datasets` and model-index give."""
    systems = Counter(
        code.split("//")[0] if "//" in code else code for code in tokenizer.vocab if not code.startswith("[")
    )
    return {
        "dataset_name": dataset_name,
        "subjects": n_subjects,
        "events": n_events,
        "vocabulary_size": tokenizer.vocab_size,
        "min_code_count": tokenizer.min_code_count,
        "code_systems": dict(sorted(systems.items(), key=lambda kv: -kv[1])[:12]),
    }


def render_model_card(
    config,
    *,
    kind: str,
    data: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    task: str | None = None,
    license: str = "other",
    datasets: list[str] | None = None,
    population: dict[str, Any] | None = None,
) -> str:
    """The card's text. `kind` is "pretrained" or "fine-tuned"; `evaluation` is a report of
    `ehr_transformer.evaluation.report.task_report` (optional); `population` is what
    `ehr_transformer.selection.write_population_summary` returns (prototypes, code frequencies, time span)."""
    population = population or {}
    name = data.get("dataset_name") or population.get("dataset_name")
    datasets = datasets or ([name] if name else None)
    tags = ["ehr-transformer", "ehr", "meds", "clinical", "medical", kind]
    if kind != "pretrained":  # a classifier: scored by the package's pipeline
        tags.append(PIPELINE_TAG)
    metadata: dict[str, Any] = {  # no `pipeline_tag`: see the module docstring
        "library_name": "transformers",
        "license": license,
        "tags": tags + ([task] if task else []),
        "metrics": ["roc_auc", "average_precision", "brier_score"],
    }
    if datasets:
        metadata["datasets"] = datasets
    if evaluation and evaluation.get("auroc"):
        metadata["model-index"] = [
            {
                "name": f"ehr-transformer {task or kind}",
                "results": [
                    {
                        "task": {"type": "tabular-classification", "name": task or "binary outcome"},
                        "dataset": {
                            "type": "meds",
                            "name": (datasets or ["unnamed MEDS dataset"])[0],
                            "split": "held_out",
                        },
                        "metrics": [
                            {"type": "roc_auc", "value": round(evaluation["auroc"]["estimate"], 4)},
                            {"type": "average_precision", "value": round(evaluation["auprc"]["estimate"], 4)},
                            {"type": "brier_score", "value": round(evaluation["brier"], 4)},
                        ],
                    }
                ],
            }
        ]
    sizes = (
        f"{config.hidden_size} wide, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
        f"feed-forward {config.intermediate_size}, vocabulary {config.vocab_size}"
    )
    body = TEMPLATE.read_text().format(
        kind=kind,
        task=task or "none (pretrained backbone)",
        sizes=sizes,
        subjects=", ".join(f"{split}: {n:,}" for split, n in data["subjects"].items()),
        events=f"{data['events']:,}" if data.get("events") is not None else "not counted",
        vocabulary=data["vocabulary_size"],
        min_code_count=data["min_code_count"],
        code_systems=", ".join(f"{system} ({n})" for system, n in data["code_systems"].items()),
        time_span=population.get("time_span", "not recorded"),
        population=_population_text(population),
        training="\n".join(f"- {key}: {value}" for key, value in training.items()),
        evaluation=_evaluation_text(evaluation),
        temperature=config.temperature,
    )
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + body


def _population_text(population: dict[str, Any]) -> str:
    if not population.get("prototypes"):
        why = population.get("prototypes_missing_because", "they are written after pretraining")
        return (
            f"No population prototypes in this folder ({why}). "
            "`ehr-transformer select` ranks it by code coverage and, with labels, LogME only."
        )
    return "\n".join(
        [
            f"- `prototypes.safetensors`: {population['prototypes']}.",
            f"- `code_frequencies.json`: the number of training subjects with each of the "
            f"{population.get('codes_counted', 'vocabulary')} codes of the vocabulary (codes below the subject "
            "threshold are not in it).",
            "",
            "`ehr-transformer select --data MEDS_DIR --candidates THIS_FOLDER OTHER ...` uses them to rank "
            "checkpoints for a new dataset (code coverage, distance to these prototypes, LogME with labels) "
            "without any training data.",
        ]
    )


_CARD_METRICS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "brier": "Brier score",
    "ece": "expected calibration error (10 bins)",
    "r2": "R²",
    "mae": "mean absolute error",
    "rmse": "root mean squared error",
    "calibration_slope": "calibration slope",
    "macro_auroc": "macro AUROC (one vs rest)",
    "accuracy": "accuracy",
    "log_loss": "log loss",
}


def _evaluation_text(report: dict[str, Any] | None) -> str:
    if not report:
        return "Not evaluated yet: run `ehr-transformer evaluate` on held-out data."

    def shown(metric) -> str:
        if metric is None:
            return "n/a"
        if not isinstance(metric, dict):
            return f"{metric:.3f}"
        if metric.get("ci_lower") is None:
            return f"{metric['estimate']:.3f}"
        return f"{metric['estimate']:.3f} (95% CI {metric['ci_lower']:.3f}–{metric['ci_upper']:.3f})"

    kind = report.get("task_type", "binary")
    header = f"Held-out ({kind} task): n = {report['n']:,}"
    if report.get("prevalence") is not None:
        header += f", prevalence {report['prevalence']:.3f}"
    lines = [header + ". Intervals resample subjects.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {shown(report[key])} |" for key, name in _CARD_METRICS.items() if key in report]
    headline = next(key for key in ("auroc", "r2", "macro_auroc") if key in report)
    for group, values in (report.get("subgroups") or {}).items():
        lines += [
            "",
            f"By {group.replace('_', ' ')}:",
            "",
            f"| group | n | {_CARD_METRICS[headline]} |",
            "|---|---|---|",
        ]
        for value, metrics in values.items():
            lines.append(f"| {value} | {metrics['n']:,} | {shown(metrics[headline])} |")
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, text: str) -> Path:
    with atomic_path(Path(folder) / "README.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(folder) / "README.md"


def read_card_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML metadata block of a checkpoint's card."""
    text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{folder}/README.md has no YAML metadata block")
    return yaml.safe_load(text.split("---\n", 2)[1])


__all__ = [
    "PIPELINE_TAG",
    "read_dataset_name",
    "data_summary",
    "render_model_card",
    "write_model_card",
    "read_card_metadata",
]
