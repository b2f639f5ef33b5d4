"""The `vieval` commands: each takes the parsed arguments and returns an exit status. Heavy
libraries are imported inside them so `vieval parse` stays fast."""

from __future__ import annotations

import json
import sys

from vieval_runner.cli.arguments import storage_options
from vieval_runner.cli.exits import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FOUND,
    EXIT_OK,
)


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
        console.print(time_line(outcome.timings, config.overlap), soft_wrap=True)
    print(f"store: {config.store}", flush=True)
    process_group.finish(ranks)
    return outcome.exit_status


def cmd_summary(args) -> int:
    from rich.console import Console

    from vieval_runner import report, store

    reader = store.open_store(
        args.store, as_of=as_of(args.as_of), storage_options=storage_options(args)
    )
    kw = {"n_resamples": args.resamples, "ap_resamples": args.ap_resamples, "seed": args.seed}
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

    reader = store.open_store(args.store, storage_options=storage_options(args))
    runs = reader.runs()
    run = args.run
    if run is None:
        if len(runs) != 1:
            raise store.StoreError(
                f"{args.store} holds runs {', '.join(runs) or '(none)'}: name one with --run"
            )
        run = runs[0]
    (run_a, step_a), (run_b, step_b) = run_step(args.step_a, run), run_step(args.step_b, run)
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


def run_step(text: str, default_run: str) -> tuple[str, int]:
    run, _, step = text.rpartition(":")
    if not step.isdigit():
        from vieval_runner.store import StoreError

        raise StoreError(f"{text!r} is not a step (e.g. 400) or RUN:STEP (e.g. base:0)")
    return run or default_run, int(step)


def cmd_check(args) -> int:
    from vieval_runner import store

    found = store.check_store(args.store, storage_options=storage_options(args))
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


def as_of(value: str | None):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def cmd_rescore(args) -> int:
    from rich.console import Console

    from vieval_runner import report, store
    from vieval_runner.pipeline import rescore

    console = Console()
    options = storage_options(args)
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
        storage_options=storage_options(args),
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
            root, storage_options=storage_options(args)
        )  # StoreError naming the root when it is no store
    index = export_html(args.stores, args.html, storage_options=storage_options(args))
    print(f"exported: {index}")
    return EXIT_OK


def cmd_compact(args) -> int:
    from vieval_runner import store

    result = store.compact(
        args.store, retention_hours=args.retention_hours, storage_options=storage_options(args)
    )
    print(json.dumps(result, default=str, indent=2))
    return EXIT_OK


def cmd_demo(args) -> int:
    from vieval_runner.demo import main as demo

    return demo.main(
        task=args.task, out=args.out, view=not args.no_view, seed=args.seed, port=args.port
    )


def time_line(t: dict[str, float], overlap: bool) -> str:
    """Where a run's time went, in one line."""
    rate = t["samples"] / t["generate_s"] if t["generate_s"] else 0.0
    parts = [f"generating {t['generate_s']:.1f}s ({t['samples']:.0f} samples, {rate:.0f}/s)",
             f"swapping weights {t['load_s']:.1f}s"]  # fmt: skip
    if "prepare_s" in t:
        how = "reused" if t.get("prepare_reused") else "once per run"
        parts.append(f"inputs {t['prepare_s']:.1f}s ({how})")
    parts.append(f"commits {t['commit_s']:.1f}s{' (beside generation)' if overlap else ''}")
    return f"time  {t['wall_s']:.1f}s in all: " + ", ".join(parts)
