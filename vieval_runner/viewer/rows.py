"""Arrow tables -> the page's JSON-ready rows, built column by column.

Gives the same values as the per-row path (``clean(row)``, ``boxes(...)``,
``box_matches(...)`` in ``analysis``), but converts whole columns with Arrow and computes the
IoU of every (predicted, reference) box pair of a step in one numpy pass: at 10,000 specimens
per step the per-row Python path was most of the viewer's first view (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vieval_runner.viewer.analysis import MATCH_IOU, box_matches, clean, scoring_module

BOX_FIELDS = ("x1", "y1", "x2", "y2", "label", "score")
# Columns the step document leaves out of each row (the document says run and step once).
STEP_SKIP = ("run_id", "step", "pred_boxes")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building ~10^5 small lists: otherwise its full collections
    (walking every object the process holds, torch's included) cost more than the work."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def column_values(col: pa.ChunkedArray | pa.Array) -> list:
    """One column as JSON-safe Python values: NaN/inf -> None, like ``clean`` per value."""
    typ = col.type
    if pa.types.is_floating(typ):
        return pc.if_else(pc.is_finite(col), col, pa.scalar(None, typ)).to_pylist()
    if (
        pa.types.is_integer(typ)
        or pa.types.is_boolean(typ)
        or pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_null(typ)
    ):
        return col.to_pylist()
    return [clean(v) for v in col.to_pylist()]  # nested / temporal: the general path


def box_lists(col: pa.ChunkedArray | pa.Array) -> list[list[list]]:
    """A ``list<struct{x1, y1, x2, y2, label, score}>`` column -> per row the page's compact
    ``[x1, y1, x2, y2, label, score]`` arrays (null lists and null boxes skipped)."""
    n = len(col)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    values = pc.list_flatten(col)  # null lists contribute nothing
    fields = dict(zip((f.name for f in values.type), values.flatten(), strict=True))
    cols = [
        column_values(fields[name]) if name in fields else [None] * len(values)
        for name in BOX_FIELDS
    ]
    cols[4] = [visible(lab) if lab else "" for lab in cols[4]]
    flat = list(map(list, zip(*cols, strict=True)))
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    out = [flat[bounds[k] : bounds[k + 1]] for k in range(n)]
    if values.null_count:  # a null box inside a list: skipped, as the per-row path does
        valid = values.is_valid().to_pylist()
        out = [[flat[b] for b in range(bounds[k], bounds[k + 1]) if valid[b]] for k in range(n)]
    return out


def _pair_ious(
    preds: list[list[list]], refs: list[list[list]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (pred, ref) pair of every row, each row laid out like ``_iou_matrix``'s
    row-major (pred, ref) matrix; each row's offset into that flat array; each pair's row."""
    n_p = np.fromiter((len(p) for p in preds), np.int64, len(preds))
    n_r = np.fromiter((len(r) for r in refs), np.int64, len(refs))
    n_pair = n_p * n_r
    pair_off = np.concatenate([[0], np.cumsum(n_pair)])
    total = int(pair_off[-1])
    row = np.repeat(np.arange(len(preds)), n_pair)
    if total == 0:
        return np.zeros(0), pair_off, row
    p = np.asarray([b[:4] for row in preds for b in row], dtype=np.float64).reshape(-1, 4)
    r = np.asarray([b[:4] for row in refs for b in row], dtype=np.float64).reshape(-1, 4)
    p_off = np.concatenate([[0], np.cumsum(n_p)[:-1]])
    r_off = np.concatenate([[0], np.cumsum(n_r)[:-1]])
    k = np.arange(total) - pair_off[:-1][row]
    nr = n_r[row]
    pb = p[p_off[row] + k // nr]
    rb = r[r_off[row] + k % nr]
    # The same float operations, in the same order, as analysis._iou_matrix.
    area_p = (pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1])
    area_r = (rb[:, 2] - rb[:, 0]) * (rb[:, 3] - rb[:, 1])
    lt = np.maximum(pb[:, :2], rb[:, :2])
    rbm = np.minimum(pb[:, 2:], rb[:, 2:])
    wh = np.clip(rbm - lt, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = area_p + area_r - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0), pair_off, row


