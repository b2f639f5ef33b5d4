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


def attach_run_log(config: Config) -> Path | None:
    """Log to ``STORE/logs/vieval-<utc time>.log`` (local stores) with the config and versions."""
    logger = logging.getLogger("vieval")
    logger.setLevel(logging.INFO)
    if "://" in config.store:
        return None  # object-store roots have no local folder to write to
    folder = Path(config.store) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vieval-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.info("command: %s", " ".join(sys.argv))
    logger.info("versions: %s", json.dumps(library_versions()))
    logger.info("config: %s", json.dumps(dump_config(config)))
    return path
