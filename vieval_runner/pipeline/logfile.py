"""A log file next to the store, so a failure hours into a run can be diagnosed afterwards."""

from __future__ import annotations

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


def attach_run_log(config: Config) -> Path | None:
    """Log to ``STORE/logs/vieval-<utc time>.log`` (local stores; an object-store root logs
    to :func:`local_log_folder`) with the config (secrets redacted) and versions."""
    from vieval_runner.objectstore import is_remote

    logger = logging.getLogger("vieval")
    logger.setLevel(logging.INFO)
    if "://" in config.store and not is_remote(config.store):
        return None  # another URL scheme (file://, memory://): no folder of ours to log to
    folder = local_log_folder() if is_remote(config.store) else Path(config.store) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vieval-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.info("command: %s", " ".join(sys.argv))
    logger.info("versions: %s", json.dumps(library_versions()))
    logger.info("config: %s", json.dumps(dump_config(config)))
    return path
