"""Checkpoints on object storage (``run_dir: s3://bucket/run``), through obstore.

Discovery lists the run prefix once per poll; a checkpoint is complete when its
``trainer_state.json`` is there (the Trainer writes it last) or nothing in it changed for
``settle_seconds``, and all its weight files are there (each shard the index names). An
object is visible only once fully uploaded, so presence is enough. Its small JSON files
(trainer state, configs) are copied at discovery; its weights are downloaded once, when the
step is evaluated, into a bounded local cache, and removed after the step commits
(:func:`evict`). The content hash of a remote checkpoint covers each weight file's name, size
and ETag, so resuming never downloads weights just to compare them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from vieval_runner.objectstore import explain, open_prefix

STEP_DIR = re.compile(r"^(?:checkpoint-|step_|step-|global_step)(\d+)$")
INDEX = "model.safetensors.index.json"
FULL = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "adapter_model.safetensors"
STATE = "trainer_state.json"
# Trainer files the evaluation never reads (optimizer state is twice the model's size).
_SKIP = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|training_args\.bin)$"
)
_ETAGS = ".vieval-etags.json"
_CHUNK = 8 * 1024 * 1024


class RemoteError(Exception):
    """Object storage could not be listed or read (the message names the URL)."""


@dataclass
class RemoteFile:
    size: int
    etag: str
    modified: float


@dataclass
class RemoteCheckpoint:
    """One ``checkpoint-<step>/`` prefix: its URL, its files, and its local cache folder."""

    url: str
    name: str
    files: dict[str, RemoteFile]
    local: Path
    options: dict[str, str] | None = field(default=None, repr=False)  # never printed
    cache_root: Path | None = None
    cache_bytes: int = 64 << 30

    @property
    def weight_names(self) -> list[str]:
        return [n for n in self.wanted() if n.endswith((".safetensors", ".bin", ".pt"))]

    @property
    def download_bytes(self) -> int:
        """Bytes still to download (files not already cached with the same ETag)."""
        have = _etags(self.local)
        return sum(self.files[n].size for n in self.wanted() if have.get(n) != self.files[n].etag)

    def wanted(self) -> list[str]:
        """Files evaluation reads: not optimizer/trainer state, not DeepSpeed's subfolders."""
        return sorted(
            n
            for n in self.files
            if not _SKIP.match(n.rsplit("/", 1)[-1]) and not n.startswith("global_step")
        )


def default_cache_dir() -> Path:
    if os.environ.get("VIEVAL_CACHE_DIR"):
        return Path(os.environ["VIEVAL_CACHE_DIR"]) / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vieval" / "checkpoints"


def _local_folder(cache_root: Path, run_url: str, name: str) -> Path:
    scheme, _, rest = run_url.partition("://")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{scheme}_{rest.strip('/')}")
    return cache_root / safe / name


def scan(
    run_url: str,
    options: Mapping[str, str] | None,
    cache_dir: str | Path | None = None,
    cache_gb: float = 64,
) -> dict[int, RemoteCheckpoint]:
    """Step -> remote checkpoint for every checkpoint-like prefix under ``run_url``."""
    from obstore import list as list_objects

    run_url = run_url.rstrip("/")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        store = open_prefix(run_url, options)
        objects = list_objects(store).collect()
    except Exception as exc:  # obstore raises its own error types per failure
        raise RemoteError(explain(exc, run_url, options)) from None
    grouped: dict[str, dict[str, RemoteFile]] = {}
    for obj in objects:
        top, sep, rest = obj["path"].partition("/")
        if sep and rest and STEP_DIR.match(top):
            modified = obj["last_modified"].timestamp() if obj.get("last_modified") else 0.0
            grouped.setdefault(top, {})[rest] = RemoteFile(
                int(obj["size"]), str(obj.get("e_tag") or ""), modified
            )
    found: dict[int, RemoteCheckpoint] = {}
    for name in sorted(grouped):
        step = int(STEP_DIR.match(name).group(1))
        if step in found:
            raise RemoteError(
                f"{run_url}: two prefixes map to step {step}: {found[step].name} and {name}"
            )
        found[step] = RemoteCheckpoint(
            url=f"{run_url}/{name}",
            name=name,
            files=grouped[name],
            local=_local_folder(cache_root, run_url, name),
            options=dict(options) if options else None,
            cache_root=cache_root,
            cache_bytes=int(cache_gb * (1 << 30)),
        )
    return found


