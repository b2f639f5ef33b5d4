"""`vieval watch`: evaluate checkpoints as training writes them, in step order, each once.

Exits when the trainer's run is finished (a checkpoint's ``trainer_state.json`` reports
``global_step >= max_steps``) and everything is evaluated, or after ``watch.idle_timeout``
seconds without a new checkpoint.
"""

from __future__ import annotations

import time

from rich.console import Console

from vieval_runner import checkpoints as ckpts
from vieval_runner.config import Config
from vieval_runner.pipeline.run import evaluate_checkpoints
from vieval_runner.pipeline.session import open_session
from vieval_runner.pipeline.step import RunOutcome, select_checkpoints


def training_finished(checkpoints: list[ckpts.Checkpoint]) -> bool:
    """True when some complete checkpoint's trainer state says the last step was reached."""
    for ckpt in reversed(checkpoints):
        if ckpt.kind == "base" or not ckpt.complete:
            continue
        state = ckpts.read_trainer_state(ckpt.path) or {}
        max_steps, step = state.get("max_steps") or 0, state.get("global_step") or 0
        if max_steps > 0 and step >= max_steps:
            return True
    return False


def watch(
    config: Config, console: Console | None = None, *, sleep=time.sleep, clock=time.monotonic
) -> RunOutcome:
    """Poll the run folder and evaluate each complete checkpoint once; see the module doc."""
    console = console or Console()
    outcome = RunOutcome(store=config.store, run_id=config.effective_run_id)
    session = open_session(config, console)
    session.open_ended = True  # image embeddings of the newest checkpoint may serve the next
    seen: set[tuple[int, str]] = set()
    last_new = clock()
    waiting_said = False
    console.print(f"[bold]watch[/] {config.run_dir} every {config.watch.poll_seconds:g}s")
    while True:
        found = select_checkpoints(config) if _run_dir_exists(config) else []
        trained = [c for c in found if c.kind != "base"]
        if not trained and not waiting_said:
            console.print(f"waiting for the first checkpoint in {config.run_dir} ...")
            waiting_said = True
        fresh = [c for c in found if c.complete and (c.step, str(c.path)) not in seen]
        if fresh:
            evaluate_checkpoints(session, fresh, console, outcome)
            seen.update((c.step, str(c.path)) for c in fresh)
            last_new = clock()
        if training_finished(found) and all(
            not c.complete or (c.step, str(c.path)) in seen for c in found
        ):
            pending = [c.step for c in found if not c.complete]
            if not pending:
                console.print("training finished; every checkpoint is evaluated")
                return outcome
        idle = config.watch.idle_timeout
        if idle is not None and clock() - last_new > idle:
            console.print(f"no new checkpoint for {idle:g}s; stopping")
            return outcome
        sleep(config.watch.poll_seconds)


def _run_dir_exists(config: Config) -> bool:
    from pathlib import Path

    from vieval_runner.objectstore import is_remote

    # an object-store prefix exists once something is uploaded under it: listing tells
    return is_remote(config.run_dir) or Path(config.run_dir).is_dir()
