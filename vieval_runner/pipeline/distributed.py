"""Several GPUs or nodes: ``accelerate launch`` / ``torchrun`` the same ``vieval run``.

Every rank loads the base model once on its own device (``cuda:LOCAL_RANK``, or the CPU) and
generates for its shard of the specimens; the texts go to rank 0, which parses, scores and
commits ONE commit per step. Rank 0 alone plans (resume/skip decisions, checkpoint hashes),
creates the store and writes the specimens before any rank generates; the plan is broadcast so
every rank walks the same steps. A rank that fails a step reports it instead of raising, so
every rank reaches the same collectives and agrees the step failed (no deadlock).

Collectives carry small Python objects (texts, statuses) and always run over gloo, on CPU and
GPU alike: NCCL object collectives would need each rank's CUDA device in the middle of
generation and add nothing at kilobytes per specimen; gloo also runs across nodes over TCP.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner.config import Config
from vieval_runner.pipeline import overlap, resume, step
from vieval_runner.pipeline.preflight import empty_selection
from vieval_runner.pipeline.progress import progress_bar
from vieval_runner.pipeline.ranks import (
    Ranks,
    all_gather,
    broadcast,
    portable,
    run_step,
    setup,
    with_rank,
)
from vieval_runner.pipeline.session import Session, attach_model, note_checkpoints, open_session
from vieval_runner.records import CheckpointError, DataError, Specimen

log = logging.getLogger("vieval")


def shard(specimens: Sequence[Specimen], world: int, rank: int) -> list[int]:
    """Indices of ``rank``'s specimens: deterministic, sizes within one of each other.

    Prompt length in tokens is only known after the processor runs, so specimens are sorted
    by its cheap proxies (image area, which sets the visual token count of dynamic-resolution
    families, then prompt length) and dealt in snake order (0..N-1, N-1..0, ...) so no rank
    always gets the longest of each round.
    """
    order = sorted(
        range(len(specimens)),
        key=lambda i: (-specimens[i].width * specimens[i].height, -len(specimens[i].prompt), i),
    )
    mine = []
    for pos, index in enumerate(order):
        round_, offset = divmod(pos, world)
        if (offset if round_ % 2 == 0 else world - 1 - offset) == rank:
            mine.append(index)
    return sorted(mine)


def rank_device(requested: str, local_rank: int) -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` (modulo the visible devices) unless the CPU
    (or mps) is asked for; an explicit ``cuda:N`` is a one-process setting and yields too."""
    import torch

    if requested in ("cpu", "mps"):
        return requested
    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu" if requested == "auto" else requested  # cuda without CUDA: load_base says so


# --- the distributed run --------------------------------------------------------------------


@dataclass
class _Plan:
    todo: list[tuple[ckpts.Checkpoint, str]]
    skipped: list[int]
    dataset_version: str


def _open(
    ranks: Ranks, config: Config, console: Console, outcome: step.RunOutcome
) -> tuple[Session, _Plan]:
    """Rank 0 plans and writes the store while the others load the split; all then agree."""
    session, plan, error = None, None, None
    try:
        if ranks.is_main:
            checkpoints = step.select_checkpoints(config)
            if not checkpoints:
                raise CheckpointError(empty_selection(config))
            session = open_session(config, console)
            note_checkpoints(session, checkpoints)
            steps = [c.step for c in checkpoints]
            console.print(f"[bold]run[/]   {config.effective_run_id}: steps {steps}")
            todo = resume.plan_checkpoints(
                config, checkpoints, console, outcome, explicit=config.steps is not None
            )
            plan = _Plan(todo, list(outcome.skipped), session.dataset_version)
        else:
            session = open_session(config, console, write=False)
    except Exception as exc:
        log.exception("rank %d could not open the run", ranks.rank)
        error = exc
    # the barrier before any rank generates: the store exists and holds the specimens
    plan, main_error = broadcast((plan, portable(error)) if ranks.is_main else None)
    if main_error is not None:
        raise main_error  # every rank fails the same way (same exit status)
    if error is None and not ranks.is_main and session.dataset_version != plan.dataset_version:
        error = DataError(
            f"{config.data.path}: reads as dataset version {session.dataset_version[:12]} "
            f"on this rank but {plan.dataset_version[:12]} on rank 0 "
            "(a different file on this node?)"
        )
    problems = all_gather(portable(error), ranks)
    for rank, problem in enumerate(problems):
        if problem is not None:
            raise with_rank(problem, rank)
    outcome.skipped = list(plan.skipped)
    return session, plan


