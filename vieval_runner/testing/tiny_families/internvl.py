"""Tiny InternVL (``InternVLForConditionalGeneration``: InternViT + Qwen2, dynamic tiling)."""

from __future__ import annotations

_EXTRA_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<ref>", "</ref>", "<box>",
                   "</box>")  # fmt: skip
TILE = 32
PATCH = 8

# The InternVL-hf template, trimmed: an image renders as "<IMG_CONTEXT>\n" before the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def processor():
    """InternVLProcessor with 32 px tiles, 1-4 tiles per image (so token counts vary)."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLProcessor,
        InternVLVideoProcessor,
        PreTrainedTokenizerFast,
    )

    from vieval_runner.testing.tiny_tokenizer import QWEN_SPECIALS, train_tokenizer

    specials = QWEN_SPECIALS + _EXTRA_SPECIALS  # Qwen2 tokenizer + InternVL's image/box tags
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(specials[1:]),
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    size = {"height": TILE, "width": TILE}
    image_processor = GotOcr2ImageProcessor(
        size=size, crop_to_patches=True, min_patches=1, max_patches=4
    )
    video_processor = InternVLVideoProcessor(size=size)
    seq = (TILE // PATCH) ** 2 // 4  # downsample_ratio 0.5 -> a quarter of the patches
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             video_processor=video_processor, image_seq_length=seq,
                             chat_template=CHAT_TEMPLATE)  # fmt: skip


def model(processor):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    tok = processor.tokenizer
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "image_size": [TILE, TILE],
              "patch_size": [PATCH, PATCH]}  # fmt: skip
    text = {"model_type": "qwen2", "vocab_size": len(tok), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 1024,
            "bos_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "initializer_range": 0.2}  # fmt: skip
    config = InternVLConfig(vision_config=vision, text_config=text,
                            image_token_id=processor.image_token_id,
                            image_seq_length=processor.image_seq_length)  # fmt: skip
    return InternVLForConditionalGeneration(config)
