"""One step, the same for one process, for every rank of a launch and for the training
callback: make the checkpoint resident -> generate and parse -> score -> commit, and record
a failure. ``run``, ``distributed`` and ``callback`` drive it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner import store
from vieval_runner.config import Config
from vieval_runner.pipeline import overlap, results, tracking
from vieval_runner.pipeline.adapter_base import check_adapter_base
from vieval_runner.pipeline.session import (
    Session,
    attach_model,
    start_specimens,
    store_options,
    store_training_log,
    wait_for_specimens,
)
from vieval_runner.records import Prediction

log = logging.getLogger("vieval")


@dataclass
class RunOutcome:
    """What a run did: evaluated, skipped (already stored) and failed steps."""

    store: str
    run_id: str
    evaluated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    incomplete: list[int] = field(default_factory=list)  # still being written: left for later
    # where the time went (``vieval run``; empty elsewhere): wall_s, prepare_s, load_s
    # (weights), generate_s, commit_s (overlapped with the next step), samples
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return 3 if self.failed else 0


def select_checkpoints(config: Config) -> list[ckpts.Checkpoint]:
    return ckpts.find_checkpoints(
        config.run_dir,
        config.base_model,
        steps=config.steps,
        every=config.every,
        step_range=tuple(config.step_range) if config.step_range else None,
        include_base=config.include_base,
        settle_seconds=config.watch.settle_seconds,
        storage_options=config.storage_options or None,
        cache_dir=config.checkpoint_cache_dir,
        cache_gb=config.checkpoint_cache_gb,
    )


def ensure_model(session: Session, console: Console, first: ckpts.Checkpoint | None = None) -> None:
    """Load the base model once (the split is prepared meanwhile, from its processor alone),
    start reading ``first``'s weights, and install the caches."""
    if session.loaded is not None:
        return
    from transformers.utils import logging as hf_logging

    from vieval_runner.model import loading as models

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    config = session.config
    console.print(
        f"[bold]model[/] {config.base_model} (device={config.device}, dtype={config.dtype})"
    )
    loading, session.processor_loading = session.processor_loading, None
    # family + processor, no weights (``run`` starts loading it while the split is read)
    head = loading.result() if loading else models.load_base_processor(config.base_model)
    preparing: Future | None = None
    if session.prepared is not None:
        loaded = models.load_base(config.base_model, config.device, config.dtype, head)
    else:
        # once per run, and while the weights load: the split only needs the processor
        overlap.state(session)  # created here: the preparing thread must not race for it
        cancel = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix="vieval-prepare-split")
        preparing = pool.submit(overlap.prepare_inputs, session, head, cancel)
        try:
            loaded = models.load_base(config.base_model, config.device, config.dtype, head)
        except BaseException:
            cancel.set()  # a failed load does not wait for the whole split
            raise
        finally:
            pool.shutdown(wait=False)
    attach_model(session, loaded)
    console.print(
        f"      family {loaded.family}, output format {session.output_format}, "
        f"device {loaded.device}, dtype {str(loaded.dtype).removeprefix('torch.')}"
    )
    overlap.start_prefetch(session, first, first=True)  # read while the split is prepared
    if preparing is not None:
        overlap.check_decoding_early(session, preparing)
        preparing.result()  # its errors (e.g. an unreadable image) surface here
    start_specimens(session)
    overlap.install_caches(session)  # the vision-embedding cache


def say_processor_once(session: Session, ckpt: ckpts.Checkpoint, console: Console) -> None:
    """Inputs are prepared once with the base model's processor; say so once when a
    checkpoint carries no processor files of its own (the usual Trainer output)."""
    if session.processor_notice_given or ckpt.kind == "base":
        return
    names = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    if not any((ckpt.path / name).is_file() for name in names):
        message = f"{ckpt.path.name} has no processor files: using the base model's processor"
        console.print(f"[dim]{message} (said once)[/]")
        log.info(message)
        session.processor_notice_given = True


