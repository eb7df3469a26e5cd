"""What the wrapper's status server shows: `StatusState`, and the token that guards /status.

The server itself (wrapper.supervisor.status_server) is started only once llama-server has been spawned:
its HTTP stack costs start-up time that llama-server's load does not need to wait for (issue 16).

`StatusState` is a supervisor listener (it is called with every transition) and a place where other
parts publish what they learn: `state.selfcheck` (the last self-check result, a JSON-able dict) and
`state.extra` (any JSON-able facts, shown under "extra" in /status; numeric ones also in /metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrapper.errors import ConfigError
from wrapper.profiles.schema import SECRET_FLAGS
from wrapper.settings import Environment, Secret
from wrapper.supervisor.metrics import numeric, relabel, upstream_reader

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
