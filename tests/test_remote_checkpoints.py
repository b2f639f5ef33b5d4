"""Discovery of checkpoints on a real S3-compatible server: complete only when every file
is there, whatever order the upload tool used."""

from __future__ import annotations

import json

import pytest

from vieval_runner.checkpoints import find_checkpoints
from vieval_runner.records import CheckpointError

pytestmark = pytest.mark.s3


def test_a_sharded_checkpoint_waits_for_its_last_shard(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
    put = lambda key, body: client.put_object(Bucket=s3_bucket, Key=f"run/{key}", Body=body)  # noqa: E731
    put("checkpoint-500/model.safetensors.index.json", json.dumps(index).encode())
    put(f"checkpoint-500/{shards[0]}", b"x" * 64)
    put("checkpoint-500/trainer_state.json", b'{"global_step": 500, "max_steps": 500}')
    put("checkpoint-500/optimizer.pt", b"o" * 128)
    put("runs/events.out", b"not a checkpoint")
    url = f"s3://{s3_bucket}/run"
    opts = s3_server.storage_options()

    def scan():
        return find_checkpoints(
            url, None, storage_options=opts, cache_dir=tmp_path, settle_seconds=3600
        )

    (ckpt,) = scan()
    assert (ckpt.step, ckpt.complete, ckpt.kind) == (500, False, "full")
    assert shards[1] in ckpt.reason and "missing shard" in ckpt.reason
    put(f"checkpoint-500/{shards[1]}", b"y" * 64)
    (ckpt,) = scan()
    assert ckpt.complete and ckpt.reason == "" and ckpt.location == f"{url}/checkpoint-500"
    assert (ckpt.path / "trainer_state.json").is_file()  # metadata copied at discovery
    assert ckpt.remote.weight_names == shards  # optimizer state is never downloaded
    assert "optimizer.pt" not in ckpt.remote.wanted()


def test_missing_run_prefix_bucket_names_the_url(s3_server, tmp_path):
    opts = s3_server.storage_options()
    with pytest.raises(
        CheckpointError, match="s3://no-such-bucket-x/run: the bucket does not exist"
    ):
        find_checkpoints(
            "s3://no-such-bucket-x/run", None, storage_options=opts, cache_dir=tmp_path
        )
