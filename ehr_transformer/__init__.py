"""ehr-transformer: a Hugging Face-compatible transformer for time-stamped clinical events.

Importing the package registers the model with the `transformers` Auto classes, so
`AutoModelForSequenceClassification.from_pretrained(folder)` works on any folder this package saved.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration_ehr import EHRTransformerConfig
from .modeling_ehr import (
    EHRSequenceClassifierOutput,
    EHRTransformerForMaskedEventModeling,
    EHRTransformerForSequenceClassification,
    EHRTransformerModel,
    EHRTransformerModelOutput,
    EHRTransformerPreTrainedModel,
    MaskedEventModelingOutput,
)

__version__ = "0.2.0.dev0"

AutoConfig.register(EHRTransformerConfig.model_type, EHRTransformerConfig, exist_ok=True)
AutoModel.register(EHRTransformerConfig, EHRTransformerModel, exist_ok=True)
AutoModelForMaskedLM.register(EHRTransformerConfig, EHRTransformerForMaskedEventModeling, exist_ok=True)
AutoModelForSequenceClassification.register(
    EHRTransformerConfig, EHRTransformerForSequenceClassification, exist_ok=True
)

# Saved folders carry a copy of configuration_ehr.py and modeling_ehr.py and an `auto_map`, so they load with
# `trust_remote_code=True` in a process where this package is not installed.
EHRTransformerConfig.register_for_auto_class()
EHRTransformerModel.register_for_auto_class("AutoModel")
EHRTransformerForMaskedEventModeling.register_for_auto_class("AutoModelForMaskedLM")
EHRTransformerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


def __getattr__(name):
    # The tokenizer pulls in polars; import it on first use so that `import ehr_transformer` stays light.
    if name == "EHREventTokenizer":
        from .tokenization_ehr import EHREventTokenizer

        return EHREventTokenizer
    raise AttributeError(f"module 'ehr_transformer' has no attribute {name!r}")


__all__ = [
    "EHRTransformerConfig",
    "EHRTransformerPreTrainedModel",
    "EHRTransformerModel",
    "EHRTransformerForMaskedEventModeling",
    "EHRTransformerForSequenceClassification",
    "EHRTransformerModelOutput",
    "MaskedEventModelingOutput",
    "EHRSequenceClassifierOutput",
    "EHREventTokenizer",
]
