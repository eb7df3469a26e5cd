"""Port and GPU-pin clashes between instances on one host, caught before launch (wrapper.launch.preflight).

Other instances are real processes holding real claims (flock), so liveness and stale claims are tested
the way they happen: a process that exits or is killed drops its lock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, tiny_profile, write_registry
from wrapper import settings
from wrapper.errors import ConfigError, PortInUse, exit_code_for
from wrapper.launch import preflight

# A stand-in for another `wrapper serve`: it claims, says so, and holds the claim until stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from wrapper import settings
    from wrapper.launch import preflight
    try:
        claim = preflight.claim(settings.build(sys.argv[1], sys.argv[2]))
    except Exception as exc:
        print("refused", type(exc).__name__, exc, flush=True)
        sys.exit(2)
    print("claimed", claim.path, flush=True)
    sys.stdin.read()
    claim.release()
    """
)


@pytest.fixture
def rig(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Rig]:
    runtime = tmp_path / "run"
    clean_env.setenv("WRAPPER_RUNTIME_DIR", str(runtime))
    r = Rig(tmp_path, runtime)
    yield r
    r.stop_all()


class Rig:
    def __init__(self, tmp: Path, runtime: Path) -> None:
        self.tmp = tmp
        self.runtime = runtime
        self.registry = tmp / "profiles.yaml"
        self.profiles: dict[str, dict[str, object]] = {}
        self.holders: list[subprocess.Popen[str]] = []

    def profile(self, name: str, port: int, devices: list[int] | None = None) -> str:
        body = tiny_profile(self.tmp / "model.gguf", port)
        if devices is not None:
            body["gpu"] = {"device_ids": devices}
        self.profiles[name] = body
        write_registry(self.registry, self.profiles)
        return name

    def settings(self, name: str, **env: str) -> settings.Settings:
        environ = dict(os.environ)
        environ.update(env)
        return settings.build(name, str(self.registry), environ=environ)

    def hold(self, name: str, **env: str) -> subprocess.Popen[str]:
        environ = dict(os.environ)
        environ.update(env)
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, name, str(self.registry)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environ,
        )
        self.holders.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("claimed"), line
        return proc

    def claims(self) -> list[dict[str, Any]]:
        """The live claim records in the runtime directory, oldest first."""
        records = [json.loads(path.read_text()) for path in self.runtime.glob("instance-*.json")]
        return sorted(records, key=lambda record: float(record["started_at"]))

    def stop_all(self) -> None:
        for proc in self.holders:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def test_two_instances_with_own_ports_and_gpus_coexist(rig: Rig) -> None:
    rig.hold(rig.profile("a", free_port(), devices=[0]), WRAPPER_STATUS_PORT=str(free_port()))
    s = rig.settings(rig.profile("b", free_port(), devices=[1]), WRAPPER_STATUS_PORT=str(free_port()))
    with preflight.claim(s) as claim:
        record = json.loads(claim.path.read_text())
        assert record["profile"] == "b"
        assert record["pid"] == os.getpid()
        assert record["devices"] == ["1"]
        assert record["ports"]["llamacpp.port"] == s.server.port
        assert len(list(rig.runtime.glob("instance-*.json"))) == 2
    assert not claim.path.exists(), "release() must remove the claim"


def test_port_of_another_instance_is_refused_naming_it(rig: Rig) -> None:
    port = free_port()
    holder = rig.hold(rig.profile("qwen-5090", port))
    s = rig.settings(rig.profile("other", port))
    with pytest.raises(PortInUse) as caught:
        preflight.claim(s)
    message = str(caught.value)
    assert f"llamacpp.port={port}" in message
    assert f"'qwen-5090' (pid {holder.pid})" in message
    assert "LLAMACPP_PORT_OVERRIDE" in caught.value.hint
    assert exit_code_for(caught.value) == 2
    assert "\n" not in message


def test_status_port_clash_with_another_instance(rig: Rig) -> None:
    status = str(free_port())
    rig.hold(rig.profile("a", free_port()), WRAPPER_STATUS_PORT=status)
    with pytest.raises(PortInUse, match=rf"WRAPPER_STATUS_PORT={status}: already used by wrapper instance 'a'"):
        preflight.check(rig.settings(rig.profile("b", free_port()), WRAPPER_STATUS_PORT=status))


def test_gpu_pin_of_another_instance_is_refused(rig: Rig) -> None:
    holder = rig.hold(rig.profile("big", free_port(), devices=[0, 1]))
    s = rig.settings(rig.profile("small", free_port(), devices=[1]))
    with pytest.raises(
        ConfigError, match=rf"CUDA device 1: already pinned by wrapper instance 'big' \(pid {holder.pid}\)"
    ):
        preflight.claim(s)
    assert len(list(rig.runtime.glob("instance-*.json"))) == 1, "a refused instance leaves no claim"


