"""The viewer on a store that lives on a real S3-compatible server (SeaweedFS on loopback),
in headless Chromium; no credential reaches the page or the API."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from vieval_runner.testing.s3_server import ACCESS_KEY, SECRET_KEY
from vieval_runner.testing.stores import make_grounding_store
from vieval_runner.viewer import export_html, serve
from vieval_runner.viewer.chromium import CHROMIUM
from vieval_runner.viewer.chromium import CHROMIUM_ARGS as ARGS

pytestmark = [pytest.mark.s3, pytest.mark.browser]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode("utf-8", "replace")


def test_viewer_reads_an_s3_store_in_chromium(s3_server, s3_bucket, monkeypatch, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install the distribution's chromium package")
    sync_api = pytest.importorskip("playwright.sync_api")
    url = f"s3://{s3_bucket}/viewer-store"
    # written with the standard AWS environment variables only
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    make_grounding_store(url)
    for key in s3_server.env():
        monkeypatch.delenv(key)
    # read with explicit options (the environment no longer has them)
    srv = serve([url], port=0, poll_seconds=0.3, storage_options=s3_server.storage_options())
    srv.start()
    try:
        meta = json.loads(_get(srv.url + "api/meta"))
        assert [r["run_id"] for r in meta["runs"]] == ["run-a", "run-b"]
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url)
            page.wait_for_selector("#specimen-list li", timeout=30000)
            page.wait_for_selector('#panels[data-step="300"]', timeout=30000)
            assert page.locator("#specimen-list li").count() == 6
            page.click('#specimen-list li[data-id="cat-001"]')
            page.wait_for_function("document.querySelector('#spec-id').textContent === 'cat-001'")
            # the specimen's image comes from the S3 store
            loaded = page.evaluate("() => [...document.querySelectorAll('svg.fig image')].length")
            assert loaded >= 1
            page.wait_for_timeout(1500)  # the full-size image streams from the S3 store
            html = page.content()
            page.screenshot(path=str(tmp_path / "s3-viewer.png"))
            browser.close()
        assert not errors, errors
        texts = [html, json.dumps(meta)]
        run_key = meta["runs"][0]["key"]
        texts.append(_get(srv.url + f"api/step?run={run_key}&step=300"))
        for text in texts:
            assert SECRET_KEY not in text and ACCESS_KEY not in text
        with urllib.request.urlopen(srv.url + "img/0", timeout=30) as r:
            assert r.read()[:3] == b"\xff\xd8\xff"  # the stored JPEG, read from S3
    finally:
        srv.shutdown()
    # the static export reads the S3 store too
    index = export_html([url], tmp_path / "html", storage_options=s3_server.storage_options())
    exported = "".join(p.read_text(errors="replace") for p in index.parent.rglob("*.js"))
    assert "cat-001" in exported and SECRET_KEY not in exported
