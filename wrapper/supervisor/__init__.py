"""Supervision of llama-server: `run(prepared)` is what `wrapper serve` does after `serve.prepare`.

Modules: process (the child, its process group and logs), readiness (health probes), classify (why it
failed), policy (whether and when to restart), machine (the state machine that owns all of it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from wrapper.errors import ConfigError
from wrapper.launch import flags
from wrapper.supervisor.machine import Listener, Supervisor
from wrapper.supervisor.readiness import health_url
from wrapper.supervisor.status import StatusServer, StatusState

if TYPE_CHECKING:
    from wrapper.launch.prepare import Prepared
    from wrapper.model.acquire import ModelFile

__all__ = ["Listener", "StatusState", "Supervisor", "check_port_free", "run"]

log = logging.getLogger("wrapper.supervisor")


def check_port_free(host: str, port: int, setting: str = "llamacpp.port", profile: str = "") -> None:
    """Raise PortInUse when something already listens on host:port (the preflight's own check, repeated
    here for callers that supervise without a preflight claim, such as bench-profile)."""
    from wrapper.launch.preflight import check_bindable

    check_bindable(setting, host, port, profile or "this")


def run(
    prepared: Prepared,
    *,
    listeners: Iterable[Listener] = (),
    status: StatusState | None = None,
    model: ModelFile | None = None,
) -> int:
    """Supervise llama-server for `prepared` until stopped. Returns the exit code (0 clean stop, 130 forced)
    or raises ServerFailed (exit 4) when it cannot be kept up, PortInUse (exit 2) before it starts."""
    s = prepared.settings
    host, port = s.server.host, s.server.port
    if s.env.status_port and s.env.status_port == port:
        raise ConfigError(
            f"WRAPPER_STATUS_PORT={port} is also llama-server's port (llamacpp.port)",
            hint="give the status server another port, or 0 to disable it",
        )
    check_port_free(host, port, profile=s.profile_name)
    status = status if status is not None else StatusState.from_prepared(prepared, model)
    server = StatusServer(s.env.status_host, s.env.status_port, status).start() if s.env.status_port else None
    env = flags.full_env(prepared.command, s.env.child_env())
    supervisor = Supervisor(
        prepared.command.argv, env, s.profile.supervise, health_url(host, port), listeners=[status, *listeners]
    )
    try:
        return supervisor.run()
    finally:
        if server is not None:
            server.stop()