def _generate_shard(
    worker: Session,
    ckpt: ckpts.Checkpoint,
    following: ckpts.Checkpoint | None,
    console: Console,
    advance: Callable[[int], None],
) -> tuple[list, dict[str, float]]:
    """This rank's generated texts (shard order) and its timings for one checkpoint.

    ``worker`` is this rank's session: its shard as specimens and its device in the config,
    so the one-process step runs on it: the model loaded once, the shard prepared, the
    ``following`` checkpoint read ahead, image embeddings reused, the batch size found by
    ``batch_size: auto`` kept across steps. Rank 0 parses all texts (``step.finish_step``)."""
    if not worker.specimens:  # more ranks than specimens: nothing to load or generate
        return [], {}
    ckpts.fetch(ckpt)  # a remote checkpoint: into this node's cache (no-op when local)
    timings = step.make_resident(worker, ckpt, following, console)
    generated, _ = overlap.generate_and_parse(worker, advance, timings, parse=False)
    log.info("rank step %s: %s", ckpt.step, timings)
    return generated, timings


def _device_label(session: Session, ranks: Ranks) -> str:
    return f"{getattr(session.loaded, 'device', session.config.device)} x{ranks.world_size} ranks"


def run(config: Config, console: Console) -> step.RunOutcome:
    """``run.run`` for one rank of a launch; every rank returns the same outcome."""
    ranks = setup()
    assert ranks is not None, "distributed.run needs WORLD_SIZE > 1"
    outcome = step.RunOutcome(store=config.store, run_id=config.effective_run_id)
    session, plan = _open(ranks, config, console, outcome)
    shards = [shard(session.specimens, ranks.world_size, r) for r in range(ranks.world_size)]
    device = rank_device(config.device, ranks.local_rank)
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    mine = [session.specimens[i] for i in shards[ranks.rank]]
    # this rank's own session; `session` (all specimens, the config as given) is the one
    # rank 0 parses, scores and commits with, so config hashes match a one-process run
    worker = Session(config.model_copy(update={"device": device}), mine, session.dataset_version)
    console.print(
        f"[bold]ranks[/] {ranks.world_size} processes, specimens per rank "
        f"{[len(s) for s in shards]}"
    )
    if not plan.todo:
        return outcome
    with progress_bar(console) as progress:  # quiet on ranks other than 0: one set of bars
        overall = progress.add_task("checkpoints", total=len(plan.todo))
        todo = [ckpt for ckpt, _ in plan.todo]
        for index, (ckpt, digest) in enumerate(plan.todo):
            started = datetime.now(UTC)
            bar = progress.add_task(f"  step {ckpt.step} (rank 0's shard)", total=len(mine))
            following = todo[index + 1] if index + 1 < len(todo) else None

            def work(ckpt=ckpt, following=following, bar=bar):
                return _generate_shard(
                    worker, ckpt, following, console, lambda n: progress.advance(bar, n)
                )

            def finish_main(parts, ckpt=ckpt, digest=digest, started=started):
                generated: list = [None] * len(session.specimens)
                for indices, (texts, _) in zip(shards, parts, strict=True):
                    for i, text in zip(indices, texts, strict=True):
                        generated[i] = text
                timings = {
                    key: max(t.get(key, 0.0) for _, t in parts) for key in ("load_s", "generate_s")
                }
                timings["ranks"] = ranks.world_size
                if session.loaded is None:  # output format and coords follow the family
                    attach_model(session, worker.loaded)
                extra = {"device": _device_label(worker, ranks)}
                step.finish_step(session, ckpt, digest, generated, timings, started, extra)

            error = run_step(ranks, work, finish_main)
            if error is None:
                outcome.evaluated.append(ckpt.step)
            else:
                outcome.failed[ckpt.step] = error
                progress.console.print(f"[red]step {ckpt.step} failed[/]: {error}")
                if ranks.is_main:
                    device = _device_label(worker, ranks)
                    step.record_failure(session, ckpt, digest, error, device=device)
            progress.remove_task(bar)
            progress.advance(overall)
    overlap.wait_for_saving(worker)  # this rank's prepared inputs, kept for later runs
    return outcome
