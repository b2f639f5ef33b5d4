"""The tiny-model factory: real classes, Trainer layout, Auto reload, differing checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vieval_runner.generate.forced import ForcedTextLogitsProcessor
from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE, build_tiny_model

_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen25_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "florence2": "Florence2ForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="florence9.*buildable: qwen2_vl"):
        build_tiny_model("florence9")


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_run_has_trainer_layout(tiny_run, family):
    run = tiny_run(family)
    assert run.steps == (100, 200, 300)
    assert (run.base_model_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in run.run_dir.iterdir()) == [
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
    ]
    for step in run.steps:
        ckpt = run.run_dir / f"checkpoint-{step}"
        for name in ("model.safetensors", "config.json", "generation_config.json",
                     "tokenizer.json", "processor_config.json"):  # fmt: skip
            assert (ckpt / name).is_file(), f"{ckpt}/{name}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step
        assert state["best_metric"] is None
        losses = [e for e in state["log_history"] if "loss" in e]
        evals = [e for e in state["log_history"] if "eval_loss" in e]
        assert losses[-1]["step"] == step and all(e["loss"] > 0 for e in losses)
        assert [e["step"] for e in evals] == [s for s in run.steps if s <= step]


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_checkpoint_reloads_through_auto_classes_and_generates(tiny_run, family, specimens):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = tiny_run(family)
    ckpt = run.run_dir / "checkpoint-100"
    processor = AutoProcessor.from_pretrained(ckpt)
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    assert type(model).__name__ == _CLASSES[family]
    assert 30_000 < sum(p.numel() for p in model.parameters()) < 500_000
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)
    images = [s.load_image() for s in specimens[:3]]  # three different sizes
    if family == "paligemma":
        texts = [f"<image>detect {s.prompt}" for s in specimens[:3]]
    elif family == "florence2":  # the processor adds the image tokens and expands the task
        texts = [f"<CAPTION_TO_PHRASE_GROUNDING>{s.prompt}" for s in specimens[:3]]
    else:
        msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}]
                for s in specimens[:3]]  # fmt: skip
        texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in msgs]  # fmt: skip
        if family.startswith("qwen"):
            assert "<|vision_start|><|image_pad|><|vision_end|>" in texts[0]
    if family == "smolvlm":
        images = [[image] for image in images]  # one list of images per prompt
    encoder_decoder = model.config.is_encoder_decoder
    processor.tokenizer.padding_side = "right" if encoder_decoder else "left"
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    if encoder_decoder:  # the decoder starts fresh: start token + up to 4 new tokens
        assert out.shape[0] == 3 and 1 < out.shape[1] <= 5
        return
    assert out.shape[0] == 3 and prompt_len < out.shape[1] <= prompt_len + 4
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_checkpoints_differ_in_weights(tiny_run, family):
    run = tiny_run(family)
    base = load_file(run.base_model_dir / "model.safetensors")
    ckpts = [load_file(run.run_dir / f"checkpoint-{s}" / "model.safetensors") for s in run.steps]
    assert all(c.keys() == base.keys() for c in ckpts)
    for a, b in [(base, ckpts[0]), (ckpts[0], ckpts[1]), (ckpts[1], ckpts[2])]:
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_build_is_deterministic_per_seed():
    m1, _ = build_tiny_model("paligemma", seed=3)
    m2, _ = build_tiny_model("paligemma", seed=3)
    m3, _ = build_tiny_model("paligemma", seed=4)
    p1, p2, p3 = (dict(m.named_parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert any(not torch.equal(p1[k], p3[k]) for k in p1)


def test_forced_text_processor_forces_tokens_then_eos():
    _, processor = build_tiny_model("qwen25_vl")
    tok = processor.tokenizer
    texts = ['[{"bbox_2d": [1, 2, 3, 4]}]', None]
    forced = ForcedTextLogitsProcessor(tok, texts)
    ids = tok.encode(texts[0], add_special_tokens=False)
    prompt = torch.zeros((2, 5), dtype=torch.long)
    seq = prompt
    for t in range(len(ids) + 2):
        scores = torch.randn(2, len(tok))
        out = forced(seq, scores)
        expected = ids[t] if t < len(ids) else tok.eos_token_id
        assert int(out[0].argmax()) == expected
        assert torch.equal(out[1], scores[1])  # None leaves the row free
        seq = torch.cat([seq, out.argmax(-1, keepdim=True)], dim=1)
    with pytest.raises(ValueError, match="2 forced texts for a batch of 3"):
        ForcedTextLogitsProcessor(tok, texts)(prompt[:1].repeat(3, 1), torch.zeros(3, len(tok)))
