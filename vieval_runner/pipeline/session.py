"""What one run keeps: the split, the loaded model, the prepared inputs and the store's state.

``open_session`` loads and validates the split and creates the store; the specimens table is
written on a helper thread (``start_specimens``) once preparing the split no longer needs both
cores. ``store_training_log`` keeps the run's Trainer log in the store.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner import data as data_mod
from vieval_runner import store
from vieval_runner.config import Config
from vieval_runner.pipeline.overlap import State
from vieval_runner.records import LoadedModel, Specimen

if TYPE_CHECKING:
    from vieval_runner.pipeline.tracking import Tracking

log = logging.getLogger("vieval")

_WRITER = ThreadPoolExecutor(1, thread_name_prefix="vieval-specimens")


@dataclass
class Session:
    """Everything loaded once per run and reused for every checkpoint."""

    config: Config
    specimens: list[Specimen]
    dataset_version: str
    loaded: LoadedModel | None = None  # loaded lazily (nothing to do -> no model load)
    prepared: list | None = None
    output_format: str | None = None
    coords: str | None = None  # plain_xyxy convention: config, else the family's default
    processor_notice_given: bool = False
    specimens_written: Future | None = None  # the background specimens-table write
    processor_loading: Future | None = None  # models.load_base_processor, started by ``run``
    open_ended: bool = False  # more checkpoints may come later (``watch``, the callback)
    # that write, until it starts (``start_specimens``)
    specimens_pending: Callable[[], None] | None = None
    overlap: State = field(default_factory=State)  # vision cache, prefetch, committer, memo
    step_timings: list[dict] = field(default_factory=list)  # each step's (commit_s filled late)
    newest_checkpoint: ckpts.Checkpoint | None = None  # its trainer state: the longest log
    training_log_until: int | None = None  # highest stored training-log step (None: unread)
    training_logs_read: set = field(default_factory=set)  # trainer states already read
    warnings: dict[int, list[str]] = field(default_factory=dict)  # step -> stored with its row
    tracking: Tracking | None = None  # the report_to trackers (None: none yet)


def open_session(
    config: Config, console: Console, *, write: bool = True, background: bool = False
) -> Session:
    """Load and validate the split, create the store and write the specimens table
    (``write=False``: load only, as ranks other than 0 of a distributed run do;
    ``background``: write the specimens on a thread, see ``wait_for_specimens``)."""
    data_cfg = config.data
    console.print(f"[bold]data[/]  {data_cfg.path} ({data_cfg.format})")
    loaded = data_mod.load_specimens(
        data_cfg.path,
        data_cfg.format,
        config.task,
        strict=data_cfg.strict,
        images_root=data_cfg.images_root,
        columns=data_cfg.columns,
        limit=data_cfg.limit,
        max_image_pixels=data_cfg.max_image_pixels,
    )
    if loaded.skipped:
        console.print(f"[yellow]skipped {len(loaded.skipped)} bad rows[/] (data.strict=false):")
        for bad in loaded.skipped[:20]:
            console.print(f"  {bad.file} row {bad.row}: {bad.problem}")
        if len(loaded.skipped) > 20:
            console.print(f"  ... and {len(loaded.skipped) - 20} more (see the log file)")
        for bad in loaded.skipped:
            log.warning("skipped %s row %s: %s", bad.file, bad.row, bad.problem)
    console.print(
        f"      {len(loaded.specimens)} specimens, dataset version {loaded.dataset_version[:12]}"
    )
    report_data_warnings(loaded.warnings, console)
    session = Session(config, loaded.specimens, loaded.dataset_version)
    if write:
        options = config.storage_options or None
        store.create_store(config.store, storage_options=options)
        args = (config.store, loaded.specimens, loaded.dataset_version)
        kwargs = {
            "thumb_px": config.thumb_px,
            "warnings": loaded.warnings,
            "storage_options": options,
        }
        if background:  # on a helper thread once the split is prepared; commits wait for it
            session.specimens_pending = functools.partial(store.write_specimens, *args, **kwargs)
        else:
            store.write_specimens(*args, **kwargs)
    return session


def _warning_kind(message: str) -> str:
    """What a loader warning did ("kept one", "skipped", ...): the text after its last colon."""
    return message.rsplit(": ", 1)[-1].strip() or message


def report_data_warnings(warnings: list[str], console: Console) -> None:
    """Every change the loader made to the ground truth: a count per kind (with one example)
    on the console, each warning in full in the log file."""
    if not warnings:
        return
    kinds: dict[str, list[str]] = {}
    for message in warnings:
        kinds.setdefault(_warning_kind(message), []).append(message)
        log.warning("data: %s", message)
    console.print(
        f"[yellow]{len(warnings)} data warning(s)[/]: the loader changed the ground truth "
        "(each one in the log file and stored with the dataset version):"
    )
    for kind, messages in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        console.print(f"  {len(messages)} x {kind}, e.g. {messages[0]}", soft_wrap=True)


def store_options(config: Config) -> dict:
    """``storage_options=`` for store calls when the config sets any (else no keyword)."""
    return {"storage_options": config.storage_options} if config.storage_options else {}


def start_specimens(session: Session) -> None:
    """Start the deferred specimens-table write (thumbnails, one commit) on its thread.

    Deferred until the split is prepared: preparing and loading the weights already take
    both cores of a small machine, while generation leaves one free (``cpu_threads``)."""
    if session.specimens_pending is not None:
        session.specimens_written = _WRITER.submit(session.specimens_pending)
        session.specimens_pending = None


def wait_for_specimens(session: Session) -> None:
    """Block until the specimens table is written (raises what writing it raised)."""
    start_specimens(session)  # nothing evaluated (every step skipped): write them now
    if session.specimens_written is not None:
        session.specimens_written.result()


def attach_model(session: Session, loaded) -> None:
    """Make ``loaded`` the session's model; output format and coords default from its family."""
    from vieval_runner.families import FAMILIES, default_coords

    facts = FAMILIES[loaded.family]
    session.loaded = loaded
    session.output_format = session.config.output_format or facts["output_format"]
    session.coords = default_coords(loaded.family, session.config.coords)


