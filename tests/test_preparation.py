"""Preparation: stopping it (the runner prepares the split while the weights load)."""

from __future__ import annotations

import threading
import time

import pytest
from test_runner import _config, _quiet

from vieval_runner import models, runner
from vieval_runner.preparation import PreparationCancelled, prepare


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
    config = _config(tmp_path, run)
    started, seen = threading.Event(), []
    real_prepare = runner.throughput.prepare_inputs

    def watching(session, head, cancel):  # the real preparation, observed
        started.set()
        try:
            return real_prepare(session, head, cancel)
        finally:
            seen.append(cancel.is_set())

    def broken_weights(*args, **kwargs):  # fault injection: the weights cannot be read
        started.wait(5)
        raise models.CheckpointError(f"{run.base_model_dir}/model.safetensors: truncated")

    monkeypatch.setattr(runner.throughput, "prepare_inputs", watching)
    monkeypatch.setattr(models, "load_base", broken_weights)
    outcome = runner.run(config, _quiet())
    assert outcome.exit_status == 3 and outcome.evaluated == []
    assert all("model.safetensors: truncated" in why for why in outcome.failed.values())
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen[:1] == [True]  # the preparation was told to stop
