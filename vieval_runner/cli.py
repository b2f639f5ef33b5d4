"""`vieval` command line: run | watch | rescore | summary | compare | check | view | export |
compact | demo | parse.

Exit status: 0 success, 2 bad input or config (the message names the file/row/key),
1 internal error, 3 a run in which some checkpoints failed (the message says which) or a
`vieval check` that found unfinished commits, 4 the store's disk is full (the message names
the store and the space needed; every committed step is kept).
Heavy libraries are imported inside the commands so `vieval parse` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_CHECKPOINTS_FAILED = 0, 1, 2, 3
EXIT_CHECK_FOUND = 3  # `vieval check`: orphans or steps to evaluate again
EXIT_STORE_FULL = 4


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(float(v)) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W,H (e.g. 640,480), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return w, h


def _report_to_option(p: argparse.ArgumentParser) -> None:
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


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            "expected KEY=VALUE (what was given is not shown: it may be a secret)"
        )
    return key.strip(), value


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        "-o",
        dest="storage_options",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="object-storage option for an s3://, gs:// or az:// store, e.g. "
        "AWS_ENDPOINT_URL=http://host:9000 (repeatable; AWS_* environment variables apply too)",
    )


def _storage_options(args) -> dict[str, str] | None:
    return dict(getattr(args, "storage_options", None) or []) or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vieval", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser(
        "run", help="evaluate a run's checkpoints once (resumes; skips stored steps)"
    )
    p.add_argument("config", help="evaluation config (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. batch_size=16")
    p.add_argument("--force", action="store_true", help="re-evaluate steps already stored")
    _report_to_option(p)

    p = sub.add_parser("watch", help="evaluate checkpoints as training writes them")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    _report_to_option(p)

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
    _stats_arguments(p)
    _add_storage_options(p)

    p = sub.add_parser(
        "compare", help="paired comparison of two steps (or two runs' steps) on shared specimens"
    )
    p.add_argument("store")
    p.add_argument("step_a", metavar="STEP_A", help="a step, or RUN:STEP for another run")
    p.add_argument("step_b", metavar="STEP_B", help="a step, or RUN:STEP for another run")
    p.add_argument("--run", help="the run of plain steps (default: the store's only run)")
    p.add_argument("--metric", help="f1, precision, recall, acc_at_50; exact_match, ... (VQA)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    _stats_arguments(p)
    _add_storage_options(p)

    p = sub.add_parser(
        "check", help="list unfinished commits (orphan predictions) and steps to evaluate again"
    )
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("rescore", help="re-parse and re-score stored raw text (no model needed)")
    p.add_argument("store")
    p.add_argument("--run", help="only this run id")
    _add_storage_options(p)

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
    _add_storage_options(p)

    p = sub.add_parser("export", help="write the viewer as static files")
    p.add_argument("stores", nargs="+")
    p.add_argument("--html", required=True, metavar="DIR")
    _add_storage_options(p)

    p = sub.add_parser("compact", help="compact small files and vacuum past a retention window")
    p.add_argument("store")
    p.add_argument("--retention-hours", type=float, default=168.0)
    _add_storage_options(p)

    p = sub.add_parser("demo", help="build a tiny run, evaluate it and open the viewer")
    p.add_argument("--task", choices=("grounding", "vqa"), default="grounding")
    p.add_argument("--out", default="vieval-demo", metavar="DIR")
    p.add_argument("--no-view", action="store_true", help="print the store path instead of serving")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)

    p = sub.add_parser("parse", help="parse one model output from stdin (debugging aid)")
    p.add_argument("--format", dest="fmt", help="output format, e.g. qwen25_vl_json")
    p.add_argument("--image-size", type=_size, help="original image W,H")
    p.add_argument("--input-size", type=_size, help="resized model-input W,H (qwen25_vl_json)")
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


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0: reproducible)")


def cmd_parse(args) -> int:
    from vieval_runner import parsing

    if args.jsonl:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                result = {"status": "error", "error": f"not JSON: {exc}"}
            else:
                result = parsing.parse_record(record)
            sys.stdout.write(json.dumps(result) + "\n")
        return EXIT_OK
    if not args.fmt or not args.image_size:
        print(
            "vieval parse: --format and --image-size are required (or use --jsonl)", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    if args.fmt not in parsing.FORMATS:
        allowed = ", ".join(sorted(parsing.FORMATS))
        print(f"vieval parse: unknown format {args.fmt!r} (allowed: {allowed})", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = parsing.parse_grounding(
        sys.stdin.read(),
        args.fmt,
        args.image_size,
        input_size=args.input_size,
        coords=args.coords,
        truncated=args.truncated,
    )
    print(json.dumps(parsing.result_to_json(result)))
    return EXIT_OK


def run_overrides(args) -> list[str]:
    """The config overrides of `run`/`watch`: the positional ones, then the options'."""
    overrides = list(args.overrides) + (["force=true"] if getattr(args, "force", False) else [])
    if getattr(args, "report_to", None):
        overrides.append(f"report_to=[{','.join(args.report_to)}]")
    return overrides


