"""Tiny PaliGemma (``PaliGemmaForConditionalGeneration``: SigLIP + Gemma)."""

from __future__ import annotations

_SPECIALS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")


def processor():
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast, SiglipImageProcessor

    from vieval_runner.testing.tiny_tokenizer import train_tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(_SPECIALS),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )
    image_processor = SiglipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    image_processor.image_seq_length = (32 // 8) ** 2  # (size / patch)^2
    # the processor adds <image> and the 1024 <locNNNN> + 128 <segNNN> tokens to the tokenizer
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def model(processor):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    tok = processor.tokenizer
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
              "patch_size": 8, "vision_use_head": False}  # fmt: skip
    text = {"model_type": "gemma", "vocab_size": len(tok), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "initializer_range": 0.5}  # fmt: skip
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=len(tok),
        projection_dim=32,
        hidden_size=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return PaliGemmaForConditionalGeneration(config)
