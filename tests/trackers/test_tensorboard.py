"""report_to: tensorboard, end to end on a tiny model; read back with TensorBoard's own
EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402

from vieval_runner import store  # noqa: E402
from vieval_runner.pipeline import run as runner  # noqa: E402
from vieval_runner.testing.fixtures import quiet_console, run_config  # noqa: E402

STEPS = [0, 200]


def event_folder(config) -> Path:
    """Where `vieval run` writes: logging_dir's default, 'tensorboard' beside the store."""
    return Path(config.store).parent / "tensorboard" / config.effective_run_id


def read_events(folder) -> ea.EventAccumulator:
    events = ea.EventAccumulator(
        str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0}
    )
    events.Reload()
    return events


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("tb")
    config = run_config(
        tmp, tiny_run("qwen25_vl"), steps=STEPS, report_to=["tensorboard"], report_sample=3
    )
    outcome = runner.run(config, quiet_console())
    assert outcome.evaluated == STEPS
    return config


def test_event_files_go_beside_the_store_under_the_run_id(logged):
    assert list(event_folder(logged).glob("events.out.tfevents.*"))


def test_scalars_at_each_step_are_the_stored_aggregates(logged):
    events = read_events(event_folder(logged))
    aggregates = store.open_store(logged.store).aggregates(logged.effective_run_id).to_pylist()
    for metric in ("f1", "precision", "recall", "parse_failure_rate"):
        logged_values = {e.step: e.value for e in events.Scalars(f"vieval/{metric}")}
        assert sorted(logged_values) == STEPS
        for row in aggregates:
            assert logged_values[row["step"]] == pytest.approx(row[metric], abs=1e-6)
    # every specimen lands in exactly one failure category at each step
    categories = [t for t in events.Tags()["scalars"] if t.startswith("vieval/category/")]
    assert "vieval/category/good" in categories
    for step in STEPS:
        total = sum(e.value for tag in categories for e in events.Scalars(tag) if e.step == step)
        assert total == 6  # the split's six specimens (fixtures.write_split)


def test_sample_images_and_worst_specimens_text(logged):
    events = read_events(event_folder(logged))
    images = [t for t in events.Tags()["images"] if t.startswith("vieval/sample/")]
    assert len(images) == 3  # report_sample
    for tag in images:  # the same ids at every step: one slider position per step
        assert [e.step for e in events.Images(tag)] == STEPS
        assert all(0 < e.width <= 384 and 0 < e.height <= 384 for e in events.Images(tag))
    texts = events.Tags()["tensors"]
    worst = next(t for t in texts if t.startswith("vieval/worst_specimens"))
    steps = [e.step for e in events.Tensors(worst)]
    assert steps == STEPS
    table = events.Tensors(worst)[-1].tensor_proto.string_val[0].decode()
    assert "| specimen_id |" in table and "img" in table
    run = next(t for t in texts if t.startswith("vieval/run"))
    meta = events.Tensors(run)[-1].tensor_proto.string_val[0].decode()
    assert f"vieval view {logged.store}" in meta and "best_step" in meta


def test_vqa_steps_log_answer_metrics_and_plain_images(tmp_path, tiny_run):
    config = run_config(
        tmp_path,
        tiny_run("paligemma"),
        task="vqa",
        steps=[0, 300],
        report_to=["tensorboard"],
        report_sample=2,
    )
    assert runner.run(config, quiet_console()).evaluated == [0, 300]
    events = read_events(event_folder(config))
    aggregates = store.open_store(config.store).aggregates(config.effective_run_id).to_pylist()
    logged = {e.step: e.value for e in events.Scalars("vieval/exact_match")}
    assert logged == pytest.approx({r["step"]: r["exact_match"] for r in aggregates})
    assert {e.step for e in events.Scalars("vieval/category/wrong")} == {0, 300}
    images = [t for t in events.Tags()["images"] if t.startswith("vieval/sample/")]
    assert len(images) == 2
    worst = next(t for t in events.Tags()["tensors"] if t.startswith("vieval/worst_specimens"))
    table = events.Tensors(worst)[-1].tensor_proto.string_val[0].decode()
    assert "score: exact_match" in table and "red \\| a red one" in table
