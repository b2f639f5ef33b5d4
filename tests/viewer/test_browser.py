"""The viewer page in a real headless Chromium (Playwright; the system browser, no download)."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from pathlib import Path

import pytest

from vieval_runner.store import create_store, write_specimens
from vieval_runner.testing.stores import (
    GROUNDING,
    XSS,
    commit_grounding_step,
    grounding_specimens,
    make_grounding_store,
    make_vqa_store,
)
from vieval_runner.viewer import export_html, serve

pytestmark = pytest.mark.browser

# The README's screenshots are refreshed only on request (VIEVAL_SCREENSHOTS=1): a test run
# must not rewrite tracked files. Otherwise they go to a temporary folder (still taken, so a
# page that cannot be rendered still fails).
DOCS = (
    Path(__file__).resolve().parents[2] / "docs"
    if os.environ.get("VIEVAL_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="vieval-screens-"))
)
TOL = 1.5  # px


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    return make_grounding_store(base / "grounding"), make_vqa_store(base / "vqa")


@pytest.fixture(scope="module")
def server(stores):
    srv = serve([str(stores[0])], port=0, poll_seconds=0.3).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def page(browser):
    # bypass_csp: the page's CSP would also stop injected script; the tests prove that model
    # output is rendered as text even without that second line of defence.
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, bypass_csp=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert not errors, errors


def api(srv, path: str):
    with urllib.request.urlopen(srv.url + path, timeout=10) as r:
        return json.loads(r.read())


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#specimen-list li", timeout=15000)


def step_of(page) -> int:
    return int(page.locator("#step-label").inner_text().split()[1])


def wait_step(page, step: int) -> None:
    page.wait_for_selector(f'#panels[data-step="{step}"]')
    assert step_of(page) == step


def pick(page, sid: str) -> None:
    page.click(f'#specimen-list li[data-id="{sid}"]')
    page.wait_for_function(f"document.querySelector('#spec-id').textContent === {sid!r}")


def boxes_on_screen(page, panel: str, cls: str) -> tuple[list[list[float]], float, float]:
    """Drawn boxes of one panel mapped back to image pixels via the displayed image size."""
    return page.evaluate(
        """([panel, cls]) => {
          const root = document.querySelector(`[data-panel="${panel}"] svg.fig`);
          const img = root.querySelector("image").getBoundingClientRect();
          const [, , w, h] = root.getAttribute("viewBox").split(" ").map(Number);
          const k = img.width / w;
          const sel = cls.split(" ").map((c) => `g.box.${c} rect`).join(", ");
          const out = [...root.querySelectorAll(sel)].map((r) => {
            const b = r.getBoundingClientRect();
            return [(b.left - img.left) / k, (b.top - img.top) / k,
                    (b.right - img.left) / k, (b.bottom - img.top) / k];
          });
          return [out, k, img.height / h];
        }""",
        [panel, cls],
    )


def assert_boxes(drawn, k, expected) -> None:
    got = sorted(drawn)
    want = sorted([list(map(float, b[:4])) for b in expected])
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert abs(a - b) * k <= TOL, (got, want, k)  # within TOL screen pixels


def run_key(srv, run_id: str) -> str:
    return next(r["key"] for r in api(srv, "api/meta")["runs"] if r["run_id"] == run_id)


def test_grounding_boxes_at_true_scale_slider_keys_and_two_runs(page, server):
    open_page(page, server.url)
    assert step_of(page) == 300  # opens at the latest step
    pick(page, "dogs-002")
    ref = next(g for g in GROUNDING if g[0] == "dogs-002")[4]
    drawn, k, ky = boxes_on_screen(page, "gt", "ref")
    assert abs(k - ky) < 1e-3 and k < 1  # scaled, aspect kept
    assert_boxes(drawn, k, ref)
    # GT | run A | run B at the same step and specimen
    assert page.locator("#panels > .panel").count() == 3
    ka, kb = run_key(server, "run-a"), run_key(server, "run-b")

    # left arrow = previous step, boxes redrawn from that step's stored predictions
    page.keyboard.press("ArrowLeft")
    wait_step(page, 200)
    rows = api(server, f"api/step?run={ka}&step=200")["rows"]
    spec_i = next(
        s["i"] for s in api(server, "api/specimens")["specimens"] if s["id"] == "dogs-002"
    )
    pred = next(r for r in rows if r["i"] == spec_i)["pred_boxes"]
    drawn, k, _ = boxes_on_screen(page, ka, "good loose fp")
    assert_boxes(drawn, k, pred)
    # the slider moves over the steps that exist
    page.eval_on_selector(
        "#step-slider", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    wait_step(page, 0)
    # the coordinate-frame check fired on run B's step 0: its advice is one note line
    notes = page.locator("#step-summary .coords-advice").all_inner_texts()
    assert len(notes) == 1 and "set output_format=qwen25_vl_json" in notes[0]
    rows = api(server, f"api/step?run={kb}&step=0")["rows"]
    pred = next(r for r in rows if r["i"] == spec_i)["pred_boxes"]
    drawn, k, _ = boxes_on_screen(page, kb, "good loose fp")
    assert_boxes(drawn, k, pred)
    assert len(pred) == 1  # one of the two dogs is missed at step 0, drawn as missed
    assert page.locator(f'[data-panel="{kb}"] g.box.missed').count() == 1
    # run B's boxes carry their own scores: the label shows them; run A has none
    texts = "els => els.map(e => e.textContent)"  # SVG text has no innerText
    labels = page.eval_on_selector_all(f'[data-panel="{kb}"] g.box:not(.missed) text', texts)
    assert labels and all(t.endswith(f"p {b[5]:.2f}") for t, b in zip(labels, pred, strict=True))
    assert not any(
        " p " in t for t in page.eval_on_selector_all(f'[data-panel="{ka}"] text', texts)
    )
    page.keyboard.press("ArrowRight")
    wait_step(page, 100)
    page.screenshot(path=str(DOCS / "viewer-two-runs.png"))
    # down arrow = next specimen in the list
    order = page.eval_on_selector_all("#specimen-list li", "els => els.map(e => e.dataset.id)")
    page.keyboard.press("ArrowDown")
    nxt = order[order.index("dogs-002") + 1]
    page.wait_for_function(f"document.querySelector('#spec-id').textContent === {nxt!r}")
    page.keyboard.press("ArrowUp")
    page.wait_for_function("document.querySelector('#spec-id').textContent === 'dogs-002'")

    # best step and the overfitting note for run A
    assert (
        page.locator(f'#metric-chart .best-marker[data-run="{ka}"]').get_attribute("data-best-step")
        == "200"
    )
    assert "possible overfitting" in page.locator("#step-summary").inner_text()

    # one run only: GT | run A
    page.uncheck(f'#run-toggles input[data-run="{kb}"]')
    assert page.locator("#panels > .panel").count() == 2
    page.eval_on_selector(
        "#step-slider", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    wait_step(page, 0)
    pick(page, "dogs-002")
    page.screenshot(path=str(DOCS / "viewer-grounding.png"))


def test_filter_search_sort_and_model_output_is_text(page, server):
    open_page(page, server.url)
    page.eval_on_selector(
        "#step-slider", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }"
    )
    wait_step(page, 0)

    def ids() -> list[str]:
        return page.eval_on_selector_all("#specimen-list li", "els => els.map(e => e.dataset.id)")

    page.select_option("#filter-category", "unparseable")
    assert ids() == ["junk-006"]
    page.select_option("#filter-category", "")
    page.check("#filter-parse")
    assert ids() == ["junk-006"]
    page.uncheck("#filter-parse")
    page.fill("#search", "dog")
    assert ids() == ["dogs-002"]
    page.fill("#search", "")
    assert len(ids()) == len(GROUNDING)
    page.select_option("#sort", "score-desc")
    scores = page.eval_on_selector_all(
        "#specimen-list li .score", "els => els.map(e => parseFloat(e.textContent))"
    )
    assert scores == sorted(scores, reverse=True)

    # the <script>/<img onerror> model output is shown as literal text and runs nothing
    pick(page, "junk-006")
    raw = page.locator("#panels details.raw").first
    raw.locator("summary").click()
    assert raw.locator("pre").inner_text() == XSS
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#panels img, #panels script").count() == 0

    # "got worse since step N": at step 300 run-a lost its perfect empty-004 (false positive)
    page.eval_on_selector(
        "#step-slider", "el => { el.value = '3'; el.dispatchEvent(new Event('input')); }"
    )
    wait_step(page, 300)
    page.select_option("#filter-worse", "200")
    page.wait_for_function("document.querySelectorAll('#specimen-list li').length < 6")
    worse = ids()
    assert "empty-004" in worse and worse  # run-a's F1 there drops from 1 to 0
    assert page.evaluate("window.__pwned") is None


def test_waiting_state_then_live_steps_without_reload(page, tmp_path):
    root = tmp_path / "live"
    with serve([str(root)], port=0, poll_seconds=0.2).start() as srv:
        page.goto(srv.url)
        page.wait_for_selector("#waiting:not([hidden])")
        assert "Waiting for the first checkpoint" in page.locator("#waiting").inner_text()
        create_store(str(root))
        write_specimens(str(root), grounding_specimens(), dataset_version="v1", thumb_px=128)
        commit_grounding_step(root, "run-a", 100)
        page.wait_for_selector("#specimen-list li", timeout=10000)
        assert page.locator("#waiting").is_hidden()
        page.evaluate("window.__marker = 'same page'")
        commit_grounding_step(root, "run-a", 200)
        page.wait_for_function("document.querySelector('#step-slider').max === '1'", timeout=10000)
        page.keyboard.press("ArrowRight")
        wait_step(page, 200)
        assert page.evaluate("window.__marker") == "same page"  # no reload happened


def test_vqa_answers_side_by_side_with_differences(page, stores):
    with serve([str(stores[1])], port=0, poll_seconds=0.5).start() as srv:
        open_page(page, srv.url)
        pick(page, "q-003")
        panel = page.locator("#panels .panel.run").first
        same = panel.locator(".answer .tok.same").all_inner_texts()
        extra = panel.locator(".answer .tok.extra").all_inner_texts()
        assert same == ["stop", "now"] and extra == ["please"]
        assert panel.locator(".ref-answer .tok.missing").all_inner_texts() == ["here"]
        gt = page.locator("#panels .panel.gt")
        assert gt.locator(".refs li").all_inner_texts() == ["stop here now"]
        assert "What is written on the sign?" in gt.inner_text()
        page.screenshot(path=str(DOCS / "viewer-vqa.png"))


def test_export_opens_from_file_url(page, stores, tmp_path):
    index = export_html([str(stores[0])], tmp_path / "export")
    assert (tmp_path / "export" / "data" / "meta.js").exists()
    open_page(page, index.as_uri())
    assert page.locator("#live").inner_text() == "static export"
    pick(page, "cat-001")
    drawn, k, _ = boxes_on_screen(page, "gt", "ref")
    assert_boxes(drawn, k, GROUNDING[0][4])
    page.keyboard.press("ArrowLeft")
    wait_step(page, 200)
    assert page.locator("#panels .panel.run svg.fig g.box").count() >= 1
    page.wait_for_function(
        "[...document.querySelectorAll('#specimen-list img')].every(i => i.complete)"
    )
    assert page.eval_on_selector("#specimen-list img", "i => i.naturalWidth") > 0


def test_token_url_opens_the_page_and_its_own_requests_carry_the_cookie(page, stores):
    # a shared machine: bound to every address, the printed URL carries the token once;
    # the page's API calls and images then pass on the HttpOnly cookie alone
    srv = serve([str(stores[0])], host="0.0.0.0", port=0, poll_seconds=0.3).start()
    try:
        url = srv.url.replace("0.0.0.0", "127.0.0.1")
        open_page(page, url)
        assert step_of(page) == 300
        page.wait_for_function(
            "[...document.querySelectorAll('#specimen-list img')].some("
            "(i) => i.complete && i.naturalWidth > 0)"
        )
        bare = page.request.get(url.split("?")[0] + "api/meta")  # the context's cookie jar
        assert bare.status == 200
        other = page.context.browser.new_context()  # no cookie, no token: refused
        try:
            assert other.request.get(url.split("?")[0] + "api/meta").status == 403
        finally:
            other.close()
    finally:
        srv.shutdown()
