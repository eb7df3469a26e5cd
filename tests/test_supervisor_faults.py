"""Faults staged with a fake llama-server (tests/fakes/fake_llama_server.py) behind the real `wrapper serve`."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.supervisor_fixtures import Served, fake_binary, gone


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    return fake_binary(tmp_path)


@pytest.fixture
def model(tiny_dense: Path) -> Path:
    return tiny_dense  # the fake never reads it, but `serve` verifies the file before launching


def test_crash_loop_exits_4_with_reason_and_stderr_lines(
    served: Callable[..., Served], fake: Path, model: Path
) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "crash"}, supervise={"max_restarts": 2})
    assert s.wait_exit() == 4
    log = s.log
    assert "error: llama-server stopped unexpectedly (exit code 1); crash loop: 3 failures" in log
    assert "| 0.00.000.002 E ggml: GGML_ASSERT(fake) failed" in log
    assert log.count("-> starting") == 3


def test_crash_after_ready_is_restarted_then_gives_up(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(
        fake,
        model,
        env={"FAKE_LLAMA_MODE": "crash_after_ready", "FAKE_CRASH_AFTER_S": "1.5"},
        supervise={"max_restarts": 1},
    )
    s.wait_ready()
    assert s.wait_exit() == 4
    assert s.log.count("starting -> ready") == 2
    assert "fake crash after ready" in s.log


def test_bad_flag_is_not_retried(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "bad_flag"})
    assert s.wait_exit() == 4
    log = s.log
    assert log.count("-> starting") == 1
    assert "rejected an argument" in log and "not retryable" in log
    assert "| error: invalid argument: --bogus" in log
    assert "hint: check llamacpp.extra_args" in log


def test_child_address_in_use_is_not_retried(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "addr_in_use"})
    assert s.wait_exit() == 4
    assert s.log.count("-> starting") == 1
    assert "port is taken by another process" in s.log


def test_port_in_use_is_a_clear_error_before_launch(served: Callable[..., Served], fake: Path, model: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        s = served(fake, model, port=port, env={"FAKE_LLAMA_MODE": "ok"})
        assert s.wait_exit() == 2
    lines = [line for line in s.log.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert lines[0].startswith(f"error: llamacpp.port={port}: 127.0.0.1:{port} is already in use")
    assert "-> starting" not in s.log


def test_child_ignoring_sigterm_is_sigkilled_after_grace(
    served: Callable[..., Served], fake: Path, model: Path
) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "ignore_term"}, supervise={"stop_grace_s": 1.0})
    pid = int(s.wait_ready()["llama_server"]["pid"])
    assert s.proc is not None
    start = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit(timeout=6) == 0
    took = time.monotonic() - start
    assert 1.0 <= took < 4.0
    assert gone(pid, within=0.5)
    assert "ignored SIGTERM for 1s: sending SIGKILL" in s.log


def test_second_sigint_forces_quick_stop(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "ignore_term"}, supervise={"stop_grace_s": 30.0})
    pid = int(s.wait_ready()["llama_server"]["pid"])
    assert s.proc is not None
    start = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGINT)
    assert s.wait_exit(timeout=5) == 130
    assert time.monotonic() - start < 3.0
    assert gone(pid, within=0.5)


def test_flooding_child_does_not_deadlock_and_memory_stays_bounded(
    served: Callable[..., Served], fake: Path, model: Path
) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "flood"})
    s.wait_ready()
    assert s.proc is not None
    wrapper = psutil.Process(s.proc.pid)
    rss = []
    for _ in range(6):
        time.sleep(0.5)
        assert s.get("/healthz").status_code == 200  # still serving and still probing
        rss.append(wrapper.memory_info().rss)
    assert max(rss) < 150 * 2**20, f"wrapper RSS grew to {max(rss) / 2**20:.0f} MiB"
    assert max(rss) - rss[1] < 40 * 2**20, f"RSS keeps growing: {[r // 2**20 for r in rss]} MiB"
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit(timeout=10) == 0


def test_stalled_load_times_out_and_counts_as_failure(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "hang"}, supervise={"load_timeout_s": 0.5, "max_restarts": 1})
    assert s.wait_exit() == 4
    assert "not ready and no output for" in s.log
    assert s.log.count("-> starting") == 2


def test_healthz_503_while_loading_then_200(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "ok", "FAKE_LOAD_S": "1.5"})
    s.wait_for(lambda st: st["state"] == "starting" and st["llama_server"]["pid"] is not None)
    loading = s.get("/healthz")
    assert loading.status_code == 503
    assert loading.json() == {"ok": False, "state": "starting", "restarts": 0, "pid": loading.json()["pid"]}
    s.wait_ready()
    assert s.get("/healthz").status_code == 200


def test_hung_inference_loop_is_caught_though_health_stays_green(
    served: Callable[..., Served], fake: Path, model: Path
) -> None:
    # llama-server answers /health from its HTTP threads even when the inference loop is stuck; /slots has
    # to go through that loop, so the liveness probe asks it.
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "hang_inference"}, supervise={"max_restarts": 5})
    s.wait_ready()
    again = s.wait_for(lambda st: st["restarts"] >= 1 and st["state"] == "ready", timeout=15)
    assert again["restarts"] >= 1
    assert "liveness probes failed in a row" in s.log
    health = httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=2, trust_env=False)
    assert health.status_code == 200  # the fault the probe caught is invisible to /health


def test_without_slots_liveness_falls_back_to_health(served: Callable[..., Served], fake: Path, model: Path) -> None:
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "no_slots"})
    s.wait_ready()
    time.sleep(1.5)  # several liveness intervals
    status = s.status()
    assert status is not None and status["state"] == "ready" and status["restarts"] == 0
    assert "liveness probes use /health" in s.log
    assert "liveness probe failed" not in s.log


def test_busy_server_is_not_mistaken_for_a_hung_one(served: Callable[..., Served], fake: Path, model: Path) -> None:
    # /slots waits for the inference loop's next step; a child that keeps using CPU is working (a long
    # prompt on a slow CPU), so slow answers alone never restart it.
    s = served(fake, model, env={"FAKE_LLAMA_MODE": "busy_inference"})
    s.wait_ready()
    time.sleep(3.0)  # ~10 liveness intervals, each probe timing out
    status = s.status()
    assert status is not None and status["state"] == "ready" and status["restarts"] == 0, s.log[-2000:]
    assert "busy (a long prompt?), not hung" in s.log
