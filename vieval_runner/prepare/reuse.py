"""Prepared processor outputs kept on local disk and reused by later runs on the same split.

``prepare_reusing`` (called by ``throughput.prepare``) looks the split up under ``split_key``,
which covers everything the processor's outputs depend on; anything changed is a miss: the
split is prepared as usual, written through to chunk files and saved as an entry (``entries``).

- Saving: the run writes its chunks into its own folder; they are hard-linked (copied where
  links fail) into ``<root>/.tmp-<uuid>/`` with a manifest, then ``os.replace``d to
  ``<root>/<key>``: a reader never sees a half-written entry, and when two runs (ranks) save
  the same key one wins and the other keeps its own copy for the rest of its run.
- A hit hard-links the entry's chunks into a run folder (no bytes copied), so an eviction by a
  concurrent run cannot pull files from under this run, and ``close()`` removes only the links.
- Run folders are named by host and pid; those of runs that were killed are removed by the
  next run on that host (``reap_dead_runs``).
- Bounded: after a save, least-recently-used entries beyond ``prepared_cache_max_gb`` go.
- A corrupt entry (bad JSON, a missing or truncated chunk, tensor keys not the manifest's) is a
  warning naming the folder, then removed and prepared again. Sizes and safetensors headers are
  checked, not every tensor byte (hashing 48 GB would cost more than preparing again).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from vieval_runner.families import FAMILIES
from vieval_runner.prepare.ram_budget import PreparedSet
from vieval_runner.prepare.reuse_entries import (
    FORMAT_VERSION,
    CorruptEntry,
    evict,
    open_entry,
    reap_dead_runs,
    remove_entry,
    save,
)
from vieval_runner.records import Specimen

__all__ = [
    "CorruptEntry",
    "cache_root",
    "evict",
    "open_entry",
    "prepare_reusing",
    "processor_source",
    "save",
    "split_key",
]

log = logging.getLogger("vieval")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_NOT_PROCESSOR = {"generation_config.json", "trainer_state.json", "model.safetensors.index.json"}


def cache_root(configured: str | None = None) -> Path:
    """``configured``, else ``$VIEVAL_CACHE_DIR/prepared``, ``$XDG_CACHE_HOME/vieval/prepared``
    or ``~/.cache/vieval/prepared`` (read when called, so tests can redirect it)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("VIEVAL_CACHE_DIR"):
        return Path(os.environ["VIEVAL_CACHE_DIR"]).expanduser() / "prepared"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vieval" / "prepared"


def processor_source(loaded) -> Path | None:
    """The local folder the loaded processor was read from, or None when unknown."""
    tokenizer = getattr(loaded.processor, "tokenizer", None)
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    if name and Path(name).is_dir():
        return Path(name)
    # a hub id: the offline snapshot the base model was resolved to holds its processor files
    if name and name == str(loaded.base_model) and loaded.base_weights_dir is not None:
        return Path(loaded.base_weights_dir)
    return None


def _image_identity(specimen: Specimen) -> str | None:
    if specimen.image_bytes is not None:
        return "bytes:" + xxhash.xxh3_128_hexdigest(specimen.image_bytes)
    if specimen.image_path is None:
        return None
    try:
        st = os.stat(specimen.image_path)
    except OSError:  # preparing will name the missing file; nothing to key on
        return None
    return f"file:{os.path.abspath(specimen.image_path)}:{st.st_size}:{st.st_mtime_ns}"


def split_key(
    loaded,
    specimens: Sequence[Specimen],
    template: str | None = None,
    system_prompt: str | None = None,
    pixel_dtype=None,
) -> str | None:
    """XXH3-128 of what the prepared split depends on, or None (do not cache) when the
    processor's folder or an image's identity is unknown, or the split is empty.

    Covers: ``FORMAT_VERSION``, the package/transformers/torch/PIL versions, the family and its
    facts, the processor folder's files (name, size, bytes; weights excluded), the tokenizer
    length (tokens added in memory), template, system prompt, the pixel dtype, and per specimen
    its id, task, prompt and image (path + size + mtime_ns, or a hash of its bytes).
    """
    import PIL
    import torch
    import transformers

    from vieval_runner.version import __version__

    source = processor_source(loaded)
    if source is None or not specimens:
        return None
    h = xxhash.xxh3_128()

    def put(*parts: object) -> None:
        for part in parts:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
            h.update(b"\0")

    facts = FAMILIES[loaded.family]
    tokenizer = getattr(loaded.processor, "tokenizer", None)
    versions = (__version__, transformers.__version__, torch.__version__, PIL.__version__)
    put(FORMAT_VERSION, *versions, loaded.family, facts, template, system_prompt)
    put(str(pixel_dtype) if pixel_dtype is not None else None)
    put(len(tokenizer) if tokenizer is not None else None)
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _NOT_PROCESSOR:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        put(path.name, path.stat().st_size)
        h.update(path.read_bytes())
    for specimen in specimens:
        image = _image_identity(specimen)
        if image is None:
            return None
        put(specimen.specimen_id, specimen.task, specimen.prompt, image)
    return h.hexdigest()


