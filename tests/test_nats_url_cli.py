"""A NATS_URL nats-py cannot use is refused at start, through the CLI: exit 2, one line naming NATS_URL,
never the password (issue 15: `nats://h:99999` killed the events thread with chained tracebacks and left
events silently off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, tiny_profile, write_registry
from wrapper.settings import Environment

BAD = {
    "port_out_of_range": ("nats://h:99999", "port"),
    "unknown_scheme": ("foo://x", "scheme 'foo'"),
    "garbage": ("%%not a url%%", "not a NATS server address"),
    "path": ("nats://h:4222/some/path", "not a NATS server address"),
    "password_and_bad_port": ("nats://admin:hunter2@h:99999", "port"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_nats_url_is_exit_2_naming_it(name: str, tmp_path: Path) -> None:
    url, why = BAD[name]
    registry = write_registry(tmp_path / "reg.yaml", {"tiny": tiny_profile(tmp_path / "m.gguf", free_port())})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "LLM_", "WRAPPER_"))}
    done = subprocess.run([sys.executable, "-m", "wrapper", "serve", "--profile", "tiny", "--config", str(registry)],
                          env={**env, "NATS_URL": url, "WRAPPER_STATUS_PORT": "0"}, cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NATS_URL=" in errors[0] and why in errors[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "hunter2" not in done.stderr + done.stdout and "admin" not in done.stderr + done.stdout


@pytest.mark.parametrize("url", ["nats://127.0.0.1:4222", "nats://nats:4222", "tls://[::1]:4222", "nats://u:p@h",
                                 "127.0.0.1:4222", "wss://nats.example.org"])
def test_usable_nats_urls_pass(url: str) -> None:
    assert Environment.from_environ({"NATS_URL": url}).nats_url == url
