"""Hands each committed step to the ``report_to`` trackers (``vieval_runner.trackers``).

Called after a step's store commit succeeded. Trackers log on their own background thread, so
a tracker that hangs (a server that does not answer) never holds up the next step or commit;
a tracker that fails gives a warning and is off for the rest of the run. Nothing here can
undo or block the store commit: the store stays the record.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import warnings
from functools import partial
from pathlib import Path

from vieval_runner import scoring, store, trackers
from vieval_runner.config import Config

log = logging.getLogger("vieval")

# At the end of a run, how long to wait for trackers still logging (a server that does not
# answer): then the run ends anyway; the store has every step.
CLOSE_WAIT_S = 120.0


class TrackerWarning(UserWarning):
    """A tracker failed; the store has the step all the same."""


def warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, TrackerWarning, stacklevel=2)


def default_logging_dir(config: Config) -> Path:
    """``logging_dir``, else ``tensorboard`` beside a local store (the working folder for an
    object-store root)."""
    if config.logging_dir:
        return Path(config.logging_dir)
    if "://" in config.store:
        return Path("tensorboard").resolve()
    return Path(config.store).resolve().parent / "tensorboard"


def trainer_logging_dir(args) -> Path | None:
    """The folder the Trainer's ``TensorBoardCallback`` writes to: ``TENSORBOARD_LOGGING_DIR``,
    ``args.logging_dir`` (transformers < 5), else its newest ``output_dir/runs/*`` folder."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return Path(os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"]))
    if getattr(args, "logging_dir", None):
        return Path(args.logging_dir)
    runs = Path(args.output_dir) / "runs"
    written = [d for d in runs.glob("*") if d.is_dir() and any(d.glob("events.out.tfevents.*"))]
    return max(written, key=lambda d: d.stat().st_mtime) if written else None


class Tracking:
    """The run's trackers and their logging thread."""

    def __init__(self, config: Config, *, in_process: bool = False, trainer_dir=None):
        self.config = config
        run_id = config.effective_run_id
        if in_process and not config.logging_dir and trainer_dir is not None:
            logging_dir = Path(trainer_dir)  # the Trainer's run: eval beside its loss
        else:
            logging_dir = default_logging_dir(config) / run_id
        self.destination = trackers.Destination(
            run_id=run_id, store=config.store, logging_dir=str(logging_dir), in_process=in_process
        )
        self.metric = scoring.HEADLINE_METRIC.get(config.task, "f1")
        self._opened: dict[str, trackers.Tracker] | None = None
        # one daemon thread logs, in step order: a hung tracker cannot hold up the process
        self._jobs: queue.Queue = queue.Queue()
        self._progress = threading.Condition()
        self._queued = self._done = 0
        self._by_step: dict[int, dict] | None = None  # headline metric by step (best step)
        self._images: dict = {}  # decoded, scaled sample images, kept across steps
        self._sample: list[str] | None = None
        self._closed = False
        threading.Thread(target=self._work, name="vieval-trackers", daemon=True).start()
        atexit.register(self.close)  # `vieval watch`, distributed ranks: runs end at exit

    def open(self) -> None:
        """Open each tracker (on the calling thread: a Trainer's active MLflow run is only
        visible on its own thread). A tracker that cannot open warns and stays off."""
        if self._opened is not None:
            return
        self._opened = {}
        for name in self.config.report_to:
            try:
                self._opened[name] = trackers.open_tracker(name, self.destination)
            except Exception as exc:
                warn(f"{name}: not logging this run ({type(exc).__name__}: {exc})")

    def submit(self, session, step: int, predictions: list, aggregates: dict) -> None:
        specimens = list(session.specimens)
        with self._progress:
            self._queued += 1
        self._jobs.put(partial(self._log, specimens, step, list(predictions), dict(aggregates)))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            finally:
                with self._progress:
                    self._done += 1
                    self._progress.notify_all()

    def _best(self, step: int, aggregates: dict) -> dict:
        if self._by_step is None:  # steps stored before this session (resume, rerun)
            self._by_step = {}
            try:
                reader = store.open_store(
                    self.config.store, storage_options=self.config.storage_options or None
                )
                rows = reader.aggregates(self.config.effective_run_id)
                for row in rows.to_pylist():
                    self._by_step[row["step"]] = {self.metric: row.get(self.metric)}
            except Exception as exc:  # the step's own value still counts
                log.warning("trackers: could not read earlier steps from the store: %s", exc)
        self._by_step[step] = {self.metric: aggregates.get(self.metric)}
        best = scoring.best_step(self._by_step, self.metric)
        value = None if best is None else self._by_step[best][self.metric]
        return {
            "best_step": best,
            "best_metric": self.metric,
            "best_value": value,
            "store": self.config.store,
            "view_command": f"vieval view {self.config.store}",
        }

    def _log(self, specimens: list, step: int, predictions: list, aggregates: dict) -> None:
        try:
            self.open()
            if not self._opened:
                return
            if self._sample is None:
                self._sample = trackers.sample_ids(specimens, self.config.report_sample)
            by_id = {s.specimen_id: s for s in specimens}
            predicted = {p.specimen_id: p for p in predictions}
            categories = (
                scoring.GROUNDING_CATEGORIES
                if self.config.task == "grounding"
                else scoring.VQA_CATEGORIES
            )
            payload = trackers.build_payload(
                run_id=self.config.effective_run_id,
                step=step,
                task=self.config.task,
                specimens=specimens,
                predictions=predictions,
                aggregates=aggregates,
                categories=categories,
                score_metric=self.metric,
                images=trackers.draw_samples(self._sample, by_id, predicted, self._images),
                metadata=self._best(step, aggregates),
            )
        except Exception as exc:
            warn(f"trackers: step {step} not logged ({type(exc).__name__}: {exc})")
            return
        for name, tracker in list(self._opened.items()):
            try:
                tracker.log_step(payload)
            except Exception as exc:
                del self._opened[name]
                warn(
                    f"{name}: logging step {step} failed ({type(exc).__name__}: {exc}); "
                    f"{name} is off for the rest of this run, the store has every step"
                )
                with contextlib.suppress(Exception):  # already warned about this tracker
                    tracker.close()

    def logged_to(self) -> list[str]:
        """Each tracker still logging, with where (waits for the steps in flight)."""
        self.flush(CLOSE_WAIT_S)
        return [f"{name}: {tracker.where}" for name, tracker in (self._opened or {}).items()]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted step is logged (False: ``timeout`` seconds passed)."""
        with self._progress:
            return self._progress.wait_for(lambda: self._done >= self._queued, timeout)

    def close(self) -> None:
        """Flush (at most ``CLOSE_WAIT_S``), then close each tracker, ending only the runs
        vieval started."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if not self.flush(CLOSE_WAIT_S):
            warn(
                f"trackers: {self._queued - self._done} step(s) still not logged after "
                f"{CLOSE_WAIT_S:g}s; not waiting longer (the store has every step)"
            )
            return
        self._jobs.put(None)
        for name, tracker in (self._opened or {}).items():
            try:
                tracker.close()
            except Exception as exc:
                warn(f"{name}: closing failed ({type(exc).__name__}: {exc})")
        self._opened = {}


def tracking_for(session) -> Tracking | None:
    """The session's ``Tracking`` (created on first use), or None without ``report_to``."""
    if not session.config.report_to:
        return None
    if session.tracking is None:
        session.tracking = Tracking(session.config)
    return session.tracking


def attach_trainer(session, args) -> None:
    """Inside a Trainer (``VievalCallback``): log into the Trainer's own runs, opened now on
    the Trainer's thread."""
    if session.config.report_to and session.tracking is None:
        session.tracking = Tracking(
            session.config, in_process=True, trainer_dir=trainer_logging_dir(args)
        )
        session.tracking.open()


def after_commit(session, step: int, predictions: list, aggregates: dict) -> None:
    """Queue a committed step for the trackers; never raises."""
    try:
        tracking = tracking_for(session)
        if tracking is not None:
            tracking.submit(session, step, predictions, aggregates)
    except Exception as exc:
        warn(f"trackers: step {step} not logged ({type(exc).__name__}: {exc})")


def close(session, console=None) -> None:
    """Wait for the trackers and close them (end of a run, of training) and say where the
    steps went; never raises."""
    tracking = getattr(session, "tracking", None)
    if tracking is None:
        return
    try:
        names = tracking.logged_to()
        tracking.close()
    except Exception as exc:
        warn(f"trackers: closing failed ({type(exc).__name__}: {exc})")
        return
    if console is not None and names:
        console.print(f"[bold]trackers[/] {'; '.join(names)}")
