"""Benchmark the viewer's first view on a big store against the naive way to load the same data.

Builds (or reuses, cached under ``--out``) a synthetic store of 10,000 specimens x 50 steps
WITH a specimens table (64x48 JPEG thumbnails, one reference box each) using
``bench_store.build_store``, then times, from ``serve([store], port=0)`` to the page having
what it needs to draw the first specimen: the JSON of ``/api/meta``, ``/api/specimens``,
``/api/step`` for the first run's latest step, and the first specimen's ``/thumb``

  - cold: a fresh server (the first one in the process also imports scoring/torch),
  - warm: the same requests again on the same server (a browser reload),
  - process: a fresh ``python -m vieval_runner view`` (interpreter start and imports
    included), what a user waits for after typing the command,
  - browser: if ``/usr/bin/chromium`` exists, the real first paint in headless Chromium via
    Playwright on a fresh ``vieval view`` process: navigation start until the frame that
    paints the first specimen's predicted SVG boxes (measured in the page), then a reload.

Baseline: what a user does without the viewer: ``polars.read_delta`` of the whole
predictions table filtered to that step plus the whole specimens table, as Python rows, and
those rows as JSON for a page. The LAST line printed is the ratio baseline / our cold first
view (fresh server), with the read-only baseline's ratio in brackets.

    .venv/bin/python scripts/bench_viewer.py [--specimens N] [--steps S] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runs from a bare checkout too

from vieval_runner.viewer.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

# The first specimen's predicted boxes, drawn in the first run's panel (see static/app.js).
BOXES_DRAWN = "#panels .panel.run svg g.boxes g.box rect"
TARGET_S = 2.0


def _bench_store():
    """``scripts/bench_store.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_store", HERE / "bench_store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {resp.status}")
        return resp.read()


def _json(url: str):
    body = _get(url)
    # The page parses in the browser, not here: keep this process's cyclic GC (which walks
    # the in-process server's objects, torch's included) from billing its parse 5-10x.
    was = gc.isenabled()
    gc.disable()
    try:
        return json.loads(body)
    finally:
        if was:
            gc.enable()


def first_view(base: str) -> dict[str, float]:
    """Fetch what the page needs for its first specimen, in the page's order; seconds each."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    meta = _json(base + "api/meta")
    times["meta"] = time.perf_counter() - t
    if meta.get("waiting"):
        raise RuntimeError(f"viewer at {base} is still waiting: {meta.get('message')}")
    t = time.perf_counter()
    specimens = _json(base + "api/specimens")["specimens"]
    times["specimens"] = time.perf_counter() - t
    run = meta["runs"][0]
    t = time.perf_counter()
    doc = _json(f"{base}api/step?run={run['key']}&step={max(run['steps'])}")
    times["step"] = time.perf_counter() - t
    t = time.perf_counter()
    thumb = _get(base + specimens[0]["thumb"])
    times["thumb"] = time.perf_counter() - t
    if not doc["rows"] or not thumb:
        raise RuntimeError("first view incomplete: no rows or no thumbnail")
    times["total"] = sum(times.values())
    return times


def _fmt(times: dict[str, float]) -> str:
    parts = [f"{k} {1000 * v:.0f}" for k, v in times.items() if k != "total"]
    return f"{times['total']:.2f} s  ({', '.join(parts)} ms)"


def bench_http(root: str, repeat: int) -> tuple[dict, list[dict], dict]:
    """(first cold in process, cold fresh servers, warm) first-view timings."""
    from vieval_runner.viewer import serve

    colds = []
    warm: dict = {}
    for k in range(repeat + 1):
        t0 = time.perf_counter()
        srv = serve([root], port=0).start()
        started = time.perf_counter() - t0
        try:
            times = {"serve": started, **first_view(srv.url)}
            times["total"] = time.perf_counter() - t0
            colds.append(times)
            if k == 0:
                warm = first_view(srv.url)
        finally:
            srv.shutdown()
    return colds[0], colds[1:], warm


@contextlib.contextmanager
def _view_process(root: str) -> Iterator[tuple[str, float]]:
    """Spawn ``python -m vieval_runner view STORE`` and wait until it answers; yields (its
    URL, seconds from spawn to listening: interpreter start and imports included)."""
    with socket.socket() as sock:  # a free port (the tiny race with other jobs is harmless)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "vieval_runner", "view", root, "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "style.css", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()}") from None
                time.sleep(0.02)
        yield base, time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_process(root: str) -> dict[str, float]:
    """What a user waits for: spawn ``vieval view``, then the first view."""
    t0 = time.perf_counter()
    with _view_process(root) as (base, started):
        times = {"start": started, **first_view(base)}
        times["total"] = time.perf_counter() - t0
    return times


# Records, in the page, when the first run panel's boxes are in the DOM and the frame that
# paints them starts (performance.now(): ms since navigation start). The server runs in its
# own process so this process's Python (Playwright's client) never competes with it.
_MARK_BOXES = """
new MutationObserver((_, obs) => {
  if (window.__boxesAt || !document.querySelector(SELECTOR)) return;
  window.__boxesAt = performance.now();
  requestAnimationFrame(() => { window.__paintAt = performance.now(); });
  obs.disconnect();
}).observe(document, {childList: true, subtree: true});
""".replace("SELECTOR", json.dumps(BOXES_DRAWN))


def bench_browser(root: str) -> dict[str, float] | None:
    """Headless Chromium on a fresh ``vieval view`` process: navigation start -> the first
    specimen's predicted boxes painted, then the same after a reload (warm server)."""
    if not os.path.exists(CHROMIUM):
        print(f"browser: skipped ({CHROMIUM} is missing)")
        return None
    from playwright.sync_api import sync_playwright

    out: dict[str, float] = {}
    with sync_playwright() as pw, _view_process(root) as (base, _):
        t = time.perf_counter()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        out["launch"] = time.perf_counter() - t
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.add_init_script(_MARK_BOXES)
            for name in ("cold", "reload"):
                t = time.perf_counter()
                if name == "cold":
                    page.goto(base)
                else:
                    page.reload()
                page.wait_for_function("() => window.__paintAt !== undefined", timeout=120_000)
                out[f"{name}_wall"] = time.perf_counter() - t
                out[name] = page.evaluate("window.__paintAt") / 1000
                if not page.eval_on_selector("#spec-id", "e => e.textContent"):
                    raise RuntimeError("boxes drawn but no specimen id shown")
        finally:
            browser.close()
    return out


