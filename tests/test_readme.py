"""The README's first command works as written: the quick start downloads, verifies and serves its real
model through the Hub, falls back to `tiny-dense` in one line where the Hub cannot be reached, and
`wrapper flags` prints exactly what `serve` runs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port
from tests.hubserver import HubServer

pytestmark = [pytest.mark.llama, pytest.mark.slow]

REAL_REPO = "bartowski/SmolLM2-360M-Instruct-GGUF"
REAL_FILE = "SmolLM2-360M-Instruct-Q4_K_M.gguf"
REAL_REVISION = "7be6f65f1db715fe5dc5a4634c0d459b4eed42ec"
REAL_SHA256 = "2fa3f013dcdd7b99f9b237717fa0b12d75bbb89984cc1274be1471a465bac9c2"


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
    raise AssertionError(f"{url} never answered 200: {log_text()}")


class Run:
    def __init__(self, proc: subprocess.Popen[str], env: dict[str, str], log: Path, port: int,
                 status_port: int) -> None:
        self.proc, self.env, self.log, self.port, self.status_port = proc, env, log, port, status_port
        self.code: int | None = None

    def text(self) -> str:
        return self.log.read_text()

    def status_when(self, ready: Callable[[dict[str, object]], bool], timeout: float = 180) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.status_port}/status"
        while True:
            status = _wait(url, self.proc, self.text)
            if ready(status):
                return status
            assert time.monotonic() < deadline, f"status never got there: {status}\n{self.text()}"
            time.sleep(0.3)

    def chat(self) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", timeout=60, trust_env=False,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})


@contextmanager
def quickstart(llama_server_bin: str, tmp_path: Path, **extra: str) -> Iterator[Run]:
    """scripts/quickstart.sh as a user runs it (no profile chosen), on free ports, caches in tmp_path."""
    port, status_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACPP_", "LLM_", "WRAPPER_", "HF_"))}
    env.update(LLAMA_SERVER_BIN=llama_server_bin, LLAMACPP_PORT_OVERRIDE=str(port),
               WRAPPER_STATUS_PORT=str(status_port), WRAPPER_STATE_DIR=str(tmp_path / "state"),
               WRAPPER_RUNTIME_DIR=str(tmp_path / "run"), LLM_CACHE_DIR=str(tmp_path / "cache"))
    env.update(extra)
    log = tmp_path / "quickstart.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(["scripts/quickstart.sh"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=sink, text=True)
    run = Run(proc, env, log, port, status_port)
    try:
        yield run
    finally:
        proc.send_signal(signal.SIGTERM)
        run.code = proc.wait(timeout=20)


def test_quickstart_without_the_hub_says_so_once_serves_tiny_dense_and_flags_match(
    llama_server_bin: str, tmp_path: Path
) -> None:
    readme = (REPO / "README.md").read_text()
    assert readme.splitlines()[3].startswith("scripts/quickstart.sh"), "README's first command moved"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the Hub cannot be reached
    with quickstart(llama_server_bin, tmp_path, HF_ENDPOINT=closed, WRAPPER_SELFCHECK_ENABLED="false") as run:
        status = run.status_when(lambda s: s["state"] == "ready")
        assert status["profile"] == "tiny-dense"
        chat = run.chat()
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"

        llama = status["llama_server"]
        assert isinstance(llama, dict)
        child = psutil.Process(int(llama["pid"]))
        printed = subprocess.run([str(REPO / ".venv/bin/wrapper"), "flags", "--profile", "tiny-dense"], cwd=REPO,
                                 env=run.env, capture_output=True, text=True, check=True).stdout
        assert shlex.split(printed.strip().splitlines()[-1]) == child.cmdline()
    assert run.code == 0, run.text()
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE
    said = [line for line in run.text().splitlines() if "smollm2-360m" in line or "Hub" in line]
    assert len(said) == 1, said  # one line, not the fetch error, its hint and its retry warnings
    assert said[0].startswith("quickstart: cannot fetch the smollm2-360m model (cannot reach the Hub at " + closed)
    assert said[0].endswith("serving tiny-dense (random weights, answers are noise) instead")


def test_quickstart_downloads_verifies_and_serves_its_real_profile_from_the_hub(
    llama_server_bin: str, tmp_path: Path, hub: HubServer, tiny_dense: Path
) -> None:
    # The stand-in serves a file of the real name at the pinned revision; only the pinned sha256 differs
    # (a copy of the shipped registry pins the stand-in's), so download, verify and serve run as for a user.
    served = hub.add_file(REAL_REPO, REAL_FILE, tiny_dense, revision=REAL_REVISION)
    shipped = (REPO / "config/llm_profiles.yaml").read_text()
    assert shipped.count(REAL_SHA256) == 1
    registry = tmp_path / "llm_profiles.yaml"
    registry.write_text(shipped.replace(REAL_SHA256, served.sha256))
    with quickstart(llama_server_bin, tmp_path, HF_ENDPOINT=hub.url, LLM_PROFILES_CONFIG_PATH=str(registry)) as run:
        status = run.status_when(lambda s: s["state"] == "ready" and s["selfcheck"] is not None)
        assert status["profile"] == "smollm2-360m"
        chat = run.chat()
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert run.code == 0, run.text()
    text = run.text()
    assert "quickstart: cannot fetch" not in text
    assert f"downloading {REAL_FILE} from " in text
    assert f"verified {REAL_FILE}: sha256 {served.sha256}" in text
    assert "starting -> ready" in text and "selfcheck: " in text
    downloaded = tmp_path / "cache" / "gguf" / REAL_FILE
    assert downloaded.read_bytes() == tiny_dense.read_bytes()
    assert any(f"/{REAL_REPO}/resolve/{REAL_REVISION}/{REAL_FILE}" in path for _, path, _, _ in hub.requests)
