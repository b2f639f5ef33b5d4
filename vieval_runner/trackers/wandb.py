"""Weights & Biases (``WANDB_PROJECT``, ``WANDB_MODE``, ``WANDB_DIR`` as wandb itself reads them).

Inside a Trainer the Trainer's active run (``wandb.run``) gets the metrics, on its x axis
``train/global_step``; after training a run named after the run id, whose W&B id is derived
from it, is resumed (``resume="allow"``) rather than duplicated. Per step: ``vieval/<metric>``
with ``train/global_step`` = step, the per-specimen ``wandb.Table`` (``vieval/specimens``),
the sample specimens as one image list (``vieval/samples``, the media panel's step slider),
and the run metadata in the run's summary and config.
"""

from __future__ import annotations

import hashlib
import re

from vieval_runner.trackers.payload import COLUMNS, PREFIX, StepPayload

STEP_KEY = "train/global_step"  # the Trainer's own x axis (its WandbCallback defines it so)


def run_id_for(run_id: str) -> str:
    """A W&B run id for vieval's run id: W&B ids may not contain / \\ # ? % : and are short."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", run_id)[:48]
    return f"{safe}-{hashlib.sha1(run_id.encode()).hexdigest()[:8]}"


class WandbTracker:
    name = "wandb"

    def __init__(self, destination) -> None:
        import wandb

        self.wandb = wandb
        self.own = True
        if destination.in_process and wandb.run is not None:
            self.run, self.own = wandb.run, False  # the Trainer's run, beside its loss
        else:
            self.run = wandb.init(
                name=destination.run_id,
                id=run_id_for(destination.run_id),
                resume="allow",
                job_type="eval",
                reinit="create_new",  # never finishes or takes over the caller's run
            )
        self.run.define_metric(STEP_KEY)
        self.run.define_metric(f"{PREFIX}/*", step_metric=STEP_KEY)
        self._config_logged = False
        self.where = f"run {self.run.name} ({self.run.url or self.run.dir})"

    def log_step(self, payload: StepPayload) -> None:
        wandb = self.wandb
        row = dict(payload.scalars)
        row[f"{PREFIX}/specimens"] = wandb.Table(columns=list(COLUMNS), data=payload.rows)
        if payload.images:
            row[f"{PREFIX}/samples"] = [
                wandb.Image(sample.pixels, caption=sample.caption) for sample in payload.images
            ]
        row[STEP_KEY] = payload.step
        self.run.log(row)  # W&B's own _step counts on; the charts use train/global_step
        meta = {f"{PREFIX}/{k}": v for k, v in payload.metadata.items()}
        self.run.summary.update(meta)
        if not self._config_logged:
            fixed = {k: v for k, v in meta.items() if not k.startswith(f"{PREFIX}/best")}
            self.run.config.update(fixed, allow_val_change=True)
            self._config_logged = True

    def close(self) -> None:
        if self.own:
            self.run.finish()
