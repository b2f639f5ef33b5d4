"""The commit protocol (docs/store.md): a writer SIGKILLed before, between and after a step's
two commits, then the store read with every reader: the reader API, `vieval summary`'s
report, the viewer's /api/meta and /api/step over a real HTTP server, the static export and
`vieval check`. Each sees the step only once its evaluation row is committed, and then
exactly the predictions that row committed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from vieval_runner import cli, report
from vieval_runner.cli.exits import EXIT_CHECK_FOUND
from vieval_runner.store import (
    COMMIT_POINTS,
    check_store,
    commit_step,
    open_store,
    orphaned_steps,
)
from vieval_runner.testing.stores import GROUNDING, commit_grounding_step, make_grounding_store
from vieval_runner.viewer import export_html, serve

REPO = Path(__file__).resolve().parents[2]
RUN = "run-a"
WRITER = """
import sys
from pathlib import Path
from vieval_runner.testing.stores import commit_grounding_step
commit_grounding_step(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """run-a (and run-b) committed at steps 0-200; step 300 never evaluated."""
    return make_grounding_store(tmp_path_factory.mktemp("commits") / "store", steps=(0, 100, 200))


def kill_writer_at(root: Path, point: str, step: int) -> None:
    """Start a real writer committing ``step`` of run-a and SIGKILL it at ``point``."""
    env = dict(os.environ, VIEVAL_TEST_PAUSE_AT=point, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), RUN, str(step)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # the writer waits at the point until killed
        assert line.strip() == f"vieval-paused {point}", line + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def what_readers_see(root: Path, step: int, tmp: Path) -> dict[str, object]:
    """For each reader: the eval_id(s) of ``step``'s rows it shows (None: no such step)."""
    seen: dict[str, object] = {}
    reader = open_store(str(root))
    committed = reader.committed(RUN)
    rows = reader.step(RUN, step)
    ids = set(rows.column("eval_id").to_pylist())
    seen["reader.steps"] = step in reader.steps(RUN)
    seen["reader.step"] = (ids.pop() if len(ids) == 1 else ids or None, rows.num_rows)
    history = reader.specimen_history(RUN, "cat-001").to_pylist()
    seen["reader.specimen_history"] = [h["eval_id"] for h in history if h["step"] == step]
    aggregates = {a["step"]: a["eval_id"] for a in reader.aggregates(RUN).to_pylist()}
    seen["reader.aggregates"] = aggregates.get(step)
    seen["reader.committed"] = committed.get(step, {}).get("eval_id")
    (summary,) = report.summarize(reader, RUN)
    seen["summary"] = next((s["eval_id"] for s in summary["steps"] if s["step"] == step), None)

    with serve([str(root)], port=0, poll_seconds=0.05).start() as srv:
        meta = get_json(f"{srv.url}api/meta")
        run = next(r for r in meta["runs"] if r["run_id"] == RUN)
        seen["view.meta"] = run["eval_ids"].get(str(step)) if step in run["steps"] else None
        try:
            doc = get_json(f"{srv.url}api/step?run={run['key']}&step={step}")
            seen["view.step"] = sorted({r["eval_id"] for r in doc["rows"]} | {doc["eval_id"]})
        except urllib.error.HTTPError as exc:
            seen["view.step"] = exc.code

    out = export_html([str(root)], tmp / "export")
    data = out.parent / "data"
    meta = json.loads(re.sub(r"^.*?= ", "", (data / "meta.js").read_text().splitlines()[1])[:-1])
    run = next(r for r in meta["runs"] if r["run_id"] == RUN)
    seen["export"] = run["eval_ids"].get(str(step)) if step in run["steps"] else None
    shutil.rmtree(out.parent)
    return seen


def assert_shows(seen: dict, eval_id: str | None, n: int = len(GROUNDING)) -> None:
    """Every reader shows the step as committed by ``eval_id`` (None: not at all)."""
    if eval_id is None:
        assert seen["reader.step"] == (None, 0), seen
        expected_view_step = 404
    else:
        assert seen["reader.step"] == (eval_id, n), seen
        expected_view_step = [eval_id]
    assert seen["reader.steps"] is (eval_id is not None), seen
    assert seen["reader.specimen_history"] == ([eval_id] if eval_id else []), seen
    for key in ("reader.aggregates", "reader.committed", "summary", "view.meta", "export"):
        assert seen[key] == eval_id, (key, seen)
    assert seen["view.step"] == expected_view_step, seen


def test_pause_points_are_the_documented_ones():
    doc = (REPO / "docs" / "store.md").read_text()
    assert COMMIT_POINTS == ("before-predictions", "between", "after-evaluation")
    for point in COMMIT_POINTS:
        assert f"`{point}`" in doc


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_kill_during_first_evaluation_of_a_step(pristine, tmp_path, point, capsys):
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    kill_writer_at(root, point, 300)

    seen = what_readers_see(root, 300, tmp_path)
    found = check_store(str(root))
    status = cli.main(["check", str(root)])
    if point == "after-evaluation":
        new = open_store(str(root)).committed(RUN)[300]["eval_id"]
        assert_shows(seen, new)
        assert found["orphans"] == [] and status == 0
    else:
        assert_shows(seen, None)  # not committed: no reader shows it
        if point == "between":  # predictions with no evaluation row: orphans, reported
            (orphan,) = found["orphans"]
            assert (orphan["run_id"], orphan["step"], orphan["rows"]) == (RUN, 300, 6)
            assert "no evaluation row" in orphan["why"]
            assert status == EXIT_CHECK_FOUND
            assert "orphan: run run-a step 300: 6 prediction row(s)" in capsys.readouterr().out
            assert orphaned_steps(str(root), RUN) == {300}
        else:
            assert found["orphans"] == [] and status == 0
    assert found["replaced"] == [] and found["lost"] == []

    # the next commit of the step cleans up whatever the dead writer left
    commit_grounding_step(root, RUN, 300)
    newest = open_store(str(root)).committed(RUN)[300]["eval_id"]
    assert_shows(what_readers_see(root, 300, tmp_path), newest)
    assert check_store(str(root))["orphans"] == [] and orphaned_steps(str(root), RUN) == set()


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_kill_during_re_evaluation_of_a_committed_step(pristine, tmp_path, point):
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    old = open_store(str(root)).committed(RUN)[200]["eval_id"]
    kill_writer_at(root, point, 200)

    seen = what_readers_see(root, 200, tmp_path)
    found = check_store(str(root))
    if point == "after-evaluation":
        new = open_store(str(root)).committed(RUN)[200]["eval_id"]
        assert new != old
        assert_shows(seen, new)
        assert found["orphans"] == [] and found["replaced"] == []
    elif point == "between":
        # the new rows replaced the old ones, but no evaluation row committed them: readers
        # still show the old evaluation, with exactly its rows (at the version it recorded)
        assert_shows(seen, old)
        assert [(o["step"], o["rows"]) for o in found["orphans"]] == [(200, 6)]
        assert [(r["step"], r["eval_id"]) for r in found["replaced"]] == [(200, old)]
        assert orphaned_steps(str(root), RUN) == {200}
    else:
        assert_shows(seen, old)
        assert found["orphans"] == [] and found["replaced"] == []
    assert found["lost"] == []

    commit_grounding_step(root, RUN, 200)
    newest = open_store(str(root)).committed(RUN)[200]["eval_id"]
    assert_shows(what_readers_see(root, 200, tmp_path), newest)
    after = check_store(str(root))
    assert after["orphans"] == [] and after["replaced"] == [] and after["lost"] == []


def test_a_pinned_reader_hides_evaluations_committed_after_its_version(tmp_path):
    """``as_of`` a predictions version: an evaluation whose rows came in a later version is
    not shown, even when it finished (was scored) before that version was committed, as with
    ``overlap`` (step N is scored while step N-1 commits)."""
    from datetime import UTC, datetime

    from vieval_runner.store import create_store

    root = str(tmp_path / "store")
    create_store(root)
    rows = [{"specimen_id": "a", "raw_text": "[]", "parse_status": "empty"}]
    scored_early = datetime.now(UTC)
    v5 = commit_step(root, {"run_id": "r", "step": 5}, rows)
    commit_step(root, {"run_id": "r", "step": 6, "finished_at": scored_early}, rows)
    pinned = open_store(root, as_of=v5)
    assert pinned.steps("r") == [5]
    assert pinned.aggregates("r").column("step").to_pylist() == [5]
    assert pinned.step("r", 6).num_rows == 0
    assert open_store(root).steps("r") == [5, 6]


def test_a_replaced_step_whose_version_was_vacuumed_is_reported_lost(tmp_path):
    from vieval_runner.store import StoreError, compact, create_store
    from vieval_runner.testing.stores import kill_commit_at

    root = str(tmp_path / "store")
    create_store(root)
    rows = [{"specimen_id": "a", "raw_text": "[]", "parse_status": "empty"}]
    commit_step(root, {"run_id": "r", "step": 5}, rows)
    kill_commit_at(root, "between", {"run_id": "r", "step": 5}, rows)
    assert [r["step"] for r in check_store(root)["replaced"]] == [5]
    compact(root, retention_hours=0, force=True)  # removes the version the marker recorded
    found = check_store(root)
    assert [r["step"] for r in found["lost"]] == [5] and found["replaced"] == []
    with pytest.raises(StoreError, match="evaluate the step again"):
        open_store(root).step("r", 5)
    commit_step(root, {"run_id": "r", "step": 5}, rows)  # the next run of the step mends it
    assert open_store(root).step("r", 5).num_rows == 1
    assert check_store(root) == {
        "store": root,
        "committed": 1,
        "orphans": [],
        "replaced": [],
        "lost": [],
    }
