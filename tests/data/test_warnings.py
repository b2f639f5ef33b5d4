"""Every change the loader makes to the ground truth reaches the user: console (a count per
kind), the log file (each in full) and the store (with the dataset version)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.compute as pc
from rich.console import Console

from vieval_runner import store
from vieval_runner.config import config_from_dict
from vieval_runner.pipeline.logfile import attach_run_log
from vieval_runner.pipeline.session import open_session

COCO = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco-sample"
if not COCO.is_dir():
    COCO = Path("/work/shared/data/coco-sample")


def test_coco_sample_warnings_are_printed_logged_and_stored(tmp_path):
    config = config_from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "base_model": str(tmp_path / "base"),
            "store": str(tmp_path / "store"),
            "run_id": "r",
            "task": "grounding",
            "data": {"path": str(COCO)},
            "device": "cpu",
        }
    )
    log_path = attach_run_log(config)
    console = Console(record=True, width=200)
    try:
        session = open_session(config, console)
    finally:
        for handler in list(logging.getLogger("vieval").handlers):
            if getattr(handler, "baseFilename", None) == str(log_path):
                handler.close()
                logging.getLogger("vieval").removeHandler(handler)
    shown = console.export_text()
    # the sample's two warts: one unannotated image, one exact duplicate box (annotations.json)
    assert "2 data warning(s)" in shown
    assert "1 x kept one" in shown and "1 x skipped" in shown
    logged = log_path.read_text()
    assert "exact duplicate of annotation 321" in logged
    assert "has no annotations: no phrase to ground: skipped" in logged

    table = store.open_store(config.store).specimens()
    first = table.filter(pc.invert(pc.is_null(table.column("dataset_warnings"))))
    assert first.num_rows == 1
    (warnings,) = first.column("dataset_warnings").to_pylist()
    assert first.column("dataset_version")[0].as_py() == session.dataset_version
    assert len(warnings) == 2 and any("kept one" in w for w in warnings)


def test_no_warnings_print_nothing(tmp_path):
    from vieval_runner.pipeline.session import report_data_warnings

    console = Console(record=True)
    report_data_warnings([], console)
    assert console.export_text() == ""
