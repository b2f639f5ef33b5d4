"""The viewer's local HTTP server: a fixed set of routes, standard library only.

No request path ever reaches the file system: static files come from a fixed whitelist inside
the package, images are looked up by specimen index in the store. Anything else is a 404.

Access: the viewer has no accounts. On a loopback address it answers only requests whose
``Host`` header names that address (``localhost``, ``127.0.0.1``, ``[::1]`` with the port), so a
web page cannot read the store through DNS rebinding. On any other address every request must
carry the access token (``?token=`` once, then the ``vieval_token_PORT`` cookie it sets).
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
import threading
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

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
    "/breakdown.js": ("breakdown.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_IMG = re.compile(r"/(img|thumb)/([0-9]{1,9})")
# Defence in depth: even if data slipped into markup, inline script would not run.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


TOKEN_COOKIE = "vieval_token_{port}"  # per port: cookies are shared by every port of a host
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """``Host`` header values a loopback viewer answers: its loopback names with the port."""
    names = set(LOOPBACK_NAMES)
    names.add(f"[{host}]" if ":" in host else host)
    values = {f"{name}:{port}" for name in names}
    if port == 80:  # clients leave the default port out
        values |= names
    return frozenset(values)


class _Handler(BaseHTTPRequestHandler):
    server_version = "vieval-viewer"
    data: ViewerData  # set on the per-server subclass
    hosts: frozenset[str] | None  # allowed Host values; None: any (the token guards)
    token: str | None  # required on every request when set

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the CLI prints the URL, not every poll

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str,
        cache: str = "no-store",
        cookie: str | None = None,
    ) -> None:
        self.send_response(status)
        if cookie:
            self.send_header("Set-Cookie", cookie)
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

    def _cookie_name(self) -> str:
        return TOKEN_COOKIE.format(port=self.server.server_address[1])

    def _refused(self) -> bool:
        """Answer 403 and return True unless the Host header and the token are acceptable."""
        if self.hosts is not None and (self.headers.get("Host") or "").lower() not in self.hosts:
            self._json(
                {"error": "Host header not allowed (the viewer answers only its own address)"}, 403
            )
            return True
        if self.token is None:
            return False
        given = (parse_qs(urlsplit(self.path).query).get("token") or [""])[0]
        if not given:
            try:
                morsel = SimpleCookie(self.headers.get("Cookie") or "").get(self._cookie_name())
            except CookieError:
                morsel = None
            given = morsel.value if morsel is not None else ""
        if secrets.compare_digest(given.encode(), self.token.encode()):
            return False
        self._json(
            {"error": "access token missing or wrong: open the URL vieval view printed"}, 403
        )
        return True

    def do_GET(self) -> None:
        if self._refused():
            return
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
            cookie = None
            if self.token is not None:  # the page's own requests carry the token from here on
                cookie = f"{self._cookie_name()}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            self._send(200, (STATIC_DIR / name).read_bytes(), ctype, cookie=cookie)
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
        if path == "/api/compare":
            query = parse_qs(parts.query)
            run = (query.get("run") or [""])[0]
            a, b = (query.get("a") or [""])[0], (query.get("b") or [""])[0]
            if not (re.fullmatch(r"[0-9]{1,12}", a) and re.fullmatch(r"[0-9]{1,12}", b)):
                self._json({"error": "a and b must be non-negative integer steps"}, 400)
                return
            try:
                self._json(self.data.compare(run, int(a), int(b)))
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
        token: str | None = None,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        warm_up()  # before the first request, not during it
        self.data = ViewerData(stores, poll_seconds=poll_seconds, storage_options=storage_options)
        self.loopback = is_loopback(host)
        # off loopback the Host header cannot be pinned (any name may reach the machine), so
        # a token is required; on loopback one may be given too (a shared machine)
        self.token = token or (None if self.loopback else secrets.token_urlsafe(24))
        handler = type("ViewerHandler", (_Handler,), {"data": self.data, "token": self.token})
        server_class = ThreadingHTTPServer
        if ":" in host:  # an IPv6 address
            server_class = type(
                "ViewerServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}
            )
        self.httpd = server_class((host, port), handler)
        handler.hosts = allowed_hosts(host, self.httpd.server_address[1]) if self.loopback else None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        query = f"?token={quote(self.token)}" if self.token else ""
        return f"http://{shown}:{port}/{query}"

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
    token: str | None = None,
    storage_options: dict[str, str] | None = None,
) -> ViewerServer:
    """Bind a viewer for ``stores`` (port 0 picks a free port); call ``.serve_forever()``.

    A store that does not exist yet is fine: the page shows the waiting state until its
    first evaluation lands. ``token``: required on every request (generated when ``host`` is
    not a loopback address and none is given); ``.url`` carries it.
    """
    return ViewerServer([str(s) for s in stores], host, port, poll_seconds, token, storage_options)
