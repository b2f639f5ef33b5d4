"""Interruptions and a full disk: the store stays readable at its last commit and a rerun
completes the rest without duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from vieval_runner import store
from vieval_runner.config import load_config
from vieval_runner.pipeline import run as runner
from vieval_runner.testing.fixtures import fill_disk as _fill

REPO = Path(__file__).resolve().parents[2]


def _config_file(tmp_path: Path, run, n: int = 9, **extra) -> Path:
    from vieval_runner.testing.fixtures import write_split

    data = write_split(tmp_path / "data", "grounding", n=n)
    tree = {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / "store"),
        "data": {"path": str(data)},
        "batch_size": 1,  # many small generate calls: a long window to be interrupted in
        "max_new_tokens": 48,
        "device": "cpu",
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _steps_done(root: Path) -> list[int]:
    """Steps whose evaluation is fully recorded (predictions commit + evaluation row)."""
    try:
        evaluations = store.open_store(str(root)).evaluations().to_pylist()
        return [e["step"] for e in evaluations if e["status"] == "ok"]
    except Exception:  # tables not created yet
        return []


def _assert_consistent(root: Path, n: int) -> list[int]:
    """Every stored step holds exactly n specimens from one evaluation."""
    reader = store.open_store(str(root))
    (run,) = reader.runs()
    steps = reader.steps(run)
    for step in steps:
        rows = reader.step(run, step).to_pylist()
        assert len(rows) == n, (step, len(rows))
        assert len({r["eval_id"] for r in rows}) == 1
        assert len({r["specimen_id"] for r in rows}) == n
    return steps


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_without_duplicates(tmp_path, tiny_run, sig):
    config_path = _config_file(tmp_path, tiny_run("qwen25_vl"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vieval_runner", "run", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while not _steps_done(tmp_path / "store"):  # wait for the first committed step
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step committed in time"
            time.sleep(0.05)
        proc.send_signal(sig)  # now it is generating the next step
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "store keeps every step committed so far" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    before = _assert_consistent(tmp_path / "store", 9)
    assert 0 in before and len(before) < 4

    recorded = _steps_done(tmp_path / "store")
    outcome = runner.run(load_config(config_path), console=None)
    assert outcome.exit_status == 0
    # fully recorded steps are not evaluated again; a step killed between its predictions
    # commit and its evaluation row is evaluated again and replaces itself (no duplicates)
    assert sorted(outcome.skipped) == sorted(recorded)
    assert sorted(outcome.evaluated + outcome.skipped) == [0, 100, 200, 300]
    assert _assert_consistent(tmp_path / "store", 9) == [0, 100, 200, 300]
    evaluations = store.open_store(str(tmp_path / "store")).evaluations().to_pylist()
    ok_steps = [e["step"] for e in evaluations if e["status"] == "ok"]
    assert sorted(ok_steps) == [0, 100, 200, 300]


_WRITER = """
import sys, uuid
from vieval_runner import store
root, n = sys.argv[1], int(sys.argv[2])
for step in range(1000):
    eval_id = uuid.uuid4().hex
    rows = [{"specimen_id": f"s{i}", "raw_text": "x" * 200, "parse_status": "ok", "f1": 0.5}
            for i in range(n)]
    store.commit_step(root, {"eval_id": eval_id, "run_id": "r", "step": step % 5,
                             "status": "ok", "task": "grounding"}, rows)
    print(step, flush=True)
