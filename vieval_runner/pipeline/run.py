"""The one loop: checkpoints -> data -> models -> generation -> parsing -> scoring -> store.

``run(config)`` evaluates every selected checkpoint once and returns an exit status
(0 all good, 3 some checkpoints failed). ``watch`` (in ``watch.py``) calls ``evaluate_pending``
repeatedly as checkpoints land.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vieval_runner import checkpoints as ckpts
from vieval_runner import store
from vieval_runner.config import Config
from vieval_runner.pipeline import overlap as throughput
from vieval_runner.pipeline import results, resume
from vieval_runner.pipeline.session import (
    Session,
    attach_model,
    note_checkpoints,
    open_session,
    start_specimens,
    store_training_log,
    wait_for_specimens,
)
from vieval_runner.records import DataError, Prediction

log = logging.getLogger("vieval")


@dataclass
class RunOutcome:
    """What a run did: evaluated, skipped (already stored) and failed steps."""

    store: str
    run_id: str
    evaluated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    # where the time went (``vieval run``; empty elsewhere): wall_s, prepare_s, load_s
    # (weights), generate_s, commit_s (overlapped with the next step), samples
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return 3 if self.failed else 0


def _ensure_model(
    session: Session, console: Console, first: ckpts.Checkpoint | None = None
) -> None:
    if session.loaded is not None:
        return
    from transformers.utils import logging as hf_logging

    from vieval_runner.model import loading as models
    from vieval_runner.pipeline import overlap as throughput

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
        throughput.state(session)  # created here: the preparing thread must not race for it
        cancel = threading.Event()
        pool = ThreadPoolExecutor(1, thread_name_prefix="vieval-prepare-split")
        preparing = pool.submit(throughput.prepare_inputs, session, head, cancel)
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
    throughput.start_prefetch(session, first, first=True)  # read while the split is prepared
    if preparing is not None:
        throughput.check_decoding_early(session, preparing)
        preparing.result()  # its errors (e.g. an unreadable image) surface here
    start_specimens(session)
    throughput.install_caches(session)  # the vision-embedding cache


def select_checkpoints(config: Config) -> list[ckpts.Checkpoint]:
    return ckpts.find_checkpoints(
        config.run_dir,
        config.base_model,
        steps=config.steps,
        every=config.every,
        step_range=tuple(config.step_range) if config.step_range else None,
        include_base=config.include_base,
        settle_seconds=config.watch.settle_seconds,
    )


def evaluate_checkpoints(
    session: Session,
    checkpoints: list[ckpts.Checkpoint],
    console: Console,
    outcome: RunOutcome,
    *,
    explicit: bool = False,
) -> None:
    """Evaluate each complete checkpoint not already stored; failures are recorded, not raised."""
    config = session.config
    note_checkpoints(session, checkpoints)
    todo = resume.plan_checkpoints(
        config, checkpoints, console, outcome, explicit=explicit, lazy=True
    )
    if not todo:
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        overall = progress.add_task("checkpoints", total=len(todo))
        by_step = {ckpt.step: (ckpt, digest) for ckpt, digest in todo}

        def failed(step: int, exc: BaseException) -> None:
            if isinstance(exc, store.StoreFull):
                raise exc  # nothing more fits: stop the run (the CLI says where and how much)
            ckpt, digest = by_step[step]
            message = f"{type(exc).__name__}: {exc}"
            outcome.failed[step] = message
            if step in outcome.evaluated:  # its commit failed after generation went well
                outcome.evaluated.remove(step)
            log.error("step %s (%s) failed", step, ckpt.path, exc_info=exc)
            progress.console.print(f"[red]step {step} failed[/]: {message}")
            try:
                store.record_failed_evaluation(
                    config.store, results.evaluation_row(session, ckpt, digest, "failed", message)
                )
            except store.StoreFull:
                raise
            except Exception:  # the console and log still say it
                log.exception("could not record the failure of step %s in the store", step)

        st = throughput.state(session)
        st.committer = throughput.Committer(failed) if config.overlap else None
        try:
            for i, (ckpt, digest) in enumerate(todo):
                batches = progress.add_task(f"  step {ckpt.step}", total=len(session.specimens))
                following = todo[i + 1][0] if i + 1 < len(todo) else None
                try:
                    evaluate_one(
                        session,
                        ckpt,
                        digest,
                        console,
                        lambda n, b=batches: progress.advance(b, n),
                        following=following,
                    )
                    outcome.evaluated.append(ckpt.step)
                except (DataError, store.StoreFull):
                    raise  # a bad split (an image that does not decode), a full disk: no step can run
                except Exception as exc:  # one bad checkpoint must not stop the run
                    failed(ckpt.step, exc)
                progress.remove_task(batches)
                progress.advance(overall)
        finally:  # the run returns only after its last commit
            if st.committer is not None:
                st.committer.close()
                st.committer = None


def evaluate_one(
    session: Session,
    ckpt: ckpts.Checkpoint,
    digest: str,
    console: Console,
    advance,
    following: ckpts.Checkpoint | None = None,
) -> None:
    """Swap one checkpoint in, generate, parse, score and commit the step.

    ``following``: the checkpoint evaluated next; its weights are read in the background
    while this one generates (``prefetch: true``).
    """
    from vieval_runner.model import loading as models

    started = datetime.now(UTC)
    _ensure_model(session, console, first=ckpt)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        prefetched = throughput.take_prefetched(session, ckpt)  # waits for the read
    finally:  # even when this checkpoint is bad, the next one is read meanwhile
        throughput.start_prefetch(session, following)
    # base, full weights (from the prefetched tensors if any) or LoRA adapter
    models.apply_checkpoint(session.loaded, ckpt, prefetched)
    timings["load_s"] = time.perf_counter() - t0
    _say_processor_once(session, ckpt, console)
    evaluate_resident(session, ckpt, digest, advance, timings, started)


def _say_processor_once(session: Session, ckpt: ckpts.Checkpoint, console: Console) -> None:
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


def evaluate_resident(
    session: Session, ckpt: ckpts.Checkpoint, digest: str, advance, timings=None, started=None
) -> dict:
    """Generate with the weights now resident, parse, score and commit the step.

    Used by ``evaluate_one`` after a swap and by ``VievalCallback`` with the live training
    model. Returns the evaluation row that was committed.
    """
    timings = {} if timings is None else timings
    started = started or datetime.now(UTC)
    if session.prepared is None:
        throughput.prepare(session)
    # parsing runs on a helper thread while the next batch generates
    generated, predictions = throughput.generate_and_parse(session, advance, timings)
    return finish_step(session, ckpt, digest, generated, timings, started, predictions=predictions)


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
    row["started_at"], row["finished_at"] = started, datetime.now(UTC)
    row.update(row_extra or {})
    row["timings"] = json.dumps(timings)  # the commit's own time goes to the log only
    rows = results.prediction_rows(config.effective_run_id, ckpt.step, row["eval_id"], predictions)

    def commit() -> None:
        t0 = time.perf_counter()
        wait_for_specimens(session)  # readers find every specimen of a committed step
        store.commit_step(config.store, row, rows)
        timings["commit_s"] = time.perf_counter() - t0
        log.info("step %s committed: %s", ckpt.step, json.dumps(timings))
        try:
            store_training_log(session, ckpt)
        except store.StoreFull:
            raise
        except Exception as exc:  # the step is committed: a bad trainer state must not undo it
            log.warning("training log not stored after step %s: %s", ckpt.step, exc)

    committer = getattr(session.throughput, "committer", None)
    if committer is not None:
        committer.submit(ckpt.step, commit)  # waits for the previous step's commit first
    else:
        commit()
    return row


def run(config: Config, console: Console | None = None) -> RunOutcome:
    """Evaluate the configured checkpoints once (resume-aware) and return what happened."""
    console = console or Console()
    from vieval_runner.pipeline import distributed

    if distributed.world_size() > 1:  # launched by accelerate launch / torchrun
        return distributed.run(config, console)
    started = time.perf_counter()
    outcome = RunOutcome(store=config.store, run_id=config.effective_run_id)
    checkpoints = select_checkpoints(config)  # cheap checks first: nothing written on bad input
    if not checkpoints:
        raise ckpts.CheckpointError(
            f"{config.run_dir}: no checkpoints found (and include_base is false)"
        )
    from vieval_runner.model import loading as models

    # the processor (no weights) loads while the split is read and the store created
    processor = ThreadPoolExecutor(1, thread_name_prefix="vieval-processor")
    try:
        loading = processor.submit(models.load_base_processor, config.base_model)
        session = open_session(config, console, background=True)
    finally:
        processor.shutdown(wait=False)
    session.processor_loading = loading
    console.print(
        f"[bold]run[/]   {config.effective_run_id}: steps {[c.step for c in checkpoints]} from {config.run_dir}"
    )
    evaluate_checkpoints(session, checkpoints, console, outcome, explicit=config.steps is not None)
    wait_for_specimens(session)  # even when every step was skipped or failed
    throughput.wait_for_saving(session)  # the prepared inputs, kept for later runs
    outcome.timings = _time_spent(session, outcome, time.perf_counter() - started)
    return outcome


def _time_spent(session: Session, outcome: RunOutcome, wall_s: float) -> dict[str, float]:
    spent = {"wall_s": wall_s}
    for key in ("load_s", "generate_s", "commit_s"):
        spent[key] = sum(t.get(key, 0.0) for t in session.step_timings)
    spent["samples"] = len(session.specimens) * len(outcome.evaluated)
    prepare_s = getattr(session.throughput, "prepare_s", None)
    if prepare_s is not None:
        spent["prepare_s"] = prepare_s
        spent["prepare_reused"] = float(session.throughput.prepare_reused)
    return spent
