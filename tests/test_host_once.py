"""One fact, one owner: `serve` measures the host once, and everything it files (receipts) is filed under
the fingerprint that `wrapper plan` looks up, also when CUDA_VISIBLE_DEVICES is inherited.

NVML is replaced by a recorded two-GPU reading (tests/fakes/with_nvml.py) so the visible-GPU decision
matters on a machine without GPUs; llama-server itself is the real CPU build.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, tiny_profile, write_registry

SHIM = REPO / "tests" / "fakes" / "with_nvml.py"
READING = REPO / "tests" / "data" / "nvml_2x4090.json"


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"wrapper exited {proc.returncode}; log:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {text!r} within {timeout}s; log:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.mark.llama
def test_serve_measures_the_host_once_and_receipts_match_plans_fingerprint(
    llama_server_bin: str, tiny_dense: Path, tmp_path: Path, clean_env: pytest.MonkeyPatch, nats_server_bin: str
) -> None:
    """Regression: with an inherited CUDA_VISIBLE_DEVICES=1 on a two-GPU host, receipts were recorded under
    the all-GPU fingerprint and `wrapper plan` looked them up under the one-GPU one; a start detected the
    hardware up to five times."""
    nats_port = free_port()
    nats = subprocess.Popen([nats_server_bin, "-a", "127.0.0.1", "-p", str(nats_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tiny_profile(tiny_dense, free_port())
    profile["selfcheck"] = {"enabled": True, "max_tokens": 8, "prompt_tokens": 16, "warmup_requests": 0}
    registry = write_registry(tmp_path / "profiles.yaml", {"tiny": profile})
    reads = tmp_path / "nvml-reads"
    env = {**os.environ, "LLAMA_SERVER_BIN": llama_server_bin, "CUDA_VISIBLE_DEVICES": "1",
           "NATS_URL": f"nats://127.0.0.1:{nats_port}", "WRAPPER_STATUS_PORT": "0"}
    log = tmp_path / "serve.log"
    args = [sys.executable, str(SHIM), str(READING), str(reads)]
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen([*args, "serve", "--profile", "tiny", "--config", str(registry)], env=env,
                                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_for(log, "selfcheck: pass", proc)
            receipts_file = tmp_path / "state" / "receipts.jsonl"
            deadline = time.monotonic() + 10
            while not receipts_file.is_file() and time.monotonic() < deadline:
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        nats.kill()
        nats.wait()
    assert reads.read_text().count("read") == 1, "serve read NVML more than once"
    [receipt] = [json.loads(line) for line in receipts_file.read_text().splitlines()]

    planned = subprocess.run([*args, "plan", "--profile", "tiny", "--config", str(registry), "--json"], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert planned.returncode in (0, 5), planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["hardware_fingerprint"] == receipt["fingerprint"]
    assert plan["forecast"] is not None and plan["forecast"]["receipts"] == 1
