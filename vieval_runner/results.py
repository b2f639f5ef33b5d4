"""One step's results: raw text -> ``Prediction`` (parse), the step's metrics (score, batched
for the whole step), and the rows the store keeps (predictions and the evaluation)."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime

from vieval_runner import __version__, parsing, scoring, store
from vieval_runner import checkpoints as ckpts
from vieval_runner.config import Config, dump_config
from vieval_runner.records import Prediction, Specimen
from vieval_runner.resume import config_hash, resolved


def evaluation_row(
    session, ckpt: ckpts.Checkpoint, digest: str, status: str, error: str | None
) -> dict:
    config = session.config
    now = datetime.now(UTC)
    family = getattr(session.loaded, "family", None)
    return {
        "eval_id": uuid.uuid4().hex,
        "run_id": config.effective_run_id,
        "step": ckpt.step,
        "checkpoint_path": str(ckpt.path),
        "checkpoint_hash": resolved(digest),
        "status": status,
        "error": error,
        "started_at": now,
        "finished_at": now,
        "n_specimens": len(session.specimens),
        "task": config.task,
        "model_family": family,
        "output_format": session.output_format,
        "parser_version": parsing.PARSER_VERSION,
        "scorer_version": scoring.SCORER_VERSION,
        "dataset_version": session.dataset_version,
        "config_hash": config_hash(config),
        "generation": json.dumps(
            {
                "batch_size": config.batch_size,
                "max_new_tokens": config.max_new_tokens,
                "greedy": True,
            }
        ),
        "config": json.dumps(dump_config(config)),
        "device": str(getattr(session.loaded, "device", config.device)),
        "vieval_version": __version__,
    }


def parse_one(session, specimen: Specimen, out) -> Prediction:
    """A ``GeneratedText`` -> Prediction with the session's output format (never raises)."""
    return parse_text(
        specimen,
        out.text,
        out.input_size,
        session.output_format,
        session.coords,
        confidence=getattr(out, "confidence", None),
    )


def parse_text(
    specimen: Specimen,
    text: str,
    input_size,
    output_format: str | None,
    coords: str | None,
    confidence: float | None = None,
) -> Prediction:
    """Raw text -> Prediction (never raises: junk output is data); also used by rescore.

    ``confidence`` (the generation's exp(mean token log-probability), ``box_scores: true``)
    becomes every parsed box's score, so AP50 and AP@[.5:.95] can rank the boxes."""
    if specimen.task == "grounding":
        result = parsing.parse_grounding(
            text,
            output_format,
            (specimen.width, specimen.height),
            input_size=input_size,
            coords=coords,
            default_label=specimen.prompt,
        )
    else:
        result = parsing.parse_answer(text)
    boxes = result.boxes
    if confidence is not None:
        boxes = [replace(box, score=confidence) for box in boxes]
    return Prediction(
        specimen_id=specimen.specimen_id,
        raw_text=text,
        parse_status=result.status,
        pred_boxes=boxes,
        pred_answer=result.answer,
        input_size=tuple(input_size) if input_size else None,
        confidence=confidence,
    )


def score_predictions(
    config: Config, specimens: list[Specimen], predictions: list[Prediction], device: str
) -> dict:
    """Fill each prediction's metrics and failure category; return the step's aggregates."""
    statuses = [p.parse_status for p in predictions]
    sc = config.scoring
    if config.task == "grounding":
        pred_boxes = [p.pred_boxes for p in predictions]
        ref_boxes = [s.ref_boxes for s in specimens]
        per = scoring.score_grounding(
            pred_boxes,
            ref_boxes,
            statuses,
            iou_threshold=sc.iou_threshold,
            tight_iou=sc.tight_iou,
            device=device,
        )
        aggregates = scoring.aggregate_grounding(
            per, statuses, pred_boxes=pred_boxes, ref_boxes=ref_boxes
        )
    else:
        answers = [p.pred_answer for p in predictions]
        refs = [s.ref_answers for s in specimens]
        per = scoring.score_vqa(
            answers,
            refs,
            [s.prompt for s in specimens],
            anls_threshold=sc.anls_threshold,
            format_ratio=sc.format_ratio,
            specimen_ids=[s.specimen_id for s in specimens],
        )
        aggregates = scoring.aggregate_vqa(per, answers, refs)
    for prediction, metrics in zip(predictions, per, strict=True):
        prediction.failure_category = metrics.pop("failure_category", "")
        prediction.metrics = metrics
    return aggregates


def prediction_rows(
    run_id: str, step: int, eval_id: str, predictions: list[Prediction]
) -> list[dict]:
    """Predictions as rows of the store's predictions table."""
    rows = []
    for prediction in predictions:
        row = store.prediction_row(prediction)
        row.update(run_id=run_id, step=step, eval_id=eval_id)
        rows.append(row)
    return rows
