"""Issue 15 item 22: SIGTERM during a download, and SIGTERM twice (timeout(1), some process managers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.acquire_fixtures import FILE, REPO_ID, hub_environ, write_registry
from tests.hubserver import HubServer
from tests.supervisor_fixtures import Served, gone

WRAPPER = str(Path(sys.executable).parent / "wrapper")


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    pytest.fail("timed out")


def test_sigterm_during_download_says_so_keeps_the_partial_file_and_exits_130(
    hub: HubServer, tiny_dense: Path, tmp_path: Path
) -> None:
    """Regression: it exited 143 with no message (the default action of SIGTERM)."""
    hub.add_file(REPO_ID, FILE, tiny_dense)
    hub.faults.throttle_s = 0.3  # ~2 s for the model: the signal lands mid-transfer
    models = tmp_path / "models"
    registry = write_registry(tmp_path / "profiles.yaml", {"tiny": {"llamacpp": {
        "hf_repo_id": REPO_ID, "hf_filename": FILE, "model_root": str(models)}}})
    env = hub_environ(tmp_path, hub, PATH=os.environ.get("PATH", ""), LLM_PROFILE_NAME="tiny",
                      LLM_PROFILES_CONFIG_PATH=str(registry))
    proc = subprocess.Popen([WRAPPER, "fetch"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def partial() -> list[Path]:
        return [p for p in models.glob(f".{FILE}.*.part") if p.stat().st_size > 0]

    _wait_for(lambda: bool(partial()), proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # timeout(1) style: the second one must not cut the exit short
    _out, err = proc.communicate(timeout=30)

    assert proc.returncode == 130, err
    assert "interrupted: download stopped, the partial file is kept for resume" in err.splitlines(), err
    assert "Traceback" not in err
    kept = partial()
    assert kept and kept[0].stat().st_size < tiny_dense.stat().st_size
    assert not (models / FILE).exists()


@pytest.mark.llama
def test_sigterm_twice_is_a_clean_stop_not_a_forced_one(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path
) -> None:
    """`timeout -s TERM` and some process managers send SIGTERM twice; only a second Ctrl-C forces a stop."""
    s = served(llama_server_bin, tiny_dense, supervise={"stop_grace_s": 10.0})
    llama = s.wait_ready()["llama_server"]
    pid = int(llama["pid"])
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    s.proc.send_signal(signal.SIGTERM)

    assert s.wait_exit(timeout=15.0) == 0
    assert gone(pid, within=1.0)
    assert s.log.count("sent SIGTERM to llama-server") == 1
    assert "SIGKILL" not in s.log and "forced=True" not in s.log