def all_box_matches(preds: list[list[list]], refs: list[list[list]]) -> list[list]:
    """``box_matches(pred, ref)`` for every row, with one vectorised IoU over all pairs.

    Rows with no pair at IoU >= ``MATCH_IOU`` match nothing without calling the matcher;
    the rest go through scoring's ``match_boxes`` exactly as ``box_matches`` does.
    """
    scoring = scoring_module()
    if scoring is None:  # rare: no scoring module, keep the one definition of the fallback
        return [box_matches(p, r) for p, r in zip(preds, refs, strict=True)]
    iou, off, pair_row = _pair_ious(preds, refs)
    hits = np.flatnonzero(np.bincount(pair_row[iou >= MATCH_IOU], minlength=len(preds)))
    out: list[list] = [[None] * len(p) for p in preds]
    for k in hits.tolist():
        sub = iou[off[k] : off[k + 1]].reshape(len(preds[k]), len(refs[k]))
        row = out[k]
        for i, j in scoring.match_boxes(sub, MATCH_IOU):
            row[i] = [int(j), round(float(sub[i, j]), 4)]
    return out


def step_rows(
    table: pa.Table, index_of: Callable[[str], int], refs_of: Callable[[int], list]
) -> list[dict]:
    """A step's predictions -> the page's rows: every column but ``STEP_SKIP`` (binary ones
    dropped), ``pred_boxes`` as compact arrays, the specimen index ``i`` (``index_of``) and
    ``matches`` against its reference boxes (``refs_of(i)``)."""
    with _gc_paused():
        return _step_rows(table, index_of, refs_of)


def _step_rows(
    table: pa.Table, index_of: Callable[[str], int], refs_of: Callable[[int], list]
) -> list[dict]:
    names = [
        n for n in table.column_names if n not in STEP_SKIP and not _binary(table.schema.field(n))
    ]
    cols = [column_values(table.column(n)) for n in names]
    if "pred_boxes" in table.column_names:
        preds = box_lists(table.column("pred_boxes"))
    else:
        preds = [[] for _ in range(table.num_rows)]
    index = [index_of(str(s)) for s in table.column("specimen_id").to_pylist()]
    matches = all_box_matches(preds, [refs_of(i) for i in index])
    rows = []
    for k, values in enumerate(zip(*cols, strict=True)):
        rec = dict(zip(names, values, strict=True))
        rec["pred_boxes"] = preds[k]
        rec["i"] = index[k]
        rec["matches"] = matches[k]
        rows.append(rec)
    return rows


def _metadata(raw: str | None) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def visible(text: str) -> str:
    """Text with undecodable bytes and control characters as visible escapes: U+FFFD (what
    decoding made of bytes that were not UTF-8) -> ``\\ufffd``, a surrogate-escaped byte ->
    ``\\xNN``, a control character -> ``\\uNNNN``; never a silent ``�``."""
    if text.isprintable() and "\ufffd" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if code == 0xFFFD:
            out.append("\\ufffd")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def _binary(field: pa.Field) -> bool:
    return pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)


def specimen_rows(table: pa.Table) -> list[dict]:
    """Stored specimens (no image bytes) -> the page's specimen records, oldest first, so a
    newer dataset version of a specimen overrides an older one when applied in order."""
    with _gc_paused():
        return _specimen_rows(table)


def _specimen_rows(table: pa.Table) -> list[dict]:
    if "written_at" in table.column_names:
        order = pc.sort_indices(table, [("written_at", "ascending", "at_start")])
        table = table.take(order)  # a stable sort, like the per-row path's list.sort

    def col(name: str) -> list:
        if name not in table.column_names:
            return [None] * table.num_rows
        return table.column(name).to_pylist()

    refs = (
        box_lists(table.column("ref_boxes"))
        if "ref_boxes" in table.column_names
        else [[] for _ in range(table.num_rows)]
    )
    cols = zip(
        col("specimen_id"),
        col("task"),
        col("prompt"),
        col("width"),
        col("height"),
        refs,
        col("ref_answers"),
        col("metadata"),
        strict=True,
    )
    return [
        {
            "id": str(sid),
            "task": task or "grounding",
            "prompt": prompt or "",
            "width": width,
            "height": height,
            "ref_boxes": ref_boxes,
            "ref_answers": [str(a) for a in answers or []],
            "meta": _metadata(meta),
        }
        for sid, task, prompt, width, height, ref_boxes, answers, meta in cols
    ]
