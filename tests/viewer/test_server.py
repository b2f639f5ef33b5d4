"""The viewer's HTTP server against real Delta stores built with the store's writer API."""

from __future__ import annotations

import http.client
import io
import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from vieval_runner.records import Box
from vieval_runner.store import (
    create_store,
    open_store,
    write_specimens,
)
from vieval_runner.testing.stores import (  # noqa: F401
    FRAME_ADVICE,
    GROUNDING,
    STEPS,
    VQA,
    XSS,
    commit_grounding_step,
    grounding_prediction,
    grounding_specimens,
    make_grounding_store,
    make_vqa_store,
)
from vieval_runner.viewer import serve


@pytest.fixture(scope="module")
def grounding_store(tmp_path_factory) -> Path:
    return make_grounding_store(tmp_path_factory.mktemp("viewer") / "store")


@pytest.fixture(scope="module")
def server(grounding_store):
    srv = serve([str(grounding_store)], port=0, poll_seconds=0.2).start()
    yield srv
    srv.shutdown()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str):
    status, headers, body = get(url)
    assert status == 200, (url, status, body[:300])
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def raw_get(srv, path: str) -> tuple[int, bytes]:
    """Send ``path`` byte for byte (urllib would normalise some of it)."""
    host, port = srv.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"{host}:{port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


# ----------------------------------------------------------------------------- tests
def test_meta_lists_runs_steps_aggregates_best_and_overfitting(server, grounding_store):
    meta = get_json(server.url + "api/meta")
    assert meta["waiting"] is False
    assert meta["task"] == "grounding"
    assert meta["n_specimens"] == len(GROUNDING)
    assert [s["root"] for s in meta["stores"]] == [str(grounding_store)]
    assert meta["stores"][0]["version"]["predictions"] >= 1
    runs = {r["run_id"]: r for r in meta["runs"]}
    assert set(runs) == {"run-a", "run-b"}
    a, b = runs["run-a"], runs["run-b"]
    assert a["steps"] == list(STEPS) and a["task"] == "grounding"
    assert [g["step"] for g in a["aggregates"]] == list(STEPS)
    # run-a peaks at step 200 and drops at 300: best step and overfitting signal
    assert a["best"]["step"] == 200 and a["best"]["metric"] == "f1"
    assert a["overfitting"]["best_step"] == 200 and a["overfitting"]["last_step"] == 300
    assert b["overfitting"] is None
    assert a["failed"] == [{"step": 400, "error": "corrupt shard"}]
    assert 400 not in a["steps"]
    assert any(row["eval_loss"] is not None for row in a["training_log"])
    assert [row["step"] for row in a["training_log"]] == sorted(
        r["step"] for r in a["training_log"]
    )
    assert set(a["eval_ids"]) == {str(s) for s in STEPS}
    assert "missed" in meta["failure_actions"] and meta["failure_actions"]["missed"]
    # the coordinate-frame check's advice rides with the step's aggregates
    advice = {g["step"]: g.get("coords_advice") for g in b["aggregates"]}
    assert advice[0] == FRAME_ADVICE and not any(advice[s] for s in STEPS if s != 0)


def test_specimens_steps_and_images_match_the_store(server, grounding_store):
    reader = open_store(str(grounding_store))
    doc = get_json(server.url + "api/specimens")
    specs = {s["id"]: s for s in doc["specimens"]}
    assert set(specs) == {g[0] for g in GROUNDING}
    for sid, w, h, prompt, refs in GROUNDING:
        s = specs[sid]
        assert (s["width"], s["height"], s["prompt"], s["task"]) == (w, h, prompt, "grounding")
        assert s["ref_boxes"] == [[float(v) for v in r[:4]] + [r[4], None] for r in refs]
        assert "image_bytes" not in s
        status, headers, body = get(server.url + s["img"])
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        assert body == reader.specimen_image(sid)
        status, _, thumb = get(server.url + s["thumb"])
        assert status == 200 and Image.open(io.BytesIO(thumb)).size[0] <= 112

    meta = get_json(server.url + "api/meta")
    run = next(r for r in meta["runs"] if r["run_id"] == "run-a")
    step = get_json(server.url + f"api/step?run={run['key']}&step=100")
    assert step["step"] == 100 and step["eval_id"] == run["eval_ids"]["100"]
    stored = {r["specimen_id"]: r for r in reader.step("run-a", 100).to_pylist()}
    assert len(step["rows"]) == len(GROUNDING)
    by_index = {s["i"]: s["id"] for s in doc["specimens"]}
    for row in step["rows"]:
        ref = stored[by_index[row["i"]]]
        assert row["specimen_id"] == ref["specimen_id"]
        assert row["pred_boxes"] == [[b["x1"], b["y1"], b["x2"], b["y2"], b["label"], b["score"]]
                                     for b in ref["pred_boxes"]]  # fmt: skip
        assert row["f1"] == ref["f1"] and row["failure_category"] == ref["failure_category"]