def prepare_reusing(
    loaded,
    specimens: Sequence[Specimen],
    config,
    cancel=None,
    on_first=None,
    background_save: bool = False,
    pixel_dtype=None,
) -> tuple[PreparedSet, str]:
    """The split's prepared inputs, reused from the cache or prepared (and saved), plus the
    one log line saying which. ``config``: the run's ``Config``; ``cancel``, ``on_first``:
    see ``prepare`` (``on_first`` is not called when the inputs are reused); ``pixel_dtype``:
    see ``prepare`` (part of the key).

    ``background_save``: return as soon as the split is prepared; the chunk writes finish and
    the entry is saved on a background thread (``PreparedSet.saving``; a second log line says
    how it went), so a run's first batch does not wait for gigabytes of pixel values to reach
    the disk. The set's ``close()`` waits for it."""
    from vieval_runner.prepare.inputs import prepare

    t0 = time.perf_counter()
    root = cache_root(config.prepared_cache_dir)
    max_bytes = int(config.prepared_cache_max_gb * 2**30)
    run_root = Path(config.cache_dir) if config.cache_dir else root  # the run's own chunks
    unusable = None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a read-only home: the run goes on without the cache
        log.warning("%s: prepared-inputs cache unusable (%s); preparing without it", root, exc)
        unusable = f"{root} is unusable: {exc}"
    key = None
    if unusable is None:
        reap_dead_runs(run_root)  # what killed runs left behind on this host
        key = split_key(
            loaded, specimens, config.prompt_template, config.system_prompt, pixel_dtype
        )
    if key is not None and (root / key).is_dir():
        entry = root / key
        try:
            prepared = open_entry(entry, run_root)
            if prepared.specimen_ids != [s.specimen_id for s in specimens]:
                prepared.close()
                raise CorruptEntry("its specimen ids are not this split's")
            # read once into RAM (up to the budget), not once per batch and checkpoint
            held = prepared.hold_in_memory(int(config.prepare_cache_ram_mb * 2**20))
            took = time.perf_counter() - t0
            return (
                prepared,
                f"prepared inputs reused from {entry} ({len(prepared)} specimens, {held} in "
                f"memory, {took:.2f}s)",
            )
        except CorruptEntry as exc:
            log.warning(
                "%s: unusable prepared-inputs entry (%s): removed, preparing again", entry, exc
            )
            remove_entry(entry)
        except FileNotFoundError:
            pass  # evicted by another run meanwhile: a miss
    budget = int(config.prepare_cache_ram_mb * 2**20)
    persist = None if key is None else max_bytes
    into = PreparedSet(
        budget,
        run_root if key is not None else config.cache_dir,
        persist_max_bytes=persist,
        expected_count=len(specimens),
    )
    prepared = prepare(
        loaded,
        specimens,
        config.prompt_template,
        config.system_prompt,
        workers=config.preprocess_workers,
        into=into,
        cancel=cancel,
        on_first=on_first,
        wait_writes=not background_save,
        pixel_dtype=pixel_dtype,
    )
    took = time.perf_counter() - t0
    head = f"prepared {len(prepared)} specimens in {took:.2f}s"
    if unusable is not None or key is None:
        reason = unusable or "no stable identity for the processor folder or an image"
        return prepared, f"{head} ({prepared.on_disk} on disk; not saved for reuse: {reason})"
    if background_save and not prepared.persist_dropped:
        prepared.saving = _SAVER.submit(_save_later, prepared, root, key, max_bytes)
        return prepared, f"{head} (saving for reuse in the background: {root / key})"
    return prepared, f"{head} ({_keep(prepared, root, key, max_bytes)})"


# one thread for the whole process: saves are rare, and one at a time keeps eviction simple
_SAVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vieval-prepared-save")


def _keep(prepared: PreparedSet, root: Path, key: str, max_bytes: int) -> str:
    """Save a prepared persisting set as entry ``root/key`` once its chunk writes are done;
    what happened, for the log."""
    prepared.wait_for_writes()
    if prepared.persist_error is not None:
        reason = f"writing failed: {prepared.persist_error}"
    elif not prepared.persisted:
        reason = "larger than prepared_cache_max_gb"
    else:
        try:
            entry = save(prepared, root, key)
            evict(root, max_bytes, keep=frozenset({key}))
            return f"saved for reuse: {entry}"
        except OSError as exc:  # e.g. a full disk: this run goes on with its own copy
            log.warning("%s: could not save prepared inputs for reuse (%s)", root / key, exc)
            reason = f"saving failed: {exc}"
    return f"{prepared.on_disk} on disk; not saved for reuse: {reason}"


def _save_later(prepared: PreparedSet, root: Path, key: str, max_bytes: int) -> str:
    outcome = _keep(prepared, root, key, max_bytes)
    log.info("prepared inputs %s", outcome)
    return outcome
