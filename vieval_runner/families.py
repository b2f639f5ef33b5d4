"""Model families as plain data: detection, default output format, padding side, templates.

Add a family by adding an entry here (and a tiny builder in ``tiny_models`` for the tests).
Keys: ``model_types`` (config ``model_type`` values), ``model_class`` (transformers Auto class),
``output_format`` (parser default), ``padding_side``, ``encoder_decoder``, ``chat_template``
(prompt through the processor's chat template), ``templates`` (``{prompt}`` per task), and
optional ``image_token_in_prompt`` (default True), ``nested_images`` (default False),
``coords`` (the ``plain_xyxy`` coordinate convention the family writes),
``batches_on_cuda`` (default True; False: one specimen at a time on CUDA, with a warning) and
``prepare_split`` (how one processor call's outputs for several specimens split back per
specimen: ``"grid"``, pixel rows by ``image_grid_thw``; ``"image"``, one pixel row per image;
``"image_tokens"``, tiles per image from its image-token count; ``"tiles"``, padded tiles cut
by ``pixel_attention_mask``; absent: the processor runs once per specimen).
"""

from __future__ import annotations

from typing import Any

_QWEN_CHAT = {"chat_template": True, "encoder_decoder": False, "padding_side": "left"}

# family -> facts
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "prepare_split": "grid",
        **_QWEN_CHAT,
        "model_types": ("qwen2_vl",),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "qwen2_vl",
        "templates": {
            "grounding": "Find <|object_ref_start|>{prompt}<|object_ref_end|>",
            "vqa": "{prompt}",
        },
    },
    "qwen25_vl": {
        "prepare_split": "grid",
        **_QWEN_CHAT,
        "model_types": ("qwen2_5_vl",),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "qwen25_vl_json",
        "templates": {
            "grounding": "Locate {prompt} in the image and output its bbox coordinates in JSON format.",
            "vqa": "{prompt}",
        },
    },
    "qwen3_vl": {
        "prepare_split": "grid",
        **_QWEN_CHAT,
        "model_types": ("qwen3_vl", "qwen3_vl_moe"),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "qwen3_vl_json",
        "templates": {
            "grounding": 'Locate every instance that belongs to the following categories: "{prompt}". '
            "Report bbox coordinates in JSON format.",
            "vqa": "{prompt}",
        },
    },
    "paligemma": {
        "prepare_split": "image",
        "model_types": ("paligemma",),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "paligemma_loc",
        "padding_side": "left",
        "encoder_decoder": False,
        "chat_template": False,
        "templates": {"grounding": "detect {prompt}", "vqa": "answer en {prompt}"},
    },
    "florence2": {
        "prepare_split": "image",
        "model_types": ("florence2",),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "florence2_loc",
        "padding_side": "right",  # encoder-decoder: left padding shifts the encoder's logits
        "encoder_decoder": True,
        "chat_template": False,
        "image_token_in_prompt": False,  # the processor adds the image tokens, <s> and </s>
        # the processor expands the task token into its instruction text
        "templates": {"grounding": "<CAPTION_TO_PHRASE_GROUNDING>{prompt}", "vqa": "{prompt}"},
    },
    "internvl": {
        "prepare_split": "image_tokens",
        **_QWEN_CHAT,
        "model_types": ("internvl",),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "internvl",
        # InternVL's own RefCOCO evaluation prompt (eval/refcoco/evaluate_grounding.py)
        "templates": {
            "grounding": "Please provide the bounding box coordinate of the region this "
            "sentence describes: <ref>{prompt}</ref>",
            "vqa": "{prompt}",
        },
    },
    "llava": {
        "prepare_split": "image",
        **_QWEN_CHAT,
        "model_types": ("llava",),
        "model_class": "AutoModelForImageTextToText",
        "output_format": "plain_xyxy",
        # LLaVA-1.5's RefCOCO convention: [x1, y1, x2, y2] as 0-1 floats of the image size
        "coords": "normalized_1",
        "templates": {
            "grounding": "Please provide the bounding box coordinate of the region this "
            "sentence describes: {prompt}",
            "vqa": "{prompt}",
        },
    },
    "smolvlm": {
        "prepare_split": "tiles",
        **_QWEN_CHAT,
        "model_types": ("smolvlm", "idefics3"),  # SmolVLM v1 checkpoints say idefics3
        "model_class": "AutoModelForImageTextToText",
        "output_format": "plain_xyxy",
        "nested_images": True,  # one list of images per prompt
        # Measured on an H200 (2026-11-27, transformers 5.17): batched last-token logits
        # differed from one-at-a-time ones by up to 6.9 in fp32 (CPU: 1.6e-6; Qwen2-VL: 2e-7
        # on both), so batches on CUDA are not trusted until that is understood.
        "batches_on_cuda": False,
        "templates": {
            "grounding": "Detect {prompt}. Answer with [x1, y1, x2, y2].",
            "vqa": "{prompt}",
        },
    },
}


def default_coords(family: str | None, configured: str | None = None) -> str | None:
    """The ``plain_xyxy`` coordinate convention: the configured one, else the family's."""
    return configured or FAMILIES.get(family or "", {}).get("coords")


#: Families whose grounding output vieval reads but whose models it cannot load (their code
#: is not in transformers: ``trust_remote_code`` checkpoints): config ``model_type`` -> the
#: output format. Their stored or exported outputs are read with ``vieval parse`` /
#: ``output_format``. DeepSeek-VL2 (``deepseek-ai/deepseek-vl2*`` config.json); Moondream 2
#: (``vikhyatk/moondream2`` config.json: ``moondream1``) and Moondream 3.
OUTPUT_FORMAT_ONLY: dict[str, str] = {
    "deepseek_vl_v2": "deepseek_vl2",
    "moondream1": "moondream",
    "moondream3": "moondream",
}


def output_format_for_model_type(model_type: str | None) -> str | None:
    """The output format a config ``model_type`` writes (loadable family or format-only)."""
    for facts in FAMILIES.values():
        if model_type in facts["model_types"]:
            return facts["output_format"]
    return OUTPUT_FORMAT_ONLY.get(model_type or "")
