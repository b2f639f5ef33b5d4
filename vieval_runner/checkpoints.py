"""Find a training run's checkpoints, decide which are complete, and fingerprint their weights.

Folder names accepted under ``run_dir``: ``checkpoint-<step>`` (Hugging Face Trainer),
``step_<n>``, ``step-<n>`` and ``global_step<n>``. Anything else (``runs/``,
``checkpoint-final``, ``checkpoint-100.tmp``, plain files) is not taken; ``untaken_folders``
lists the checkpoint-like ones and why, so a run can say so. Step 0 is the base model
(``base_model``: a local folder or a hub name) unless the run holds a real step-0 folder, which
then wins because it holds the actual step-0 weights.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import xxhash

from vieval_runner.records import CheckpointError

CheckpointKind = Literal["base", "full", "lora"]

_STEP_DIR = re.compile(r"^(?:checkpoint-|step_|step-|global_step)(\d+)$")
_CHECKPOINT_LIKE = re.compile(r"^(?:checkpoint|global_step|step)[-_]?(.*)$", re.IGNORECASE)
_INDEX = "model.safetensors.index.json"
_FULL = "model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "adapter_model.safetensors"
_STATE = "trainer_state.json"
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass
class Checkpoint:
    """One evaluable checkpoint; step 0 is the base model (``path`` = its folder or hub name)."""

    step: int
    path: Path
    kind: CheckpointKind
    complete: bool
    reason: str = ""
    # a checkpoint on object storage (``remote_checkpoints.RemoteCheckpoint``): ``path`` is
    # its local cache folder, filled by ``fetch`` and emptied by ``evict``
    remote: object = None

    @property
    def location(self) -> str:
        """Where the checkpoint lives: its URL when remote, else its folder."""
        return self.remote.url if self.remote is not None else str(self.path)


def _safetensors_intact(file: Path) -> str:
    """'' when the file's size matches what its header promises, else why not.

    A safetensors file is an 8-byte little-endian header length, a JSON header whose
    ``data_offsets`` give each tensor's byte range, then the data. A file still being written
    (or truncated) is shorter than header + largest end offset, which a bare ``exists()`` misses.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{file.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{file.name} is truncated (header says {n} bytes, file has {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{file.name} is unreadable ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"{file.name} is incomplete ({size} of {expected} bytes)"
    return ""


def _weights_status(path: Path) -> tuple[CheckpointKind | None, str]:
    """Which kind of weights the folder holds and '' if they are all there, else why not."""
    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return "full", f"{_INDEX} is unreadable ({e})"
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return "full", f"missing shard(s) named by {_INDEX}: {', '.join(missing)}"
        for s in shards:
            if problem := _safetensors_intact(path / s):
                return "full", problem
        return "full", ""
    if (path / _FULL).is_file():
        return "full", _safetensors_intact(path / _FULL)
    if (path / _ADAPTER_CONFIG).is_file():
        if not (path / _ADAPTER).is_file():
            return "lora", f"{_ADAPTER_CONFIG} present but {_ADAPTER} missing"
        return "lora", _safetensors_intact(path / _ADAPTER)
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    return None, (
        f"no weights: expected {_FULL}, {_INDEX} + shards, or {_ADAPTER_CONFIG} + {_ADAPTER}; "
        f"found: {', '.join(found) or 'nothing'}"
    )


def checkpoint_status(
    path: str | Path, settle_seconds: float = 30.0, now: float | None = None
) -> tuple[bool, str]:
    """``(complete, reason)`` for one checkpoint folder: is it done being written?

    Done = ``trainer_state.json`` exists (the Trainer writes it last) or no file in the folder
    changed during the last ``settle_seconds`` (for trainers that write no state file). Until
    then, missing or short weight files (each safetensors file must be as long as its header
    says; every shard named by the index must exist) mean "still being written". Once done,
    the same problems mean a corrupt checkpoint: it counts as complete, so loading it fails
    with a clear error and the run records a failed evaluation, and ``reason`` says why.
    """
    path = Path(path)
    if not path.is_dir():
        return False, f"{path} is not a directory"
    _, problem = _weights_status(path)
    if (path / _STATE).is_file():
        return True, problem
    now = time.time() if now is None else now
    newest = max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)
    age = now - newest
    if age < settle_seconds:
        settling = (
            f"no {_STATE} and files changed {age:.1f} s ago (settle time {settle_seconds:g} s)"
        )
        return False, f"{problem}; {settling}" if problem else settling
    return True, problem


def _kind(path: Path) -> CheckpointKind:
    kind, _ = _weights_status(path)
    # A folder with no weights yet is reported as "full": it is incomplete anyway.
    return kind or "full"


def _scan(run_dir: Path) -> dict[int, Path]:
    """Step -> folder for every checkpoint-like folder; two folders for one step is an error."""
    found: dict[int, Path] = {}
    for p in sorted(run_dir.iterdir()):
        m = _STEP_DIR.match(p.name)
        if not m or not p.is_dir():
            continue
        step = int(m.group(1))
        if step in found:
            raise CheckpointError(
                f"{run_dir}: two folders map to step {step}: {found[step].name} and {p.name}"
            )
        found[step] = p
    return found


def untaken_folders(run_dir: str | Path) -> list[tuple[str, str]]:
    """``(name, why)`` for each entry of ``run_dir`` named like a checkpoint but not taken."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in sorted(run_dir.iterdir()):
        like = _CHECKPOINT_LIKE.match(p.name)
        if not like:
            continue
        if _STEP_DIR.match(p.name):
            if not p.is_dir():
                out.append((p.name, "a file, not a folder"))
            continue
        out.append(
            (
                p.name,
                f"{like.group(1)!r} is not a step number (names taken: checkpoint-<step>, "
                "step_<n>, step-<n>, global_step<n>)",
            )
        )
    return out


def available_steps(run_dir: str | Path) -> list[int]:
    """The steps of the checkpoint folders under ``run_dir`` (the base model not counted)."""
    run_dir = Path(run_dir)
    return sorted(_scan(run_dir)) if run_dir.is_dir() else []


def find_checkpoints(
    run_dir: str | Path,
    base_model: str | Path | None,
    *,
    steps: list[int] | None = None,
    every: int | None = None,
    step_range: tuple[int | None, int | None] | None = None,
    include_base: bool = True,
    settle_seconds: float = 30.0,
    now: float | None = None,
    storage_options: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    cache_gb: float = 64,
) -> list[Checkpoint]:
    """The run's checkpoints, step-sorted, with step 0 (the base model) first when included.

    Selection: ``steps`` (explicit list; a missing step is an error, and 0 selects the base
    model even when ``include_base`` is False) or ``every`` (steps divisible by N) and/or
    ``step_range`` (inclusive, ``None`` = open). With ``every``, step 0 is always kept when
    ``include_base``; with ``step_range``, step 0 is kept only if the range includes 0.
    Incomplete checkpoints are returned with ``complete=False`` and a ``reason``.
    A ``run_dir`` URL (``s3://bucket/run``) is listed on object storage with
    ``storage_options``; see ``remote_checkpoints``.
    """
    from vieval_runner.objectstore import is_remote

    remote = is_remote(run_dir)
    if remote:
        from vieval_runner import remote_checkpoints

        try:
            folders = remote_checkpoints.scan(str(run_dir), storage_options, cache_dir, cache_gb)
        except remote_checkpoints.RemoteError as exc:
            raise CheckpointError(f"run_dir {exc}") from None
    else:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CheckpointError(f"run_dir {run_dir} does not exist or is not a directory")
    if steps is not None and (every is not None or step_range is not None):
        raise CheckpointError("give either an explicit steps list or every/step_range, not both")
    if every is not None and every <= 0:
        raise CheckpointError(f"every must be a positive number of steps, got {every}")
    now = time.time() if now is None else now

    if not remote:
        folders = _scan(run_dir)
    has_base = 0 in folders or bool(base_model)
    available = sorted(set(folders) | ({0} if has_base else set()))

    if steps is not None:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise CheckpointError(
                f"{run_dir}: requested step(s) {missing} not found; available steps: "
                f"{available or 'none'}"
            )
        selected = sorted(set(steps))
    else:
        selected = [s for s in available if s != 0 or include_base]
        if every is not None:
            selected = [s for s in selected if s % every == 0]
        if step_range is not None:
            lo, hi = step_range
            selected = [s for s in selected if (lo is None or s >= lo) and (hi is None or s <= hi)]

    out: list[Checkpoint] = []
    for s in selected:
        if remote and s in folders:
            out.append(_remote_checkpoint(s, folders[s], settle_seconds, now))
        elif s in folders:
            complete, reason = checkpoint_status(folders[s], settle_seconds, now)
            out.append(Checkpoint(s, folders[s], _kind(folders[s]), complete, reason))
        else:
            out.append(Checkpoint(0, Path(str(base_model)), "base", True, ""))
    return out


def _remote_checkpoint(step: int, remote, settle_seconds: float, now: float) -> Checkpoint:
    from vieval_runner import remote_checkpoints

    try:
        kind, complete, reason = remote_checkpoints.status(remote, settle_seconds, now)
        if complete:  # trainer state and configs now; the weights when the step is evaluated
            remote_checkpoints.fetch_metadata(remote)
    except remote_checkpoints.RemoteError as exc:
        raise CheckpointError(str(exc)) from None
    return Checkpoint(step, remote.local, kind, complete, reason, remote=remote)


def fetch(ckpt: Checkpoint, advance=None) -> None:
    """Download a remote checkpoint's weights into its cache folder (no-op when local);
    ``advance(n_bytes)`` reports progress."""
    if ckpt.remote is None:
        return
    from vieval_runner import remote_checkpoints

    try:
        remote_checkpoints.fetch(ckpt.remote, advance)
    except remote_checkpoints.RemoteError as exc:
        raise CheckpointError(str(exc)) from None


def evict(ckpt: Checkpoint) -> None:
    """Free a remote checkpoint's cached weights (after its step is committed)."""
    if ckpt.remote is not None:
        from vieval_runner import remote_checkpoints

        remote_checkpoints.evict(ckpt.remote)


def is_local(ckpt: Checkpoint) -> bool:
    """True when the checkpoint's weights are on local disk (always, unless remote)."""
    if ckpt.remote is None:
        return True
    return all((ckpt.path / n).is_file() for n in ckpt.remote.weight_names)


def content_digest(ckpt: Checkpoint) -> str:
    """The checkpoint's content hash: of its bytes (local) or of its objects' ETags (remote)."""
    if ckpt.remote is not None:
        from vieval_runner import remote_checkpoints

        return remote_checkpoints.content_hash(ckpt.remote)
    return checkpoint_hash(ckpt.path)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    files += [path / n for n in (_INDEX, _ADAPTER_CONFIG) if (path / n).is_file()]
    return files


def checkpoint_hash(path: str | Path) -> str:
    """Content hash (XXH3-128 hex) of a checkpoint's weights.

    Covers every ``*.safetensors`` file plus the shard index and ``adapter_config.json`` (LoRA
    rank/alpha change outputs): file names, sizes and the full bytes, read in 8 MiB chunks.
    Full hashing, not sampling, so a single flipped byte anywhere in a tensor changes the hash.
    XXH3 (not a cryptographic hash: this detects changed weights, it does not defend against
    forgery) runs at page-cache speed, several GB/s, where blake2b managed ~1.2 GB/s: a 4.4 GB
    checkpoint hashed in ~3.5 s would cost most of what batching gains on a GPU.
    """
    path = Path(path)
    files = _weight_files(path) if path.is_dir() else []
    if not files:
        raise CheckpointError(f"{path}: no weight files to hash (no *.safetensors found)")
    h = xxhash.xxh3_128()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with f.open("rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def read_trainer_state(path: str | Path) -> dict | None:
    """The checkpoint's ``trainer_state.json`` as a dict (``path``: the folder or the file).

    ``None`` when the file does not exist; malformed JSON raises ``CheckpointError`` naming it.
    """
    path = Path(path)
    file = path / _STATE if path.is_dir() else path
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: malformed trainer state ({e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: trainer state is not a JSON object")
    return state
