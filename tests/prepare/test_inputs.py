"""Preparation: batched processor calls split back per specimen, and stopping it (the runner
prepares the split while the weights load)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from vieval_runner.families import FAMILIES
from vieval_runner.model import loading as models
from vieval_runner.pipeline import overlap
from vieval_runner.pipeline import run as runner
from vieval_runner.prepare import inputs as preparation
from vieval_runner.prepare.inputs import (
    PreparationCancelled,
    input_size_for,
    prepare,
    prepare_one,
    same_preparation,
)
from vieval_runner.records import CheckpointError
from vieval_runner.testing.fixtures import quiet_console, run_config
from vieval_runner.testing.tiny_models import FAMILIES_BUILDABLE


@pytest.mark.parametrize("family", FAMILIES_BUILDABLE)
def test_batched_processor_calls_give_each_specimens_own_outputs(tiny_run, specimens, family):
    """Every family: the split prepared in chunks (one processor call each where the family
    has a ``prepare_split`` rule) equals one processor call per specimen, tensor for tensor."""
    loaded = models.load_base_processor(tiny_run(family).base_model_dir)
    split = specimens * 3  # 27 mixed-size specimens: two chunks, the second a partial one
    assert len({(s.width, s.height) for s in split}) > 3
    batched = prepare(loaded, split, workers=2)
    singles = [prepare_one(loaded, s) for s in split]
    assert len(batched) == len(singles)
    assert all(same_preparation(a, b) for a, b in zip(batched, singles, strict=True))
    assert len({p.prompt_len for p in singles}) > 1  # padding in the batched call was removed


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES_BUILDABLE if FAMILIES[f].get("prepare_split")]
)
def test_families_with_a_split_rule_use_one_processor_call_per_chunk(
    tiny_run, specimens, family, monkeypatch
):
    loaded = models.load_base_processor(tiny_run(family).base_model_dir)
    calls, real_call = [], type(loaded.processor).__call__

    def counted(self, *args, **kwargs):
        calls.append(len(kwargs["text"]))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(loaded.processor), "__call__", counted)
    prepare(loaded, specimens * 3)
    # the first chunk's check: its first and last specimen alone, then the chunk; then a chunk
    assert calls == [1, 1, 16, 11]
    calls.clear()
    prepare(loaded, specimens * 3, workers=2)  # smaller chunks: every worker gets two
    assert calls[:3] == [1, 1, 6] and sorted(calls[3:]) == [3, 6, 6, 6]


def test_batched_outputs_that_differ_fall_back_to_one_specimen_at_a_time(
    tiny_run, specimens, monkeypatch, caplog
):
    loaded = models.load_base_processor(tiny_run("qwen2_vl").base_model_dir)
    real_split = preparation._split

    def off_by_one(*args):  # a split rule that no longer matches the processor's layout
        items = real_split(*args)
        items[-1].input_ids = items[-1].input_ids[1:]
        return items

    monkeypatch.setattr(preparation, "_split", off_by_one)
    with caplog.at_level(logging.WARNING, logger="vieval"):
        prepared = prepare(loaded, specimens * 3)
    assert "preparing one specimen at a time" in caplog.text
    assert all(
        same_preparation(a, prepare_one(loaded, s))
        for a, s in zip(prepared, specimens * 3, strict=True)
    )


def test_a_cancelled_preparation_stops_at_the_next_specimen(tiny_run, specimens):
    loaded = models.load_base_processor(tiny_run("qwen2_vl").base_model_dir)
    assert loaded.model is None and loaded.family == "qwen2_vl"
    cancel = threading.Event()
    pulled = []

    def split():
        for i, specimen in enumerate(specimens):
            pulled.append(i)
            if i == 2:
                cancel.set()  # as the runner does when the weights fail to load
            yield specimen

    with pytest.raises(PreparationCancelled):
        prepare(loaded, split(), cancel=cancel, workers=1)
    assert pulled == [0, 1, 2] and len(specimens) > 3  # stopped, not run to the end
    assert len(prepare(loaded, specimens, cancel=threading.Event(), workers=2)) == len(specimens)


def test_a_failed_weight_load_stops_the_split_and_fails_the_steps(tmp_path, tiny_run, monkeypatch):
    run = tiny_run("qwen2_vl")
    config = run_config(tmp_path, run)
    started, seen = threading.Event(), []
    real_prepare = overlap.prepare_inputs

    def watching(session, head, cancel):  # the real preparation, observed
        started.set()
        try:
            return real_prepare(session, head, cancel)
        finally:
            seen.append(cancel.is_set())

    def broken_weights(*args, **kwargs):  # fault injection: the weights cannot be read
        started.wait(5)
        raise CheckpointError(f"{run.base_model_dir}/model.safetensors: truncated")

    monkeypatch.setattr(overlap, "prepare_inputs", watching)
    monkeypatch.setattr(models, "load_base", broken_weights)
    outcome = runner.run(config, quiet_console())
    assert outcome.exit_status == 3 and outcome.evaluated == []
    assert all("model.safetensors: truncated" in why for why in outcome.failed.values())
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[:1] == [True]  # the preparation was told to stop


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm"])
def test_pixels_prepared_in_the_model_dtype_are_the_cast_to_device_makes(
    tiny_run, specimens, family
):
    """Prepared in bf16: exactly the values the per-batch cast would give (same rounding),
    other tensors untouched, and the same generated text as fp32-prepared inputs."""
    from vieval_runner.generate.batches import generate
    from vieval_runner.model.loading import load_base

    loaded = load_base(tiny_run(family).base_model_dir, device="cpu", dtype="bf16")
    plain = prepare(loaded, specimens)
    half = prepare(loaded, specimens, workers=2, pixel_dtype=torch.bfloat16)
    for a, b in zip(plain, half, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and a.tensors.keys() == b.tensors.keys()
        for key, value in a.tensors.items():
            if value.is_floating_point():
                assert b.tensors[key].dtype == torch.bfloat16
                assert torch.equal(b.tensors[key], value.to(torch.bfloat16)), key
            else:
                assert torch.equal(b.tensors[key], value) and b.tensors[key].dtype == value.dtype
    assert any(v.is_floating_point() for v in plain[0].tensors.values())
    texts = [[g.text for g in generate(loaded, p, 4, 8)] for p in (plain, half)]
    assert texts[0] == texts[1]


def test_input_size_for(tiny_run, specimens):
    loaded = models.load_base(tiny_run("qwen25_vl").base_model_dir, device="cpu")
    out = loaded.processor(images=[specimens[2].load_image()], text=["<|image_pad|>"],
                           return_tensors="pt")  # fmt: skip
    w, h = input_size_for(loaded, out, 0)
    t, gh, gw = out["image_grid_thw"][0].tolist()
    assert (w, h) == (gw * 14, gh * 14)
    assert w % 28 == 0 and h % 28 == 0 and w > h  # 120x80 stays landscape
    pali = models.load_base(tiny_run("paligemma").base_model_dir, device="cpu")
    assert input_size_for(pali, {"pixel_values": torch.zeros(1, 3, 32, 32)}, 0) is None
