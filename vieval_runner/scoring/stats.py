"""Small statistics shared by the grounding and VQA aggregates."""

from __future__ import annotations


def mean_present(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
