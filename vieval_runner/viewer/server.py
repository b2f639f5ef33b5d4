"""The viewer's local HTTP server: a fixed set of routes, standard library only.

No request path ever reaches the file system: static files come from a fixed whitelist inside
the package, images are looked up by specimen index in the store. Anything else is a 404.
"""

from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from vieval_runner.viewer.analysis import image_type, warm_up
from vieval_runner.viewer.data import StoreUnavailable, ViewerData

STATIC_DIR = Path(__file__).parent / "static"
# Request path -> (file in STATIC_DIR, content type). The only files ever served from disk.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/draw.js": ("draw.js", "text/javascript; charset=utf-8"),
    "/charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "/state.js": ("state.js", "text/javascript; charset=utf-8"),
    "/list.js": ("list.js", "text/javascript; charset=utf-8"),
    "/panels.js": ("panels.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_IMG = re.compile(r"/(img|thumb)/([0-9]{1,9})")
# Defence in depth: even if data slipped into markup, inline script would not run.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class _Handler(BaseHTTPRequestHandler):
    server_version = "vieval-viewer"
    data: ViewerData  # set on the per-server subclass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the CLI prints the URL, not every poll

    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, "application/json; charset=utf-8")

    def _not_found(self) -> None:
        self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            self._route()
        except StoreUnavailable as exc:  # a commit in flight: the page retries
            self._json({"error": str(exc), "retry": True}, HTTPStatus.SERVICE_UNAVAILABLE)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # never a bare 500 page; say what failed
            self._json({"error": f"{type(exc).__name__}: {exc}", "retry": True}, 503)

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if path in STATIC_FILES:
            name, ctype = STATIC_FILES[path]
            self._send(200, (STATIC_DIR / name).read_bytes(), ctype)
            return
        if path == "/api/meta":
            self._json(self.data.meta())
            return
        if path == "/api/specimens":
            self._json(self.data.specimens())
            return
        if path == "/api/step":
            query = parse_qs(parts.query)
            run = (query.get("run") or [""])[0]
            step = (query.get("step") or [""])[0]
            if not re.fullmatch(r"[0-9]{1,12}", step):
                self._json({"error": "step must be a non-negative integer"}, 400)
                return
            try:
                self._json(self.data.step(run, int(step)))
            except KeyError as exc:
                self._json({"error": str(exc.args[0])}, HTTPStatus.NOT_FOUND)
            return
        match = _IMG.fullmatch(path)
        if match:
            kind, index = match.group(1), int(match.group(2))
            body = self.data.image(index) if kind == "img" else self.data.thumb(index)
            if body is None:
                self._not_found()
                return
            self._send(200, body, image_type(body)[0], cache="max-age=300")
            return
        self._not_found()


class ViewerServer:
    """A running (or ready-to-run) viewer: ``.url``, ``.serve_forever()``, ``.shutdown()``."""

    def __init__(
        self,
        stores: list[str],
        host: str,
        port: int,
        poll_seconds: float,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        warm_up()  # before the first request, not during it
        self.data = ViewerData(stores, poll_seconds=poll_seconds, storage_options=storage_options)
        handler = type("ViewerHandler", (_Handler,), {"data": self.data})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (blocks)."""
        self._serving.set()
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving.clear()

    def serve_until_interrupted(self) -> None:
        """Serve in the foreground until Ctrl+C, then close the socket (the CLI's loop)."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def start(self) -> ViewerServer:
        """Serve from a background thread (for tests and notebooks); returns self."""
        self._serving.set()  # so an immediate shutdown() still stops the loop
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        if self._serving.is_set():
            self.httpd.shutdown()  # blocks until the serve_forever loop has exited
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(
    stores: list[str],
    host: str = "127.0.0.1",
    port: int = 8765,
    poll_seconds: float = 2.0,
    storage_options: dict[str, str] | None = None,
) -> ViewerServer:
    """Bind a viewer for ``stores`` (port 0 picks a free port); call ``.serve_forever()``.

    A store that does not exist yet is fine: the page shows the waiting state until its
    first evaluation lands.
    """
    return ViewerServer([str(s) for s in stores], host, port, poll_seconds, storage_options)
