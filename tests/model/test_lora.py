"""LoRA checkpoints: peft adapter swaps on the resident base equal a merged reference model."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from vieval_runner.checkpoints import find_checkpoints
from vieval_runner.model.loading import apply_checkpoint, load_base
from vieval_runner.model.swap import swap_weights
from vieval_runner.records import CheckpointError
from vieval_runner.testing.fixtures import logits_of, model_batch, versions_note


def _merged(base_dir, adapter_dir):
    """The reference: a fresh base with the adapter merged into its weights by peft."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    fresh = AutoModelForImageTextToText.from_pretrained(base_dir)
    with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload().eval()


def _has_lora_layers(model) -> bool:
    return any("lora_" in name for name, _ in model.named_modules())


def _by_step(run):
    return {c.step: c for c in find_checkpoints(run.run_dir, run.base_model_dir)}


def test_lora_run_is_found_as_lora_checkpoints(tiny_lora_run):
    run = tiny_lora_run("qwen2_vl")
    ckpts = _by_step(run)
    assert sorted(ckpts) == [0, 100, 200, 300]
    assert ckpts[0].kind == "base"
    assert all(ckpts[s].kind == "lora" and ckpts[s].complete for s in run.steps)
    config = json.loads((run.run_dir / "checkpoint-100" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(
        run.base_model_dir
    )
    a = load_file(run.run_dir / "checkpoint-100" / "adapter_model.safetensors")
    b = load_file(run.run_dir / "checkpoint-200" / "adapter_model.safetensors")
    lora_b = [k for k in a if "lora_B" in k]
    assert lora_b and all(a[k].abs().sum() > 0 for k in lora_b)  # non-zero: outputs move
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma", "florence2", "llava"])
def test_adapter_swap_equals_merged_reference(tiny_lora_run, family, specimens):
    run = tiny_lora_run(family)
    ckpts = _by_step(run)
    loaded = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    base = logits_of(loaded.model, inputs)
    apply_checkpoint(loaded, ckpts[200])
    swapped = logits_of(loaded.model, inputs)
    reference = logits_of(_merged(run.base_model_dir, run.run_dir / "checkpoint-200"), inputs)
    # merging changes the arithmetic order only: equal to float32 rounding of the logit scale
    scale = max(1.0, reference.abs().max().item())
    assert (swapped - reference).abs().max().item() <= 1e-5 * scale, versions_note()
    assert (swapped - base).abs().max().item() > 1e-2  # the adapter changed the outputs
    assert loaded.current == str(ckpts[200].path) and loaded.adapter is not None
    apply_checkpoint(loaded, ckpts[0])
    # step 0 after an adapter is a fresh base load, bit for bit: same weights, same flags
    # (peft freezes the base parameters and torch's matmul path depends on requires_grad)
    fresh = load_base(run.base_model_dir, device="cpu").model
    flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in fresh.named_parameters()}
    at_0 = logits_of(loaded.model, inputs)
    assert torch.equal(at_0, logits_of(fresh, inputs)), (
        f"step 0 after an adapter differs from a fresh base load by "
        f"{(at_0 - base).abs().max().item():.3g}; {versions_note()}"
    )
    assert torch.equal(at_0, base)


def test_switching_adapters_and_back_is_exact_and_step0_is_the_base(tiny_lora_run, specimens):
    run = tiny_lora_run("qwen2_vl")
    ckpts = _by_step(run)
    loaded = load_base(run.base_model_dir, device="cpu")
    model_class = type(loaded.model)
    inputs = model_batch(loaded, specimens)
    base = logits_of(loaded.model, inputs)
    outputs = {}
    for step in (100, 200, 300):
        apply_checkpoint(loaded, ckpts[step])
        outputs[step] = logits_of(loaded.model, inputs)
    assert not torch.equal(outputs[100], outputs[200])
    assert not torch.equal(outputs[200], outputs[300])
    # only the active adapter stays on the model: the old ones are deleted
    assert list(loaded.peft_model.peft_config) == [loaded.adapter]
    apply_checkpoint(loaded, ckpts[100])
    assert torch.equal(logits_of(loaded.model, inputs), outputs[100]), versions_note()
    apply_checkpoint(loaded, ckpts[0])  # step 0 after an adapter: the base, exactly
    assert torch.equal(logits_of(loaded.model, inputs), base), versions_note()
    assert type(loaded.model) is model_class and not _has_lora_layers(loaded.model)
    assert loaded.current == "base" and loaded.adapter is None
    apply_checkpoint(loaded, ckpts[300])  # and adapters go on again after the base
    assert torch.equal(logits_of(loaded.model, inputs), outputs[300]), versions_note()


def test_generation_uses_the_active_adapter(tiny_lora_run, specimens):
    from vieval_runner.generate.batches import generate
    from vieval_runner.prepare.inputs import prepare

    run = tiny_lora_run("qwen2_vl")
    ckpts = _by_step(run)
    loaded = load_base(run.base_model_dir, device="cpu")
    prepared = prepare(loaded, specimens)
    base = [g.text for g in generate(loaded, prepared, max_new_tokens=8)]
    apply_checkpoint(loaded, ckpts[300])
    at_300 = [g.text for g in generate(loaded, prepared, max_new_tokens=8)]
    one_by_one = [g.text for g in generate(loaded, prepared, batch_size=1, max_new_tokens=8)]
    assert at_300 != base and one_by_one == at_300
    apply_checkpoint(loaded, ckpts[0])
    assert [g.text for g in generate(loaded, prepared, max_new_tokens=8)] == base


def test_adapter_for_another_base_raises_and_keeps_the_active_adapter(tiny_lora_run, specimens):
    run = tiny_lora_run("qwen2_vl")
    foreign = tiny_lora_run("paligemma").run_dir / "checkpoint-100"
    loaded = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    base = logits_of(loaded.model, inputs)
    # first adapter fails: the model is left clean, no LoRA layers behind
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(foreign))}: adapter does not fit.*match no layer"
    ):
        swap = _by_step(tiny_lora_run("paligemma"))[100]
        apply_checkpoint(loaded, swap)
    assert not _has_lora_layers(loaded.model) and loaded.adapter is None
    assert torch.equal(logits_of(loaded.model, inputs), base)
    # with an adapter active, a bad one leaves it active and unchanged
    ckpts = _by_step(run)
    apply_checkpoint(loaded, ckpts[200])
    at_200 = logits_of(loaded.model, inputs)
    with pytest.raises(CheckpointError, match=re.escape(str(foreign))):
        apply_checkpoint(loaded, swap)
    assert torch.equal(logits_of(loaded.model, inputs), at_200)
    assert loaded.current == str(ckpts[200].path)


