"""Several processes: sharding, the per-step agreement over real gloo collectives, and whole
`vieval run`s under torchrun / accelerate launch / a hand-made launch on 2 CPU processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from vieval_runner import store
from vieval_runner.config import config_from_dict
from vieval_runner.pipeline import distributed
from vieval_runner.pipeline import ranks as ranks_mod
from vieval_runner.pipeline import run as runner
from vieval_runner.records import Specimen
from vieval_runner.testing.fixtures import make_specimens

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 420  # a hang fails the test instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- sharding -------------------------------------------------------------------------------


def _many_specimens(n: int) -> list[Specimen]:
    base = make_specimens()
    out = []
    for i in range(n):
        s = base[i % len(base)]
        w, h = s.width + 7 * i, s.height + 3 * (i % 5)
        out.append(Specimen(f"s{i}", "grounding", s.prompt * (1 + i % 3), w, h, image_path="x"))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_is_deterministic_disjoint_complete_and_balanced(world):
    specimens = _many_specimens(37)
    shards = [distributed.shard(specimens, world, r) for r in range(world)]
    assert shards == [distributed.shard(specimens, world, r) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(specimens)))  # every specimen exactly once
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    # similar total image area (the prompt-length proxy): within the largest single item
    area = [sum(specimens[i].width * specimens[i].height for i in s) for s in shards]
    largest = max(s.width * s.height for s in specimens)
    assert max(area) - min(area) <= largest
    if world == 2:  # snake dealing: rank 0 does not get the longest of every pair
        order = sorted(range(37), key=lambda i: -specimens[i].width * specimens[i].height)
        assert order[0] in shards[0] and order[3] in shards[0] and order[1] in shards[1]


def test_more_ranks_than_specimens_gives_empty_shards():
    specimens = _many_specimens(2)
    shards = [distributed.shard(specimens, 4, r) for r in range(4)]
    assert sorted(i for s in shards for i in s) == [0, 1]
    assert [len(s) for s in shards].count(0) == 2


def test_rank_device_and_one_process_env(monkeypatch):
    assert distributed.rank_device("cpu", 3) == "cpu"
    if not __import__("torch").cuda.is_available():
        assert distributed.rank_device("auto", 1) == "cpu"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks_mod.world_size() == 1 and ranks_mod.env_ranks() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        ranks_mod.env_ranks()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks_mod.env_ranks() == ranks_mod.Ranks(1, 2, 1)


# --- the step protocol over real gloo collectives ---------------------------------------------


def _protocol_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: three steps through ``run_step`` (all ok, rank 1 fails, rank 0's finish fails)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        VIEVAL_DIST_TIMEOUT_S="60",
    )
    ranks = ranks_mod.setup()
    finished: list = []

    def fail_on(which: int):
        def work():
            if rank == which:
                raise torch_oom()
            return [f"text {rank}"]

        return work

    verdicts = [
        ranks_mod.run_step(ranks, lambda: [f"text {rank}"], finished.append),
        ranks_mod.run_step(ranks, fail_on(1), finished.append),
        ranks_mod.run_step(ranks, lambda: rank, lambda parts: 1 / 0),
    ]
    ranks_mod.finish(ranks)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"v": verdicts, "f": finished}))


def torch_oom() -> Exception:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory at batch size 1")


def test_a_failing_rank_fails_the_step_on_every_rank_without_deadlock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_protocol_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["v"] == r1["v"]  # every rank agrees on every step
    ok, rank1_failed, finish_failed = r0["v"]
    assert ok is None
    assert rank1_failed.startswith("rank 1: OutOfMemoryError") and "rank 0" not in rank1_failed
    assert finish_failed.startswith("ZeroDivisionError")
    # rank 0 got both shards in rank order, once (not for the failed step); rank 1 never does
    assert r0["f"] == [[["text 0"], ["text 1"]]]
    assert r1["f"] == []


# --- whole runs ------------------------------------------------------------------------------


def _write_split(folder: Path, n: int = 9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in make_specimens()[:n]:
        (folder / spec.specimen_id).write_bytes(spec.image_bytes)
        w, h = spec.width, spec.height
        box = [0.1 * w, 0.2 * h, 0.6 * w, 0.75 * h]
        rows.append(
            {
                "id": spec.specimen_id,
                "image": spec.specimen_id,
                "task": "grounding",
                "prompt": spec.prompt,
                "boxes": [{"label": spec.prompt, "box": box}],
            }
        )
    path = folder / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tree(tmp_path: Path, run, store_name: str) -> dict:
    return {
        "run_dir": str(run.run_dir),
        "base_model": str(run.base_model_dir),
        "store": str(tmp_path / store_name),
        "run_id": "run",
        "data": {"path": str(_write_split(tmp_path / "data"))},
        "batch_size": 4,
        "max_new_tokens": 24,  # long enough that random PaliGemma emits boxes that score
        "device": "cpu",
        "box_scores": True,  # the ranks' token log-probabilities reach rank 0's scoring
    }


def _launch(cmd: list[str], config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{Path(config['store']).name}.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="120")
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [*cmd, "-m", "vieval_runner", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=env,
        cwd=REPO,
    )


_COMPARED = [
    "specimen_id",
    "raw_text",
    "parse_status",
    "pred_boxes",
    "pred_answer",
    "input_width",
    "input_height",
    "tp",
    "fp",
    "fn",
    "precision",
    "recall",
    "f1",
    "iou_mean",
    "failure_category",
]


def _contents(root: str) -> dict:
    reader = store.open_store(root)
    steps = reader.steps("run")
    preds = {s: reader.step("run", s).select(_COMPARED).to_pylist() for s in steps}
    scores = []  # per-box scores: compared to a tolerance (shards batch rows differently)
    for rows in preds.values():
        rows.sort(key=lambda r: r["specimen_id"])
        for row in rows:
            for box in row["pred_boxes"] or []:
                scores.append(box.pop("score"))
    evaluations = reader.evaluations("run").to_pylist()
    aggregates = {
        e["step"]: {k: e.get(k) for k in (*store.AGGREGATE_METRICS, "status", "n_specimens")}
        for e in evaluations
    }
    specimens = reader.specimens().select(["specimen_id", "prompt", "width", "height"])
    return {
        "preds": preds,
        "scores": scores,
        "aggregates": aggregates,
        "n_evaluations": len(evaluations),
        "versions": reader.version,
        "specimens": sorted(specimens.to_pylist(), key=lambda r: r["specimen_id"]),
    }


@pytest.mark.slow
def test_two_process_run_stores_exactly_what_one_process_stores(tmp_path, tiny_run):
    run = tiny_run("paligemma")
    one = _tree(tmp_path, run, "store_one")
    outcome = runner.run(config_from_dict(one), Console(quiet=True))
    assert outcome.evaluated == [0, 100, 200, 300]

    two = _tree(tmp_path, run, "store_two")
    done = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], two, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # rank 0 alone prints: one summary, one store line
    assert done.stdout.count("store: ") == 1 and "ranks 2 processes" in done.stdout

    want, got = _contents(one["store"]), _contents(two["store"])
    assert got["preds"] == want["preds"]  # raw text, parse status, boxes, metrics, category
    assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    assert want["scores"] and all(s is not None for s in want["scores"])  # box scores stored
    assert got["aggregates"] == want["aggregates"]
    assert got["specimens"] == want["specimens"]
    assert got["n_evaluations"] == want["n_evaluations"] == 4
    assert got["versions"] == want["versions"]  # one commit per step, specimens written once
    # the check is not vacuous: the tiny model emits boxes that match at some steps
    assert any(r["tp"] for rows in want["preds"].values() for r in rows)
    # random weights never stop before max_new_tokens: every row is "truncated" (generation
    # tells the parser), and the boxes recovered from the cut text still score (tp above)
    assert {r["parse_status"] for rows in want["preds"].values() for r in rows} == {"truncated"}
    devices = {e["device"] for e in store.open_store(two["store"]).evaluations().to_pylist()}
    assert devices == {"cpu x2 ranks"}
    logs = list((tmp_path / "store_two" / "logs").glob("*.log"))
    assert len(logs) == 2 and {"rank0", "rank1"} <= {
        tag for f in logs for tag in ("rank0", "rank1") if tag in f.read_text()
    }

    # accelerate launch of the same command: rank 0's resume decision (all stored) holds on
    # every rank, and nothing is written again
    again = _launch(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",  # torchrun-style launch; CPU ranks because no CUDA is visible
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ],
        two,
        tmp_path,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert "skipped (already stored) [0, 100, 200, 300]" in again.stdout
    assert _contents(two["store"])["versions"] == got["versions"]


@pytest.mark.slow
def test_ranks_reuse_image_embeddings_of_a_frozen_vision_tower(tmp_path, shared_vision_run):
    """Each rank reads the next checkpoint ahead and serves checkpoint 200 (checkpoint 100's
    vision tower) from the embeddings it kept, and probes ``batch_size: auto`` once for the
    whole run (the one-process step with its memo); the store is the one-process store."""
    run = shared_vision_run
    tree = _tree(tmp_path, run, "store_one")
    # batch_size auto: each rank probes once for the run, later steps reuse what fitted
    one = {**tree, "include_base": False, "box_scores": False, "batch_size": "auto"}
    assert runner.run(config_from_dict(one), Console(quiet=True)).evaluated == [100, 200, 300]
    two = {**one, "store": str(tmp_path / "store_two")}
    done = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], two, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    want, got = _contents(one["store"]), _contents(two["store"])
    assert got["preds"] == want["preds"] and got["aggregates"] == want["aggregates"]
    logs = {f.name: f.read_text() for f in (tmp_path / "store_two" / "logs").glob("*.log")}
    reused = [
        int(line.rsplit("reused for ", 1)[1].split()[0])
        for text in logs.values()
        for line in text.splitlines()
        if "vision embeddings reused for" in line
    ]
    # per rank and step: none at 100 (first), its whole shard at 200, none at 300 (changed)
    assert sorted(reused) == [0, 0, 0, 0, 4, 5], logs
    probes = [text.count("batch_size auto: probing") for text in logs.values()]
    assert sorted(probes) == [1, 1], logs  # one probe per rank over three steps


@pytest.mark.slow
def test_failing_checkpoint_in_two_process_run_is_one_failed_evaluation_exit_3(tmp_path, tiny_run):
    source = tiny_run("qwen25_vl")
    run_dir = tmp_path / "run"
    shutil.copytree(source.run_dir, run_dir)
    weights = run_dir / "checkpoint-200" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run = type(source)(source.base_model_dir, run_dir, source.steps, source.family)
    config = _tree(tmp_path, run, "store")
    config["max_new_tokens"] = 8
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    # launched by hand with the variables torchrun sets, so each rank's own exit status is
    # visible (torchrun and accelerate report any non-zero rank as their own status 1)
    procs, outputs = _hand_launch(path)
    codes = [p.returncode for p in procs]
    assert codes == [3, 3], outputs
    out0 = outputs[0][0]
    assert "1 checkpoint(s) failed" in out0 and "checkpoint-200" in out0
    assert "store:" not in outputs[1][0]  # rank 1 prints nothing of its own
    reader = store.open_store(config["store"])
    evaluations = reader.evaluations().to_pylist()
    failed = [e for e in evaluations if e["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["step"] == 200
    assert "rank 0" in failed[0]["error"] and "rank 1" in failed[0]["error"]
    assert sorted(e["step"] for e in evaluations if e["status"] == "ok") == [0, 100, 300]
    assert reader.steps("run") == [0, 100, 300]


def test_watch_under_a_launcher_is_a_clear_bad_input_error(tmp_path, monkeypatch, capsys):
    from vieval_runner import cli

    config = {
        "run_dir": str(tmp_path / "run"),
        "base_model": str(tmp_path / "base"),
        "store": str(tmp_path / "store"),
        "data": {"path": str(tmp_path / "val.jsonl")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["watch", str(path)]) == 2
    assert "vieval watch runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing written, no process group joined


def _hand_launch(config_path: Path) -> tuple[list[subprocess.Popen], list[tuple[str, str]]]:
    """Two ranks of `vieval run` started with torchrun's variables; fails the test on a hang."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="120")
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vieval_runner", "run", str(config_path)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LAUNCH_TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outputs


@pytest.mark.slow
def test_bad_data_fails_every_rank_with_exit_2(tmp_path, tiny_run):
    config = _tree(tmp_path, tiny_run("qwen25_vl"), "store")
    data = Path(config["data"]["path"])
    rows = data.read_text().splitlines()
    bad = json.loads(rows[3])
    bad["boxes"][0]["box"] = [50, 10, 5, 20]  # x2 < x1
    data.write_text("\n".join([*rows[:3], json.dumps(bad), *rows[4:]]) + "\n")
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    procs, outputs = _hand_launch(path)
    assert [p.returncode for p in procs] == [2, 2], outputs
    for _, err in outputs:  # both ranks name the file and the row (rank 0's error)
        assert "val.jsonl: line 4" in err and "x2 < x1" in err, err


def test_single_process_env_drops_the_launch_variables():
    env = {"RANK": "0", "WORLD_SIZE": "8", "MASTER_PORT": "29500", "PATH": "/bin", "HOME": "/h"}
    assert ranks_mod.single_process_env(env) == {"PATH": "/bin", "HOME": "/h"}
