"""The wrapper's own small HTTP server: /healthz, /status, /metrics (never inference traffic).

`StatusState` is a supervisor listener (it is called with every transition) and a place where other
parts publish what they learn: `state.selfcheck` (the last self-check result, a JSON-able dict) and
`state.extra` (any JSON-able facts, shown under "extra" in /status; numeric ones also in /metrics).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from wrapper import logs
from wrapper.errors import PortInUse
from wrapper.profiles.schema import SECRET_FLAGS

if TYPE_CHECKING:
    from wrapper.launch.prepare import Launch
    from wrapper.supervisor.machine import Transition

log = logging.getLogger("wrapper.status")

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
        lines += _numeric("wrapper_selfcheck", snap["selfcheck"] or {})
        lines += _numeric("wrapper_extra", snap["extra"])
        return "\n".join(lines) + "\n"


def _numeric(prefix: str, data: dict[str, Any]) -> list[str]:
    """Flatten numbers (and booleans) one level deep into gauges; other values are /status-only."""
    out = []
    for key, value in sorted(data.items()):
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            if isinstance(v, bool | int | float) and not (isinstance(v, float) and math.isnan(v)):
                name = "_".join(p for p in (prefix, key, sub) if p)
                name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
                out.append(f"{name} {float(v):g}")
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server

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
            self._send(HTTPStatus.OK if snap["ok"] else HTTPStatus.SERVICE_UNAVAILABLE, _json(body))
        elif path == "/status":
            self._send(HTTPStatus.OK, _json(state.snapshot()))
        elif path == "/metrics":
            self._send(HTTPStatus.OK, state.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(
                HTTPStatus.NOT_FOUND, _json({"error": "not found", "paths": ["/healthz", "/status", "/metrics"]})
            )

    def _send(self, code: HTTPStatus, body: str, ctype: str = "application/json") -> None:
        # Last line of defence for /metrics text; JSON bodies were redacted value by value in `_json`,
        # and redacting them again as text would undo that care.
        data = (body if ctype == "application/json" else logs.redactor().redact(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _json(data: Any) -> str:
    """JSON with every string redacted *before* encoding: nothing that looks like a secret leaves
    through this port, and the body stays valid JSON.

    Redacting the encoded text broke it (issue 15): `--alias 'my token="x"'` is encoded as
    `my token=\\"x\\"`, the `token=` pattern swallowed the backslash of the escape, and the bare quote
    that remained ended the string early.
    """
    return json.dumps(_redacted(data, logs.redactor().redact), sort_keys=True) + "\n"


def _redacted(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, redact) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))  # strings, and anything else shown by its text (paths, enums)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: StatusState) -> None:
        self.state = state
        super().__init__(address, _Handler)


class StatusServer:
    """Serves a StatusState on host:port from a daemon thread."""

    def __init__(self, host: str, port: int, state: StatusState) -> None:
        try:
            self._server = _Server((host, port), state)
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
        log.info("status server on :%d (/healthz /status /metrics)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)
