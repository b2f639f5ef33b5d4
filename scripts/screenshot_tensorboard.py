"""Screenshot TensorBoard on the demo run (for the README): evaluate the demo's checkpoints
with ``report_to: [tensorboard]``, start a real ``tensorboard`` server on loopback, capture its
Time Series page (vieval scalars and sample images) in headless Chromium, stop the server.

    .venv/bin/python scripts/screenshot_tensorboard.py [--demo vieval-demo] [--out docs/tensorboard.png]

The demo is trained first (as ``vieval demo`` does) unless ``--demo`` already holds it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

from vieval_runner.viewer.chromium import CHROMIUM, CHROMIUM_ARGS

SCALARS = ("f1", "recall", "iou_mean", "parse_failure_rate")  # the curves shown
SAMPLES = 2  # sample-specimen image cards shown
IMAGE_STEP_INDEX = 1  # their step slider's position (0: the base model)


def evaluate_with_tensorboard(demo: Path) -> Path:
    """Evaluate the demo's checkpoints into a fresh store with report_to tensorboard; return
    the TensorBoard logdir."""
    from rich.console import Console

    from vieval_runner.config import load_config
    from vieval_runner.demo.main import build_demo
    from vieval_runner.pipeline import run as runner

    config_path = build_demo(demo, "grounding", 0, Console())  # trains only if not trained yet
    logdir = demo / "tensorboard"
    overrides = [
        f"store={demo / 'store-tensorboard'}",
        "report_to=[tensorboard]",
        f"logging_dir={logdir}",
    ]
    config = load_config(config_path, overrides)
    if not (logdir / config.effective_run_id).is_dir():
        runner.run(config)
    return logdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    binary = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(binary), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "data/environment", timeout=2)
            return server, url
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"tensorboard exited with status {server.returncode}") from None
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("tensorboard did not answer within 120 s")


def sample_tags(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    (run,) = [d for d in logdir.iterdir() if d.is_dir()]
    events = ea.EventAccumulator(str(run), size_guidance={ea.IMAGES: 1})
    events.Reload()
    return sorted(t for t in events.Tags()["images"] if t.startswith("vieval/sample/"))


def capture(url: str, out: Path, samples: list[str]) -> None:
    shown = "|".join([*(f"vieval/{m}" for m in SCALARS), *map(re.escape, samples)])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1060})
        # forceSVG: headless Chromium without a GPU draws no WebGL lines
        page.goto(url + "?forceSVG=true#timeseries")
        page.wait_for_selector("text=/^vieval\\//", timeout=60_000)  # the first cards
        page.wait_for_selector("text=Smoothed", timeout=60_000)  # a chart's table is drawn
        smoothing = page.locator("input[aria-labelledby='scalars-smoothing-label']")
        for _ in range(5):  # the measured values, not a moving average
            smoothing.fill("0")
            smoothing.press("Tab")
            page.wait_for_timeout(1000)
            if page.locator("text=Smoothed").count() == 0:
                break
        close = page.locator("button[aria-label='Close side pane']")
        if close.count():
            close.first.click()
        tags = page.locator("input[placeholder='Filter tags (regex)']")
        tags.fill(f"^({shown})$")
        tags.press("Escape")  # the suggestions list closes
        page.mouse.click(700, 1040)  # off the input
        page.wait_for_selector("text=vieval/f1", timeout=60_000)
        page.wait_for_timeout(3000)  # charts and images load
        for slider in page.locator("input.mdc-slider__input[type=range]").all():
            slider.focus()  # each image card's own step slider: back to an early step
            slider.press("Home")
            for _ in range(IMAGE_STEP_INDEX):
                slider.press("ArrowRight")
        page.evaluate("document.activeElement.blur()")  # no focus ring in the picture
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="vieval-demo", help="demo folder (built if missing)")
    ap.add_argument("--out", default="docs/tensorboard.png")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logdir = evaluate_with_tensorboard(Path(args.demo).resolve())
    server, url = start_tensorboard(logdir)
    try:
        capture(url, Path(args.out), sample_tags(logdir)[:SAMPLES])
    finally:
        server.terminate()
        server.wait(30)
    print(args.out)


if __name__ == "__main__":
    main()
