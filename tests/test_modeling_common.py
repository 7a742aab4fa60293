"""The `transformers` library's own common model and config tests (`ModelTesterMixin`, `ConfigTester`), run against
the three EHR transformer classes under the default config, as a `transformers` user's engineer checks a new model.

The two upstream files ship in the source distribution of the installed `transformers` release, not in its wheel.
They are read at test time from that sdist (`transformers-<version>.tar.gz`, as `pip download --no-deps
--no-binary :all: transformers==<version>` saves it), looked up in `$EHR_TRANSFORMERS_SDIST` (the file or its
folder) or else `~/.cache/ehr_transformer/`; `.ci/run` downloads it there. Where it is absent, or the
`parameterized` package the upstream files import is not installed, the module is skipped with that reason.

The sdist carries only the top-level test files: three helpers they import from sibling folders of the upstream
repository are not in it, and are replaced by small local stand-ins written next to the extracted files:
`exporters.test_export.ExportTesterMixin` (the backend export matrix: ONNX, OpenVINO, ExecuTorch, ...; our
`torch.export` checks live in `tests/test_modeling_ehr.py`), `generation.test_utils.GenerationTesterMixin`
(`generate` tests: an encoder has none) and `utils.test_configuration_utils.config_common_kwargs` (a non-default
value for each common config field).
"""

import importlib
import importlib.util
import os
import sys
import tarfile
import unittest
from pathlib import Path

import pytest
import torch
import transformers

from ehr_transformer import (
    EHRTransformerConfig,
    EHRTransformerForMaskedEventModeling,
    EHRTransformerForSequenceClassification,
    EHRTransformerModel,
)

VERSION = transformers.__version__
PACKAGE = "hf_common_tests"
STAND_INS = {
    "exporters/test_export.py": (
        '"""Stand-in: the export matrix of the upstream repository is not in the sdist."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "generation/test_utils.py": (
        '"""Stand-in: the generate tests of the upstream repository are not in the sdist."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stand-in: a non-default value for each common config field."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "tie_word_embeddings": False,\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        '    "pad_token_id": 7,\n'
        "}\n"
    ),
}


def find_sdist() -> Path | None:
    name = f"transformers-{VERSION}.tar.gz"
    where = os.environ.get("EHR_TRANSFORMERS_SDIST")
    candidates = [Path(where), Path(where) / name] if where else []
    candidates.append(Path.home() / ".cache" / "ehr_transformer" / name)
    return next((p for p in candidates if p.is_file() and p.name == name), None)


def load_upstream():
    """Import `test_modeling_common` and `test_configuration_common` of the installed release from its sdist."""
    sdist = find_sdist()
    if sdist is None:
        pytest.skip(
            f"the transformers {VERSION} source distribution (with the upstream common tests) is absent: "
            f"run `pip download --no-deps --no-binary :all: transformers=={VERSION} -d ~/.cache/ehr_transformer` "
            "or set EHR_TRANSFORMERS_SDIST",
            allow_module_level=True,
        )
    pytest.importorskip("parameterized", reason="the upstream common tests import `parameterized`")
    root = sdist.parent / f"upstream_tests_{VERSION}"
    package = root / PACKAGE
    if not (package / "test_modeling_common.py").exists():
        with tarfile.open(sdist) as archive:
            for name in ("test_modeling_common.py", "test_configuration_common.py"):
                member = archive.extractfile(f"transformers-{VERSION}/tests/{name}")
                package.mkdir(parents=True, exist_ok=True)
                (package / name).write_bytes(member.read())
        for relative, text in STAND_INS.items():
            path = package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        (package / "__init__.py").touch()
    # the extracted folder becomes a package imported by its location, so the import path stays as it is
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, package / "__init__.py", submodule_search_locations=[str(package)]
        )
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[PACKAGE])
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )


modeling_common, configuration_common = load_upstream()
ModelTesterMixin, ids_tensor = modeling_common.ModelTesterMixin, modeling_common.ids_tensor
ConfigTester = configuration_common.ConfigTester
# The upstream tests find a base model and the labels of a head by class name in the library's static mappings, where
# a model of the library is listed; ours are registered with the Auto classes at import instead, so they are added
# to the upstream module's view of those mappings (nothing of the installed `transformers` changes).
for mapping, name in (
    ("MODEL_MAPPING_NAMES", "EHRTransformerModel"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "EHRTransformerForMaskedEventModeling"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "EHRTransformerForSequenceClassification"),
):
    setattr(modeling_common, mapping, {**getattr(modeling_common, mapping), "ehr_transformer": name})


class EHRTransformerModelTester:
    """Builds a tiny config and a padded batch of event sequences, as `BertModelTester` does for text."""

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
        initializer_range=0.02,
    ):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.num_labels, self.initializer_range = num_labels, initializer_range
        self.is_training = True
        self.with_values = True

    def get_config(self) -> EHRTransformerConfig:
        return EHRTransformerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            num_labels=self.num_labels,
            initializer_range=self.initializer_range,
        )

    def prepare_config_and_inputs(self):
        b, n = self.batch_size, self.seq_length
        input_ids = ids_tensor([b, n], self.vocab_size - 4) + 4  # no special token but [CLS] at the start
        input_ids[:, 0] = 3
        lengths = torch.randint(2, n + 1, (b,))
        lengths[0] = n  # the longest sample fills the batch
        attention_mask = (torch.arange(n)[None, :] < lengths[:, None]).long()  # (B, L), padded at the end
        inputs = dict(input_ids=input_ids * attention_mask, attention_mask=attention_mask)
        if self.with_values:
            inputs["values"] = torch.randn(b, n).masked_fill(torch.rand(b, n) < 0.4, float("nan"))
        inputs["times"] = torch.sort(torch.rand(b, n) * 100, dim=1).values
        inputs["ages"] = 50 + inputs["times"] / 8760
        return self.get_config(), inputs

    def prepare_config_and_inputs_for_common(self):
        return self.prepare_config_and_inputs()


class EHRTransformerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (
        EHRTransformerModel,
        EHRTransformerForMaskedEventModeling,
        EHRTransformerForSequenceClassification,
    )
    # our `_init_weights` initialises every parameter (the upstream test runs for models of 2023 and later only)
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = EHRTransformerModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EHRTransformerConfig, hidden_size=36)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is EHRTransformerForMaskedEventModeling and "values" in inputs_dict:
            inputs_dict["value_labels"] = inputs_dict[
                "values"
            ].clone()  # every head of the default config learns
        return inputs_dict

    def test_inputs_embeds(self):
        # Each value is embedded along its code's direction (`code_value_embeddings`), so values need `input_ids`;
        # the upstream test replaces `input_ids` by embeddings, so it runs on inputs without values here.
        # `test_modeling_ehr.py::test_inputs_embeds_with_input_ids_for_values` covers values.
        self.model_tester.with_values = False
        super().test_inputs_embeds()

    def test_inputs_embeds_matches_input_ids(self):
        self.model_tester.with_values = False
        super().test_inputs_embeds_matches_input_ids()

    def test_config(self):
        self.config_tester.run_common_tests()
