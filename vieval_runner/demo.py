"""`vieval demo`: the embedded default. Builds a tiny run offline, evaluates it, shows it.

Leaves ``OUT/run`` (checkpoints), ``OUT/base`` (step 0), ``OUT/data`` (the split),
``OUT/config.yaml`` (a config `vieval run` accepts) and ``OUT/store``; prints the store path
on its last line (with the viewer: its last line before serving).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from rich.console import Console

DEMO_FAMILY = {"grounding": "qwen25_vl", "vqa": "qwen25_vl"}


def write_demo_config(out: Path, task: str) -> Path:
    """The evaluation config of the demo run (relative paths: the folder can move)."""
    config = {
        "run_dir": "run",
        "base_model": "base",
        "store": "store",
        "run_id": f"demo-{task}",
        "task": task,
        "data": {"path": "data/val.jsonl", "format": "jsonl"},
        "batch_size": 8,
        "max_new_tokens": 32,
        "device": "auto",
    }
    path = out / "config.yaml"
    path.write_text(
        "# vieval demo config: `vieval run config.yaml`\n" + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def build_demo(
    out: str | Path, task: str = "grounding", seed: int = 0, console: Console | None = None
) -> Path:
    """Write the demo's run, data and config under ``out``; returns the config path."""
    from transformers.utils import logging as hf_logging

    from vieval_runner import shapes
    from vieval_runner.tiny_models import write_tiny_run

    hf_logging.disable_progress_bar()

    console = console or Console()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]demo[/]  building a tiny {DEMO_FAMILY[task]} run in {out}")
    if not (out / "run").is_dir():
        write_tiny_run(out, DEMO_FAMILY[task], steps=(100, 200, 300), seed=seed)
    shapes.write_split(out / "data", n=24, task=task, seed=seed)
    return write_demo_config(out, task)


def main(
    task: str = "grounding",
    out: str = "vieval-demo",
    view: bool = True,
    seed: int = 0,
    port: int = 8765,
) -> int:
    """Build, evaluate and (optionally) serve the demo; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vieval_runner import report, runner, store
    from vieval_runner.config import load_config
    from vieval_runner.logfile import attach_run_log

    console = Console()
    config_path = build_demo(out, task, seed, console)
    config = load_config(config_path)
    attach_run_log(config)
    outcome = runner.run(config, console)
    report.print_summary(
        report.summarize(store.open_store(config.store), config.effective_run_id), console
    )
    console.print(f"config: {config_path}  (re-run with `vieval run {config_path}`)")
    if view:
        from vieval_runner.viewer import serve

        server = serve([config.store], port=port)
        console.print(f"viewer: {server.url}  (Ctrl+C to stop)")
        print(config.store, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
    else:
        print(config.store, flush=True)
    return outcome.exit_status
