"""The status server against hostile clients (issue 15): idle sockets, slowloris, floods, resets, and the
optional /status token; and, end to end, a real `wrapper serve` under a 256-descriptor limit that must
keep its real llama-server up while 300 idle clients hold the status port."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.supervisor_fixtures import Served
from wrapper.errors import ConfigError
from wrapper.settings import Environment, Secret
from wrapper.supervisor import Transition
from wrapper.supervisor.status import StatusState, read_token
from wrapper.supervisor.status_server import DEADLINE_S, READ_TIMEOUT_S, StatusServer

TOKEN = "st-0123456789abcdef"


@pytest.fixture
def server() -> Iterator[StatusServer]:
    state = StatusState("tiny", "/models/tiny.gguf")
    state(Transition(state="ready", previous="starting", pid=7, restarts=0, url="http://127.0.0.1:1", ts=0.0))
    srv = StatusServer("127.0.0.1", 0, state, token=Secret(TOKEN), cap=4).start()
    yield srv
    srv.stop()


def _get(srv: StatusServer, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{srv.port}{path}", headers=headers, timeout=3, trust_env=False)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (read returns EOF or a reset), None if still open."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_status_needs_the_bearer_token_healthz_and_metrics_stay_open(server: StatusServer) -> None:
    assert _get(server, "/status").status_code == 401
    assert _get(server, "/status").headers["WWW-Authenticate"].startswith("Bearer")
    assert _get(server, "/status", {"Authorization": "Bearer wrong"}).status_code == 401
    assert _get(server, "/status", {"Authorization": f"Basic {TOKEN}"}).status_code == 401
    ok = _get(server, "/status", {"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["llama_server"]["pid"] == 7
    assert TOKEN not in _get(server, "/status").text
    assert _get(server, "/healthz").status_code == 200
    assert 'llama_server_up{profile="tiny",model="/models/tiny.gguf"} 1' in _get(server, "/metrics").text


def test_token_from_a_file_and_a_file_that_would_leave_status_open(tmp_path: Path) -> None:
    good = tmp_path / "token"
    good.write_text(f"{TOKEN}\n")
    token = read_token(Environment.from_environ({"WRAPPER_STATUS_TOKEN_FILE": str(good)}))
    assert token is not None and token.reveal() == TOKEN
    assert read_token(Environment.from_environ({})) is None
    (tmp_path / "empty").write_text("\n")
    for bad, why in ((tmp_path / "empty", "empty"), (tmp_path, "cannot read"), (tmp_path / "nope", "cannot read")):
        with pytest.raises(ConfigError, match=why) as exc:
            read_token(Environment.from_environ({"WRAPPER_STATUS_TOKEN_FILE": str(bad)}))
        assert "WRAPPER_STATUS_TOKEN_FILE" in str(exc.value)
    with pytest.raises(ConfigError, match="whitespace"):
        read_token(Environment.from_environ({"WRAPPER_STATUS_TOKEN": "two words"}))


def test_idle_socket_is_dropped_after_the_read_timeout(server: StatusServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        took = _closed_within(idle, READ_TIMEOUT_S + 3)
    assert took is not None and took >= READ_TIMEOUT_S - 0.5, took


def test_slowloris_is_cut_at_the_connection_deadline(server: StatusServer) -> None:
    started = time.monotonic()
    closed = None
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        while time.monotonic() - started < DEADLINE_S + 4:
            try:
                slow.sendall(b"X-a: b\r\n")  # a header line a second: each read succeeds, the request never ends
            except OSError:
                closed = time.monotonic() - started
                break
            if _closed_within(slow, 1.0) is not None:
                closed = time.monotonic() - started
                break
    assert closed is not None and closed <= DEADLINE_S + 2, closed


def test_connections_over_the_cap_are_refused_at_once_not_queued(server: StatusServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    time.sleep(0.3)  # accepted and holding every slot
    started = time.monotonic()
    reply = _get(server, "/healthz")
    assert reply.status_code == 503 and reply.text == "busy\n"
    assert time.monotonic() - started < 1.5
    for sock in idle:
        sock.close()
    time.sleep(0.5)
    assert _get(server, "/healthz").status_code == 200  # slots come back once the idle clients go


def test_client_resets_leave_no_traceback(server: StatusServer, capfd: pytest.CaptureFixture[str]) -> None:
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /metr")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        sock.close()
    time.sleep(0.5)
    assert _get(server, "/healthz").status_code == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ConnectionResetError" not in out + err


NOFILE = 256
IDLE_CLIENTS = 300


@pytest.mark.llama
@pytest.mark.slow
def test_idle_status_clients_under_an_fd_limit_never_touch_llama_server(
        clean_env: pytest.MonkeyPatch, llama_server_bin: str, tiny_dense: Path, tmp_path: Path) -> None:
    # Before: ~200 idle clients exhausted 256 descriptors, the liveness probes failed with "too many open
    # files", llama-server was declared hung, SIGKILLed, could not be respawned, and the wrapper exited 4.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_CLIENTS + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    s = Served(tmp_path, llama_server_bin, tiny_dense, env={"WRAPPER_LOG_FORMAT": "json"},
               supervise={"liveness_interval_s": 0.5, "liveness_timeout_s": 2.0, "liveness_failures": 2},
               ctx_size=256)
    limited = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
               "os.execv(sys.argv[1], sys.argv[1:])")
    s.argv = [sys.executable, "-c", limited, *s.argv]
    s.start()
    try:
        pid = s.wait_ready(timeout=60)["llama_server"]["pid"]
        clients = []
        for _ in range(IDLE_CLIENTS):
            try:
                clients.append(socket.create_connection(("127.0.0.1", s.status_port), timeout=5))
            except OSError:
                break  # the backlog is full: the kernel refuses, which is also fine
        busy = 0
        time.sleep(READ_TIMEOUT_S + 3)  # the liveness probes run every 0.5 s meanwhile
        for sock in clients:
            sock.settimeout(0.05)
            with contextlib.suppress(OSError):
                busy += sock.recv(64).startswith(b"HTTP/1.1 503")
            sock.close()
        assert len(clients) >= 200 and busy >= len(clients) - 64, (len(clients), busy)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if s.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        health = s.get("/healthz").json()
        assert health == {"ok": True, "state": "ready", "restarts": 0, "pid": pid}
        assert s.proc is not None and s.proc.poll() is None
    finally:
        s.stop()
    log = s.log
    assert "hung" not in log and "liveness probe failed" not in log and "Too many open files" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    bad = [line for line in lines if not _is_json(line)]
    assert lines and not bad, bad[:5]


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
