"""The wrapper's own small HTTP server: /healthz, /status, /metrics (never inference traffic), serving a
`StatusState` (wrapper.supervisor.status).

The server is bounded (issue 15: ~200 idle clients under a 256-descriptor limit starved the supervisor's
own liveness probes, which then killed a healthy llama-server): every connection has a read timeout and a
hard deadline, at most `connection_cap()` are served at once (more are answered 503 and closed at once),
and a client that resets is one debug line, never a traceback. /status may require a Bearer token;
/healthz and /metrics stay open for orchestrators and scrapers.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import math
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from wrapper import logs
from wrapper.errors import PortInUse
from wrapper.settings import Secret
from wrapper.supervisor.status import StatusState

log = logging.getLogger("wrapper.status")

READ_TIMEOUT_S = 5.0  # an idle socket, or a request line/header that stalls this long, is dropped
DEADLINE_S = 10.0  # a whole connection, however slowly it trickles bytes (slowloris)
BACKLOG = 128  # socketserver's default of 5 timed out 19 of 1000 requests from 200 clients
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Connection: close\r\nRetry-After: 1\r\n\r\nbusy\n")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = READ_TIMEOUT_S  # applied to the socket by StreamRequestHandler.setup

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            snap = state.snapshot()
            body = {
                "ok": snap["ok"],
                "state": snap["state"],
                "restarts": snap["restarts"],
                "pid": snap["llama_server"]["pid"],
            }
            self._send(HTTPStatus.OK if snap["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, self._json(body))
        elif path == "/status":
            if self.server.authorized(self.headers.get("Authorization")):
                self._send(HTTPStatus.OK, self._json(state.snapshot()))
            else:
                needs = {"error": "/status needs 'Authorization: Bearer <token>' (WRAPPER_STATUS_TOKEN)"}
                self._send(HTTPStatus.UNAUTHORIZED, self._json(needs),
                           extra={"WWW-Authenticate": 'Bearer realm="wrapper-status"'})
        elif path == "/metrics":
            self._send(HTTPStatus.OK, state.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(
                HTTPStatus.NOT_FOUND, self._json({"error": "not found", "paths": ["/healthz", "/status", "/metrics"]})
            )

    def _send(self, code: HTTPStatus, body: str, ctype: str = "application/json",
              extra: dict[str, str] | None = None) -> None:
        # Last line of defence for /metrics text; JSON bodies were redacted value by value in `_json`,
        # and redacting them again as text would undo that care.
        data = (body if ctype == "application/json" else self.server.redactor.redact(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _json(self, data: object) -> str:
        return _json(data, self.server.redactor)


def _json(data: object, redactor: logs.Redactor) -> str:
    """JSON with every string redacted *before* encoding: nothing that looks like a secret leaves
    through this port, and the body stays valid JSON.

    Redacting the encoded text broke it (issue 15): `--alias 'my token="x"'` is encoded as
    `my token=\\"x\\"`, the `token=` pattern swallowed the backslash of the escape, and the bare quote
    that remained ended the string early.
    """
    return json.dumps(_redacted(data, redactor.redact), sort_keys=True) + "\n"


def _redacted(value: object, redact: Callable[[str], str]) -> object:
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, redact) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))  # strings, and anything else shown by its text (paths, enums)


def connection_cap() -> int:
    """How many status connections are served at once: a small share of this process's descriptor limit,
    so the supervisor's probes, llama-server's pipes and the log always have theirs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 64
    return max(4, min(64, soft // 8))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = BACKLOG

    def __init__(self, address: tuple[str, int], state: StatusState, token: Secret | None, cap: int,
                 redactor: logs.Redactor) -> None:
        self.state = state
        self.redactor = redactor
        self.token = token
        self.cap = cap
        self.refused = 0
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._starved_at = 0.0
        # An IPv6 host (`::`, `::1`) needs an IPv6 socket; `::` also takes IPv4 clients (Linux's default).
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.reveal().encode())

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # The listening socket stays readable while accept() fails: without a pause this loop
                # would spin a core. Warn at most once a minute.
                now = time.monotonic()
                if now - self._starved_at > 60:
                    log.warning("status server: out of file descriptors (%s); new status connections wait",
                                exc.strerror)
                    self._starved_at = now
                time.sleep(0.2)
            raise

    def verify_request(self, request: _Request, client_address: tuple[str, int]) -> bool:
        request = _stream(request)
        with self._lock:
            if len(self._deadlines) >= self.cap:
                self.refused += 1
                busy = True
            else:
                self._deadlines[request] = time.monotonic() + DEADLINE_S
                busy = False
        if busy:  # answered at once and closed (by socketserver), never queued behind the idle ones
            try:
                request.setblocking(False)
                request.send(_REFUSED)
            except OSError:
                pass
            log.debug("status server: %d connections open (the cap); refused %s", self.cap, client_address[0])
        return not busy

    def close_request(self, request: _Request) -> None:
        with self._lock:
            self._deadlines.pop(_stream(request), None)
        super().close_request(request)

    def service_actions(self) -> None:
        """Between polls of serve_forever: cut connections past their deadline. A shut-down socket wakes its
        handler thread, which then closes it (and frees its slot)."""
        now = time.monotonic()
        with self._lock:
            late = [r for r, deadline in self._deadlines.items() if deadline <= now]
            for request in late:
                self._deadlines[request] = math.inf
        for request in late:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: _Request, client_address: tuple[str, int]) -> None:
        # socketserver prints a traceback to stderr here; a client that resets or times out is routine.
        exc = sys.exc_info()[1]
        log.debug("status server: connection from %s ended: %s", client_address[0] if client_address else "?",
                  f"{type(exc).__name__}: {exc}" if exc else "error")


_Request = socket.socket | tuple[bytes, socket.socket]  # socketserver's type: a TCP server only gets the first


def _stream(request: _Request) -> socket.socket:
    return request if isinstance(request, socket.socket) else request[1]


class StatusServer:
    """Serves a StatusState on host:port from a daemon thread. With `token`, /status needs it as a Bearer
    token; `cap` is how many connections are served at once (default: `connection_cap()`)."""

    def __init__(self, host: str, port: int, state: StatusState, *, token: Secret | None = None,
                 cap: int | None = None, redactor: logs.Redactor | None = None) -> None:
        try:
            self._server = _Server((host, port), state, token, cap or connection_cap(),
                                   redactor if redactor is not None else logs.Redactor())
        except OSError as exc:
            raise PortInUse(
                f"WRAPPER_STATUS_PORT={port}: cannot listen on {host}:{port} ({exc.strerror or exc})",
                hint="set WRAPPER_STATUS_PORT to a free port, or 0 to disable the status server",
            ) from None
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="status-server", daemon=True
        )

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("status server on :%d (/healthz /metrics; /status %s; at most %d connections at once)",
                 self.port, "needs the Bearer token" if self._server.token else "open", self._server.cap)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)
