"""Prompts, cached processor outputs, batch invariance, order, forced texts, OOM halving."""

from __future__ import annotations

import pytest
import torch

from vieval_runner.families import FAMILIES
from vieval_runner.generate.batches import collate, generate
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.model.swap import swap_weights
from vieval_runner.prepare.inputs import build_prompt, prepare
from vieval_runner.records import Specimen
from vieval_runner.testing.fixtures import load_at_200
from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE

_FORCED = {
    "qwen2_vl": "<|object_ref_start|>red circle<|object_ref_end|>"
    "<|box_start|>(100,200),(300,400)<|box_end|>",
    "qwen25_vl": '```json\n[\n  {"bbox_2d": [12, 34, 56, 78], "label": "red circle"}\n]\n```',
    "qwen3_vl": '[{"bbox_2d": [100, 200, 300, 400], "label": "blue square"}]',
    "paligemma": "<loc0256><loc0128><loc0768><loc0512> red circle ; "
    "<loc0000><loc0010><loc1023><loc0999> blue square",
    "florence2": "red circle<loc_100><loc_200><loc_300><loc_400>blue square"
    "<loc_0><loc_10><loc_999><loc_998>",
    "internvl": "<ref>red circle</ref><box>[[100, 200, 300, 400]]</box>",
    "llava": "[0.12, 0.34, 0.56, 0.78]",
    "smolvlm": "red circle [12, 34, 56, 78]",
}


def test_build_prompt_qwen_chat_and_templates(loaded_at_200):
    loaded, _ = loaded_at_200("qwen25_vl")
    spec = Specimen("a", "grounding", "red circle", 10, 10, image_bytes=b"")
    text = build_prompt(loaded, spec)
    assert text.endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Locate red circle in the "
        "image and output its bbox coordinates in JSON format.<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = build_prompt(
        loaded, spec, 'Box {prompt} as {"bbox_2d": [...]}', system_prompt="Be brief."
    )
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert 'Box red circle as {"bbox_2d": [...]}<|im_end|>' in custom
    vqa = Specimen("b", "vqa", "What color?", 10, 10, image_bytes=b"")
    assert "<|vision_end|>What color?<|im_end|>" in build_prompt(loaded, vqa)
    qwen2, _ = loaded_at_200("qwen2_vl")
    assert "Find <|object_ref_start|>red circle<|object_ref_end|>" in build_prompt(qwen2, spec)


def test_build_prompt_paligemma(loaded_at_200):
    loaded, _ = loaded_at_200("paligemma")
    assert build_prompt(loaded, Specimen("a", "grounding", "cat", 1, 1)) == "<image>detect cat"
    assert build_prompt(loaded, Specimen("a", "vqa", "why?", 1, 1)) == "<image>answer en why?"


def test_build_prompt_new_families(loaded_at_200):
    spec = Specimen("a", "grounding", "red circle", 10, 10)
    florence, _ = loaded_at_200("florence2")
    # the processor adds the image tokens and expands the task token itself
    assert build_prompt(florence, spec) == "<CAPTION_TO_PHRASE_GROUNDING>red circle"
    internvl, _ = loaded_at_200("internvl")
    assert build_prompt(internvl, spec).endswith(
        "<|im_start|>user\n<IMG_CONTEXT>\nPlease provide the bounding box coordinate of the "
        "region this sentence describes: <ref>red circle</ref><|im_end|>\n<|im_start|>assistant\n"
    )
    llava, _ = loaded_at_200("llava")
    assert build_prompt(llava, spec) == (
        "USER: <image>\nPlease provide the bounding box coordinate of the region this "
        "sentence describes: red circle ASSISTANT:"
    )
    smol, _ = loaded_at_200("smolvlm")
    assert build_prompt(smol, Specimen("b", "vqa", "why?", 1, 1)) == (
        "<|im_start|>User:<image>why?<end_of_utterance>\nAssistant:"
    )


def test_prepare_caches_per_specimen_outputs(loaded_at_200, specimens):
    loaded, _ = loaded_at_200("qwen25_vl")
    prepared = prepare(loaded, specimens)
    assert [p.specimen_id for p in prepared] == [s.specimen_id for s in specimens]
    assert len({p.prompt_len for p in prepared}) > 3  # image and prompt lengths vary
    for p in prepared:
        grid = p.tensors["image_grid_thw"]
        assert grid.shape == (1, 3)
        assert p.tensors["pixel_values"].shape[0] == int(grid.prod())
        assert p.input_size == (int(grid[0, 2]) * 14, int(grid[0, 1]) * 14)
        image_pad = loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((p.input_ids == image_pad).sum()) == int(grid.prod()) // 4


