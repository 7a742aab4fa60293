"""ehr-transformer: a Hugging Face-compatible transformer for time-stamped clinical events.

Importing the package registers the model with the `transformers` Auto classes, so
`AutoModelForSequenceClassification.from_pretrained(folder)` works on any folder this package saved.

`import ehr_transformer` itself loads neither torch nor transformers (about 4 s), so that `ehr-transformer --help`
and the light modules answer at once:

- the model classes (`EHRTransformerConfig`, `EHRTransformerModel`, ...) and `EHREventTokenizer` are imported on
  first use, through the module's `__getattr__` (PEP 562);
- the Auto classes are registered by `_AutoRegistration`, a finder on `sys.meta_path`, as soon as `transformers`'
  `AutoConfig` / `AutoModel*` modules (`transformers.models.auto.configuration_auto`, `.modeling_auto`) are
  loaded, at once if they already are. It waits until no `transformers` module (nor our model modules) is half
  imported, since the model's own modules import `transformers.modeling_layers`, which itself imports the Auto
  modules; it then imports the model, registers it and removes itself from `sys.meta_path`.

So `import ehr_transformer; from transformers import AutoModel; AutoModel.from_pretrained(folder)` works in
either order of the two imports, and `register_auto_classes()` does the registration by hand (it is idempotent).
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.2.0.dev0"

_MODEL_EXPORTS = {
    "EHRTransformerConfig": "configuration_ehr",
    "EHRTransformerPreTrainedModel": "modeling_ehr",
    "EHRTransformerModel": "modeling_ehr",
    "EHRTransformerForMaskedEventModeling": "modeling_ehr",
    "EHRTransformerForSequenceClassification": "modeling_ehr",
    "EHRTransformerModelOutput": "modeling_ehr",
    "MaskedEventModelingOutput": "modeling_ehr",
    "EHRSequenceClassifierOutput": "modeling_ehr",
    "EHREventTokenizer": "tokenization_ehr",  # pulls in polars
}
_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")
_registered = False
_registering = False


def register_auto_classes() -> None:
    """Register the model with `AutoConfig`, `AutoModel`, `AutoModelForMaskedLM` and
    `AutoModelForSequenceClassification` (imports torch and transformers). Done automatically; idempotent."""
    global _registered, _registering
    if _registered or _registering:
        return
    _registering = True
    try:
        _register()
    finally:
        _registering = False
    _registered = True
    _AutoRegistration.uninstall()


def _register() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from .configuration_ehr import EHRTransformerConfig
    from .modeling_ehr import (
        EHRTransformerForMaskedEventModeling,
        EHRTransformerForSequenceClassification,
        EHRTransformerModel,
    )

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
    # `pipeline("ehr-risk", model=folder)` scores a patient's events (ehr_transformer.pipeline_ehr)
    from .pipeline_ehr import register_pipeline

    register_pipeline()


class _CountingLoader:  # an importlib.abc.Loader (not subclassed: importlib.abc costs an import)
    """Wraps the loader of a watched module: counts the watched modules being executed and, when the outermost
    one is done, registers the Auto classes if `transformers`' Auto modules are loaded by then."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _AutoRegistration.depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            _AutoRegistration.depth -= 1
        _AutoRegistration.maybe_register()


class _AutoRegistration:  # an importlib.abc.MetaPathFinder
    """Finder that only watches: it lets the other finders find `transformers.*` and our model modules, and wraps
    their loaders in `_CountingLoader`."""

    depth = 0  # watched modules being executed right now
    _watched_ours = (f"{__name__}.configuration_ehr", f"{__name__}.modeling_ehr")

    def find_spec(self, fullname, path, target=None):
        if not (fullname == "transformers" or fullname.startswith("transformers.")) and (
            fullname not in self._watched_ours
        ):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader)
                return spec
        return None

    @classmethod
    def maybe_register(cls) -> None:
        if (
            cls.depth == 0
            and not (_registered or _registering)
            and any(name in sys.modules for name in _AUTO_MODULES)
        ):
            register_auto_classes()

    @staticmethod
    def install() -> None:
        if not any(isinstance(finder, _AutoRegistration) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AutoRegistration())

    @staticmethod
    def uninstall() -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AutoRegistration)]


_AutoRegistration.install()
if any(name in sys.modules for name in _AUTO_MODULES):
    try:
        register_auto_classes()  # transformers' Auto classes are already there: register now
    except ImportError:  # imported while transformers itself is half imported: the finder registers later
        pass


def __getattr__(name):
    if name in _MODEL_EXPORTS:
        value = getattr(importlib.import_module(f".{_MODEL_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ehr_transformer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MODEL_EXPORTS))


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
    "register_auto_classes",
]
