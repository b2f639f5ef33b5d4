"""Resume decisions: which settings make a stored step stale, and lazy content hashing."""

from __future__ import annotations

from concurrent.futures import Future

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner.config import config_from_dict
from vieval_runner.pipeline import resume, step


def _config(run, tmp_path, **extra):
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / "store"),
        "data": {"path": str(tmp_path / "val.jsonl")},
        **extra,
    }
    return config_from_dict(tree)


def test_config_hash_ignores_throughput_knobs_but_not_generation(tmp_path, tiny_run):
    run = tiny_run("qwen25_vl")
    base = resume.config_hash(_config(run, tmp_path))
    for same in ({"overlap": False}, {"prefetch": False}, {"cache_vision": False}, {"store": "/x"}):
        assert resume.config_hash(_config(run, tmp_path, **same)) == base, same
    for other in (
        {"max_new_tokens": 7},
        {"prompt_template": "Box {prompt}"},
        {"output_format": "plain_xyxy"},
    ):
        assert resume.config_hash(_config(run, tmp_path, **other)) != base, other


def test_lazy_plan_hashes_in_the_background_only_when_nothing_is_stored(tmp_path, tiny_run):
    run = tiny_run("qwen25_vl")
    config = _config(run, tmp_path)
    found = step.select_checkpoints(config)
    outcome = step.RunOutcome(store=config.store, run_id=config.effective_run_id)
    from vieval_runner import store

    store.create_store(config.store)
    todo = resume.plan_checkpoints(config, found, Console(quiet=True), outcome, lazy=True)
    assert [c.step for c, _ in todo] == [0, 100, 200, 300]
    for ckpt, digest in todo:
        assert isinstance(digest, Future)
        expected = (
            ckpts.checkpoint_hash(ckpt.path) if ckpt.kind != "base" else resume._base_hash(config)
        )
        assert resume.resolved(digest) == expected
    eager = resume.plan_checkpoints(config, found, Console(quiet=True), outcome)
    assert all(isinstance(d, str) for _, d in eager)


def test_config_hash_ignores_the_setup_checks(tmp_path, tiny_run):
    # lora.require_same_base and data.max_image_pixels decide whether a step runs or which
    # images are specimens (the dataset version), not what a prediction is: a stored step
    # stays done, and stores written before these settings existed keep their hashes
    run = tiny_run("qwen25_vl")
    base = resume.config_hash(_config(run, tmp_path))
    data = {"path": str(tmp_path / "val.jsonl"), "max_image_pixels": 1000}
    assert resume.config_hash(_config(run, tmp_path, data=data)) == base
    lora = {"require_same_base": True}
    assert resume.config_hash(_config(run, tmp_path, lora=lora)) == base
