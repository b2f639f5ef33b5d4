"""Output formats detected from a model's config ``model_type``, loadable or not."""

from __future__ import annotations

import pytest

from vieval_runner.families import FAMILIES, output_format_for_model_type
from vieval_runner.model.loading import family_for_model_type
from vieval_runner.parsing import FORMATS


@pytest.mark.parametrize(
    ("model_type", "fmt"),
    [
        ("deepseek_vl_v2", "deepseek_vl2"),  # deepseek-ai/deepseek-vl2 config.json
        ("moondream1", "moondream"),  # vikhyatk/moondream2 config.json
        ("qwen2_5_vl", "qwen25_vl_json"),
        ("internvl", "internvl"),
        ("no_such_model", None),
    ],
)
def test_output_format_from_model_type(model_type, fmt):
    assert output_format_for_model_type(model_type) == fmt
    assert fmt is None or fmt in FORMATS


def test_a_format_only_model_says_which_format_reads_it():
    with pytest.raises(ValueError, match="output_format=deepseek_vl2"):
        family_for_model_type("deepseek_vl_v2")


def test_every_family_format_is_a_parser():
    assert {facts["output_format"] for facts in FAMILIES.values()} <= set(FORMATS)
