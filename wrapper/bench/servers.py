"""The llama-servers of one sweep config: K instances on distinct ports, started from the same argv `serve`
would derive, each in its own process group, and stopped with exactly one SIGTERM (then SIGKILL).

A sweep restarts servers many times and must survive every kind of failed start, so this is deliberately
simpler than the supervisor: no restarts, just "ready, or why not".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx

from wrapper.launch import flags
from wrapper.settings import Settings
from wrapper.supervisor.classify import classify


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
    log_path: Path
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]

    def tail(self, n: int = 60) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def failure(self) -> str:
        f = classify(self.proc.poll(), self.tail())
        detail = f.lines[0].strip() if f.lines else ""
        return f"{f.summary}: {detail}" if detail else f.summary


class ServerGroup:
    """Start K instances of one config; `.failure` says why they are not serving (None when ready)."""

    def __init__(self, s: Settings, caps: flags.Capabilities, model_file: Path, *, values: Mapping[str, Any],
                 origin: str, instances: int, log_dir: Path, start_timeout_s: float, stop_grace_s: float) -> None:
        self.instances: list[Instance] = []
        self.failure: str | None = None
        self._grace = stop_grace_s
        self._timeout = start_timeout_s
        # Derive every argv before starting anything: a flag this binary lacks fails the config cleanly.
        self._commands = [(flags.derive(instance_settings(s, values, origin, port), caps, model_file), port)
                          for port in (free_port() for _ in range(instances))]
        self._env = s.env.child_env()
        self._log_dir = log_dir

    def start(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for i, (cmd, port) in enumerate(self._commands):
            log_path = self._log_dir / f"instance-{i}.log"
            log_file = log_path.open("wb")
            proc = subprocess.Popen(
                cmd.argv, env=flags.full_env(cmd, self._env), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, process_group=0, close_fds=True,
            )
            self.instances.append(Instance(cmd.argv, f"http://127.0.0.1:{port}", log_path, proc, log_file))
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
            if inst.proc.poll() is not None:
                return inst.failure()
        return None

    def _wait_ready(self, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.instances)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for inst in list(pending):
                    if inst.proc.poll() is not None:
                        return f"server failed to start: {inst.failure()}"
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{inst.url}/health").status_code == 200:
                            pending.remove(inst)
                if time.monotonic() > deadline:
                    return f"server not ready after {timeout_s:g}s (still loading; raise repeat.start_timeout_s)"
                if pending:
                    time.sleep(0.05)
        return None

    def close(self) -> None:
        for inst in self.instances:
            # One SIGTERM to the whole group: llama-server exits hard on a second one.
            if inst.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(inst.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._grace
        for inst in self.instances:
            try:
                inst.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(inst.proc.pid, signal.SIGKILL)
                inst.proc.wait()
            inst.log_file.close()

    def __enter__(self) -> ServerGroup:
        try:
            self.start()
        except BaseException:
            self.close()  # a Ctrl-C or spawn error mid-start must not leave earlier instances running
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
