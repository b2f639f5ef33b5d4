"""How the project drives a real browser: Debian's Chromium, headless, never downloaded.

Shared by the browser tests, ``scripts/screenshot_viewer.py`` and ``scripts/bench_viewer.py``;
the flags keep Chromium off the network (this machine has none beyond the registries).
"""

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
