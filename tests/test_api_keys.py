"""llama-server's API keys: one file, one reader (settings.read_api_keys), used by llama-server, the liveness
probe and the self-check alike."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.supervisor_fixtures import Served
from wrapper.errors import ConfigError
from wrapper.settings import read_api_keys


def test_keys_are_one_per_line_without_blanks_or_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\nkey-one\n\n  key-two  \n")
    assert [k.reveal() for k in read_api_keys(str(path))] == ["key-one", "key-two"]


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_a_key_file_without_a_key_fails_closed(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError, match="holds no key"):
        read_api_keys(str(path))


def test_a_directory_instead_of_a_key_file_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        read_api_keys(str(tmp_path))


@pytest.mark.llama
def test_two_key_file_serves_both_keys_and_the_selfcheck_passes(served: Callable[..., Served],
                                                               llama_server_bin: str, tiny_dense: Path,
                                                               tmp_path: Path) -> None:
    """Regression: with two keys in the file the self-check sent the whole file as one bearer token (a broken
    Authorization header) and failed a healthy server."""
    keys = tmp_path / "api-keys"
    keys.write_text("# two keys, as llama-server reads them\nfirst-key-123\nsecond-key-456\n")
    env = {"WRAPPER_SELFCHECK_ENABLED": "true", "WRAPPER_SELFCHECK_MAX_TOKENS": "8",
           "WRAPPER_SELFCHECK_PROMPT_TOKENS": "16", "WRAPPER_SELFCHECK_WARMUP_REQUESTS": "0"}
    s = served(llama_server_bin, tiny_dense, env=env, api_key_file=str(keys))
    s.wait_ready()
    deadline = time.monotonic() + 60
    verdicts = ("selfcheck: pass", "selfcheck: degraded", "selfcheck: fail", "selfcheck: could not run")
    while not any(v in s.log for v in verdicts) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "selfcheck: pass" in s.log, s.log[-3000:]
    url = f"http://127.0.0.1:{s.port}/v1/models"
    for key in ("first-key-123", "second-key-456"):
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}, trust_env=False).status_code == 200
    assert httpx.get(url, trust_env=False).status_code == 401
    assert "first-key-123" not in s.log and "second-key-456" not in s.log
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit() == 0
