"""Lifecycle against a real llama-server on a tiny model, through `wrapper serve` as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.supervisor_fixtures import Served, gone

pytestmark = [pytest.mark.llama, pytest.mark.slow]


def child_pid(status: dict[str, object]) -> int:
    llama = status["llama_server"]
    assert isinstance(llama, dict)
    return int(llama["pid"])


def test_kill_9_child_is_restarted_healthy_and_counted(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path
) -> None:
    s = served(llama_server_bin, tiny_dense)
    first = child_pid(s.wait_ready())
    assert s.get("/healthz").status_code == 200

    os.kill(first, signal.SIGKILL)
    again = s.wait_for(lambda st: st["state"] == "ready" and st["restarts"] == 1)

    assert child_pid(again) != first
    assert s.get("/healthz").json()["ok"] is True
    assert re.search(r"^llama_server_restarts_total\{[^}]*\} 1$", s.get("/metrics").text, re.M)
    assert "killed by SIGKILL" in s.log


def test_sigterm_stops_both_within_grace_and_exits_0(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path
) -> None:
    s = served(llama_server_bin, tiny_dense, supervise={"stop_grace_s": 5.0})
    pid = child_pid(s.wait_ready())
    assert s.proc is not None
    start = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)

    assert s.wait_exit(timeout=5.0) == 0
    assert time.monotonic() - start < 5.0
    assert gone(pid, within=0.5)
    assert s.log.count("sent SIGTERM to llama-server") == 1
    assert "SIGKILL" not in s.log


def test_wrapper_sigkilled_child_gone_within_2s(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path
) -> None:
    s = served(llama_server_bin, tiny_dense)
    pid = child_pid(s.wait_ready())
    assert s.proc is not None
    assert psutil.Process(pid).ppid() == s.proc.pid

    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(5)

    assert gone(pid, within=2.0), "llama-server outlived a SIGKILLed wrapper"


def test_sigstopped_child_detected_by_liveness_and_restarted(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path
) -> None:
    s = served(llama_server_bin, tiny_dense)
    pid = child_pid(s.wait_ready())

    os.kill(pid, signal.SIGSTOP)
    again = s.wait_for(lambda st: st["state"] == "ready" and st["restarts"] == 1, timeout=15)

    assert child_pid(again) != pid
    assert gone(pid, within=2.0)
    assert "liveness probes failed in a row" in s.log
    assert "process is stopped" in s.log
