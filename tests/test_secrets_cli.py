"""Issue 15 item 4: every line the process prints is redacted, the final `error:` line and its hint included."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.acquire_fixtures import FILE, REPO_ID, write_registry
from wrapper import logs

WRAPPER = str(Path(sys.executable).parent / "wrapper")
TOKEN = "s3cretTOKENvalue9876"  # not hf_-shaped: only the known-secret path can catch it


class _Echo(BaseHTTPRequestHandler):
    """A Hub or proxy that quotes the request headers back in its error body."""

    def _answer(self) -> None:
        body = f"bad request; you sent: {dict(self.headers)}".encode()
        self.send_response(400)
        # huggingface_hub quotes this header in its error (a HEAD has no body): the bare token, no `Bearer`.
        self.send_header("X-Error-Message", f"token {self.headers.get('Authorization', '').split()[-1]} refused")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _fetch(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    body = {"hf_repo_id": REPO_ID, "hf_filename": FILE, "model_root": str(tmp_path / "models")}
    registry = write_registry(tmp_path / "profiles.yaml", {"tiny": {"llamacpp": body}})
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "WRAPPER_STATE_DIR": str(tmp_path / "s"),
               "LLM_PROFILE_NAME": "tiny", "LLM_PROFILES_CONFIG_PATH": str(registry), **env}
    return subprocess.run([WRAPPER, "fetch"], check=False, env=environ, capture_output=True, text=True, timeout=60)


def test_hub_echoing_the_authorization_header_does_not_leak_the_token(echo_hub: str, tmp_path: Path) -> None:
    done = _fetch(tmp_path, HF_ENDPOINT=echo_hub, HF_TOKEN=TOKEN)
    assert done.returncode == 3, done.stderr
    assert "error:" in done.stderr
    assert TOKEN not in done.stderr + done.stdout
    assert "***" in done.stderr  # the echoed header is there, redacted: the message still says what happened


def test_two_line_token_file_is_refused_in_one_line_without_the_token(echo_hub: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"hf_{TOKEN}\nsecond-line-{TOKEN}\n")
    done = _fetch(tmp_path, HF_ENDPOINT=echo_hub, HF_TOKEN_FILE=str(token_file))
    assert done.returncode == 2, done.stderr
    assert TOKEN not in done.stderr + done.stdout
    assert done.stderr.splitlines()[0].startswith(f"error: HF_TOKEN_FILE={token_file}")


def test_redacting_json_text_keeps_the_escape_and_drops_the_value() -> None:
    """The `token=` pattern used to take the backslash of `\\"` as the value: the JSON broke and the value
    itself (between the escaped quotes) was left in the log."""
    line = json.dumps({"msg": 'GET /x?token="abc123" and {"api_key": "k\\\\ey"}'})
    clean = logs.Redactor().redact(line)
    assert "abc123" not in clean and "k\\\\ey" not in clean and "ey" not in clean.split("api_key")[1]
    assert json.loads(clean)["msg"].startswith('GET /x?token="***"')


def test_traceback_in_a_log_record_is_redacted() -> None:
    redactor = logs.Redactor([TOKEN])
    try:
        raise ValueError(f"Illegal header value b'Bearer {TOKEN}'")
    except ValueError:
        record = logging.LogRecord("wrapper", logging.ERROR, __file__, 1, "boom", None, sys.exc_info())
    redactor.filter(record)
    assert record.exc_text and "Illegal header value" in record.exc_text and TOKEN not in record.exc_text
    assert TOKEN not in logging.Formatter().format(record)
    assert TOKEN not in logs.JsonFormatter().format(record)
