"""Experiment trackers: each committed step also goes to TensorBoard, MLflow and W&B
(``report_to``, the Hugging Face Trainer's key), where users already look.

A sink stage like ``store``: the pipeline hands in the step's plain values (``build_payload``)
after the store commit; a tracker never reads the store and never imports another stage.
One module per tracker; ``TRACKERS`` maps each ``report_to`` name to its opener. The packages
are optional: ``pip install 'vieval-runner[trackers]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vieval_runner.trackers.images import draw_samples
from vieval_runner.trackers.payload import (
    COLUMNS,
    PREFIX,
    SampleImage,
    StepPayload,
    build_payload,
    sample_ids,
)

EXTRA = "pip install 'vieval-runner[trackers]'"


class TrackerUnavailable(RuntimeError):
    """A ``report_to`` tracker whose package is not installed; names the extra."""


@dataclass(frozen=True)
class Destination:
    """Where a tracker logs a run's steps."""

    run_id: str  # vieval's run id: the tracker run's name after training
    store: str  # the store's path, shown as run metadata
    logging_dir: str  # TensorBoard: the folder this run's event files go to
    in_process: bool = False  # inside a Trainer: log into its active W&B / MLflow run


class Tracker(Protocol):
    name: str
    where: str  # where the steps go, said at the end of a run

    def log_step(self, payload: StepPayload) -> None: ...

    def close(self) -> None:
        """Flush; end the tracker run if this tracker started it (never the Trainer's)."""


def _tensorboard(destination: Destination) -> Tracker:
    from vieval_runner.trackers.tensorboard import TensorBoardTracker

    return TensorBoardTracker(destination)


def _mlflow(destination: Destination) -> Tracker:
    from vieval_runner.trackers.mlflow import MlflowTracker

    return MlflowTracker(destination)


def _wandb(destination: Destination) -> Tracker:
    from vieval_runner.trackers.wandb import WandbTracker

    return WandbTracker(destination)


TRACKERS: dict[str, Callable[[Destination], Tracker]] = {
    "tensorboard": _tensorboard,
    "mlflow": _mlflow,
    "wandb": _wandb,
}


def open_tracker(name: str, destination: Destination) -> Tracker:
    """The ``report_to`` tracker ``name``; ``TrackerUnavailable`` names the extra to install."""
    try:
        return TRACKERS[name](destination)
    except ImportError as exc:
        raise TrackerUnavailable(
            f"report_to: {name} needs its package ({exc.name or exc}): {EXTRA}"
        ) from exc


__all__ = [
    "COLUMNS",
    "EXTRA",
    "PREFIX",
    "TRACKERS",
    "Destination",
    "SampleImage",
    "StepPayload",
    "Tracker",
    "TrackerUnavailable",
    "build_payload",
    "draw_samples",
    "open_tracker",
    "sample_ids",
]