def test_env_override_pin_clashes_with_profile_pin(rig: Rig) -> None:
    rig.hold(rig.profile("a", free_port(), devices=[0]))
    s = rig.settings(rig.profile("b", free_port(), devices=[1]), CUDA_VISIBLE_DEVICES_OVERRIDE="0")
    with pytest.raises(ConfigError, match="CUDA device 0"):
        preflight.check(s)


def test_inherited_cuda_visible_devices_is_a_pin(rig: Rig) -> None:
    rig.hold(rig.profile("a", free_port()), CUDA_VISIBLE_DEVICES="2")
    with pytest.raises(ConfigError, match="CUDA device 2"):
        preflight.check(rig.settings(rig.profile("b", free_port()), CUDA_VISIBLE_DEVICES="2"))


def test_unpinned_and_hidden_gpus_never_clash(rig: Rig) -> None:
    rig.hold(rig.profile("a", free_port()))
    rig.hold(rig.profile("cpu", free_port()), CUDA_VISIBLE_DEVICES="")
    # Neither holder pins a device (unset, or hidden with ""), so nothing can clash with them.
    assert [claim["devices"] for claim in rig.claims()] == [[], []]
    for name, visible, pinned in (("b", None, ()), ("c", "-1", ()), ("d", "0", ("0",))):
        env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
        with preflight.claim(rig.settings(rig.profile(name, free_port()), **env)) as claim:
            assert claim.needs.devices == pinned
            assert len(rig.claims()) == 3, f"{name} registers beside the two holders"


def test_gpu_sharing_can_be_allowed(rig: Rig) -> None:
    rig.hold(rig.profile("a", free_port(), devices=[0]))
    name = rig.profile("b", free_port(), devices=[0])
    with pytest.raises(ConfigError, match="CUDA device 0"):
        preflight.check(rig.settings(name))  # the same pin without the setting: refused
    with preflight.claim(rig.settings(name, WRAPPER_ALLOW_GPU_SHARING="1")) as claim:
        assert claim.needs.allow_gpu_sharing
        assert [c["devices"] for c in rig.claims()] == [["0"], ["0"]]


def test_claim_of_a_killed_instance_is_stale_and_removed(rig: Rig) -> None:
    port = free_port()
    holder = rig.hold(rig.profile("crashed", port, devices=[0]))
    stale = next(rig.runtime.glob("instance-*.json"))
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    assert stale.exists(), "SIGKILL leaves the file behind; only the lock tells it is stale"
    with preflight.claim(rig.settings(rig.profile("next", port, devices=[0]))) as claim:
        assert not stale.exists()
        assert claim.path.exists()


def test_port_bound_by_a_foreign_process_is_refused(rig: Rig) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"llamacpp.port={port}: 127.0.0.1:{port} is already in use by another"):
            preflight.check(rig.settings(rig.profile("a", port)))
    assert not list(rig.runtime.glob("instance-*.json"))


def test_status_port_equal_to_server_port_is_refused(rig: Rig) -> None:
    port = free_port()
    with pytest.raises(PortInUse, match=f"WRAPPER_STATUS_PORT={port}: the same port as llamacpp.port"):
        preflight.check(rig.settings(rig.profile("a", port), WRAPPER_STATUS_PORT=str(port)))


def test_status_port_zero_is_not_claimed(rig: Rig) -> None:
    with preflight.claim(rig.settings(rig.profile("a", free_port()), WRAPPER_STATUS_PORT="0")) as claim:
        assert set(json.loads(claim.path.read_text())["ports"]) == {"llamacpp.port"}


def test_simultaneous_starts_on_one_gpu_admit_exactly_one(rig: Rig) -> None:
    names = [rig.profile(f"p{i}", free_port(), devices=[0]) for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, name, str(rig.registry)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    rig.holders.extend(procs)
    lines = [p.stdout.readline() for p in procs if p.stdout is not None]
    assert sum(line.startswith("claimed") for line in lines) == 1, lines
    assert sum("already pinned by wrapper instance" in line for line in lines) == 3, lines


def test_unwritable_runtime_dir_is_a_config_error(rig: Rig, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    s = rig.settings(rig.profile("a", free_port()), WRAPPER_RUNTIME_DIR=str(blocker / "sub"))
    with pytest.raises(ConfigError, match="WRAPPER_RUNTIME_DIR="):
        preflight.claim(s)


@pytest.mark.parametrize(
    ("value", "devices"),
    [(None, ()), ("", ()), ("-1", ()), ("0", ("0",)), ("0, 2", ("0", "2")), ("GPU-8a1f", ("GPU-8a1f",))],
)
def test_parse_devices(value: str | None, devices: tuple[str, ...]) -> None:
    assert preflight.parse_devices(value) == devices
