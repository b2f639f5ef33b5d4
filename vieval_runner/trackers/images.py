"""Sample specimens as images with reference (green) and predicted (red) boxes, drawn with
``torchvision.utils.draw_bounding_boxes``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from vieval_runner.records import Box, Prediction, Specimen
from vieval_runner.trackers.payload import SampleImage

MAX_SIDE = 384  # pixels: enough to see the boxes, small enough for every tracker's media store
REFERENCE, PREDICTED = "lime", "red"


def _scaled(specimen: Specimen) -> tuple[torch.Tensor, float]:
    """The image as C x H x W uint8, its longest side at most ``MAX_SIDE``, and the scale."""
    from torchvision.transforms.functional import pil_to_tensor

    image = specimen.load_image()
    scale = min(1.0, MAX_SIDE / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size)
    return pil_to_tensor(image), scale


def _box_tensor(boxes: Sequence[Box], scale: float, width: int, height: int) -> torch.Tensor:
    rows = []
    for box in boxes:
        x1, x2 = sorted((box.x1 * scale, box.x2 * scale))
        y1, y2 = sorted((box.y1 * scale, box.y2 * scale))
        # clamped: junk output may put a box off the image (draw_bounding_boxes needs x1 <= x2)
        rows.append([min(max(x1, 0), width), min(max(y1, 0), height),
                     min(max(x2, 0), width), min(max(y2, 0), height)])  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def draw(
    specimen: Specimen, prediction: Prediction, base: tuple[torch.Tensor, float]
) -> np.ndarray:
    """H x W x 3 uint8: ``base`` (from ``_scaled``) with the reference and predicted boxes."""
    from torchvision.utils import draw_bounding_boxes

    pixels, scale = base
    _, height, width = pixels.shape
    # the reference wider, under the prediction: a perfect box shows both colours
    for boxes, color, line in (
        (specimen.ref_boxes, REFERENCE, 4),
        (prediction.pred_boxes, PREDICTED, 2),
    ):
        if boxes:
            pixels = draw_bounding_boxes(
                pixels, _box_tensor(boxes, scale, width, height), colors=color, width=line
            )
    return pixels.permute(1, 2, 0).contiguous().numpy()


def draw_samples(
    ids: Sequence[str],
    specimens: Mapping[str, Specimen],
    predictions: Mapping[str, Prediction],
    cache: dict,
) -> list[SampleImage]:
    """The sample ``ids`` drawn for this step; ``cache`` keeps each decoded, scaled image
    across steps (the boxes change, the image does not)."""
    samples = []
    for specimen_id in ids:
        specimen, prediction = specimens.get(specimen_id), predictions.get(specimen_id)
        if specimen is None or prediction is None:
            continue
        if specimen_id not in cache:
            cache[specimen_id] = _scaled(specimen)
        answer = "" if specimen.task == "grounding" else f" -> {prediction.pred_answer or ''}"
        caption = f"{specimen_id}: {specimen.prompt}{answer} [{prediction.failure_category}]"
        samples.append(
            SampleImage(specimen_id, draw(specimen, prediction, cache[specimen_id]), caption)
        )
    return samples
