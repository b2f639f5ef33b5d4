"""Intervals, significance and breakdowns in the viewer: the meta/step documents, the compare
endpoint, and the page in a real headless Chromium (Playwright; the system browser)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from vieval_runner.testing.stat_stores import UNDECODABLE_LABEL, build_stat_store
from vieval_runner.viewer import serve
from vieval_runner.viewer.rows import visible


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence") / "st"
    build_stat_store(root, n=150, training_log=True)
    srv = serve([str(root)], port=0, poll_seconds=30).start()
    yield srv
    srv.shutdown()


def api(srv, path: str):
    with urllib.request.urlopen(srv.url + path, timeout=60) as r:
        return json.loads(r.read())


def test_visible_escapes_undecodable_bytes():
    assert visible(UNDECODABLE_LABEL) == "caf\\ufffd\\ufffd"
    assert visible("a\udcffb") == "a\\xffb"  # a surrogate-escaped byte keeps its value
    assert visible("tab\there") == "tab\\u0009here" and visible("plain") == "plain"


def test_meta_and_step_documents_carry_evidence(server):
    (run,) = api(server, "api/meta")["runs"]
    assert all(len(a["f1_ci95"]) == 2 for a in run["aggregates"])  # stored with the evaluation
    best = run["best"]  # steps 200 and 300 hit 80% / 81%: the best is no clear winner
    assert best["step"] in (200, 300) and best["significant"] is False
    assert best["vs_next"]["p_value"] > 0.05
    doc = api(server, f"api/step?run={run['key']}&step=300")
    sizes = {r["slice"]: r["n"] for r in doc["breakdown"]["size"]}
    assert sizes == {"small": 50, "medium": 50, "large": 50}
    assert {r["slice"] for r in doc["breakdown"]["source"]} == {"phone", "web"}
    got = api(server, f"api/compare?run={run['key']}&a=0&b=300")
    assert got["significant"] and got["difference"] > 0.4 and got["n"] == 150


def test_intervals_recomputed_for_a_store_that_stored_none(tmp_path):
    from vieval_runner.scoring import step_intervals
    from vieval_runner.store import open_store
    from vieval_runner.testing.stores import make_grounding_store

    root = make_grounding_store(tmp_path / "old")  # written without evaluations.ci95
    with serve([str(root)], port=0, poll_seconds=30).start() as srv:
        run = next(r for r in api(srv, "api/meta")["runs"] if r["run_id"] == "run-a")
    table = open_store(str(root)).step("run-a", 300)
    rows = {c: table.column(c).to_pylist() for c in ("tp", "fp", "fn", "acc_at_50")}
    want = step_intervals("grounding", rows)["f1"]
    got = next(a for a in run["aggregates"] if a["step"] == 300)["f1_ci95"]
    assert got == want


@pytest.mark.browser
def test_page_bands_marker_breakdown_filter_ticks_and_labels(browser, server):
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("#specimen-list li", timeout=30000)

    # interval bands behind the F1 curve, one polygon per run and metric with intervals
    assert page.locator('#metric-chart polygon.ci-band[data-metric="f1"]').count() == 1
    # the best step's marker says it is not significantly better than the next best
    marker = page.locator("#metric-chart .best-marker")
    assert marker.get_attribute("data-significance") == "not-significant"
    assert "(n.s.)" in marker.locator("text").text_content()
    # x ticks only at evaluated steps, though the loss is logged every 11 steps
    ticks = page.eval_on_selector_all(
        "#metric-chart text.tick.x", "els => els.map(e => e.textContent)"
    )
    assert ticks and set(ticks) <= {"0", "100", "200", "300"}

    # the breakdown: slices with n; clicking one filters the list, clicking again clears it
    page.wait_for_selector("#breakdown-table tr.bd-row")
    page.select_option("#breakdown-by", "size")
    rows = page.locator("#breakdown-table tr.bd-row")
    assert rows.count() == 3
    page.click('#breakdown-table tr.bd-row[data-slice="small"]')
    page.wait_for_function("document.querySelector('#list-count').textContent.startsWith('50 of')")
    page.click('#breakdown-table tr.bd-row[data-slice="small"]')
    page.wait_for_function("document.querySelector('#list-count').textContent.startsWith('150 of')")

    # 'worse since step N' at run level: a paired test, not just the per-specimen filter
    page.select_option("#filter-worse", "0")
    page.wait_for_selector("#worse-verdict:not([hidden])")
    verdict = page.locator("#worse-verdict")
    assert "since step 0" in verdict.inner_text() and "significantly better" in verdict.inner_text()

    # a box label of undecodable bytes shows as an escape, never as a replacement character
    page.select_option("#filter-worse", "")
    page.fill("#search", "s0000")
    page.click('#specimen-list li[data-id="s0000"]')
    page.wait_for_selector("#panels svg.fig")
    labels = page.eval_on_selector_all("#panels text", "els => els.map(e => e.textContent)")
    assert any("caf\\ufffd\\ufffd" in t for t in labels), labels
    assert not any("\ufffd" in t for t in labels)
    ctx.close()
    assert not errors, errors
