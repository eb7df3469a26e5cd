"""Real servers for the load generator, self-check and events tests: llama-server, nats-server, fake SSE."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port

FAKE_SSE = REPO / "benchmarks" / "loadgen_capacity.py"


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Nats:
    """A real nats-server on a fixed port that a test can start, kill and start again."""

    def __init__(self, binary: str, store: Path, jetstream: bool = True) -> None:
        self.binary, self.store, self.jetstream = binary, store, jetstream
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nats:
        args = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def nats_factory(nats_server_bin: str, tmp_path: Path) -> Iterator[type[Nats]]:
    made: list[Nats] = []

    class Factory(Nats):
        def __init__(self, jetstream: bool = True) -> None:
            super().__init__(nats_server_bin, tmp_path / f"js{len(made)}", jetstream)
            made.append(self)

    yield Factory
    for server in made:
        server.kill()


@contextlib.contextmanager
def running_llama(binary: str, model: Path, *args: str) -> Iterator[str]:
    """A real llama-server on 127.0.0.1 with these extra args, from ready (/health 200) to stopped."""
    port = free_port()
    proc = subprocess.Popen([binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
                             *args, "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llama-server not ready in 60s")
            time.sleep(0.1)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def llama_url(llama_server_bin: str, tiny_dense: Path) -> Iterator[str]:
    """A real llama-server on the tiny model: 2 slots, --metrics for the server's own token counters."""
    with running_llama(llama_server_bin, tiny_dense, "-c", "2048", "-np", "2", "--metrics") as url:
        yield url


def server_counters(url: str) -> dict[str, float]:
    """llama-server's own Prometheus counters (llamacpp:tokens_predicted_total, ...)."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("llamacpp:"):
            name, value = line.split()
            out[name.removeprefix("llamacpp:")] = float(value)
    return out


@pytest.fixture
def fake_sse() -> Iterator[callable]:  # type: ignore[valid-type]
    """Start the fake streaming server from benchmarks/loadgen_capacity.py; returns its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> str:
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(FAKE_SSE), "serve", "--port", str(port), *extra],
                                stdout=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port, proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        stop(proc)