def cmd_run(args, watch: bool = False) -> int:
    import logging

    from rich.console import Console

    from vieval_runner import report, store
    from vieval_runner.config import ConfigError, load_config
    from vieval_runner.pipeline import ranks as process_group
    from vieval_runner.pipeline import run as runner
    from vieval_runner.pipeline.logfile import attach_run_log
    from vieval_runner.pipeline.preflight import validate_setup

    config = load_config(args.config, run_overrides(args))
    if watch and process_group.world_size() > 1:
        raise ConfigError("vieval watch runs in one process; launch `vieval run` on several")
    notes = validate_setup(config, watch=watch)  # before the store or its log folder exist
    ranks = process_group.setup()  # None unless started by accelerate launch / torchrun
    main_rank = ranks is None or ranks.is_main
    console = Console(quiet=not main_rank)  # one set of progress bars and messages: rank 0's
    log_path = attach_run_log(config)
    for note in notes:
        console.print(f"[yellow]{note}[/]")
        logging.getLogger("vieval").warning(note)
    process_group.tag_logs(ranks)
    if log_path:
        console.print(f"[dim]log: {log_path}[/]")
    if watch:
        from vieval_runner.pipeline import watch as watch_mod

        outcome = watch_mod.watch(config, console)
    else:
        outcome = runner.run(config, console)
    if not main_rank:
        process_group.finish(ranks)
        return outcome.exit_status  # the same outcome as rank 0's
    reader = store.open_store(config.store, storage_options=config.storage_options or None)
    report.print_summary(report.summarize(reader, config.effective_run_id), console)
    if outcome.failed:
        steps = ", ".join(f"{s} ({e})" for s, e in sorted(outcome.failed.items()))
        console.print(f"[red]{len(outcome.failed)} checkpoint(s) failed[/]: {steps}")
    console.print(
        f"evaluated steps {outcome.evaluated}, skipped (already stored) {outcome.skipped}"
        + (f", not complete yet {outcome.incomplete}" if outcome.incomplete else "")
    )
    if outcome.timings.get("samples"):
        console.print(_time_line(outcome.timings, config.overlap), soft_wrap=True)
    print(f"store: {config.store}", flush=True)
    process_group.finish(ranks)
    return outcome.exit_status


def cmd_summary(args) -> int:
    from rich.console import Console

    from vieval_runner import report, store

    reader = store.open_store(
        args.store, as_of=_as_of(args.as_of), storage_options=_storage_options(args)
    )
    kw = {"n_resamples": args.resamples, "seed": args.seed}
    if args.by:
        from vieval_runner import breakdown

        rows = breakdown.breakdown(reader, args.by, args.run, **kw)
        if args.json:
            print(json.dumps(rows, default=str))
        else:
            breakdown.print_breakdown(rows, args.by, Console())
        return EXIT_OK
    summaries = report.summarize(reader, args.run, **kw)
    if args.json:
        print(
            json.dumps(
                {"store": args.store, "version": reader.version, "runs": summaries}, default=str
            )
        )
    else:
        report.print_summary(summaries, Console())
    return EXIT_OK


def cmd_compare(args) -> int:
    from rich.console import Console

    from vieval_runner import evidence, report, store

    reader = store.open_store(args.store, storage_options=_storage_options(args))
    runs = reader.runs()
    run = args.run
    if run is None:
        if len(runs) != 1:
            raise store.StoreError(
                f"{args.store} holds runs {', '.join(runs) or '(none)'}: name one with --run"
            )
        run = runs[0]
    (run_a, step_a), (run_b, step_b) = _run_step(args.step_a, run), _run_step(args.step_b, run)
    task = report.run_task(reader, run_b)
    got = evidence.compare(
        reader, task, run_a, step_a, run_b, step_b, args.metric,
        n_resamples=args.resamples, seed=args.seed,
    )  # fmt: skip
    if args.json:
        print(json.dumps(evidence.nan_free(got)))
    else:
        report.print_comparison(got, Console())
    return EXIT_OK


def _run_step(text: str, default_run: str) -> tuple[str, int]:
    run, _, step = text.rpartition(":")
    if not step.isdigit():
        from vieval_runner.store import StoreError

        raise StoreError(f"{text!r} is not a step (e.g. 400) or RUN:STEP (e.g. base:0)")
    return run or default_run, int(step)


def cmd_check(args) -> int:
    from vieval_runner import store

    found = store.check_store(args.store, storage_options=_storage_options(args))
    problems = len(found["orphans"]) + len(found["replaced"]) + len(found["lost"])
    if args.json:
        print(json.dumps(found, default=str))
        return EXIT_CHECK_FOUND if problems else EXIT_OK
    print(f"store {args.store}: {found['committed']} committed step(s)")
    for o in found["orphans"]:
        print(
            f"orphan: run {o['run_id']} step {o['step']}: {o['rows']} prediction row(s) of "
            f"evaluation {o['eval_id']} ({o['why']}); readers ignore them, the next run of "
            "the step replaces them"
        )
    for r in found["replaced"]:
        print(
            f"replaced: run {r['run_id']} step {r['step']}: its committed predictions are "
            f"read at version {r['predictions_version']} (an unfinished commit replaced them); "
            "evaluate the step again before vacuum removes that version"
        )
    for r in found["lost"]:
        print(
            f"lost: run {r['run_id']} step {r['step']}: its committed predictions cannot be "
            "read any more; evaluate the step again"
        )
    if not problems:
        print("no unfinished commits: every stored prediction belongs to a committed step")
    return EXIT_CHECK_FOUND if problems else EXIT_OK


