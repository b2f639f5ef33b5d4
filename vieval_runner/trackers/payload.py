"""What every tracker logs for one committed step, built once from the step's plain values."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vieval_runner.records import Box, Prediction, Specimen

PREFIX = "vieval"  # scalars, tables and images sit under vieval/... beside the Trainer's train/...
WORST = 20  # rows of the worst-specimens text summary
COLUMNS = [
    "specimen_id",
    "prompt",
    "reference",
    "prediction",
    "boxes",
    "score",
    "iou",
    "category",
    "parse_status",
]
LEGEND = "green: reference boxes, red: predicted boxes"


@dataclass
class SampleImage:
    specimen_id: str
    pixels: np.ndarray  # H x W x 3 uint8, boxes drawn
    caption: str


@dataclass
class StepPayload:
    """One step, ready to log: scalars, the per-specimen table, sample images, run metadata."""

    run_id: str
    step: int
    task: str
    score_metric: str  # the per-specimen column "score" holds this metric
    scalars: dict[str, float] = field(default_factory=dict)
    rows: list[list] = field(default_factory=list)  # one per specimen, in COLUMNS order
    worst: list[dict] = field(default_factory=list)  # the WORST lowest-scoring rows
    images: list[SampleImage] = field(default_factory=list)
    metadata: dict[str, str | int | float | None] = field(default_factory=dict)


def sample_ids(specimens: Sequence[Specimen], n: int) -> list[str]:
    """``n`` specimen ids spread over the split, the same at every step (ordered by a hash of
    the id, so the choice does not depend on the split's row order or on the step)."""

    def key(s: Specimen) -> str:
        return hashlib.sha1(s.specimen_id.encode()).hexdigest()

    return sorted(s.specimen_id for s in sorted(specimens, key=key)[:n])


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def step_scalars(
    aggregates: Mapping, predictions: Sequence[Prediction], categories: Sequence[str]
) -> dict[str, float]:
    """``vieval/<metric>`` for every numeric aggregate, ``vieval/<metric>_low``/``_high`` for
    each interval in ``aggregates["intervals"]`` (``{metric: (low, high)}``) and
    ``vieval/category/<name>``: how many specimens fell in each failure category."""
    scalars: dict[str, float] = {}
    for key, value in aggregates.items():
        if key == "intervals" and isinstance(value, Mapping):
            for metric, bounds in value.items():
                if isinstance(bounds, Sequence) and len(bounds) == 2:
                    for side, bound in zip(("low", "high"), bounds, strict=True):
                        if (number := _number(bound)) is not None:
                            scalars[f"{PREFIX}/{metric}_{side}"] = number
        elif (number := _number(value)) is not None:
            scalars[f"{PREFIX}/{key}"] = number
    counts = Counter(p.failure_category for p in predictions)
    for name in dict.fromkeys([*categories, *sorted(c for c in counts if c)]):
        scalars[f"{PREFIX}/category/{name}"] = float(counts.get(name, 0))
    return scalars


def _boxes(boxes: Sequence[Box]) -> str:
    return json.dumps([[round(v, 1) for v in b.as_list()] for b in boxes])


def specimen_row(specimen: Specimen, prediction: Prediction, score_metric: str) -> list:
    reference = (
        _boxes(specimen.ref_boxes)
        if specimen.task == "grounding"
        else " | ".join(specimen.ref_answers)
    )
    boxes = _boxes(prediction.pred_boxes) if specimen.task == "grounding" else ""
    metrics = prediction.metrics or {}
    return [
        specimen.specimen_id,
        specimen.prompt,
        reference,
        prediction.raw_text,
        boxes,
        _number(metrics.get(score_metric)),
        _number(metrics.get("iou_mean")),
        prediction.failure_category,
        prediction.parse_status,
    ]


def worst_rows(rows: Sequence[list], n: int = WORST) -> list[dict]:
    """The ``n`` rows with the lowest score (no score counts as lowest), failures first."""
    score, category = COLUMNS.index("score"), COLUMNS.index("category")

    def badness(row: list) -> tuple:
        return (row[category] == "good", -1.0 if row[score] is None else row[score])

    return [dict(zip(COLUMNS, row, strict=True)) for row in sorted(rows, key=badness)[:n]]


def build_payload(
    *,
    run_id: str,
    step: int,
    task: str,
    specimens: Sequence[Specimen],
    predictions: Sequence[Prediction],
    aggregates: Mapping,
    categories: Sequence[str],
    score_metric: str,
    images: list[SampleImage],
    metadata: Mapping,
) -> StepPayload:
    """The step's payload (``images``: drawn by ``images.draw_samples``)."""
    rows = [specimen_row(s, p, score_metric) for s, p in zip(specimens, predictions, strict=True)]
    return StepPayload(
        run_id=run_id,
        step=step,
        task=task,
        score_metric=score_metric,
        scalars=step_scalars(aggregates, predictions, categories),
        rows=rows,
        worst=worst_rows(rows),
        images=images,
        metadata=dict(metadata),
    )


def metadata_lines(payload: StepPayload) -> list[str]:
    """The run metadata as ``key: value`` lines (TensorBoard's text summary)."""
    return [f"{key}: {value}" for key, value in payload.metadata.items()]