"""


def test_sigkill_during_store_commits_leaves_the_store_readable(tmp_path):
    root = tmp_path / "store"
    store.create_store(str(root))
    n = 20_000  # ~0.3-1 s per commit: kills land inside commits
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(n)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()  # one commit done
        time.sleep(0.2 + 0.37 * attempt)
        proc.kill()
        proc.wait()
        steps = _assert_consistent(root, n)
        assert steps
    # and it still takes commits
    store.commit_step(
        str(root),
        {"eval_id": uuid.uuid4().hex, "run_id": "r", "step": 7, "status": "ok"},
        [{"specimen_id": f"s{i}", "raw_text": "", "parse_status": "empty"} for i in range(n)],
    )
    assert 7 in _assert_consistent(root, n)


def test_disk_full_during_commits_keeps_the_store_consistent(tiny_disk):
    root = tiny_disk / "store"
    store.create_store(str(root))
    n, committed, error = 2_000, [], None
    for step in range(200):
        rows = [
            {"specimen_id": f"s{i}", "raw_text": uuid.uuid4().hex * 4, "parse_status": "ok"}
            for i in range(n)
        ]
        try:
            store.commit_step(
                str(root),
                {"eval_id": uuid.uuid4().hex, "run_id": "r", "step": step, "status": "ok"},
                rows,
            )
        except store.StoreFull as exc:  # the disk is full: one clear error
            error = exc
            break
        committed.append(step)
    assert error is not None, "the tiny disk never filled up"
    assert committed, "not even one step fitted"
    assert str(root) in str(error) and "needs about" in str(error)
    # every step that committed is readable and whole; the failed one is not shown at all
    assert _assert_consistent(root, n) == committed
    assert store.check_store(str(root))["lost"] == []


def test_a_write_that_meets_enospc_raises_store_full(tiny_disk):
    """delta-rs's own ENOSPC error (the write's size under-estimated) becomes StoreFull too."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from vieval_runner.store.tables import COMMIT_RESERVE_BYTES, writing

    _fill(tiny_disk, leave=COMMIT_RESERVE_BYTES + 256 * 1024)
    big = pa.table({"x": [os.urandom(1024).hex() for _ in range(2048)]})  # ~4 MiB
    target = str(tiny_disk / "t")
    with pytest.raises(store.StoreFull) as info:
        writing(target, "writing t", 0, lambda: write_deltalake(target, big))
    assert str(tiny_disk / "t") in str(info.value) and "No space left on device" in str(info.value)


def test_a_run_on_a_full_disk_stops_at_once_with_one_message(tmp_path, tiny_run, tiny_disk):
    """One message naming the store and the space needed, exit 4, no log-handler tracebacks,
    no further steps tried; the step committed before stays whole."""
    root = tiny_disk / "store"
    config_path = _config_file(
        tmp_path, tiny_run("qwen25_vl"), store=str(root), batch_size=9, max_new_tokens=8
    )
    command = [sys.executable, "-m", "vieval_runner", "run", str(config_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = runner.run(load_config(config_path, ["steps=[0]"]), console=None)
    assert first.exit_status == 0 and first.evaluated == [0]
    filler = _fill(tiny_disk)

    full = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = full.stdout + full.stderr
    assert full.returncode == 4, out
    (message,) = [line for line in full.stderr.splitlines() if line.strip()]
    assert message.startswith(f"vieval run: the disk of store {root} is full"), message
    assert "needs about" in message and "step 100" in message, message
    for noise in ("Logging error", "Traceback", "panicked", "failed"):
        assert noise not in out, out
    assert len(out.splitlines()) < 25, out  # was 1,215 lines
    assert _assert_consistent(root, 9) == [0]  # nothing committed is lost
    logs = list((root / "logs").glob("*.log"))
    assert len(logs) == 1  # the failing run's log was opened, then stopped quietly
    assert filler.exists()  # (a later run resumes: see test_interrupted_run_resumes...)


def test_a_run_killed_between_a_steps_two_commits_shows_none_of_it(tmp_path, tiny_run):
    """The reported case: SIGKILL after a step's predictions commit, before its evaluation
    row. No reader shows the step, `vieval check` reports it, the next run evaluates it
    again and the orphans are gone."""
    from vieval_runner import report

    config_path = _config_file(tmp_path, tiny_run("qwen25_vl"), batch_size=9, max_new_tokens=8)
    config = load_config(config_path)
    root = tmp_path / "store"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VIEVAL_TEST_PAUSE_AT="between")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vieval_runner", "run", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in proc.stderr:  # step 0's commit waits at the point until killed
            seen.append(line)
            if line.strip() == "vieval-paused between":
                break
        assert seen and seen[-1].strip() == "vieval-paused between", "".join(seen)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    run_id = config.effective_run_id
    reader = store.open_store(str(root))
    assert reader.steps(run_id) == [] and reader.step(run_id, 0).num_rows == 0
    assert report.summarize(reader, run_id)[0]["steps"] == []
    (orphan,) = store.check_store(str(root))["orphans"]
    assert (orphan["step"], orphan["rows"]) == (0, 9)

    outcome = runner.run(config, console=None)
    assert outcome.exit_status == 0 and sorted(outcome.evaluated) == [0, 100, 200, 300]
    assert _assert_consistent(root, 9) == [0, 100, 200, 300]
    assert store.check_store(str(root))["orphans"] == []
