"""The status server over real HTTP: /healthz, /status, /metrics, and what others publish on it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from wrapper import logs
from wrapper.errors import PortInUse
from wrapper.supervisor import State, Transition
from wrapper.supervisor.status import StatusState
from wrapper.supervisor.status_server import StatusServer


def _t(state: State, pid: int | None = None, restarts: int = 0, url: str = "", reason: str = "") -> Transition:
    return Transition(state=state, previous="stopped", pid=pid, restarts=restarts, url=url, ts=0.0, reason=reason)


# The process's one redactor, as the CLI hands it to the status server; tests teach it their secrets.
REDACTOR = logs.Redactor()


@pytest.fixture
def state() -> StatusState:
    s = StatusState("tiny", "/models/tiny.gguf", "ab" * 32)
    s.argv = ["llama-server", "--api-key", "***", "--port", "8080"]
    s.args = [{"flag": "--port", "value": "8080", "setting": "llamacpp.port", "origin": "env:LLAMACPP_PORT_OVERRIDE"}]
    return s


@pytest.fixture
def url(state: StatusState) -> Iterator[str]:
    server = StatusServer("127.0.0.1", 0, state, redactor=REDACTOR).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=2, trust_env=False)


def test_healthz_follows_the_supervisor_state(state: StatusState, url: str) -> None:
    assert get(f"{url}/healthz").status_code == 503
    state(_t("starting", pid=42, restarts=0, url="http://127.0.0.1:8080"))
    assert get(f"{url}/healthz").status_code == 503
    state(_t("ready", pid=42, restarts=0))
    ok = get(f"{url}/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"ok": True, "state": "ready", "restarts": 0, "pid": 42}
    state(_t("restarting", pid=42, restarts=0, reason="killed by SIGKILL"))
    assert get(f"{url}/healthz").status_code == 503


def test_status_shows_profile_model_argv_origins_and_selfcheck(state: StatusState, url: str) -> None:
    state(_t("ready", pid=7, restarts=2, url="http://127.0.0.1:8080"))
    state.selfcheck = {"verdict": "ok", "tokens_per_s": 123.5}
    state.extra["gpu"] = "none"
    body = get(f"{url}/status").json()
    assert body["profile"] == "tiny"
    assert body["model"] == {"path": "/models/tiny.gguf", "sha256": "ab" * 32}
    assert body["llama_server"]["argv"][1:3] == ["--api-key", "***"]
    assert body["llama_server"]["args"][0]["origin"] == "env:LLAMACPP_PORT_OVERRIDE"
    assert (body["state"], body["restarts"], body["llama_server"]["pid"]) == ("ready", 2, 7)
    assert body["selfcheck"] == {"verdict": "ok", "tokens_per_s": 123.5}
    assert body["extra"] == {"gpu": "none"}
    assert body["uptime_s"] >= body["ready_s"] >= 0


def test_metrics_are_prometheus_text(state: StatusState, url: str) -> None:
    state(_t("ready", pid=7, restarts=3))
    state.selfcheck = {"tokens_per_s": 50.0, "verdict": "ok", "ttft_ms": {"p50": 12}}
    response = get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    # Every sample carries the instance's labels (issue 13); compared here without them.
    lines = [re.sub(r',?profile="[^"]*",model="[^"]*"', "", line).replace("{}", "")
             for line in response.text.splitlines()]
    assert 'wrapper_up{profile="tiny",model="/models/tiny.gguf"} 1' in response.text.splitlines()
    for expected in (
        "wrapper_up 1",
        "llama_server_up 1",
        'llama_server_state{state="ready"} 1',
        'llama_server_state{state="starting"} 0',
        "llama_server_restarts_total 3",
        "wrapper_selfcheck_tokens_per_s 50",
        "wrapper_selfcheck_ttft_ms_p50 12",
    ):
        assert expected in lines
    assert not any("verdict" in line for line in lines)  # only numbers become metrics
    samples = [line for line in lines if line and not line.startswith("#")]
    assert all(len(line.split(" ")) == 2 for line in samples)


def test_secrets_never_leave_through_the_status_port(state: StatusState, url: str) -> None:
    REDACTOR.add(["sekrit-token-value"])  # the one the status server was handed (the CLI's, in a real run)
    state.extra["note"] = "loaded with sekrit-token-value and hf_abcdefghijklmnopqrstuvwxyz"
    text = get(f"{url}/status").text
    assert "sekrit-token-value" not in text
    assert "hf_abcdefghijklmnopqrstuvwxyz" not in text


def test_unknown_path_is_404(url: str) -> None:
    assert get(f"{url}/v1/chat/completions").status_code == 404  # never proxies inference


def test_status_port_taken_is_a_clear_error(state: StatusState, url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(PortInUse, match=rf"WRAPPER_STATUS_PORT={port}: cannot listen on 127.0.0.1:{port}"):
        StatusServer("127.0.0.1", port, state)


def test_status_stays_json_with_an_alias_holding_token_equals_quote(state: StatusState, url: str) -> None:
    # Issue 15: the redactor ran over the encoded JSON, its `token=` pattern ate the backslash of `\"`,
    # and the bare quote left behind ended the string early.
    state.argv = ["llama-server", "--alias", 'my token="x"', "--port", "8080"]
    state.args = [{"flag": "--alias", "value": 'my token="x"', "setting": "llamacpp.extra_args", "origin": "profile"}]
    response = get(f"{url}/status")
    body = response.json()  # raises on invalid JSON
    assert body["llama_server"]["argv"] == ["llama-server", "--alias", 'my token="***"', "--port", "8080"]
    assert body["llama_server"]["args"][0]["value"] == 'my token="***"'
    assert get(f"{url}/healthz").json()["state"] == "stopped"


def test_secret_with_characters_json_escapes_is_still_redacted(state: StatusState, url: str) -> None:
    # Redacting the encoded text missed a secret whose JSON form differs from its text (`"` -> `\"`).
    secret = 'pa"ss\\word-0123'
    REDACTOR.add([secret])
    state.extra["note"] = f"key is {secret}"
    text = get(f"{url}/status").text
    assert json.loads(text)["extra"]["note"] == "key is ***"
    assert "pa" + '\\"ss' not in text


@pytest.mark.parametrize("host", ["::1", "::"])
def test_status_server_listens_on_an_ipv6_host(state: StatusState, host: str) -> None:
    """Review finding: WRAPPER_STATUS_HOST=:: passed the port check and then failed to bind an IPv4 socket,
    after llama-server had started."""
    server = StatusServer(host, 0, state, redactor=REDACTOR).start()
    try:
        state(_t("ready", pid=7))
        assert httpx.get(f"http://[::1]:{server.port}/healthz", timeout=5).json()["ok"] is True
        if host == "::":  # the wildcard takes IPv4 clients too
            assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        server.stop()
