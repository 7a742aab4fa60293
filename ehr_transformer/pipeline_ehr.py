"""The `ehr-risk` pipeline: a patient's MEDS events in, risks out, the `transformers.pipeline` way.

```python
from transformers import pipeline

import ehr_transformer.pipeline_ehr  # registers "ehr-risk" (and the model with the Auto classes)

risk = pipeline("ehr-risk", model="out/finetuned", device="cpu")  # a local folder; works offline
risk(events)                                   # one subject's event frame -> {"probability": 0.083}
risk(events, prediction_time=datetime(2180, 7, 24, 12))  # only events at or before that time are used
risk([events_a, events_b], prediction_time=[time_a, time_b])  # a list in, a list out
risk([{"events": events_a, "prediction_time": time_a}, {"events": events_b}])
```

`events` is one subject's MEDS event frame, polars or pandas, with `time`, `code`, `numeric_value` (and
`subject_id`, optional for one subject); `prediction_time` is None (every event), a `datetime` or an ISO 8601
string. The checkpoint folder's own `event_tokenizer.json` turns the events into model inputs
(`EHREventTokenizer.__call__`), exactly as the labelled datasets of `finetune` and `predict` are built.

What one patient gives, by the checkpoint's head (`config`):

- one binary outcome (`num_labels=1`, `problem_type="multi_label_classification"`, what `finetune` trains on one
  label file): `{"probability": p}`, the sigmoid of the (temperature-scaled) logit, as `ehr-transformer predict`;
- multitask (`config.task_names`): `{task: value}` in the order of `task_names`, a probability for a "binary"
  task and the predicted value for a "regression" task (the columns of `predict`);
- regression (`problem_type="regression"`): `{"value": v}` for one output, `{"values": {label: v}}` for several;
- several binary outcomes (`multi_label_classification`, `num_labels > 1`): `{"probabilities": {label: p}}`,
  a sigmoid each;
- one multi-class outcome (`single_label_classification`): `{"probabilities": {label: p}}`, a softmax.

Labels are `config.id2label`. The model is loaded with `AutoModelForSequenceClassification`; run
`ehr_transformer.checkpoint_safety.check_checkpoint_folder` on a folder you received before you load it.
`batch_size > 1` pads samples with the classification collator, as `tokenizer([...])` does.

`register_pipeline()` registers the task with `transformers.pipelines.PIPELINE_REGISTRY` (and the model with the
Auto classes); importing this module calls it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    Pipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_ehr import EHRTransformerConfig
from .modeling_ehr import (
    EHRTransformerForMaskedEventModeling,
    EHRTransformerForSequenceClassification,
    EHRTransformerModel,
)
from .tokenization_ehr import EHREventTokenizer

TASK = "ehr-risk"
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "values", "times", "ages")


class EHRRiskPipeline(Pipeline):
    """Risk of one or several patients from their MEDS events with an `ehr-transformer` classifier; see the module
    docstring for the inputs and what each kind of head returns."""

    _load_tokenizer = False  # the event tokenizer is not a `transformers` tokenizer: loaded in `__init__`
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(
        self, model, tokenizer: EHREventTokenizer | str | os.PathLike | None = None, **kwargs
    ) -> None:
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer if tokenizer is not None else getattr(model, "name_or_path", None)
            if not source or not os.path.isdir(source):
                raise ValueError(
                    f"the {TASK!r} pipeline needs the checkpoint's event tokenizer: pass model= a checkpoint folder "
                    "(it holds event_tokenizer.json) or tokenizer=EHREventTokenizer.from_pretrained(folder)"
                )
            tokenizer = EHREventTokenizer.from_pretrained(source)
        if not isinstance(tokenizer, EHREventTokenizer):
            raise TypeError(f"tokenizer must be an EHREventTokenizer, got {type(tokenizer).__name__}")
        super().__init__(model, tokenizer=tokenizer, **kwargs)
        self.model.eval()

    def _sanitize_parameters(self, prediction_time=None, **kwargs):
        preprocess = {} if prediction_time is None else {"prediction_time": prediction_time}
        return preprocess, {}, {}

    def __call__(self, inputs, *args, prediction_time=None, **kwargs):
        """`inputs`: one event frame, a dict `{"events": frame, "prediction_time": time}`, or a list of either;
        `prediction_time`: one time for every input, or (with a list) a list of one time per input."""
        if isinstance(prediction_time, (list, tuple)):
            if not isinstance(inputs, (list, tuple)) or len(inputs) != len(prediction_time):
                raise ValueError("a list of prediction times needs a list of as many event frames")
            inputs = [_as_item(item, time) for item, time in zip(inputs, prediction_time, strict=True)]
            prediction_time = None
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if prediction_time is not None:
            kwargs["prediction_time"] = prediction_time
        return super().__call__(inputs, *args, **kwargs)

    def preprocess(self, inputs, prediction_time=None) -> dict[str, torch.Tensor]:
        if isinstance(inputs, dict):
            if "events" not in inputs:
                raise ValueError(f"a dict input needs an 'events' frame, got keys {sorted(inputs)}")
            prediction_time = inputs.get("prediction_time", prediction_time)
            inputs = inputs["events"]
        encoding = self.tokenizer(inputs, prediction_time=prediction_time, return_tensors="pt")
        return dict(encoding)  # (1, L) each

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {key: model_inputs[key] for key in _SEQUENCE_KEYS}
        return {"logits": self.model(**inputs).logits}  # (B, C)

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        config = self.model.config
        logits = model_outputs["logits"].float().reshape(-1)  # (C,)
        labels = [str(config.id2label.get(i, i)) for i in range(logits.numel())] if config.id2label else None
        labels = labels or [str(i) for i in range(logits.numel())]
        if config.task_names is not None:
            return {
                name: float(torch.sigmoid(logit) if kind == "binary" else logit)
                for name, kind, logit in zip(config.task_names, config.task_types, logits, strict=True)
            }
        if config.problem_type == "regression":
            if logits.numel() == 1:
                return {"value": float(logits[0])}
            return {"values": dict(zip(labels, logits.tolist(), strict=True))}
        if config.problem_type == "single_label_classification":
            return {"probabilities": dict(zip(labels, torch.softmax(logits, 0).tolist(), strict=True))}
        probabilities = torch.sigmoid(logits)
        if probabilities.numel() == 1:  # the package's binary head
            return {"probability": float(probabilities[0])}
        return {"probabilities": dict(zip(labels, probabilities.tolist(), strict=True))}

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        if batch_size == 1:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        from torch.utils.data import DataLoader
        from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

        dataset = PipelineDataset(list(inputs), self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad samples of `preprocess` ((1, L_i) each) as the classification collator pads a batch."""
        from .data.collators import DataCollatorForEventClassification

        features = []
        for item in items:
            n = int(item["attention_mask"][0].sum())
            features.append({key: item[key][0, :n] for key in ("input_ids", "values", "times", "ages")})
        return DataCollatorForEventClassification(self.tokenizer)(features)


def _as_item(item: Any, prediction_time: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return {**item, "prediction_time": item.get("prediction_time", prediction_time)}
    return {"events": item, "prediction_time": prediction_time}


def register_pipeline() -> None:
    """Register `ehr-risk` with `transformers.pipelines.PIPELINE_REGISTRY` (model class
    `AutoModelForSequenceClassification`) and the model classes with the Auto classes, so that
    `transformers.pipeline("ehr-risk", model=folder)` works on a folder this package saved. Safe to call twice."""
    AutoConfig.register(EHRTransformerConfig.model_type, EHRTransformerConfig, exist_ok=True)
    AutoModel.register(EHRTransformerConfig, EHRTransformerModel, exist_ok=True)
    AutoModelForMaskedLM.register(EHRTransformerConfig, EHRTransformerForMaskedEventModeling, exist_ok=True)
    AutoModelForSequenceClassification.register(
        EHRTransformerConfig, EHRTransformerForSequenceClassification, exist_ok=True
    )
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is EHRRiskPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=EHRRiskPipeline, pt_model=AutoModelForSequenceClassification
    )


register_pipeline()

__all__ = ["EHRRiskPipeline", "register_pipeline", "TASK"]
