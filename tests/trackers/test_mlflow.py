"""report_to: mlflow, end to end on a tiny model into a local sqlite tracking store; read back
with MLflow's own MlflowClient."""

from __future__ import annotations

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")

from mlflow.tracking import MlflowClient  # noqa: E402

from vieval_runner import store  # noqa: E402
from vieval_runner.pipeline import run as runner  # noqa: E402
from vieval_runner.testing.fixtures import quiet_console, run_config  # noqa: E402
from vieval_runner.trackers import COLUMNS  # noqa: E402

STEPS = [0, 200]
EXPERIMENT = "vieval-tests"


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        env.chdir(tmp)  # MLflow's default artifact root, ./mlruns, stays in the test's folder
        config = run_config(
            tmp, tiny_run("qwen25_vl"), steps=STEPS, report_to=["mlflow"], report_sample=3
        )
        assert runner.run(config, quiet_console()).evaluated == STEPS
        # the same step again (force): the run and the step's table are updated, not doubled
        again = config.model_copy(update={"steps": [200], "force": True})
        assert runner.run(again, quiet_console()).evaluated == [200]
        client = MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id])
        yield config, client, experiment, runs


def test_one_run_named_after_the_run_id(logged):
    config, _, _, runs = logged
    assert len(runs) == 1  # the rerun found it (tag vieval.run_id) instead of starting another
    run = runs[0]
    assert run.info.run_name == config.effective_run_id
    assert run.data.tags["vieval.run_id"] == config.effective_run_id
    assert run.info.status == "FINISHED"


def test_metrics_at_each_step_are_the_stored_aggregates(logged):
    config, client, _, runs = logged
    run_id = runs[0].info.run_id
    aggregates = store.open_store(config.store).aggregates(config.effective_run_id).to_pylist()
    for metric in ("f1", "recall", "parse_failure_rate"):
        history = client.get_metric_history(run_id, f"vieval/{metric}")
        assert sorted({m.step for m in history}) == STEPS
        latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        for row in aggregates:  # the store's latest evaluation of each step
            assert latest[row["step"]] == pytest.approx(row[metric], abs=1e-6)
    for step in STEPS:
        counts = [
            m.value
            for key in runs[0].data.metrics
            if key.startswith("vieval/category/")
            for m in client.get_metric_history(run_id, key)
            if m.step == step
        ]
        assert sum(counts) >= 6  # six specimens per evaluation (step 200 evaluated twice)


def test_per_step_tables_images_and_run_metadata(logged):
    config, client, experiment, runs = logged
    run = runs[0]
    for step in STEPS:
        path = f"vieval/specimens/step_{step:08d}.json"
        table = client.load_table(experiment.experiment_id, path, run_ids=[run.info.run_id])
        assert list(table.columns)[: len(COLUMNS)] == COLUMNS
        assert len(table) == 6  # one row per specimen, also after the rerun of step 200
        assert set(table["specimen_id"]) == {f"img{i}.png" for i in range(6)}
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    pngs = [p for p in images if p.endswith(".png")]
    keys = {p.split("/")[-1].split("+step+")[0] for p in pngs}
    assert len(keys) == 3  # report_sample specimens, the same at every step
    per_step = {s: sum(f"+step+{s}+" in p for p in pngs) for s in STEPS}
    assert per_step == {0: 3, 200: 6}  # the rerun of step 200 logged its images again
    tags = run.data.tags
    assert tags["vieval.view_command"] == f"vieval view {config.store}"
    assert tags["vieval.store"] == config.store
    assert tags["vieval.best_metric"] == "f1"
