"""The llama-servers of one sweep config: K instances on distinct ports, started from the same argv `serve`
would derive, each through the supervisor's `Child` (own process group, parent-death guard, exactly one
SIGTERM then SIGKILL after the grace) and judged ready by the supervisor's health probes.

A sweep restarts servers many times and must survive every kind of failed start, so there is no state
machine and no restarts here, just "ready, or why not".
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wrapper.bench.signals import StopRequest
from wrapper.launch import flags
from wrapper.settings import Settings, local_url
from wrapper.supervisor.classify import classify
from wrapper.supervisor.process import Child
from wrapper.supervisor.readiness import Prober

_PROBE_TIMEOUT_S = 2.0
_POLL_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def instance_settings(s: Settings, values: Mapping[str, Any], origin: str, port: int) -> Settings:
    """The profile with this config's values and a private port; the bench, not the env, owns host and port."""
    origins = {k: v for k, v in s.origins.items() if k not in ("llamacpp.port", "llamacpp.host")}
    base = dataclasses.replace(s, origins=origins)
    out, _ = base.with_layer({**values, "llamacpp.host": "127.0.0.1", "llamacpp.port": port}, origin)
    return out


@dataclasses.dataclass
class Instance:
    argv: list[str]
    url: str
    child: Child

    def failure(self) -> str:
        if not self.child.running():
            self.child.drain()  # the last lines say why it exited
        f = classify(self.child.returncode, list(self.child.tail)[-60:])
        detail = f.lines[0].strip() if f.lines else ""
        return f"{f.summary}: {detail}" if detail else f.summary


class ServerGroup:
    """Start K instances of one config; `.failure` says why they are not serving (None when ready).

    Start and stop from one thread: the parent-death signal of each child is tied to the thread that forked
    it. A requested stop (`stop`) aborts the start or the readiness wait by raising `Stopped`; a second
    signal while stopping skips the grace."""

    def __init__(self, s: Settings, caps: flags.Capabilities, model_file: Path, *, values: Mapping[str, Any],
                 origin: str, instances: int, log_dir: Path, start_timeout_s: float, stop_grace_s: float,
                 stop: StopRequest | None = None) -> None:
        self.instances: list[Instance] = []
        self.failure: str | None = None
        self._grace = stop_grace_s
        self._timeout = start_timeout_s
        self._stop = stop or StopRequest()
        self._wake = threading.Event()  # set by a child's exit or a finished probe
        # Derive every argv before starting anything: a flag this binary lacks fails the config cleanly.
        self._commands = [(flags.derive(instance_settings(s, values, origin, port), caps, model_file), port)
                          for port in (free_port() for _ in range(instances))]
        self._env = s.env.child_env()
        self._log_dir = log_dir

    def start(self) -> None:
        for i, (cmd, port) in enumerate(self._commands):
            self._stop.check()
            child = Child(cmd.argv, flags.full_env(cmd, self._env), self._wake.set,
                          log_path=self._log_dir / f"instance-{i}.log", echo=False)
            try:
                child.start()
            except BaseException:
                child.close()
                raise
            self.instances.append(Instance(cmd.argv, local_url("127.0.0.1", port), child))
        self.failure = self._wait_ready(self._timeout)

    @property
    def urls(self) -> list[str]:
        return [i.url for i in self.instances]

    @property
    def argv(self) -> list[str]:
        return self._commands[0][0].argv if self._commands else []

    def dead(self) -> str | None:
        """Why an instance stopped while serving, or None when all still run."""
        for inst in self.instances:
            if not inst.child.running():
                return inst.failure()
        return None

    def _wait_ready(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        probers = {id(inst): Prober(inst.url, self._wake.set) for inst in self.instances}
        pending = list(self.instances)
        try:
            while pending:
                self._stop.check()
                for inst in list(pending):
                    if not inst.child.running():
                        return f"server failed to start: {inst.failure()}"
                    prober = probers[id(inst)]
                    result = prober.take()
                    if result is not None and result.ready:
                        pending.remove(inst)
                    else:
                        prober.request(_PROBE_TIMEOUT_S)
                if pending and time.monotonic() > deadline:
                    return f"server not ready after {timeout_s:g}s (still loading; raise repeat.start_timeout_s)"
                if pending:
                    # A probe that is not answered waits in its own thread; a child's exit or a signal
                    # is seen within one poll.
                    self._wake.wait(_POLL_S)
                    self._wake.clear()
        finally:
            for prober in probers.values():
                prober.close()
        return None

    def close(self) -> None:
        # One SIGTERM to each whole group: llama-server exits hard on a second one.
        for inst in self.instances:
            inst.child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        for inst in self.instances:
            while inst.child.wait(min(_POLL_S, deadline - time.monotonic())) is None:
                if self._stop.forced or time.monotonic() >= deadline:
                    inst.child.signal_group(signal.SIGKILL)
                    inst.child.wait(5.0)
                    break
            inst.child.close()

    def __enter__(self) -> ServerGroup:
        try:
            self.start()
        except BaseException:
            self.close()  # a stop or spawn error mid-start must not leave earlier instances running
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
