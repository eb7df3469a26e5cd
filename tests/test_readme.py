"""The README's first command works as written, and `wrapper flags` prints exactly what `serve` runs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.llama, pytest.mark.slow]


def _wait(url: str, proc: subprocess.Popen[str], log_text: Callable[[], str], timeout: float = 120
          ) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"quickstart exited early with {proc.returncode}: {log_text()}"
        try:
            reply = httpx.get(url, timeout=2, trust_env=False)
            if reply.status_code == 200:
                data: dict[str, object] = reply.json()
                return data
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered 200")


def test_quickstart_serves_tiny_dense_and_flags_match_the_running_command(
    llama_server_bin: str, tmp_path: Path
) -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.splitlines()[3].startswith("scripts/quickstart.sh"), "README's first command moved"
    port, status_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACPP_", "LLM_", "WRAPPER_"))}
    env.update(LLAMA_SERVER_BIN=llama_server_bin, LLAMACPP_PORT_OVERRIDE=str(port),
               WRAPPER_STATUS_PORT=str(status_port), WRAPPER_STATE_DIR=str(tmp_path / "state"),
               WRAPPER_RUNTIME_DIR=str(tmp_path / "run"), WRAPPER_SELFCHECK_ENABLED="false")
    log = tmp_path / "quickstart.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(["scripts/quickstart.sh"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=sink, text=True)
    try:
        status = _wait(f"http://127.0.0.1:{status_port}/status", proc, log.read_text)
        while status["state"] != "ready":
            time.sleep(0.2)
            status = _wait(f"http://127.0.0.1:{status_port}/status", proc, log.read_text)
        assert status["profile"] == "tiny-dense"
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, trust_env=False,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"

        llama = status["llama_server"]
        assert isinstance(llama, dict)
        child = psutil.Process(int(llama["pid"]))
        printed = subprocess.run([str(REPO / ".venv/bin/wrapper"), "flags", "--profile", "tiny-dense"], cwd=REPO,
                                 env=env, capture_output=True, text=True, check=True).stdout
        assert shlex.split(printed.strip().splitlines()[-1]) == child.cmdline()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0, log.read_text()
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE
