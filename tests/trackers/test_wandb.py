"""report_to: wandb, end to end on a tiny model in W&B's offline mode; read back from the
offline run's own files (its record log with wandb's protobuf classes, its media files)."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("wandb")

from vieval_runner import store  # noqa: E402
from vieval_runner.pipeline import run as runner  # noqa: E402
from vieval_runner.testing import wandb_offline  # noqa: E402
from vieval_runner.testing.fixtures import quiet_console, run_config  # noqa: E402
from vieval_runner.trackers import COLUMNS  # noqa: E402
from vieval_runner.trackers.wandb import run_id_for  # noqa: E402

STEPS = [0, 200]


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_run):
    tmp = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(tmp))
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_PROJECT", "vieval-tests")
        import wandb

        wandb.teardown()  # settings an earlier test's wandb.setup kept (its WANDB_DIR) go
        config = run_config(
            tmp, tiny_run("qwen25_vl"), steps=STEPS, report_to=["wandb"], report_sample=3
        )
        assert runner.run(config, quiet_console()).evaluated == STEPS
        again = config.model_copy(update={"steps": [200], "force": True})
        assert runner.run(again, quiet_console()).evaluated == [200]
        wandb.teardown()  # wandb keeps its settings (WANDB_DIR ...) per process until then
    return config, tmp


def test_runs_resume_one_wandb_run_named_after_the_run_id(logged):
    config, tmp = logged
    folders = wandb_offline.run_folders(tmp)
    assert len(folders) == 2  # one offline folder per process, as wandb writes them ...
    wanted = run_id_for(config.effective_run_id)
    # ... of the same run id (wandb adds "-1" to a folder whose name, down to the second of
    # its start time, an earlier one already has)
    assert all(re.search(rf"-{re.escape(wanted)}(-\d+)?$", f.name) for f in folders), folders
    first = list(wandb_offline.records(wandb_offline.run_file(folders[0])))
    run = next(r.run for r in first if r.WhichOneof("record_type") == "run")
    assert run.display_name == config.effective_run_id and run.project == "vieval-tests"


def test_scalars_at_global_step_are_the_stored_aggregates(logged):
    config, tmp = logged
    first = wandb_offline.run_folders(tmp)[0]
    rows = [r for r in wandb_offline.history(wandb_offline.run_file(first)) if "vieval/f1" in r]
    assert [r["train/global_step"] for r in rows] == STEPS
    aggregates = store.open_store(config.store).evaluations(config.effective_run_id).to_pylist()
    first_eval = {e["step"]: e for e in aggregates[: len(STEPS)]}  # the first run's two steps
    for row in rows:
        stored = first_eval[row["train/global_step"]]
        for metric in ("f1", "precision", "parse_failure_rate"):
            assert row[f"vieval/{metric}"] == pytest.approx(stored[metric], abs=1e-6)
        categories = [v for k, v in row.items() if k.startswith("vieval/category/")]
        assert sum(categories) == 6


def test_tables_images_and_run_metadata(logged):
    config, tmp = logged
    for folder in wandb_offline.run_folders(tmp):
        log = wandb_offline.run_file(folder)
        for row in (r for r in wandb_offline.history(log) if "vieval/f1" in r):
            assert row["vieval/specimens._type"] == "table-file"
            table = json.loads((folder / "files" / row["vieval/specimens.path"]).read_text())
            assert table["columns"] == COLUMNS
            assert len(table["data"]) == 6
            assert row["vieval/samples.count"] == 3  # report_sample
            for name in row["vieval/samples.filenames"]:
                assert (folder / "files" / name).stat().st_size > 0
            captions = row["vieval/samples.captions"]
            assert all(c.startswith("img") for c in captions)
        summary = wandb_offline.summary(log)
        assert summary["vieval/view_command"] == f"vieval view {config.store}"
        assert summary["vieval/best_metric"] == "f1"
