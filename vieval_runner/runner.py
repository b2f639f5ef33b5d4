"""The one loop: checkpoints -> data -> models -> generation -> parsing -> scoring -> store.

``run(config)`` evaluates every selected checkpoint once and returns an exit status
(0 all good, 3 some checkpoints failed). ``watch`` (in ``watch.py``) calls ``evaluate_pending``
repeatedly as checkpoints land.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vieval_runner import __version__, parsing, scoring, store, throughput
from vieval_runner import checkpoints as ckpts
from vieval_runner import data as data_mod
from vieval_runner.config import Config, dump_config
from vieval_runner.records import Prediction, Specimen

log = logging.getLogger("vieval")


@dataclass
class RunOutcome:
    """What a run did: evaluated, skipped (already stored) and failed steps."""

    store: str
    run_id: str
    evaluated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return 3 if self.failed else 0


@dataclass
class Session:
    """Everything loaded once per run and reused for every checkpoint."""

    config: Config
    specimens: list[Specimen]
    dataset_version: str
    loaded: object = None  # models.LoadedModel, loaded lazily (nothing to do -> no model load)
    prepared: list | None = None
    output_format: str | None = None
    coords: str | None = None  # plain_xyxy convention: config, else the family's default
    processor_notice_given: bool = False
    specimens_written: Future | None = None  # the background specimens-table write
    throughput: object = None  # throughput.State: vision cache, prefetch, committer


def config_hash(config: Config) -> str:
    """Hash of the settings that change predictions (not paths to the store or the selection)."""
    import hashlib

    relevant = dump_config(config)
    for key in (
        "store",
        "steps",
        "every",
        "step_range",
        "include_base",
        "force",
        "watch",
        "run_id",
        # throughput knobs: predictions are the same with any of them
        "preprocess_workers",
        "prepare_cache_ram_mb",
        "cache_dir",
        "prefetch",
        "overlap",
        "cache_vision",
        "vision_cache_ram_mb",
        "static_cache",
        "compile",
    ):
        relevant.pop(key, None)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


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
    session = Session(config, loaded.specimens, loaded.dataset_version)
    if write:
        store.create_store(config.store)
        args = (config.store, loaded.specimens, loaded.dataset_version)
        if background:  # thumbnails are encoded while the model loads; commits wait for it
            session.specimens_written = _WRITER.submit(
                store.write_specimens, *args, thumb_px=config.thumb_px
            )
        else:
            store.write_specimens(*args, thumb_px=config.thumb_px)
    return session


def wait_for_specimens(session: Session) -> None:
    """Block until the specimens table is written (raises what writing it raised)."""
    if session.specimens_written is not None:
        session.specimens_written.result()


def attach_model(session: Session, loaded) -> None:
    """Make ``loaded`` the session's model; output format and coords default from its family."""
    from vieval_runner.families import FAMILIES

    facts = FAMILIES[loaded.family]
    session.loaded = loaded
    session.output_format = session.config.output_format or facts["output_format"]
    session.coords = session.config.coords or facts.get("coords")


def _ensure_model(
    session: Session, console: Console, first: ckpts.Checkpoint | None = None
) -> None:
    if session.loaded is not None:
        return
    from transformers.utils import logging as hf_logging

    from vieval_runner import models, throughput

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    config = session.config
    console.print(
        f"[bold]model[/] {config.base_model} (device={config.device}, dtype={config.dtype})"
    )
    attach_model(
        session, models.load_base(config.base_model, device=config.device, dtype=config.dtype)
    )
    console.print(
        f"      family {session.loaded.family}, output format {session.output_format}, "
        f"device {session.loaded.device}, dtype {str(session.loaded.dtype).removeprefix('torch.')}"
    )
    throughput.start_prefetch(session, first)  # read while the split is prepared
    throughput.prepare(session)  # once per run: thread pool, RAM budget, vision cache


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


def already_done(config: Config, checkpoint_hash: str, step: int, done: list[dict]) -> bool:
    """True when this (run, step) was stored ok for the same checkpoint content and config."""
    run_id, wanted = config.effective_run_id, config_hash(config)
    for row in done:
        if (
            row.get("run_id") == run_id
            and row.get("step") == step
            and row.get("status") == "ok"
            and row.get("checkpoint_hash") == checkpoint_hash
            and row.get("config_hash") == wanted
        ):
            return True
    return False


