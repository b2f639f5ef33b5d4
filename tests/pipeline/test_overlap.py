"""Overlap in the runner: the same store with and without it, commits in step order with at
most one in flight, a failed commit is a failed evaluation; batch_size auto; static cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from vieval_runner import store
from vieval_runner.config import ConfigError, config_from_dict
from vieval_runner.generate.batches import auto_batch_size, generate
from vieval_runner.generate.options import GenerateOptions
from vieval_runner.model.loading import load_base
from vieval_runner.model.swap import swap_weights
from vieval_runner.pipeline import run as runner
from vieval_runner.pipeline.overlap import Committer
from vieval_runner.prepare.inputs import prepare
from vieval_runner.testing.fixtures import quiet_console, run_config

_OFF = {"overlap": False, "prefetch": False, "cache_vision": False, "preprocess_workers": 1}


def _contents(config) -> tuple[dict, list]:
    reader = store.open_store(config.store)
    run_id = config.effective_run_id
    steps = {}
    for step in reader.steps(run_id):
        rows = reader.step(run_id, step).to_pylist()
        steps[step] = [{k: v for k, v in r.items() if k != "eval_id"} for r in rows]
    keep = ("step", "status", "n_specimens", "f1", "precision", "recall", "iou_mean")
    evaluations = [{k: e[k] for k in keep} for e in reader.evaluations(run_id).to_pylist()]
    return steps, sorted(evaluations, key=lambda e: e["step"])


def test_overlap_prefetch_and_disk_cache_store_the_same_as_plain(tmp_path, tiny_run):
    run = tiny_run("qwen25_vl")
    plain = run_config(tmp_path / "plain", run, **_OFF)
    fast = run_config(
        tmp_path / "fast", run, prepare_cache_ram_mb=0, cache_dir=str(tmp_path / "cache")
    )  # every prepared specimen on disk, all overlap on
    assert runner.run(plain, quiet_console()).evaluated == [0, 100, 200, 300]
    assert runner.run(fast, quiet_console()).evaluated == [0, 100, 200, 300]
    assert _contents(fast) == _contents(plain)
    assert len(_contents(plain)[0]) == 4
    assert not list((tmp_path / "cache").glob("vieval-prepared-*/*"))  # temp chunks removed


def test_a_failed_background_commit_is_a_failed_evaluation(tmp_path, tiny_run, monkeypatch):
    run = tiny_run("qwen2_vl")
    config = run_config(tmp_path, run)
    real_commit = store.commit_step

    def disk_full_at_200(root, row, rows):  # fault injection around the real Delta commit
        if row["step"] == 200:
            raise OSError(28, "No space left on device (injected)")
        return real_commit(root, row, rows)

    monkeypatch.setattr(store, "commit_step", disk_full_at_200)
    outcome = runner.run(config, quiet_console())
    assert outcome.exit_status == 3
    assert set(outcome.failed) == {200} and "No space left" in outcome.failed[200]
    assert outcome.evaluated == [0, 100, 300]
    reader = store.open_store(config.store)
    assert reader.steps(config.effective_run_id) == [0, 100, 300]
    failed = [e for e in reader.evaluations().to_pylist() if e["status"] == "failed"]
    assert [e["step"] for e in failed] == [200] and "No space left" in failed[0]["error"]


def test_committer_keeps_step_order_and_one_commit_in_flight():
    log, running, errors = [], [], []
    lock = threading.Lock()

    def commit(step):
        def run():
            with lock:
                running.append(step)
                assert len(running) == 1
            time.sleep(0.02)
            log.append(step)
            with lock:
                running.remove(step)
            if step == 3:
                raise RuntimeError("boom")

        return run

    committer = Committer(lambda step, exc: errors.append((step, str(exc))))
    for step in range(6):
        committer.submit(step, commit(step))
        assert log == list(range(step))  # the previous commit finished before this one began
    committer.close()
    assert log == list(range(6)) and errors == [(3, "boom")]


def test_batch_size_auto(tiny_run, specimens):
    assert config_from_dict(_minimal(batch_size="auto")).batch_size == "auto"
    assert config_from_dict(_minimal(batch_size=16)).batch_size == 16
    for bad in (0, "big", 1.5):
        with pytest.raises(ConfigError, match="batch_size"):
            config_from_dict(_minimal(batch_size=bad))

    class _Cuda:
        device = torch.device("cuda")

    assert auto_batch_size(_Cuda(), 10_000) == 512 and auto_batch_size(_Cuda(), 9) == 9
    run = tiny_run("paligemma")
    loaded = load_base(run.base_model_dir, device="cpu")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    assert auto_batch_size(loaded, 10_000) == 8
    prepared = prepare(loaded, specimens)
    want = [g.text for g in generate(loaded, prepared, batch_size=1, max_new_tokens=6)]
    memo: dict = {}
    got = generate(loaded, prepared, batch_size="auto", max_new_tokens=6, memo=memo)
    assert [g.text for g in got] == want and memo == {"batch_size": 8}


def _minimal(**extra) -> dict:
    return {"run_dir": "r", "base_model": "b", "store": "s", "data": {"path": "d"}, **extra}


def test_static_kv_cache_gives_the_same_text(tiny_run, specimens):
    run = tiny_run("qwen2_vl")
    loaded = load_base(run.base_model_dir, device="cpu")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    assert loaded.model.config._attn_implementation == "sdpa"
    prepared = prepare(loaded, specimens)
    want = [g.text for g in generate(loaded, prepared, batch_size=4, max_new_tokens=8)]
    static = GenerateOptions(static_cache=True)
    got = generate(loaded, prepared, batch_size=4, max_new_tokens=8, options=static)
    assert [g.text for g in got] == want


@pytest.mark.slow
def test_torch_compile_with_static_cache_gives_the_same_text(tiny_run, specimens):
    run = tiny_run("qwen2_vl")
    loaded = load_base(run.base_model_dir, device="cpu")
    swap_weights(loaded, run.run_dir / "checkpoint-200")
    prepared = prepare(loaded, specimens[:4])
    want = [g.text for g in generate(loaded, prepared, batch_size=4, max_new_tokens=6)]
    compiled = GenerateOptions(compile=True)
    got = generate(loaded, prepared, batch_size=4, max_new_tokens=6, options=compiled)
    assert [g.text for g in got] == want


@pytest.mark.parametrize(
    ("extra", "cpus", "during"),
    [
        ({}, 2, 1),  # overlap on: one core left for the helper threads
        ({"overlap": False}, 2, None),  # no helpers: torch's own setting
        ({"cpu_threads": 2}, 2, 2),  # asked for
        ({}, 1, None),  # one CPU: nothing to leave free
    ],
)
def test_generation_threads_leave_a_core_to_the_helpers_and_come_back(
    tmp_path, tiny_run, monkeypatch, extra, cpus, during
):
    from vieval_runner.pipeline import overlap

    run = tiny_run("qwen2_vl")
    config = run_config(tmp_path, run, steps=[100], include_base=False, **extra)
    monkeypatch.setattr(overlap.os, "cpu_count", lambda: cpus)
    seen = []
    from vieval_runner.generate import batches as generation

    real = generation.generate

    def recording(*args, **kwargs):  # what torch uses while the runner generates
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert runner.run(config, quiet_console()).evaluated == [100]
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(previous)
    assert seen == [2 if during is None else during]


def test_the_lean_check_runs_while_the_split_is_prepared(tmp_path, tiny_run, monkeypatch):
    """The lean loop's one-time check decodes two specimens of the first prepared chunk
    while the rest of the split is still prepared; with reused inputs (nothing to overlap)
    the first batch checks as before. Once per run either way, the same store contents."""
    from vieval_runner.demo import shapes
    from vieval_runner.generate import decoding
    from vieval_runner.pipeline import overlap
    from vieval_runner.prepare import inputs as preparation

    run = tiny_run("qwen2_vl")
    split = shapes.write_split(tmp_path / "data", n=40, task="grounding")  # 3 chunks
    preparing, checked, checks = threading.Event(), threading.Event(), []
    real_prepare, real_matches = overlap.prepare_inputs, decoding._lean_matches
    real_chunk = preparation.prepare_chunk

    def later_chunk(*args, **kwargs):  # the chunks after the first wait for the check (or 20 s)
        checked.wait(20)
        return real_chunk(*args, **kwargs)

    def watched_prepare(*args, **kwargs):
        preparing.set()
        try:
            return real_prepare(*args, **kwargs)
        finally:
            preparing.clear()

    def watched_matches(loaded, part, *args):
        checks.append((preparing.is_set(), part["input_ids"].shape[0]))
        checked.set()
        return real_matches(loaded, part, *args)

    monkeypatch.setattr(overlap, "prepare_inputs", watched_prepare)
    monkeypatch.setattr(decoding, "_lean_matches", watched_matches)
    monkeypatch.setattr(preparation, "prepare_chunk", later_chunk)
    contents = []
    for name in ("cold", "reused"):
        config = config_from_dict({
            "run_dir": str(run.run_dir), "base_model": str(run.base_model_dir),
            "store": str(tmp_path / name), "task": "grounding", "steps": [100, 200],
            "data": {"path": str(split)}, "batch_size": 8, "max_new_tokens": 6,
            "device": "cpu", "prepared_cache_dir": str(tmp_path / "prepared"),
        })  # fmt: skip
        assert runner.run(config, quiet_console()).evaluated == [100, 200]
        contents.append(_contents(config))
    assert checks == [(True, 2), (False, 2)]
    assert contents[0] == contents[1]


def test_the_first_checkpoint_is_read_unpinned_and_later_ones_as_default(
    tmp_path, tiny_run, monkeypatch
):
    """The first read is on the critical path (page-locking it would not pay); the reads
    behind generation keep the default (pinned on CUDA)."""
    from vieval_runner.model import prefetch

    calls = []
    real = prefetch.prefetch_checkpoint

    def recording(loaded, checkpoint_dir, pin=None):
        calls.append((Path(checkpoint_dir).name, pin))
        return real(loaded, checkpoint_dir, pin)

    monkeypatch.setattr(prefetch, "prefetch_checkpoint", recording)
    config = run_config(tmp_path, tiny_run("qwen2_vl"), include_base=False)
    assert runner.run(config, quiet_console()).evaluated == [100, 200, 300]
    assert calls == [("checkpoint-100", False), ("checkpoint-200", None), ("checkpoint-300", None)]


def test_prepared_pixels_follow_the_model_dtype_the_live_one_first(tiny_run):
    """16-bit pixels only for a 16-bit model: the dtype the config loads while only the
    processor is there, the live model's own once there is one (a training callback's fp32
    model under a bf16 config keeps float32 pixels: nothing is rounded away)."""
    from vieval_runner.model import loading as models
    from vieval_runner.pipeline.overlap import pixel_dtype

    run = tiny_run("qwen2_vl")
    head = models.load_base_processor(run.base_model_dir)
    for dtype, want in (("auto", None), ("float32", None), ("bfloat16", torch.bfloat16),
                        ("float16", torch.float16)):  # fmt: skip
        assert pixel_dtype(_config_for(run, dtype), head) == want, dtype
    live = load_base(run.base_model_dir, device="cpu", dtype="fp32")
    assert pixel_dtype(_config_for(run, "bfloat16"), live) is None
    half = load_base(run.base_model_dir, device="cpu", dtype="bf16")
    assert pixel_dtype(_config_for(run, "auto"), half) == torch.bfloat16


def _config_for(run, dtype: str):
    tree = {"run_dir": str(run.run_dir), "base_model": str(run.base_model_dir),
            "store": "s", "data": {"path": "d"}, "device": "cpu", "dtype": dtype}  # fmt: skip
    return config_from_dict(tree)
