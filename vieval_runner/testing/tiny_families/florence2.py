"""Tiny Florence-2 (native ``Florence2ForConditionalGeneration``: DaViT tower + BART)."""

from __future__ import annotations

_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
IMAGE_SIZE = 64  # the DaViT tower downsamples by 32: 2x2 spatial tokens + 1 temporal token


def processor():
    """Florence2Processor: it expands the task token and adds image tokens, <s> and </s> itself."""
    from transformers import CLIPImageProcessor, Florence2Processor, PreTrainedTokenizerFast

    from vieval_runner.testing.tiny_tokenizer import train_tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(_SPECIALS),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",  # encoder-decoder
    )
    # the real tokenizer carries the 1000 location tokens; boxes are written with them
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)], special_tokens=True)
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = (IMAGE_SIZE // 32) ** 2 + 1
    return Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config={}
    )


def model(processor):
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    tok = processor.tokenizer
    vision = {"depths": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 32], "num_heads": [1, 1, 1, 2],
              "num_groups": [1, 1, 1, 2], "window_size": 2, "projection_dim": 32,
              "max_position_embeddings": 8, "max_temporal_embeddings": 4,
              "drop_path_rate": 0.0}  # fmt: skip
    text = {"model_type": "bart", "vocab_size": len(tok), "d_model": 32, "encoder_layers": 1,
            "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 256,
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "decoder_start_token_id": tok.eos_token_id,
            "init_std": 0.5}  # fmt: skip
    config = Florence2Config(
        vision_config=vision, text_config=text, image_token_id=processor.image_token_id
    )
    built = Florence2ForConditionalGeneration(config)
    # as in the released checkpoints: decoding starts "</s><s>" and is cut with a forced </s>
    built.generation_config.decoder_start_token_id = tok.eos_token_id
    built.generation_config.forced_bos_token_id = tok.bos_token_id
    built.generation_config.forced_eos_token_id = tok.eos_token_id
    return built
