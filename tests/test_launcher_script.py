"""Issue 15 item 17: a LLAMA_SERVER_BIN that is a launcher script without `exec` runs llama-server as its child;
a `kill -9` of the wrapper used to leave that llama-server running (and holding the port)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.supervisor_fixtures import Served, gone

pytestmark = pytest.mark.llama


def _launcher(directory: Path, real: str) -> Path:
    script = directory / "llama-launcher.sh"
    # No `exec`: bash stays the wrapper's child and llama-server is bash's child.
    script.write_text(f'#!/bin/bash\necho "launcher: starting" >&2\n"{real}" "$@"\necho "launcher: done $?"\n')
    script.chmod(0o755)
    return script


def test_wrapper_sigkilled_leaves_no_llama_server_behind_a_launcher_script(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path, tmp_path: Path
) -> None:
    s = served(_launcher(tmp_path, llama_server_bin), tiny_dense)
    launcher = int(s.wait_ready()["llama_server"]["pid"])
    servers = [p for p in psutil.Process(launcher).children(recursive=True) if p.exe() == llama_server_bin]
    assert len(servers) == 1, "the script runs llama-server as its child (that is the case under test)"
    assert s.proc is not None

    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(5)

    assert gone(servers[0].pid, within=5.0), "llama-server outlived a SIGKILLed wrapper behind a launcher script"
    assert gone(launcher, within=1.0)
    # ... and nothing listens on its port any more. (Binding the port to check that failed now and then in full
    # runs: another process's outgoing connection may take a freed port as its own local port.)
    listening = [c for c in psutil.net_connections(kind="tcp")
                 if c.laddr and c.laddr.port == s.port and c.status == psutil.CONN_LISTEN]
    assert not listening, f"something still listens on llama-server's port {s.port}: {listening}"


def test_clean_stop_through_a_launcher_script_leaves_nothing_and_exits_0(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path, tmp_path: Path
) -> None:
    """The watcher that guards the group must neither hold the log pipes open nor turn a stop into a kill."""
    s = served(_launcher(tmp_path, llama_server_bin), tiny_dense)
    launcher = int(s.wait_ready()["llama_server"]["pid"])
    group = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == launcher]
    assert len(group) >= 3  # launcher, llama-server, the watcher
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)

    assert s.wait_exit(timeout=15.0) == 0
    assert all(gone(pid, within=2.0) for pid in group)
    assert "SIGKILL" not in s.log


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
