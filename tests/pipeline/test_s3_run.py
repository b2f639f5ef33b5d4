"""A run whose checkpoints and store are both on a real S3-compatible server (SeaweedFS on
loopback): discovery, download once into a bounded cache evicted after each commit, resume
without downloads, watch while "training" uploads, and no credential anywhere it is written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vieval_runner import checkpoints as ckpts
from vieval_runner import store
from vieval_runner.pipeline import rescore
from vieval_runner.pipeline import run as runner
from vieval_runner.pipeline import watch as watcher
from vieval_runner.pipeline.step import select_checkpoints
from vieval_runner.testing.fixtures import quiet_console, run_config
from vieval_runner.testing.s3_server import SECRET_KEY

pytestmark = pytest.mark.s3


def upload_checkpoint(
    server, bucket: str, prefix: str, folder: Path, state_last: bool = True
) -> None:
    """Upload a checkpoint folder as a trainer would: weights first, trainer_state.json last."""
    client = server.client()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "trainer_state.json")
    for f in files:
        if not state_last and f.name == "trainer_state.json":
            continue
        client.upload_file(str(f), bucket, f"{prefix}/{folder.name}/{f.relative_to(folder)}")


def _weights_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))


def _s3_config(tmp_path, run, server, bucket, **extra):
    return run_config(
        tmp_path,
        run,
        run_dir=f"s3://{bucket}/run",
        store=f"s3://{bucket}/store",
        storage_options=server.storage_options(),
        checkpoint_cache_dir=str(tmp_path / "ckpt-cache"),
        **extra,
    )


def test_run_from_s3_checkpoints_into_an_s3_store(tmp_path, tiny_run, s3_server, s3_bucket):
    run = tiny_run("qwen2_vl")
    for step in run.steps:
        upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / f"checkpoint-{step}")
    # a checkpoint still uploading: weights there, no trainer_state.json yet (and fresh)
    upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / "checkpoint-300", state_last=False)
    s3_server.client().copy_object(
        Bucket=s3_bucket,
        Key="run/checkpoint-400/model.safetensors",
        CopySource={"Bucket": s3_bucket, "Key": "run/checkpoint-300/model.safetensors"},
    )
    config = _s3_config(tmp_path, run, s3_server, s3_bucket)
    found = select_checkpoints(config)
    assert [(c.step, c.complete) for c in found] == [
        (0, True),
        (100, True),
        (200, True),
        (300, True),
        (400, False),
    ]
    assert found[1].location == f"s3://{s3_bucket}/run/checkpoint-100"
    assert found[1].path.is_dir() and _weights_in(found[1].path) == []  # metadata only so far

    downloaded: list[int] = []
    real_fetch = ckpts.fetch

    def counting_fetch(ckpt, advance=None):
        downloaded.append(ckpt.step)
        return real_fetch(ckpt, advance)

    ckpts.fetch = counting_fetch
    try:
        outcome = runner.run(config, quiet_console())
    finally:
        ckpts.fetch = real_fetch
    assert outcome.failed == {}
    assert outcome.evaluated == [0, 100, 200, 300]
    assert downloaded == [100, 200, 300]  # each once
    cache = tmp_path / "ckpt-cache"
    assert [p for p in cache.rglob("*.safetensors")] == []  # evicted after each commit

    reader = store.open_store(config.store, storage_options=config.storage_options)
    assert reader.steps(config.effective_run_id) == [0, 100, 200, 300]
    rows = reader.evaluations(config.effective_run_id).to_pylist()
    paths = {r["step"]: r["checkpoint_path"] for r in rows}
    assert paths[200] == f"s3://{s3_bucket}/run/checkpoint-200"
    assert all(r["checkpoint_hash"].startswith("etag:") for r in rows if r["step"])

    # resume: same objects, same config -> nothing evaluated, nothing downloaded
    again = runner.run(config, quiet_console())
    assert again.evaluated == [] and sorted(again.skipped) == [0, 100, 200, 300]
    assert [p for p in cache.rglob("*.safetensors")] == []

    # rescore reads and commits on S3 too (no model, no checkpoint download)
    rescored = rescore.rescore_store(
        config.store, run_id=config.effective_run_id, console=quiet_console(),
        storage_options=config.storage_options,
    )  # fmt: skip
    assert sorted(step for _, step in rescored) == [0, 100, 200, 300]

    # no credential in any object the run wrote
    for key in s3_server.keys(s3_bucket, "store/"):
        body = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert SECRET_KEY.encode() not in body, key
    assert '"AWS_SECRET_ACCESS_KEY": "***"' in rows[0]["config"]


def test_a_cache_too_small_for_a_checkpoint_fails_that_step_clearly(
    tmp_path, tiny_run, s3_server, s3_bucket
):
    run = tiny_run("qwen2_vl")
    upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / "checkpoint-100")
    config = _s3_config(
        tmp_path, run, s3_server, s3_bucket, checkpoint_cache_gb=1e-6, include_base=False
    )
    outcome = runner.run(config, quiet_console())
    assert list(outcome.failed) == [100]
    assert "checkpoint_cache_gb" in outcome.failed[100] and "checkpoint-100" in outcome.failed[100]


def test_watch_picks_up_checkpoints_as_training_uploads_them(
    tmp_path, tiny_run, s3_server, s3_bucket
):
    run = tiny_run("qwen2_vl")
    config = _s3_config(tmp_path, run, s3_server, s3_bucket, include_base=False)
    config.watch.poll_seconds = 0.3
    config.watch.idle_timeout = 120
    result: dict = {}

    def watch() -> None:
        try:
            result["outcome"] = watcher.watch(config, quiet_console())
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    def stored_steps() -> list[int]:
        try:
            reader = store.open_store(config.store, storage_options=config.storage_options)
        except store.StoreError:  # not created yet
            return []
        return sorted(r["step"] for r in reader.evaluations().to_pylist())

    def wait_for(steps: list[int]) -> None:
        deadline = time.monotonic() + 120
        while stored_steps() != steps:
            assert time.monotonic() < deadline, (stored_steps(), steps)
            assert thread.is_alive(), result
            time.sleep(0.3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(1.0)  # the watcher starts on an empty prefix
    first, *rest = run.steps
    # half uploaded (no trainer_state.json yet, objects fresh): not evaluated
    upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / f"checkpoint-{first}", False)
    time.sleep(2.0)
    assert stored_steps() == []
    upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / f"checkpoint-{first}")
    wait_for([first])
    for i, step in enumerate(rest):  # each picked up after the watcher was already running
        upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / f"checkpoint-{step}")
        wait_for([first, *rest[: i + 1]])
    thread.join(300)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    outcome = result["outcome"]
    assert sorted(outcome.evaluated) == list(run.steps) and outcome.failed == {}
    reader = store.open_store(config.store, storage_options=config.storage_options)
    oks = [r["step"] for r in reader.evaluations().to_pylist() if r["status"] == "ok"]
    assert sorted(oks) == list(run.steps)  # each once
    assert list((tmp_path / "ckpt-cache").rglob("*.safetensors")) == []


def test_server_stopped_mid_run_fails_that_step_and_a_rerun_completes(
    tmp_path, tiny_run, s3_server, s3_bucket
):
    """The S3 server goes away while step 200 commits: that step fails (the run says so, its
    failure is in the log and, once the server is back, in the store); a rerun evaluates only
    step 200, and every step ends with exactly one ok evaluation and one set of rows."""
    import logging

    from vieval_runner.pipeline.logfile import attach_run_log

    run = tiny_run("qwen2_vl")
    config = run_config(
        tmp_path,
        run,
        store=f"s3://{s3_bucket}/store",
        storage_options=s3_server.storage_options(),
        include_base=False,
    )
    log_path = attach_run_log(config)
    real_commit = store.commit_step

    def commit_with_outage(root, eval_row, rows, **kw):
        if eval_row["step"] != 200:
            return real_commit(root, eval_row, rows, **kw)
        s3_server.stop()
        try:
            return real_commit(root, eval_row, rows, **kw)
        finally:
            s3_server.start()

    store.commit_step = commit_with_outage
    try:
        outcome = runner.run(config, quiet_console())
    finally:
        store.commit_step = real_commit
        for handler in list(logging.getLogger("vieval").handlers):
            if getattr(handler, "baseFilename", None) == str(log_path):
                logging.getLogger("vieval").removeHandler(handler)
                handler.close()
    assert outcome.exit_status == 3
    assert list(outcome.failed) == [200]
    assert f"s3://{s3_bucket}/store" in outcome.failed[200]
    assert sorted(outcome.evaluated) == [100, 300]
    text = log_path.read_text()
    assert "step 200" in text and "failed" in text
    assert SECRET_KEY not in text and "***" in text  # the config is logged, redacted
    reader = store.open_store(config.store, storage_options=config.storage_options)
    statuses = [(r["step"], r["status"]) for r in reader.evaluations().to_pylist()]
    assert (200, "failed") in statuses and (200, "ok") not in statuses

    again = runner.run(config, quiet_console())
    assert again.evaluated == [200] and sorted(again.skipped) == [100, 300] and again.failed == {}
    reader = store.open_store(config.store, storage_options=config.storage_options)
    oks = [r["step"] for r in reader.evaluations().to_pylist() if r["status"] == "ok"]
    assert sorted(oks) == [100, 200, 300]  # nothing lost, nothing doubled
    n = len(reader.step(config.effective_run_id, 100))
    for step in (100, 200, 300):
        table = reader.step(config.effective_run_id, step)
        assert table.num_rows == n and len(set(table.column("specimen_id").to_pylist())) == n


@pytest.mark.slow
def test_vieval_run_cli_on_s3_bad_secret_exits_2_then_runs_and_logs_no_secret(
    tmp_path, tiny_run, s3_server, s3_bucket
):
    import os
    import subprocess
    import sys

    import yaml

    from vieval_runner.testing.fixtures import write_split

    repo = Path(__file__).resolve().parents[2]
    run = tiny_run("qwen2_vl")
    upload_checkpoint(s3_server, s3_bucket, "run", run.run_dir / "checkpoint-100")
    url = f"s3://{s3_bucket}/store"
    tree = {
        "run_dir": f"s3://{s3_bucket}/run",
        "base_model": str(run.base_model_dir),
        "store": url,
        "data": {"path": str(write_split(tmp_path / "data", "grounding"))},
        "include_base": False,
        "batch_size": 4,
        "max_new_tokens": 8,
        "device": "cpu",
        "checkpoint_cache_dir": str(tmp_path / "cache"),
        "storage_options": s3_server.storage_options(),
    }
    env = {**os.environ, "PYTHONPATH": str(repo), "VIEVAL_CACHE_DIR": str(tmp_path / "vc")}

    def vieval_run(options: dict) -> subprocess.CompletedProcess:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({**tree, "storage_options": options}))
        return subprocess.run(
            [sys.executable, "-m", "vieval_runner", "run", str(config)],
            capture_output=True, text=True, env=env, timeout=300, cwd=repo,
        )  # fmt: skip

    wrong = "wrong-" + SECRET_KEY
    done = vieval_run({**s3_server.storage_options(), "AWS_SECRET_ACCESS_KEY": wrong})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "access denied" in done.stderr and f"s3://{s3_bucket}/" in done.stderr
    assert wrong not in done.stdout + done.stderr and "Traceback" not in done.stderr

    done = vieval_run(s3_server.storage_options())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"store: {url}"
    logs = list((tmp_path / "vc" / "logs").glob("vieval-*.log"))
    assert logs, "a run on an object-storage store logs locally"
    for log in logs:
        text = log.read_text()
        assert SECRET_KEY not in text and wrong not in text
    assert "step 100 committed" in logs[-1].read_text() or any(
        "step 100 committed" in p.read_text() for p in logs
    )
