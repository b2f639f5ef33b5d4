"""Screenshot the viewer on a store (for the README): serve it, open it in headless Chromium,
optionally pick a step and a specimen, save a PNG.

    .venv/bin/python scripts/screenshot_viewer.py STORE docs/demo-viewer.png [--step-index K] [--specimen N]
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright

from vieval_runner.viewer import serve
from vieval_runner.viewer.chromium import CHROMIUM, CHROMIUM_ARGS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("out")
    ap.add_argument("--step-index", type=int, default=None, help="slider position (default: last)")
    ap.add_argument("--specimen", type=int, default=0, help="list position to select")
    args = ap.parse_args()
    server = serve(args.stores, port=0).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(server.url)
            page.wait_for_selector("#specimen-list li")
            if args.step_index is not None:
                page.eval_on_selector(
                    "#step-slider",
                    "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                    args.step_index,
                )
            page.locator("#specimen-list li").nth(args.specimen).click()
            page.wait_for_timeout(800)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.shutdown()
    print(args.out)


if __name__ == "__main__":
    main()
