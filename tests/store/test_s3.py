"""The store on a real S3-compatible server (SeaweedFS on loopback): commits, time travel,
compaction, concurrent writers through conditional put, and clear errors for bad settings."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vieval_runner.store import StoreError, commit_step, create_store, open_store
from vieval_runner.testing.s3_server import SECRET_KEY

pytestmark = pytest.mark.s3
ROOT = Path(__file__).resolve().parents[2]


def _rows(n: int, tag: str) -> list[dict]:
    return [
        {"specimen_id": f"s{i:03d}", "raw_text": f"{tag} {i}", "parse_status": "ok", "f1": 0.5}
        for i in range(n)
    ]


def _vieval(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vieval_runner", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
        cwd=ROOT,
    )


def test_store_on_s3_commits_time_travels_and_compacts(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/stores/main"
    opts = s3_server.storage_options()
    create_store(url, storage_options=opts)
    for step in (100, 200):
        commit_step(
            url,
            {"run_id": "r", "step": step, "f1": step / 1000},
            _rows(4, f"v1@{step}"),
            storage_options=opts,
        )
    v_before = open_store(url, storage_options=opts).version["predictions"]
    time.sleep(1.1)
    between = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    commit_step(
        url, {"run_id": "r", "step": 200, "f1": 0.9}, _rows(4, "v2@200"), storage_options=opts
    )
    reader = open_store(url, storage_options=opts)
    assert reader.steps("r") == [100, 200]
    assert reader.step("r", 200).column("raw_text").to_pylist()[0] == "v2@200 0"
    # time travel to before the replacement: the old rows of step 200
    old = open_store(url, as_of=v_before, storage_options=opts)
    assert old.step("r", 200).column("raw_text").to_pylist()[0] == "v1@200 0"
    # ... and by time: the store as it was between the two commits
    then = open_store(url, as_of=between, storage_options=opts)
    assert then.version["predictions"] == v_before
    assert then.step("r", 200).column("raw_text").to_pylist()[0] == "v1@200 0"

    # the CLI with only the standard AWS environment variables: summary and --as-of
    env = {**s3_server.env(), "AWS_MAX_RETRIES": "2"}
    done = _vieval("summary", url, "--json", env=env)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    assert runs, done.stdout
    # ... and with -o KEY=VALUE options instead of the environment
    flags = [f"-o{k}={v}" for k, v in opts.items()]
    done = _vieval("summary", url, "--json", "--as-of", str(v_before), *flags)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"]["predictions"] == v_before
    done = _vieval("summary", url, "--json", "--as-of", between, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"]["predictions"] == v_before

    # compaction on object storage keeps the latest rows; vacuum deletes replaced files
    before_keys = len(s3_server.keys(s3_bucket, "stores/main/predictions/"))
    done = _vieval("compact", url, "--retention-hours", "0.0001", env=env)
    # zero-ish retention is allowed (non-zero); the CLI prints a JSON report
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["predictions"]["files_vacuumed"] >= 1
    after = open_store(url, storage_options=opts)
    assert after.step("r", 200).column("raw_text").to_pylist() == [f"v2@200 {i}" for i in range(4)]
    assert after.step("r", 100).num_rows == 4
    assert len(s3_server.keys(s3_bucket, "stores/main/predictions/")) < before_keys + 2


def _writer(url: str, opts: dict, run_id: str, steps: list[int], start) -> None:
    start.wait()
    for step in steps:
        commit_step(
            url,
            {"run_id": run_id, "step": step},
            _rows(6, f"{run_id}@{step}"),
            storage_options=opts,
        )


def test_four_processes_commit_to_s3_at_once_and_lose_nothing(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/shared"
    opts = s3_server.storage_options()
    create_store(url, storage_options=opts)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    plan = [
        ("a", [100, 200, 300]),
        ("b", [100, 200, 300]),
        ("a", [400, 500, 600]),
        ("c", [100, 700, 800]),
    ]
    procs = [
        ctx.Process(target=_writer, args=(url, opts, run, steps, start)) for run, steps in plan
    ]
    for p in procs:
        p.start()
    time.sleep(2.0)  # every child imports the package before the gate opens
    start.set()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    r = open_store(url, storage_options=opts)
    for run in ("a", "b", "c"):
        expected = sorted(s for rr, steps in plan if rr == run for s in steps)
        assert r.steps(run) == expected
        for step in expected:
            assert r.step(run, step).column("raw_text").to_pylist() == [
                f"{run}@{step} {i}" for i in range(6)
            ]
    assert r.evaluations().num_rows == 12
    assert r.version["predictions"] == 12  # one commit per step: none lost, none doubled


def test_a_commit_never_overwrites_a_log_entry_another_writer_put_first(s3_server, s3_bucket):
    """Conditional put, not rename: a log entry that appears under delta-rs's feet (another
    writer's commit) is kept, and this commit lands at the next version."""
    url = f"s3://{s3_bucket}/race"
    opts = s3_server.storage_options()
    create_store(url, storage_options=opts)
    commit_step(url, {"run_id": "r", "step": 1}, _rows(2, "first"), storage_options=opts)
    reader = open_store(url, storage_options=opts)
    nxt = reader.version["predictions"] + 1
    key = f"race/predictions/_delta_log/{nxt:020d}.json"
    intruder = (
        json.dumps(
            {
                "commitInfo": {
                    "timestamp": int(time.time() * 1000),
                    "operation": "WRITE",
                    "operationParameters": {"mode": "Append"},
                    "intruder": True,
                }
            }
        )
        + "\n"
    )
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=intruder.encode())
    version = commit_step(url, {"run_id": "r", "step": 2}, _rows(2, "second"), storage_options=opts)
    assert version == nxt + 1
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode()
    assert '"intruder": true' in body  # not overwritten
    assert open_store(url, storage_options=opts).steps("r") == [1, 2]


