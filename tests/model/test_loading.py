"""Family detection, base loading, strict in-place weight swaps equal to from_pretrained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vieval_runner.families import FAMILIES
from vieval_runner.model import loading as models
from vieval_runner.model.loading import detect_family, load_base, load_processor_for
from vieval_runner.model.swap import restore_base, swap_weights
from vieval_runner.records import CheckpointError
from vieval_runner.testing.fixtures import logits_of, model_batch, versions_note
from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE


def _fresh(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_detect_family(tiny_run, family):
    run = tiny_run(family)
    assert detect_family(run.base_model_dir) == family
    assert detect_family(run.run_dir / "checkpoint-100") == family


def test_detect_family_errors_name_file_and_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json.*'bert'.*paligemma.*qwen2_5_vl"):
        detect_family(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        detect_family(tmp_path / "nope")


def test_families_facts_are_complete():
    for family, facts in FAMILIES.items():
        assert {"grounding", "vqa"} <= set(facts["templates"]), family
        assert facts["padding_side"] in ("left", "right")
        assert facts["padding_side"] == ("right" if facts["encoder_decoder"] else "left")


def test_load_base_defaults(tiny_run):
    loaded = load_base(tiny_run("qwen25_vl").base_model_dir)
    assert loaded.family == "qwen25_vl"
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not loaded.model.training
    assert loaded.model.dtype == loaded.dtype
    assert loaded.processor.tokenizer.padding_side == "left"
    with pytest.raises(ValueError, match="unknown dtype 'fp7'"):
        load_base(tiny_run("qwen25_vl").base_model_dir, device="cpu", dtype="fp7")


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_swap_equals_fresh_from_pretrained_and_restores_base(tiny_run, family, specimens):
    run = tiny_run(family)
    loaded = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    base = logits_of(loaded.model, inputs)
    assert torch.equal(base, logits_of(_fresh(run.base_model_dir), inputs)), versions_note()
    ckpt = run.run_dir / "checkpoint-200"
    swap_weights(loaded, ckpt)
    swapped = logits_of(loaded.model, inputs)
    assert torch.equal(swapped, logits_of(_fresh(ckpt), inputs)), versions_note()  # bit-identical
    assert (swapped - base).abs().max().item() > 1e-3  # the swap changed something
    assert loaded.current == str(ckpt)
    restore_base(loaded)
    assert torch.equal(logits_of(loaded.model, inputs), base)
    assert loaded.current == "base"


def test_restore_base_from_host_copy_when_no_local_files(tiny_run, specimens, monkeypatch):
    run = tiny_run("paligemma")
    monkeypatch.setattr(models, "_local_weights_dir", lambda base: None)
    loaded = load_base(run.base_model_dir, device="cpu")
    assert loaded.base_weights_dir is None and loaded.base_state
    inputs = model_batch(loaded, specimens)
    base = logits_of(loaded.model, inputs)
    swap_weights(loaded, run.run_dir / "checkpoint-300")
    restore_base(loaded)
    assert torch.equal(logits_of(loaded.model, inputs), base)


@pytest.mark.parametrize("family", ["qwen25_vl", "paligemma", "llava", "internvl"])
def test_naive_load_state_dict_would_silently_load_nothing(tiny_run, family, specimens):
    """Why the key mapping matters: file keys are not the in-memory names."""
    run = tiny_run(family)
    ckpt = run.run_dir / "checkpoint-200"
    loaded = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    file_tensors = load_file(ckpt / "model.safetensors")
    result = loaded.model.load_state_dict(file_tensors, strict=False)
    # at most lm_head matches by name; everything else is silently skipped
    assert len(file_tensors) - len(result.unexpected_keys) <= 1
    assert len(result.missing_keys) > 30
    expected = logits_of(_fresh(ckpt), inputs)
    naive = logits_of(loaded.model, inputs)
    assert (naive - expected).abs().max() > 1e-2  # wrong, with no error
    swap_weights(loaded, ckpt)
    assert torch.equal(logits_of(loaded.model, inputs), expected)


def _copy_ckpt(tiny_run, tmp_path, family="qwen25_vl"):
    src = tiny_run(family).run_dir / "checkpoint-200"
    dst = tmp_path / "checkpoint-200"
    shutil.copytree(src, dst)
    return dst, load_file(dst / "model.safetensors")


def _assert_untouched(loaded, before):
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_tensor_raises_naming_path_and_key(tiny_run, tmp_path):
    ckpt, tensors = _copy_ckpt(tiny_run, tmp_path)
    dropped = "model.layers.1.mlp.down_proj.weight"
    assert dropped in tensors  # the older on-disk layout
    del tensors[dropped]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    loaded = load_base(tiny_run("qwen25_vl").base_model_dir, device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        swap_weights(loaded, ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg and "missing 1" in msg
    assert "model.language_model.layers.1.mlp.down_proj.weight" in msg
    _assert_untouched(loaded, before)  # checked before any copy
    assert loaded.current == "base"


def test_wrong_shape_and_unexpected_key_raise(tiny_run, tmp_path):
    ckpt, tensors = _copy_ckpt(tiny_run, tmp_path)
    tensors["model.norm.weight"] = torch.ones(7)
    tensors["model.extra_head.weight"] = torch.ones(3)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    loaded = load_base(tiny_run("qwen25_vl").base_model_dir, device="cpu")
    with pytest.raises(CheckpointError) as err:
        swap_weights(loaded, ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg
    assert "shape mismatch 1 (model.norm.weight: file [7] vs model [32])" in msg
    assert "unexpected 1 (model.extra_head.weight)" in msg


def test_no_weights_and_corrupt_file_raise(tiny_run, tmp_path):
    loaded = load_base(tiny_run("paligemma").base_model_dir, device="cpu")
    empty = tmp_path / "checkpoint-5"
    empty.mkdir()
    (empty / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"checkpoint-5: no model.safetensors.*trainer_state"):
        swap_weights(loaded, empty)
    (empty / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        swap_weights(loaded, empty)


def test_sharded_checkpoint_swaps(tiny_run, tmp_path, specimens):
    run = tiny_run("paligemma")
    fresh = _fresh(run.run_dir / "checkpoint-300")
    sharded = tmp_path / "checkpoint-300"
    fresh.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    loaded = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    swap_weights(loaded, sharded)
    assert torch.equal(logits_of(loaded.model, inputs), logits_of(fresh, inputs))
    next(sharded.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shards named by the index are missing"):
        swap_weights(loaded, sharded)


def test_load_processor_for_prefers_checkpoint_then_base(tiny_run, tmp_path):
    run = tiny_run("qwen25_vl")
    processor, own = load_processor_for(run.run_dir / "checkpoint-100", run.base_model_dir)
    assert own and type(processor).__name__ == "Qwen2_5_VLProcessor"
    bare = tmp_path / "checkpoint-100"
    bare.mkdir()
    for name in ("model.safetensors", "config.json", "trainer_state.json"):
        shutil.copy(run.run_dir / "checkpoint-100" / name, bare / name)
    processor, own = load_processor_for(bare, run.base_model_dir)
    assert not own and type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.tokenizer.padding_side == "left"