def _copy_adapter(run, tmp_path):
    dst = tmp_path / "checkpoint-200"
    shutil.copytree(run.run_dir / "checkpoint-200", dst)
    return dst


def test_wrong_target_modules_or_shapes_raise_naming_the_checkpoint(tiny_lora_run, tmp_path):
    from vieval_runner.model.lora import swap_adapter

    run = tiny_lora_run("qwen2_vl")
    loaded = load_base(run.base_model_dir, device="cpu")
    targets = _copy_adapter(run, tmp_path / "targets")
    config = json.loads((targets / "adapter_config.json").read_text())
    config["target_modules"] = ["not_a_layer"]
    (targets / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=rf"(?s){re.escape(str(targets))}: LoRA adapter does not fit.*not_a_layer",
    ):
        swap_adapter(loaded, targets)
    assert not _has_lora_layers(loaded.model)

    shapes = _copy_adapter(run, tmp_path / "shapes")
    tensors = load_file(shapes / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.ones(7, tensors[key].shape[1])
    save_file(tensors, shapes / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=rf"(?s){re.escape(str(shapes))}: LoRA adapter does not fit.*size mismatch",
    ):
        swap_adapter(loaded, shapes)
    assert not _has_lora_layers(loaded.model)

    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(CheckpointError, match=r"bare: not a LoRA checkpoint.*adapter_config"):
        swap_adapter(loaded, bare)


def test_full_checkpoint_after_adapter_and_adapter_after_full(tiny_lora_run, tiny_run, specimens):
    """Not a supported run layout, but the resident model must never mix the two."""
    lora = tiny_lora_run("qwen2_vl")
    full = tiny_run("qwen2_vl")  # same seed: the same base weights
    loaded = load_base(lora.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    apply_checkpoint(loaded, _by_step(lora)[100])
    at_100 = logits_of(loaded.model, inputs)
    swap_weights(loaded, full.run_dir / "checkpoint-200")
    assert not _has_lora_layers(loaded.model)
    apply_checkpoint(loaded, _by_step(lora)[100])  # the adapter goes on the base, not step 200
    assert torch.equal(logits_of(loaded.model, inputs), at_100)


def test_unknown_kind_is_an_error(tiny_lora_run):
    from vieval_runner.checkpoints import Checkpoint

    loaded = load_base(tiny_lora_run("qwen2_vl").base_model_dir, device="cpu")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind 'gguf'"):
        apply_checkpoint(loaded, Checkpoint(5, loaded.base_weights_dir, "gguf", True))  # type: ignore[arg-type]
