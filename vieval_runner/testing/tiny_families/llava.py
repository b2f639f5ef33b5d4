"""Tiny LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP tower + Llama)."""

from __future__ import annotations

_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_SIZE = 32
PATCH = 8

# LLaVA-1.5's "USER: <image>\n... ASSISTANT:" conversation format as a chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% else %}{{ message['role'].upper() }}: {% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def processor():
    """LlavaProcessor; CLIP's CLS token is why ``num_additional_image_tokens=1``."""
    from tokenizers import processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from vieval_runner.testing.tiny_tokenizer import train_tokenizer

    raw = train_tokenizer(_SPECIALS)
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )  # Llama's tokenizer prepends <s>
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)  # fmt: skip


def model(processor):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_SIZE,
              "patch_size": PATCH, "projection_dim": 16}  # fmt: skip
    text = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 512,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "initializer_range": 0.2}  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=processor.image_token_id,
                         vision_feature_select_strategy="default",
                         vision_feature_layer=-2)  # fmt: skip
    return LlavaForConditionalGeneration(config)
