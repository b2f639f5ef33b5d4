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
    # the AP interval's resamples change no prediction or metric either
    scoring = {"ap_bootstrap_resamples": 1000}
    assert resume.config_hash(_config(run, tmp_path, scoring=scoring)) == base
    assert resume.config_hash(_config(run, tmp_path, scoring={"iou_threshold": 0.6})) != base


def test_a_step_left_with_orphans_is_evaluated_again(tmp_path, tiny_run):
    """A re-evaluation killed between its two commits leaves orphans on a step that has an
    older, matching ok evaluation: the next run evaluates it again (which replaces them)."""
    from vieval_runner import store
    from vieval_runner.testing.stores import kill_commit_at

    run = tiny_run("qwen25_vl")
    config = _config(run, tmp_path)
    found = step.select_checkpoints(config)
    store.create_store(config.store)
    rows = [{"specimen_id": "a", "raw_text": "[]", "parse_status": "empty"}]
    for ckpt in found[1:3]:  # steps 100 and 200 stored for this checkpoint content and config
        done = {"run_id": config.effective_run_id, "step": ckpt.step, "status": "ok",
                "checkpoint_hash": ckpts.checkpoint_hash(ckpt.path),
                "config_hash": resume.config_hash(config)}  # fmt: skip
        store.commit_step(config.store, done, rows)
    again = {"run_id": config.effective_run_id, "step": 200, "status": "ok"}
    kill_commit_at(config.store, "between", again, rows)
    assert store.orphaned_steps(config.store, config.effective_run_id) == {200}

    outcome = step.RunOutcome(store=config.store, run_id=config.effective_run_id)
    console = Console(record=True, width=200)
    todo = resume.plan_checkpoints(config, found, console, outcome)
    assert [c.step for c, _ in todo] == [0, 200, 300]
    assert outcome.skipped == [100]
    assert "steps [200] hold predictions of an unfinished commit" in console.export_text()
