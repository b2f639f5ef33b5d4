"""Per-step summary of a store: the table `vieval run` ends with and `vieval summary` prints."""

from __future__ import annotations

import json
import math

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from vieval_runner import evidence, scoring
from vieval_runner.config_sections import ScoringConfig
from vieval_runner.scoring.intervals import AP_RESAMPLES
from vieval_runner.scoring.stats import DEFAULT_RESAMPLES, DEFAULT_SEED

GROUNDING_COLUMNS = (
    "f1",
    "precision",
    "recall",
    "iou_mean",
    "acc_at_50",
    "ap50",
    "ap",
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
# Short column headers, so that the table stays readable in 80 columns.
SHORT = {
    "f1": "F1",
    "precision": "P",
    "recall": "R",
    "iou_mean": "IoU",
    "acc_at_50": "acc@.5",
    "ap50": "AP50",
    "ap": "AP",
    "parse_failure_rate": "unparsed",
    "exact_match": "EM",
    "vqa_accuracy": "VQA",
    "token_f1": "tokF1",
    "bleu": "BLEU",
    "rouge_l": "ROUGE-L",
    "anls": "ANLS",
}


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _task_of(evaluations: list[dict]) -> str:
    return next((e.get("task") for e in evaluations if e.get("task")), "grounding")


def run_task(reader, run_id: str) -> str:
    """The task a run's evaluations name (grounding when none does)."""
    return _task_of(reader.evaluations(run_id).to_pylist())


def summarize(
    reader,
    run_id: str | None = None,
    *,
    with_intervals: bool = True,
    n_resamples: int = DEFAULT_RESAMPLES,
    ap_resamples: int = AP_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[dict]:
    """One dict per run: task, per-step aggregate rows (with ``<metric>_ci95`` intervals from
    the stored per-specimen rows), failed evaluations, best step and whether it is
    significantly better than the next best and the first step, overfitting."""
    runs = [run_id] if run_id else reader.runs()
    summaries = []
    for run in runs:
        aggregates = reader.aggregates(run).to_pylist()
        evaluations = reader.evaluations(run).to_pylist()
        task = _task_of(evaluations)
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
        best = scoring.best_step(by_step, metric) if by_step else None
        best_evidence = None
        if with_intervals and by_step:
            kw = {"n_resamples": n_resamples, "seed": seed}
            _add_intervals(reader, run, task, by_step, kw | {"ap_resamples": ap_resamples})
            steps = [by_step[s] for s in sorted(by_step)]
            best_evidence = evidence.best_step_evidence(
                reader, run, task, metric, steps, best, **kw
            )
        summaries.append(
            {
                "run_id": run,
                "task": task,
                "metric": metric,
                "steps": [by_step[s] for s in sorted(by_step)],
                "failed": failed,
                "best_step": best,
                "best_evidence": best_evidence,
                "overfitting": scoring.overfitting_signal(by_step, metric) if by_step else None,
                "notes": {"bertscore": scoring.BERTSCORE_NOTE} if task == "vqa" else {},
                "coords_advice": coords_advice([by_step[s] for s in sorted(by_step)]),
            }
        )
    return summaries


def coords_advice(steps: list[dict]) -> str | None:
    """One line from the coordinate-frame check (the newest step's advice, with the steps
    where it fired), or None when the configured frame fits."""
    fired = [row for row in steps if row.get("coords_advice")]
    if not fired:
        return None
    where = ", ".join(str(row["step"]) for row in fired)
    return f"{fired[-1]['coords_advice']} (step{'s' if len(fired) > 1 else ''} {where})"


# Intervals slow to recompute (AP: seconds at 10,000 specimens; BLEU: tokenizing every answer)
# and the resample setting each is computed with.
SLOW_INTERVALS = {"grounding": (("ap50", "ap"), "ap_resamples"), "vqa": (("bleu",), "n_resamples")}


def _add_intervals(reader, run: str, task: str, by_step: dict, kw: dict) -> None:
    """``<metric>_ci95`` per step from the stored per-specimen rows. AP's and BLEU's are
    taken from the evaluation's stored ``ci95`` when it holds them computed with the
    requested resamples and seed (its config says which), and recomputed otherwise."""
    slow, setting = SLOW_INTERVALS.get(task, ((), ""))
    load = evidence.references if task == "grounding" else evidence.reference_answers
    refs_by_version: dict = {}
    for step, row in by_step.items():
        stored = _stored_ci(row.pop("ci95", None))
        refs, reused = None, {}
        if slow and row.get(slow[-1]) is not None:
            made_with = _stored_settings(row.get("config"))
            if all(stored.get(k) for k in slow) and all(
                made_with[k] == kw[k] for k in (setting, "seed")
            ):
                reused = {f"{k}_ci95": stored[k] for k in slow}
            else:
                version = row.get("dataset_version")
                if version not in refs_by_version:
                    refs_by_version[version] = load(reader, version)
                refs = refs_by_version[version]
        row.update(evidence.step_intervals(reader, run, step, task, refs, **kw))
        row.update(reused)


def _stored_settings(config) -> dict:
    """The resamples and seed an evaluation's stored ``ci95`` was computed with: its config's
    scoring section, the defaults where that names none (AP used 200 before it could)."""
    try:
        tree = json.loads(config) if isinstance(config, str) else {}
        section = tree.get("scoring") or {}
    except (ValueError, AttributeError):
        section = {}
    default = ScoringConfig()
    return {
        "n_resamples": section.get("bootstrap_resamples", default.bootstrap_resamples),
        "ap_resamples": section.get("ap_bootstrap_resamples", default.ap_bootstrap_resamples),
        "seed": section.get("bootstrap_seed", default.bootstrap_seed),
    }


def _stored_ci(raw) -> dict:
    try:
        value = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _fmt_ci(ci) -> str:
    if not ci or ci[0] is None:
        return "-"
    return f"{ci[0]:.2f}-{ci[1]:.2f}"


# Dropped first when the terminal is too narrow for every column (all are in --json).
DROP_ORDER = ("iou_mean", "ap", "bleu", "rouge_l", "vqa_accuracy", "recall", "precision")


def fit_table(console: Console, build, columns: tuple[str, ...]):
    """``build(columns)`` with the fewest columns dropped (in ``DROP_ORDER``) that lets the
    table fit the console's width without truncating a header or a value."""
    cols = list(columns)
    table = build(tuple(cols))
    unbounded = console.options.update_width(10_000)
    for name in DROP_ORDER:
        if Measurement.get(console, unbounded, table).maximum <= console.width:
            break
        if name in cols:
            cols.remove(name)
            table = build(tuple(cols))
    return table, tuple(cols)


def _step_table(summary: dict, columns: tuple[str, ...]) -> Table:
    headline = summary["metric"]
    table = Table(
        title=f"run {summary['run_id']} ({summary['task']})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("step", justify="right", no_wrap=True)
    for column in columns:
        table.add_column(SHORT.get(column, column), justify="right", no_wrap=True)
        if column == headline:
            table.add_column("95% CI", justify="center", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    for row in summary["steps"]:
        best = row["step"] == summary["best_step"]
        cells = [f"{row['step']}{' *' if best else ''}"]
        for column in columns:
            cells.append(_fmt(row.get(column)))
            if column == headline:
                cells.append(_fmt_ci(row.get(f"{column}_ci95")))
        table.add_row(*cells, _fmt(row.get("n_specimens")), style="bold green" if best else None)
    return table


def print_summary(summaries: list[dict], console: Console) -> None:
    """Render the summaries as rich tables with the best step and the overfitting signal."""
    if not summaries:
        console.print("The store holds no evaluations yet.")
        return
    for summary in summaries:
        columns = GROUNDING_COLUMNS if summary["task"] == "grounding" else VQA_COLUMNS
        table, columns = fit_table(
            console, lambda cols, summary=summary: _step_table(summary, cols), columns
        )
        console.print(table)
        names = ", ".join(f"{SHORT[c]} = {c}" for c in columns if SHORT.get(c, c) != c)
        console.print(f"[dim]{names}; 95% CI: specimen bootstrap of {summary['metric']}[/]")
        if summary["best_step"] is not None:
            console.print(
                f"best checkpoint: step {summary['best_step']} by {summary['metric']} (marked *)"
            )
            line = evidence.significance_line(summary.get("best_evidence"))
            if line:
                console.print(f"  step {summary['best_step']} is {line}")
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
        if summary.get("coords_advice"):
            console.print(f"[yellow]{summary['coords_advice']}[/]", soft_wrap=True)
        if summary["task"] == "vqa":
            console.print(f"[dim]bertscore: {scoring.BERTSCORE_NOTE}[/]")
        for failure in summary["failed"]:
            console.print(f"[red]step {failure['step']} failed[/]: {failure['error']}")


def print_comparison(got: dict, console: Console) -> None:
    """One paired comparison in words: B minus A, interval, p-value, specimen counts."""
    a = f"{got['run_a']} step {got['step_a']}"
    b = f"{got['run_b']} step {got['step_b']}"
    if got["run_a"] == got["run_b"]:
        a, b = f"step {got['step_a']}", f"step {got['step_b']}"
    ci = got["ci95"]
    verdict = "significant" if got["p_value"] is not None and got["p_value"] < 0.05 else (
        "not significant")  # fmt: skip
    console.print(f"{got['metric']}: {b} minus {a} on {got['n']} shared specimens")
    console.print(
        f"  difference {_signed(got['difference'])}  95% CI [{_signed(ci[0])}, {_signed(ci[1])}]"
        f"  p = {_fmt_p(got['p_value'])} ({got['test']}): {verdict} at 0.05"
    )
    console.print(
        f"  specimens better {got['better']}, worse {got['worse']}, unchanged {got['unchanged']}"
    )


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _fmt_p(value) -> str:
    return "-" if value is None else f"{value:.3g}"