def bench_naive(root: str, run: str) -> tuple[float, float]:
    """A user's quick viewer: ``polars.read_delta`` of the whole predictions and specimens
    tables, the latest step filtered out, as rows; then those rows as JSON for a page.
    Returns (read seconds, read + JSON seconds)."""
    import polars as pl

    from vieval_runner.store import table_uri

    t = time.perf_counter()
    preds = pl.read_delta(table_uri(root, "predictions"))
    latest = preds.filter(pl.col("run_id") == run)["step"].max()
    rows = preds.filter((pl.col("run_id") == run) & (pl.col("step") == latest)).to_dicts()
    specimens = pl.read_delta(table_uri(root, "specimens")).to_dicts()
    if not rows or not specimens or specimens[0]["image_bytes"] is None:
        raise RuntimeError("naive read found no rows/specimens/thumbnail")
    read = time.perf_counter() - t
    for s in specimens:
        s.pop("image_bytes")  # served separately, as /thumb is
    json.dumps([rows, specimens], default=str)
    return read, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimens", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3, help="fresh cold servers to time")
    ap.add_argument("--no-browser", action="store_true", help="skip headless Chromium")
    ap.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "vieval-bench"),
        help="folder caching the built store (reused by later runs)",
    )
    args = ap.parse_args()
    bs = _bench_store()
    path, build_s, reused = bs.build_store(
        args.out, args.specimens, args.steps, with_specimens=True
    )
    root = str(path)
    print(f"store: {root}  {args.specimens} specimens x {args.steps} steps, with specimens")
    print(f"build: {build_s:.1f} s" + ("  (cached store reused)" if reused else ""))

    first, colds, warm = bench_http(root, args.repeat)
    cold = statistics.median(c["total"] for c in colds)
    print(f"first view, first server in process (imports scoring): {_fmt(first)}")
    for k, c in enumerate(colds):
        print(f"first view, cold fresh server {k + 1}: {_fmt(c)}")
    print(f"first view, warm (same server again): {_fmt(warm)}")
    print(f"first view cold median: {cold:.2f} s  (target < {TARGET_S:.0f} s: "
          f"{'met' if cold < TARGET_S else 'NOT met'})")  # fmt: skip

    if not args.no_browser:
        got = bench_browser(root)
        if got is not None:
            print(
                f"browser (headless Chromium, server in its own process, launch "
                f"{got['launch']:.2f} s not counted): navigation -> first specimen's boxes "
                f"painted: cold server {got['cold']:.2f} s, after reload {got['reload']:.2f} s "
                f"(wall incl. Playwright round trips {got['cold_wall']:.2f} / "
                f"{got['reload_wall']:.2f} s)"
            )

    proc = bench_process(root)
    print(f"first view, fresh `python -m vieval_runner view` process: {_fmt(proc)}")

    naive = [bench_naive(root, bs.RUN) for _ in range(2)]
    read = statistics.median(n[0] for n in naive)
    with_json = statistics.median(n[1] for n in naive)
    print(f"naive polars.read_delta (whole tables, latest step, as rows): {read:.2f} s")
    print(f"naive polars.read_delta + the rows as JSON for a page: {with_json:.2f} s")
    print(
        f"ratio (naive read+JSON / ours cold first view): {with_json / cold:.1f}  "
        f"(naive read only / ours: {read / cold:.1f})"
    )


if __name__ == "__main__":
    main()