def test_collate_left_pads_and_concatenates(loaded_at_200, specimens):
    loaded, _ = loaded_at_200("qwen25_vl")
    prepared = prepare(loaded, specimens[:3])
    batch = collate(loaded, prepared)
    width = max(p.prompt_len for p in prepared)
    pad = loaded.processor.tokenizer.pad_token_id
    assert batch["input_ids"].shape == (3, width)
    for row, p in enumerate(prepared):
        n_pad = width - p.prompt_len
        assert torch.equal(batch["input_ids"][row, n_pad:], p.input_ids)
        assert (batch["input_ids"][row, :n_pad] == pad).all()
        assert batch["attention_mask"][row].tolist() == [0] * n_pad + [1] * p.prompt_len
    assert batch["pixel_values"].shape[0] == sum(
        p.tensors["pixel_values"].shape[0] for p in prepared
    )
    assert batch["image_grid_thw"].shape == (3, 3)
    pali, _ = loaded_at_200("paligemma")
    pbatch = collate(pali, prepare(pali, specimens[:3]))
    assert pbatch["pixel_values"].shape == (3, 3, 32, 32)
    assert pbatch["token_type_ids"].shape == pbatch["input_ids"].shape


def test_collate_pads_encoder_decoder_right_and_tiles_with_zeros(loaded_at_200, specimens):
    florence, _ = loaded_at_200("florence2")
    prepared = prepare(florence, specimens[:3])
    batch = collate(florence, prepared)
    pad = florence.processor.tokenizer.pad_token_id
    for row, p in enumerate(prepared):
        assert torch.equal(batch["input_ids"][row, : p.prompt_len], p.input_ids)  # right
        assert (batch["input_ids"][row, p.prompt_len :] == pad).all()
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    smol, _ = loaded_at_200("smolvlm")
    prepared = prepare(smol, specimens[:5])
    tiles = [p.tensors["pixel_values"].shape[1] for p in prepared]
    assert len(set(tiles)) > 1  # images of different sizes are split into different counts
    batch = collate(smol, prepared)
    assert batch["pixel_values"].shape[:2] == (5, max(tiles))
    for row, n in enumerate(tiles):
        assert torch.equal(batch["pixel_values"][row, :n], prepared[row].tensors["pixel_values"][0])
        assert not batch["pixel_values"][row, n:].any()  # padding tiles are all zero
        assert not batch["pixel_attention_mask"][row, n:].any()
    internvl, _ = loaded_at_200("internvl")
    prepared = prepare(internvl, specimens[:3])
    batch = collate(internvl, prepared)  # tiles of all images, concatenated
    assert batch["pixel_values"].shape[0] == sum(
        p.tensors["pixel_values"].shape[0] for p in prepared
    )


def test_florence2_drops_start_tokens_and_flags_truncation(loaded_at_200, specimens):
    loaded, _ = loaded_at_200("florence2")
    assert loaded.model.generation_config.forced_eos_token_id is not None  # as released
    prepared = prepare(loaded, specimens[:2])
    out = generate(loaded, prepared, max_new_tokens=6)
    for g in out:
        assert g.truncated and g.n_new_tokens == 5  # 6 tokens: the forced <s> + 5
        assert not g.text.startswith(("<s>", "</s>"))
    assert loaded.model.generation_config.forced_eos_token_id is not None  # restored


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_batch_invariance_and_order(loaded_at_200, family, specimens):
    loaded, _ = loaded_at_200(family)
    prepared = prepare(loaded, specimens)
    one = generate(loaded, prepared, batch_size=1, max_new_tokens=10)
    many = generate(loaded, prepared, batch_size=8, max_new_tokens=10)
    assert [g.text for g in many] == [g.text for g in one]
    assert [g.n_new_tokens for g in many] == [g.n_new_tokens for g in one]
    assert len({g.text for g in one}) > 2  # distinct outputs, so a mix-up would show
    # order: results follow the prepared list, whatever order it comes in
    perm = [3, 0, 8, 5, 1, 7, 2, 6, 4]
    shuffled = generate(loaded, [prepared[i] for i in perm], batch_size=4, max_new_tokens=10)
    assert [g.text for g in shuffled] == [one[i].text for i in perm]
    assert [g.input_size for g in many] == [p.input_size for p in prepared]


def test_prepared_inputs_are_reused_across_checkpoints(loaded_at_200, specimens):
    loaded, run = loaded_at_200("qwen2_vl")
    prepared = prepare(loaded, specimens)
    snapshot = [p.input_ids.clone() for p in prepared]
    at_200 = [g.text for g in generate(loaded, prepared, max_new_tokens=8)]
    swap_weights(loaded, run.run_dir / "checkpoint-300")
    at_300 = [g.text for g in generate(loaded, prepared, max_new_tokens=8)]
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    assert at_300 != at_200
    assert [g.text for g in generate(loaded, prepared, max_new_tokens=8)] == at_200
    assert all(torch.equal(a, p.input_ids) for a, p in zip(snapshot, prepared, strict=True))


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_forced_texts_survive_padding_sorting_and_decoding(loaded_at_200, family, specimens):
    loaded, _ = loaded_at_200(family)
    prepared = prepare(loaded, specimens)
    forced = [None if i % 4 == 3 else f"{_FORCED[family]} {i}" for i in range(len(specimens))]
    out = generate(loaded, prepared, batch_size=4, max_new_tokens=80, forced_texts=forced)
    tok = loaded.processor.tokenizer
    for i, (g, text) in enumerate(zip(out, forced, strict=True)):
        if text is None:
            continue
        assert g.text == text, i
        assert g.n_new_tokens == len(tok.encode(text, add_special_tokens=False))
        assert not g.truncated


