"""Which events drove a prediction: integrated gradients over the event embeddings.

For each sample, the events that contributed most to the positive-class logit, named the way a clinician
reads a chart: code, time (hours since the start of the sequence), value (the raw measurement, recovered
from the tokenizer's value statistics) and the attribution (in logit units; positive = towards the event).

Method (Sundararajan et al. 2017, "Axiomatic attribution for deep networks"): a forward hook on
`model.model.embeddings` replaces the summed event embeddings `e` (the module's output, after its LayerNorm:
(B, L, H), or (N, H) for the N real events when the backbone skips padding, `config.unpad_inputs`) by
`b + alpha (e - b)`, from a baseline `b` (alpha = 0) to the real embeddings (alpha = 1). The attribution of
event i is

    IG_i = sum_h (e - b)_ih * integral_0^1 d logit / d(b + alpha (e - b))_ih  d alpha

(midpoint rule, `steps` points), so the attributions of all positions add up to logit(x) - logit(baseline)
(completeness), up to the error of the quadrature.

The baseline `b` embeds the same sequence with every event's code replaced by `[MASK]` and its value hidden,
times and ages kept: an event's attribution is what knowing *what* was measured, and its value, moved the
logit, compared with "something was recorded at that time". (An all-zero baseline is ill-posed in this
pre-LayerNorm model: every block and the head start with a scale-invariant LayerNorm, so the logit jumps
between alpha = 0 and alpha = 1e-9 and no quadrature recovers completeness.) `[CLS]` and padding are the same
in both, so their attribution is exactly 0; padding is never reported, nor is `[CLS]`.

    >>> from ehr_transformer.explain import explain
    >>> top = explain(model, tokenizer, dataset.select(range(8)), top_k=5)        # doctest: +SKIP
    >>> top[0][0]                                                                 # doctest: +SKIP
    {'code': 'YAIB//lact', 'time': 23.0, 'value': 6.1, 'value_normalized': 4.2, 'attribution': 0.81}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import torch
from transformers import AutoModelForSequenceClassification

from ..checkpoint_safety import check_checkpoint_folder
from ..data.collators import DataCollatorForEventClassification
from ..data.dataset import build_labeled_dataset
from ..loading import load_pretrained
from ..tokenization_ehr import VALUE_CLIP, EHREventTokenizer

MODEL_INPUTS = ("input_ids", "attention_mask", "values", "times", "ages")
EVENT_FIELDS = ("code", "time", "value", "value_normalized", "attribution")


def _target_logit(logits: torch.Tensor, target: int | None) -> torch.Tensor:
    """(B, C) -> (B,): the positive-class logit (the single logit, or class 1 of two, or `target`)."""
    if target is None:
        target = 1 if logits.shape[-1] == 2 else 0
    return logits[:, target]


def masked_baseline(
    batch: Mapping[str, torch.Tensor], mask_token_id: int, keep_ids
) -> dict[str, torch.Tensor]:
    """The baseline inputs: every event's code -> `[MASK]` and value -> NaN; `keep_ids` (CLS, PAD), times,
    ages and the attention mask unchanged."""
    ids = batch["input_ids"]
    events = ~torch.isin(ids, torch.as_tensor(list(keep_ids), device=ids.device))  # (B, L)
    baseline = dict(batch)
    baseline["input_ids"] = ids.masked_fill(events, mask_token_id)  # (B, L)
    if "values" in batch:
        baseline["values"] = batch["values"].masked_fill(events, float("nan"))  # (B, L)
    return baseline


def integrated_gradients(
    model, batch: Mapping[str, torch.Tensor], steps: int = 32, target: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integrated gradients of the target logit w.r.t. each event's summed embedding (see the module docstring).

    `model` is an `EHRTransformerForSequenceClassification` or an ensemble of them (the embeddings of all its
    networks are interpolated together; an event's attribution sums over them), or anything whose backbone `model.model` has an
    `embeddings` module, whose config has `mask_token_id`, `cls_token_id` and `pad_token_id`, and whose output
    has `logits`); `batch` holds its inputs (input_ids, attention_mask, values, times, ages; other keys are
    ignored). Runs in eval mode (no dropout); `target` picks the logit (default: the single logit, or class 1
    of two). Returns `(attributions (B, L), logits (B,), baseline_logits (B,))`: the attributions sum over
    positions to about `logits - baseline_logits`, and are exactly 0 at padding and `[CLS]`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    config = model.config
    baseline_inputs = masked_baseline(
        inputs, config.mask_token_id, (config.cls_token_id, config.pad_token_id)
    )
    was_training = model.training
    model.eval()
    # the embeddings of every network (one, or each of an ensemble's), interpolated together along one path
    modules = [m.model.embeddings for m in getattr(model, "members", [model])]
    recorded: list[Any] = [None] * len(modules)
    replace: list[Any] = [None] * len(modules)

    def hook_for(i: int):
        def hook(module, args, output):
            if replace[i] is None:  # record the embeddings of this pass
                recorded[i] = output.detach()
                return output
            return replace[i]  # b + alpha (e - b), a leaf we read the gradient from

        return hook

    handles = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            baseline_logits = _target_logit(model(**baseline_inputs).logits, target).float()  # (B,)
            base = list(recorded)  # (B, L, H) or (N, H) each
            logits = _target_logit(model(**inputs).logits, target).float()  # (B,)
            delta = [r - b for r, b in zip(recorded, base, strict=True)]  # (B, L, H) or (N, H) each
        total = [torch.zeros_like(d, dtype=torch.float32) for d in delta]
        for k in range(steps):
            alpha = (k + 0.5) / steps
            replace[:] = [(b + alpha * d).requires_grad_(True) for b, d in zip(base, delta, strict=True)]
            with torch.enable_grad():
                out = _target_logit(model(**inputs).logits, target)  # (B,)
                grads = torch.autograd.grad(out.sum(), replace)
            for t, g in zip(total, grads, strict=True):
                t += g.float()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # (B, L), or (N,) when unpadded
    attributions = sum((d.float() * t / steps).sum(dim=-1) for d, t in zip(delta, total, strict=True))
    mask = inputs["attention_mask"]
    if attributions.dim() == 1:  # the backbone embedded only the N real events (config.unpad_inputs)
        flat = attributions.new_zeros(mask.numel())  # (B * L,)
        flat[mask.flatten().nonzero(as_tuple=True)[0]] = attributions
        attributions = flat.view(mask.shape)  # (B, L)
    return attributions * mask.to(attributions.dtype), logits, baseline_logits


def _rows(samples, tokenizer: EHREventTokenizer) -> list[dict[str, Any]]:
    """A datasets.Dataset, a list of row dicts or a dict of columns -> a list of row dicts with model inputs."""
    keys = ("input_ids", "values", "times", "ages")
    if hasattr(samples, "select_columns"):  # datasets.Dataset
        columns = samples.select_columns(list(keys))[:]
        return [
            dict(zip(keys, values, strict=True)) for values in zip(*(columns[k] for k in keys), strict=True)
        ]
    if isinstance(samples, Mapping):
        return [
            dict(zip(keys, values, strict=True)) for values in zip(*(samples[k] for k in keys), strict=True)
        ]
    return [{k: row[k] for k in keys} for row in samples]


def _raw_value(tokenizer: EHREventTokenizer, code: str, normalized: float) -> float | None:
    if math.isnan(normalized):
        return None
    stats = tokenizer.value_statistics.get(code)
    if stats is None or abs(normalized) >= VALUE_CLIP:  # clipped: the raw value is not recoverable
        return normalized
    return float(stats["median"] + normalized * stats["scale"])


def explain(
    model,
    tokenizer: EHREventTokenizer,
    samples,
    top_k: int = 5,
    method: str = "integrated_gradients",
    steps: int = 32,
    batch_size: int = 16,
    target: int | None = None,
) -> list[list[dict[str, Any]]]:
    """The `top_k` events with the largest absolute attribution for each sample.

    `samples`: rows of a tokenized dataset (a `datasets.Dataset`, a list of row dicts with input_ids,
    values, times, ages) or an already collated batch (a dict of (B, L) tensors with `attention_mask`).
    Returns, per sample and ordered by |attribution| (largest first), dicts
    `{"code", "time" (hours since the sequence start; 0 for static events), "value" (the raw value,
    or the normalised one where it was clipped; None without a value), "value_normalized", "attribution"}`.
    Padding and `[CLS]` are never returned.
    """
    if method != "integrated_gradients":
        raise ValueError(f"unknown method {method!r}; available: 'integrated_gradients'")
    if isinstance(samples, Mapping) and isinstance(samples.get("input_ids"), torch.Tensor):
        batches = [dict(samples)]
    else:
        rows = _rows(samples, tokenizer)
        collator = DataCollatorForEventClassification(tokenizer)
        batches = [collator(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    device = next(model.parameters()).device
    special = torch.tensor(tokenizer.all_special_ids)
    results = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
        if "attention_mask" not in batch:
            batch["attention_mask"] = (batch["input_ids"] != tokenizer.pad_token_id).long()
        attributions, _, _ = integrated_gradients(model, batch, steps=steps, target=target)
        ids, values, times = (batch[k].cpu() for k in ("input_ids", "values", "times"))
        shown = (
            batch["attention_mask"].cpu().bool()
            & (ids != tokenizer.cls_token_id)
            & ~torch.isin(ids, special[special != tokenizer.unk_token_id])
        )  # (B, L): real events; [UNK] events are shown (as "[UNK]"), padding and [CLS] never
        scores = attributions.detach().cpu()  # (B, L)
        ranking = scores.abs().masked_fill(~shown, -1.0)  # (B, L): hidden positions rank last
        for b in range(ids.shape[0]):
            order = torch.argsort(ranking[b], descending=True, stable=True)[: min(top_k, int(shown[b].sum()))]
            events = []
            for i in order:
                code = tokenizer.convert_ids_to_codes(int(ids[b, i]))
                normalized = float(values[b, i])
                events.append(
                    {
                        "code": code,
                        "time": float(times[b, i]),
                        "value": _raw_value(tokenizer, code, normalized),
                        "value_normalized": None if math.isnan(normalized) else normalized,
                        "attribution": float(scores[b, i]),
                    }
                )
            results.append(events)
    return results


def explain_checkpoint(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    labels,
    split: str | None = "held_out",
    top_k: int = 5,
    steps: int = 32,
    batch_size: int = 16,
):
    """`top_events` for every row that `training.predict` scores with the same arguments, in the same order:
    returns (a polars Series of lists of structs (code, time, value, value_normalized, attribution), the rows'
    subject_ids)."""
    check_checkpoint_folder(checkpoint)  # refuse pickle-only/absurd folders before loading
    tokenizer = EHREventTokenizer.from_pretrained(checkpoint)
    model = load_pretrained(AutoModelForSequenceClassification, checkpoint, use_safetensors=True)
    dataset = build_labeled_dataset(
        data_dir, labels, tokenizer, split=split, allow_unlabeled=True
    )  # as predict
    top = explain(model, tokenizer, dataset, top_k=top_k, steps=steps, batch_size=batch_size)
    dtype = pl.List(
        pl.Struct(
            {
                "code": pl.String,
                "time": pl.Float64,
                "value": pl.Float64,
                "value_normalized": pl.Float64,
                "attribution": pl.Float64,
            }
        )
    )
    return pl.Series("top_events", top, dtype=dtype), list(dataset["subject_id"])


def format_events(events: Sequence[Mapping[str, Any]]) -> str:
    """One readable line: `YAIB//lact=6.1 @23h (+0.81); ...`."""
    parts = []
    for e in events:
        value = "" if e["value"] is None else f"={e['value']:.4g}"
        parts.append(f"{e['code']}{value} @{e['time']:.0f}h ({e['attribution']:+.3f})")
    return "; ".join(parts)


__all__ = [
    "integrated_gradients",
    "masked_baseline",
    "explain",
    "explain_checkpoint",
    "format_events",
    "EVENT_FIELDS",
]
