"""`wrapper serve` end to end: real llama-server, status server, JSON logs, secrets kept out."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.supervisor_fixtures import Served

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SECRET = "sk-e2e-0123456789abcdef"


def test_serve_reports_status_serves_requests_and_stops_cleanly(
    served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(SECRET + "\n")
    s = served(
        llama_server_bin,
        tiny_dense,
        api_key_file=str(key_file),
        env={"WRAPPER_LOG_FORMAT": "json", "LLAMACPP_CTX_SIZE_OVERRIDE": "256"},
    )
    status = s.wait_ready()

    assert status["profile"] == "tiny"
    assert status["model"]["path"] == str(tiny_dense)
    args = {a["flag"]: a for a in status["llama_server"]["args"]}
    assert args["--ctx-size"]["value"] == "256"
    assert args["--ctx-size"]["origin"] == "env:LLAMACPP_CTX_SIZE_OVERRIDE"
    assert args["--port"]["origin"] == "profile"
    assert status["llama_server"]["argv"][0] == llama_server_bin
    assert status["restarts"] == 0 and status["uptime_s"] > 0

    # Clients talk to llama-server directly; the wrapper is not in the request path.
    reply = httpx.post(
        f"http://127.0.0.1:{s.port}/completion",
        timeout=30,
        trust_env=False,
        headers={"Authorization": f"Bearer {SECRET}"},
        json={"prompt": "the model", "n_predict": 4, "ignore_eos": True},
    )
    assert reply.status_code == 200
    assert reply.json()["tokens_predicted"] == 4

    assert s.proc is not None
    s.proc.send_signal(signal.SIGINT)
    assert s.wait_exit(timeout=10) == 0

    log = s.log
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records, "WRAPPER_LOG_FORMAT=json gives JSON lines"
    assert any(r["logger"] == "wrapper.llama" for r in records), "child output is re-emitted"
    events = [r["msg"] for r in records if r["logger"] == "wrapper.supervisor" and " -> " in r["msg"]]
    transitions = [m.split(" -> ")[1].split(" ")[0] for m in events]
    assert transitions == ["starting", "ready", "stopping", "stopped"]  # each transition logged once
    assert SECRET not in log
    assert SECRET not in json.dumps(status)
