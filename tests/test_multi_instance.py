"""Several `wrapper serve` on one host without Docker: each its own profile, ports and CUDA pin.

Two real instances (real llama-server, tiny dense and tiny MoE models) serve side by side; a third whose
port or GPU pin clashes is refused before launch, with one clear line and exit 2, and leaves the two
running ones untouched. CUDA pins are only bookkeeping on this CPU build, which is what preflight checks:
NVML is replaced by a recorded reading of a five-GPU host (tests/fakes/with_nvml.py), as GPUs are claimed by
UUID and a pin to a GPU the host does not have claims nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import REPO, free_port, tiny_profile, write_registry

pytestmark = [pytest.mark.llama, pytest.mark.slow]

SHIM = REPO / "tests" / "fakes" / "with_nvml.py"


def five_gpu_reading(tmp: Path) -> Path:
    """The recorded two-GPU reading, widened to five GPUs with their own UUIDs."""
    reading = json.loads((REPO / "tests" / "data" / "nvml_2x4090.json").read_text())
    first = reading["devices"][0]
    reading["devices"] = [{**first, "index": i, "uuid": f"GPU-0000000{i}-0000-1111-2222-333344445555"}
                          for i in range(5)]
    path = tmp / "nvml_5gpu.json"
    path.write_text(json.dumps(reading))
    return path


def serve_argv(tmp: Path, name: str, registry: Path) -> list[str]:
    reading = tmp / "nvml_5gpu.json"
    if not reading.is_file():
        five_gpu_reading(tmp)
    return [sys.executable, str(SHIM), str(reading), str(tmp / "nvml-reads"), "serve", "--profile", name,
            "--config", str(registry)]


class Instance:
    def __init__(self, name: str, registry: Path, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.status_port = int(env["WRAPPER_STATUS_PORT"])
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                serve_argv(log.parent, name, registry),
                env=env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = httpx.get(
                f"http://127.0.0.1:{self.status_port}/status", timeout=2, trust_env=False
            ).json()
        except httpx.HTTPError:
            return None
        return data

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode}:\n{self.log[-3000:]}")
            status = self.status()
            if status is not None and status["state"] == "ready":
                return status
            time.sleep(0.1)
        pytest.fail(f"{self.name} not ready in {timeout}s:\n{self.log[-3000:]}")


@pytest.fixture
def host(clean_env: pytest.MonkeyPatch, tmp_path: Path, llama_server_bin: str) -> Iterator[Host]:
    h = Host(tmp_path, llama_server_bin)
    yield h
    h.stop_all()


class Host:
    def __init__(self, tmp: Path, binary: str) -> None:
        self.tmp = tmp
        self.binary = binary
        self.registry = tmp / "profiles.yaml"
        self.profiles: dict[str, Any] = {}
        self.instances: list[Instance] = []

    def add(self, name: str, model: Path, port: int, devices: list[int]) -> None:
        body = tiny_profile(model, port)
        body["gpu"] = {"device_ids": devices}
        body["supervise"] = {"stop_grace_s": 5.0, "load_timeout_s": 60.0}
        self.profiles[name] = body
        write_registry(self.registry, self.profiles)

    def env(self, status_port: int) -> dict[str, str]:
        return {
            **os.environ,
            "LLAMA_SERVER_BIN": self.binary,
            "WRAPPER_STATUS_HOST": "127.0.0.1",
            "WRAPPER_STATUS_PORT": str(status_port),
        }

    def serve(self, name: str, status_port: int | None = None) -> Instance:
        inst = Instance(name, self.registry, self.env(status_port or free_port()), self.tmp / f"{name}.log")
        self.instances.append(inst)
        return inst

    def stop_all(self) -> None:
        for inst in self.instances:
            if inst.proc.poll() is None:
                inst.proc.send_signal(signal.SIGTERM)
        for inst in self.instances:
            try:
                inst.proc.wait(15)
            except subprocess.TimeoutExpired:
                inst.proc.kill()
                inst.proc.wait(5)


def chat(port: int) -> dict[str, Any]:
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "ignore_eos": True},
        timeout=60,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def refused(host: Host, name: str, status_port: int | None = None) -> tuple[int, str, float]:
    env = host.env(status_port or free_port())
    started = time.monotonic()
    done = subprocess.run(
        serve_argv(host.tmp, name, host.registry),
        env=env,
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stderr, time.monotonic() - started


def test_two_instances_coexist_and_clashes_are_refused_before_launch(
    host: Host, tiny_dense: Path, tiny_moe: Path
) -> None:
    dense_port, moe_port = free_port(), free_port()
    host.add("dense", tiny_dense, dense_port, devices=[0])
    host.add("moe", tiny_moe, moe_port, devices=[1])
    host.add("same-port", tiny_dense, moe_port, devices=[2])
    host.add("same-gpu", tiny_moe, free_port(), devices=[1, 3])
    host.add("own-port", tiny_dense, free_port(), devices=[4])

    dense, moe = host.serve("dense"), host.serve("moe")
    dense_status, moe_status = dense.wait_ready(), moe.wait_ready()
    assert dense_status["llama_server"]["pid"] != moe_status["llama_server"]["pid"]

    # Each llama-server got its own pin (the child's environment is the proof, not the profile).
    for status, pin in ((dense_status, "0"), (moe_status, "1")):
        child_env = psutil.Process(status["llama_server"]["pid"]).environ()
        assert child_env.get("CUDA_VISIBLE_DEVICES") == pin

    assert chat(dense_port)["usage"]["completion_tokens"] == 4
    assert chat(moe_port)["usage"]["completion_tokens"] == 4

    code, err, took = refused(host, "same-port")
    assert code == 2, err
    here = socket.gethostname()
    assert f"llamacpp.port={moe_port}: already used by wrapper instance 'moe' (pid {moe.proc.pid}) on {here}" in err
    assert "Traceback" not in err
    assert took < 30

    code, err, _ = refused(host, "same-gpu")
    assert code == 2, err
    # Claimed by UUID: GPU 1 of the recorded host, named as the operator wrote the pin too.
    assert (f"CUDA device GPU-00000001-0000-1111-2222-333344445555 (CUDA_VISIBLE_DEVICES=1,3): already pinned by "
            f"wrapper instance 'moe' (pid {moe.proc.pid}) on {here}") in err
    assert "hint:" in err

    code, err, _ = refused(host, "own-port", status_port=dense.status_port)
    assert code == 2, err
    assert f"WRAPPER_STATUS_PORT={dense.status_port}: already used by wrapper instance 'dense'" in err

    # The refused ones disturbed nothing.
    assert (dense.status() or {}).get("state") == "ready"
    assert chat(moe_port)["usage"]["completion_tokens"] == 4

    # A clean stop releases the claim: the GPU and port of `moe` are free for the next instance.
    moe.proc.send_signal(signal.SIGTERM)
    assert moe.proc.wait(20) == 0, moe.log[-2000:]
    runtime = Path(os.environ["WRAPPER_RUNTIME_DIR"])
    assert [p.name for p in runtime.glob("instance-*.json")] == [
        p.name for p in runtime.glob(f"instance-{dense.proc.pid}-*.json")
    ]
    again = host.serve("same-gpu")
    again.wait_ready()
