"""COCO-style average precision (AP@0.5, AP@0.75, AP@[.5:.95]) for boxes that carry scores.

Computed by ``faster-coco-eval`` (``COCOeval_faster``, a maintained C++ port of pycocotools'
``COCOeval`` with the same results, about 15x faster), from in-memory COCO objects: each
specimen is a COCO image and every box belongs to the specimen's one phrase (one category, so
matching is class-agnostic). IoU thresholds, the 101-point interpolation, the greedy matching
and the ``maxDets`` truncation are the library's own; area range "all" only, no crowd regions.
Agreement with pycocotools ``COCOeval`` is tested.
"""

from __future__ import annotations

import logging

import numpy as np

from vieval_runner.gc_paused import paused_gc
from vieval_runner.records import Box

# pycocotools' "all" area range; boxes come from parsers that order their corners, so no box
# has a negative area (which COCOeval would ignore as outside the range).
_AREA_ALL = (0.0, 1e5**2)
_CATEGORY = 1


def _annotations(boxes_per_image: list[list[Box]], scored: bool) -> list[dict]:
    # What COCO.loadRes adds to results (area = w * h, ids from 1, no crowd) is written here
    # for both sides, so neither goes through loadRes' per-result copying (a quarter of the
    # time at 100,000 specimens). COCOeval treats id 0 as "unmatched": ids start at 1.
    flat = [(i, b) for i, boxes in enumerate(boxes_per_image, 1) for b in boxes]
    anns = [
        {"id": k, "image_id": i, "category_id": _CATEGORY,
         "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1], "area": (b.x2 - b.x1) * (b.y2 - b.y1),
         "iscrowd": 0}
        for k, (i, b) in enumerate(flat, 1)
    ]  # fmt: skip
    if scored:
        for ann, (_, b) in zip(anns, flat, strict=True):
            ann["score"] = b.score
    return anns


def _coco(boxes_per_image: list[list[Box]], scored: bool, quiet) -> object:
    from faster_coco_eval import COCO

    coco = COCO(print_function=quiet)
    coco.dataset = {
        "images": [{"id": i} for i in range(1, len(boxes_per_image) + 1)],
        "categories": [{"id": _CATEGORY, "name": "phrase"}],
        "annotations": _annotations(boxes_per_image, scored),
    }
    coco.createIndex()
    return coco


def coco_average_precision(
    pred_boxes: list[list[Box]], ref_boxes: list[list[Box]], *, max_dets: int = 100
) -> dict[str, float] | None:
    """``{"ap", "ap50", "ap75"}`` over all specimens, or None when it is undefined.

    Undefined: no reference box in the whole step, no predicted box at all, or some predicted
    box without a score (AP ranks by score; an unscored box cannot be ranked). At most
    ``max_dets`` highest-scored boxes per specimen count (COCOeval's ``maxDets``).
    """
    if len(pred_boxes) != len(ref_boxes):
        raise ValueError(
            f"coco_average_precision: {len(pred_boxes)} prediction and {len(ref_boxes)} "
            "reference box lists; they must be one per specimen"
        )
    n_ref = sum(len(r) for r in ref_boxes)
    all_preds = [b for bs in pred_boxes for b in bs]
    if n_ref == 0 or not all_preds or any(b.score is None for b in all_preds):
        return None
    from faster_coco_eval import COCOeval_faster

    quiet = logging.getLogger("faster_coco_eval").debug  # its progress lines, not stdout
    with paused_gc():  # millions of short-lived dicts: see gc_paused
        gt, dt = _coco(ref_boxes, False, quiet), _coco(pred_boxes, True, quiet)
        evaluator = COCOeval_faster(
            gt, dt, "bbox", ranges={"all": list(_AREA_ALL)}, print_function=quiet
        )
        evaluator.params.maxDets = [max_dets]
        evaluator.params.areaRng = [list(_AREA_ALL)]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
        # precision: [iou threshold, recall point, category, area range, maxDets]
        precision = np.asarray(evaluator.eval["precision"])[:, :, 0, 0, -1]
        thresholds = np.asarray(evaluator.params.iouThrs)
        del gt, dt, evaluator  # freed here, while collections are still paused
    return {
        "ap": float(precision.mean()),
        "ap50": float(precision[np.isclose(thresholds, 0.5)].mean()),
        "ap75": float(precision[np.isclose(thresholds, 0.75)].mean()),
    }
