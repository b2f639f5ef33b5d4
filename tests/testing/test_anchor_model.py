"""The Qwen2-VL-2B-shaped anchor model: real dims, decodable vocabulary, Trainer layout."""

from __future__ import annotations

import json

import pytest
import torch

from vieval_runner.testing import anchor_model as am


@pytest.fixture(scope="module")
def processor():
    return am.anchor_processor(2048)


def test_every_model_id_decodes_to_its_own_text(processor):
    tok = processor.tokenizer
    assert len(tok) == 2048
    ids = list(range(2048))
    pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert all(pieces), "an id decoded to nothing"
    # padding words: " t<id>", so random outputs compare token for token
    assert pieces[2000] == " t2000"
    assert tok.decode([1500, 1501, 1500]) == " t1500 t1501 t1500"


def test_prompt_is_about_thirty_tokens_and_ids_match_the_config(processor):
    messages = [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "Find <|object_ref_start|>the red triangle<|object_ref_end|>"},
    ]}]  # fmt: skip
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text)["input_ids"]
    assert 20 <= len(ids) <= 32, processor.tokenizer.convert_ids_to_tokens(ids)
    config = am.anchor_config(processor, shrink=True)
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.image_token_id in ids


def test_full_size_config_is_qwen2_vl_2b():
    """The real dims, on the meta device (no memory): 2.21 B parameters, tied embeddings."""
    from transformers import AutoModelForImageTextToText

    processor = am.anchor_processor(151936)
    assert len(processor.tokenizer) == 151936
    config = am.anchor_config(processor)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1536, 28, 12)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (2, 8960, 151936)
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.hidden_size) == (
        32, 1280, 16, 1536)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert 2.15e9 < n < 2.25e9
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_written_run_has_trainer_layout_and_a_frozen_vision_tower(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = am.write_anchor_run(tmp_path, checkpoints=3, device="cpu", dtype=torch.float32,
                              shrink=True)  # fmt: skip
    assert run.steps == (100, 200, 300)
    base = load_file(run.base_model_dir / "model.safetensors")
    weights = [base]
    for step in run.steps:
        ckpt = run.run_dir / f"checkpoint-{step}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step
        weights.append(load_file(ckpt / "model.safetensors"))
    vision = [k for k in base if "visual" in k]
    language = [k for k in base if "visual" not in k]
    assert vision and language

    def same(a, b, keys):
        return [torch.equal(a[k], b[k]) for k in keys]

    # checkpoint 1 trains everything; 2 and 3 keep the previous vision tower bit for bit
    assert not any(same(weights[0], weights[1], vision))
    for prev, cur in ((1, 2), (2, 3)):
        assert all(same(weights[prev], weights[cur], vision))
        assert not any(same(weights[prev], weights[cur], language))

    model = AutoModelForImageTextToText.from_pretrained(run.run_dir / "checkpoint-300").eval()
    processor = AutoProcessor.from_pretrained(run.run_dir / "checkpoint-300")
    from PIL import Image

    image = Image.new("RGB", (448, 448), (200, 30, 30))
    inputs = processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>Find"],
                       return_tensors="pt")  # fmt: skip
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == 256
    # all-zero final hidden states make every logit 0, so greedy picks id 0, an end token:
    # unsuppressed the generation stops at once; as saved it runs the full max_new_tokens
    ends = {processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id}
    assert 0 in ends
    with torch.no_grad():
        model.model.language_model.norm.weight.zero_()
    free = model.generate(**inputs, max_new_tokens=7, do_sample=False, suppress_tokens=[])
    assert free.shape[1] == inputs["input_ids"].shape[1] + 1
    out = model.generate(**inputs, max_new_tokens=7, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 7
    assert not ends & set(new)
