"""The run log next to the store: on a full disk it neither raises nor floods the terminal."""

from __future__ import annotations

import logging

from vieval_runner.pipeline.logfile import RunLogHandler
from vieval_runner.testing.fixtures import fill_disk


def test_log_handler_stays_quiet_on_a_full_disk(tiny_disk, capfd):
    logger = logging.getLogger("vieval.test-full-disk")
    logger.propagate = False
    handler = RunLogHandler(tiny_disk / "run.log", encoding="utf-8")
    logger.addHandler(handler)
    try:
        logger.warning("before the disk fills")
        handler.flush()
        fill_disk(tiny_disk)
        for i in range(50):  # the reported run printed 41 '--- Logging error ---' tracebacks
            logger.error("line %d %s", i, "x" * 5000)
        handler.flush()
    finally:
        logger.removeHandler(handler)
        handler.close()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert handler.failure is not None and "No space left on device" in handler.failure
    assert (tiny_disk / "run.log").read_text().startswith("before the disk fills")


def test_log_handler_reports_other_failures_once(tmp_path, capfd):
    handler = RunLogHandler(tmp_path / "run.log", encoding="utf-8")
    logger = logging.getLogger("vieval.test-closed")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        handler.stream.close()  # a write that fails for another reason than a full disk
        for _ in range(5):
            logger.error("lost")
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "log file" in err and "stopped" in err, err
    assert "Traceback" not in err
