"""Across steps: which checkpoint is best, and whether the last one has fallen back."""

from __future__ import annotations

import math

# Metrics where smaller is better; every other metric is maximised.
LOWER_IS_BETTER: frozenset[str] = frozenset({"parse_failure_rate"})
# The metric that picks the best step of a task (summary table, trackers' run metadata).
HEADLINE_METRIC: dict[str, str] = {"grounding": "f1", "vqa": "exact_match"}


def _values(aggregates_by_step: dict[int, dict], metric: str) -> list[tuple[int, float]]:
    out = []
    for step in sorted(aggregates_by_step):
        v = (aggregates_by_step[step] or {}).get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out.append((step, float(v)))
    return out


def best_step(aggregates_by_step: dict[int, dict], metric: str) -> int | None:
    """Step with the best value of ``metric`` (earliest on ties); None if no step has it, or
    if several steps have it and all score the same (none is better: e.g. F1 0 throughout)."""
    vals = _values(aggregates_by_step, metric)
    if not vals or (len(vals) > 1 and len({v for _, v in vals}) == 1):
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    # max() keeps the first maximal element; steps are sorted, so ties go to the earliest.
    return max(vals, key=lambda sv: sign * sv[1])[0]


def overfitting_signal(
    aggregates_by_step: dict[int, dict], metric: str, min_drop: float = 0.05
) -> dict | None:
    """``{best_step, best_value, last_step, last_value, drop}`` when an earlier step beats the
    last evaluated step by at least ``min_drop`` (absolute, in the metric's own units), else
    None. ``drop`` is positive whichever direction the metric improves in."""
    vals = _values(aggregates_by_step, metric)
    best = best_step(aggregates_by_step, metric)
    if best is None or len(vals) < 2:
        return None
    best_value = dict(vals)[best]
    last_step, last_value = vals[-1]
    drop = (last_value - best_value) if metric in LOWER_IS_BETTER else (best_value - last_value)
    if best == last_step or drop < min_drop:
        return None
    return {
        "best_step": best,
        "best_value": best_value,
        "last_step": last_step,
        "last_value": last_value,
        "drop": drop,
    }
