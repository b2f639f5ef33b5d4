"""COCO AP with specimen weights and an area range: bootstrap intervals and AP by box size.

pycocotools ``COCOeval`` (bbox, one class, no crowd) re-stated so that each image can carry
a weight (how often a bootstrap resample drew it): per-image matching is done once, and every
resample only re-weights the score-sorted detections' cumulative sums. With all weights 1 it
is COCOeval with ``areaRng`` (small < 32^2 <= medium < 96^2 <= large, boxes' w*h in original
pixels; a reference outside the range is ignored, and so is an unmatched detection outside
it), tested equal to pycocotools to 1e-6. pycocotools has no weighted form, hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vieval_runner.records import Box

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}


def pairwise_iou_arrays(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``[..., P, R]`` IoU of ``[..., P, 4]`` and ``[..., R, 4]`` xyxy arrays (0 where the
    union is empty)."""
    lt = np.maximum(p[..., :, None, :2], r[..., None, :, :2])
    rb = np.minimum(p[..., :, None, 2:], r[..., None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_p, area_r = np.prod(p[..., 2:] - p[..., :2], -1), np.prod(r[..., 2:] - r[..., :2], -1)
    union = area_p[..., :, None] + area_r[..., None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _match_several(
    box: np.ndarray,
    img: np.ndarray,
    gts: np.ndarray,
    g_ig: np.ndarray,
    g_start: np.ndarray,
    n_ref: np.ndarray,
    matched: np.ndarray,
    ignored: np.ndarray,
) -> None:
    """COCOeval.evaluateImg's greedy matching for the images with several references, many
    images at a time: images do not interact, so the k-th best-scored detection of every
    image is matched in one array step. Per detection, in score order, at each threshold:
    the untaken non-ignored reference with the highest IoU >= t (the last of equal ones, as
    COCOeval's scan keeps it), else the untaken ignored one likewise. ``box`` rows are sorted
    by image, then score; ``matched``/``ignored`` ``[T, D]`` are filled in place."""
    dets = np.flatnonzero(n_ref[img] > 1)
    if not len(dets):
        return
    images, det_start, det_count = np.unique(img[dets], return_index=True, return_counts=True)
    # images with similar numbers of references and detections together: little padding
    buckets = np.ceil(np.log2(n_ref[images])) * 16 + np.ceil(np.log2(det_count + 1))
    for bucket in np.unique(buckets):
        group = np.flatnonzero(buckets == bucket)
        per_image = int(det_count[group].max() * n_ref[images[group]].max())
        step = max(1, 2_000_000 // per_image)
        for part in range(0, len(group), step):
            sel = group[part : part + step]
            _match_group(box, dets, det_start[sel], det_count[sel], images[sel], gts, g_ig,
                         g_start, n_ref, matched, ignored)  # fmt: skip


def _match_group(box, dets, det_start, det_count, images, gts, g_ig, g_start, n_ref,
                 matched, ignored) -> None:  # fmt: skip
    n_k, n_g = int(det_count.max()), int(n_ref[images].max())
    k_range, g_range = np.arange(n_k), np.arange(n_g)
    d_valid = k_range[None, :] < det_count[:, None]  # [n, K]
    d_index = dets[np.minimum(det_start[:, None] + k_range[None, :], len(dets) - 1)]
    g_valid = g_range[None, :] < n_ref[images][:, None]  # [n, G]
    g_index = np.minimum(g_start[images][:, None] + g_range[None, :], len(gts) - 1)
    # references non-ignored first (stable), padding last: COCOeval's gtind order
    key = np.where(g_valid, g_ig[g_index].astype(np.int8), 2)
    perm = np.argsort(key, axis=1, kind="stable")
    g_index = np.take_along_axis(g_index, perm, 1)
    g_valid = np.take_along_axis(g_valid, perm, 1)
    g_ignored = g_ig[g_index] & g_valid
    iou = pairwise_iou_arrays(box[d_index, :4], gts[g_index])  # [n, K, G]
    rows = np.arange(len(images))
    for t, threshold in enumerate(np.minimum(IOU_THRESHOLDS, 1 - 1e-10)):
        taken = np.zeros((len(images), n_g), dtype=bool)
        for k in range(n_k):
            iou_k = iou[:, k, :]
            ok = g_valid & ~taken & (iou_k >= threshold) & d_valid[:, k, None]
            m = np.full(len(images), -1)
            for kind in (ok & ~g_ignored, ok & g_ignored):  # non-ignored first
                free = (m < 0) & kind.any(axis=1)
                last_best = n_g - 1 - np.argmax(np.where(kind, iou_k, -1.0)[:, ::-1], axis=1)
                m = np.where(free, last_best, m)
            hit = rows[m >= 0]
            taken[hit, m[hit]] = True
            matched[t, d_index[hit, k]] = True
            ignored[t, d_index[hit, k]] = g_ignored[hit, m[hit]]


@dataclass
class DetectionTable:
    """A step's detections matched once for one area range, ready to be re-weighted."""

    image: np.ndarray  # [D] image index of each detection, in global score order
    tps: np.ndarray  # [T, D] counted true positive
    fps: np.ndarray  # [T, D] counted false positive
    refs: np.ndarray  # [N] non-ignored references per image
    n_images: int


def detection_table(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    area_range: tuple[float, float] = AREA_RANGES["all"],
    *,
    max_dets: int = 100,
) -> DetectionTable | None:
    """Match every image once (COCOeval's rules); None when some predicted box has no score.

    Images with one reference (RefCOCO-style, the common case) are matched for the whole step
    at once; images with several, rank by rank over many images at a time (`_match_several`)."""
    if any(b.score is None for bs in pred_boxes for b in bs):
        return None
    lo, hi = area_range
    n_img, n_t = len(ref_boxes), len(IOU_THRESHOLDS)
    n_pred = np.array([len(p) for p in pred_boxes], dtype=np.int64)
    n_ref = np.array([len(r) for r in ref_boxes], dtype=np.int64)
    dets = np.array(
        [(b.x1, b.y1, b.x2, b.y2, b.score) for bs in pred_boxes for b in bs], dtype=np.float64
    ).reshape(-1, 5)
    gts = np.array(
        [(b.x1, b.y1, b.x2, b.y2) for bs in ref_boxes for b in bs], dtype=np.float64
    ).reshape(-1, 4)
    g_area = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    g_ig = (g_area < lo) | (g_area > hi)
    g_start = np.concatenate([[0], np.cumsum(n_ref)[:-1]]).astype(np.int64)
    g_img = np.repeat(np.arange(n_img), n_ref)
    refs = np.bincount(g_img, weights=(~g_ig).astype(np.float64), minlength=n_img)
    if not len(dets):
        empty = np.zeros((n_t, 0), dtype=bool)
        return DetectionTable(np.zeros(0, np.int64), empty, empty, refs, n_img)
    # each image's detections by descending score (stable), its first max_dets kept
    d_img = np.repeat(np.arange(n_img), n_pred)
    order = np.lexsort((-dets[:, 4], d_img))
    rank = np.arange(len(order)) - np.concatenate([[0], np.cumsum(n_pred)[:-1]])[d_img[order]]
    order = order[rank < max_dets]
    img, box = d_img[order], dets[order]
    matched = np.zeros((n_t, len(order)), dtype=bool)
    ignored = np.zeros_like(matched)
    single = n_ref[img] == 1
    if single.any():
        k = np.flatnonzero(single)
        g = g_start[img[k]]
        iou = pairwise_iou_arrays(box[k, None, :4], gts[g, None])[:, 0, 0]  # row k with row k
        over = iou[None, :] >= np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
        for t in range(n_t):  # the first (best-scored) detection over t takes the reference
            hit = np.flatnonzero(over[t])
            _, first = np.unique(img[k[hit]], return_index=True)
            chosen = k[hit[first]]
            matched[t, chosen] = True
            ignored[t, chosen] = g_ig[g_start[img[chosen]]]
    _match_several(box, img, gts, g_ig, g_start, n_ref, matched, ignored)
    d_area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    ignored |= ~matched & ((d_area < lo) | (d_area > hi))[None, :]
    final = np.argsort(-box[:, 4], kind="mergesort")
    return DetectionTable(
        img[final], (matched & ~ignored)[:, final], (~matched & ~ignored)[:, final], refs, n_img
    )


def weighted_ap(table: DetectionTable, weights: np.ndarray) -> dict[str, np.ndarray]:
    """``{"ap", "ap50", "ap75"}`` per row of ``weights [B, N]``; NaN where no reference counts.

    Rows go through in chunks, so that the ``[B, D]`` cumulative sums of a step with many
    detections stay within a few hundred MB (the same numbers as all rows at once)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    rows = max(1, 4_000_000 // max(1, table.tps.shape[1]))
    if weights.shape[0] > rows:
        parts = [_weighted_ap(table, weights[i : i + rows]) for i in range(0, len(weights), rows)]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return _weighted_ap(table, weights)


def _weighted_ap(table: DetectionTable, weights: np.ndarray) -> dict[str, np.ndarray]:
    """COCOeval.accumulate's precision at the 101 recall thresholds, one row per resample.

    Only true positives are visited per threshold: recall rises only there, and precision
    after a false positive is below the one at the true positive before it, so COCO's
    envelope and recall lookup read the same values off the true positives alone. The
    counted detections' cumulative weight (the denominator) is one sum shared by every
    threshold when none of them ignores a detection."""
    n_b, n_t = weights.shape[0], len(IOU_THRESHOLDS)
    n_ref = weights @ table.refs
    precision = np.zeros((n_b, n_t, len(RECALL_THRESHOLDS)))
    w = weights[:, table.image]  # [B, D]
    counted = table.tps | table.fps  # detections not ignored, per threshold
    shared = bool((counted == counted[:1]).all())
    for t in range(n_t if table.tps.shape[1] else 0):
        if t == 0 or not shared:
            kept = np.flatnonzero(counted[t])
            w_kept = w[:, kept]
            both_all = np.cumsum(w_kept, axis=1)  # [B, counted detections]
        hits = np.flatnonzero(table.tps[t, kept])  # true positives among the counted
        if not len(hits):
            continue  # precision stays 0 at every recall threshold
        tp = np.cumsum(w_kept[:, hits], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rc = tp / n_ref[:, None]
        pr = tp / (both_all[:, hits] + np.spacing(1))
        n_k = len(hits)
        idx = np.empty((n_b, len(RECALL_THRESHOLDS)), dtype=np.int64)
        for b in range(n_b):
            idx[b] = np.searchsorted(rc[b], RECALL_THRESHOLDS, side="left")
        # COCO's envelope read at each recall point: the highest precision from that point
        # on, as maxima over the stretches between consecutive points (one reduceat for all
        # rows; a stretch that starts where the next does reads one element, never more
        # than the true maximum), then a running maximum from the last point back
        starts = (np.minimum(idx, n_k - 1) + n_k * np.arange(n_b)[:, None]).ravel()
        stretch = np.maximum.reduceat(pr.ravel(), starts).reshape(idx.shape)
        envelope = np.maximum.accumulate(stretch[:, ::-1], axis=1)[:, ::-1]
        precision[:, t] = np.where(idx < n_k, envelope, 0.0)
    undefined = n_ref <= 0
    ap = precision.mean(axis=(1, 2))
    out = {"ap": ap, "ap50": precision[:, 0].mean(axis=1), "ap75": precision[:, 5].mean(axis=1)}
    return {k: np.where(undefined, np.nan, v) for k, v in out.items()}


def area_range_ap(
    pred_boxes: list[list[Box]],
    ref_boxes: list[list[Box]],
    area: str = "all",
    *,
    max_dets: int = 100,
) -> dict[str, float] | None:
    """COCO AP / AP50 / AP75 over one area range ("all", "small", "medium", "large"); None
    when it is undefined (an unscored box, or no reference box in the range)."""
    table = detection_table(pred_boxes, ref_boxes, AREA_RANGES[area], max_dets=max_dets)
    if table is None or not any(len(p) for p in pred_boxes):
        return None
    got = weighted_ap(table, np.ones((1, table.n_images)))
    if np.isnan(got["ap"][0]):
        return None
    return {k: float(v[0]) for k, v in got.items()}