def make_resident(
    session: Session,
    ckpt: ckpts.Checkpoint,
    following: ckpts.Checkpoint | None,
    console: Console,
) -> dict[str, float]:
    """Swap ``ckpt`` in (base, full weights from the prefetched tensors, or a LoRA adapter)
    and start reading ``following``'s weights; returns ``{"load_s": ...}``."""
    from vieval_runner.model import loading

    ensure_model(session, console, first=ckpt)
    t0 = time.perf_counter()
    try:
        prefetched = overlap.take_prefetched(session, ckpt)  # waits for the read
    finally:  # even when this checkpoint is bad, the next one is read meanwhile
        overlap.start_prefetch(session, following)
    check_adapter_base(session, ckpt, console)  # trained on this base? (a warning or a failure)
    loading.apply_checkpoint(session.loaded, ckpt, prefetched)
    timings = {"load_s": time.perf_counter() - t0}
    say_processor_once(session, ckpt, console)
    return timings


def finish_step(
    session: Session,
    ckpt: ckpts.Checkpoint,
    digest: str,
    generated: list,
    timings: dict[str, float],
    started: datetime,
    row_extra: dict | None = None,
    predictions: list[Prediction] | None = None,
) -> dict:
    """Parse (unless ``predictions`` are given), score and commit one step from ``generated``
    (aligned with ``session.specimens``); shared by one-process runs and rank 0 of a
    distributed run. With a committer on the session (``overlap: true``) the commit runs in
    the background and the returned row is committed later (errors: a failed step)."""
    config = session.config
    session.step_timings.append(timings)
    if predictions is None:
        t0 = time.perf_counter()
        predictions = [
            results.parse_one(session, specimen, out)
            for specimen, out in zip(session.specimens, generated, strict=True)
        ]
        timings["parse_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    aggregates = results.score_predictions(
        config, session.specimens, predictions, device=str(session.loaded.device)
    )
    timings["score_s"] = time.perf_counter() - t0

    row = results.evaluation_row(session, ckpt, digest, "ok", None)
    row.update({k: v for k, v in aggregates.items() if k in store.AGGREGATE_METRICS})
    row["ci95"] = aggregates.get("ci95")
    frames = results.frame_columns(
        session.specimens, predictions, session.output_format, session.coords
    )
    row.update(frames)
    if frames.get("coords_advice"):
        log.warning("step %s: %s", ckpt.step, frames["coords_advice"])
    row["started_at"], row["finished_at"] = started, datetime.now(UTC)
    row.update(row_extra or {})
    row["timings"] = json.dumps(timings)  # the commit's own time goes to the log only
    rows = results.prediction_rows(config.effective_run_id, ckpt.step, row["eval_id"], predictions)

    def commit() -> None:
        t0 = time.perf_counter()
        wait_for_specimens(session)  # readers find every specimen of a committed step
        store.commit_step(config.store, row, rows, **store_options(config))
        ckpts.evict(ckpt)  # a remote checkpoint's downloaded weights: the step is safe
        timings["commit_s"] = time.perf_counter() - t0
        tracking.after_commit(session, ckpt.step, predictions, aggregates)  # never raises
        log.info("step %s committed: %s", ckpt.step, json.dumps(timings))
        try:
            store_training_log(session, ckpt)
        except store.StoreFull:
            raise
        except Exception as exc:  # the step is committed: a bad trainer state must not undo it
            log.warning("training log not stored after step %s: %s", ckpt.step, exc)

    committer = session.overlap.committer
    if committer is not None:
        committer.submit(ckpt.step, commit)  # waits for the previous step's commit first
    else:
        commit()
    return row


def record_failure(
    session: Session,
    ckpt: ckpts.Checkpoint,
    digest: str,
    message: str,
    device: str | None = None,
    exc: BaseException | None = None,
) -> None:
    """Store a failed evaluation of ``ckpt``; the log file gets the traceback (``exc``) and
    says it even when the store cannot take the row."""
    log.error("step %s (%s) failed: %s", ckpt.step, ckpt.path, message, exc_info=exc)
    row = results.evaluation_row(session, ckpt, digest, "failed", message)
    if device is not None:
        row["device"] = device
    try:
        store.record_failed_evaluation(session.config.store, row, **store_options(session.config))
    except store.StoreFull:
        raise
    except Exception:  # e.g. the disk is full: the console and log still say it
        log.exception("could not record the failure of step %s in the store", ckpt.step)
