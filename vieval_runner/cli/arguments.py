"""The `vieval` argument parser: one subcommand per command, with its options."""

from __future__ import annotations

import argparse


def image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(float(v)) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W,H (e.g. 640,480), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return w, h


def report_to_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report-to",
        "--report_to",
        dest="report_to",
        nargs="+",
        choices=("tensorboard", "mlflow", "wandb", "all", "none"),
        metavar="TRACKER",
        help="also log each step to tensorboard, mlflow and/or wandb (or all, none), as the "
        "Trainer's --report_to; sets report_to",
    )


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            "expected KEY=VALUE (what was given is not shown: it may be a secret)"
        )
    return key.strip(), value


def add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        "-o",
        dest="storage_options",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="object-storage option for an s3://, gs:// or az:// store, e.g. "
        "AWS_ENDPOINT_URL=http://host:9000 (repeatable; AWS_* environment variables apply too)",
    )


def storage_options(args) -> dict[str, str] | None:
    """The ``-o KEY=VALUE`` options of a store command as a dict (None: none given)."""
    return dict(getattr(args, "storage_options", None) or []) or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vieval",
        description="Evaluate every checkpoint of a fine-tuned vision-language model.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser(
        "run", help="evaluate a run's checkpoints once (resumes; skips stored steps)"
    )
    p.add_argument("config", help="evaluation config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. batch_size=16")
    p.add_argument("--force", action="store_true", help="re-evaluate steps already stored")
    report_to_option(p)

    p = sub.add_parser("watch", help="evaluate checkpoints as training writes them")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    report_to_option(p)

    p = sub.add_parser("summary", help="per-step metrics, best checkpoint, overfitting signal")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--run", help="only this run id")
    p.add_argument("--as-of", help="a predictions table version or an ISO timestamp (time travel)")
    p.add_argument(
        "--by",
        metavar="size|label|FIELD",
        help="break the metrics down by box size, label or a field",
    )
    add_stats_arguments(p, ap=True)
    add_storage_options(p)

    p = sub.add_parser(
        "compare", help="paired comparison of two steps (or two runs' steps) on shared specimens"
    )
    p.add_argument("store")
    p.add_argument("step_a", metavar="STEP_A", help="a step, or RUN:STEP for another run")
    p.add_argument("step_b", metavar="STEP_B", help="a step, or RUN:STEP for another run")
    p.add_argument("--run", help="the run of plain steps (default: the store's only run)")
    p.add_argument("--metric", help="f1, precision, recall, acc_at_50; exact_match, ... (VQA)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    add_stats_arguments(p)
    add_storage_options(p)

    p = sub.add_parser(
        "check", help="list unfinished commits (orphan predictions) and steps to evaluate again"
    )
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("rescore", help="re-parse and re-score stored raw text (no model needed)")
    p.add_argument("store")
    p.add_argument("--run", help="only this run id")
    add_storage_options(p)

    p = sub.add_parser("view", help="serve the viewer on 127.0.0.1")
    p.add_argument("stores", nargs="+")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; off loopback (e.g. 0.0.0.0) a token is required",
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--token",
        help="access token every request must carry (generated when --host is not loopback)",
    )
    add_storage_options(p)

    p = sub.add_parser("export", help="write the viewer as static files")
    p.add_argument("stores", nargs="+")
    p.add_argument("--html", required=True, metavar="DIR")
    add_storage_options(p)

    p = sub.add_parser("compact", help="compact small files and vacuum past a retention window")
    p.add_argument("store")
    p.add_argument("--retention-hours", type=float, default=168.0)
    add_storage_options(p)

    p = sub.add_parser("demo", help="build a tiny run, evaluate it and open the viewer")
    p.add_argument("--task", choices=("grounding", "vqa"), default="grounding")
    p.add_argument("--out", default="vieval-demo", metavar="DIR")
    p.add_argument("--no-view", action="store_true", help="print the store path instead of serving")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)

    p = sub.add_parser("parse", help="parse one model output from stdin (debugging aid)")
    p.add_argument("--format", dest="fmt", help="output format, e.g. qwen25_vl_json")
    p.add_argument("--image-size", type=image_size, help="original image W,H")
    p.add_argument("--input-size", type=image_size, help="resized model-input W,H (qwen25_vl_json)")
    p.add_argument("--coords", help="coordinate convention for plain_xyxy")
    p.add_argument(
        "--truncated",
        action="store_true",
        help="the text was cut at max_new_tokens (default: it is complete, so an unclosed "
        "structure is malformed)",
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="one JSON object per line: text, format, image_size, input_size (optional: "
        "coords, default_label, truncated)",
    )
    return parser


def at_least(low: int):
    """An argparse type: an int no smaller than ``low`` (the config's own minimum)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def add_stats_arguments(p: argparse.ArgumentParser, ap: bool = False) -> None:
    p.add_argument(
        "--resamples", type=at_least(100), default=2000, help="bootstrap resamples (2000)"
    )
    if ap:  # only the summary bounds AP (compare has no AP comparison)
        p.add_argument("--ap-resamples", type=at_least(50), default=200,
                       help="bootstrap resamples of AP50/AP (200)")  # fmt: skip
    p.add_argument("--seed", type=at_least(0), default=0, help="bootstrap seed (0: reproducible)")