def test_unknown_run_step_or_image_is_404(server):
    assert get(server.url + "api/step?run=r0&step=999")[0] == 404
    assert get(server.url + "api/step?run=nope&step=100")[0] == 404
    assert get(server.url + "api/step?run=r0&step=abc")[0] == 400
    assert get(server.url + "img/99999")[0] == 404
    assert get(server.url + "thumb/99999")[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/static/../../../pyproject.toml",
        "/app.js/../server.py",
        "/server.py",
        "/data.py",
        "/static/app.js",
        "/etc/passwd",
        "//etc/passwd",
        "/img/../../../etc/passwd",
        "/img/%2e%2e%2fserver.py",
        "/img/-1",
        "/img//etc/passwd",
        "/thumb/1/../../server.py",
        "/index.html/..%2f..%2fdata.py",
        "/C:/Windows/win.ini",
        "/api/../api/../../pyproject.toml",
    ],
)
def test_traversal_and_absolute_paths_are_refused(server, path):
    status, body = raw_get(server, path)
    assert status == 404
    assert b"root:" not in body and b"[build-system]" not in body and b"import" not in body


def test_only_whitelisted_static_files_are_served(server):
    status, headers, body = get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="app.js">' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert get(server.url + "app.js")[0] == 200
    assert get(server.url + "style.css")[0] == 200


def test_model_output_markup_comes_back_as_json_data(server):
    meta = get_json(server.url + "api/meta")
    key = next(r["key"] for r in meta["runs"] if r["run_id"] == "run-a")
    status, headers, body = get(server.url + f"api/step?run={key}&step=0")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    row = next(r for r in json.loads(body)["rows"] if r["specimen_id"] == "junk-006")
    assert row["raw_text"] == XSS and row["parse_status"] == "malformed"
    assert b"<script>" not in get(server.url)[2]  # no data or inline script in the page


def test_nonexistent_store_waits_then_shows_the_first_step(tmp_path):
    root = tmp_path / "not-yet"
    with serve([str(root)], port=0, poll_seconds=0.1).start() as srv:
        meta = get_json(srv.url + "api/meta")
        assert meta["waiting"] is True and meta["runs"] == []
        assert "Waiting for the first checkpoint" in meta["message"]
        assert get(srv.url + "api/specimens")[0] == 200
        create_store(str(root))
        write_specimens(str(root), grounding_specimens(), dataset_version="v1", thumb_px=64)
        time.sleep(0.15)
        assert get_json(srv.url + "api/meta")["waiting"] is True  # tables, but no evaluation
        commit_grounding_step(root, "run-a", 100)
        time.sleep(0.15)
        meta = get_json(srv.url + "api/meta")
        assert meta["waiting"] is False
        assert meta["runs"][0]["steps"] == [100]
        assert len(get_json(srv.url + "api/step?run=r0&step=100")["rows"]) == len(GROUNDING)