def plan_checkpoints(
    config: Config,
    checkpoints: list[ckpts.Checkpoint],
    console: Console,
    outcome: RunOutcome,
    *,
    explicit: bool = False,
    lazy: bool = False,
) -> list[tuple[ckpts.Checkpoint, str | Future]]:
    """``(checkpoint, content hash)`` of each complete checkpoint still to evaluate; steps
    already stored for the same content and config go to ``outcome.skipped``.

    ``lazy``: a step with no stored evaluation to compare against needs its hash only for
    the record, so it is hashed on a background thread (a ``Future``, resolved when the
    evaluation row is built) instead of before generation: ~1 s per 4 GB checkpoint saved.
    """
    done = [] if (config.force or explicit) else store.stored_evaluations(config.store)
    run_id, wanted = config.effective_run_id, config_hash(config)
    comparable = {
        r.get("step")
        for r in done
        if r.get("run_id") == run_id and r.get("status") == "ok" and r.get("config_hash") == wanted
    }
    todo = []
    for ckpt in checkpoints:
        if not ckpt.complete:
            console.print(f"[dim]step {ckpt.step}: not complete yet ({ckpt.reason}), skipped[/]")
            continue
        if lazy and ckpt.step not in comparable:
            todo.append((ckpt, _HASHER.submit(_content_hash, config, ckpt)))
            continue
        digest = _content_hash(config, ckpt)
        if already_done(config, digest, ckpt.step, done):
            outcome.skipped.append(ckpt.step)
            continue
        todo.append((ckpt, digest))
    if outcome.skipped:
        console.print(f"already stored (same checkpoint and config): steps {outcome.skipped}")
    return todo


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
    todo = plan_checkpoints(config, checkpoints, console, outcome, explicit=explicit, lazy=True)
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
            ckpt, digest = by_step[step]
            message = f"{type(exc).__name__}: {exc}"
            outcome.failed[step] = message
            if step in outcome.evaluated:  # its commit failed after generation went well
                outcome.evaluated.remove(step)
            log.error("step %s (%s) failed", step, ckpt.path, exc_info=exc)
            progress.console.print(f"[red]step {step} failed[/]: {message}")
            try:
                store.record_failed_evaluation(
                    config.store, _eval_row(session, ckpt, digest, "failed", message)
                )
            except Exception:  # e.g. the disk is full: the console and log still say it
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
                except Exception as exc:  # one bad checkpoint must not stop the run
                    failed(ckpt.step, exc)
                progress.remove_task(batches)
                progress.advance(overall)
        finally:  # the run returns only after its last commit
            if st.committer is not None:
                st.committer.close()
                st.committer = None


_HASHER = ThreadPoolExecutor(1, thread_name_prefix="vieval-hash")
_WRITER = ThreadPoolExecutor(1, thread_name_prefix="vieval-specimens")


def _content_hash(config: Config, ckpt: ckpts.Checkpoint) -> str:
    return ckpts.checkpoint_hash(ckpt.path) if ckpt.kind != "base" else _base_hash(config)


def _resolved(digest: str | Future) -> str | None:
    """A content hash, waiting for a background one; a checkpoint that cannot be hashed
    (e.g. a corrupt file) is recorded without one (its load error says what is wrong)."""
    if not isinstance(digest, Future):
        return digest
    try:
        return digest.result()
    except Exception as exc:
        log.warning("could not hash the checkpoint: %s", exc)
        return None


def _base_hash(config: Config) -> str:
    from pathlib import Path

    base = Path(config.base_model)
    return ckpts.checkpoint_hash(base) if base.is_dir() else f"hub:{config.base_model}"


def _eval_row(
    session: Session, ckpt: ckpts.Checkpoint, digest: str, status: str, error: str | None
) -> dict:
    config = session.config
    now = datetime.now(UTC)
    family = getattr(session.loaded, "family", None)
    return {
        "eval_id": uuid.uuid4().hex,
        "run_id": config.effective_run_id,
        "step": ckpt.step,
        "checkpoint_path": str(ckpt.path),
        "checkpoint_hash": _resolved(digest),
        "status": status,
        "error": error,
        "started_at": now,
        "finished_at": now,
        "n_specimens": len(session.specimens),
        "task": config.task,
        "model_family": family,
        "output_format": session.output_format,
        "parser_version": parsing.PARSER_VERSION,
        "scorer_version": scoring.SCORER_VERSION,
        "dataset_version": session.dataset_version,
        "config_hash": config_hash(config),
        "generation": json.dumps(
            {
                "batch_size": config.batch_size,
                "max_new_tokens": config.max_new_tokens,
                "greedy": True,
            }
        ),
        "config": json.dumps(dump_config(config)),
        "device": str(getattr(session.loaded, "device", config.device)),
        "vieval_version": __version__,
    }


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
    from vieval_runner import models

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
    if predictions is None:
        t0 = time.perf_counter()
        predictions = [
            parse_one(session, specimen, out.text, out.input_size)
            for specimen, out in zip(session.specimens, generated, strict=True)
        ]
        timings["parse_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    aggregates = score_predictions(
        config, session.specimens, predictions, device=str(session.loaded.device)
    )
    timings["score_s"] = time.perf_counter() - t0

    row = _eval_row(session, ckpt, digest, "ok", None)
    row.update({k: v for k, v in aggregates.items() if k in store.AGGREGATE_METRICS})
    row["started_at"], row["finished_at"] = started, datetime.now(UTC)
    row.update(row_extra or {})
    row["timings"] = json.dumps(timings)  # the commit's own time goes to the log only
    rows = prediction_rows(config.effective_run_id, ckpt.step, row["eval_id"], predictions)

    def commit() -> None:
        t0 = time.perf_counter()
        wait_for_specimens(session)  # readers find every specimen of a committed step
        store.commit_step(config.store, row, rows)
        timings["commit_s"] = time.perf_counter() - t0
        log.info("step %s committed: %s", ckpt.step, json.dumps(timings))
        if ckpt.kind != "base" and ckpt.path.is_dir():
            state = ckpts.read_trainer_state(ckpt.path)
            if state and state.get("log_history"):
                store.write_training_log(
                    config.store, config.effective_run_id, state["log_history"]
                )

    committer = getattr(session.throughput, "committer", None)
    if committer is not None:
        committer.submit(ckpt.step, commit)  # waits for the previous step's commit first
    else:
        commit()
    return row


