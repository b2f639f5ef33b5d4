"""The one loop: checkpoints -> data -> models -> generation -> parsing -> scoring -> store.

``run(config)`` evaluates every selected checkpoint once and returns an exit status
(0 all good, 3 some checkpoints failed). ``watch`` (in ``watch.py``) calls ``evaluate_pending``
repeatedly as checkpoints land.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import Progress

from vieval_runner import checkpoints as ckpts
from vieval_runner import store
from vieval_runner.config import Config
from vieval_runner.pipeline import overlap, resume, step, tracking
from vieval_runner.pipeline.preflight import empty_selection
from vieval_runner.pipeline.progress import progress_bar
from vieval_runner.pipeline.session import (
    Session,
    note_checkpoints,
    open_session,
    wait_for_specimens,
)
from vieval_runner.records import CheckpointError, DataError

log = logging.getLogger("vieval")


def evaluate_checkpoints(
    session: Session,
    checkpoints: list[ckpts.Checkpoint],
    console: Console,
    outcome: step.RunOutcome,
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
    with progress_bar(console) as progress:
        overall = progress.add_task("checkpoints", total=len(todo))
        by_step = {ckpt.step: (ckpt, digest) for ckpt, digest in todo}

        def failed(at_step: int, exc: BaseException) -> None:
            if isinstance(exc, store.StoreFull):
                raise exc  # nothing more fits: stop the run (the CLI says where and how much)
            ckpt, digest = by_step[at_step]
            message = f"{type(exc).__name__}: {exc}"
            outcome.failed[at_step] = message
            if at_step in outcome.evaluated:  # its commit failed after generation went well
                outcome.evaluated.remove(at_step)
            ckpts.evict(ckpt)  # a remote checkpoint's downloaded weights
            progress.console.print(f"[red]step {at_step} failed[/]: {message}")
            step.record_failure(session, ckpt, digest, message, exc=exc)

        st = overlap.state(session)
        st.committer = overlap.Committer(failed) if config.overlap else None
        try:
            for i, (ckpt, digest) in enumerate(todo):
                batches = progress.add_task(f"  step {ckpt.step}", total=len(session.specimens))
                following = todo[i + 1][0] if i + 1 < len(todo) else None
                try:
                    _download(ckpt, progress)
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


def _download(ckpt: ckpts.Checkpoint, progress: Progress) -> None:
    """Download a remote checkpoint (once, into the bounded cache) with a progress bar."""
    if ckpt.remote is None or ckpts.is_local(ckpt):
        return
    task = progress.add_task(f"  download {ckpt.location}", total=ckpt.remote.download_bytes)
    try:
        ckpts.fetch(ckpt, lambda n: progress.advance(task, n))
    finally:
        progress.remove_task(task)
    log.info("downloaded %s (%d bytes)", ckpt.location, ckpt.remote.download_bytes)


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
    started = datetime.now(UTC)
    timings = step.make_resident(session, ckpt, following, console)
    evaluate_resident(session, ckpt, digest, advance, timings, started)


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
        overlap.prepare(session)
    # parsing runs on a helper thread while the next batch generates
    generated, predictions = overlap.generate_and_parse(session, advance, timings)
    return step.finish_step(
        session, ckpt, digest, generated, timings, started, predictions=predictions
    )


def run(config: Config, console: Console | None = None) -> step.RunOutcome:
    """Evaluate the configured checkpoints once (resume-aware) and return what happened."""
    console = console or Console()
    from vieval_runner.pipeline import distributed
    from vieval_runner.pipeline.ranks import world_size

    if world_size() > 1:  # launched by accelerate launch / torchrun
        return distributed.run(config, console)
    started = time.perf_counter()
    outcome = step.RunOutcome(store=config.store, run_id=config.effective_run_id)
    checkpoints = step.select_checkpoints(
        config
    )  # cheap checks first: nothing written on bad input
    if not checkpoints:
        raise CheckpointError(empty_selection(config))
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
    tracking.close(session, console)  # the trackers have every step (warnings, not errors)
    overlap.wait_for_saving(session)  # the prepared inputs, kept for later runs
    outcome.timings = _time_spent(session, outcome, time.perf_counter() - started)
    return outcome


def _time_spent(session: Session, outcome: step.RunOutcome, wall_s: float) -> dict[str, float]:
    spent = {"wall_s": wall_s}
    for key in ("load_s", "generate_s", "commit_s"):
        spent[key] = sum(t.get(key, 0.0) for t in session.step_timings)
    spent["samples"] = len(session.specimens) * len(outcome.evaluated)
    prepare_s = session.overlap.prepare_s
    if prepare_s is not None:
        spent["prepare_s"] = prepare_s
        spent["prepare_reused"] = float(session.overlap.prepare_reused)
    return spent
