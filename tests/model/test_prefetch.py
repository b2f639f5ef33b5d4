"""Prefetched checkpoint tensors: swapping from them equals a plain swap bit for bit; read
errors surface as CheckpointError; the vision-part hash agrees between files and memory."""

from __future__ import annotations

import shutil

import pytest
import torch

from vieval_runner.model import loading as models
from vieval_runner.model import prefetch
from vieval_runner.model.loading import load_base
from vieval_runner.model.swap import restore_base, swap_weights
from vieval_runner.model.vision_hash import current_vision_hash, resident_vision_hash
from vieval_runner.records import CheckpointError
from vieval_runner.testing.fixtures import logits_of, model_batch


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma"])
def test_prefetched_swap_is_bit_identical_to_a_plain_swap(tiny_run, family, specimens):
    run = tiny_run(family)
    ckpt = run.run_dir / "checkpoint-300"
    plain = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(plain, specimens)
    base = logits_of(plain.model, inputs)
    swap_weights(plain, ckpt)
    want = logits_of(plain.model, inputs)

    loaded = load_base(run.base_model_dir, device="cpu")
    future = prefetch.prefetch_checkpoint(loaded, ckpt)
    tensors = future.result(timeout=60)
    assert tensors.path == ckpt and tensors.files
    # the resident weights are untouched until the swap
    assert torch.equal(logits_of(loaded.model, inputs), base)
    models.apply_checkpoint(loaded, _Ckpt(ckpt), tensors)
    assert torch.equal(logits_of(loaded.model, inputs), want)
    assert loaded.current == str(ckpt)
    assert loaded.vision_hash == plain.vision_hash is not None
    with pytest.raises(ValueError, match="prefetched tensors are of"):
        swap_weights(loaded, run.run_dir / "checkpoint-100", tensors)


class _Ckpt:
    def __init__(self, path):
        self.path, self.kind = path, "full"


def test_prefetch_of_a_corrupt_checkpoint_raises_and_leaves_the_model(
    tiny_run, tmp_path, specimens
):
    run = tiny_run("qwen2_vl")
    bad = tmp_path / "checkpoint-999"
    shutil.copytree(run.run_dir / "checkpoint-200", bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    loaded = load_base(run.base_model_dir, device="cpu")
    inputs = model_batch(loaded, specimens)
    before = logits_of(loaded.model, inputs)
    future = prefetch.prefetch_checkpoint(loaded, bad)
    with pytest.raises(CheckpointError, match="checkpoint-999.*unreadable safetensors"):
        future.result(timeout=60)
    assert torch.equal(logits_of(loaded.model, inputs), before)
    # a checkpoint missing a tensor still fails the strict coverage check at swap time
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "checkpoint-998"
    shutil.copytree(run.run_dir / "checkpoint-200", partial)
    state = load_file(partial / "model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, partial / "model.safetensors")
    tensors = prefetch.prefetch_checkpoint(loaded, partial).result(timeout=60)
    with pytest.raises(CheckpointError, match="missing 1"):
        swap_weights(loaded, partial, tensors)
    assert torch.equal(logits_of(loaded.model, inputs), before)


def test_vision_hash_agrees_between_files_and_resident_tensors(tiny_run):
    run = tiny_run("qwen2_vl")
    loaded = load_base(run.base_model_dir, device="cpu")
    resident = current_vision_hash(loaded)  # step 0 before any swap: from memory
    assert resident is not None
    assert prefetch.read_checkpoint(loaded, run.base_model_dir).vision_hash == resident
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    assert loaded.vision_hash != resident  # the tiny run perturbs every tensor
    assert resident_vision_hash(loaded) == loaded.vision_hash
    restore_base(loaded)
    assert current_vision_hash(loaded) == resident
