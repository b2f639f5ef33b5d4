"""MLflow, through ``MlflowClient`` (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` or
``MLFLOW_EXPERIMENT_ID`` as MLflow itself reads them).

Inside a Trainer the Trainer's active run gets the metrics (beside its loss); after training
the run tagged ``vieval.run_id`` = run id (named after it) is created once and reused. Per
step: ``vieval/<metric>`` metrics, the per-specimen table as an MLflow table artifact
(``vieval/specimens/step_<step>.json``, replaced when a step is evaluated again), one image per
sample specimen with ``log_image(key=..., step=...)`` (the run's image step slider), and the
run metadata as ``vieval.*`` tags.
"""

from __future__ import annotations

import json
import os
import time

from vieval_runner.trackers.payload import COLUMNS, PREFIX, StepPayload

RUN_TAG = "vieval.run_id"


def table_path(step: int) -> str:
    return f"{PREFIX}/specimens/step_{step:08d}.json"


def _experiment_id(client) -> str:
    """The experiment MLflow's own fluent API would pick: the id or name from the
    environment, else the default experiment."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name:
        return "0"  # MLflow's "Default" experiment
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, destination) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, as the Trainer's MLflowCallback
        self.own = True
        active = mlflow.active_run() if destination.in_process else None
        if active is not None:  # the Trainer's run: eval curves beside its loss
            self.run_id, self.own = active.info.run_id, False
        else:
            self.run_id = self._named_run(destination.run_id)
        self.where = f"run {self.run_id} in {self.client.tracking_uri}"

    def _named_run(self, run_id: str) -> str:
        """The run tagged ``vieval.run_id`` = ``run_id``, created the first time."""
        experiment = _experiment_id(self.client)
        quoted = run_id.replace("'", "\\'")
        found = self.client.search_runs(
            [experiment], filter_string=f"tags.`{RUN_TAG}` = '{quoted}'", max_results=1
        )
        if found:  # a rerun updates the run rather than starting a second one
            return found[0].info.run_id
        run = self.client.create_run(experiment, run_name=run_id, tags={RUN_TAG: run_id})
        return run.info.run_id

    def log_step(self, payload: StepPayload) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, payload.step) for k, v in payload.scalars.items()]
        tags = [RunTag(f"vieval.{k}", str(v)) for k, v in payload.metadata.items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        # the table in log_table's own format (pandas "split" JSON and the loggedArtifacts tag);
        # written whole, so a step evaluated again replaces its table (log_table would append)
        table = {"columns": list(COLUMNS), "data": payload.rows}
        path = table_path(payload.step)
        self.client.log_text(self.run_id, json.dumps(table), path)
        logged = json.loads(
            self.client.get_run(self.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]")
        )
        if {"path": path, "type": "table"} not in logged:
            logged.append({"path": path, "type": "table"})
            self.client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))
        for sample in payload.images:
            self.client.log_image(
                self.run_id,
                sample.pixels,
                key=f"{PREFIX}/sample/{sample.specimen_id}",
                step=payload.step,
                synchronous=True,
            )

    def close(self) -> None:
        if self.own:
            self.client.set_terminated(self.run_id)
