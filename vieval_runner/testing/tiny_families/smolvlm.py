"""Tiny SmolVLM (``SmolVLMForConditionalGeneration``, the Idefics3 architecture: SigLIP + Llama).

Images are split into 32 px tiles plus a global view, so the tile count (and the prompt
length) varies with the image size: batches pad the tile dimension.
"""

from __future__ import annotations

_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
             "<fake_token_around_image>", "<global-img>", "<video>") + _ROW_COL  # fmt: skip
TILE = 32
PATCH = 8
SCALE = 2


def processor():
    """SmolVLMProcessor (imports ``num2words``); images are passed as nested lists."""
    from transformers import (
        PreTrainedTokenizerFast,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from vieval_runner.testing.tiny_tokenizer import train_tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(_SPECIALS, vocab_size=460),
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(_SPECIALS[1:]),
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "video_token": "<video>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        padding_side="left",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": 3 * TILE}, max_image_size={"longest_edge": TILE}
    )
    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": TILE}, max_image_size={"longest_edge": TILE}
    )
    seq = (TILE // PATCH) ** 2 // SCALE**2
    return SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, image_seq_len=seq,
                            chat_template=DEFAULT_CHAT_TEMPLATE)  # fmt: skip


def model(processor):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    tok = processor.tokenizer
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": TILE, "patch_size": PATCH}  # fmt: skip
    text = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "initializer_range": 0.2}  # fmt: skip
    config = SmolVLMConfig(vision_config=vision, text_config=text,
                           image_token_id=processor.image_token_id, scale_factor=SCALE,
                           pad_token_id=tok.pad_token_id)  # fmt: skip
    return SmolVLMForConditionalGeneration(config)