def _busy_writer(url: str, opts: dict, rounds: int, start) -> None:
    start.wait()
    for k in range(rounds):
        commit_step(
            url,
            {"run_id": "r", "step": (k % 4) * 100},
            _rows(12, f"round{k}"),
            storage_options=opts,
        )


def test_a_reader_polling_s3_during_commits_never_sees_a_partial_step(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/polled"
    opts = s3_server.storage_options()
    create_store(url, storage_options=opts)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    rounds = 10
    writer = ctx.Process(target=_busy_writer, args=(url, opts, rounds, start))
    writer.start()
    reader = open_store(url, storage_options=opts)
    start.set()
    versions = set()
    while True:
        done = not writer.is_alive()
        reader.refresh()
        versions.add(reader.version["predictions"])
        for step in reader.steps("r"):
            table = reader.step("r", step)
            assert table.num_rows == 12, (step, table.num_rows)
            assert len({t.split()[0] for t in table.column("raw_text").to_pylist()}) == 1
        if done:
            break
    writer.join()
    assert writer.exitcode == 0
    assert len(versions) >= 3, versions
    assert reader.version["predictions"] == rounds


def test_unsafe_rename_is_refused(s3_server, s3_bucket):
    opts = s3_server.storage_options(AWS_S3_ALLOW_UNSAFE_RENAME="true")
    with pytest.raises(StoreError, match="unsafe"):
        create_store(f"s3://{s3_bucket}/x", storage_options=opts)


@pytest.mark.parametrize("case", ["wrong_secret", "missing_bucket"])
def test_bad_credentials_or_bucket_exit_2_naming_the_url_not_the_secret(s3_server, s3_bucket, case):
    env = s3_server.env()
    bucket = s3_bucket
    if case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-" + SECRET_KEY
        want = "access denied"
    else:
        bucket = "no-such-bucket-vieval"
        want = "bucket does not exist"
    url = f"s3://{bucket}/store"
    for args in (["summary", url], ["compact", url]):
        done = _vieval(*args, env=env)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert url in done.stderr and want in done.stderr, done.stderr
        assert SECRET_KEY not in done.stderr + done.stdout
        assert "Traceback" not in done.stderr


def test_throttling_and_timeouts_are_retried_with_backoff(s3_server, s3_bucket):
    """Every fourth request answered 503 SlowDown and every ninth GET stalled past the
    client's timeout: the object-store client retries them with backoff and the store's
    commits and reads all succeed."""
    from vieval_runner.testing.s3_server import FlakyProxy

    # timeout 2 s: a stalled GET (2.5 s) always exceeds it, while an ordinary request keeps
    # headroom on a loaded 2-core CI machine (at 1 s, a slow PUT timed out there once)
    with FlakyProxy(s3_server.endpoint, every=4, stall_every=9, stall_s=2.5) as proxy:
        opts = s3_server.storage_options(
            AWS_ENDPOINT_URL=proxy.endpoint, max_retries="6", retry_timeout="60s", timeout="2s"
        )
        url = f"s3://{s3_bucket}/throttled"
        create_store(url, storage_options=opts)
        for step in (100, 300):
            commit_step(
                url, {"run_id": "r", "step": step}, _rows(3, f"t{step}"), storage_options=opts
            )
        reader = open_store(url, storage_options=opts)
        assert reader.steps("r") == [100, 300]
        assert reader.step("r", 300).column("raw_text").to_pylist() == [
            "t300 0",
            "t300 1",
            "t300 2",
        ]
    assert proxy.throttled >= 3 and proxy.stalled >= 1, (proxy.throttled, proxy.stalled)
