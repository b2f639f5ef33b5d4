"""One step's results: raw text -> ``Prediction`` (parse), the step's metrics (score, batched
for the whole step), and the rows the store keeps (predictions and the evaluation)."""

from __future__ import annotations

import json
import math
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from operator import attrgetter

from vieval_runner import checkpoints as ckpts
from vieval_runner import parsing, scoring, store
from vieval_runner.config import Config, dump_config
from vieval_runner.pipeline.resume import config_hash, resolved
from vieval_runner.records import Box, ParseResult, Prediction, Specimen
from vieval_runner.version import __version__

_CORNERS = attrgetter("x1", "y1", "x2", "y2")


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
        "checkpoint_path": ckpt.location,
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
        "warnings": json.dumps(notes) if (notes := session.warnings.get(ckpt.step)) else None,
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
        token_logprobs=getattr(out, "token_logprobs", None),
        token_ends=getattr(out, "token_ends", None),
        truncated=getattr(out, "truncated", None),
    )


def box_token_scores(
    boxes: Sequence[Box],
    token_ends: Sequence[int],
    token_logprobs: Sequence[float],
    fallback: float | None = None,
) -> list[float | None]:
    """Each box's score: exp(mean log-probability) of the tokens that wrote it.

    Token ``i`` covers the characters ``[token_ends[i - 1], token_ends[i])`` of the text (the
    first from 0); a token that completes no character (part of a multi-byte one) counts for
    the character it starts. A box's tokens are those whose range overlaps its ``span``; a
    box without span or tokens, or with a non-finite mean, gets ``fallback`` (the output's
    sequence confidence)."""
    starts, reach, last = [], [], 0
    for end in token_ends:
        end = max(int(end), last)  # offsets never go back
        starts.append(last)
        reach.append(max(end, last + 1))
        last = end
    scores: list[float | None] = []
    for box in boxes:
        score = fallback
        if box.span is not None:
            a, b = box.span
            first, stop = bisect_right(reach, a), bisect_left(starts, b)
            if stop > first:
                mean = math.fsum(token_logprobs[first:stop]) / (stop - first)
                if math.isfinite(mean):
                    score = math.exp(mean)
        scores.append(score)
    return scores


def parse_text(
    specimen: Specimen,
    text: str,
    input_size,
    output_format: str | None,
    coords: str | None,
    confidence: float | None = None,
    token_logprobs: Sequence[float] | None = None,
    token_ends: Sequence[int] | None = None,
    truncated: bool | None = None,
) -> Prediction:
    """Raw text -> Prediction (never raises: junk output is data); also used by rescore.

    ``truncated``: whether generation hit ``max_new_tokens`` (None: not known); the parser's
    ``truncated`` status then means cut off, and ``malformed`` badly formed.

    With the generation's scores (``box_scores: true``), each parsed box's score is the
    exp(mean log-probability) of the tokens that wrote it (``box_token_scores``), falling
    back to ``confidence`` (the whole output's), so AP50 and AP@[.5:.95] can rank boxes
    within and across outputs. ``token_ends`` are offsets in ``text``, which must be the
    decoded text they were computed on."""
    result = read_output(specimen, text, input_size, output_format, coords, truncated)
    return prediction_of(
        specimen, text, result, input_size, confidence, token_logprobs, token_ends, truncated
    )


def read_output(
    specimen: Specimen,
    text: str,
    input_size,
    output_format: str | None,
    coords: str | None,
    truncated: bool | None = None,
) -> ParseResult:
    """The parser's reading of one output: boxes (unscored) or the answer, and a status. A
    pure function of its arguments, so rescore reuses it for text that did not change."""
    if specimen.task != "grounding":
        return parsing.parse_answer(text)
    return parsing.parse_grounding(
        text,
        output_format,
        (specimen.width, specimen.height),
        input_size=input_size,
        coords=coords,
        default_label=specimen.prompt,
        truncated=truncated,
    )


def prediction_of(
    specimen: Specimen,
    text: str,
    result: ParseResult,
    input_size,
    confidence: float | None = None,
    token_logprobs: Sequence[float] | None = None,
    token_ends: Sequence[int] | None = None,
    truncated: bool | None = None,
) -> Prediction:
    """A Prediction from the parser's reading of ``text``, its boxes scored (`parse_text`)."""
    boxes = list(result.boxes)  # its own list: a reading may be shared by several steps
    logprobs = None if token_logprobs is None else list(token_logprobs)
    ends = None if token_ends is None else list(token_ends)
    if logprobs is not None and ends is not None and len(logprobs) == len(ends):
        # (lengths that differ: a damaged row; the sequence confidence, rather than a guess)
        scores = box_token_scores(boxes, ends, logprobs, confidence)
        boxes = [replace(box, score=score) for box, score in zip(boxes, scores, strict=True)]
    elif confidence is not None:
        boxes = [replace(box, score=confidence) for box in boxes]
    return Prediction(
        specimen_id=specimen.specimen_id,
        raw_text=text,
        parse_status=result.status,
        pred_boxes=boxes,
        pred_answer=result.answer,
        input_size=tuple(input_size) if input_size else None,
        confidence=confidence,
        token_logprobs=logprobs,
        token_ends=ends,
        truncated=truncated,
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
    columns = {k: [d.get(k) for d in per] for k in per[0]} if per else {}
    if per:
        boxes = (pred_boxes, ref_boxes) if config.task == "grounding" else (None, None)
        aggregates["ci95"] = scoring.step_intervals(
            config.task, columns, *boxes, n_resamples=sc.bootstrap_resamples,
            ap_resamples=sc.ap_bootstrap_resamples, seed=sc.bootstrap_seed,
        )  # fmt: skip
    for prediction, metrics in zip(predictions, per, strict=True):
        prediction.failure_category = metrics.pop("failure_category", "")
        metrics.pop("bleu_stats", None)  # summed into corpus BLEU and its interval, not stored
        prediction.metrics = metrics
    return aggregates


def frame_columns(
    specimens: list[Specimen],
    predictions: list[Prediction],
    output_format: str | None,
    coords: str | None,
) -> dict:
    """The coordinate-frame check's evaluation columns (``store.FRAME_CHECK_COLUMNS``): the
    frame that fits the references best, its F1, and one line of advice when it beats the
    configured frame clearly. Empty for VQA and for formats whose numbers are tokens."""
    configured = parsing.native_frame(output_format, coords)
    if configured is None or not specimens or specimens[0].task != "grounding":
        return {}
    raw = [[b.raw for b in p.pred_boxes if b.raw is not None] for p in predictions]
    refs = [list(map(_CORNERS, s.ref_boxes)) for s in specimens]
    sizes = [(s.width, s.height) for s in specimens]
    inputs = [p.input_size for p in predictions]
    fit = scoring.fit_frames(raw, refs, sizes, inputs, configured)
    if fit.best is None:
        return {}
    advice = None
    if fit.fires:
        advice = (
            f"coordinate frame: the boxes fit the references as {fit.best} "
            f"(F1@0.5 {fit.best_f1:.2f}) far better than as the configured {configured} "
            f"({fit.configured_f1:.2f}); set {parsing.frame_setting(output_format, fit.best)}"
        )
    return {"coords_best_fit": fit.best, "coords_best_fit_f1": fit.best_f1, "coords_advice": advice}


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
