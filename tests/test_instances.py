"""Named instances: two `wrapper serve` processes on one host (real llama-server, real nats-server) are told apart
in events by instance id, carry the node's name, an advertised URL and the service; a clean stop publishes
mesh.node.offline.v1; /metrics on the status port carries labels and llama-server's own metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from tests.conftest import REPO, free_port, tiny_profile, write_registry
from tests.loadgen_fixtures import Nats
from tests.supervisor_fixtures import FAST
from wrapper import settings
from wrapper.events import payloads as events
from wrapper.events import publisher


class Listener:
    """Every message on `>` from a real nats-server, collected by a background thread until closed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.got: list[tuple[str, dict[str, Any]]] = []
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "could not subscribe"

    async def _main(self) -> None:
        nc = await nats.connect(self.url)

        async def on_msg(msg: Any) -> None:
            self.got.append((msg.subject, json.loads(msg.data)))

        await nc.subscribe(">", cb=on_msg)
        await nc.flush()
        self._ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    def wait(self, subject: str, where: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for subj, msg in list(self.got):
                if subj == subject and all(msg.get(k) == v for k, v in where.items()):
                    return msg
            time.sleep(0.05)
        pytest.fail(f"no {subject} with {where} in {timeout}s; got {[s for s, _ in self.got]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def listener(nats_factory: type[Nats]) -> Iterator[Listener]:
    server = nats_factory(jetstream=False).start()
    listen = Listener(server.url)
    yield listen
    listen.close()


def _serve(tmp: Path, name: str, binary: str, model: Path, env: dict[str, str], host: str) -> tuple[
        subprocess.Popen[bytes], int, int, Path]:
    port, status_port = free_port(), free_port()
    profile = tiny_profile(model, port, host=host)
    profile.update({"supervise": FAST, "model_id": f"tiny-{name}"})
    registry = write_registry(tmp / f"{name}.yaml", {name: profile})
    log = tmp / f"{name}.log"
    full = {**os.environ, "LLAMA_SERVER_BIN": binary, "WRAPPER_STATUS_PORT": str(status_port),
            "WRAPPER_STATUS_HOST": "127.0.0.1", "WRAPPER_RUNTIME_DIR": str(tmp / "run"), **env}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "wrapper", "serve", "--profile", name, "--config",
                                 str(registry)], env=full, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    return proc, port, status_port, log


@pytest.mark.llama
def test_two_instances_on_one_host_are_named_and_a_clean_stop_goes_offline(
    listener: Listener, llama_server_bin: str, tiny_dense: Path, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    common = {"NATS_URL": listener.url, "NODE_NAME": "gpu-node-1", "SERVICE_NAME": "orion-llamaccp",
              "SERVICE_VERSION": "0.1.0", "WRAPPER_STATE_DIR": str(tmp_path / "state")}
    a, a_port, a_status, a_log = _serve(tmp_path, "alpha", llama_server_bin, tiny_dense, common, "0.0.0.0")
    b, _, _, b_log = _serve(tmp_path, "beta", llama_server_bin, tiny_dense,
                                        {**common, "WRAPPER_ADVERTISE_URL": "http://lb.example:9000/"}, "127.0.0.1")
    started = time.monotonic()
    try:
        ready_a = listener.wait("llama.instance.ready.v1", {"profile": "alpha"})
        ready_b = listener.wait("llama.instance.ready.v1", {"profile": "beta"})
        assert (ready_a["instance_id"], ready_b["instance_id"]) == ("gpu-node-1-alpha", "gpu-node-1-beta")
        assert ready_a["node_id"] == ready_b["node_id"] == "gpu-node-1"
        # A wildcard bind is advertised on the node's name, never loopback; an explicit URL wins.
        assert ready_a["url"] == ready_a["advertise_url"] == f"http://gpu-node-1:{a_port}"
        assert ready_b["url"] == "http://lb.example:9000"
        assert (ready_a["service_name"], ready_a["service_version"]) == ("orion-llamaccp", "0.1.0")
        beat = listener.wait("mesh.node.announce.v1", {"instance_id": "gpu-node-1-alpha"})
        # The first heartbeat comes with the start, not a 30 s interval later.
        assert time.monotonic() - started < 25 and beat["node_id"] == "gpu-node-1"
        assert "service:orion-llamaccp" in beat["services"]

        metrics = httpx.get(f"http://127.0.0.1:{a_status}/metrics", timeout=5, trust_env=False).text
        labels = 'profile="alpha",instance="gpu-node-1-alpha",node="gpu-node-1",model="tiny-alpha"'
        assert f"wrapper_up{{{labels}}} 1" in metrics
        assert "# TYPE llamacpp:prompt_tokens_total counter" in metrics  # llama-server's own, re-served
        assert f"llamacpp:prompt_tokens_total{{{labels}}}" in metrics
        assert f"wrapper_llama_metrics_up{{{labels}}} 1" in metrics

        a.send_signal(signal.SIGTERM)
        assert a.wait(30) == 0, a_log.read_text()[-3000:]
        offline = listener.wait("mesh.node.offline.v1", {"instance_id": "gpu-node-1-alpha"}, timeout=10)
        assert offline["reason"] == "stopped" and offline["exit_code"] == 0 and offline["node_id"] == "gpu-node-1"
        assert not [m for s, m in listener.got if s == "mesh.node.offline.v1" and m["profile"] == "beta"]
        # A CPU-only host sends no GPU status at all (no zero-filled readings).
        assert not [s for s, _ in listener.got if s == "mesh.gpu.status.v1"]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
            if proc.poll() is None:
                proc.kill()
    assert b.returncode == 0, b_log.read_text()[-3000:]


def test_gpu_status_follows_each_heartbeat_and_only_with_gpus(listener: Listener) -> None:
    reading = events.GpuReading(index=1, name="NVIDIA H200", memory_used_bytes=2**30, memory_total_bytes=141 * 2**30,
                                utilization_pct=37, temperature_c=41)
    context = events.EventContext(instance_id="n-p", host="h", profile="p", node_id="n")
    with_gpu = publisher.Publisher(listener.url, context=context)
    without = publisher.Publisher(listener.url, context=context.model_copy(update={"instance_id": "n-cpu"}))
    try:
        with_gpu.start_heartbeat(0.3, gpus=lambda: [reading])
        without.start_heartbeat(0.3, gpus=lambda: [])
        status = listener.wait("mesh.gpu.status.v1", {"instance_id": "n-p"}, timeout=10)
        assert status["gpus"][0]["temperature_c"] == 41 and status["gpus"][0]["utilization_pct"] == 37
        listener.wait("mesh.node.announce.v1", {"instance_id": "n-cpu"}, timeout=10)
        time.sleep(0.7)
        assert not [m for s, m in listener.got if s == "mesh.gpu.status.v1" and m["instance_id"] == "n-cpu"]
    finally:
        with_gpu.close(1)
        without.close(1)


@pytest.mark.parametrize(
    ("environ", "host", "want"),
    [
        ({}, "0.0.0.0", ("box", "box-p", "http://box:8080")),
        ({"NODE_NAME": "gpu-node-1"}, "0.0.0.0", ("gpu-node-1", "gpu-node-1-p", "http://gpu-node-1:8080")),
        ({"NODE_NAME": "n"}, "::", ("n", "n-p", "http://n:8080")),
        ({"NODE_NAME": "n"}, "10.0.0.5", ("n", "n-p", "http://10.0.0.5:8080")),
        ({"NODE_NAME": "n", "WRAPPER_INSTANCE_ID": "llm-a"}, "0.0.0.0", ("n", "llm-a", "http://n:8080")),
        ({"WRAPPER_ADVERTISE_URL": "https://x.example/llm/"}, "0.0.0.0", ("box", "box-p", "https://x.example/llm")),
    ],
)
def test_identity(environ: dict[str, str], host: str, want: tuple[str, str, str]) -> None:
    env = settings.Environment.from_environ(environ)
    who = settings.identity(env, "p", host, 8080, hostname="box")
    assert (who.node_id, who.instance_id, who.advertise_url) == want


@pytest.mark.parametrize(("name", "value"), [("WRAPPER_ADVERTISE_URL", "node-1:8080"),
                                             ("WRAPPER_HEARTBEAT_S", "0"), ("WRAPPER_HEARTBEAT_S", "soon")])
def test_bad_identity_variables_are_one_line_errors(name: str, value: str) -> None:
    from wrapper.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        settings.Environment.from_environ({name: value})
    assert err.value.message.startswith(f"{name}={value!r}")
