"""Scoring: predictions against references, per specimen and per step.

Never touches storage or models. Grounding IoUs for a whole step are computed in batched
``torchvision.ops.box_iou`` launches on the model's device. Where a maintained library is the
reference it is called: torchvision (IoU, quad IoU), scipy (assignment), faster-coco-eval
(pycocotools' COCOeval: AP), rapidfuzz (Levenshtein for ANLS, LCS for ROUGE-L), sacrebleu
(BLEU). Hand-written only where no package ships the reference: the official VQA and SQuAD
normalizations, rouge-score's tokenizer (one regex, tested equal) and the matching rules.
See docs/metrics.md for every definition and convention.
"""

from vieval_runner.scoring.categories import (
    FAILURE_ACTIONS,
    GROUNDING_CATEGORIES,
    PARSE_FAILURE_STATUSES,
    VQA_CATEGORIES,
)
from vieval_runner.scoring.coco_ap import coco_average_precision
from vieval_runner.scoring.frames import CANDIDATE_FRAMES, FrameFit, fit_frames
from vieval_runner.scoring.grounding import aggregate_grounding, match_boxes, score_grounding
from vieval_runner.scoring.intervals import compare_steps, step_intervals
from vieval_runner.scoring.iou import batched_box_iou, iou_groups, pad_boxes, quad_iou, step_ious
from vieval_runner.scoring.steps import (
    HEADLINE_METRIC,
    LOWER_IS_BETTER,
    best_step,
    overfitting_signal,
)
from vieval_runner.scoring.text import normalize_squad, normalize_vqa
from vieval_runner.scoring.vqa import (
    BERTSCORE_NOTE,
    aggregate_vqa,
    anls_single,
    rouge_l,
    score_vqa,
    squad_f1,
    vqa_accuracy,
)

# Bump when any metric definition or convention changes: stored evaluations carry it, and
# `vieval rescore` uses it to tell stale scores from current ones.
SCORER_VERSION = "1.1.0"  # 1.1: token F1/EM drop references that normalise to ""

__all__ = [
    "BERTSCORE_NOTE",
    "CANDIDATE_FRAMES",
    "FAILURE_ACTIONS",
    "FrameFit",
    "GROUNDING_CATEGORIES",
    "HEADLINE_METRIC",
    "LOWER_IS_BETTER",
    "PARSE_FAILURE_STATUSES",
    "SCORER_VERSION",
    "VQA_CATEGORIES",
    "aggregate_grounding",
    "aggregate_vqa",
    "anls_single",
    "batched_box_iou",
    "best_step",
    "compare_steps",
    "coco_average_precision",
    "fit_frames",
    "iou_groups",
    "match_boxes",
    "normalize_squad",
    "normalize_vqa",
    "overfitting_signal",
    "pad_boxes",
    "quad_iou",
    "rouge_l",
    "score_grounding",
    "score_vqa",
    "squad_f1",
    "step_intervals",
    "step_ious",
    "vqa_accuracy",
]
