"""Packed vision attention: the same tower outputs and texts as transformers' per-image loop,
with one SDPA call per image length instead of one per image (window)."""

from __future__ import annotations

import pytest
import torch

from vieval_runner.generate.batches import generate
from vieval_runner.model import vision_attention
from vieval_runner.model.loading import load_base
from vieval_runner.model.vision_attention import PACKED_SDPA, pack_vision_attention
from vieval_runner.model.vision_attention import unpack_vision_attention as unpack
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.fixtures import make_specimens, versions_note
from vieval_runner.testing.tiny_models import build_tiny_model

QWEN = ["qwen2_vl", "qwen25_vl", "qwen3_vl"]


def _image_inputs(loaded, specimens):
    images = [s.load_image() for s in specimens]
    texts = ["<|vision_start|><|image_pad|><|vision_end|>x"] * len(images)
    inputs = loaded.processor(images=images, text=texts, return_tensors="pt", padding=True)
    return inputs["pixel_values"], inputs["image_grid_thw"]


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a tower output (tuples, lists, model outputs), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (list, tuple)):
        return [t for part in value for t in _tensors(part)]
    return []


def _features(loaded, pixels, grid) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = loaded.model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
    return _tensors(out)


def _sdpa_calls(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("sizes", ["equal", "mixed"])
def test_tower_outputs_are_identical_with_fewer_attention_calls(
    family, sizes, tiny_run, monkeypatch
):
    loaded = load_base(tiny_run(family).base_model_dir, device="cpu")
    assert loaded.model.config.vision_config._attn_implementation == PACKED_SDPA
    specimens = make_specimens()
    chosen = [specimens[0]] * 5 if sizes == "equal" else specimens
    pixels, grid = _image_inputs(loaded, chosen)
    if sizes == "mixed":
        assert len({tuple(g) for g in grid.tolist()}) > 2  # several image lengths

    calls = _sdpa_calls(monkeypatch)
    packed = _features(loaded, pixels, grid)
    packed_calls = len(calls)
    unpack(loaded.model)
    calls.clear()
    reference = _features(loaded, pixels, grid)
    loop_calls = len(calls)
    pack_vision_attention(loaded.model)

    assert len(packed) == len(reference) > 0
    for ours, theirs in zip(packed, reference, strict=True):
        # bit for bit: same kernel, same values per image
        assert torch.equal(ours, theirs), versions_note()
    layers = loaded.model.config.vision_config.depth
    assert loop_calls >= layers * len(chosen)  # HF: at least one call per image and layer
    distinct = len({t * h * w for t, h, w in grid.tolist()})  # image lengths in patches
    if family == "qwen25_vl":  # windowed layers: a group per window length, fewer than windows
        assert packed_calls < loop_calls / 2
    else:
        assert packed_calls == layers * distinct


@pytest.mark.parametrize("family", QWEN)
def test_generated_texts_are_identical(family, tiny_run):
    loaded = load_base(tiny_run(family).base_model_dir, device="cpu")
    prepared = prepare(loaded, make_specimens())
    packed = [g.text for g in generate(loaded, prepared, batch_size=4, max_new_tokens=12)]
    unpack(loaded.model)
    reference = [g.text for g in generate(loaded, prepared, batch_size=4, max_new_tokens=12)]
    assert packed == reference


def test_groups_gather_each_length_in_order():
    cu_seqlens = torch.tensor([0, 4, 6, 10, 10, 12])  # lengths 4, 2, 4, 0 (empty window), 2
    groups = vision_attention._groups(cu_seqlens)
    assert [(length, count) for length, count, _ in groups] == [(2, 2), (4, 2)]
    assert groups[0][2].tolist() == [4, 5, 10, 11]
    assert groups[1][2].tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert vision_attention._groups(torch.tensor([0, 3, 6, 9])) == [(3, 3, None)]


def test_other_families_and_attention_implementations_are_left_alone(tiny_run):
    paligemma = load_base(tiny_run("paligemma").base_model_dir, device="cpu")
    assert not pack_vision_attention(paligemma.model)
    eager, _ = build_tiny_model("qwen2_vl")
    eager.config.vision_config._attn_implementation = "eager"
    assert not pack_vision_attention(eager)
    assert eager.config.vision_config._attn_implementation == "eager"


def test_packed_sdpa_refuses_a_call_without_boundaries():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="without image boundaries"):
        vision_attention.packed_sdpa(torch.nn.Module(), q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("family", QWEN)
def test_packed_tower_on_gpu_matches_the_loop(family, tiny_run):
    loaded = load_base(tiny_run(family).base_model_dir, device="cuda", dtype="bfloat16")
    pixels, grid = _image_inputs(loaded, make_specimens())
    pixels, grid = pixels.to("cuda", torch.bfloat16), grid.to("cuda")
    packed = _features(loaded, pixels, grid)
    unpack(loaded.model)
    reference = _features(loaded, pixels, grid)
    for ours, theirs in zip(packed, reference, strict=True):
        # bf16 kernels may tile a batch of n differently from n batches of one: to bf16's
        # precision (eps 2**-8), in absolute terms too for values near zero
        torch.testing.assert_close(ours, theirs, rtol=1.6e-2, atol=1e-2)
