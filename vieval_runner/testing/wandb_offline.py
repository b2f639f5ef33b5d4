"""Reading back an offline W&B run (``WANDB_MODE=offline``) for tests.

wandb ships no reader for an offline run's ``run-<id>.wandb`` file, so this one is hand-written:
the file is W&B's LevelDB-style record log (a 7-byte ``:W&B`` header, then 32 KiB blocks of
chunks with a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) of
``wandb_internal_pb2.Record`` messages, parsed with wandb's own protobuf classes. Media (tables,
images) are W&B's own files under the run's ``files/`` folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    """The ``Record`` messages of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B record log (header {data[:7]!r})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FIRST:
            pending = chunk
            continue
        if kind == MIDDLE:
            pending += chunk
            continue
        raw = pending + chunk if kind == LAST else chunk
        pending = b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def history(path: str | Path) -> list[dict]:
    """Each ``run.log`` row as ``{key: value}``; nested keys joined with ``.``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = ".".join(item.nested_key) if item.nested_key else item.key
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def summary(path: str | Path) -> dict:
    """The run's summary as last updated."""
    values: dict = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = ".".join(item.nested_key) if item.nested_key else item.key
                values[key] = json.loads(item.value_json)
    return values


def run_folders(wandb_dir: str | Path) -> list[Path]:
    """The offline run folders under ``WANDB_DIR`` (``wandb/offline-run-*``), oldest first."""
    return sorted((Path(wandb_dir) / "wandb").glob("offline-run-*"))


def run_file(folder: Path) -> Path:
    return next(folder.glob("run-*.wandb"))
