"""Cache entries on disk: atomic save, verified open over hard links, LRU eviction.

An entry is ``<root>/<key>/``: the safetensors chunks of a persisted ``PreparedSet`` (keys
``<index>.<tensor>``) and ``manifest.json`` (ids, prompt lengths, input sizes, tensor keys,
chunk files and sizes, bytes, created, last_used). See the package doc for the guarantees.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from vieval_runner.prepare.ram_budget import RUN_PREFIX, PreparedSet, run_folder_name

# bump when preparation's outputs change (keys, shapes, meaning): old entries then miss
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STALE_TMP_S = 3600.0  # a .tmp- folder this old belongs to a run that died while saving


class CorruptEntry(Exception):
    """A cache entry that cannot be used as it is (the message says what is wrong)."""


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (temp file + replace): readers see the old or the new."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def remove_entry(folder: Path) -> None:
    """Rename away first (atomic), then delete: a reader sees the whole entry or none."""
    doomed = folder.with_name(f".tmp-del-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(folder, doomed)
    except OSError:
        return  # already gone (another run removed it)
    shutil.rmtree(doomed, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:  # no hard links here (or across filesystems): copy instead
        shutil.copyfile(src, dst)


def save(prepared: PreparedSet, root: Path, key: str) -> Path:
    """Keep a finished, persisted set as entry ``root/key`` (atomically); its path."""
    if not prepared.persisted:
        raise ValueError("only a finished set built with persist_max_bytes can be saved")
    metas = prepared.metas()
    chunks = prepared.chunk_files
    sizes = [p.stat().st_size for p in chunks]
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = root / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for path in chunks:
            _link_or_copy(path, tmp / path.name)
        now = time.time()
        manifest = {
            "format": FORMAT_VERSION,
            "key": key,
            "ids": [m[0] for m in metas],
            "prompt_lens": [m[1] for m in metas],
            "input_sizes": [m[2] for m in metas],
            "tensor_keys": [list(m[3]) for m in metas],
            "chunk_of": [m[4] for m in metas],
            "chunks": [{"file": p.name, "bytes": n} for p, n in zip(chunks, sizes, strict=True)],
            "bytes": sum(sizes),
            "created": now,
            "last_used": now,
        }
        _write_json(tmp / MANIFEST, manifest)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run saved this key first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"unreadable {MANIFEST} ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CorruptEntry(f"{MANIFEST} is not format {FORMAT_VERSION}")
    return manifest


def _layout(manifest: dict) -> tuple[list[tuple], list[dict], list[set[str]]]:
    """``(metas, chunks, expected tensor names per chunk)`` from a manifest, checked."""
    try:
        ids, lens = manifest["ids"], manifest["prompt_lens"]
        sizes, keys, chunk_of = (
            manifest["input_sizes"],
            manifest["tensor_keys"],
            manifest["chunk_of"],
        )
        chunks = manifest["chunks"]
        if not ids or not len(ids) == len(lens) == len(sizes) == len(keys) == len(chunk_of):
            raise ValueError("per-specimen lists are empty or differ in length")
        expected: list[set[str]] = [set() for _ in chunks]
        metas = []
        for i, (sid, n, size, names, c) in enumerate(
            zip(ids, lens, sizes, keys, chunk_of, strict=True)
        ):
            if not 0 <= c < len(chunks):
                raise ValueError(f"specimen {i} names chunk {c} of {len(chunks)}")
            expected[c] |= {f"{i}.input_ids", *(f"{i}.{k}" for k in names)}
            metas.append((str(sid), int(n), None if size is None else tuple(size), tuple(names), c))
        for chunk in chunks:
            if Path(chunk["file"]).name != chunk["file"] or not isinstance(chunk["bytes"], int):
                raise ValueError(f"bad chunk entry {chunk!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"malformed {MANIFEST} ({exc!r})") from None
    return metas, chunks, expected


def _link_chunks(folder: Path, run: Path, chunks: list[dict]) -> list[Path] | None:
    """Hard links of the entry's chunks in ``run``; None where hard links are unsupported."""
    paths = []
    for chunk in chunks:
        try:
            os.link(folder / chunk["file"], run / chunk["file"])
        except FileNotFoundError:
            if not (folder / MANIFEST).is_file():
                raise  # the whole entry went (evicted): a miss, not a corrupt entry
            raise CorruptEntry(f"chunk {chunk['file']} is missing") from None
        except OSError:
            return None
        paths.append(run / chunk["file"])
    return paths


