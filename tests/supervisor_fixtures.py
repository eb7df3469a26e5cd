"""Run `wrapper serve` as a real subprocess against a temp registry and watch it through /status."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port, tiny_profile, write_registry

FAKE = REPO / "tests" / "fakes" / "fake_llama_server.py"

# Short timings so a whole lifecycle fits in a few seconds.
FAST = {
    "stop_grace_s": 3.0,
    "load_timeout_s": 10.0,
    "max_restarts": 3,
    "restart_window_s": 60.0,
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.2,
    "stable_after_s": 30.0,
    "liveness_interval_s": 0.3,
    "liveness_timeout_s": 0.5,
    "liveness_failures": 2,
}


def fake_binary(directory: Path) -> Path:
    """The fake server with this interpreter in its shebang (no PATH lookup, no pyenv shim)."""
    path = directory / "llama-server"
    path.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
    path.chmod(0o755)
    return path


class Served:
    """One `python -m wrapper serve` process with its log in a file."""

    def __init__(
        self,
        tmp: Path,
        binary: str | Path,
        model: Path,
        *,
        supervise: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        **llamacpp: Any,
    ) -> None:
        self.port = int(llamacpp.pop("port", 0)) or free_port()
        self.status_port = free_port()
        profile = tiny_profile(model, self.port, **llamacpp)
        profile["supervise"] = {**FAST, **(supervise or {})}
        registry = write_registry(tmp / "profiles.yaml", {"tiny": profile})
        self.log_path = tmp / "serve.log"
        self.env = {
            **os.environ,
            "LLAMA_SERVER_BIN": str(binary),
            "WRAPPER_STATUS_PORT": str(self.status_port),
            "WRAPPER_STATUS_HOST": "127.0.0.1",
            **(env or {}),
        }
        self.argv = [sys.executable, "-m", "wrapper", "serve", "--profile", "tiny", "--config", str(registry)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Served:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 2.0) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.status_port}{path}", timeout=timeout, trust_env=False)

    def status(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = self.get("/status").json()
        except httpx.HTTPError:
            return None
        return data

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"wrapper exited {self.proc.returncode} early; log:\n{self.log[-3000:]}")
            last = self.status()
            if last is not None and predicate(last):
                return last
            time.sleep(0.05)
        pytest.fail(f"timed out; last status {last}; log:\n{self.log[-3000:]}")

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s["state"] == "ready", timeout)

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wrapper still running after {timeout}s; log:\n{self.log[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


def gone(pid: int, within: float) -> bool:
    """True when pid is gone (or a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def served(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def factory(binary: str | Path, model: Path, **kwargs: Any) -> Served:
        s = Served(tmp_path, binary, model, **kwargs).start()
        started.append(s)
        return s

    yield factory
    for s in started:
        pid = (s.status() or {}).get("llama_server", {}).get("pid")
        s.stop()
        if pid:
            # The wrapper's own safeguard kills the child when the wrapper is SIGKILLed; make sure anyway,
            # but only if that pid still runs our command (never a process that reused the number).
            with contextlib.suppress(psutil.Error):
                child = psutil.Process(pid)
                if s.argv and str(s.env["LLAMA_SERVER_BIN"]) in " ".join(child.cmdline()):
                    child.kill()