def _as_of(value: str | None):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def cmd_rescore(args) -> int:
    from rich.console import Console

    from vieval_runner import report, store
    from vieval_runner.pipeline import rescore

    console = Console()
    options = _storage_options(args)
    steps = rescore.rescore_store(
        args.store, run_id=args.run, console=console, storage_options=options
    )
    console.print(f"rescored {len(steps)} step(s)")
    reader = store.open_store(args.store, storage_options=options)
    report.print_summary(report.summarize(reader, args.run), console)
    return EXIT_OK


def cmd_view(args) -> int:
    import re

    from vieval_runner.viewer import serve

    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,}", args.token):
        print(
            "vieval view: --token must be at least 8 letters, digits or - _ . ~ "
            "(it travels in a URL and a cookie)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    server = serve(
        args.stores,
        host=args.host,
        port=args.port,
        token=args.token,
        storage_options=_storage_options(args),
    )
    if not server.loopback:
        print(
            f"warning: the viewer on {args.host} has no accounts: anyone who can reach this "
            "machine and has the URL below (its token) can read these evaluations",
            file=sys.stderr,
            flush=True,
        )
    print(f"viewer: {server.url}  (Ctrl+C to stop)", flush=True)
    server.serve_until_interrupted()
    return EXIT_OK


def cmd_export(args) -> int:
    from vieval_runner import store
    from vieval_runner.viewer import export_html

    # unlike `view`, which waits for a store's first step, an export of no store is an error
    for root in args.stores:
        store.open_store(
            root, storage_options=_storage_options(args)
        )  # StoreError naming the root when it is no store
    index = export_html(args.stores, args.html, storage_options=_storage_options(args))
    print(f"exported: {index}")
    return EXIT_OK


def cmd_compact(args) -> int:
    from vieval_runner import store

    result = store.compact(
        args.store, retention_hours=args.retention_hours, storage_options=_storage_options(args)
    )
    print(json.dumps(result, default=str, indent=2))
    return EXIT_OK


def cmd_demo(args) -> int:
    from vieval_runner.demo import main as demo

    return demo.main(
        task=args.task, out=args.out, view=not args.no_view, seed=args.seed, port=args.port
    )


COMMANDS = {
    "run": cmd_run,
    "watch": lambda args: cmd_run(args, watch=True),
    "summary": cmd_summary,
    "compare": cmd_compare,
    "check": cmd_check,
    "rescore": cmd_rescore,
    "view": cmd_view,
    "export": cmd_export,
    "compact": cmd_compact,
    "demo": cmd_demo,
    "parse": cmd_parse,
}


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user's input is wrong (exit 2); those of heavier modules
    only when a command imported them (``vieval parse`` stays cheap)."""
    from vieval_runner.records import CheckpointError, DataError

    errors: list[type[BaseException]] = [FileNotFoundError, DataError, CheckpointError]
    for module, name in (
        ("vieval_runner.config", "ConfigError"),
        ("vieval_runner.store", "StoreError"),
        ("vieval_runner.objectstore", "StorageOptionsError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            errors.append(getattr(mod, name))
    return tuple(errors)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``kill`` send), handled the way Ctrl+C is."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from vieval_runner.version import __version__

        print(__version__)
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}; the store keeps every step committed so far", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    except Exception as exc:
        full = getattr(sys.modules.get("vieval_runner.store.schema"), "StoreFull", ())
        if isinstance(exc, full):  # before StoreError (bad input): its own status
            print(f"vieval {args.command}: {exc}", file=sys.stderr, flush=True)
            return EXIT_STORE_FULL
        if isinstance(exc, _bad_input_errors()):
            print(f"vieval {args.command}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        import traceback

        traceback.print_exc()
        print(
            f"vieval {args.command}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())


def _time_line(t: dict[str, float], overlap: bool) -> str:
    """Where a run's time went, in one line."""
    rate = t["samples"] / t["generate_s"] if t["generate_s"] else 0.0
    parts = [f"generating {t['generate_s']:.1f}s ({t['samples']:.0f} samples, {rate:.0f}/s)",
             f"swapping weights {t['load_s']:.1f}s"]  # fmt: skip
    if "prepare_s" in t:
        how = "reused" if t.get("prepare_reused") else "once per run"
        parts.append(f"inputs {t['prepare_s']:.1f}s ({how})")
    parts.append(f"commits {t['commit_s']:.1f}s{' (beside generation)' if overlap else ''}")
    return f"time  {t['wall_s']:.1f}s in all: " + ", ".join(parts)
