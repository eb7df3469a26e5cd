"""Supervision of llama-server: the child (process), its health (readiness), why it failed (classify),
whether to restart (policy), the state machine that owns all of it (machine), and what the status server
shows (status; the HTTP server itself is status_server, imported once llama-server is spawned).

`wrapper.serve.run(launch)` wires them together for `wrapper serve`; bench-profile uses the child alone.
"""

from __future__ import annotations

from wrapper.supervisor.machine import Listener, State, Supervisor, Transition
from wrapper.supervisor.status import StatusState

__all__ = ["Listener", "State", "StatusState", "Supervisor", "Transition", "check_port_free"]


def check_port_free(host: str, port: int, setting: str = "llamacpp.port", profile: str = "") -> None:
    """Raise PortInUse when something already listens on host:port (the preflight's own check, repeated
    for callers that supervise without a preflight claim, such as bench-profile)."""
    from wrapper.launch.preflight import check_bindable

    check_bindable(setting, host, port, profile or "this")
