"""Rows to Arrow tables (`store/schema.py`): each column cleaned by its type, errors name the row."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from vieval_runner.records import Box
from vieval_runner.store.schema import (
    EVALUATIONS_SCHEMA,
    PREDICTIONS_SCHEMA,
    StoreError,
    rows_to_table,
)


def _prediction(i: int, **extra) -> dict:
    return {"run_id": "r", "step": 1, "specimen_id": f"s{i}", "eval_id": "e"} | extra


def test_columns_are_cleaned_by_type_and_extra_columns_kept():
    rows = [
        _prediction(0, pred_boxes=[Box(1, 2, 3, 4, label="cat", score=0.5)], iou_mean=math.nan),
        _prediction(1, pred_boxes=[{"x1": 0, "y1": 0, "x2": 5, "y2": 6}], my_note="kept"),
        _prediction(2),
    ]
    table = rows_to_table(rows, PREDICTIONS_SCHEMA, "predictions")
    boxes = table.column("pred_boxes").to_pylist()
    assert (boxes[0][0]["x2"], boxes[0][0]["label"], boxes[0][0]["score"]) == (3, "cat", 0.5)
    assert boxes[1][0]["y2"] == 6 and boxes[2] is None
    assert math.isnan(table.column("iou_mean")[0].as_py())  # NaN is a value, not null
    assert table.column("my_note").to_pylist() == [None, "kept", None]
    assert table.column("parse_status").to_pylist() == [None] * 3  # missing: null


def test_json_and_timestamp_columns():
    row = {"eval_id": "e", "run_id": "r", "step": 1, "config": {"b": 1, "a": [2]},
           "started_at": "2026-12-04T10:00:00Z", "finished_at": 0}  # fmt: skip
    table = rows_to_table([row], EVALUATIONS_SCHEMA, "evaluations")
    assert table.column("config")[0].as_py() == '{"a": [2], "b": 1}'
    assert table.column("started_at")[0].as_py() == datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert table.column("finished_at")[0].as_py() == datetime(1970, 1, 1, tzinfo=UTC)


def test_bad_box_names_row_and_column():
    rows = [_prediction(0, pred_boxes=[]), _prediction(1, pred_boxes=[[1, 2, 3, 4]])]
    with pytest.raises(StoreError, match=r"predictions row 1 column 'pred_boxes': box 0 is a list"):
        rows_to_table(rows, PREDICTIONS_SCHEMA, "predictions")


def test_box_rows_in_store_shape_are_checked_by_arrow():
    """Rows as `Box.to_row` writes them are stored as given; a bad number still names the row,
    and a box row without a label (or with other keys) goes through `Box` (label "")."""
    good = {"x1": 1, "y1": 2.0, "x2": 3.5, "y2": 4.0, "label": "cat", "score": None}
    unlabelled = good | {"label": None}
    rows = [_prediction(0, pred_boxes=[good, unlabelled])]
    boxes = rows_to_table(rows, PREDICTIONS_SCHEMA, "predictions").column("pred_boxes")
    assert boxes.to_pylist()[0] == [good | {"x1": 1.0}, good | {"x1": 1.0, "label": ""}]
    rows = [_prediction(0, pred_boxes=[good]), _prediction(1, pred_boxes=[good | {"x2": "far"}])]
    with pytest.raises(StoreError, match=r"predictions row 1: column 'pred_boxes' value"):
        rows_to_table(rows, PREDICTIONS_SCHEMA, "predictions")


def test_bad_timestamp_names_row_and_column():
    rows = [{"eval_id": "e", "started_at": "2026-12-04"}, {"eval_id": "f", "started_at": "noon"}]
    with pytest.raises(StoreError, match=r"evaluations row 1 column 'started_at': not an ISO"):
        rows_to_table(rows, EVALUATIONS_SCHEMA, "evaluations")


def test_value_of_wrong_type_names_row():
    rows = [_prediction(0), _prediction(1, step="seven")]
    with pytest.raises(StoreError, match=r"predictions row 1: column 'step' value 'seven'"):
        rows_to_table(rows, PREDICTIONS_SCHEMA, "predictions")
