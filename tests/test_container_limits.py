"""Issue 15 item 21: the container around the wrapper. A status port of 0 made the healthcheck fail for ever;
a stop_grace_s above ~14 s plus the NATS drain outlasted compose's 30 s stop_grace_period."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, tiny_profile, write_registry
from wrapper import settings
from wrapper.errors import ConfigError

WRAPPER = str(Path(sys.executable).parent / "wrapper")


def _build(tmp_path: Path, grace: float, **env: str) -> settings.Settings:
    profile = {**tiny_profile(tmp_path / "m.gguf", 18080), "supervise": {"stop_grace_s": grace}}
    registry = write_registry(tmp_path / "profiles.yaml", {"a": profile})
    return settings.build("a", str(registry), environ=env)


@pytest.mark.parametrize(
    ("grace", "env"),
    [
        (10.0, {"WRAPPER_STOP_GRACE_PERIOD": "30s", "NATS_URL": "nats://127.0.0.1:4222"}),  # the default fits
        (25.0, {"WRAPPER_STOP_GRACE_PERIOD": "30s"}),  # no NATS: no drain
        (25.0, {"WRAPPER_STOP_GRACE_PERIOD": "1m", "NATS_URL": "nats://127.0.0.1:4222"}),
        (60.0, {}),  # outside compose nothing bounds the stop
    ],
)
def test_stop_that_fits_the_container_is_accepted(tmp_path: Path, grace: float, env: dict[str, str]) -> None:
    assert _build(tmp_path, grace, **env).profile.supervise.stop_grace_s == grace


def test_stop_longer_than_compose_allows_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _build(tmp_path, 20.0, WRAPPER_STOP_GRACE_PERIOD="30s", NATS_URL="nats://127.0.0.1:4222")
    message = err.value.message
    assert "\n" not in message
    assert message.startswith("supervise.stop_grace_s=20: a stop can take 43s")
    assert "NATS drain 20s" in message and "the container allows 30s" in message
    assert "lower supervise.stop_grace_s to 13.5 or less" in err.value.hint


def test_unreadable_stop_grace_period_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="WRAPPER_STOP_GRACE_PERIOD='half a minute': not a duration"):
        _build(tmp_path, 10.0, WRAPPER_STOP_GRACE_PERIOD="half a minute")


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("45", 45.0),
                                               ("1h", 3600.0), ("3x", None), ("", None)])
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert settings.parse_duration(text) == seconds


def test_real_command_exits_2_with_one_line_when_the_stop_does_not_fit(tmp_path: Path) -> None:
    profile = {**tiny_profile(tmp_path / "m.gguf", free_port()), "supervise": {"stop_grace_s": 40}}
    registry = write_registry(tmp_path / "profiles.yaml", {"a": profile})
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "WRAPPER_STOP_GRACE_PERIOD": "30s"}
    done = subprocess.run([WRAPPER, "serve", "--profile", "a", "--config", str(registry)], check=False, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[0].startswith("error: supervise.stop_grace_s=40: a stop can take 43s")


def test_compose_passes_its_stop_grace_period_to_the_wrapper() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in ("llm", "llm2"):
        env = compose["services"][name]["environment"]
        assert env["WRAPPER_STOP_GRACE_PERIOD"] == "${LLM_STOP_GRACE_PERIOD:-30s}"
    assert compose["x-llm"]["stop_grace_period"] == "${LLM_STOP_GRACE_PERIOD:-30s}"


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path in ("/health", "/healthz") else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _healthcheck(**env: str) -> int:
    """Run the compose file's healthcheck command as the container's shell would ($$ is compose's escape)."""
    test = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-llm"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "sh", "-c"]
    script = test[3].replace("$$", "$")
    return subprocess.run(["sh", "-c", script], check=False, env={"PATH": os.environ["PATH"], **env},
                          timeout=30).returncode


def test_healthcheck_with_the_status_server_off_probes_llama_server(health_port: int) -> None:
    assert _healthcheck(WRAPPER_STATUS_PORT="0", LLAMACPP_PORT_OVERRIDE=str(health_port)) == 0
    assert _healthcheck(WRAPPER_STATUS_PORT="0", LLAMACPP_PORT_OVERRIDE=str(free_port())) == 1


def test_healthcheck_probes_the_status_server_when_it_is_on(health_port: int) -> None:
    assert _healthcheck(WRAPPER_STATUS_PORT=str(health_port), LLAMACPP_PORT_OVERRIDE=str(free_port())) == 0
    assert _healthcheck(WRAPPER_STATUS_PORT=str(free_port()), LLAMACPP_PORT_OVERRIDE=str(health_port)) == 1


def test_status_port_zero_in_our_image_warns_in_one_line(tmp_path: Path) -> None:
    marker, image = tmp_path / ".dockerenv", tmp_path / "llm_profiles.yaml"
    marker.touch()
    image.touch()
    off = settings.Environment.from_environ({"WRAPPER_STATUS_PORT": "0"})
    warning = settings.status_port_warning(off, [marker], image)
    assert warning is not None and "\n" not in warning and "HEALTHCHECK" in warning
    assert settings.status_port_warning(settings.Environment.from_environ({}), [marker], image) is None
    assert settings.status_port_warning(off, [tmp_path / "absent"], image) is None  # not in a container
