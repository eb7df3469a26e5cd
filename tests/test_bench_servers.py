"""The sweep's server group on the fake llama-server: logs, failure reasons, and stops (no model load)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from tests.supervisor_fixtures import fake_binary
from wrapper import settings
from wrapper.bench.servers import ServerGroup
from wrapper.bench.signals import Stopped, StopRequest
from wrapper.launch import flags


def _group(clean_env: pytest.MonkeyPatch, tmp_path: Path, mode: str, *, instances: int = 1,
           stop: StopRequest | None = None, grace_s: float = 5.0, **env: str) -> ServerGroup:
    binary = fake_binary(tmp_path)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    clean_env.setenv("LLAMA_SERVER_BIN", str(binary))
    clean_env.setenv("FAKE_LLAMA_MODE", mode)
    for name, value in env.items():
        clean_env.setenv(name, value)
    reg = write_registry(tmp_path / "reg.yaml", {"tiny": tiny_profile(model, free_port())})
    s = settings.build("tiny", str(reg))
    caps = flags.detect(str(binary), tmp_path / "caps")
    return ServerGroup(s, caps, model, values={}, origin="bench:test", instances=instances,
                       log_dir=tmp_path / "logs", start_timeout_s=10.0, stop_grace_s=grace_s, stop=stop)


def _gone(pids: list[int]) -> bool:
    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(p) for p in pids)


def test_instances_get_their_own_group_a_log_file_and_stop_on_close(clean_env: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    with _group(clean_env, tmp_path, "ok", instances=2) as group:
        assert group.failure is None
        pids = [i.child.pid for i in group.instances]
        assert all(p is not None and psutil.Process(p).ppid() == psutil.Process().pid for p in pids)
        # The argv bench derived, exec'd in place of the parent-death shim, in its own process group
        # (a terminal's Ctrl-C does not reach it).
        for p, inst in zip(pids, group.instances, strict=True):
            assert p is not None
            cmdline = psutil.Process(p).cmdline()
            assert cmdline[-len(inst.argv) + 1:] == inst.argv[1:] and not any("_pdeathsig" in a for a in cmdline)
        assert all(p is not None and os.getpgid(p) == p for p in pids)
    assert _gone([p for p in pids if p is not None])
    for n in range(2):
        assert "listening" in (tmp_path / "logs" / f"instance-{n}.log").read_text()


def test_crash_on_start_is_reported_with_the_servers_last_words(clean_env: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    with _group(clean_env, tmp_path, "crash") as group:
        assert group.failure is not None and group.failure.startswith("server failed to start")
        assert "GGML_ASSERT(fake)" in group.failure
    assert "GGML_ASSERT(fake)" in (tmp_path / "logs" / "instance-0.log").read_text()


def test_stop_during_a_slow_load_aborts_the_start_and_leaves_no_server(clean_env: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    stop = StopRequest()
    group = _group(clean_env, tmp_path, "ok", stop=stop, FAKE_LOAD_S="60")
    # The test plays the signal handler, which only records, half a second into the load.
    threading.Timer(0.5, stop.record, args=(signal.SIGTERM,)).start()
    started = time.monotonic()
    with pytest.raises(Stopped), group:
        pytest.fail("a stopped start must not yield its servers")
    assert 0.4 < time.monotonic() - started < 5
    pids = [i.child.pid for i in group.instances]
    assert len(pids) == 1 and pids[0] is not None and _gone([pids[0]])


def test_second_signal_skips_the_stop_grace(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A server that ignores SIGTERM would hold the sweep for the whole grace; a second signal means now.
    stop = StopRequest()
    group = _group(clean_env, tmp_path, "ignore_term", stop=stop, grace_s=60.0)
    with group:
        assert group.failure is None
        pid = group.instances[0].child.pid
        stop.record(signal.SIGTERM)
        stop.record(signal.SIGINT)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert pid is not None and _gone([pid])


def test_server_ignoring_sigterm_is_killed_after_the_grace(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    group = _group(clean_env, tmp_path, "ignore_term", grace_s=1.0)
    with group:
        pid = group.instances[0].child.pid
        started = time.monotonic()
    assert 0.9 < time.monotonic() - started < 5
    assert pid is not None and _gone([pid])
