"""Object-storage options: one delta-rs-style dict for both clients, secrets never shown."""

from __future__ import annotations

import datetime as dt

import pytest

from vieval_runner.config import config_from_dict, dump_config, redacted
from vieval_runner.objectstore import (
    StorageOptionsError,
    check_options,
    explain,
    is_remote,
    obstore_options,
    redact_options,
    scrub,
)

OPTS = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEJr",
    "AWS_REGION": "eu-west-1",
    "AWS_ALLOW_HTTP": "true",
    "max_retries": "4",
    "retry_timeout": "30s",
    "timeout": "20s",
}


def test_is_remote():
    assert is_remote("s3://bucket/store") and is_remote("gs://b/p") and is_remote("az://c/p")
    assert not is_remote("/data/store") and not is_remote("relative/store")
    assert not is_remote("file:///data/store")


def test_redaction_keeps_where_and_hides_who():
    shown = redact_options(OPTS)
    assert (
        shown["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and shown["AWS_REGION"] == "eu-west-1"
    )
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert shown[key] == "***"
    text = "denied for wJalrXUtnFEMI/K7MDENG with \x1b[31mFwoGZXIvYXdzEJr\x1b[0m"
    assert scrub(text, OPTS) == "denied for *** with ***"


def test_obstore_gets_config_client_and_retry_settings_apart():
    kw = obstore_options("s3://bucket/run", OPTS)
    assert kw["config"] == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "aws_access_key_id": "AKIDEXAMPLE",
        "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG",
        "aws_session_token": "FwoGZXIvYXdzEJr",
        "aws_region": "eu-west-1",
    }
    assert kw["client_options"] == {"allow_http": "true", "timeout": "20s"}
    assert kw["retry_config"] == {"max_retries": 4, "retry_timeout": dt.timedelta(seconds=30)}
    assert obstore_options("gs://b/p", {"google_service_account": "/k.json"})["config"] == {
        "google_service_account": "/k.json"
    }


def test_unsafe_rename_is_refused_and_bad_durations_named():
    with pytest.raises(StorageOptionsError, match="AWS_S3_ALLOW_UNSAFE_RENAME"):
        check_options({"AWS_S3_ALLOW_UNSAFE_RENAME": "true"})
    with pytest.raises(StorageOptionsError, match="retry_timeout"):
        obstore_options("s3://b", {"retry_timeout": "soon"})


def test_explain_names_the_url_and_the_cause():
    exc = OSError("Generic S3 error\n ↳ 404 Not Found\n ↳ <Code>NoSuchBucket</Code>")
    assert explain(exc, "s3://nope/store").startswith("s3://nope/store: the bucket does not exist")


def test_config_dumps_never_hold_a_secret(tmp_path):
    config = config_from_dict(
        {
            "run_dir": "s3://bucket/run",
            "base_model": str(tmp_path),
            "store": "s3://bucket/store",
            "data": {"path": str(tmp_path / "val.jsonl")},
            "storage_options": {**OPTS, "AWS_ALLOW_HTTP": True},
        }
    )
    assert config.storage_options["AWS_ALLOW_HTTP"] == "true"  # YAML booleans become text
    for dump in (redacted(config), dump_config(config)):
        assert dump["storage_options"]["AWS_SECRET_ACCESS_KEY"] == "***"
        assert "wJalrXUtnFEMI" not in str(dump)
    assert config.effective_run_id == "run"


def test_changing_credentials_does_not_re_evaluate(tmp_path):
    from vieval_runner.pipeline.resume import config_hash

    tree = {
        "run_dir": "s3://bucket/run",
        "base_model": str(tmp_path),
        "store": "s3://bucket/store",
        "data": {"path": str(tmp_path / "val.jsonl")},
    }
    a = config_from_dict({**tree, "storage_options": OPTS})
    b = config_from_dict({**tree, "storage_options": {**OPTS, "AWS_SECRET_ACCESS_KEY": "rotated"}})
    assert config_hash(a) == config_hash(b) == config_hash(config_from_dict(tree))


def test_a_malformed_storage_options_error_does_not_echo_the_value(tmp_path):
    from vieval_runner.config import ConfigError

    with pytest.raises(ConfigError, match="storage_options") as info:
        config_from_dict(
            {
                "run_dir": "r",
                "base_model": "b",
                "store": "s",
                "data": {"path": "d"},
                "storage_options": "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI",
            }
        )
    assert "wJalrXUtnFEMI" not in str(info.value)
