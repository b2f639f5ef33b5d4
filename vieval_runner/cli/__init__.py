"""`vieval` command line: run | watch | rescore | summary | compare | check | view | export |
compact | demo | parse.

Exit status: 0 success, 2 bad input or config (the message names the file/row/key),
1 internal error, 3 a run in which some checkpoints failed (the message says which) or a
`vieval check` that found unfinished commits, 4 the store's disk is full (the message names
the store and the space needed; every committed step is kept).
Heavy libraries are imported inside the commands (``commands``) so `vieval parse` stays fast.
"""

from __future__ import annotations

import sys

from vieval_runner.cli import commands
from vieval_runner.cli.arguments import build_parser
from vieval_runner.cli.exits import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_STORE_FULL

COMMANDS = {
    "run": commands.cmd_run,
    "watch": lambda args: commands.cmd_run(args, watch=True),
    "summary": commands.cmd_summary,
    "compare": commands.cmd_compare,
    "check": commands.cmd_check,
    "rescore": commands.cmd_rescore,
    "view": commands.cmd_view,
    "export": commands.cmd_export,
    "compact": commands.cmd_compact,
    "demo": commands.cmd_demo,
    "parse": commands.cmd_parse,
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