def test_several_stores_side_by_side(tmp_path, grounding_store):
    vqa = make_vqa_store(tmp_path / "vqa")
    with serve([str(grounding_store), str(vqa)], port=0, poll_seconds=0.1).start() as srv:
        meta = get_json(srv.url + "api/meta")
        assert [r["run_id"] for r in meta["runs"]] == ["run-a", "run-b", "vqa-run"]
        assert len({r["key"] for r in meta["runs"]}) == 3
        vrun = meta["runs"][2]
        assert vrun["task"] == "vqa" and vrun["steps"] == [0, 100]
        best = {k: vrun["best"][k] for k in ("step", "metric", "value")}
        assert best == {"step": 100, "metric": "token_f1", "value": vrun["best"]["value"]}
        # 3 specimens: no lead over step 0 can be significant (an exact permutation test)
        assert vrun["best"]["significant"] is False and vrun["best"]["vs_next"]["n"] == 3
        assert meta["task"] == "mixed"
        specs = get_json(srv.url + "api/specimens")["specimens"]
        assert len(specs) == len(GROUNDING) + len(VQA)
        q1 = next(s for s in specs if s["id"] == "q-001")
        assert q1["ref_answers"] == ["red", "red square"] and q1["task"] == "vqa"
        rows = get_json(srv.url + f"api/step?run={vrun['key']}&step=100")["rows"]
        assert {r["i"] for r in rows} == {s["i"] for s in specs if s["task"] == "vqa"}
        assert get(srv.url + q1["img"])[0] == 200


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from vieval_runner.testing.stores import commit_grounding_step
    root = Path({root!r})
    for i in range(6):
        commit_grounding_step(root, "run-b", 100)          # replace an existing step
        commit_grounding_step(root, "run-c", 1000 + i)     # a new run growing
    """
)


def test_reads_while_a_writer_commits_never_fail(tmp_path):
    root = make_grounding_store(tmp_path / "busy", runs=("run-b",), steps=(0, 100))
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(root))
    with serve([str(root)], port=0, poll_seconds=0.05).start() as srv:
        writer = subprocess.Popen([sys.executable, "-c", code])
        statuses: list[tuple[str, int]] = []

        def hammer(_: int) -> None:
            while writer.poll() is None:
                status, _, body = get(srv.url + "api/meta")
                statuses.append(("meta", status))
                if status != 200:
                    continue
                for run in json.loads(body)["runs"]:
                    for step in run["steps"][-2:]:
                        url = f"{srv.url}api/step?run={run['key']}&step={step}"
                        statuses.append((url, get(url)[0]))

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(hammer, range(3)))
        assert writer.wait(timeout=120) == 0
        assert statuses and all(code == 200 for _, code in statuses), [
            s for s in statuses if s[1] != 200
        ][:5]
        meta = get_json(srv.url + "api/meta")
        assert next(r for r in meta["runs"] if r["run_id"] == "run-c")["steps"] == list(
            range(1000, 1006)
        )


def test_box_matches_agree_with_scoring(server):
    """The page colours boxes by the server's matches: they must be scoring's matches."""
    from vieval_runner.scoring import score_grounding

    specs = {s["i"]: s for s in get_json(server.url + "api/specimens")["specimens"]}
    meta = get_json(server.url + "api/meta")
    for run in meta["runs"]:
        for step in run["steps"]:
            rows = get_json(server.url + f"api/step?run={run['key']}&step={step}")["rows"]
            preds = [[Box(*b[:5]) for b in r["pred_boxes"]] for r in rows]
            refs = [[Box(*b[:5]) for b in specs[r["i"]]["ref_boxes"]] for r in rows]
            scored = score_grounding(preds, refs, [r["parse_status"] for r in rows])
            for row, ref in zip(rows, scored, strict=True):
                matched = [m for m in row["matches"] if m is not None]
                assert len(row["matches"]) == len(row["pred_boxes"])
                assert len(matched) == ref["tp"]
                assert len({m[0] for m in matched}) == len(matched)  # one-to-one
                if matched:
                    mean = sum(m[1] for m in matched) / len(matched)
                    assert mean == pytest.approx(ref["iou_mean"], abs=1e-4)


# ----------------------------------------------------------------------------- access control
def host_get(srv, path: str, host: str, cookie: str | None = None):
    """GET ``path`` through http.client with exactly this Host header (and cookie)."""
    address, port = srv.httpd.server_address[:2]
    conn = http.client.HTTPConnection(address, port, timeout=10)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    if cookie:
        conn.putheader("Cookie", cookie)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    headers = dict(resp.getheaders())
    conn.close()
    return resp.status, headers, body


@pytest.mark.parametrize("path", ["/api/meta", "/api/specimens", "/", "/app.js", "/img/0"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil:{port}"])
def test_foreign_host_header_is_refused_on_every_endpoint(server, path, host):
    # DNS rebinding: a page on evil.example resolves its name to 127.0.0.1; the browser
    # then sends Host: evil.example[:port]. None of the store may come back.
    port = server.httpd.server_address[1]
    status, _, body = host_get(server, path, host.format(port=port))
    assert status == 403
    assert b"Host header not allowed" in body
    assert b"runs" not in body and b"specimen" not in body


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "LOCALHOST"])
def test_loopback_host_names_with_the_port_are_answered(server, name):
    port = server.httpd.server_address[1]
    status, _, body = host_get(server, "/api/meta", f"{name}:{port}")
    assert status == 200, body[:200]
    # another port on the same name is another origin
    assert host_get(server, "/api/meta", f"{name}:{port + 1}")[0] == 403


def test_ipv6_loopback_answers_bracketed_host(grounding_store):
    try:
        srv = serve([str(grounding_store)], host="::1", port=0, poll_seconds=0.2).start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        port = srv.httpd.server_address[1]
        assert srv.url == f"http://[::1]:{port}/"
        assert host_get(srv, "/api/meta", f"[::1]:{port}")[0] == 200
        assert host_get(srv, "/api/meta", f"evil.example:{port}")[0] == 403
    finally:
        srv.shutdown()


def test_off_loopback_a_token_is_generated_and_required(grounding_store):
    # bound to every address: any Host may reach it, so the token is what guards it
    srv = serve([str(grounding_store)], host="0.0.0.0", port=0, poll_seconds=0.2).start()
    try:
        port = srv.httpd.server_address[1]
        assert srv.token and len(srv.token) >= 24
        assert srv.url.endswith(f":{port}/?token={srv.token}")
        status, _, body = host_get(srv, "/api/meta", f"myhost:{port}")
        assert status == 403 and b"token" in body
        assert host_get(srv, "/api/meta?token=wrong", f"myhost:{port}")[0] == 403
        # the printed URL opens the page and sets the cookie the page's own requests carry
        status, headers, _ = host_get(srv, f"/?token={srv.token}", f"myhost:{port}")
        assert status == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        assert cookie == f"vieval_token_{port}={srv.token}"
        assert "HttpOnly" in headers["Set-Cookie"]
        status, _, body = host_get(srv, "/api/meta", f"myhost:{port}", cookie=cookie)
        assert status == 200 and json.loads(body)["runs"]
        assert host_get(srv, "/img/0", f"myhost:{port}", cookie=f"vieval_token_{port}=x")[0] == 403
    finally:
        srv.shutdown()


def test_given_token_is_required_on_loopback_too(grounding_store):
    srv = serve([str(grounding_store)], port=0, poll_seconds=0.2, token="s3cret").start()
    try:
        port = srv.httpd.server_address[1]
        assert host_get(srv, "/api/meta", f"127.0.0.1:{port}")[0] == 403
        assert host_get(srv, "/api/meta?token=s3cret", f"127.0.0.1:{port}")[0] == 200
        # the Host check still holds with the token
        assert host_get(srv, "/api/meta?token=s3cret", f"evil.example:{port}")[0] == 403
    finally:
        srv.shutdown()


def test_cli_view_on_all_addresses_warns_and_prints_the_token_url(grounding_store):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vieval_runner",
            "view",
            str(grounding_store),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "?token=" in line, line
        url = line.split()[1]
        status, _, body = get(url.replace("0.0.0.0", "127.0.0.1").replace("/?", "/api/meta?"))
        assert status == 200, body[:200]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "warning" in err and "no accounts" in err


@pytest.mark.parametrize("token", ["short", "has space", "semi;colon"])
def test_cli_view_refuses_a_token_unfit_for_urls_and_cookies(grounding_store, token, capsys):
    from vieval_runner import cli

    assert cli.main(["view", str(grounding_store), "--port", "0", "--token", token]) == 2
    assert "--token must be" in capsys.readouterr().err