def status(
    remote: RemoteCheckpoint, settle_seconds: float, now: float | None = None
) -> tuple[str, bool, str]:
    """``(kind, complete, reason)`` from the listing (the shard index is read when present).

    Unlike a local folder, a missing weight file never means "corrupt": upload tools send
    files in any order and in parallel, so ``trainer_state.json`` may land before the last
    shard. The checkpoint waits until every file is there."""
    files = remote.files
    kind, problem = "full", ""
    if INDEX in files:
        try:
            _download(remote, [INDEX], None)  # cached by ETag: one read per new index
            weight_map = json.loads((remote.local / INDEX).read_text())["weight_map"]
            missing = sorted(set(weight_map.values()) - set(files))
            if missing:
                problem = f"missing shard(s) named by {INDEX}: {', '.join(missing)}"
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"{INDEX} is unreadable ({exc})"
    elif FULL in files:
        pass
    elif ADAPTER_CONFIG in files:
        kind = "lora"
        if ADAPTER not in files:
            problem = f"{ADAPTER_CONFIG} present but {ADAPTER} missing"
    else:
        problem = (
            f"no weights: expected {FULL}, {INDEX} + shards, or {ADAPTER_CONFIG} + {ADAPTER}; "
            f"found: {', '.join(sorted(files)) or 'nothing'}"
        )
    if problem:
        return kind, False, problem
    if STATE in files:
        return kind, True, ""
    now = time.time() if now is None else now
    age = now - max((f.modified for f in files.values()), default=0.0)
    if age < settle_seconds:
        return (
            kind,
            False,
            (f"no {STATE} and objects changed {age:.1f} s ago (settle time {settle_seconds:g} s)"),
        )
    return kind, True, ""


def _etags(local: Path) -> dict[str, str]:
    try:
        return json.loads((local / _ETAGS).read_text())
    except (OSError, ValueError):
        return {}


def _download(
    remote: RemoteCheckpoint, names: list[str], advance: Callable[[int], None] | None
) -> None:
    """Copy ``names`` into the local folder unless already there with the same ETag."""
    from obstore import get

    local = remote.local
    local.mkdir(parents=True, exist_ok=True)
    have = _etags(local)
    todo = [n for n in names if have.get(n) != remote.files[n].etag or not (local / n).is_file()]
    if not todo:
        return
    try:
        store = open_prefix(remote.url, remote.options)
    except Exception as exc:
        raise RemoteError(explain(exc, remote.url, remote.options)) from None
    for name in todo:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        # per process: ranks sharing one cache folder may download the same file at once
        part = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            with part.open("wb") as out:
                for chunk in get(store, name).stream(min_chunk_size=_CHUNK):
                    out.write(chunk)
                    if advance is not None:
                        advance(len(chunk))
        except Exception as exc:
            part.unlink(missing_ok=True)
            raise RemoteError(explain(exc, f"{remote.url}/{name}", remote.options)) from None
        part.replace(target)
        have[name] = remote.files[name].etag
        (local / _ETAGS).write_text(json.dumps(have))


def fetch_metadata(remote: RemoteCheckpoint) -> None:
    """Copy the checkpoint's small JSON files (trainer state, configs) into its local folder."""
    _download(remote, [n for n in remote.wanted() if n.endswith(".json") and "/" not in n], None)


def _weight_bytes(folder: Path) -> int:
    return sum(
        f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.name.endswith(".json")
    )


def _make_room(remote: RemoteCheckpoint, needed: int) -> None:
    """Evict other checkpoints' weights, least recently used first, until ``needed`` fits."""
    root = remote.cache_root or remote.local.parent.parent
    others = [p for p in root.glob("*/*") if p.is_dir() and p != remote.local]
    used = sum(_weight_bytes(p) for p in others)
    for folder in sorted(others, key=lambda p: p.stat().st_mtime):
        if used + needed <= remote.cache_bytes:
            break
        used -= _weight_bytes(folder)
        evict_folder(folder)
    if used + needed > remote.cache_bytes:
        raise RemoteError(
            f"{remote.url}: needs {needed / 2**30:.2f} GiB of local cache but checkpoint_cache_gb "
            f"allows {remote.cache_bytes / 2**30:.2f} GiB"
        )


def fetch(remote: RemoteCheckpoint, advance: Callable[[int], None] | None = None) -> Path:
    """Download the checkpoint (all but optimizer/trainer state) once; returns its folder."""
    missing = [n for n in remote.wanted() if _etags(remote.local).get(n) != remote.files[n].etag]
    _make_room(remote, sum(remote.files[n].size for n in missing))
    _download(remote, remote.wanted(), advance)
    os.utime(remote.local)  # most recently used
    return remote.local


def evict_folder(folder: Path) -> None:
    """Remove a cached checkpoint's weights (its small JSON files stay for the watcher)."""
    have = _etags(folder)
    for f in list(folder.rglob("*")):
        if f.is_file() and not f.name.endswith(".json"):
            f.unlink(missing_ok=True)
            have.pop(str(f.relative_to(folder)), None)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if folder.is_dir():
        (folder / _ETAGS).write_text(json.dumps(have))


def evict(remote: RemoteCheckpoint) -> None:
    if remote.local.is_dir():
        evict_folder(remote.local)


def content_hash(remote: RemoteCheckpoint) -> str:
    """``etag:`` + XXH3-128 of each weight file's name, size and ETag (no download)."""
    h = xxhash.xxh3_128()
    names = remote.weight_names + [n for n in (INDEX, ADAPTER_CONFIG) if n in remote.files]
    for name in names:
        f = remote.files[name]
        h.update(f"{name}\0{f.size}\0{f.etag}\0".encode())
    return "etag:" + h.hexdigest()