def _verify(paths: list[Path], chunks: list[dict], expected: list[set[str]]) -> None:
    from safetensors import safe_open

    for path, chunk, want in zip(paths, chunks, expected, strict=True):
        size = path.stat().st_size
        if size != chunk["bytes"]:
            raise CorruptEntry(f"{path.name} has {size} bytes, the manifest says {chunk['bytes']}")
        try:
            with safe_open(str(path), framework="pt") as f:
                got = set(f.keys())
        except Exception as exc:  # safetensors raises its own error type on a bad header
            raise CorruptEntry(f"{path.name} is unreadable ({exc})") from None
        if got != want:
            raise CorruptEntry(
                f"{path.name} holds {len(got)} tensors, not the {len(want)} the manifest names"
            )


def open_entry(folder: Path, run_root: Path) -> PreparedSet:
    """The entry as a ``PreparedSet`` over hard links in a run folder under ``run_root``
    (removed by ``close()``; the entry stays). Raises ``CorruptEntry`` when it is unusable,
    ``FileNotFoundError`` when it vanished meanwhile (evicted by another run)."""
    manifest = _read_manifest(folder)
    metas, chunks, expected = _layout(manifest)
    run_root.mkdir(parents=True, exist_ok=True)
    run = run_root / run_folder_name()
    run.mkdir()
    try:
        paths = _link_chunks(folder, run, chunks)
        if paths is None:  # read the entry in place; close() then leaves it alone
            shutil.rmtree(run, ignore_errors=True)
            run, paths = folder, [folder / c["file"] for c in chunks]
        _verify(paths, chunks, expected)
    except BaseException:
        if run != folder:
            shutil.rmtree(run, ignore_errors=True)
        raise
    prepared = PreparedSet.from_chunks(run, paths, metas, owned=run != folder)
    # a hit makes the entry the most recently used (if evicted meanwhile, links keep the data)
    with contextlib.suppress(OSError):
        _write_json(folder / MANIFEST, {**manifest, "last_used": time.time()})
    return prepared


def reap_dead_runs(root: Path) -> list[Path]:
    """Remove run folders (``vieval-prepared-<host>-<pid>-...``) under ``root`` left by runs
    on this host whose process is gone (killed before ``close()``): they hold links or spilled
    chunks nobody will read. Folders of other hosts (a shared home) or live pids stay."""
    if not root.is_dir():
        return []
    me = run_folder_name().removeprefix(RUN_PREFIX).split("-")[0]
    reaped = []
    for path in root.glob(f"{RUN_PREFIX}*"):
        host, _, rest = path.name.removeprefix(RUN_PREFIX).partition("-")
        pid = rest.partition("-")[0]
        if host != me or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        reaped.append(path)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def evict(root: Path, max_bytes: int, keep: frozenset[str] = frozenset()) -> list[Path]:
    """Remove least-recently-used entries until they total ``max_bytes`` (``keep`` exempt)."""
    if not root.is_dir():
        return []
    entries = []
    now = time.time()
    for path in root.iterdir():
        if path.name.startswith(".tmp-"):  # a save that died half-way (or a removal)
            try:
                if now - path.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
            continue
        if path.name.startswith((".", "vieval-prepared-")) or not path.is_dir():
            continue  # run folders and atomic-write temps
        try:
            manifest = _read_manifest(path)
            entries.append((float(manifest["last_used"]), int(manifest["bytes"]), path))
        except (CorruptEntry, KeyError, TypeError, ValueError):
            continue  # its next reader warns about it and removes it
    entries.sort()
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in entries:
        if total <= max_bytes:
            break
        if path.name in keep:
            continue
        remove_entry(path)
        total -= size
        removed.append(path)
    return removed
