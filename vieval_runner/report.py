"""Per-step summary of a store: the table `vieval run` ends with and `vieval summary` prints."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from vieval_runner import scoring

GROUNDING_COLUMNS = (
    "f1",
    "precision",
    "recall",
    "iou_mean",
    "acc_at_50",
    "ap50",
    "parse_failure_rate",
)
VQA_COLUMNS = (
    "exact_match",
    "vqa_accuracy",
    "token_f1",
    "bleu",
    "rouge_l",
    "anls",
    "parse_failure_rate",
)
HEADLINE = scoring.HEADLINE_METRIC


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def summarize(reader, run_id: str | None = None) -> list[dict]:
    """One dict per run: task, per-step aggregate rows, failed evaluations, best step, overfitting."""
    runs = [run_id] if run_id else reader.runs()
    summaries = []
    for run in runs:
        aggregates = reader.aggregates(run).to_pylist()
        evaluations = reader.evaluations(run).to_pylist()
        task = next((e.get("task") for e in evaluations if e.get("task")), "grounding")
        metric = HEADLINE.get(task, "f1")
        by_step = {row["step"]: {k: _clean(v) for k, v in row.items()} for row in aggregates}
        failed = [
            {
                "step": e["step"],
                "error": e.get("error"),
                "checkpoint_path": e.get("checkpoint_path"),
            }
            for e in evaluations
            if e.get("status") == "failed" and e["step"] not in by_step
        ]
        summaries.append(
            {
                "run_id": run,
                "task": task,
                "metric": metric,
                "steps": [by_step[s] for s in sorted(by_step)],
                "failed": failed,
                "best_step": scoring.best_step(by_step, metric) if by_step else None,
                "overfitting": scoring.overfitting_signal(by_step, metric) if by_step else None,
                "notes": {"bertscore": scoring.BERTSCORE_NOTE} if task == "vqa" else {},
            }
        )
    return summaries


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_summary(summaries: list[dict], console: Console) -> None:
    """Render the summaries as rich tables with the best step and the overfitting signal."""
    if not summaries:
        console.print("The store holds no evaluations yet.")
        return
    for summary in summaries:
        columns = GROUNDING_COLUMNS if summary["task"] == "grounding" else VQA_COLUMNS
        table = Table(title=f"run {summary['run_id']} ({summary['task']})", title_justify="left")
        table.add_column("step", justify="right")
        for column in columns:
            table.add_column(column, justify="right")
        table.add_column("n", justify="right")
        for row in summary["steps"]:
            best = row["step"] == summary["best_step"]
            cells = [f"{row['step']}{' *' if best else ''}"] + [_fmt(row.get(c)) for c in columns]
            table.add_row(
                *cells, _fmt(row.get("n_specimens")), style="bold green" if best else None
            )
        console.print(table)
        if summary["best_step"] is not None:
            console.print(
                f"best checkpoint: step {summary['best_step']} by {summary['metric']} (marked *)"
            )
        elif len(summary["steps"]) > 1:
            values = {row.get(summary["metric"]) for row in summary["steps"]}
            if len(values) == 1 and None not in values:
                console.print(
                    f"no best checkpoint: every step scores {_fmt(values.pop())} "
                    f"{summary['metric']}"
                )
        signal = summary["overfitting"]
        if signal:
            console.print(
                f"[yellow]overfitting signal[/]: step {signal['best_step']} scored "
                f"{signal['best_value']:.3f} {summary['metric']}, the last step {signal['last_step']} "
                f"only {signal['last_value']:.3f} (drop {signal['drop']:.3f})"
            )
        if summary["task"] == "vqa":
            console.print(f"[dim]bertscore: {scoring.BERTSCORE_NOTE}[/]")
        for failure in summary["failed"]:
            console.print(f"[red]step {failure['step']} failed[/]: {failure['error']}")
