"""The versioned Delta Lake store: ``specimens``, ``predictions``, ``evaluations``,
``training_log`` tables under one root. See ``docs/store.md``."""

from vieval_runner.store.check import check_store, orphaned_steps
from vieval_runner.store.commits import COMMIT_POINTS
from vieval_runner.store.maintenance import compact
from vieval_runner.store.reader import StoreReader, open_store
from vieval_runner.store.schema import (
    AGGREGATE_METRICS,
    BOX,
    EVALUATIONS_SCHEMA,
    FORMAT_KEY,
    FORMAT_VERSION,
    FRAME_CHECK_COLUMNS,
    PREDICTIONS_SCHEMA,
    SPECIMENS_SCHEMA,
    TRAINING_LOG_SCHEMA,
    StoreError,
    StoreFull,
    table_uri,
)
from vieval_runner.store.writer import (
    commit_step,
    commit_steps,
    create_store,
    has_dataset_version,
    prediction_row,
    record_failed_evaluation,
    stored_evaluations,
    training_log_last_step,
    write_specimens,
    write_training_log,
)

__all__ = [
    "AGGREGATE_METRICS",
    "BOX",
    "COMMIT_POINTS",
    "EVALUATIONS_SCHEMA",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "FRAME_CHECK_COLUMNS",
    "PREDICTIONS_SCHEMA",
    "SPECIMENS_SCHEMA",
    "TRAINING_LOG_SCHEMA",
    "StoreError",
    "StoreFull",
    "StoreReader",
    "check_store",
    "commit_step",
    "commit_steps",
    "compact",
    "create_store",
    "has_dataset_version",
    "open_store",
    "orphaned_steps",
    "prediction_row",
    "record_failed_evaluation",
    "stored_evaluations",
    "table_uri",
    "training_log_last_step",
    "write_specimens",
    "write_training_log",
]
