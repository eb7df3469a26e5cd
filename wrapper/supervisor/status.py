"""The wrapper's own small HTTP server: /healthz, /status, /metrics (never inference traffic).

`StatusState` is a supervisor listener (it is called with every transition) and a place where other
parts publish what they learn: `state.selfcheck` (the last self-check result, a JSON-able dict) and
`state.extra` (any JSON-able facts, shown under "extra" in /status; numeric ones also in /metrics).

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapper import logs
from wrapper.errors import ConfigError, PortInUse
from wrapper.profiles.schema import SECRET_FLAGS
from wrapper.settings import Environment, Secret
from wrapper.supervisor.metrics import numeric, relabel, upstream_reader

if TYPE_CHECKING:
    from wrapper.launch.prepare import Launch
    from wrapper.supervisor.machine import Transition

log = logging.getLogger("wrapper.status")

READ_TIMEOUT_S = 5.0  # an idle socket, or a request line/header that stalls this long, is dropped
DEADLINE_S = 10.0  # a whole connection, however slowly it trickles bytes (slowloris)
BACKLOG = 128  # socketserver's default of 5 timed out 19 of 1000 requests from 200 clients
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Connection: close\r\nRetry-After: 1\r\n\r\nbusy\n")

STATES = ("stopped", "starting", "ready", "restarting", "stopping", "failed")


class StatusState:
    def __init__(self, profile: str = "", model: str = "", sha256: str | None = None) -> None:
        self.profile = profile
        self.model = model
        self.model_sha256 = sha256
        self.argv: list[str] = []
        self.args: list[dict[str, Any]] = []
        self.binary_version = ""
        self.url = ""
        self.state = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.reason = ""
        self.selfcheck: dict[str, Any] | None = None
        self.decisions: list[str] = []  # tuning and placement decisions, in words
        self.env: dict[str, str] = {}  # variables set for llama-server (CUDA_VISIBLE_DEVICES)
        self.extra: dict[str, Any] = {}
        # /metrics: every sample carries these labels (profile, instance, node, model), and llama-server's own
        # metrics (read by `upstream`, which returns its /metrics text) are re-served with them.
        self.labels: dict[str, str] = {"profile": profile, "model": model}
        self.upstream: Callable[[], str] | None = None
        self.started = time.monotonic()
        self.ready_since: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_launch(cls, launch: Launch) -> StatusState:
        state = cls(launch.settings.profile_name, str(launch.model_file), launch.sha256)
        state.url = launch.url
        state.argv = launch.command.redacted_argv()
        state.args = [
            {
                "flag": a.flag,
                "value": "***" if a.flag in SECRET_FLAGS else a.value,
                "setting": a.knob,
                "origin": a.origin,
            }
            for a in launch.command.args
        ]
        state.binary_version = launch.capabilities.version
        state.decisions = list(launch.decisions)
        state.env = dict(launch.command.env)
        s = launch.settings
        who = s.identity
        state.labels = {"profile": s.profile_name, "instance": who.instance_id, "node": who.node_id,
                        "model": s.profile.model_id or launch.model_file.name}
        if any(a.flag == "--metrics" for a in launch.command.args) or "--metrics" in launch.command.extra:
            state.upstream = upstream_reader(launch.url, launch.api_key)
        return state

    def __call__(self, t: Transition) -> None:
        """Supervisor listener: keep the latest state."""
        with self._lock:
            self.state = t.state
            self.pid = t.pid
            self.restarts = t.restarts
            self.url = t.url or self.url
            self.reason = t.reason if t.state in ("restarting", "failed", "stopping") else ""
            self.ready_since = time.monotonic() if t.state == "ready" else None

    def ready(self) -> bool:
        return self.state == "ready"

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            return {
                "ok": self.state == "ready",
                "profile": self.profile,
                "model": {"path": self.model, "sha256": self.model_sha256},
                "llama_server": {
                    "url": self.url,
                    "binary_version": self.binary_version,
                    "argv": self.argv,
                    "args": self.args,
                    "env": self.env,
                    "pid": self.pid,
                },
                "decisions": self.decisions,
                "state": self.state,
                "reason": self.reason,
                "restarts": self.restarts,
                "uptime_s": round(now - self.started, 3),
                "ready_s": round(now - self.ready_since, 3) if self.ready_since is not None else 0.0,
                "selfcheck": self.selfcheck,
                "extra": dict(self.extra),
            }

    def metrics(self) -> str:
        snap = self.snapshot()
        lines = [
            "# HELP wrapper_up The wrapper process is running.",
            "# TYPE wrapper_up gauge",
            "wrapper_up 1",
            "# HELP llama_server_up llama-server is ready to serve.",
            "# TYPE llama_server_up gauge",
            f"llama_server_up {int(snap['ok'])}",
            "# HELP llama_server_state Current supervisor state (1 for the current one).",
            "# TYPE llama_server_state gauge",
        ]
        lines += [f'llama_server_state{{state="{s}"}} {int(s == snap["state"])}' for s in STATES]
        lines += [
            "# HELP llama_server_restarts_total Restarts since the wrapper started.",
            "# TYPE llama_server_restarts_total counter",
            f"llama_server_restarts_total {snap['restarts']}",
            "# HELP llama_server_ready_seconds Seconds since llama-server last became ready (0 when not ready).",
            "# TYPE llama_server_ready_seconds gauge",
            f"llama_server_ready_seconds {snap['ready_s']}",
            "# HELP wrapper_uptime_seconds Seconds since the wrapper started.",
            "# TYPE wrapper_uptime_seconds gauge",
            f"wrapper_uptime_seconds {snap['uptime_s']}",
        ]
        lines += numeric("wrapper_selfcheck", snap["selfcheck"] or {}, "Last self-check")
        lines += numeric("wrapper_extra", snap["extra"], "Reported fact")
        lines += self._upstream_lines(snap["ok"])
        return relabel("\n".join(lines) + "\n", self.labels)

    def _upstream_lines(self, ready: bool) -> list[str]:
        """llama-server's own metrics (from --metrics), read now; a gauge says whether that worked."""
        if self.upstream is None:
            return []
        text, up = "", 0
        if ready:
            try:
                text, up = self.upstream(), 1
            except Exception as exc:  # a scrape must still answer with the wrapper's own metrics
                log.debug("llama-server /metrics unreadable: %s", exc)
        head = ["# HELP wrapper_llama_metrics_up llama-server's own /metrics was read for this scrape.",
                "# TYPE wrapper_llama_metrics_up gauge", f"wrapper_llama_metrics_up {up}"]
        return head + [line for line in text.splitlines() if line.strip()]


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


def read_token(env: Environment) -> Secret | None:
    """The Bearer token /status requires: WRAPPER_STATUS_TOKEN, or the first line of
    WRAPPER_STATUS_TOKEN_FILE (a mounted secret). None: /status is open."""
    if env.status_token is not None:
        token, where = env.status_token.reveal(), "WRAPPER_STATUS_TOKEN"
    elif env.status_token_file:
        where = f"WRAPPER_STATUS_TOKEN_FILE={env.status_token_file}"
        hint = "put the token on the first line of that file, or unset WRAPPER_STATUS_TOKEN_FILE"
        try:
            token = Path(env.status_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read it ({getattr(exc, 'strerror', None) or exc})", hint) from None
        if not token:
            raise ConfigError(f"{where}: the file is empty; /status would be open", hint)
    else:
        return None
    if any(c.isspace() for c in token):
        raise ConfigError(f"{where}: the token contains whitespace or several lines",
                          hint="use one line of printable characters (e.g. `openssl rand -hex 24`)")
    return Secret(token)


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
