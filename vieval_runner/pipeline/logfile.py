"""A log file next to the store, so a failure hours into a run can be diagnosed afterwards."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from vieval_runner.config import Config, dump_config


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the results."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in (
        "vieval-runner",
        "torch",
        "transformers",
        "tokenizers",
        "peft",
        "deltalake",
        "pyarrow",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def local_log_folder() -> Path:
    """Where runs on an object-store root log: ``$VIEVAL_CACHE_DIR/logs``, else
    ``$XDG_CACHE_HOME/vieval/logs``, else ``~/.cache/vieval/logs``."""
    import os

    if os.environ.get("VIEVAL_CACHE_DIR"):
        return Path(os.environ["VIEVAL_CACHE_DIR"]) / "logs"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vieval" / "logs"


class RunLogHandler(logging.FileHandler):
    """The run log's file handler: a write that fails (a full disk) never raises and never
    prints logging's "--- Logging error ---" traceback. The first failure stops the log
    (``failure`` says why); only one that is not a full disk says so, in one line, since the
    run's own message explains a full disk."""

    failure: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:  # the unwritten rest of the buffer: the disk is still full
            self.failure = self.failure or f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:
            self.failure = self.failure or f"{type(exc).__name__}: {exc}"

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if self.failure is not None:
            return
        error = sys.exc_info()[1]
        self.failure = f"{type(error).__name__}: {error}"
        if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
            with contextlib.suppress(Exception):
                sys.stderr.write(f"vieval: log file {self.baseFilename} stopped ({self.failure})\n")


def attach_run_log(config: Config) -> Path | None:
    """Log to ``STORE/logs/vieval-<utc time>.log`` (local stores; an object-store root logs
    to :func:`local_log_folder`) with the config (secrets redacted) and versions."""
    from vieval_runner.objectstore import is_remote

    logger = logging.getLogger("vieval")
    logger.setLevel(logging.INFO)
    if "://" in config.store and not is_remote(config.store):
        return None  # another URL scheme (file://, memory://): no folder of ours to log to
    folder = local_log_folder() if is_remote(config.store) else Path(config.store) / "logs"
    path = folder / f"vieval-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = RunLogHandler(path, encoding="utf-8")
    except OSError:  # e.g. a full disk: the run says so when it first writes the store
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.info("command: %s", " ".join(sys.argv))
    logger.info("versions: %s", json.dumps(library_versions()))
    logger.info("config: %s", json.dumps(dump_config(config)))
    return path