def note_checkpoints(session: Session, checkpoints: list[ckpts.Checkpoint]) -> None:
    """Remember the newest of ``checkpoints``: its trainer state holds the longest log."""
    for ckpt in checkpoints:
        newest = session.newest_checkpoint
        if ckpt.kind != "base" and (newest is None or ckpt.step > newest.step):
            session.newest_checkpoint = ckpt


def store_training_log(session: Session, ckpt: ckpts.Checkpoint) -> None:
    """Store the run's Trainer log history when it reaches further than the stored one.

    A checkpoint's ``trainer_state.json`` holds the whole history up to it, so the newest
    checkpoint the run knows of is read (once per run, not once per step), and evaluating an
    older checkpoint again cannot cut the stored curve short.
    """
    found = [c for c in (session.newest_checkpoint, ckpt) if c is not None and c.kind != "base"]
    source = max(found, key=lambda c: c.step, default=None)
    if source is None or source.path in session.training_logs_read or not source.path.is_dir():
        return
    session.training_logs_read.add(source.path)
    history = (ckpts.read_trainer_state(source.path) or {}).get("log_history")
    if not history:
        return
    steps = [e.get("step") for e in history if isinstance(e, dict)]
    last = max((s for s in steps if isinstance(s, int)), default=-1)
    config = session.config
    if session.training_log_until is None:
        session.training_log_until = store.training_log_last_step(
            config.store, config.effective_run_id, storage_options=config.storage_options or None
        )
    if last <= session.training_log_until:
        return
    store.write_training_log(
        config.store,
        config.effective_run_id,
        history,
        storage_options=config.storage_options or None,
    )
    session.training_log_until = last
