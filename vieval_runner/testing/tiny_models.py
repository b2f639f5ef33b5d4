"""The project's one factory of tiny, offline vision-language models (tests, demo, GPU check).

Each family is the REAL transformers class with its own image processor and Processor, shrunk
to ~0.1-0.5 M parameters, with a tiny byte-level BPE tokenizer trained here on a built-in
corpus. Nothing is downloaded. To add a family, write one ``_build_<family>`` function (or a
module in ``tiny_families/``) and register it in ``_BUILDERS``. ``tiny_lora.write_tiny_lora_run``
writes LoRA adapter runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from vieval_runner.testing.tiny_families import BUILDERS as _MORE_BUILDERS
from vieval_runner.testing.tiny_run import TinyRun, trainer_state
from vieval_runner.testing.tiny_tokenizer import QWEN_SPECIALS, train_tokenizer

FAMILIES_BUILDABLE: tuple[str, ...] = (
    "qwen2_vl",
    "qwen25_vl",
    "qwen3_vl",
    "paligemma",
    "florence2",
    "internvl",
    "llava",
    "smolvlm",
)

# The real Qwen2-VL template, trimmed to what evaluation uses (system, images, text, turns).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen_processor(family: str, patch_size: int):
    """Processor with small pixel budgets: 64-128 px images give 4-36 visual tokens."""
    from transformers import Qwen2VLImageProcessor

    factor = patch_size * 2  # patch x merge_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor * 2, "longest_edge": factor * factor * 16},
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
    )
    tokenizer = qwen_tokenizer()
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor, tokenizer, video, chat_template=QWEN_CHAT_TEMPLATE)
    from transformers import Qwen2VLVideoProcessor

    video = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=2, temporal_patch_size=2)
    if family == "qwen25_vl":
        from transformers import Qwen2_5_VLProcessor as cls
    else:
        from transformers import Qwen2VLProcessor as cls
    return cls(image_processor, tokenizer, video, chat_template=QWEN_CHAT_TEMPLATE)


def qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_text_config(tokenizer, **extra) -> dict:
    # head_dim 16 -> mrope_section must sum to 8
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        },
        **extra,
    }


def _build_qwen2_vl(processor):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    config = Qwen2VLConfig(text_config=_qwen_text_config(tok), vision_config=vision,
                           **qwen_token_ids(tok))  # fmt: skip
    return Qwen2VLForConditionalGeneration(config)


def _build_qwen25_vl(processor):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": 32, "window_size": 56, "fullatt_block_indexes": [1],
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=_qwen_text_config(tok), vision_config=vision,
                              **qwen_token_ids(tok))  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def _build_qwen3_vl(processor):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": 32, "num_position_embeddings": 64,
              "deepstack_visual_indexes": [0], "patch_size": 16, "spatial_merge_size": 2,
              "temporal_patch_size": 2}  # fmt: skip
    text = _qwen_text_config(tok, head_dim=16)
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **qwen_token_ids(tok))
    return Qwen3VLForConditionalGeneration(config)


# family -> (processor factory, model factory taking the processor)
_BUILDERS: dict[str, tuple[Callable, Callable]] = {
    "qwen2_vl": (lambda: _qwen_processor("qwen2_vl", 14), _build_qwen2_vl),
    "qwen25_vl": (lambda: _qwen_processor("qwen25_vl", 14), _build_qwen25_vl),
    "qwen3_vl": (lambda: _qwen_processor("qwen3_vl", 16), _build_qwen3_vl),
    **_MORE_BUILDERS,  # PaliGemma, Florence-2, InternVL, LLaVA, SmolVLM: tiny_families/
}


def _end_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id]
    if "<|endoftext|>" in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return ids


def build_tiny_model(family: str, seed: int = 0):
    """Build ``(model, processor)`` for ``family``: real classes, tiny sizes, random weights."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; buildable: {', '.join(_BUILDERS)}")
    make_processor, make_model = _BUILDERS[family]
    processor = make_processor()  # first: some processors grow the tokenizer
    torch.manual_seed(seed)
    model = make_model(processor).eval()
    tok = processor.tokenizer
    gen = model.generation_config
    gen.eos_token_id = _end_token_ids(tok)
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = tok.bos_token_id
    gen.do_sample = False
    return model, processor


def _perturb(model, seed: int, step: int) -> None:
    """Deterministic per-step weight change, large enough that greedy outputs differ."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            param.add_(noise * (0.02 * math.sqrt(step / 100)))


def write_base(out_dir: Path, family: str, seed: int):
    """Build the tiny ``family`` model and save it with its processor at ``out_dir/base``
    (step 0 of a run); returns ``(model, processor, base_dir)``."""
    model, processor = build_tiny_model(family, seed)
    base = Path(out_dir) / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    return model, processor, base


def write_tiny_run(
    out_dir: str | Path, family: str, steps: tuple[int, ...] = (100, 200, 300), seed: int = 0
) -> TinyRun:
    """Write ``out_dir/base`` and a Trainer-layout ``out_dir/run/checkpoint-<step>/`` per step."""
    out_dir = Path(out_dir)
    steps = tuple(sorted(int(s) for s in steps))
    model, processor, base = write_base(out_dir, family, seed)
    run_dir = out_dir / "run"
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for step in steps:
        model.load_state_dict(base_state)
        _perturb(model, seed, step)
        ckpt = run_dir / f"checkpoint-{step}"
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        state = trainer_state(step, steps, seed)
        (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return TinyRun(base_model_dir=base, run_dir=run_dir, steps=steps, family=family)