@pytest.mark.parametrize("family", ["florence2", "internvl", "llava"])
def test_forced_boxes_parse_with_the_family_default_format(loaded_at_200, family, specimens):
    """Generate -> decode -> the family's default parser: the boxes come back in pixels."""
    from vieval_runner.families import FAMILIES
    from vieval_runner.parsing import parse_grounding

    loaded, _ = loaded_at_200(family)
    spec = specimens[4]  # 128 x 64
    (out,) = generate(loaded, prepare(loaded, [spec]), forced_texts=[_FORCED[family]])
    facts = FAMILIES[family]
    result = parse_grounding(out.text, facts["output_format"], (spec.width, spec.height),
                             coords=facts.get("coords"), default_label=spec.prompt)  # fmt: skip
    assert result.status == "ok"
    first = [round(v, 1) for v in result.boxes[0].as_list()]
    expected = {"florence2": [12.9, 12.8, 38.5, 25.6],  # (bin + 0.5) / 1000
                "internvl": [12.8, 12.8, 38.4, 25.6],  # 0-1000
                "llava": [15.4, 21.8, 71.7, 49.9]}  # 0-1 floats  # fmt: skip
    assert first == expected[family]


def test_truncation_is_flagged(loaded_at_200, specimens):
    loaded, _ = loaded_at_200("qwen25_vl")
    prepared = prepare(loaded, specimens[:2])
    out = generate(loaded, prepared, max_new_tokens=5, forced_texts=[_FORCED["qwen25_vl"]] * 2)
    assert all(g.truncated and g.n_new_tokens == 5 for g in out)
    assert all(_FORCED["qwen25_vl"].startswith(g.text) and g.text for g in out)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf"])
def test_oom_halves_the_batch_and_keeps_every_specimen(loaded_at_200, specimens, lean):
    loaded, _ = loaded_at_200("paligemma")
    prepared = prepare(loaded, specimens)
    options = GenerateOptions(lean=lean)
    expected = [
        g.text for g in generate(loaded, prepared, batch_size=8, max_new_tokens=6, options=options)
    ]
    sizes = []

    def small_memory(module, args, kwargs):  # the model's forward, whichever loop calls it
        rows = kwargs["input_ids"].shape[0]
        if kwargs["input_ids"].shape[1] > 1:  # prefill: once per batch
            sizes.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = loaded.model.register_forward_pre_hook(small_memory, with_kwargs=True)
    done = []
    try:
        with pytest.warns(
            RuntimeWarning, match="out of memory at batch size 8; halving to 4"
        ) as rec:
            out = generate(loaded, prepared, batch_size=8, max_new_tokens=6,
                           progress=done.append, options=options)  # fmt: skip
    finally:
        hook.remove()
    assert len([w for w in rec if "out of memory" in str(w.message)]) == 1  # warned once
    assert [g.text for g in out] == expected
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2
    assert sum(done) == len(specimens)

    def no_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = loaded.model.register_forward_pre_hook(no_memory, with_kwargs=True)
    try:
        with pytest.raises(torch.OutOfMemoryError), pytest.warns(RuntimeWarning):
            generate(loaded, prepared[:2], batch_size=2, options=options)
    finally:
        hook.remove()


def test_generate_rejects_bad_arguments(loaded_at_200, specimens):
    loaded, _ = loaded_at_200("paligemma")
    prepared = prepare(loaded, specimens[:2])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(loaded, prepared, batch_size=0)
    with pytest.raises(ValueError, match="1 forced_texts for 2 specimens"):
        generate(loaded, prepared, forced_texts=["x"])


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_batch_invariance_on_gpu_bf16(tiny_run, family, specimens):
    loaded = load_at_200(tiny_run(family), device="cuda", dtype="bf16")
    prepared = prepare(loaded, specimens)
    forced = [_FORCED[family]] * len(specimens)
    one = generate(loaded, prepared, batch_size=1, max_new_tokens=80, forced_texts=forced)
    many = generate(loaded, prepared, batch_size=8, max_new_tokens=80, forced_texts=forced)
    assert [g.text for g in one] == [g.text for g in many] == forced


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_batch_invariance_on_gpu_fp32_free_running(tiny_run, family, specimens):
    loaded = load_at_200(tiny_run(family), device="cuda", dtype="fp32")
    prepared = prepare(loaded, specimens)
    one = generate(loaded, prepared, batch_size=1, max_new_tokens=10)
    if FAMILIES[family].get("batches_on_cuda", True):
        many = generate(loaded, prepared, batch_size=8, max_new_tokens=10)
    else:  # known not batch-invariant on CUDA: generate() must refuse to batch, and say so
        with pytest.warns(RuntimeWarning, match="not batch-invariant"):
            many = generate(loaded, prepared, batch_size=8, max_new_tokens=10)
    assert [g.text for g in one] == [g.text for g in many]
