"""Supervision of llama-server: `run(prepared)` is what `wrapper serve` does after `serve.prepare`.

Modules: process (the child, its process group and logs), readiness (health probes), classify (why it
failed), policy (whether and when to restart), machine (the state machine that owns all of it).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from wrapper import flags
from wrapper.errors import ConfigError, PortInUse
from wrapper.status import StatusServer, StatusState
from wrapper.supervisor.machine import Listener, Supervisor
from wrapper.supervisor.readiness import health_url

if TYPE_CHECKING:
    from wrapper.acquire import ModelFile
    from wrapper.serve import Prepared

__all__ = ["Listener", "StatusState", "Supervisor", "check_port_free", "run"]

log = logging.getLogger("wrapper.supervisor")


def check_port_free(host: str, port: int, setting: str = "llamacpp.port") -> None:
    """Raise PortInUse when something already listens on host:port.

    SO_REUSEADDR as llama-server sets it: a TIME_WAIT left by a previous run is not "in use".
    """
    bind_host = "" if host in ("0.0.0.0", "::") else host
    try:
        infos = socket.getaddrinfo(bind_host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"llamacpp.host={host!r}: cannot resolve ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise PortInUse(
                f"{setting}={port}: {host}:{port} is already in use ({exc.strerror or exc})",
                hint="stop whatever listens there (`ss -ltnp`), or choose another port "
                "(llamacpp.port / LLAMACPP_PORT_OVERRIDE)",
            ) from None


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
    check_port_free(host, port)
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
