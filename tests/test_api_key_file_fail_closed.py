"""Issue 15 item 5: an api_key_file with no key used to run llama-server with no key, reported ready.

A real `wrapper serve` with each kind of keyless file: exit 2, one line naming the file, and the binary
(a script that leaves a mark when anything runs it) never started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port, tiny_profile, write_registry

WRAPPER = str(Path(sys.executable).parent / "wrapper")


def _empty(path: Path) -> None:
    path.write_text("")


def _comments_only(path: Path) -> None:
    path.write_text("# keys go here\n\n   # one per line\n")


def _directory(path: Path) -> None:
    path.mkdir()  # what Docker creates when a bind-mount source is missing


@pytest.mark.parametrize("make", [_empty, _comments_only, _directory], ids=["empty", "comments-only", "directory"])
def test_keyless_api_key_file_fails_closed_before_llama_server_starts(
    make: Callable[[Path], None], clean_env: pytest.MonkeyPatch, tmp_path: Path, tiny_dense: Path
) -> None:
    key_file = tmp_path / "api_keys"
    make(key_file)
    marker = tmp_path / "llama-server-ran"
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    binary.chmod(0o755)
    registry = write_registry(
        tmp_path / "profiles.yaml", {"tiny": tiny_profile(tiny_dense, free_port(), api_key_file=str(key_file))}
    )
    env = {**os.environ, "LLAMA_SERVER_BIN": str(binary), "WRAPPER_STATUS_PORT": "0"}
    done = subprocess.run([WRAPPER, "serve", "--profile", "tiny", "--config", str(registry)], check=False, env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"llamacpp.api_key_file={key_file}" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "llama-server (or its --help) ran although the key file holds no key"
