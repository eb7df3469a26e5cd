"""Warm start (wrapper.warm) on a real llama-server: the second start with the same inputs spawns the last
start's command before the profile is read, adopts it only when it is exactly what the full path derives, and
never leaves an early child behind when that path fails or derives something else."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import tiny_profile, write_registry
from tests.supervisor_fixtures import FAST, Served
from wrapper import warm

pytestmark = pytest.mark.llama

WARM = "warm start: llama-server was spawned"


def _ready_then_stop(s: Served, *, start: bool = True) -> str:
    """One start of `s` (already started when start=False) until ready, then a clean stop; its log."""
    if start:
        s.start()
    s.wait_ready()
    _wait_record(s)
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit() == 0, s.log[-3000:]
    return s.log


def _records(s: Served) -> list[Path]:
    return sorted((Path(os.environ["WRAPPER_STATE_DIR"]) / warm.RECORDS).glob("*.json"))


def _wait_record(s: Served, within: float = 3.0) -> None:
    """The record is written by the "ready" listener, just after /status says ready (none when warm start is
    off: then this waits `within` for nothing)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not (_records(s) and s.env.get("WRAPPER_WARM_START") != "0"):
        time.sleep(0.05)


def _servers(binary: str, port: int) -> list[psutil.Process]:
    """llama-server processes of this binary on this port. By argv[0], not by executable: psutil remembers a
    process's executable from its first look, which for an early child is the exec shim's Python; the shim's
    forked watcher names the binary later in its argv, never first."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and Path(cmdline[0]).resolve() == Path(binary).resolve() and str(port) in cmdline:
            out.append(proc)
    return out


def test_second_start_spawns_the_recorded_command_and_adopts_it(served: Callable[..., Served],
                                                               llama_server_bin: str, tiny_dense: Path,
                                                               tmp_path: Path) -> None:
    key = tmp_path / "keys"
    key.write_text("sk-warm-secret-one\n")
    key.chmod(0o600)
    secrets = {"HF_TOKEN": "hf_warmSecretValue1234567890", "LLAMA_API_KEY": "sk-inherited-secret"}
    s = served(llama_server_bin, tiny_dense, env=secrets, api_key_file=str(key))
    first = _ready_then_stop(s, start=False)
    assert WARM not in first
    [record] = _records(s)
    text = record.read_text()
    assert record.stat().st_mode & 0o777 == 0o600
    for secret in (*secrets.values(), "sk-warm-secret-one"):
        assert secret not in text
    second = _ready_then_stop(s)
    assert WARM in second, second[-3000:]
    # One llama-server for the whole run: the early child was adopted, not started a second time.
    assert second.count("-> starting (pid") == 1
    data = json.loads(text)
    assert str(key) in {f["path"] for f in data["files"]}  # a rotated key file is a cold start


def test_a_changed_registry_is_a_cold_start(served: Callable[..., Served], llama_server_bin: str,
                                            tiny_dense: Path, tmp_path: Path) -> None:
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    registry = Path(s.argv[-1])
    write_registry(registry, {"tiny": {**tiny_profile(tiny_dense, s.port, ctx_size=1024), "supervise": FAST}})
    s.start()
    s.wait_ready()
    props = httpx.get(f"http://127.0.0.1:{s.port}/props", timeout=5, trust_env=False).json()
    assert props["default_generation_settings"]["n_ctx"] == 1024
    log = _ready_then_stop(s, start=False)
    assert WARM not in log and "warm start: not used" not in log  # nothing spawned early: the file changed


def test_a_record_whose_command_differs_is_stopped_and_the_derived_one_started(
        served: Callable[..., Served], llama_server_bin: str, tiny_dense: Path) -> None:
    """Whatever the record says, the server that runs is the one this start derives (here: a record edited
    to another context size, as a newer tuned config or a replan would make it differ)."""
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    [record] = _records(s)
    data = json.loads(record.read_text())
    at = data["argv"].index("--ctx-size")
    data["argv"][at + 1] = "256"
    record.write_text(json.dumps(data))
    log = _ready_then_stop_checking(s, llama_server_bin)
    assert "warm start: not used (the command differs at argument" in log and "--ctx-size" in log


def _ready_then_stop_checking(s: Served, binary: str) -> str:
    s.start()
    s.wait_ready()
    props = httpx.get(f"http://127.0.0.1:{s.port}/props", timeout=5, trust_env=False).json()
    assert props["default_generation_settings"]["n_ctx"] == 512  # the profile's, not the record's 256
    assert len(_servers(binary, s.port)) == 1  # the early one is gone
    assert s.proc is not None
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit() == 0
    return s.log


def test_an_early_child_is_stopped_when_the_start_fails(served: Callable[..., Served], llama_server_bin: str,
                                                        tiny_dense: Path) -> None:
    """The record matches and llama-server is spawned early, then the full path refuses the start (the status
    port is taken): exit 2 with one line, and no llama-server left holding the port."""
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", s.status_port))
        blocker.listen()
        s.start()
        code = s.wait_exit()
    assert code == 2, s.log[-3000:]
    assert "WRAPPER_STATUS_PORT" in s.log and "Traceback" not in s.log
    assert "warm start: stopped the early llama-server" in s.log  # it was spawned, and is gone
    assert _servers(llama_server_bin, s.port) == []
    with socket.socket() as probe:  # llama-server's port is free again
        probe.bind(("127.0.0.1", s.port))


@pytest.mark.parametrize("spoil", ["model touched", "record writable by others", "opted out", "port taken"])
def test_no_early_spawn_when_the_record_cannot_be_trusted(spoil: str, served: Callable[..., Served],
                                                          llama_server_bin: str, tiny_dense: Path,
                                                          tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(tiny_dense.read_bytes())
    env = {"WRAPPER_WARM_START": "0"} if spoil == "opted out" else {}
    s = served(llama_server_bin, model, env=env)
    _ready_then_stop(s, start=False)
    assert len(_records(s)) == (0 if spoil == "opted out" else 1)
    if spoil == "model touched":
        os.utime(model, ns=(time.time_ns(), time.time_ns() + 10**9))
    elif spoil == "record writable by others":
        [record] = _records(s)
        record.chmod(0o666)
    if spoil == "port taken":
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", s.port))
            holder.listen()
            s.start()
            assert s.wait_exit() == 2
        assert "already in use" in s.log and "warm start" not in s.log  # nothing was spawned early
        return
    log = _ready_then_stop(s)
    assert WARM not in log and "warm start: not used" not in log


def test_fingerprint_counts_secret_looking_variables_by_name_only() -> None:
    base = {"PATH": "/usr/bin", "HF_TOKEN": "one"}
    args = ["serve", "--profile", "a"]
    assert warm.fingerprint(args, base) == warm.fingerprint(args, {**base, "HF_TOKEN": "two"})
    assert warm.fingerprint(args, base) != warm.fingerprint(args, {**base, "LLAMACPP_CTX_SIZE_OVERRIDE": "2"})
    assert warm.fingerprint(args, base) != warm.fingerprint(args, {"PATH": "/usr/bin"})
    assert warm.fingerprint(args, base) != warm.fingerprint([*args, "--auto-tune"], base)
    # A recreated container (new id in HOSTNAME) finds the record; the adoption still compares the environment.
    assert warm.fingerprint(args, {**base, "HOSTNAME": "a1"}) == warm.fingerprint(args, {**base, "HOSTNAME": "b2"})
    via_timeout, direct = {**base, "_": "/usr/bin/timeout"}, {**base, "_": "/x/bin/wrapper"}  # a shell sets `_`
    assert warm.fingerprint(args, via_timeout) == warm.fingerprint(args, direct)


def test_an_environment_difference_is_not_adopted(served: Callable[..., Served], llama_server_bin: str,
                                                  tiny_dense: Path) -> None:
    """The record's environment for the child (here edited to set a variable the full path does not) must be
    exactly the derived one, or the early child is replaced; the log names the variable, not its value."""
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    [record] = _records(s)
    data = json.loads(record.read_text())
    data["set"]["OMP_NUM_THREADS"] = "7"
    record.write_text(json.dumps(data))
    log = _ready_then_stop(s)
    assert "warm start: not used (the environment differs in OMP_NUM_THREADS)" in log
    assert WARM not in log


@pytest.mark.parametrize("damage", ["garbage", "wrong types", "symlink", "foreign binary"])
def test_a_damaged_or_planted_record_is_never_run(damage: str, served: Callable[..., Served],
                                                  llama_server_bin: str, tiny_dense: Path, tmp_path: Path) -> None:
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    [record] = _records(s)
    data = json.loads(record.read_text())
    if damage == "garbage":
        record.write_bytes(b"\x00{not json")
    elif damage == "wrong types":
        data["files"] = [{"path": 0, "id": []}]
        record.write_text(json.dumps(data))
    elif damage == "symlink":
        target = tmp_path / "elsewhere.json"
        target.write_text(json.dumps(data))
        target.chmod(0o600)
        record.unlink()
        record.symlink_to(target)
    else:  # a record naming a program it never checked: refused before anything runs
        marker = tmp_path / "ran"
        data["argv"] = ["/bin/sh", "-c", f"touch {marker}"]
        record.write_text(json.dumps(data))
    log = _ready_then_stop(s)
    assert WARM not in log and "warm start: not used" not in log
    if damage == "foreign binary":
        assert not (tmp_path / "ran").exists()


def test_a_port_another_instance_has_claimed_is_left_alone(served: Callable[..., Served], llama_server_bin: str,
                                                           tiny_dense: Path, tmp_path: Path) -> None:
    """Another live instance claimed the port but has not bound it (downloading, or in a restart backoff):
    no early child takes it; the start fails with the claim's own message."""
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    claims = Path(os.environ["WRAPPER_RUNTIME_DIR"])
    claims.mkdir(parents=True, exist_ok=True)
    claim = claims / "instance-1-abcd.json"
    claim.write_text(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "profile": "other", "ports": {"llamacpp.port": s.port},
        "devices": [], "started_at": time.time()}))
    fd = os.open(claim, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, as a live instance holds its claim
    try:
        s.start()
        code = s.wait_exit()
    finally:
        os.close(fd)
    assert "warm start" not in s.log, s.log[-3000:]
    assert code == 2 and "already used by" in s.log


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sigterm_before_adoption_leaves_no_server(inherited: str, served: Callable[..., Served],
                                                  llama_server_bin: str, tiny_dense: Path) -> None:
    """SIGTERM in the moment between the early spawn and the adoption (while Python still imports): the
    wrapper exits and takes the early llama-server with it, also when it inherited SIGTERM as ignored.
    Regression: a test runner whose in-process supervisor had left SIGTERM ignored passed that on to the
    wrapper, which then swallowed the stop and went on serving."""
    s = served(llama_server_bin, tiny_dense)
    _ready_then_stop(s, start=False)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL)
    try:
        s.start()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert s.proc is not None
    deadline = time.monotonic() + 5
    while not _servers(llama_server_bin, s.port) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _servers(llama_server_bin, s.port), f"no early llama-server; log:\n{s.log[-3000:]}"
    s.proc.send_signal(signal.SIGTERM)
    s.wait_exit()
    deadline = time.monotonic() + 5
    while _servers(llama_server_bin, s.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _servers(llama_server_bin, s.port) == []


def test_a_file_replaced_at_the_same_path_is_a_change(tmp_path: Path) -> None:
    """prepare() may re-download the model into the same path (or a key file may be rotated) after the early
    spawn matched it: the adoption re-checks every file the match relied on."""
    model = tmp_path / "model.gguf"
    model.write_bytes(b"old bytes")
    proc = subprocess.Popen(["true"])
    proc.wait()
    early = warm.Early(proc, ["x"], {}, "127.0.0.1", 1, files=[(str(model), warm._file_id(str(model)) or [])])
    assert early.changed_file() is None
    fresh = tmp_path / "download.part"
    fresh.write_bytes(b"new bytes")
    os.replace(fresh, model)
    assert early.changed_file() == str(model)