def parse_one(session: Session, specimen: Specimen, text: str, input_size) -> Prediction:
    """Raw text -> Prediction (never raises: junk output is data)."""
    if specimen.task == "grounding":
        result = parsing.parse_grounding(
            text,
            session.output_format,
            (specimen.width, specimen.height),
            input_size=input_size,
            coords=session.coords,
            default_label=specimen.prompt,
        )
    else:
        result = parsing.parse_answer(text)
    return Prediction(
        specimen_id=specimen.specimen_id,
        raw_text=text,
        parse_status=result.status,
        pred_boxes=result.boxes,
        pred_answer=result.answer,
        input_size=tuple(input_size) if input_size else None,
    )


def score_predictions(
    config: Config, specimens: list[Specimen], predictions: list[Prediction], device: str
) -> dict:
    """Fill each prediction's metrics and failure category; return the step's aggregates."""
    statuses = [p.parse_status for p in predictions]
    sc = config.scoring
    if config.task == "grounding":
        pred_boxes = [p.pred_boxes for p in predictions]
        ref_boxes = [s.ref_boxes for s in specimens]
        per = scoring.score_grounding(
            pred_boxes,
            ref_boxes,
            statuses,
            iou_threshold=sc.iou_threshold,
            tight_iou=sc.tight_iou,
            device=device,
        )
        aggregates = scoring.aggregate_grounding(
            per, statuses, pred_boxes=pred_boxes, ref_boxes=ref_boxes
        )
    else:
        answers = [p.pred_answer for p in predictions]
        refs = [s.ref_answers for s in specimens]
        per = scoring.score_vqa(
            answers,
            refs,
            [s.prompt for s in specimens],
            anls_threshold=sc.anls_threshold,
            format_ratio=sc.format_ratio,
        )
        aggregates = scoring.aggregate_vqa(per, answers, refs)
    for prediction, metrics in zip(predictions, per, strict=True):
        prediction.failure_category = metrics.pop("failure_category", "")
        metrics.pop("failure_action", None)
        prediction.metrics = metrics
    return aggregates


def prediction_rows(
    run_id: str, step: int, eval_id: str, predictions: list[Prediction]
) -> list[dict]:
    """Predictions as rows of the store's predictions table."""
    rows = []
    for prediction in predictions:
        row = store.prediction_row(prediction)
        row.update(run_id=run_id, step=step, eval_id=eval_id)
        rows.append(row)
    return rows


def run(config: Config, console: Console | None = None) -> RunOutcome:
    """Evaluate the configured checkpoints once (resume-aware) and return what happened."""
    console = console or Console()
    from vieval_runner import distributed

    if distributed.world_size() > 1:  # launched by accelerate launch / torchrun
        return distributed.run(config, console)
    outcome = RunOutcome(store=config.store, run_id=config.effective_run_id)
    checkpoints = select_checkpoints(config)  # cheap checks first: nothing written on bad input
    if not checkpoints:
        raise ckpts.CheckpointError(
            f"{config.run_dir}: no checkpoints found (and include_base is false)"
        )
    session = open_session(config, console, background=True)
    console.print(
        f"[bold]run[/]   {config.effective_run_id}: steps {[c.step for c in checkpoints]} from {config.run_dir}"
    )
    evaluate_checkpoints(session, checkpoints, console, outcome, explicit=config.steps is not None)
    wait_for_specimens(session)  # even when every step was skipped or failed
    return outcome
